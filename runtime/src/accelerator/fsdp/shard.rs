//! The sharding mechanism: each parameter is split by rows (its first dimension) into one equal piece
//! per rank, the last padded, as FSDP2 shards every parameter on dim 0; a rank's chunk of a unit is its
//! pieces of the unit's parameters, one after another. Between steps every parameter tensor holds only
//! its piece, so the optimizer — any [`crate::Optimizer`], tch's included, since it
//! holds the same tensors — creates and updates state for the local piece alone. A forward gathers the
//! pieces into the unit's unsharded buffer, where each parameter has its own region (every rank's piece
//! of it, in rank order, so the parameter is its region's first elements), and points the parameters at
//! their views of it; after the backward each gradient is reduce-scattered straight from the tensor
//! autograd made (no copy into a flat buffer, unless its rows need padding) into its owners' pieces, and
//! the parameters return to their pieces. A unit's collectives, one per parameter, go to NCCL as one
//! group.
//!
//! The parameter tensors keep their identity throughout (`set_data` swaps what they point at), so the
//! user's module, the VarStore and the optimizer never see a different tensor. The unsharded buffer
//! keeps one storage for the model's life: freeing it empties that storage in place and gathering fills
//! it again, so the views autograd saved during a forward are valid again when their backward runs.
//!
//! Units named by a [`crate::layers::Block`]'s path are gathered by that block, just before it runs
//! (`context`), and freed after it under FULL_SHARD; the block's output hook gathers them again just
//! before their backward, and there the units whose backward has finished (the blocks after it) are
//! reduce-scattered and freed. The other units (the root: what no block holds) stay gathered from the
//! start of the forward to the end of the backward, as FSDP2 keeps its root. Every collective comes in
//! an order fixed by the model's structure, the same on every rank.

use crate::distributed::{CommStream, Mark};

mod backward;
mod materialize;
mod mesh;
mod state;
use crate::{Error, ReduceOp, Result};
pub(crate) use materialize::agree_on_empty_weights;
use materialize::{Pending, materialize_pieces};
pub(crate) use mesh::{Hybrid, Mesh};
pub(crate) use state::SlicedRead;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// One unit: parameters gathered and freed together, with their flat shard.
pub(crate) struct Unit {
    /// The unit's VarStore path prefix ("" for the model's root).
    pub name: String,
    params: Vec<Tensor>,
    names: Vec<String>,
    shapes: Vec<Vec<i64>>,
    numels: Vec<i64>,
    /// Per parameter, the elements of one rank's piece: its rows divided by the world size, rounded
    /// up, times the elements of a row.
    quota: Vec<i64>,
    /// Per parameter, where its piece starts in a rank's chunk.
    starts: Vec<i64>,
    /// Per parameter, where its region (`quota × world` elements) starts in the unsharded buffer.
    offsets: Vec<i64>,
    /// Elements per rank: the sum of the quotas.
    chunk: i64,
    /// This rank's chunk.
    shard: Tensor,
    /// Every rank's chunk, gathered; its storage has no bytes while the unit is sharded.
    full: Tensor,
    /// Unsharded gradients of backwards that did not synchronise (gradient accumulation), one per
    /// parameter laid out as its region, added to the next synchronising one's before the
    /// reduce-scatter.
    held_grads: Option<Vec<Tensor>>,
    /// The gradients the pieces had when the unit was gathered (not zeroed since the last step), laid
    /// out as the chunk, and which parameters had one: put back on the pieces when the unit is freed
    /// without a reduction in between (an evaluation forward), added to the next reduce-scatter's
    /// result otherwise (PyTorch accumulates into an existing `.grad`), dropped by `zero_grad`.
    stash: Option<(Tensor, Vec<bool>)>,
    /// Which parameters got a gradient on this rank since the last synchronisation.
    used: Vec<bool>,
    /// Whether the parameters point into `full` (gathered) or at their pieces.
    gathered: bool,
    /// Whether a block gathers this unit (else it is gathered for the whole forward).
    block: bool,
    /// The event after an all-gather queued on the communication stream and not yet waited for by the
    /// compute stream (its input and output are views of `full`).
    in_flight: Option<Mark>,
}

