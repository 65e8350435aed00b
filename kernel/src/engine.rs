//! The evcxr engine, on a thread of its own: it owns the `CommandContext` (and through it the runner
//! process that keeps the notebook's variables), runs cells, completes and inspects code.

use crate::code::{self, Magic};
use crate::iopub::Publisher;
use crate::output::{self, CellContext, FlushRequest};
use crate::session::SessionPaths;
use evcxr::{CommandContext, CompilationError, EvalContext, EvalOutputs};
use jupyter_protocol::JupyterMessage;
use rustix::process::{Pid, Signal};
use std::collections::BTreeMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;
use tokio::sync::oneshot;

/// How a cell ended.
#[derive(Debug, Default)]
pub struct CellOutcome {
    /// The value of the cell's last expression, by MIME type.
    pub result: BTreeMap<String, String>,
    /// The error shown for the cell, if it failed.
    pub error: Option<CellError>,
}

/// Jupyter's error triple.
#[derive(Debug, Clone)]
pub struct CellError {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

impl CellError {
    fn new(ename: &str, evalue: impl Into<String>, traceback: Vec<String>) -> Self {
        CellError {
            ename: ename.to_owned(),
            evalue: evalue.into(),
            traceback,
        }
    }
}

/// Completions in the cell's own character positions.
#[derive(Debug, Default)]
pub struct CompletionOutcome {
    pub matches: Vec<String>,
    pub cursor_start: usize,
    pub cursor_end: usize,
}

enum Request {
    Execute {
        code: String,
        parent: Box<JupyterMessage>,
        reply: oneshot::Sender<CellOutcome>,
    },
    Complete {
        code: String,
        cursor: usize,
        reply: oneshot::Sender<CompletionOutcome>,
    },
    Inspect {
        code: String,
        cursor: usize,
        reply: oneshot::Sender<Option<(String, String)>>,
    },
}

/// The server's handle on the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Request>,
    runner: Arc<Mutex<Option<Arc<Mutex<Child>>>>>,
    interrupted: Arc<AtomicBool>,
}

/// Brought into every notebook: hasten, its launcher, and the kernel's display helpers.
fn prelude(paths: &SessionPaths) -> String {
    format!(
        ":dep hasten = {{ path = {runtime:?} }}\n\
         :dep hasten_launch = {{ path = {launcher:?} }}\n\
         :dep hasten_kernel_io = {{ path = {kernel_io:?} }}\n\
         use hasten::prelude::*;\n\
         use hasten_launch::{{NotebookLauncher, debug_launcher, notebook_launcher}};\n\
         use hasten_kernel_io::{{clear_output, display}};\n",
        runtime = paths.source.join("runtime").display().to_string(),
        launcher = paths.source.join("launcher").display().to_string(),
        kernel_io = paths.source.join("kernel").join("io").display().to_string(),
    )
}

impl Engine {
    /// Starts the engine thread. It builds the evcxr context and the prelude right away (in the
    /// background: the kernel answers kernel_info meanwhile); cells wait for it.
    pub fn start(paths: SessionPaths, iopub: Publisher, cell: CellContext) -> Engine {
        let (tx, rx) = mpsc::channel();
        let runner = Arc::new(Mutex::new(None));
        let interrupted = Arc::new(AtomicBool::new(false));
        let engine = Engine {
            tx,
            runner: runner.clone(),
            interrupted: interrupted.clone(),
        };
        std::thread::Builder::new()
            .name("hasten-kernel-engine".into())
            .spawn(move || engine_thread(paths, iopub, cell, rx, runner, interrupted))
            .expect("spawning the engine thread");
        engine
    }

    /// Runs a cell; the outcome comes when it has ended and its output has been published.
    pub async fn execute(&self, code: String, parent: &JupyterMessage) -> CellOutcome {
        let (reply, rx) = oneshot::channel();
        let request = Request::Execute {
            code,
            parent: Box::new(parent.clone()),
            reply,
        };
        if self.tx.send(request).is_err() {
            return engine_gone();
        }
        rx.await.unwrap_or_else(|_| engine_gone())
    }

