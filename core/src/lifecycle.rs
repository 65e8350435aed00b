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

/// libcuda's `cuDeviceGetCount`.
type GetCount = unsafe extern "C" fn(*mut libc::c_int) -> libc::c_int;

/// True when the CUDA driver has been initialised in this process (by libtorch, cudarc, anything),
/// found without initialising it: if libcuda is not even mapped, no; otherwise a driver call made before
/// `cuInit` answers CUDA_ERROR_NOT_INITIALIZED, and any other answer means it was initialised.
pub fn cuda_initialized_in_this_process() -> bool {
    // Found once libcuda is mapped (it is never unmapped), so that repeated checks (one per notebook
    // cell) neither reread /proc nor open the library again.
    static GET_COUNT: std::sync::OnceLock<GetCount> = std::sync::OnceLock::new();
    let get_count = match GET_COUNT.get() {
        Some(f) => *f,
        None => match driver_get_count() {
            Ok(Some(f)) => *GET_COUNT.get_or_init(|| f),
            Ok(None) => return false,
            Err(()) => return true,
        },
    };
    let mut n = 0;
    const CUDA_ERROR_NOT_INITIALIZED: libc::c_int = 3;
    // SAFETY: writes one int; before cuInit it returns CUDA_ERROR_NOT_INITIALIZED without initialising
    // anything.
    unsafe { get_count(&mut n) != CUDA_ERROR_NOT_INITIALIZED }
}

/// libcuda's cuDeviceGetCount if libcuda is mapped (None: it is not, so CUDA cannot be initialised;
/// Err: it is, but the function cannot be found, so assume it is initialised).
fn driver_get_count() -> Result<Option<GetCount>, ()> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Ok(None);
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
        return Ok(None);
    };
    // The mapped library itself, never loaded anew (RTLD_NOLOAD).
    let driver = crate::dynlib::Loaded::already_loaded(path).ok_or(())?;
    // SAFETY: cuDeviceGetCount's signature (cuda.h).
    unsafe { driver.function("cuDeviceGetCount") }
        .map(Some)
        .map_err(|_| ())
}

/// Removes hasten's shared-memory segments (`/dev/shm/hasten-{port}-{pid}-…`) whose creating process is
/// gone: a rank 0 killed between creating its segment and unlinking it (which it does as soon as every
/// rank has mapped it) leaves one behind. Called when a group sets shared memory up and when a launcher's
/// job ends. Returns how many were removed.
pub fn sweep_stale_shm_segments() -> usize {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("hasten-") else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .nth(1)
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // Signal 0 only asks whether the process exists.
        let gone = rustix::process::Pid::from_raw(pid).is_some_and(|pid| {
            rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH)
        });
        if gone && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_segments_of_dead_processes_are_removed() {
        // pid 0x7fff_fff0 does not exist; our own pid does.
        let dead = "/dev/shm/hasten-1-2147483632-1";
        let ours = format!("/dev/shm/hasten-1-{}-2", std::process::id());
        std::fs::write(dead, b"x").unwrap();
        std::fs::write(&ours, b"x").unwrap();
        assert!(sweep_stale_shm_segments() >= 1);
        assert!(!std::path::Path::new(dead).exists());
        assert!(std::path::Path::new(&ours).exists());
        std::fs::remove_file(ours).unwrap();
    }

    #[test]
    fn cuda_is_not_initialised_by_asking() {
        // Asking twice gives the same answer: the check itself initialises nothing.
        let first = cuda_initialized_in_this_process();
        assert_eq!(first, cuda_initialized_in_this_process());
    }
}