impl Unit {
    /// Points every parameter at its piece of this rank's chunk.
    fn point_at_pieces(&self, rank: i64) -> Result<()> {
        for (i, p) in self.params.iter().enumerate() {
            let (lo, len) = self.piece(i, rank);
            p.shallow_clone()
                .f_set_data(&self.shard.narrow(0, lo, len))
                .map_err(torch("FSDP reshard"))?;
        }
        Ok(())
    }

    /// Where parameter `i`'s piece of `rank` lies in that rank's chunk, and its length (0 for a rank
    /// past the parameter's last row).
    fn piece(&self, i: usize, rank: i64) -> (i64, i64) {
        let len = (self.numels[i] - rank * self.quota[i]).clamp(0, self.quota[i]);
        (self.starts[i], len)
    }

    /// The element of parameter `i` (flattened) where `rank`'s piece begins.
    fn piece_from(&self, i: usize, rank: i64) -> i64 {
        rank * self.quota[i]
    }

    /// Copies `rank`'s piece of `whole` (parameter `i`'s whole value) into the chunk.
    fn fill_piece(&self, i: usize, rank: i64, whole: &Tensor) -> tch::Result<()> {
        let (lo, len) = self.piece(i, rank);
        if len > 0 {
            let from = self.piece_from(i, rank);
            self.shard
                .f_narrow(0, lo, len)?
                .f_copy_(&whole.f_reshape([-1])?.f_narrow(0, from, len)?)?;
        }
        Ok(())
    }

    /// Parameter `i`'s whole value out of every rank's chunk, gathered in rank order (`world × chunk`
    /// elements).
    fn gathered_param(&self, gathered: &Tensor, i: usize, world: i64) -> tch::Result<Tensor> {
        gathered
            .f_view([world, self.chunk])?
            .f_narrow(1, self.starts[i], self.quota[i])?
            .f_reshape([-1])?
            .f_narrow(0, 0, self.numels[i])?
            .f_view(self.shapes[i].as_slice())
    }

    fn bytes(&self, world: i64) -> i64 {
        self.chunk * world * self.full.kind().elt_size_in_bytes() as i64
    }
}

/// The elements of one rank's piece of a parameter of `shape` split by rows over `world` ranks: its
/// rows divided by `world`, rounded up, times the elements of a row (a scalar is one row).
fn quota(shape: &[i64], world: i64) -> i64 {
    let rows = shape.first().copied().unwrap_or(1);
    if rows == 0 {
        return 0;
    }
    let per_row: i64 = shape.iter().skip(1).product();
    (rows + world - 1) / world * per_row
}

/// `n` zeros of `kind` in page-locked host memory (plain host memory where libtorch cannot pin).
fn pinned_zeros(n: i64, kind: Kind) -> Result<Tensor> {
    let bytes = n * kind.elt_size_in_bytes() as i64;
    let mut t = match crate::shim::empty_pinned_bytes(bytes) {
        Some(b) => b.f_view_dtype(kind).map_err(torch("FSDP offload"))?,
        None => Tensor::f_empty([n], (kind, tch::Device::Cpu)).map_err(torch("FSDP offload"))?,
    };
    t.f_zero_().map_err(torch("FSDP offload"))
}

