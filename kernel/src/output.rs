//! The forwarder: turns what the runner writes (decoded with `hasten_kernel_io`) into iopub
//! messages for the cell that is running, live, and keeps what the kernel needs to report a panic.

use crate::iopub::Publisher;
use crossbeam_channel::{Receiver, Sender, select};
use hasten_kernel_io::{KernelLine, parse_line};
use jupyter_protocol::{ClearOutput, DisplayData, JupyterMessage, Media, StreamContent};
use std::sync::{Arc, Mutex};

/// What the current cell did besides printing, read by the engine when the cell ends.
#[derive(Debug, Default, Clone)]
pub struct CellLog {
    /// The cell panicked.
    pub panicked: bool,
    /// The cell ended through `?` with an error.
    pub user_error: bool,
    /// Everything the cell wrote to stderr (the panic or error message is in there).
    pub stderr: String,
}

/// Shared between the engine (which sets the parent and reads the log) and the forwarder thread.
#[derive(Clone, Default)]
pub struct CellContext {
    parent: Arc<Mutex<Option<JupyterMessage>>>,
    log: Arc<Mutex<CellLog>>,
}

impl CellContext {
    /// Starts a cell: its output goes to `parent`'s front end.
    pub fn begin(&self, parent: &JupyterMessage) {
        *self.parent.lock().unwrap_or_else(|e| e.into_inner()) = Some(parent.clone());
        *self.log.lock().unwrap_or_else(|e| e.into_inner()) = CellLog::default();
    }

