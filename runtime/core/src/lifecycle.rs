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