/// A model's units, and what a forward and its backward have done to them.
pub(crate) struct ShardedModel {
    pub units: Vec<Unit>,
    /// The ranks the units are sharded over (and, hybrid, replicated across): this rank's position
    /// among them and their number say which piece of each unit is this rank's.
    mesh: Mesh,
    /// FULL_SHARD: free a block's unsharded parameters after its forward and gather them again for its
    /// backward. SHARD_GRAD_OP: keep them from the forward through the backward.
    pub reshard_after_forward: bool,
    /// Block units run checkpointed: their activations recomputed in the backward.
    pub activation_checkpointing: bool,
    /// Other names of tied parameters (alias, the name a unit holds it under).
    pub aliases: Vec<(String, String)>,
    /// The mixed-precision policy's param_dtype, when the units are gathered in it: each block then
    /// runs as FSDP2 runs a unit under Accelerate's policy (inputs cast to it, no autocast, outputs in
    /// it).
    pub cast_forward: Option<Kind>,
    /// Block units in the order their blocks ran in the current (or last) forward.
    order: Vec<usize>,
    /// The order of the forward before, which says which block to prefetch next.
    last_order: Vec<usize>,
    /// On GPUs: the stream the all-gathers and reduce-scatters run on, beside the compute stream, so
    /// the next block's parameters arrive while the current block computes. `None` on the CPU, where
    /// every collective runs in line.
    comm: Option<Arc<SharedComm>>,
    /// Reduce-scatters the compute stream has not waited for yet: each one's event, inputs (alive until
    /// then) and unit.
    pending: Vec<(Mark, Vec<Tensor>, usize)>,
    /// From `begin_backward` to the end of `finish_backward` / `abandon_backward`: whether that backward
    /// synchronises.
    backward: Option<bool>,
    /// Per unit, during a backward: the reduce-scattered gradient chunk (sync) or `Some(None)` once its
    /// gradients were taken (held for accumulation); `None` while still to do.
    taken: Vec<Option<Option<Tensor>>>,
    /// Per unit: the stash taken with its reduce-scatter, added to the result at the end.
    taken_stash: Vec<Option<(Tensor, Vec<bool>)>>,
    /// Per unit: hooks on its block's outputs whose backward has not started (a block run twice, or a
    /// model run twice before one backward): its gradients are complete only when this is 0.
    outstanding: Vec<usize>,
    /// A failure inside a block's forward or backward hook, where it cannot be returned; the prepared
    /// model's forward and `Accelerator::backward` report it.
    pub hook_error: Option<Error>,
}

/// The one communication stream of this process's sharded models: NCCL runs the operations of one
/// communicator in the order they were queued only within a stream, so every FSDP collective goes to the
/// same one (a process drives one GPU).
pub(crate) struct SharedComm(CommStream);

// SAFETY: a CUDA stream and its events are plain handles, usable from any thread; the one mutable use
// (recording the ready event) happens under the process group's lock, inside the collective's call.
unsafe impl Sync for SharedComm {}

impl std::ops::Deref for SharedComm {
    type Target = CommStream;
    fn deref(&self) -> &CommStream {
        &self.0
    }
}

