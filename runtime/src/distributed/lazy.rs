//! Starting NCCL without waiting for it.
//!
//! Creating a communicator takes about 0.35 s (2× H200), on top of CUDA's own start-up, and a job's first
//! collectives are often tiny (a flag, a loss, a rank count). So NCCL starts on a background thread when
//! the group forms, and until every rank knows that every rank's communicator is ready, small CUDA
//! collectives go over the TCP links, staged through the CPU. The switch must happen at the same
//! collective on every rank, or one rank would wait in NCCL while another waits on TCP, so it is voted:
//! after each such collective the ranks exchange one "ready" byte, and all switch together when every
//! byte says yes. A large collective (a gradient bucket, a parameter broadcast) never goes over TCP: its
//! size is the same on every rank, so every rank decides alike to wait for its own communicator.

use super::Trace;
use super::nccl::{Nccl, UniqueId};
use super::watchdog::Watchdog;
use crate::{Error, Result};
use std::sync::{Condvar, Mutex, Once};
use std::thread::JoinHandle;

/// Communicators still being created, process-wide. A program that returns from `main` while one is
/// starting would run libnccl's and libcudart's static destructors under the NCCL thread's feet (seen as
/// heap corruption at exit on the GPU machine), so an `atexit` handler waits for them first. Workers
/// forked by `notebook_launcher` leave through `_exit`, which skips both the handler and the destructors.
static IN_FLIGHT: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());
static AT_EXIT: Once = Once::new();

extern "C" fn wait_for_nccl_threads() {
    // Bounded: a communicator whose peer died may never finish, and exiting must not hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (count, done) = &IN_FLIGHT;
    let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
    while *n > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        n = done
            .wait_timeout(n, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Marks one communicator creation as finished when dropped, however the thread ends.
struct InFlight;

impl InFlight {
    fn begin() -> Self {
        AT_EXIT.call_once(|| {
            // SAFETY: registers a plain extern "C" function; it only locks a mutex and waits.
            unsafe {
                libc::atexit(wait_for_nccl_threads);
            }
        });
        *IN_FLIGHT.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let (count, done) = &IN_FLIGHT;
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        done.notify_all();
    }
}

/// Collectives on CUDA tensors of at least this many bytes always wait for NCCL.
pub(crate) const TCP_LIMIT_BYTES: usize = 256 * 1024;

enum Slot {
    Starting(JoinHandle<Result<Nccl>>),
    Ready(Nccl),
    Failed(String),
    Empty,
}

/// A communicator being created on another thread, and whether all ranks have agreed to use it.
pub(crate) struct LazyNccl {
    slot: Slot,
    agreed: bool,
    /// Watches the communicator's collectives.
    watchdog: Watchdog,
    /// How long to wait for the communicator (its creation waits for every rank).
    timeout: std::time::Duration,
}

impl LazyNccl {
    /// Starts creating the communicator on a background thread.
    pub(crate) fn start(
        id: UniqueId,
        rank: usize,
        world: usize,
        device: usize,
        trace: Trace,
        watchdog: Watchdog,
        timeout: std::time::Duration,
    ) -> Self {
        let in_flight = InFlight::begin();
        let handle = std::thread::Builder::new()
            .name("hasten-nccl-init".into())
            .spawn(move || {
                let _in_flight = in_flight;
                Nccl::new(id, rank, world, device, &trace)
            });
        let slot = match handle {
            Ok(h) => Slot::Starting(h),
            Err(e) => Slot::Failed(format!("could not start the NCCL thread: {e}")),
        };
        LazyNccl {
            slot,
            agreed: false,
            watchdog,
            timeout,
        }
    }

    fn settle(&mut self, block: bool) {
        if let Slot::Starting(h) = &self.slot {
            if !block && !h.is_finished() {
                return;
            }
        } else {
            return;
        }
        let Slot::Starting(h) = std::mem::replace(&mut self.slot, Slot::Empty) else {
            return;
        };
        self.slot = match h.join() {
            Ok(Ok(n)) => Slot::Ready(n),
            Ok(Err(e)) => Slot::Failed(e.to_string()),
            Err(_) => Slot::Failed("the NCCL thread panicked".into()),
        };
    }

    /// True when this rank's communicator is ready (without waiting).
    pub(crate) fn ready_now(&mut self) -> bool {
        self.settle(false);
        matches!(self.slot, Slot::Ready(_))
    }

    /// True once every rank has voted that its communicator is ready.
    pub(crate) fn agreed(&self) -> bool {
        self.agreed
    }

    /// Records the outcome of a vote.
    pub(crate) fn set_agreed(&mut self) {
        self.agreed = true;
    }

    /// The communicator, waiting for it if it is still being created (at most the collective timeout:
    /// its creation needs every rank), and the watchdog over its collectives.
    pub(crate) fn wait_with_watchdog(&mut self) -> Result<(&mut Nccl, &Watchdog)> {
        let deadline = std::time::Instant::now() + self.timeout;
        while !self.ready_now() && matches!(self.slot, Slot::Starting(_)) {
            if std::time::Instant::now() >= deadline {
                return Err(Error::CollectiveTimeout {
                    op: "nccl init",
                    seq: 0,
                    waited_s: self.timeout.as_secs_f64(),
                    missing: Vec::new(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.wait()?;
        let Slot::Ready(nccl) = &mut self.slot else {
            unreachable!("wait() returned a communicator")
        };
        Ok((nccl, &self.watchdog))
    }

    /// The communicator, waiting for it if it is still being created.
    pub(crate) fn wait(&mut self) -> Result<&mut Nccl> {
        self.settle(true);
        match &mut self.slot {
            Slot::Ready(n) => Ok(n),
            Slot::Failed(e) => Err(Error::Collective {
                op: "nccl init",
                detail: e.clone(),
            }),
            Slot::Starting(_) | Slot::Empty => Err(Error::Collective {
                op: "nccl init",
                detail: "the communicator is not available".into(),
            }),
        }
    }

    /// The communicator if it is ready, for tear-down.
    pub(crate) fn ready_mut(&mut self) -> Option<&mut Nccl> {
        match &mut self.slot {
            Slot::Ready(n) => Some(n),
            _ => None,
        }
    }
}
