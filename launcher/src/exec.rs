//! `hasten launch`: start a program once per rank with its environment, and supervise the group.

use crate::host::PortReservation;
use crate::plan::{FOREIGN_CONTRACT_VARS, LaunchPlan};
use crate::relay::{LinePrefix, OutputSink};
use crate::supervise::{Worker, kill_and_reap, supervise};
use crate::{LaunchError, Result};
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// How a group is run: output prefix, restarts, where output goes.
pub struct RunOptions<'a> {
    /// Restart the whole group this many times after a failure (`--max_restarts`).
    pub max_restarts: u32,
    /// The prefix of relayed lines.
    pub prefix: LinePrefix,
    /// Where relayed lines go.
    pub sink: &'a dyn OutputSink,
    /// Set to stop every rank (a signal handler, an interrupt).
    pub stop: &'a AtomicBool,
}

fn spawn_all(
    plan: &LaunchPlan,
    program: &OsString,
    args: &[OsString],
    listen_fd: Option<RawFd>,
) -> Result<Vec<Worker>> {
    let mut workers: Vec<Worker> = Vec::with_capacity(plan.ranks.len());
    for r in &plan.ranks {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Each rank leads its own process group, so stopping it stops whatever it started.
            .process_group(0);
        for var in FOREIGN_CONTRACT_VARS {
            cmd.env_remove(var);
        }
        cmd.envs(r.env.iter().map(|(k, v)| (k, v)));
        let inherit = listen_fd.filter(|_| r.rank == 0);
        if let Some(fd) = inherit {
            // Rank 0 inherits the reserved listener across exec (other ranks lose it: close-on-exec).
            cmd.env(hasten_core::RDZV_LISTEN_FD_VAR, fd.to_string());
        }
        let parent = rustix::process::getpid();
        // SAFETY: fcntl, prctl and getppid (plain system calls through rustix's Linux backend) are
        // async-signal-safe, as code between fork and exec must be.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = inherit {
                    // SAFETY: the listener stays open in this child until exec; borrowed only here.
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                }
                die_with_parent(parent)
            });
        }
        let spawned = cmd.spawn().and_then(|mut child| {
            let pid = libc::pid_t::try_from(child.id()).map_err(std::io::Error::other)?;
            let take = |fd: Option<OwnedFd>| {
                fd.map(File::from)
                    .ok_or_else(|| std::io::Error::other("no pipe"))
            };
            let stdout = take(child.stdout.take().map(OwnedFd::from))?;
            let stderr = take(child.stderr.take().map(OwnedFd::from))?;
            Ok(Worker {
                rank: r.rank,
                local_rank: r.local_rank,
                pid,
                stdout,
                stderr,
                status: None,
            })
        });
        match spawned {
            Ok(w) => workers.push(w),
            Err(source) => {
                kill_and_reap(&workers.iter().map(|w| w.pid).collect::<Vec<_>>());
                return Err(LaunchError::Spawn {
                    rank: r.rank,
                    program: program.to_string_lossy().into_owned(),
                    source,
                });
            }
        }
    }
    Ok(workers)
}

/// Runs `program args` on every rank of `plan`; returns when all ranks exit 0, or with the first
/// failure after stopping the rest (restarting the group up to `max_restarts` times first). `reserved`,
/// from [`crate::resolve_port`], is handed to rank 0 as its already-listening rendezvous socket.
pub fn run_program(
    plan: &LaunchPlan,
    program: &OsString,
    args: &[OsString],
    opts: &RunOptions<'_>,
    reserved: Option<PortReservation>,
) -> Result<()> {
    let mut reserved = reserved;
    let mut restarts = 0;
    loop {
        let listen_fd = reserved.as_ref().map(PortReservation::fd);
        let spawned = spawn_all(plan, program, args, listen_fd);
        // Rank 0 owns the listener now; a restart binds the port by number.
        drop(reserved.take());
        let workers = spawned?;
        let outcome = supervise(workers, opts.sink, &opts.prefix, opts.stop);
        // A rank 0 killed while setting up shared memory leaves its segment: remove what died with it.
        hasten_core::sweep_stale_shm_segments();
        match outcome {
            Err(LaunchError::RankFailed { rank, cause, .. })
                if restarts < opts.max_restarts && !opts.stop.load(Ordering::SeqCst) =>
            {
                restarts += 1;
                opts.sink.note(&format!(
                    "hasten: rank {rank} failed ({cause}); restarting the group ({restarts}/{})",
                    opts.max_restarts
                ));
            }
            other => return other.map(drop),
        }
    }
}

/// In a freshly forked rank: dies with the launcher (SIGKILL when the launcher's thread that started
/// it ends, e.g. `kill -9` of the launcher), so no rank outlives its job. A launcher already gone before
/// this ran is caught by comparing the parent. Async-signal-safe.
pub(crate) fn die_with_parent(parent: rustix::process::Pid) -> std::io::Result<()> {
    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
    // Both are plain system calls (rustix's Linux backend), so this stays async-signal-safe.
    set_parent_process_death_signal(Some(Signal::KILL))?;
    if getppid() != Some(parent) {
        // SAFETY: ends this freshly forked child at once, running nothing of the parent's state.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}
