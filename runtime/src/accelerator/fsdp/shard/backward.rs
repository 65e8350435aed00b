//! The backward of a sharded model: gathering each block again just before its backward, taking the
//! gradients of the blocks whose backward has finished (reduce-scatter, or held while accumulating),
//! and at the end giving every parameter its piece of the averaged gradient.

use super::*;

/// A unit's averaged gradient chunk in the shards' dtype (`None`: no rank reduced one), and which of its
/// parameters had a gradient before the backward.
type Taken = (Option<Tensor>, Vec<bool>);

impl ShardedModel {
    /// Before `Accelerator::backward` runs the autograd backward: the units no block gathers are
    /// gathered (a forward leaves them so; this covers a backward through a graph of an earlier forward
    /// too).
    pub(crate) fn begin_backward(&mut self, sync: bool) -> Result<()> {
        self.backward = Some(sync);
        self.taken.iter_mut().for_each(|t| *t = None);
        self.hook_error = None;
        for k in 0..self.units.len() {
            if !self.units[k].block {
                self.gather(k)?;
            }
        }
        Ok(())
    }

    /// The hook on block `k`'s output fired: its backward is next. The blocks after it in the forward
    /// have finished theirs: their gradients are taken (reduce-scattered, or held when accumulating)
    /// and their units freed; then unit `k` is gathered. Outside `Accelerator::backward` (a plain
    /// `loss.backward()`) it is only gathered, so the backward is right, and the gradients stay
    /// unsharded on the parameters.
    pub(crate) fn before_block_backward(&mut self, k: usize) {
        if self.hook_error.is_some() {
            return;
        }
        self.outstanding[k] = self.outstanding[k].saturating_sub(1);
        let result = (|| -> Result<()> {
            if let Some(sync) = self.backward
                && let Some(pos) = self.order.iter().position(|&u| u == k)
            {
                let after: Vec<usize> = self.order[pos + 1..].iter().rev().copied().collect();
                for j in after {
                    if self.taken[j].is_none() && self.outstanding[j] == 0 {
                        // Freed first, as FSDP2's post-backward reshards before it reduces: the
                        // block's parameters go back to the allocator before the reduce-scatter's
                        // input is made (the gradients stay on the parameters meanwhile).
                        self.free(j)?;
                        self.take_gradients(j, sync)?;
                    }
                }
            }
            self.gather(k)?;
            // Prefetch: the block before this one in the forward runs its backward next.
            let previous = self
                .order
                .iter()
                .position(|&u| u == k)
                .and_then(|pos| pos.checked_sub(1))
                .map(|pos| self.order[pos]);
            if let Some(previous) = previous {
                self.issue_gather(previous)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.hook_error = Some(e);
        }
    }

    /// Takes unit `k`'s unsharded gradients off its parameters: reduce-scattered (mean) into this rank's
    /// chunk when `sync`, else added to those held for the next synchronising backward. A parameter
    /// without a gradient counts as zeros here (whether it keeps none is decided over all ranks at the
    /// end). On a GPU each gradient is reduce-scattered from the tensor autograd made, all of the unit's
    /// in one NCCL group: FSDP2 copies them into one buffer first, a pass over the unit's gradients on
    /// the compute stream and a second copy of them alive at once.
    fn take_gradients(&mut self, k: usize, sync: bool) -> Result<()> {
        let world = self.mesh.size();
        // The previous reduce-scatter's inputs go back to the allocator first (FSDP2's order), after
        // the compute stream waits for them (they have had a block's backward to run): holding inputs
        // until the host sees them done would keep most of them, the host being far ahead of the GPU.
        for (mark, _inputs, _unit) in self.pending.drain(..) {
            mark.wait_on_compute()?;
        }
        let unit = &mut self.units[k];
        let held = unit.held_grads.take();
        // Per parameter, its whole gradient laid out as its region: every rank's rows, padded.
        let parts = tch::no_grad(|| -> Result<Vec<Tensor>> {
            // Gradients come in the gathered parameters' dtype and are reduced in it (the policy's
            // reduce_dtype is its param_dtype, as Accelerate sets it).
            let (kind, device) = (unit.full.kind(), unit.full.device());
            let t = torch("FSDP reduce-scatter");
            let mut parts = Vec::with_capacity(unit.params.len());
            for (i, p) in unit.params.iter().enumerate() {
                let region = unit.quota[i] * world;
                let g = p.grad();
                let mut part = if !g.defined() {
                    Tensor::f_zeros([region], (kind, device)).map_err(&t)?
                } else {
                    unit.used[i] = true;
                    let flat = g.f_reshape([-1]).map_err(&t)?;
                    if flat.numel() as i64 == region {
                        flat
                    } else {
                        let padded = Tensor::f_zeros([region], (kind, device)).map_err(&t)?;
                        padded
                            .f_narrow(0, 0, unit.numels[i])
                            .and_then(|mut v| v.f_copy_(&flat))
                            .map_err(&t)?;
                        padded
                    }
                };
                if let Some(h) = held.as_ref().map(|h| &h[i]) {
                    part = part.f_add(h).map_err(&t)?;
                }
                parts.push(part);
            }
            Ok(parts)
        })?;
        crate::optim::clear_grads(&unit.params);
        if !sync {
            unit.held_grads = Some(parts);
            self.taken[k] = Some(None);
            return Ok(());
        }
        let (chunk, kind, device) = (unit.chunk, unit.full.kind(), unit.full.device());
        let out = Tensor::f_empty([chunk], (kind, device)).map_err(torch("FSDP reduce-scatter"))?;
        let queued = match &self.comm {
            Some(comm) => {
                let unit = &self.units[k];
                let pairs: Vec<(Tensor, Tensor)> = parts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| unit.quota[*i] > 0)
                    .map(|(i, part)| {
                        let share = out.narrow(0, unit.starts[i], unit.quota[i]);
                        (part.shallow_clone(), share)
                    })
                    .collect();
                let queued = self
                    .mesh
                    .reduce_scatter_on_stream(&pairs, &out, ReduceOp::Mean, comm)
                    .map_err(|e| chained("FSDP reduce-scatter", e))?;
                if queued {
                    let mark = Mark::new()?;
                    mark.record(comm.raw())?;
                    Some(mark)
                } else {
                    None
                }
            }
            None => None,
        };
        let reduced = if let Some(mark) = queued {
            self.pending.push((mark, parts, k));
            out
        } else {
            // One reduce-scatter of the gradients laid out rank after rank (each rank's rows of every
            // parameter, in order: its chunk's layout).
            let unit = &self.units[k];
            let mut by_rank = Vec::with_capacity(parts.len() * world as usize);
            for r in 0..world {
                for (i, part) in parts.iter().enumerate() {
                    let q = unit.quota[i];
                    by_rank.push(part.narrow(0, r * q, q));
                }
            }
            let flat = if by_rank.is_empty() {
                Tensor::f_empty([0], (kind, device))
            } else {
                Tensor::f_cat(&by_rank, 0)
            }
            .map_err(torch("FSDP reduce-scatter"))?;
            self.mesh
                .reduce_scatter(&flat, ReduceOp::Mean)
                .map_err(|e| chained("FSDP reduce-scatter", e))?
        };
        // Read (converted to the shards' dtype) at the end of the backward, after the compute stream
        // has waited for the communication stream.
        self.taken[k] = Some(Some(reduced));
        self.taken_stash[k] = self.units[k].stash.take();
        Ok(())
    }

    /// After the autograd backward: the units not taken yet are (blocks in reverse order, then the
    /// rest), every unit is freed, and on a synchronising backward each parameter gets its piece of the
    /// averaged gradient — except a parameter no rank gave one, which keeps none (the optimizer skips
    /// it, as under PyTorch's FSDP2). A gradient that reached a unit after it was taken (a parameter
    /// shared between blocks) is an error naming it.
    pub(crate) fn finish_backward(&mut self) -> Result<()> {
        let Some(sync) = self.backward else {
            return Ok(());
        };
        let result = self.finish(sync);
        if result.is_err() {
            // Nothing half-done stays: the streams joined, no gradients, every unit on its pieces.
            let _ = self.join();
            for unit in &self.units {
                crate::optim::clear_grads(&unit.params);
            }
            self.taken.iter_mut().for_each(|t| *t = None);
            self.taken_stash.iter_mut().for_each(|t| *t = None);
            let _ = self.reshard();
        }
        self.backward = None;
        self.outstanding.fill(0);
        result
    }

    fn finish(&mut self, sync: bool) -> Result<()> {
        if let Some(e) = self.hook_error.take() {
            return Err(e);
        }
        let late = self.units.iter().enumerate().find_map(|(k, unit)| {
            let i = unit.params.iter().position(|p| p.grad().defined())?;
            self.taken[k]
                .is_some()
                .then(|| (unit.name.clone(), unit.names[i].clone()))
        });
        if let Some((unit, name)) = late {
            return Err(Error::InvalidValue {
                name: format!("FSDP unit {unit:?}"),
                detail: format!(
                    "parameter {name} received its gradient after its block's backward had finished \
                     (is it shared with another block? FSDP needs a shared parameter in one unit, e.g. \
                     the root)"
                ),
            });
        }
        // The units this backward gathered and has not taken yet (blocks in reverse order, then the
        // rest); a unit it never gathered got no gradients. Which units those are depends on the
        // model's structure alone, so every rank takes the same ones.
        let order: Vec<usize> = self.order.iter().rev().copied().collect();
        let rest: Vec<usize> = (0..self.units.len())
            .filter(|k| !order.contains(k))
            .collect();
        let todo: Vec<usize> = order
            .into_iter()
            .chain(rest)
            .filter(|&k| self.taken[k].is_none() && self.units[k].gathered)
            .collect();
        let mut results: Vec<Option<Taken>> = (0..self.units.len()).map(|_| None).collect();
        for (i, &k) in todo.iter().enumerate() {
            if sync && i + 1 == todo.len() {
                // Before the last reduce-scatter's take makes the compute stream wait for the one
                // before it: the units whose reduce-scatters the compute stream has waited for are
                // converted now, while that one still runs (nothing else would hide it).
                self.convert_finished(&mut results)?;
            }
            self.take_gradients(k, sync)?;
        }
        self.join()?;
        if !sync {
            return self.reshard();
        }
        let used = self.used_anywhere()?;
        self.convert_finished(&mut results)?;
        self.reshard()?;
        let mut used = used.into_iter();
        for (unit, taken) in self.units.iter_mut().zip(results) {
            let (reduced, had) = taken.unwrap_or((None, vec![false; unit.params.len()]));
            for (i, p) in unit.params.iter().enumerate() {
                // A parameter keeps no gradient only if no rank gave it one and it had none before.
                let flag = used.next().unwrap_or(true) || had[i];
                if let (true, Some(r)) = (flag, reduced.as_ref()) {
                    let (lo, len) = unit.piece(i, self.mesh.rank());
                    crate::optim::set_grad(p, &r.narrow(0, lo, len))?;
                }
            }
            unit.used.fill(false);
        }
        Ok(())
    }

    /// Each taken unit's reduced chunk, once the compute stream has waited for its reduce-scatter (every
    /// unit but those in `pending`), in the shards' dtype (and on the host when they are offloaded), with
    /// the gradients set aside at its gather added, into `results` (a unit that got none: `None`).
    fn convert_finished(&mut self, results: &mut [Option<Taken>]) -> Result<()> {
        for (k, result) in results.iter_mut().enumerate() {
            if result.is_some()
                || self.taken[k].is_none()
                || self.pending.iter().any(|(_, _, u)| *u == k)
            {
                continue;
            }
            let shard = &self.units[k].shard;
            let mut reduced = match self.taken[k].take().flatten() {
                Some(r) => Some(
                    r.f_to_device_(shard.device(), shard.kind(), false, false)
                        .map_err(torch("FSDP reduce-scatter"))?,
                ),
                None => None,
            };
            let had = match (reduced.as_mut(), self.taken_stash[k].take()) {
                (Some(r), Some((stash, had))) => {
                    *r = r.f_add(&stash).map_err(torch("FSDP reduce-scatter"))?;
                    had
                }
                _ => vec![false; self.units[k].params.len()],
            };
            *result = Some((reduced, had));
        }
        Ok(())
    }

    /// After a failed autograd backward: nothing to average. The partial gradients are dropped (those
    /// held from earlier accumulation steps stay) and the parameters go back to their pieces, so the
    /// model stays usable. Returns a hook's failure, which explains the backward's.
    pub(crate) fn abandon_backward(&mut self) -> Result<Option<Error>> {
        self.join()?;
        self.taken.iter_mut().for_each(|t| *t = None);
        self.taken_stash.iter_mut().for_each(|t| *t = None);
        for unit in &mut self.units {
            crate::optim::clear_grads(&unit.params);
            unit.used.fill(false);
        }
        self.reshard()?;
        self.backward = None;
        self.outstanding.fill(0);
        Ok(self.hook_error.take())
    }

    /// Whether each parameter (units in order) got a gradient on any rank since the last
    /// synchronisation (one small all-reduce). A rank that used every parameter needs no answer (each
    /// gets its gradient whatever the others did): it joins the all-reduce without reading the result,
    /// so the host does not wait for the GPU there (a blocking copy either way would drain the stream
    /// every step).
    fn used_anywhere(&self) -> Result<Vec<bool>> {
        let flags: Vec<f32> = self
            .units
            .iter()
            .flat_map(|u| u.used.iter().map(|&b| if b { 1.0 } else { 0.0 }))
            .collect();
        let device = self
            .units
            .first()
            .map_or(tch::Device::Cpu, |u| u.full.device());
        let all_used = flags.iter().all(|f| *f > 0.0);
        let mut t = if all_used {
            Tensor::f_ones([flags.len() as i64], (Kind::Float, device))
        } else {
            Tensor::from_slice(&flags).f_to_device(device)
        }
        .map_err(torch("FSDP reduce-scatter"))?;
        self.mesh
            .group()
            .all_reduce(&mut t, ReduceOp::Max)
            .map_err(|e| chained("FSDP reduce-scatter", e))?;
        if all_used {
            return Ok(vec![true; flags.len()]);
        }
        let flags = Vec::<f32>::try_from(t.to_device(tch::Device::Cpu))
            .map_err(torch("FSDP reduce-scatter"))?;
        Ok(flags.into_iter().map(|f| f > 0.0).collect())
    }
}