/// The process's communication stream, made on first use. A rank that cannot make it fails rather than
/// running its collectives in line: the other ranks queue one collective per parameter where the in-line
/// path issues one per unit, so the two would not pair up.
fn shared_comm() -> Result<Arc<SharedComm>> {
    static COMM: std::sync::OnceLock<std::result::Result<Arc<SharedComm>, String>> =
        std::sync::OnceLock::new();
    COMM.get_or_init(|| {
        CommStream::new(1)
            .map(|c| Arc::new(SharedComm(c)))
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|e| Error::DeviceUnavailable {
        detail: format!("FSDP could not make its communication stream: {e}"),
    })
}

fn torch(op: &'static str) -> impl Fn(tch::TchError) -> Error {
    move |e| Error::torch(op, e)
}

fn resize(t: &Tensor, nbytes: i64, unit: &str) -> Result<()> {
    // SAFETY: only a unit's `full` buffer is resized; while it has no bytes every parameter of the unit
    // points at its shard piece instead, and the views autograd saved are read only in the unit's
    // backward, which gathers first.
    if unsafe { crate::shim::storage_resize(t, nbytes) } != 0 {
        return Err(Error::DeviceUnavailable {
            detail: format!(
                "FSDP unit {unit:?}: libtorch could not {} its unsharded buffer ({nbytes} bytes)",
                if nbytes == 0 { "free" } else { "allocate" }
            ),
        });
    }
    Ok(())
}

impl ShardedModel {
    /// Shards `units` (each a list of named parameters, equal on every rank) across the mesh's shard ranks:
    /// from here on every parameter holds only its piece. `made` lists the parameters in the order
    /// they were made: placeholders (built under `init_empty_weights`) are materialised in it, each
    /// whole for a moment and one at a time, from rank 0's generator states, so every rank keeps its
    /// piece of the values an eager build on rank 0 would have had.
    pub(crate) fn new(
        units: Vec<(String, super::Named)>,
        made: &[String],
        mesh: Mesh,
        reshard_after_forward: bool,
        block_paths: &std::collections::BTreeSet<String>,
        param_kind: Option<Kind>,
        offload: bool,
    ) -> Result<Self> {
        let (rank, world) = (mesh.rank(), mesh.size());
        let position: std::collections::HashMap<&str, usize> = made
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut placeholders = Vec::new();
        let mut out = Vec::with_capacity(units.len());
        for (name, named) in units {
            if named.is_empty() {
                continue;
            }
            let kind = named[0].1.kind();
            if let Some((other, t)) = named.iter().find(|(_, t)| t.kind() != kind) {
                return Err(Error::InvalidValue {
                    name: "FSDP unit".into(),
                    detail: format!(
                        "unit {name:?} mixes dtypes: {other} is {:?}, {} is {kind:?}; FSDP flattens a \
                         unit into one buffer, so its parameters need one dtype",
                        t.kind(),
                        named[0].0
                    ),
                });
            }
            let device = named[0].1.device();
            let shapes: Vec<Vec<i64>> = named.iter().map(|(_, t)| t.size()).collect();
            let numels: Vec<i64> = shapes.iter().map(|s| s.iter().product()).collect();
            let quotas: Vec<i64> = shapes.iter().map(|s| quota(s, world)).collect();
            let (mut starts, mut offsets) = (Vec::new(), Vec::new());
            let mut chunk = 0;
            for q in &quotas {
                starts.push(chunk);
                offsets.push(chunk * world);
                chunk += q;
            }
            // The mixed-precision policy's param_dtype: fp32 units are gathered (and their gradients
            // reduced) in it; the shards, which the optimizer updates, stay fp32.
            let gathered_kind = match (kind, param_kind) {
                (Kind::Float, Some(k)) => k,
                _ => kind,
            };
            let full = Tensor::f_empty([chunk * world], (gathered_kind, device))
                .map_err(torch("FSDP sharding"))?;
            // Only this rank's chunk is ever made: each parameter's piece is copied into it (the
            // padding stays zero). Offloaded, it lives in the host's page-locked memory, so copies to
            // the GPU run asynchronously.
            let shard = if offload && device.is_cuda() {
                pinned_zeros(chunk, kind)?
            } else {
                Tensor::f_zeros([chunk], (kind, device)).map_err(torch("FSDP sharding"))?
            };
            let (names, params): (Vec<String>, Vec<Tensor>) = named.into_iter().unzip();
            let count = shapes.len();
            let block = block_paths.contains(&name);
            let unit = Unit {
                name,
                params,
                names,
                shapes,
                numels,
                quota: quotas,
                starts,
                offsets,
                chunk,
                shard,
                full,
                held_grads: None,
                stash: None,
                used: vec![false; count],
                gathered: false,
                block,
                in_flight: None,
            };
            for (i, (pname, t)) in unit.names.iter().zip(&unit.params).enumerate() {
                if let Some(recipe) = crate::layers::recipe_of(t) {
                    let made_at = position.get(pname.as_str()).copied().unwrap_or(usize::MAX);
                    placeholders.push((made_at, out.len(), i, recipe, t.data_ptr() as usize));
                    continue;
                }
                tch::no_grad(|| unit.fill_piece(i, rank, &t.detach()))
                    .map_err(torch("FSDP sharding"))?;
            }
            // Each unit goes to its pieces at once, so sharding never holds a second copy of the model.
            crate::optim::clear_grads(&unit.params);
            unit.point_at_pieces(rank)?;
            resize(&unit.full, 0, &unit.name)?;
            out.push(unit);
        }
        placeholders.sort_by_key(|p| p.0);
        let pieces: Vec<Pending> = placeholders
            .into_iter()
            .map(|(_, k, i, recipe, addr)| Pending {
                unit: k,
                param: i,
                recipe,
                addr,
            })
            .collect();
        materialize_pieces(&out, &pieces, mesh.group(), rank)?;
        let n = out.len();
        Ok(ShardedModel {
            units: out,
            mesh,
            reshard_after_forward,
            activation_checkpointing: false,
            aliases: Vec::new(),
            cast_forward: param_kind,
            order: Vec::new(),
            last_order: Vec::new(),
            comm: None,
            pending: Vec::new(),
            backward: None,
            taken: (0..n).map(|_| None).collect(),
            taken_stash: (0..n).map(|_| None).collect(),
            outstanding: vec![0; n],
            hook_error: None,
        })
    }

    /// Activation checkpointing recomputes block units; a block unit inside another would run its
    /// recomputation without its gather (refused), and a model with no block unit recomputes nothing
    /// (a warning).
    pub(crate) fn check_activation_checkpointing(&self) -> Result<()> {
        let blocks: Vec<&str> = self
            .units
            .iter()
            .filter(|u| u.block)
            .map(|u| u.name.as_str())
            .collect();
        if blocks.is_empty() {
            crate::log::event!(
                warn,
                target: "hasten::fsdp",
                "hasten: warning: FSDP activation checkpointing recomputes the units that are \
                 hasten::layers::Block s; this model has none (wrap policy {}), so nothing is recomputed",
                "TRANSFORMER_BASED_WRAP with FSDP_TRANSFORMER_CLS_TO_WRAP=Block makes them"
            );
        }
        for inner in &blocks {
            if let Some(outer) = blocks.iter().find(|o| super::is_below(inner, o)) {
                return Err(Error::InvalidValue {
                    name: "activation_checkpointing (FSDP_ACTIVATION_CHECKPOINTING)".into(),
                    detail: format!(
                        "block {inner} lies inside block {outer}: checkpointing needs blocks that do \
                         not nest (wrap only the outer ones)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// A parameter of unit `k` (what ties a checkpointed block into the autograd graph).
    pub(crate) fn anchor(&self, k: usize) -> Option<Tensor> {
        self.units[k].params.first().map(Tensor::shallow_clone)
    }

    /// Under a mixed-precision policy (see `cast_forward`), the dtype unit `k`'s block runs in (its
    /// gathered parameters', the policy's unless the model was built in another reduced precision) and
    /// its device.
    pub(crate) fn forward_policy(&self, k: usize) -> Option<(Kind, tch::Device)> {
        let full = &self.units.get(k)?.full;
        self.cast_forward.map(|_| (full.kind(), full.device()))
    }

    /// The unit a block at `path` gathers, if that path is one.
    pub(crate) fn block_unit(&self, path: &str) -> Option<usize> {
        self.units.iter().position(|u| u.block && u.name == path)
    }

    /// The communication stream, on a GPU (the process's one, made on first use).
    fn ensure_comm(&mut self) -> Result<()> {
        if self.comm.is_none()
            && self
                .units
                .first()
                .is_some_and(|u| u.full.device().is_cuda())
        {
            self.comm = Some(shared_comm()?);
        }
        Ok(())
    }

    /// Gathers unit `k` and makes the compute stream wait for it.
    fn gather(&mut self, k: usize) -> Result<()> {
        self.issue_gather(k)?;
        self.await_gather(k)
    }

    /// Starts gathering unit `k`'s chunks into its unsharded buffer (collective) and points its
    /// parameters at their views of it. On a GPU the all-gather is queued on the communication stream
    /// and the compute stream waits for it only in [`await_gather`](Self::await_gather), so a prefetch
    /// overlaps the compute queued before. Sharded gradients still on the parameters (not zeroed after a
    /// step) are kept aside and added to the next reduce-scatter's result, as PyTorch accumulates into
    /// `.grad`.
    fn issue_gather(&mut self, k: usize) -> Result<()> {
        let (rank, world) = (self.mesh.rank(), self.mesh.size());
        if self.units[k].gathered {
            return Ok(());
        }
        self.ensure_comm()?;
        let unit = &mut self.units[k];
        let grads: Vec<Tensor> = unit.params.iter().map(Tensor::grad).collect();
        if grads.iter().any(Tensor::defined) {
            let held = tch::no_grad(|| unit_shard_grads(unit, &grads, rank))?;
            let had: Vec<bool> = grads.iter().map(Tensor::defined).collect();
            unit.stash = Some(match unit.stash.take() {
                Some((h, was)) => (
                    h.f_add(&held).map_err(torch("FSDP all-gather"))?,
                    was.iter().zip(&had).map(|(a, b)| *a || *b).collect(),
                ),
                None => (held, had),
            });
            crate::optim::clear_grads(&unit.params);
        }
        resize(&unit.full, unit.bytes(world), &unit.name)?;
        // In place, as FSDP2 does it: each piece is copied (cast to the gathered dtype) into this rank's
        // slot of its parameter's region, NCCL's send buffer. Separate inputs would be one more
        // chunk-sized allocation per gather in flight, alive beside the prefetched block.
        let pairs = tch::no_grad(
            || -> std::result::Result<Vec<(Tensor, Tensor)>, tch::TchError> {
                let shard = if unit.shard.device() == unit.full.device() {
                    unit.shard.shallow_clone()
                } else {
                    // Offloaded: an asynchronous copy from page-locked memory, then the cast on the GPU
                    // (a blocking copy would wait for the GPU at every gather).
                    unit.shard
                        .f_to_device_(unit.full.device(), unit.shard.kind(), true, false)?
                };
                let mut pairs = Vec::with_capacity(unit.params.len());
                for i in 0..unit.params.len() {
                    let q = unit.quota[i];
                    if q == 0 {
                        continue;
                    }
                    let region = unit.full.f_narrow(0, unit.offsets[i], q * world)?;
                    let slot = region.f_narrow(0, rank * q, q)?;
                    slot.shallow_clone()
                        .f_copy_(&shard.f_narrow(0, unit.starts[i], q)?)?;
                    pairs.push((slot, region));
                }
                Ok(pairs)
            },
        )
        .map_err(torch("FSDP all-gather"))?;
        let queued = match &self.comm {
            Some(comm) => {
                let queued = self
                    .mesh
                    .all_gather_into_on_stream(&pairs, comm)
                    .map_err(|e| chained("FSDP all-gather", e))?;
                if queued {
                    let mark = Mark::new()?;
                    mark.record(comm.raw())?;
                    unit.in_flight = Some(mark);
                }
                queued
            }
            None => false,
        };
        if !queued {
            // One all-gather of this rank's pieces (its slots, one after another), each rank's
            // then copied into the regions.
            let slots: Vec<&Tensor> = pairs.iter().map(|(slot, _)| slot).collect();
            let mine = if slots.is_empty() {
                Tensor::f_empty([0], (unit.full.kind(), unit.full.device()))
            } else {
                Tensor::f_cat(&slots, 0)
            }
            .map_err(torch("FSDP all-gather"))?;
            let gathered = self
                .mesh
                .all_gather_cat(&mine)
                .map_err(|e| chained("FSDP all-gather", e))?;
            let by_rank = gathered
                .f_view([world, unit.chunk])
                .map_err(torch("FSDP all-gather"))?;
            tch::no_grad(|| -> std::result::Result<(), tch::TchError> {
                for (i, (_, region)) in (0..unit.params.len())
                    .filter(|&i| unit.quota[i] > 0)
                    .zip(&pairs)
                {
                    let q = unit.quota[i];
                    region.f_view([world, q])?.f_copy_(&by_rank.f_narrow(
                        1,
                        unit.starts[i],
                        q,
                    )?)?;
                }
                Ok(())
            })
            .map_err(torch("FSDP all-gather"))?;
        }
        for (i, p) in unit.params.iter().enumerate() {
            let view = unit
                .full
                .f_narrow(0, unit.offsets[i], unit.numels[i])
                .and_then(|v| v.f_view(unit.shapes[i].as_slice()))
                .map_err(torch("FSDP all-gather"))?;
            p.shallow_clone()
                .f_set_data(&view)
                .map_err(torch("FSDP all-gather"))?;
        }
        unit.gathered = true;
        Ok(())
    }

    /// Makes the compute stream wait for unit `k`'s queued all-gather, if any (not the host).
    fn await_gather(&mut self, k: usize) -> Result<()> {
        if let Some(mark) = self.units[k].in_flight.take() {
            mark.wait_on_compute()?;
        }
        Ok(())
    }

    /// Points unit `k`'s parameters at their pieces of this rank's chunk and frees its unsharded buffer.
    fn free(&mut self, k: usize) -> Result<()> {
        // A prefetched gather must land before its buffer goes back to the allocator.
        self.await_gather(k)?;
        let rank = self.mesh.rank();
        let in_backward = self.backward.is_some();
        let unit = &mut self.units[k];
        if !unit.gathered {
            return Ok(());
        }
        unit.point_at_pieces(rank)?;
        resize(&unit.full, 0, &unit.name)?;
        unit.gathered = false;
        // Gradients set aside at the gather and not reduced since go back where they were (outside a
        // backward; inside one they wait for its reduction).
        if in_backward {
            return Ok(());
        }
        if let Some((stash, had)) = unit.stash.take() {
            for (i, p) in unit.params.iter().enumerate() {
                if had[i] {
                    let (lo, len) = unit.piece(i, rank);
                    crate::optim::set_grad(p, &stash.narrow(0, lo, len))?;
                }
            }
        }
        Ok(())
    }

    /// Drops the gradients set aside at gathers (the optimizer's `zero_grad`).
    pub(crate) fn forget_stashed_gradients(&mut self) {
        for unit in &mut self.units {
            unit.stash = None;
        }
    }

    /// A hook was put on an output of block `k`: its backward is pending.
    pub(crate) fn hook_registered(&mut self, k: usize) {
        self.outstanding[k] += 1;
    }

    /// After a forward: gathers still queued (a prefetched block the forward did not run) are waited
    /// for; an evaluation forward (no output needing gradients) leaves every unit as it found it.
    pub(crate) fn end_forward(&mut self, trains: bool) -> Result<()> {
        for k in 0..self.units.len() {
            self.await_gather(k)?;
        }
        if !trains && self.backward.is_none() {
            self.reshard()?;
        }
        Ok(())
    }

    /// Makes the compute stream wait for everything queued on the communication stream, and releases
    /// the reduce-scatter inputs.
    fn join(&mut self) -> Result<()> {
        if let Some(comm) = &self.comm {
            comm.join_compute()?;
        }
        self.pending.clear();
        Ok(())
    }

    /// Every unit back to its pieces.
    pub(crate) fn reshard(&mut self) -> Result<()> {
        for k in 0..self.units.len() {
            self.free(k)?;
        }
        Ok(())
    }

    /// Before the model's forward: the units no block gathers are gathered for the whole forward.
    pub(crate) fn begin_forward(&mut self) -> Result<()> {
        if !self.order.is_empty() {
            self.last_order = std::mem::take(&mut self.order);
        }
        for k in 0..self.units.len() {
            if !self.units[k].block {
                self.gather(k)?;
            }
        }
        Ok(())
    }

    /// A block is about to run: its unit is gathered.
    pub(crate) fn before_block_forward(&mut self, k: usize) -> Result<()> {
        if !self.order.contains(&k) {
            self.order.push(k);
        }
        self.gather(k)?;
        // Prefetch: the block that ran after this one last time starts gathering while this one
        // computes.
        let next = self
            .last_order
            .iter()
            .position(|&u| u == k)
            .and_then(|pos| self.last_order.get(pos + 1).copied());
        if let Some(next) = next {
            self.issue_gather(next)?;
        }
        Ok(())
    }

    /// A block has run: under FULL_SHARD its unit is freed until its backward — unless it was the last
    /// block of the forward before, whose backward comes first: freeing it would only gather it again
    /// at once, with nothing to hide that gather under.
    pub(crate) fn after_block_forward(&mut self, k: usize) -> Result<()> {
        let backward_next = self.last_order.last() == Some(&k);
        if self.reshard_after_forward && !backward_next {
            self.free(k)?;
        }
        Ok(())
    }

    /// The sum over every rank's gradient pieces of `|g|^norm_type` (or their maximum for an infinite
    /// norm), all-reduced: the total gradient norm PyTorch's FSDP2 clip_grad_norm_ computes over
    /// sharded gradients.
    pub(crate) fn total_grad_norm(&self, norm_type: f64) -> Result<f64> {
        let t = torch("clip_grad_norm_");
        let (device, comm_device) = self
            .units
            .first()
            .map_or((tch::Device::Cpu, tch::Device::Cpu), |u| {
                (u.shard.device(), u.full.device())
            });
        let mut local = Tensor::f_zeros([], (Kind::Double, device)).map_err(&t)?;
        for unit in &self.units {
            for p in &unit.params {
                let g = p.grad();
                if !g.defined() || g.numel() == 0 {
                    continue;
                }
                let g = g.f_to_kind(Kind::Double).map_err(&t)?;
                let part = if norm_type.is_infinite() {
                    g.f_abs().and_then(|a| a.f_max()).map_err(&t)?
                } else {
                    g.f_abs()
                        .and_then(|a| a.f_pow_tensor_scalar(norm_type))
                        .and_then(|a| a.f_sum(Kind::Double))
                        .map_err(&t)?
                };
                local = if norm_type.is_infinite() {
                    local.f_maximum(&part).map_err(&t)?
                } else {
                    local.f_add(&part).map_err(&t)?
                };
            }
        }
        let op = if norm_type.is_infinite() {
            ReduceOp::Max
        } else {
            ReduceOp::Sum
        };
        // Offloaded gradients are summed on the host; the all-reduce runs where the group does.
        let mut local = local.f_to_device(comm_device).map_err(&t)?;
        // Among the shard's ranks: replicas hold the same gradients.
        self.mesh
            .all_reduce_shards(&mut local, op)
            .map_err(|e| chained("clip_grad_norm_", e))?;
        let total = local.double_value(&[]);
        Ok(if norm_type.is_infinite() {
            total
        } else {
            total.powf(1.0 / norm_type)
        })
    }

    /// Offloaded chunks are read by the GPU's asynchronous copies that gathers queue: the host waits
    /// for them before it writes the chunks (the optimizer's step, a load).
    pub(crate) fn wait_before_host_writes(&self) {
        if let Some(unit) = self.units.first()
            && unit.shard.device() == tch::Device::Cpu
            && let tch::Device::Cuda(i) = unit.full.device()
        {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// The parameters of every unit (the tensors the user's module holds).
    pub(crate) fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.units.iter().flat_map(|u| u.params.iter())
    }
}

/// The sharded gradients on a unit's parameters, laid out as the unit's chunk (zeros where a parameter
/// has none).
fn unit_shard_grads(unit: &Unit, grads: &[Tensor], rank: i64) -> Result<Tensor> {
    let out = Tensor::f_zeros([unit.chunk], (unit.shard.kind(), unit.shard.device()))
        .map_err(torch("FSDP unshard"))?;
    for (i, g) in grads.iter().enumerate() {
        let (lo, len) = unit.piece(i, rank);
        if g.defined() && len > 0 {
            out.narrow(0, lo, len)
                .f_copy_(&g.reshape([-1]))
                .map_err(torch("FSDP unshard"))?;
        }
    }
    Ok(out)
}

fn chained(op: &'static str, e: Error) -> Error {
    Error::ChainedOperation {
        op,
        source: Box::new(e),
    }
}