    /// Completions at `cursor` (a character position).
    pub async fn complete(&self, code: String, cursor: usize) -> CompletionOutcome {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Request::Complete {
            code,
            cursor,
            reply,
        });
        rx.await.unwrap_or_default()
    }

    /// `(plain text, html)` about the expression before `cursor`, when evcxr knows it.
    pub async fn inspect(&self, code: String, cursor: usize) -> Option<(String, String)> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Request::Inspect {
            code,
            cursor,
            reply,
        });
        rx.await.ok().flatten()
    }

    /// Sends SIGINT to the runner. A `notebook_launcher` running there stops its ranks and returns
    /// `Interrupted`; plain code in the runner dies with it, and evcxr starts a new runner.
    pub fn interrupt(&self) {
        // Set before the signal: the cell may end (and read the flag) as soon as the runner dies.
        self.interrupted.store(true, Ordering::SeqCst);
        self.signal(Signal::INT);
    }

    /// Sends `signal` to the runner, if it is running.
    pub fn signal(&self, signal: Signal) {
        let runner = self
            .runner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(child) = runner {
            let pid = child.lock().unwrap_or_else(|e| e.into_inner()).id();
            // A runner that has already ended has nothing left to stop.
            if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }
}

fn engine_gone() -> CellOutcome {
    CellOutcome {
        result: BTreeMap::new(),
        error: Some(CellError::new(
            "KernelError",
            "the kernel's engine thread is gone; restart the kernel",
            vec![],
        )),
    }
}

struct Running {
    ctx: CommandContext,
    flush: crossbeam_channel::Sender<FlushRequest>,
}

fn start_context(
    paths: &SessionPaths,
    iopub: &Publisher,
    cell: &CellContext,
    runner: &Mutex<Option<Arc<Mutex<Child>>>>,
) -> Result<Running, String> {
    let started = Instant::now();
    let (mut eval, outputs) = EvalContext::new()
        .map_err(|e| format!("starting evcxr: {}", crate::diagnose::describe(&e)))?;
    let flush = output::spawn(outputs.stdout, outputs.stderr, cell.clone(), iopub.clone());
    let mut state = eval.state();
    state.set_offline_mode(true);
    // Compiled dependencies live in one build directory shared by every kernel (see session.rs), and
    // our rustc wrapper keeps each kernel's cells apart.
    let shared = paths.shared_build.display().to_string();
    state.set_build_env("CARGO_BUILD_BUILD_DIR", &shared);
    if let Ok(exe) = std::env::current_exe() {
        state.set_build_env("RUSTC_WRAPPER", &exe.display().to_string());
        let session = paths.session_dir.display().to_string();
        state.set_build_env(crate::session::RUSTC_WRAPPER_VAR, &session);
    }
    if let Some(libtorch) = &paths.libtorch {
        state.set_build_env("LIBTORCH", &libtorch.display().to_string());
    }
    eval.eval_with_state("", state)
        .map_err(|e| format!("configuring evcxr: {}", crate::diagnose::describe(&e)))?;
    paths.seed_lock_file();
    *runner.lock().unwrap_or_else(|e| e.into_inner()) = Some(eval.process_handle());
    let mut ctx = CommandContext::with_eval_context(eval);
    ctx.execute(&prelude(paths))
        .map_err(|e| crate::diagnose::prelude_failure(paths, &e))?;
    if std::env::var_os("HASTEN_KERNEL_VERBOSE").is_some() {
        eprintln!(
            "hasten-kernel: engine ready in {:.2?} (slot {})",
            started.elapsed(),
            paths.slot
        );
    }
    Ok(Running { ctx, flush })
}

