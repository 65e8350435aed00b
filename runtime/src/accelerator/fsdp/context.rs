//! Where FSDP meets the user's forward: during [`PreparedModel::call`](crate::PreparedModel::call) a
//! sharded model is the active block hooks of its thread (`layers::hooks`, the mechanism big-model
//! dispatch uses too), so each [`crate::layers::Block`] it runs gathers that block's parameters just
//! before it runs, frees them after it (FULL_SHARD), and hooks the block's output so that its backward
//! finds them gathered again.

use super::super::ddp::ModelEntry;
use crate::layers::hooks::{BlockHooks, Forward, Recompute};
use std::collections::BTreeSet;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tch::Tensor;

/// Every VarStore path a [`crate::layers::Block`] was built at: FSDP units with these names are gathered
/// by their block, not for the whole forward. (Paths, not models: a path wrapped in a block in one model
/// and used bare in another of the same process would be mistaken for a block there.)
static BLOCK_PATHS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub(crate) fn register_block(path: &str) {
    BLOCK_PATHS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.to_owned());
}

pub(crate) fn block_paths() -> BTreeSet<String> {
    BLOCK_PATHS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn lock(entry: &Mutex<ModelEntry>) -> MutexGuard<'_, ModelEntry> {
    entry.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `forward` with `entry` as the model whose blocks gather themselves.
pub(crate) fn with_active<R>(entry: &Arc<Mutex<ModelEntry>>, forward: impl FnOnce() -> R) -> R {
    crate::layers::hooks::with_hooks(&Sharded(entry.clone()), forward)
}

/// A prepared model's blocks during its forward.
struct Sharded(Arc<Mutex<ModelEntry>>);

impl BlockHooks for Sharded {
    fn run_block(
        &self,
        path: &str,
        xs: &Tensor,
        forward: Forward<'_>,
        recompute: Recompute<'_>,
    ) -> Tensor {
        run_block(&self.0, path, xs, forward, recompute)
    }
}

/// What a backward hook needs: the model (weakly: a graph may outlive it) and the block's unit.
struct HookCtx {
    entry: Weak<Mutex<ModelEntry>>,
}

extern "C" fn before_block_backward(ctx: *mut c_void, unit: i64) {
    // SAFETY: ctx is the Box<HookCtx> given at registration, alive until drop_ctx.
    let ctx = unsafe { &*(ctx as *const HookCtx) };
    let Some(entry) = ctx.entry.upgrade() else {
        return;
    };
    // A panic must not cross into libtorch's autograd thread; it is kept as the backward's error.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(sharded) = lock(&entry).fsdp.as_mut() {
            sharded.before_block_backward(unit as usize);
        }
    }));
    if let Err(panic) = outcome {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".into());
        if let Some(sharded) = lock(&entry).fsdp.as_mut() {
            sharded
                .hook_error
                .get_or_insert(crate::Error::InvalidValue {
                    name: format!("FSDP unit {unit}"),
                    detail: format!("gathering it for its backward panicked: {text}"),
                });
        }
    }
}

/// Every sharded model of the process, for the optimizer's `zero_grad` (which must also drop the
/// gradients a gather set aside).
static MODELS: Mutex<Vec<Weak<Mutex<ModelEntry>>>> = Mutex::new(Vec::new());

pub(crate) fn register_model(entry: &Arc<Mutex<ModelEntry>>) {
    let mut models = MODELS.lock().unwrap_or_else(|e| e.into_inner());
    models.retain(|m| m.strong_count() > 0);
    models.push(Arc::downgrade(entry));
}

/// Runs `f` on every sharded model of the process still alive (the registry's lock released first).
fn each_sharded_model(mut f: impl FnMut(&mut super::ShardedModel)) {
    let models: Vec<_> = MODELS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for entry in models {
        if let Some(sharded) = lock(&entry).fsdp.as_mut() {
            f(sharded);
        }
    }
}

/// Before a prepared optimizer's step: every unit is on its pieces, which the optimizer steps (a forward
/// with no backward after it leaves the root and the forward's last block gathered), and offloaded
/// models' chunks, which the step writes on the host, are no longer read by queued copies to the GPU
/// (an evaluation forward may have queued some).
pub(crate) fn before_optimizer_step() -> crate::Result<()> {
    let mut result = Ok(());
    each_sharded_model(|sharded| {
        if result.is_ok() {
            result = sharded.reshard();
            sharded.wait_before_host_writes();
        }
    });
    result
}

