//! The prepared model: the user's module and the VarStore holding its variables, owned together, with
//! the forward Accelerate's `prepare(model)` gives (mixed precision inside, fp32 outputs).

use super::ddp::ModelEntry;
use super::precision::autocast;
use crate::{Nested, PrecisionType, Result};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::nn::{Module, ModuleT, VarStore};
use tch::{Device, Tensor};

/// How a prepared model runs its forward: the Accelerator's mixed precision when it was prepared.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForwardPrecision {
    pub device: Device,
    pub mixed_precision: PrecisionType,
    /// `AutocastKwargs::enabled`.
    pub enabled: bool,
}

/// A model prepared by [`crate::Accelerator::prepare_model`]: it owns the module and its VarStore (moved
/// to this process's device, rank 0's weights on every rank, gradients averaged in the backward), and its
/// forward runs as Accelerate's prepared model's does. The Accelerator shares only the bookkeeping of
/// gradient averaging with it, so the model stays valid after `free_memory` (as a plain model: its
/// gradients are no longer averaged).
///
/// ```no_run
/// use hasten::tch::nn;
/// use hasten::Accelerator;
/// use hasten::optim::AdamW;
///
/// let mut acc = Accelerator::new()?;
/// let vs = nn::VarStore::new(acc.device());
/// let net = nn::linear(vs.root() / "fc", 2, 4, Default::default());
/// let model = acc.prepare_model(net, vs)?;
/// let _opt = acc.prepare_optimizer(AdamW::new(model.var_store(), 3e-3));
/// let x = hasten::tch::Tensor::ones([8, 2], (hasten::tch::Kind::Float, acc.device()));
/// let logits = model.forward(&x)?; // autocast under mixed precision, fp32 out
/// # Ok::<(), hasten::Error>(())
/// ```
pub struct PreparedModel<M> {
    module: M,
    vs: VarStore,
    pub(crate) entry: Arc<Mutex<ModelEntry>>,
    /// The Accelerator holds a weak link to this: once the model is dropped, its backward stops
    /// averaging the model's gradients.
    _alive: Arc<()>,
    precision: ForwardPrecision,
}

impl<M> PreparedModel<M> {
    pub(crate) fn new(
        module: M,
        vs: VarStore,
        entry: Arc<Mutex<ModelEntry>>,
        alive: Arc<()>,
        precision: ForwardPrecision,
    ) -> Self {
        PreparedModel {
            module,
            vs,
            entry,
            _alive: alive,
            precision,
        }
    }

    /// Runs `f` over the module as Accelerate's prepared model runs its forward: under the Accelerator's
    /// mixed precision (fp16/bf16 autocast), with every fp16/bf16 tensor of the output converted to fp32
    /// (`convert_outputs_to_fp32`), so losses and metrics are computed in full precision. With
    /// `AutocastKwargs { enabled: false }` the forward runs without autocast and its outputs are still
    /// converted, as in Accelerate. For modules whose forward is not [`Module::forward`]:
    /// `model.call(|m| m.forward_with_mask(&x, &mask))?`.
    ///
    /// Under FSDP the forward first gathers the parameters (every rank must run it, as in PyTorch) and,
    /// with FULL_SHARD, frees them again afterwards; the backward gathers them once more.
    pub fn call<T: Nested>(&self, f: impl FnOnce(&M) -> T) -> Result<T> {
        // The entry's lock is not held while the forward runs: the module may reach the model again.
        let sharded = match self.entry().fsdp.as_mut() {
            None => false,
            Some(s) => {
                s.begin_forward()?;
                true
            }
        };
        if !sharded {
            return self.run(f);
        }
        // Blocks gather their parameters through the model found here; a failed gather inside one panics
        // (a Module's forward returns no error) and comes back here as that error.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::fsdp::with_active(&self.entry, || self.run(f))
        }));
        let out = match out {
            Ok(out) => out,
            Err(panic) => match self.entry().fsdp.as_mut().and_then(|s| s.hook_error.take()) {
                Some(e) => Err(e),
                None => std::panic::resume_unwind(panic),
            },
        }?;
        let trains = crate::tensors_of(&out).iter().any(|t| t.requires_grad());
        if let Some(s) = self.entry().fsdp.as_mut() {
            s.end_forward(trains)?;
        }
        Ok(out)
    }

    fn run<T: Nested>(&self, f: impl FnOnce(&M) -> T) -> Result<T> {
        let p = self.precision;
        if p.mixed_precision == PrecisionType::No {
            return Ok(f(&self.module));
        }
        let out = if p.enabled {
            autocast(p.device, p.mixed_precision, || f(&self.module))?
        } else {
            f(&self.module)
        };
        crate::convert_to_fp32(out)
    }

    /// The module's [`Module::forward`], run as [`call`](Self::call) runs it.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor>
    where
        M: Module,
    {
        self.call(|m| m.forward(xs))
    }

    /// The module's [`ModuleT::forward_t`] (training or evaluation mode), run as [`call`](Self::call)
    /// runs it.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor>
    where
        M: ModuleT,
    {
        self.call(|m| m.forward_t(xs, train))
    }

    /// The module itself (its plain forward: no autocast, outputs as computed).
    pub fn module(&self) -> &M {
        &self.module
    }

    /// The module, mutably.
    pub fn module_mut(&mut self) -> &mut M {
        &mut self.module
    }

    /// The VarStore holding the model's variables (on this process's device), e.g. to build an
    /// optimizer over them.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The trainable parameters, in the VarStore's order.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.vs.trainable_variables()
    }

    /// Every variable by name, sorted (Accelerate's `unwrap_model(model).state_dict()`): the tensors the
    /// VarStore holds, not copies.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.entry()
            .named
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// The module and its VarStore, unprepared (Accelerate's `unwrap_model`): the Accelerator no longer
    /// averages their gradients.
    pub fn into_inner(self) -> (M, VarStore) {
        (self.module, self.vs)
    }

    pub(crate) fn entry(&self) -> MutexGuard<'_, ModelEntry> {
        self.entry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<M> std::fmt::Debug for PreparedModel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedModel")
            .field("variables", &self.entry().named.len())
            .field("device", &self.vs.device())
            .field("precision", &self.precision)
            .finish()
    }
}