fn engine_thread(
    paths: SessionPaths,
    iopub: Publisher,
    cell: CellContext,
    rx: mpsc::Receiver<Request>,
    runner: Arc<Mutex<Option<Arc<Mutex<Child>>>>>,
    interrupted: Arc<AtomicBool>,
) {
    let mut running = start_context(&paths, &iopub, &cell, &runner);
    if let Err(e) = &running {
        eprintln!("hasten-kernel: {e}");
    }
    for request in rx {
        match request {
            Request::Execute {
                code,
                parent,
                reply,
            } => {
                let outcome = match &mut running {
                    Ok(r) => {
                        interrupted.store(false, Ordering::SeqCst);
                        cell.begin(&parent);
                        let result = run_cell(&mut r.ctx, &code);
                        let (ack, done) = crossbeam_channel::bounded(1);
                        if r.flush.send(ack).is_ok() {
                            let _ = done.recv();
                        }
                        outcome(result, &code, &cell, interrupted.load(Ordering::SeqCst))
                    }
                    Err(e) => CellOutcome {
                        result: BTreeMap::new(),
                        error: Some(CellError::new("KernelError", e.clone(), vec![e.clone()])),
                    },
                };
                let _ = reply.send(outcome);
            }
            Request::Complete {
                code,
                cursor,
                reply,
            } => {
                let mut out = CompletionOutcome::default();
                if let Ok(r) = &mut running {
                    let at = code::char_to_byte(&code, cursor);
                    if let Ok(found) = r.ctx.completions(&code, at) {
                        out.cursor_start = code::byte_to_char(&code, found.start_offset);
                        out.cursor_end = code::byte_to_char(&code, found.end_offset);
                        out.matches = found.completions.into_iter().map(|c| c.code).collect();
                    }
                }
                let _ = reply.send(out);
            }
            Request::Inspect {
                code,
                cursor,
                reply,
            } => {
                let found = match &mut running {
                    Ok(r) => {
                        let at = code::char_to_byte(&code, cursor);
                        // Inspect the identifier the cursor is in, up to its end.
                        let end = code[at..]
                            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                            .map_or(code.len(), |n| at + n);
                        r.ctx
                            .hover_at(&code, end)
                            .ok()
                            .filter(|(plain, _)| !plain.trim().is_empty())
                    }
                    Err(_) => None,
                };
                let _ = reply.send(found);
            }
        }
    }
}

fn run_cell(ctx: &mut CommandContext, code: &str) -> Result<EvalOutputs, evcxr::Error> {
    match code::magic(code) {
        Some(Magic::Code(rust)) => ctx.execute(&rust),
        Some(Magic::Usage(message)) => Err(evcxr::Error::Message(message)),
        None => ctx.execute(code),
    }
}

/// The message of the last panic in what the cell wrote to stderr (the line after "panicked at").
fn panic_message(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    match lines.iter().rposition(|l| l.contains("panicked at")) {
        Some(at) => match lines.get(at + 1) {
            Some(message) if !message.starts_with("note:") => (*message).to_owned(),
            _ => lines[at].to_owned(),
        },
        None => "the cell panicked".to_owned(),
    }
}

/// The first line of the error a cell's `?` printed: the stderr that follows the last line relayed from
/// a rank (or the launcher's banner), so a failed launch reads "rank 1 failed: …".
fn user_error_message(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    let after = lines
        .iter()
        .rposition(|l| l.starts_with("[rank") || l.starts_with("Launching "))
        .map_or(0, |i| i + 1);
    lines[after.min(lines.len())..]
        .iter()
        .find(|l| !l.trim().is_empty())
        .map_or_else(
            || "the cell returned an error".to_owned(),
            |l| (*l).to_owned(),
        )
}

