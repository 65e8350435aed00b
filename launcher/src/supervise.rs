//! Supervising a group of workers: relay their output, notice the first failure, stop the rest within
//! seconds, and reap every process so none is left behind.

use crate::relay::{
    End, Event, LinePrefix, OutputSink, QUEUE_DEPTH, Stream, spawn_reader, spawn_status_reader,
};
use crate::{LaunchError, Result};
use rustix::process::{Pid, Signal, WaitOptions};
use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long stopped workers get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(2);
/// How many of a rank's last lines an error report carries.
const TAIL_LINES: usize = 20;

/// A started worker: its pid (also its process group) and the read ends of its output pipes.
pub(crate) struct Worker {
    pub rank: usize,
    pub local_rank: usize,
    pub pid: libc::pid_t,
    pub stdout: File,
    pub stderr: File,
    /// A forked worker's status pipe: a 0 byte then its payload means "finished successfully".
    pub status: Option<File>,
}

/// Status byte a forked worker writes first when its function succeeded.
pub(crate) const STATUS_OK: u8 = 0;

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn from_status(status: rustix::process::WaitStatus) -> Exit {
        match status.terminating_signal() {
            Some(signal) => Exit::Signal(signal),
            None => Exit::Code(status.exit_status().unwrap_or(0)),
        }
    }

    fn success(self) -> bool {
        self == Exit::Code(0)
    }

    fn shell_code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// The first panic message a rank printed, kept apart from its tail: a long backtrace would push it out.
#[derive(Default, Clone)]
struct PanicNote {
    text: Option<String>,
    wants_message: bool,
}

impl PanicNote {
    fn observe(&mut self, line: &str) {
        if self.wants_message {
            if let Some(t) = self.text.as_mut() {
                t.push(' ');
                t.push_str(line.trim());
            }
            self.wants_message = false;
        } else if self.text.is_none() {
            if let Some(at) = line.find("panicked at") {
                // "thread 'main' (123) panicked at src/x.rs:1:2:" and, since Rust 1.73, the message on the
                // next line; older formats put it on the same line.
                self.text = Some(line[at..].trim_end().to_owned());
                self.wants_message = line.trim_end().ends_with(':');
            }
        }
    }
}

/// A human description of a failure.
fn describe(exit: Exit, panic: &PanicNote) -> String {
    match (exit, &panic.text) {
        (_, Some(p)) => p.clone(),
        (Exit::Code(c), None) => format!("exited with code {c}"),
        (Exit::Signal(s), None) => format!("killed by signal {s} ({})", signal_name(s)),
    }
}

