//! What this process has already set up, for launchers that must refuse to fork after it.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a process group (or an Accelerator) exists in this process: `notebook_launcher` refuses to
/// fork then, as Accelerate refuses when an `AcceleratorState` exists (the children would inherit a
/// group they cannot use).
static DISTRIBUTED_STATE: AtomicBool = AtomicBool::new(false);

/// True once this process has joined a process group (or created an Accelerator).
pub fn distributed_state_initialized() -> bool {
    DISTRIBUTED_STATE.load(Ordering::SeqCst)
}

/// Records that this process now holds distributed state (called by the runtime).
pub fn mark_distributed_state_initialized() {
    DISTRIBUTED_STATE.store(true, Ordering::SeqCst);
}

/// True when the CUDA driver has been initialised in this process (by libtorch, cudarc, anything),
/// found without initialising it: if libcuda is not even mapped, no; otherwise a driver call made before
/// `cuInit` answers CUDA_ERROR_NOT_INITIALIZED, and any other answer means it was initialised.
pub fn cuda_initialized_in_this_process() -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let Some(path) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("libcuda.so"))
        })
    else {
        return false;
    };
    let Ok(c_path) = std::ffi::CString::new(path) else {
        return true;
    };
    // SAFETY: RTLD_NOLOAD only returns a handle to the already-mapped library; cuDeviceGetCount writes
    // one int and, before cuInit, returns CUDA_ERROR_NOT_INITIALIZED without initialising anything.
    unsafe {
        let handle = libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return true;
        }
        let sym = libc::dlsym(handle, c"cuDeviceGetCount".as_ptr());
        if sym.is_null() {
            return true;
        }
        let get_count: unsafe extern "C" fn(*mut libc::c_int) -> libc::c_int =
            std::mem::transmute(sym);
        let mut n = 0;
        const CUDA_ERROR_NOT_INITIALIZED: libc::c_int = 3;
        get_count(&mut n) != CUDA_ERROR_NOT_INITIALIZED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_is_not_initialised_by_asking() {
        // Asking twice gives the same answer: the check itself initialises nothing.
        let first = cuda_initialized_in_this_process();
        assert_eq!(first, cuda_initialized_in_this_process());
    }
}