fn outcome(
    result: Result<EvalOutputs, evcxr::Error>,
    code: &str,
    cell: &CellContext,
    interrupted: bool,
) -> CellOutcome {
    let log = cell.log();
    let error = match result {
        Ok(outputs) => {
            if log.panicked {
                let message = panic_message(&log.stderr);
                Some(CellError::new(
                    "Panic",
                    message.clone(),
                    vec![format!("panicked: {message}")],
                ))
            } else if log.user_error {
                let message = user_error_message(&log.stderr);
                Some(CellError::new(
                    "Error",
                    message.clone(),
                    vec![format!("Error: {message}")],
                ))
            } else {
                return CellOutcome {
                    result: outputs.content_by_mime_type.into_iter().collect(),
                    error: None,
                };
            }
        }
        Err(evcxr::Error::CompilationErrors(errors)) => {
            let mut traceback: Vec<String> = errors
                .iter()
                .map(|e| render_compile_error(e, code))
                .collect();
            let mut first = errors.first().map(|e| e.message()).unwrap_or_default();
            if first.trim().is_empty() {
                first = crate::diagnose::describe(&evcxr::Error::CompilationErrors(errors));
                traceback.push(first.clone());
            }
            Some(CellError::new("CompilationError", first, traceback))
        }
        Err(evcxr::Error::SubprocessTerminated(message)) => {
            let evalue = if interrupted {
                "Interrupted: the cell was running in the notebook's Rust process, which had to be \
                 restarted to stop it, so the notebook's variables are gone (its functions, types, \
                 :dep and use lines remain). An interrupt during notebook_launcher stops the ranks \
                 and keeps the variables."
                    .to_owned()
            } else {
                format!(
                    "the notebook's Rust process ended ({}); a new one was started: variables are \
                     gone, functions, types, :dep and use lines remain",
                    match message.trim() {
                        "" => "evcxr gave no reason",
                        reason => reason,
                    }
                )
            };
            Some(CellError::new(
                "RunnerRestarted",
                evalue.clone(),
                vec![evalue],
            ))
        }
        Err(other) => {
            let message = crate::diagnose::describe(&other);
            Some(CellError::new("Error", message.clone(), vec![message]))
        }
    };
    CellOutcome {
        result: BTreeMap::new(),
        error,
    }
}

/// rustc's diagnostic in rustc's own layout, pointing into the cell's lines.
pub fn render_compile_error(error: &CompilationError, cell: &str) -> String {
    let mut out = match error.code() {
        Some(code) => format!("error[{code}]: {}", error.message()),
        None => format!("{}: {}", error.level(), error.message()),
    };
    let lines: Vec<&str> = cell.lines().collect();
    for spanned in error.spanned_messages() {
        let Some(span) = &spanned.span else {
            continue;
        };
        let width = span.end_line.to_string().len();
        out.push_str(&format!(
            "\n{:width$}--> cell:{}:{}\n{:width$} |",
            "", span.start_line, span.start_column, ""
        ));
        for line_no in span.start_line..=span.end_line {
            let text = lines.get(line_no - 1).copied().unwrap_or_default();
            out.push_str(&format!("\n{line_no:>width$} | {text}"));
            let from = if line_no == span.start_line {
                span.start_column
            } else {
                1
            };
            let to = if line_no == span.end_line {
                span.end_column
            } else {
                text.chars().count() + 1
            };
            let marks = "^".repeat(to.saturating_sub(from).max(1));
            out.push_str(&format!(
                "\n{:width$} | {}{marks}",
                "",
                " ".repeat(from - 1)
            ));
            if line_no == span.end_line && !spanned.label.is_empty() {
                out.push_str(&format!(" {}", spanned.label));
            }
        }
    }
    for help in error.help() {
        out.push_str(&format!("\nhelp: {help}"));
    }
    if let Some(hint) = error.evcxr_extra_hint() {
        out.push_str(&format!("\nnote: {hint}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_found_in_stderr() {
        let stderr =
            "noise\nthread '<unnamed>' panicked at src/lib.rs:3:5:\nboom\nnote: run with\n";
        assert_eq!(panic_message(stderr), "boom");
        assert_eq!(panic_message(""), "the cell panicked");
    }

    #[test]
    fn user_errors_are_read_after_the_ranks_output() {
        let stderr = "Launching training on 2 CPUs.\n[rank1]: boom\nrank 1 failed: boom\nlast lines:\n  boom\n";
        assert_eq!(user_error_message(stderr), "rank 1 failed: boom");
        assert_eq!(user_error_message("bad input\n"), "bad input");
    }
}