    /// What the cell did.
    pub fn log(&self) -> CellLog {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn parent(&self) -> Option<JupyterMessage> {
        self.parent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How much of a cell's stderr is kept for reporting its panic or error (the end, where those are).
const STDERR_KEPT: usize = 64 * 1024;
/// Output is published in messages of at most about this many bytes, so a cell that prints without
/// pause streams instead of gathering everything it prints into one message.
const BATCH_BYTES: usize = 64 * 1024;

/// Keeps the last `keep` bytes of `text` (or a little more, to stay on a character boundary).
fn keep_tail(text: &mut String, keep: usize) {
    if text.len() > 2 * keep {
        let mut cut = text.len() - keep;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.drain(..cut);
    }
}

/// Gives the memory a cell's output passed through back to the system: glibc keeps freed heap for
/// reuse, which left the kernel hundreds of MB larger for good after a cell printed a lot.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Asks the forwarder to publish everything received so far, and answers when done.
pub type FlushRequest = Sender<()>;

/// Bytes of one stream, decoded as UTF-8 across chunk boundaries.
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Decodes what can be decoded; an incomplete character at the end waits for the next chunk.
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..good]));
                    match e.error_len() {
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

struct Forwarder {
    ctx: CellContext,
    iopub: Publisher,
    stdout: Utf8Stream,
    stderr: Utf8Stream,
    /// Text not yet published, with its stream (consecutive chunks of one stream become one message).
    batch: Option<(bool, String)>,
}

impl Forwarder {
    fn text(&mut self, is_stderr: bool, text: String) {
        if text.is_empty() {
            return;
        }
        if is_stderr {
            let mut log = self.ctx.log.lock().unwrap_or_else(|e| e.into_inner());
            log.stderr.push_str(&text);
            keep_tail(&mut log.stderr, STDERR_KEPT);
        }
        match &mut self.batch {
            Some((stream, buf)) if *stream == is_stderr => buf.push_str(&text),
            _ => {
                self.publish_batch();
                self.batch = Some((is_stderr, text));
            }
        }
        if self
            .batch
            .as_ref()
            .is_some_and(|(_, buf)| buf.len() >= BATCH_BYTES)
        {
            self.publish_batch();
        }
    }

    fn publish_batch(&mut self) {
        let Some((is_stderr, text)) = self.batch.take() else {
            return;
        };
        let content = if is_stderr {
            StreamContent::stderr(&text)
        } else {
            StreamContent::stdout(&text)
        };
        self.publish(content.into());
    }

    fn publish(&self, content: jupyter_protocol::JupyterMessageContent) {
        let message = match self.ctx.parent() {
            Some(parent) => JupyterMessage::new(content, Some(&parent)),
            None => JupyterMessage::new(content, None),
        };
        self.iopub.send(message);
    }

    fn line(&mut self, line: &str, from_stderr_pipe: bool) {
        match parse_line(line) {
            KernelLine::Stdout(bytes) => {
                let text = self.stdout.push(&bytes);
                self.text(false, text);
            }
            KernelLine::Stderr(bytes) => {
                let text = self.stderr.push(&bytes);
                self.text(true, text);
            }
            KernelLine::Plain(text) => self.text(from_stderr_pipe, format!("{text}\n")),
            KernelLine::Display { mime, data } => {
                self.publish_batch();
                let media: Media =
                    serde_json::from_value(serde_json::json!({ mime: data })).unwrap_or_default();
                self.publish(DisplayData::new(media).into());
            }
            KernelLine::Clear { wait } => {
                self.publish_batch();
                self.publish(ClearOutput { wait }.into());
            }
            KernelLine::Panic => {
                self.ctx
                    .log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .panicked = true
            }
            KernelLine::UserError => {
                self.ctx
                    .log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .user_error = true
            }
        }
    }

    fn flush(&mut self) {
        let rest = self.stdout.finish();
        self.text(false, rest);
        let rest = self.stderr.finish();
        self.text(true, rest);
        self.publish_batch();
    }
}

/// Starts the forwarder thread over evcxr's stdout and stderr line channels.
pub fn spawn(
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    ctx: CellContext,
    iopub: Publisher,
) -> Sender<FlushRequest> {
    let (flush_tx, flush_rx) = crossbeam_channel::unbounded::<FlushRequest>();
    std::thread::Builder::new()
        .name("hasten-kernel-output".into())
        .spawn(move || {
            let mut f = Forwarder {
                ctx,
                iopub,
                stdout: Utf8Stream::default(),
                stderr: Utf8Stream::default(),
                batch: None,
            };
            loop {
                select! {
                    recv(stdout) -> line => match line {
                        Ok(line) => f.line(&line, false),
                        Err(_) => return,
                    },
                    recv(stderr) -> line => match line {
                        Ok(line) => f.line(&line, true),
                        Err(_) => return,
                    },
                    recv(flush_rx) -> ack => {
                        // Whatever evcxr has already queued belongs to the cell that just ended.
                        while let Ok(line) = stdout.try_recv() {
                            f.line(&line, false);
                        }
                        while let Ok(line) = stderr.try_recv() {
                            f.line(&line, true);
                        }
                        f.flush();
                        release_freed_memory();
                        if let Ok(ack) = ack {
                            let _ = ack.send(());
                        }
                        continue;
                    },
                }
                // Publish once nothing more is waiting: fast output is batched, slow output is live.
                if stdout.is_empty() && stderr.is_empty() {
                    f.publish_batch();
                }
            }
        })
        .expect("spawning the output thread");
    flush_tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_stderr_is_the_end_and_bounded() {
        let mut text = "é".repeat(100);
        keep_tail(&mut text, 10);
        assert!(text.len() <= 12 && text.len() >= 10, "{}", text.len());
        assert!(text.chars().all(|c| c == 'é'));
        let mut short = String::from("short");
        keep_tail(&mut short, 10);
        assert_eq!(short, "short");
    }

    #[test]
    fn utf8_split_across_chunks_is_reassembled() {
        let mut s = Utf8Stream::default();
        let bytes = "a😀b".as_bytes();
        assert_eq!(s.push(&bytes[..3]), "a");
        assert_eq!(s.push(&bytes[3..]), "😀b");
        assert_eq!(s.push(&[0xff, b'c']), "\u{FFFD}c");
        assert_eq!(s.push(&[0xe2]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }
}
