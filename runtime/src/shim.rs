//! hasten's C++ shim (`runtime/csrc`), declared once and wrapped safely: the libtorch internals tch does not
//! expose (autocast on every device type, autograd hooks, fused optimizers, generator states, pinned
//! memory, the caching allocator). Every C++ entry point catches its exceptions and reports failure as a
//! status (0 is success; negative or non-zero a failure, whose message the fused kernels, generator
//! states and tensor factories print to stderr) or a null tensor, so the wrappers below only have to hand
//! over valid handles: they take tch tensors, which stay alive for the call, and plain values. The one
//! argument libtorch trusts without checking, a dtype code, makes its wrapper an `unsafe fn`. The rest of
//! the crate calls these wrappers, never `ffi` itself.

use std::ffi::{c_char, c_int, c_void};
use tch::Tensor;
use torch_sys::C_tensor;

mod ffi {
    use super::*;

    unsafe extern "C" {
        pub(super) fn hasten_autocast_is_enabled(device: c_int) -> c_int;
        pub(super) fn hasten_autocast_set_enabled(device: c_int, enabled: c_int) -> c_int;
        pub(super) fn hasten_autocast_get_dtype(device: c_int) -> c_int;
        pub(super) fn hasten_autocast_set_dtype(device: c_int, scalar_type: c_int) -> c_int;
        pub(super) fn hasten_autocast_increment_nesting() -> c_int;
        pub(super) fn hasten_autocast_decrement_nesting() -> c_int;
        pub(super) fn hasten_autocast_clear_cache();

        pub(super) fn hasten_clear_grads(tensors: *mut *mut C_tensor, n: c_int) -> c_int;
        pub(super) fn hasten_set_grad(tensor: *mut C_tensor, grad: *mut C_tensor) -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub(super) fn hasten_fused_adamw(
            params: *mut *mut C_tensor,
            exp_avgs: *mut *mut C_tensor,
            exp_avg_sqs: *mut *mut C_tensor,
            steps: *mut *mut C_tensor,
            n: c_int,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub(super) fn hasten_fused_sgd(
            params: *mut *mut C_tensor,
            momenta: *mut *mut C_tensor,
            n: c_int,
            lr: f64,
            momentum: f64,
            dampening: f64,
            weight_decay: f64,
            nesterov: c_int,
            maximize: c_int,
            first: c_int,
        ) -> c_int;

        pub(super) fn hasten_set_grad_ready_hook(
            tensor: *mut C_tensor,
            call: extern "C" fn(*mut c_void, i64),
            drop: extern "C" fn(*mut c_void),
            ctx: *mut c_void,
            index: i64,
        ) -> i32;
        pub(super) fn hasten_clear_grad_ready_hook(tensor: *mut C_tensor) -> i32;

        pub(super) fn hasten_rng_get_state(device_type: i32, index: i32) -> *mut C_tensor;
        pub(super) fn hasten_rng_set_state(
            device_type: i32,
            index: i32,
            state: *mut C_tensor,
        ) -> i32;
        pub(super) fn hasten_randperm(n: i64, seed: u64) -> *mut C_tensor;
        pub(super) fn hasten_empty_pinned_bytes(nbytes: i64) -> *mut C_tensor;
        pub(super) fn hasten_empty_device_cache() -> i32;
        pub(super) fn hasten_storage_resize(tensor: *mut C_tensor, nbytes: i64) -> i32;
        pub(super) fn hasten_device_memory_stat(device_type: i32, index: i32, which: i32) -> i64;
        pub(super) fn hasten_checkpoint(
            input: *mut C_tensor,
            anchor: *mut C_tensor,
            forward: extern "C" fn(*mut c_void, *mut C_tensor, *mut c_char, usize) -> *mut C_tensor,
            drop: extern "C" fn(*mut c_void),
            ctx: *mut c_void,
            error: *mut c_char,
            len: usize,
        ) -> *mut C_tensor;
        pub(super) fn hasten_register_grad_pre_hook(
            tensor: *mut C_tensor,
            call: extern "C" fn(*mut c_void, i64),
            drop: extern "C" fn(*mut c_void),
            ctx: *mut c_void,
            index: i64,
        ) -> i32;
    }
}

fn handle(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

fn handles(tensors: &[Tensor]) -> Vec<*mut C_tensor> {
    tensors.iter().map(handle).collect()
}

fn count(tensors: &[Tensor]) -> c_int {
    c_int::try_from(tensors.len()).unwrap_or(c_int::MAX)
}

/// A tensor the shim has just created (null: it failed, and libtorch printed why).
fn owned(ptr: *mut C_tensor) -> Option<Tensor> {
    // SAFETY: a non-null pointer from the shim is a fresh heap-allocated at::Tensor (tch's
    // representation) that nothing else owns; tch frees it.
    (!ptr.is_null()).then(|| unsafe { Tensor::from_ptr(ptr) })
}

/// Autocast of a device type (0: CPU, 1: CUDA): `torch.is_autocast_enabled(device_type)`; negative on
/// failure.
pub(crate) fn autocast_is_enabled(device: c_int) -> c_int {
    // SAFETY: plain values; the shim catches every exception.
    unsafe { ffi::hasten_autocast_is_enabled(device) }
}

/// `torch.set_autocast_enabled(device_type, enabled)`; negative on failure.
pub(crate) fn autocast_set_enabled(device: c_int, enabled: bool) -> c_int {
    // SAFETY: plain values; the shim catches every exception.
    unsafe { ffi::hasten_autocast_set_enabled(device, c_int::from(enabled)) }
}

/// The autocast dtype of a device type as a c10::ScalarType code; negative on failure.
pub(crate) fn autocast_get_dtype(device: c_int) -> c_int {
    // SAFETY: plain values; the shim catches every exception.
    unsafe { ffi::hasten_autocast_get_dtype(device) }
}

/// Sets the autocast dtype of a device type (a c10::ScalarType code); negative on failure.
///
/// # Safety
/// `scalar_type` must be a valid c10::ScalarType code (libtorch casts it unchecked and indexes its dtype
/// tables with it): Half (5), BFloat16 (15), or a code [`autocast_get_dtype`] returned.
pub(crate) unsafe fn autocast_set_dtype(device: c_int, scalar_type: c_int) -> c_int {
    // SAFETY: a valid dtype code (the caller's contract) and a device type; the shim catches every
    // exception.
    unsafe { ffi::hasten_autocast_set_dtype(device, scalar_type) }
}

/// Enters one level of autocast nesting.
pub(crate) fn autocast_increment_nesting() -> c_int {
    // SAFETY: no arguments; the shim catches every exception.
    unsafe { ffi::hasten_autocast_increment_nesting() }
}

/// Leaves one level of autocast nesting; the levels left.
pub(crate) fn autocast_decrement_nesting() -> c_int {
    // SAFETY: no arguments; the shim catches every exception.
    unsafe { ffi::hasten_autocast_decrement_nesting() }
}

/// Drops autocast's cache of cast weights (when the outermost autocast ends).
pub(crate) fn autocast_clear_cache() {
    // SAFETY: no arguments; the shim catches every exception.
    unsafe { ffi::hasten_autocast_clear_cache() }
}

/// Drops the gradients of `tensors` (set_to_none).
pub(crate) fn clear_grads(tensors: &[Tensor]) -> c_int {
    let mut ptrs = handles(tensors);
    // SAFETY: valid tensor handles, alive for the call.
    unsafe { ffi::hasten_clear_grads(ptrs.as_mut_ptr(), count(tensors)) }
}

/// Makes `grad` the gradient of `param`; non-zero when libtorch refuses.
pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> c_int {
    // SAFETY: two valid tensor handles, alive for the call.
    unsafe { ffi::hasten_set_grad(handle(param), handle(grad)) }
}

/// One fused AdamW step over parameters with their moments and step counters (four lists of one
/// length); non-zero when the kernel failed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_adamw(
    params: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    lr: f64,
    betas: (f64, f64),
    weight_decay: f64,
    eps: f64,
) -> c_int {
    let n = params.len();
    assert!(
        exp_avgs.len() == n && exp_avg_sqs.len() == n && steps.len() == n,
        "fused AdamW needs one moment pair and step counter per parameter"
    );
    let (mut p, mut m, mut v, mut s) = (
        handles(params),
        handles(exp_avgs),
        handles(exp_avg_sqs),
        handles(steps),
    );
    // SAFETY: four lists of valid tensor handles of the same length (checked), alive for the call.
    unsafe {
        ffi::hasten_fused_adamw(
            p.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            s.as_mut_ptr(),
            count(params),
            lr,
            betas.0,
            betas.1,
            weight_decay,
            eps,
        )
    }
}

/// One fused SGD step; `momenta` is empty or one buffer per parameter, and must be the latter whenever
/// `momentum` is non-zero. Non-zero when the kernel failed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_sgd(
    params: &[Tensor],
    momenta: &[Tensor],
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    first: bool,
) -> c_int {
    assert!(
        momenta.len() == params.len() || (momenta.is_empty() && momentum == 0.0),
        "fused SGD with momentum needs one momentum buffer per parameter"
    );
    let mut p = handles(params);
    let mut m = handles(momenta);
    let m_ptr = if m.is_empty() {
        std::ptr::null_mut()
    } else {
        m.as_mut_ptr()
    };
    // SAFETY: valid tensor handles alive for the call; `momenta` is as long as `params` whenever the
    // shim reads it (non-zero momentum, checked above).
    unsafe {
        ffi::hasten_fused_sgd(
            p.as_mut_ptr(),
            m_ptr,
            count(params),
            lr,
            momentum,
            dampening,
            weight_decay,
            c_int::from(nesterov),
            c_int::from(maximize),
            c_int::from(first),
        )
    }
}