/// Sends `sig` to the worker's process group; errors (already gone) are harmless.
fn signal_group(pid: libc::pid_t, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

/// Waits for our child `pid` to end (`wait`) or only asks whether it has: `Ok(Some(exit))` once it
/// has, `Ok(None)` while it runs, `Err` when it is not our child (any more).
fn reap(pid: libc::pid_t, wait: bool) -> std::io::Result<Option<Exit>> {
    let Some(pid) = Pid::from_raw(pid) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    let options = if wait {
        WaitOptions::empty()
    } else {
        WaitOptions::NOHANG
    };
    match rustix::process::waitpid(Some(pid), options) {
        Ok(Some((_, status))) => Ok(Some(Exit::from_status(status))),
        Ok(None) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Stops every worker now (SIGKILL to each process group) and reaps them; used when a launch is
/// abandoned half-way (a rank failed to start).
pub(crate) fn kill_and_reap(pids: &[libc::pid_t]) {
    for &pid in pids {
        signal_group(pid, Signal::KILL);
    }
    for &pid in pids {
        let _ = reap(pid, true);
    }
}

/// Runs the group to completion. Returns every worker's status bytes (forked workers) when every rank
/// succeeded; otherwise stops the others and returns the first failure. `stop` (set by a signal handler
/// or an interrupt) stops everyone too.
///
/// A forked worker that reported success and closed its output is done: the caller gets its result
/// while the process is still tearing down its CUDA context (about 0.15 s on an H200), and a reaper
/// thread collects it.
pub(crate) fn supervise(
    workers: Vec<Worker>,
    sink: &dyn OutputSink,
    prefix: &LinePrefix,
    stop: &AtomicBool,
) -> Result<Vec<Option<Vec<u8>>>> {
    let n = workers.len();
    let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
    let mut pids = Vec::with_capacity(n);
    let mut prefixes = Vec::with_capacity(n);
    let mut ranks = Vec::with_capacity(n);
    // Per worker: stdout, stderr and, where there is one, the status pipe. A worker is finished with
    // only when all are read to the end — its exit alone can come before its result reaches us.
    let mut open_pipes = Vec::with_capacity(n);
    for (index, w) in workers.into_iter().enumerate() {
        spawn_reader(index, Stream::Stdout, w.stdout, tx.clone());
        spawn_reader(index, Stream::Stderr, w.stderr, tx.clone());
        open_pipes.push(2 + usize::from(w.status.is_some()));
        if let Some(status) = w.status {
            spawn_status_reader(index, status, tx.clone());
        }
        pids.push(w.pid);
        prefixes.push(prefix.render(w.rank, w.local_rank));
        ranks.push(w.rank);
    }
    drop(tx);

    let mut statuses: Vec<Option<Vec<u8>>> = vec![None; n];
    let mut exits: Vec<Option<Exit>> = vec![None; n];
    let mut tails: Vec<VecDeque<String>> = vec![VecDeque::new(); n];
    let mut panics: Vec<PanicNote> = vec![PanicNote::default(); n];
    let mut first_failure: Option<(usize, Exit)> = None;
    let mut interrupted = false;
    let mut term_sent: Option<Instant> = None;
    let mut killed = false;
    let mut all_exited_at: Option<Instant> = None;

    loop {
        // Relay whatever output is ready, waiting a little when there is none.
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(event) => {
                let mut next = Some(event);
                // A bounded batch, so that a rank printing without pause cannot keep the loop from
                // noticing exits and stop requests.
                let mut budget = 4 * QUEUE_DEPTH;
                while let Some(ev) = next {
                    match ev {
                        Event::Line {
                            index,
                            stream,
                            text,
                            end,
                        } => {
                            let prefixed = format!("{}{}", prefixes[index], text);
                            match end {
                                End::Newline => sink.line(stream, &prefixed),
                                End::Return | End::Partial => sink.progress(stream, &prefixed),
                            }
                            // A partial piece comes again whole once it ends: only whole ones are
                            // remembered. The panic hook writes to stderr; stdout's lines come
                            // through another thread and may arrive between its two lines.
                            if end != End::Partial {
                                if matches!(stream, Stream::Stderr) {
                                    panics[index].observe(&text);
                                }
                                let tail = &mut tails[index];
                                if tail.len() == TAIL_LINES {
                                    tail.pop_front();
                                }
                                tail.push_back(text);
                            }
                        }
                        Event::Eof { index } => open_pipes[index] -= 1,
                        Event::Status { index, bytes } => {
                            statuses[index] = Some(bytes);
                            open_pipes[index] -= 1;
                        }
                    }
                    budget -= 1;
                    next = if budget == 0 {
                        None
                    } else {
                        rx.try_recv().ok()
                    };
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open_pipes.iter_mut().for_each(|p| *p = 0),
        }

        for (i, &pid) in pids.iter().enumerate() {
            if exits[i].is_some() {
                continue;
            }
            match reap(pid, false) {
                Ok(Some(exit)) => {
                    exits[i] = Some(exit);
                    if !exit.success() && first_failure.is_none() && term_sent.is_none() {
                        first_failure = Some((i, exit));
                    }
                }
                Ok(None) => {}
                // Not our child any more (reaped elsewhere): treat it as gone.
                Err(_) => exits[i] = Some(Exit::Code(0)),
            }
        }

        if stop.load(Ordering::SeqCst) && !interrupted {
            interrupted = true;
        }
        let must_stop = first_failure.is_some() || interrupted;
        if must_stop && term_sent.is_none() {
            for (i, &pid) in pids.iter().enumerate() {
                if exits[i].is_none() {
                    signal_group(pid, Signal::TERM);
                }
            }
            term_sent = Some(Instant::now());
        }
        if let Some(t) = term_sent {
            if !killed && t.elapsed() >= GRACE {
                for (i, &pid) in pids.iter().enumerate() {
                    if exits[i].is_none() {
                        signal_group(pid, Signal::KILL);
                    }
                }
                killed = true;
            }
        }

        let reported_ok = |i: usize| {
            open_pipes[i] == 0
                && statuses[i]
                    .as_ref()
                    .is_some_and(|b| b.first() == Some(&STATUS_OK))
        };
        // Every rank's output is relayed to the end (its pipes closed) before the caller goes on:
        // a rank that exited early may still have lines in flight.
        if !must_stop
            && (0..n).all(|i| open_pipes[i] == 0 && (exits[i].is_some() || reported_ok(i)))
            && (0..n).any(reported_ok)
        {
            break;
        }
        if exits.iter().all(Option::is_some) {
            let at = *all_exited_at.get_or_insert_with(Instant::now);
            // Wait for the pipes to drain; a grandchild that kept a pipe open cannot hold us past 1 s.
            if open_pipes.iter().all(|p| *p == 0) || at.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
    }
    let exiting: Vec<libc::pid_t> = (0..n)
        .filter(|i| exits[*i].is_none())
        .map(|i| pids[i])
        .collect();
    if !exiting.is_empty() {
        // Workers that reported success are still ending; collect them so none is left a zombie.
        std::thread::Builder::new()
            .name("hasten-reaper".into())
            .spawn(move || {
                for pid in exiting {
                    let _ = reap(pid, true);
                }
            })
            .map(drop)
            .unwrap_or_else(|e| eprintln!("hasten: could not start the reaper thread: {e}"));
    }
    // Leftover processes in the workers' groups (grandchildren) go too.
    for &pid in &pids {
        signal_group(pid, Signal::KILL);
    }

    if let Some((i, exit)) = first_failure {
        return Err(LaunchError::RankFailed {
            rank: ranks[i],
            cause: describe(exit, &panics[i]),
            last_lines: tails[i].iter().cloned().collect(),
            exit_code: exit.shell_code(),
        });
    }
    if interrupted {
        return Err(LaunchError::Interrupted);
    }
    Ok(statuses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_described() {
        let mut note = PanicNote::default();
        for line in [
            "step 3",
            "thread 'main' (77) panicked at examples/fault.rs:12:9:",
            "rank 1 gives up",
            "stack backtrace:",
            "thread 'other' panicked at later.rs:1:1:",
        ] {
            note.observe(line);
        }
        assert_eq!(
            describe(Exit::Code(101), &note),
            "panicked at examples/fault.rs:12:9: rank 1 gives up"
        );
        let mut old_style = PanicNote::default();
        old_style.observe("thread 'main' panicked at 'boom', src/main.rs:2:5");
        assert_eq!(
            describe(Exit::Code(101), &old_style),
            "panicked at 'boom', src/main.rs:2:5"
        );
        let none = PanicNote::default();
        assert_eq!(describe(Exit::Code(3), &none), "exited with code 3");
        assert_eq!(
            describe(Exit::Signal(9), &none),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(Exit::Signal(9).shell_code(), 137);
    }
}
