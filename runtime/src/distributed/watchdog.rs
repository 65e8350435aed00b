//! NCCL's watchdog. NCCL collectives are queued on a CUDA stream and return at once; a rank that never
//! joins one leaves the others' GPUs waiting forever, and their host threads with them at the next
//! synchronisation. So, as PyTorch's watchdog does, every NCCL collective is followed by an event, and a
//! thread watches the events: when one is not reached within the collective timeout, the census names the
//! ranks that never arrived, the error is printed and the process ends at once. That is PyTorch's default
//! (`TORCH_NCCL_ASYNC_ERROR_HANDLING=3`, tear down without `ncclCommAbort`), and for the same reasons:
//! the abort can itself hang, and it would release the main thread, blocked in CUDA behind the stuck
//! collective, to run the user's code on the aborted collective's garbage (seen on 2 GPUs: a wrong sum
//! printed between the abort and the exit). Ending the process frees the communicator and its GPU work as
//! a kill does. The launcher then stops the job and reports the failing rank with that message.

use super::census::Census;
use super::stream::{Mark, use_device};
use crate::Error;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One collective in flight.
struct Pending {
    mark: Mark,
    op: &'static str,
    seq: u64,
    since: Instant,
}

struct Shared {
    device: usize,
    rank: usize,
    timeout: Duration,
    census: Arc<Census>,
    queue: Mutex<VecDeque<Pending>>,
    started: std::sync::Once,
}

/// This rank's watchdog over its NCCL collectives.
#[derive(Clone)]
pub(crate) struct Watchdog(Arc<Shared>);

/// How often the thread looks at the oldest collective in flight.
const POLL: Duration = Duration::from_millis(20);

impl Watchdog {
    /// A watchdog for the communicator on `device`; its thread starts with the first collective.
    pub(crate) fn start(
        device: usize,
        rank: usize,
        timeout: Duration,
        census: Arc<Census>,
    ) -> Watchdog {
        Watchdog(Arc::new(Shared {
            device,
            rank,
            timeout,
            census,
            queue: Mutex::new(VecDeque::new()),
            started: std::sync::Once::new(),
        }))
    }

    /// Watches the collective `seq` (`op`) just queued on `stream` (null: the legacy default stream).
    pub(crate) fn watch(&self, stream: *mut c_void, op: &'static str, seq: u64) {
        let Ok(mark) = Mark::new() else { return };
        if mark.record(stream).is_err() {
            return;
        }
        self.0
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Pending {
                mark,
                op,
                seq,
                since: Instant::now(),
            });
        self.0.started.call_once(|| {
            let shared = self.0.clone();
            let _ = std::thread::Builder::new()
                .name("hasten-nccl-watchdog".into())
                .spawn(move || watch_loop(&shared));
        });
    }
}

fn watch_loop(shared: &Shared) {
    let _ = use_device(shared.device);
    loop {
        std::thread::sleep(POLL);
        let overdue = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while queue.front().is_some_and(|p| p.mark.done()) {
                queue.pop_front();
            }
            queue
                .front()
                .filter(|p| p.since.elapsed() > shared.timeout)
                .map(|p| (p.op, p.seq, p.since.elapsed()))
        };
        if let Some((op, seq, waited)) = overdue {
            give_up(shared, op, seq, waited);
        }
    }
}

/// The timeout: name the missing ranks, end the process.
fn give_up(shared: &Shared, op: &'static str, seq: u64, waited: Duration) -> ! {
    let missing = shared.census.missing_after_timeout();
    let error = Error::CollectiveTimeout {
        op,
        seq,
        waited_s: waited.as_secs_f64(),
        missing,
    };
    eprintln!(
        "hasten: rank {}: NCCL {error}; ending this process",
        shared.rank
    );
    use std::io::Write;
    let _ = std::io::stderr().flush();
    // SAFETY: ends the process at once, with no code of this process running after: the main thread may
    // be blocked in CUDA behind the stuck collective, and exit handlers would wait on it.
    unsafe { libc::_exit(1) }
}
