//! Gradient averaging during the backward, as PyTorch's DDP reducer does it.
//!
//! Every trainable parameter of a prepared model carries a post-accumulate-grad hook (through hasten's
//! C++ shim; tch has none). While [`Accelerator::backward`](crate::Accelerator::backward) runs a
//! synchronising backward, the model's [`Round`] is armed: each hook copies its parameter's gradient into
//! the bucket's flat buffer (the gradient then stays a view of it), and as soon as a bucket is complete —
//! and every bucket before it launched, so all ranks issue the same collectives in the same order — its
//! all-reduce starts. On a GPU it goes to NCCL on a second stream and overlaps the rest of the backward;
//! on the CPU it runs in the hook. After the backward, [`Round::finish`] handles parameters whose hook did
//! not fire (unused parameters, gradients accumulated in earlier micro-steps), launches the remaining
//! buckets, and makes the compute stream wait for the last all-reduce.
//!
//! `HASTEN_DDP_OVERLAP=0` leaves the hooks unarmed, so everything happens after the backward (for
//! measuring what the overlap gains).

use super::ddp::ModelEntry;
use crate::distributed::CommStream;
use crate::{Error, ProcessGroup, ReduceOp, Result};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// What the hooks of one model share: the round in progress, if any.
#[derive(Default)]
pub(crate) struct Slot {
    round: Mutex<Option<Round>>,
    /// How many times a hook fired (armed or not).
    fired: std::sync::atomic::AtomicUsize,
}

extern "C" fn grad_ready(ctx: *mut c_void, index: i64) {
    // SAFETY: ctx is an Arc<Slot> pointer owned by this hook (released only through drop_slot).
    let slot = unsafe { &*(ctx as *const Slot) };
    slot.fired
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A panic must not unwind into libtorch's autograd engine; it becomes the round's error.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut guard = slot.round.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(round) = guard.as_mut() {
            round.mark_ready(index as usize);
        }
    }));
    if outcome.is_err() {
        let mut guard = slot.round.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(round) = guard.as_mut() {
            round.fail(Error::Collective {
                op: "gradient all-reduce",
                detail: "the gradient hook panicked".into(),
            });
        }
    }
}

extern "C" fn drop_slot(ctx: *mut c_void) {
    // SAFETY: balances the Arc::into_raw made when the hook was registered.
    drop(unsafe { Arc::from_raw(ctx as *const Slot) });
}

/// Gives every parameter of `entry` a gradient-ready hook reporting to `slot`. Returns false (and
/// registers none) if libtorch refuses one; the averaging then happens after the backward.
pub(crate) fn register_hooks(params: &[Tensor], slot: &Arc<Slot>) -> bool {
    for (i, p) in params.iter().enumerate() {
        let ctx = Arc::into_raw(slot.clone()) as *mut c_void;
        // SAFETY: ctx is an Arc<Slot> that the hook owns from now on and releases through drop_slot
        // (on failure the shim has dropped it already, or, on allocation failure, one Arc leaks);
        // grad_ready catches panics.
        let r =
            unsafe { crate::shim::set_grad_ready_hook(p, grad_ready, drop_slot, ctx, i as i64) };
        if r != 0 {
            clear_hooks(&params[..i]);
            return false;
        }
    }
    true
}

/// Removes the hooks of `params` (a model prepared again, or an Accelerator dropped).
pub(crate) fn clear_hooks(params: &[Tensor]) {
    for p in params {
        crate::shim::clear_grad_ready_hook(p);
    }
}

/// True unless `HASTEN_DDP_OVERLAP=0`.
pub(crate) fn overlap_from_env() -> bool {
    crate::parse_flag_from_env("HASTEN_DDP_OVERLAP", true).unwrap_or(true)
}

/// One synchronising backward of one model.
pub(crate) struct Round {
    /// The Accelerator's group. Only used while the thread that owns it is parked inside the backward
    /// (hooks) or by that thread itself afterwards ([`Round::finish`]).
    group: *mut ProcessGroup,
    params: Vec<Tensor>,
    views: Vec<Tensor>,
    flats: Vec<Tensor>,
    bucket_of: Vec<usize>,
    pending: Vec<usize>,
    ready: Vec<bool>,
    next: usize,
    comm: Option<*const CommStream>,
    error: Option<Error>,
}

// SAFETY: the raw pointers are only dereferenced under the slot's mutex while the owning thread waits
// in the backward (see `group`); tch tensors are Send.
unsafe impl Send for Round {}

impl Round {
    /// Arms `entry`'s hooks for one backward. `entry`'s flat buffers and views must exist.
    pub(crate) fn arm(group: &mut ProcessGroup, entry: &ModelEntry) -> Self {
        let mut bucket_of = vec![0; entry.params.len()];
        for (b, bucket) in entry.buckets.iter().enumerate() {
            for &i in bucket {
                bucket_of[i] = b;
            }
        }
        Round {
            group,
            params: entry.params.iter().map(Tensor::shallow_clone).collect(),
            views: entry.views.iter().map(Tensor::shallow_clone).collect(),
            flats: entry.flats.iter().map(Tensor::shallow_clone).collect(),
            bucket_of,
            pending: entry.buckets.iter().map(Vec::len).collect(),
            ready: vec![false; entry.params.len()],
            next: 0,
            comm: entry.comm.as_ref().map(|c| c as *const CommStream),
            error: None,
        }
    }