/// `zero_grad` of a prepared optimizer: the gradients the sharded models' gathers set aside go too.
pub(crate) fn forget_stashed_gradients() {
    each_sharded_model(super::ShardedModel::forget_stashed_gradients);
}

extern "C" fn drop_ctx(ctx: *mut c_void) {
    // SAFETY: ctx came from Box::into_raw in hook_output and is dropped once.
    drop(unsafe { Box::from_raw(ctx as *mut HookCtx) });
}

/// Runs one block's forward on `xs`. Inside a sharded model's forward, the block's unit (the unit named
/// by the block's path) is gathered first and, under FULL_SHARD, freed afterwards; its output carries the
/// hook that gathers it again for the backward. Under activation checkpointing the forward runs through
/// `recompute()` without keeping activations, and again in the backward. Elsewhere it just runs
/// `forward`. A failed gather panics with the error (a `Module::forward` cannot return one); the
/// prepared model's forward turns it back into that error.
fn run_block(
    entry: &Arc<Mutex<ModelEntry>>,
    path: &str,
    xs: &Tensor,
    forward: Forward<'_>,
    recompute: Recompute<'_>,
) -> Tensor {
    let (unit, anchor, policy) = match lock(entry).fsdp.as_mut() {
        Some(sharded) => match sharded.block_unit(path) {
            Some(unit) => {
                if let Err(e) = sharded.before_block_forward(unit) {
                    let text = e.to_string();
                    sharded.hook_error = Some(e);
                    panic!("{text}");
                }
                let anchor = sharded
                    .activation_checkpointing
                    .then(|| sharded.anchor(unit))
                    .flatten();
                (unit, anchor, sharded.forward_policy(unit))
            }
            None => return forward(xs),
        },
        None => return forward(xs),
    };
    // Under a mixed-precision policy a block runs as Accelerate's FSDP2 runs a unit: its floating-point
    // input cast to the policy's dtype (cast_forward_inputs), no autocast (Accelerate does not wrap an
    // FSDP2 model's forward in it), its output in that dtype (output_dtype). Autocast would run layer
    // norms in fp32 and keep fp32 copies of the residual stream for the backward.
    let cast = |t: &Tensor| match policy {
        Some((kind, _)) if t.is_floating_point() && t.kind() != kind => t.to_kind(kind),
        _ => t.shallow_clone(),
    };
    let xs = &cast(xs);
    let body = || match anchor {
        // SAFETY: the recompute function only reaches the block through its liveness check (see
        // Block::recompute), and runs while the thread that called the backward waits.
        Some(anchor) => match unsafe { crate::shim::checkpoint(xs, &anchor, recompute()) } {
            Ok(out) => out,
            Err(text) => {
                let e = crate::Error::InvalidValue {
                    name: format!("FSDP block {path}"),
                    detail: format!("activation checkpointing: {text}"),
                };
                let text = e.to_string();
                if let Some(sharded) = lock(entry).fsdp.as_mut() {
                    sharded.hook_error = Some(e);
                }
                panic!("{text}");
            }
        },
        None => forward(xs),
    };
    let out = match policy {
        Some((_, device)) => crate::accelerator::precision::without_autocast(device, body),
        None => body(),
    };
    let out = cast(&out);
    let mut guard = lock(entry);
    if let Some(sharded) = guard.fsdp.as_mut() {
        if let Err(e) = sharded.after_block_forward(unit) {
            let text = e.to_string();
            sharded.hook_error = Some(e);
            panic!("{text}");
        }
    }
    drop(guard);
    if out.requires_grad() {
        let ctx = Box::into_raw(Box::new(HookCtx {
            entry: Arc::downgrade(entry),
        }));
        // SAFETY: ctx stays valid until the shim calls drop_ctx (also on failure); the callback catches
        // panics.
        let r = unsafe {
            crate::shim::register_grad_pre_hook(
                &out,
                before_block_backward,
                drop_ctx,
                ctx.cast(),
                unit as i64,
            )
        };
        if r != 0 {
            // Without the hook the block's backward would find its parameters freed; registering fails
            // alike on every rank (it depends only on the graph), so stopping here is symmetric.
            let e = crate::Error::InvalidValue {
                name: format!("FSDP block {path}"),
                detail:
                    "libtorch refused the hook that gathers the block's parameters for its backward"
                        .into(),
            };
            let text = e.to_string();
            if let Some(sharded) = lock(entry).fsdp.as_mut() {
                sharded.hook_error = Some(e);
            }
            panic!("{text}");
        }
        if let Some(sharded) = lock(entry).fsdp.as_mut() {
            sharded.hook_registered(unit);
        }
    }
    out
}