/// Registers a post-accumulate-grad hook on `tensor` that calls `call(ctx, index)` each time its gradient
/// is ready, and `drop(ctx)` when the hook is removed or the tensor freed. Non-zero when libtorch refuses
/// (the shim has then called `drop(ctx)` already).
///
/// # Safety
/// `ctx` must stay valid until `drop(ctx)` is called, and `call` and `drop` must accept it; `call` runs on
/// libtorch's autograd threads and must not unwind.
pub(crate) unsafe fn set_grad_ready_hook(
    tensor: &Tensor,
    call: extern "C" fn(*mut c_void, i64),
    drop: extern "C" fn(*mut c_void),
    ctx: *mut c_void,
    index: i64,
) -> i32 {
    // SAFETY: a valid tensor handle; the caller vouches for ctx, call and drop.
    unsafe { ffi::hasten_set_grad_ready_hook(handle(tensor), call, drop, ctx, index) }
}

/// Removes the gradient-ready hook of `tensor`, if any (its context is dropped).
pub(crate) fn clear_grad_ready_hook(tensor: &Tensor) -> i32 {
    // SAFETY: a valid tensor handle, alive for the call.
    unsafe { ffi::hasten_clear_grad_ready_hook(handle(tensor)) }
}

/// The state of libtorch's default generator of a device type (0: CPU, 1: CUDA) and index.
pub(crate) fn rng_get_state(device_type: i32, index: i32) -> Option<Tensor> {
    // SAFETY: plain values; the shim returns a fresh tensor or null.
    owned(unsafe { ffi::hasten_rng_get_state(device_type, index) })
}

