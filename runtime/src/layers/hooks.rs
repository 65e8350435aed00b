//! One mechanism for everything that acts around a model's blocks (Accelerate's module hooks, which tch
//! modules cannot carry): the owner of a forward — a prepared sharded model, a dispatched big model —
//! makes itself the active [`BlockHooks`] of this thread for the length of that forward, and every
//! [`Block`](super::Block) asks the innermost active owner to run it. The sharded model gathers the
//! block's parameters (and checkpoints it); the dispatcher runs it where its device map says, bringing
//! offloaded weights over for the call. Outside any owner a block is just its module.

use std::cell::RefCell;
use tch::Tensor;

/// The forward of one block, run once.
pub(crate) type Forward<'a> = Box<dyn FnOnce(&Tensor) -> Tensor + 'a>;
/// Makes the function a checkpointed block's backward calls to run the block again.
pub(crate) type Recompute<'a> = Box<dyn FnOnce() -> Box<dyn Fn(&Tensor) -> Tensor> + 'a>;

/// What runs a model's blocks during its owner's forward.
pub(crate) trait BlockHooks {
    /// Runs the block at VarStore path `path` on `xs`: `forward` is its module's forward.
    fn run_block(
        &self,
        path: &str,
        xs: &Tensor,
        forward: Forward<'_>,
        recompute: Recompute<'_>,
    ) -> Tensor;
}

thread_local! {
    /// The active hooks, innermost last. Each entry is a borrow that [`with_hooks`] holds for as long
    /// as the entry is on the stack.
    static ACTIVE: RefCell<Vec<*const (dyn BlockHooks + 'static)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `hooks` running this thread's blocks (innermost wins), until `f` returns or unwinds.
pub(crate) fn with_hooks<R>(hooks: &dyn BlockHooks, f: impl FnOnce() -> R) -> R {
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.borrow_mut().pop());
        }
    }
    // SAFETY: only the lifetime is erased; the pointer leaves the stack (Pop) before this borrow ends,
    // and is dereferenced only while it is on the stack.
    let hooks: &'static dyn BlockHooks = unsafe { std::mem::transmute(hooks) };
    ACTIVE.with(|a| a.borrow_mut().push(hooks as *const _));
    let _pop = Pop;
    f()
}

/// Runs a block through the active hooks, or plainly when none is active.
pub(crate) fn run_block(
    path: &str,
    xs: &Tensor,
    forward: Forward<'_>,
    recompute: Recompute<'_>,
) -> Tensor {
    match ACTIVE.with(|a| a.borrow().last().copied()) {
        // SAFETY: an entry on the stack points at hooks borrowed by a `with_hooks` call still running
        // on this thread (an outer frame of this one).
        Some(hooks) => unsafe { &*hooks }.run_block(path, xs, forward, recompute),
        None => forward(xs),
    }
}
