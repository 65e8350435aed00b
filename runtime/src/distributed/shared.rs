//! The process group as the Accelerator and its loaders share it: a handle that locks the group for
//! one operation at a time. Handing out the lock guard itself (as `acc.group()` once did) let a user
//! hold it across a dispatched loader's step, which needs the same group: the process then waited on
//! itself.

use super::ProcessGroup;
use crate::ops::Reduction;
use crate::{Nested, ReduceOp, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tch::Tensor;

/// A shared [`ProcessGroup`] (what [`crate::Accelerator::group`] gives): cloning it is cheap, and each
/// method locks the group for that one operation only, so holding a `Group` never blocks a prepared
/// data loader (which runs its own collectives on it). The methods are [`ProcessGroup`]'s. As with any
/// process group, issue collectives from one thread, in the same order on every rank.
#[derive(Clone)]
pub struct Group {
    inner: Arc<Mutex<ProcessGroup>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("Group")
            .field("rank", &g.rank())
            .field("world_size", &g.world_size())
            .field("uses_nccl", &g.uses_nccl())
            .finish()
    }
}

thread_local! {
    /// The groups this thread holds locked, by address.
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// A locked [`Group`]: the process group, until dropped.
pub(crate) struct GroupGuard<'a> {
    guard: MutexGuard<'a, ProcessGroup>,
    key: usize,
}

impl Deref for GroupGuard<'_> {
    type Target = ProcessGroup;
    fn deref(&self) -> &ProcessGroup {
        &self.guard
    }
}

impl DerefMut for GroupGuard<'_> {
    fn deref_mut(&mut self) -> &mut ProcessGroup {
        &mut self.guard
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(i) = held.iter().rposition(|k| *k == self.key) {
                held.remove(i);
            }
        });
    }
}

impl Group {
    /// Shares `group`.
    pub fn new(group: ProcessGroup) -> Self {
        Group {
            inner: Arc::new(Mutex::new(group)),
        }
    }

    /// The group, locked until the guard drops (even if a thread panicked while holding it: a
    /// collective's state is per call). Locking it again on the same thread (a `Group` method, or an
    /// Accelerator call that communicates, inside [`Group::with`]) panics with a message that says so,
    /// instead of waiting forever on itself.
    pub(crate) fn lock(&self) -> GroupGuard<'_> {
        let key = Arc::as_ptr(&self.inner) as usize;
        if HELD.with(|held| held.borrow().contains(&key)) {
            panic!(
                "the process group is already locked by this thread: inside Group::with, use the \
                 ProcessGroup it passes, not the Accelerator, a data loader or another Group handle"
            );
        }
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        HELD.with(|held| held.borrow_mut().push(key));
        GroupGuard { guard, key }
    }

    /// Runs `f` with the group locked, for several operations in a row that no other thread may
    /// interleave with. Inside `f`, use only the group it passes: anything else that communicates
    /// (the Accelerator's collectives, `backward`, a prepared data loader) needs the same lock, and
    /// panics saying so.
    pub fn with<R>(&self, f: impl FnOnce(&mut ProcessGroup) -> R) -> R {
        f(&mut self.lock())
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.lock().rank()
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.lock().world_size()
    }

    /// [`ProcessGroup::uses_nccl`].
    pub fn uses_nccl(&self) -> bool {
        self.lock().uses_nccl()
    }

    /// [`ProcessGroup::nccl_active`].
    pub fn nccl_active(&self) -> bool {
        self.lock().nccl_active()
    }

    /// [`ProcessGroup::collective_timeout`].
    pub fn collective_timeout(&self) -> Duration {
        self.lock().collective_timeout()
    }

    /// [`ProcessGroup::set_debug`].
    pub fn set_debug(&self, on: bool) {
        self.lock().set_debug(on)
    }

    /// [`ProcessGroup::all_reduce`].
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.lock().all_reduce(t, op)
    }

    /// [`ProcessGroup::broadcast`].
    pub fn broadcast(&self, t: &mut Tensor, src: usize) -> Result<()> {
        self.lock().broadcast(t, src)
    }

    /// [`ProcessGroup::all_gather_cat`].
    pub fn all_gather_cat(&self, t: &Tensor) -> Result<Tensor> {
        self.lock().all_gather_cat(t)
    }

    /// [`ProcessGroup::reduce_scatter`].
    pub fn reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.lock().reduce_scatter(t, op)
    }

    /// [`ProcessGroup::all_gather_bytes`].
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.lock().all_gather_bytes(bytes)
    }

    /// [`ProcessGroup::barrier`].
    pub fn barrier(&self) -> Result<()> {
        self.lock().barrier()
    }

    /// [`ProcessGroup::wait_for_everyone`].
    pub fn wait_for_everyone(&self) -> Result<()> {
        self.lock().wait_for_everyone()
    }

    /// [`ProcessGroup::gather`].
    pub fn gather<T: Nested>(&self, data: T) -> Result<T> {
        self.lock().gather(data)
    }

    /// [`ProcessGroup::all_gather_object`].
    pub fn all_gather_object<T: Serialize + DeserializeOwned>(&self, obj: &T) -> Result<Vec<T>> {
        self.lock().all_gather_object(obj)
    }

    /// [`ProcessGroup::gather_object`].
    pub fn gather_object<T: Serialize + DeserializeOwned + Clone>(
        &self,
        items: &[T],
    ) -> Result<Vec<T>> {
        self.lock().gather_object(items)
    }

    /// [`ProcessGroup::broadcast_data`].
    pub fn broadcast_data<T: Nested>(&self, data: T, from_process: usize) -> Result<T> {
        self.lock().broadcast_data(data, from_process)
    }

    /// [`ProcessGroup::broadcast_object_list`].
    pub fn broadcast_object_list<T: Serialize + DeserializeOwned>(
        &self,
        objects: &mut Vec<T>,
        from_process: usize,
    ) -> Result<()> {
        self.lock().broadcast_object_list(objects, from_process)
    }

    /// [`ProcessGroup::reduce`].
    pub fn reduce<T: Nested>(&self, data: T, reduction: Reduction, scale: f64) -> Result<T> {
        self.lock().reduce(data, reduction, scale)
    }

    /// [`ProcessGroup::pad_across_processes`].
    pub fn pad_across_processes<T: Nested>(
        &self,
        data: T,
        dim: i64,
        pad_index: f64,
        pad_first: bool,
    ) -> Result<T> {
        self.lock()
            .pad_across_processes(data, dim, pad_index, pad_first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locking_the_group_again_inside_with_panics_with_a_clear_message() {
        let state = crate::ProcessState::from_env().unwrap();
        let group = Group::new(ProcessGroup::init(&state).unwrap());
        assert_eq!(group.with(|g| g.world_size()), 1);
        let again = group.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            group.with(|_| again.barrier())
        }));
        let message = outcome.unwrap_err();
        let text = message.downcast_ref::<&str>().copied().unwrap_or_default();
        assert!(text.contains("already locked by this thread"), "{text}");
        // The lock and the record of it were released on the way out: the group works again.
        group.barrier().unwrap();
        assert_eq!(group.rank(), 0);
    }
}