/// Sets libtorch's default generator of a device type and index to `state`; non-zero when refused.
pub(crate) fn rng_set_state(device_type: i32, index: i32, state: &Tensor) -> i32 {
    // SAFETY: a valid tensor handle, alive for the call.
    unsafe { ffi::hasten_rng_set_state(device_type, index, handle(state)) }
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))`.
pub(crate) fn randperm(n: i64, seed: u64) -> Option<Tensor> {
    // SAFETY: plain values; the shim returns a fresh tensor or null.
    owned(unsafe { ffi::hasten_randperm(n, seed) })
}

/// A one-dimensional page-locked byte tensor of `nbytes` (needs CUDA).
pub(crate) fn empty_pinned_bytes(nbytes: i64) -> Option<Tensor> {
    // SAFETY: a plain value; the shim returns a fresh tensor or null.
    owned(unsafe { ffi::hasten_empty_pinned_bytes(nbytes) })
}

/// Returns the memory libtorch's caching allocator holds but does not use to the device.
pub(crate) fn empty_device_cache() -> i32 {
    // SAFETY: no arguments; the shim only asks the device allocator to empty its cache.
    unsafe { ffi::hasten_empty_device_cache() }
}

/// Gives `tensor`'s storage `nbytes` fresh bytes, or frees them with 0, in place: every view of that
/// storage (autograd's saved ones included) sees the change. Non-zero on failure (libtorch's message
/// went to stderr).
///
/// # Safety
/// After freeing, nothing may read or write `tensor` or any view of its storage until it has bytes
/// again; after re-allocating, the bytes are uninitialised until written.
pub(crate) unsafe fn storage_resize(tensor: &Tensor, nbytes: i64) -> i32 {
    // SAFETY: a valid tensor handle, alive for the call; the caller keeps the storage unused while freed.
    unsafe { ffi::hasten_storage_resize(handle(tensor), nbytes) }
}

/// Registers a hook on the gradient of the non-leaf `tensor` that calls `call(ctx, index)` when that
/// gradient has been computed (the backward of what produced `tensor` runs next), and `drop(ctx)` when
/// the hook is freed with its graph. Non-zero when libtorch refuses (then `drop(ctx)` has been called).
///
/// # Safety
/// As [`set_grad_ready_hook`]: `ctx` stays valid until `drop(ctx)`, and `call` must not unwind.
pub(crate) unsafe fn register_grad_pre_hook(
    tensor: &Tensor,
    call: extern "C" fn(*mut c_void, i64),
    drop: extern "C" fn(*mut c_void),
    ctx: *mut c_void,
    index: i64,
) -> i32 {
    // SAFETY: a valid tensor handle; the caller vouches for ctx, call and drop.
    unsafe { ffi::hasten_register_grad_pre_hook(handle(tensor), call, drop, ctx, index) }
}

/// The CUDA caching allocator's counts for GPU `index`: `which` 0 bytes allocated now, 1 their peak, 2
/// resets the peak. -1 when there is no CUDA allocator.
pub(crate) fn device_memory_stat(index: i32, which: i32) -> i64 {
    // SAFETY: plain values; the shim catches every exception.
    unsafe { ffi::hasten_device_memory_stat(1, index, which) }
}

/// A checkpointed block's forward, as the shim holds it.
type BlockForward = Box<dyn Fn(&Tensor) -> Tensor>;

/// The text of a panic's payload.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".into())
}

extern "C" fn run_block_forward(
    ctx: *mut c_void,
    input: *mut C_tensor,
    error: *mut c_char,
    len: usize,
) -> *mut C_tensor {
    // SAFETY: the shim hands over a fresh heap tensor (tch's representation) that we now own.
    let input = unsafe { Tensor::from_ptr(input) };
    // SAFETY: ctx is the Box<BlockForward> given to `checkpoint`, alive until drop_block_forward.
    let forward = unsafe { &*(ctx as *const BlockForward) };
    // A panic must not cross into libtorch: it becomes the error the shim throws.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(&input))) {
        Ok(mut out) => {
            let ptr = out.as_mut_ptr();
            // The shim takes ownership of the tensor (it deletes it).
            std::mem::forget(out);
            ptr
        }
        Err(panic) => {
            let text = panic_text(&*panic);
            let bytes = text.as_bytes();
            let n = bytes.len().min(len.saturating_sub(1));
            // SAFETY: `error` holds `len` bytes; n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), error.cast::<u8>(), n);
                *error.add(n) = 0;
            }
            std::ptr::null_mut()
        }
    }
}

extern "C" fn drop_block_forward(ctx: *mut c_void) {
    // SAFETY: ctx came from Box::into_raw in `checkpoint` and the shim drops it once.
    drop(unsafe { Box::from_raw(ctx as *mut BlockForward) });
}

/// Runs `forward(input)` as a checkpointed block: without keeping activations, the output's backward
/// recomputing it (with the forward's autocast and generator states) and backpropagating through the
/// recomputation. `anchor`, a parameter the block uses, ties it into the graph when `input` needs no
/// gradient. With gradients off it is just `forward(input)`. The error is the forward's panic or
/// libtorch's message.
///
/// # Safety
/// `forward` runs again during the backward, on libtorch's autograd thread for the device, while the
/// thread that called the backward waits for it: whatever it borrows must stay valid and usable from
/// there until the graph is freed.
pub(crate) unsafe fn checkpoint(
    input: &Tensor,
    anchor: &Tensor,
    forward: BlockForward,
) -> Result<Tensor, String> {
    let ctx = Box::into_raw(Box::new(forward));
    let mut error = [0 as c_char; 1024];
    // SAFETY: valid tensor handles alive for the call; ctx is owned by the shim from here (dropped
    // through drop_block_forward); run_block_forward catches panics; `error` holds its length.
    let out = unsafe {
        ffi::hasten_checkpoint(
            handle(input),
            handle(anchor),
            run_block_forward,
            drop_block_forward,
            ctx.cast(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    owned(out).ok_or_else(|| {
        // SAFETY: the shim NUL-terminates `error` within its length.
        let text = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
        match text.to_string_lossy() {
            t if t.is_empty() => "activation checkpointing failed in libtorch".into(),
            t => t.into_owned(),
        }
    })
}
