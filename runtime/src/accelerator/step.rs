//! The step logic: backward with gradient averaging, accumulation, `no_sync`, unscaling and clipping,
//! and letting go of prepared models (`free_memory`).

use super::ddp::{self, ModelEntry};
use super::{Accelerator, PreparedModel};
use crate::{Error, Result};
use std::sync::{Arc, Mutex};
use tch::Tensor;

impl Accelerator {
    /// Backpropagates `loss`: divided by the accumulation steps, scaled under fp16, and followed, on
    /// synchronising steps, by averaging every prepared model's gradients across ranks.
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let state = self.gradient.get();
        let torch = |e| Error::torch("backward", e);
        let mut loss = loss.shallow_clone();
        if state.num_steps > 1 {
            loss = loss.f_div_scalar(state.num_steps as f64).map_err(torch)?;
        }
        if let Some(scaler) = &self.scaler {
            loss = scaler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .scale_loss(&loss)?;
        }
        let sync = state.sync_gradients || (state.sync_each_batch && self.state.use_distributed());
        self.averaged.retain(|m| m.alive.strong_count() > 0);
        // Sharded models gather their parameters for the backward (FULL_SHARD freed them after the
        // forward) and reduce-scatter the gradients after it.
        let sharded: Vec<Arc<Mutex<ModelEntry>>> = self
            .averaged
            .iter()
            .filter(|m| {
                m.entry
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .fsdp
                    .is_some()
            })
            .map(|m| m.entry.clone())
            .collect();
        for entry in &sharded {
            let mut entry = entry.lock().unwrap_or_else(|e| e.into_inner());
            let model_sync = sync && !entry.no_sync;
            if let Some(s) = entry.fsdp.as_mut() {
                s.begin_backward(model_sync)?;
            }
        }
        let outcome = if sync {
            let mut guards: Vec<std::sync::MutexGuard<'_, ModelEntry>> = self
                .averaged
                .iter()
                .map(|m| m.entry.lock().unwrap_or_else(|e| e.into_inner()))
                .filter(|m| !m.no_sync && m.fsdp.is_none())
                .collect();
            let mut entries: Vec<&mut ModelEntry> = guards.iter_mut().map(|g| &mut **g).collect();
            if entries.is_empty() {
                // Sharded models communicate from their hooks during the backward, on libtorch's
                // autograd threads: the group must not stay locked here meanwhile.
                loss.f_backward().map_err(torch)
            } else {
                ddp::backward_with_averaging(
                    &mut self.group.lock(),
                    &mut entries,
                    self.ddp.find_unused_parameters,
                    self.overlap,
                    || loss.f_backward().map_err(torch),
                )
            }
        } else {
            loss.f_backward().map_err(torch)
        };
        for entry in &sharded {
            let mut entry = entry.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = entry.fsdp.as_mut() {
                match &outcome {
                    // A hook's failure explains a failed backward better than libtorch's message.
                    Ok(()) => s.finish_backward()?,
                    Err(_) => {
                        let hook = s.abandon_backward()?;
                        if let Some(e) = hook {
                            return Err(e);
                        }
                    }
                }
            }
        }
        outcome
    }

    /// Accelerate's `accumulate`, called at the start of each micro-batch: counts it and decides whether
    /// it synchronises (every `gradient_accumulation_steps`, and at the end of the data loader), which
    /// it returns (also [`sync_gradients`](Self::sync_gradients)). Gradients are averaged, and the
    /// prepared optimizers and schedulers step, only on synchronising micro-batches.
    pub fn accumulate(&mut self) -> bool {
        let mut g = self.gradient.lock();
        if g.sync_with_dataloader && g.at_end_of_dataloader() {
            self.step = 0;
            g.sync_gradients = true;
        } else {
            self.step += 1;
            g.sync_gradients = self.step % g.num_steps.max(1) == 0;
        }
        g.sync_gradients
    }

    /// Runs `body` without averaging `model`'s gradients in its backward passes (DDP's `no_sync`). The
    /// model synchronises as before once `body` returns or panics (a notebook cell that panicked
    /// leaves the model as it was).
    pub fn no_sync<M, R>(
        &mut self,
        model: &PreparedModel<M>,
        body: impl FnOnce(&mut Self) -> R,
    ) -> R {
        /// Puts the previous flag back when dropped, on return and on unwinding alike.
        struct Restore<'a>(&'a Mutex<ModelEntry>, bool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).no_sync = self.1;
            }
        }
        let previous = std::mem::replace(&mut model.entry().no_sync, true);
        let _restore = Restore(&model.entry, previous);
        body(self)
    }

    /// An error unless this Accelerator prepared `model` (and the user still holds it).
    fn check_prepared<M>(&self, op: &'static str, model: &PreparedModel<M>) -> Result<()> {
        if self
            .averaged
            .iter()
            .any(|m| Arc::ptr_eq(&m.entry, &model.entry))
        {
            return Ok(());
        }
        Err(Error::UnknownModel {
            op,
            variables: model.entry().named.len(),
        })
    }

    /// Divides fp16 gradients by the loss scale now (before clipping or inspecting them).
    pub fn unscale_gradients<M>(&mut self, model: &PreparedModel<M>) -> Result<()> {
        self.check_prepared("unscale_gradients", model)?;
        if let Some(scaler) = &self.scaler {
            let params: Vec<Tensor> = model
                .entry()
                .params
                .iter()
                .map(Tensor::shallow_clone)
                .collect();
            scaler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unscale(&params)?;
        }
        Ok(())
    }

    /// Clips the gradients' total `norm_type` norm to `max_norm` (unscaling first) and returns the total
    /// norm before clipping, as `torch.nn.utils.clip_grad_norm_`.
    pub fn clip_grad_norm_<M>(
        &mut self,
        model: &PreparedModel<M>,
        max_norm: f64,
        norm_type: f64,
    ) -> Result<f64> {
        self.unscale_gradients(model)?;
        let torch = |e| Error::torch("clip_grad_norm_", e);
        if let Some(sharded) = model.entry().fsdp.as_ref() {
            // Every rank holds a piece of each gradient: the norm is over all of them (collective).
            let total_norm = sharded.total_grad_norm(norm_type)?;
            let coef = max_norm / (total_norm + 1e-6);
            if coef < 1.0 {
                tch::no_grad(|| -> Result<()> {
                    for p in sharded.parameters() {
                        let g = p.grad();
                        if g.defined() {
                            g.shallow_clone()
                                .f_mul_scalar_(coef)
                                .map(drop)
                                .map_err(torch)?;
                        }
                    }
                    Ok(())
                })?;
            }
            return Ok(total_norm);
        }
        let grads: Vec<Tensor> = model
            .entry()
            .params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        tch::no_grad(|| {
            let norms: Vec<Tensor> = grads
                .iter()
                .map(|g| {
                    g.f_reshape([-1])
                        .and_then(|flat| {
                            flat.f_norm_scalaropt_dim(norm_type, [0i64].as_slice(), false)
                        })
                        .and_then(|n| n.f_to_kind(tch::Kind::Float))
                })
                .map(|r| r.map_err(torch))
                .collect::<Result<_>>()?;
            let total = if norm_type.is_infinite() {
                Tensor::f_stack(&norms, 0)
                    .and_then(|s| s.f_max())
                    .map_err(torch)?
            } else {
                Tensor::f_stack(&norms, 0)
                    .and_then(|s| s.f_norm_scalaropt_dim(norm_type, [0i64].as_slice(), false))
                    .map_err(torch)?
            };
            let total_norm = total.double_value(&[]);
            let coef = max_norm / (total_norm + 1e-6);
            if coef < 1.0 {
                for g in &grads {
                    g.shallow_clone()
                        .f_mul_scalar_(coef)
                        .map(drop)
                        .map_err(torch)?;
                }
            }
            Ok(total_norm)
        })
    }

    /// Clamps every gradient element to `[-clip_value, clip_value]` (unscaling first).
    pub fn clip_grad_value_<M>(&mut self, model: &PreparedModel<M>, clip_value: f64) -> Result<()> {
        if model.entry().fsdp.is_some() {
            return Err(Error::InvalidValue {
                name: "clip_grad_value_".into(),
                detail:
                    "DeepSpeed and FSDP  do not support `clip_grad_value_`. Use `clip_grad_norm_` \
                         instead."
                        .into(),
            });
        }
        self.unscale_gradients(model)?;
        tch::no_grad(|| {
            for p in &model.entry().params {
                let g = p.grad();
                if g.defined() {
                    g.shallow_clone()
                        .f_clamp_(-clip_value, clip_value)
                        .map(drop)
                        .map_err(|e| Error::torch("clip_grad_value_", e))?;
                }
            }
            Ok(())
        })
    }

    /// The model's whole state by name (Accelerate's `get_state_dict`): under FSDP every parameter
    /// gathered from its shards (collective: every rank calls it) as copies on the CPU, which — as
    /// Accelerate's FSDP2 does — only the main process keeps (the others get an empty list and hold no
    /// copy of the model); otherwise the VarStore's tensors, as [`PreparedModel::state_dict`].
    pub fn get_state_dict<M>(&self, model: &PreparedModel<M>) -> Result<Vec<(String, Tensor)>> {
        state_dict_kept(model, self.is_main_process())
    }

    /// [`get_state_dict`](Self::get_state_dict) on every process (hasten's): under FSDP each rank gets
    /// the whole model, gathered (collective) — a host copy per process, for checks or evaluation that
    /// need it everywhere.
    pub fn gather_state_dict<M>(&self, model: &PreparedModel<M>) -> Result<Vec<(String, Tensor)>> {
        state_dict_kept(model, true)
    }

    /// Loads a checkpoint (a safetensors file, a sharded index or a folder, e.g. what
    /// [`save_model`](Self::save_model) wrote) into a prepared model, as `load_checkpoint_in_model` does
    /// into its variables. Under FSDP each rank reads only its slice of every parameter, so a model
    /// built under [`crate::layers::init_empty_weights`] and prepared is loaded without any process
    /// holding all of it. Tensors the model lacks, and variables the checkpoint lacks, are reported;
    /// a shape that differs is an error naming the tensor and the file, before anything changes.
    pub fn load_checkpoint_in_model<M>(
        &self,
        model: &PreparedModel<M>,
        checkpoint: &std::path::Path,
    ) -> Result<crate::big_modeling::LoadReport> {
        let mut entry = model.entry();
        let ModelEntry { named, fsdp, .. } = &mut *entry;
        match fsdp.as_mut() {
            Some(sharded) => sharded.load_checkpoint(named, checkpoint),
            None => crate::big_modeling::load_checkpoint_in_model(
                model.var_store(),
                checkpoint,
                &crate::big_modeling::LoadOptions::default(),
            ),
        }
    }

    /// A prepared model's variables by name (Accelerate's `unwrap_model(model).state_dict()`): the same
    /// tensors the VarStore holds, free of any wrapper. See also [`PreparedModel::into_inner`].
    pub fn unwrap_model<M>(&self, model: &PreparedModel<M>) -> Vec<(String, Tensor)> {
        model.state_dict()
    }

    /// Accelerate's `free_memory`: forgets the prepared models, optimizers and schedulers (`save_state`
    /// no longer writes them) and resets the accumulation counter. As in PyTorch, where the user's
    /// DDP-wrapped module keeps averaging, a [`PreparedModel`] still held is still averaged in the
    /// backward; dropping it ends that.
    pub fn free_memory(&mut self) {
        self.models.clear();
        self.optimizers.clear();
        self.schedulers.clear();
        self.step = 0;
    }
}

/// [`Accelerator::get_state_dict`], kept by this rank only where `keep` (under FSDP every rank takes
/// part in the gathering; one that does not keep gets nothing and holds no copy).
pub(super) fn state_dict_kept<M>(
    model: &PreparedModel<M>,
    keep: bool,
) -> Result<Vec<(String, Tensor)>> {
    let mut entry = model.entry();
    let ModelEntry { named, fsdp, .. } = &mut *entry;
    match fsdp.as_mut() {
        Some(sharded) => sharded.full_state_dict_kept(named, keep),
        None => Ok(named
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()),
    }
}