    /// Installs this round in `slot`, so the hooks act on it.
    pub(crate) fn install(self, slot: &Slot) {
        *slot.round.lock().unwrap_or_else(|e| e.into_inner()) = Some(self);
    }

    /// Takes the round back from `slot` after the backward.
    pub(crate) fn take(slot: &Slot) -> Option<Self> {
        slot.round.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn fail(&mut self, e: Error) {
        self.error.get_or_insert(e);
    }

    /// Parameter `i`'s gradient is final for this backward: move it into its bucket, and launch every
    /// bucket that is now complete, in order.
    fn mark_ready(&mut self, i: usize) {
        if self.error.is_some() || i >= self.ready.len() || self.ready[i] {
            return;
        }
        let grad = self.params[i].grad();
        if grad.defined() {
            if let Err(e) = self.adopt(i, &grad) {
                return self.fail(e);
            }
        }
        self.ready[i] = true;
        self.pending[self.bucket_of[i]] -= 1;
        self.launch_ready();
    }

    /// Makes parameter `i`'s gradient its view of the bucket (copying `grad` there unless it is already).
    fn adopt(&self, i: usize, grad: &Tensor) -> Result<()> {
        let view = &self.views[i];
        if grad.data_ptr() != view.data_ptr() {
            tch::no_grad(|| view.shallow_clone().f_copy_(grad))
                .map_err(|e| Error::torch("gradient all-reduce", e))?;
            crate::optim::set_grad(&self.params[i], view)?;
        }
        Ok(())
    }

    fn launch_ready(&mut self) {
        while self.error.is_none() && self.next < self.pending.len() && self.pending[self.next] == 0
        {
            let b = self.next;
            self.next += 1;
            if let Err(e) = self.launch(b) {
                self.fail(e);
            }
        }
    }

    fn launch(&mut self, b: usize) -> Result<()> {
        // SAFETY: see `group`: the owner of the group is parked in the backward, or is the caller.
        let group = unsafe { &mut *self.group };
        let flat = &mut self.flats[b];
        if let Some(comm) = self.comm {
            // SAFETY: the entry owning the stream outlives the round (the round ends in finish).
            let comm = unsafe { &*comm };
            let among = crate::distributed::Among::World;
            if group.all_reduce_on_stream(among, flat, ReduceOp::Mean, comm, b)? {
                return Ok(());
            }
        }
        tch::no_grad(|| group.all_reduce(flat, ReduceOp::Mean))
    }

    /// After the backward: parameters whose hook did not fire keep an earlier gradient, get zeros
    /// (`find_unused`), or are an error naming them; the remaining buckets are launched; the compute
    /// stream waits for the all-reduces.
    /// Returns how many buckets the hooks had launched during the backward.
    pub(crate) fn finish(mut self, find_unused: bool, names: &[String]) -> Result<usize> {
        let during = self.next;
        let buckets: Vec<Vec<usize>> = {
            let mut b: Vec<Vec<usize>> = vec![Vec::new(); self.pending.len()];
            for (i, &k) in self.bucket_of.iter().enumerate() {
                b[k].push(i);
            }
            b
        };
        'outer: for bucket in &buckets {
            for &i in bucket {
                if self.error.is_some() {
                    break 'outer;
                }
                if self.ready[i] {
                    continue;
                }
                let grad = self.params[i].grad();
                let outcome = if grad.defined() {
                    self.adopt(i, &grad)
                } else if find_unused {
                    tch::no_grad(|| self.views[i].shallow_clone().f_zero_().map(drop))
                        .map_err(|e| Error::torch("gradient all-reduce", e))
                        .and_then(|()| crate::optim::set_grad(&self.params[i], &self.views[i]))
                } else {
                    // SAFETY: the caller owns the group (the backward is over).
                    let rank = unsafe { &*self.group }.rank();
                    Err(Error::UnusedParameter {
                        parameter: names.get(i).cloned().unwrap_or_else(|| "?".into()),
                        rank,
                    })
                };
                if let Err(e) = outcome {
                    self.fail(e);
                    break 'outer;
                }
                self.ready[i] = true;
                self.pending[self.bucket_of[i]] -= 1;
                self.launch_ready();
            }
        }
        if let Some(comm) = self.comm {
            // SAFETY: as in launch.
            unsafe { &*comm }.join_compute()?;
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(during),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tch::{Device, Kind};

    #[test]
    fn hooks_fire_once_per_parameter_per_backward_and_release_their_slot() {
        let w = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![w.shallow_clone(), b.shallow_clone()];
        let slot = Arc::new(Slot::default());
        assert!(register_hooks(&params, &slot));
        assert_eq!(Arc::strong_count(&slot), 3, "one reference per hook");
        // `w` is used twice in the graph: its hook still fires once, after both contributions.
        let loss =
            || ((&w * 2.0).sum(Kind::Float) + (&w * &b).sum(Kind::Float) + &b).sum(Kind::Float);
        loss().backward();
        assert_eq!(slot.fired.load(Ordering::Relaxed), 2);
        loss().backward();
        assert_eq!(slot.fired.load(Ordering::Relaxed), 4);
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), [6.0; 3]);
        clear_hooks(&params);
        assert_eq!(
            Arc::strong_count(&slot),
            1,
            "clearing dropped the hooks' references"
        );
        loss().backward();
        assert_eq!(slot.fired.load(Ordering::Relaxed), 4);
    }
}
