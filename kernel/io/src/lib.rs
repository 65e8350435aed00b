//! The output path between a notebook's Rust runner process and `hasten-kernel`.
//!
//! evcxr's runner shares one stdout pipe between the program's output and evcxr's own protocol lines
//! (`EVCXR_EXECUTION_COMPLETE`, `EVCXR_BEGIN_CONTENT …`), read line by line. Two things break there: a cell
//! whose last output has no trailing newline glues the completion marker onto that output, so the kernel
//! never sees the marker and the cell hangs; and output reaches the notebook only a line at a time.
//!
//! [`capture_runner_output`] (called by the kernel binary when it starts as the runner) moves the
//! process's stdout and stderr onto pipes read by a relay thread, which cuts protocol lines out of the
//! byte stream wherever they start and sends everything else, as soon as it is read, as encoded chunk
//! lines (`HASTEN_KERNEL out <hex>`) on evcxr's pipe. The kernel decodes them with [`parse_line`].
//! Both sides live here so the format has one definition.
//!
//! Cells use [`display`] and [`clear_output`] for Jupyter's `display_data` and `clear_output`. This
//! crate is the only part of hasten that knows Jupyter's and evcxr's conventions besides the kernel
//! itself: the launcher and the runtime stay front-end agnostic, and a notebook depends on this small
//! crate (libc and data-encoding only) for its display helpers.

use std::io::Write;
use std::os::fd::OwnedFd;

/// Prefix of every line this module adds to evcxr's pipe.
pub const LINE_PREFIX: &str = "HASTEN_KERNEL ";
/// Prefix of evcxr's own protocol lines.
const EVCXR_PREFIX: &str = "EVCXR_";
const BEGIN_CONTENT: &str = "EVCXR_BEGIN_CONTENT";
const END_CONTENT: &str = "EVCXR_END_CONTENT";
const PANIC_NOTIFICATION: &str = "EVCXR_PANIC_NOTIFICATION";
const USER_ERROR_OCCURRED: &str = "EVCXR_ERROR_OCCURRED";

/// One line of the runner's stdout, as the kernel reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelLine {
    /// Bytes the program wrote to stdout (any length, not necessarily whole lines or whole UTF-8).
    Stdout(Vec<u8>),
    /// Bytes the program wrote to stderr.
    Stderr(Vec<u8>),
    /// A rich output for Jupyter's `display_data`.
    Display {
        /// MIME type, e.g. `text/html`.
        mime: String,
        /// The content.
        data: String,
    },
    /// Jupyter's `clear_output`.
    Clear {
        /// Wait for the next output before clearing.
        wait: bool,
    },
    /// The cell panicked (evcxr goes on, dropping the variables the cell made).
    Panic,
    /// The cell returned an error through `?`.
    UserError,
    /// A line that did not pass through the relay (written before it started, say).
    Plain(String),
}

/// Decodes one line read from the runner's stdout.
pub fn parse_line(line: &str) -> KernelLine {
    let Some(rest) = line.strip_prefix(LINE_PREFIX) else {
        return KernelLine::Plain(line.to_owned());
    };
    let mut parts = rest.splitn(3, ' ');
    let kind = parts.next().unwrap_or_default();
    let a = parts.next();
    let b = parts.next();
    let parsed = match (kind, a, b) {
        ("out", Some(hex), None) => from_hex(hex).map(KernelLine::Stdout),
        ("err", Some(hex), None) => from_hex(hex).map(KernelLine::Stderr),
        ("display", Some(mime), Some(hex)) => from_hex(hex).map(|data| KernelLine::Display {
            mime: mime.to_owned(),
            data: String::from_utf8_lossy(&data).into_owned(),
        }),
        ("clear", Some(wait), None) => Some(KernelLine::Clear { wait: wait == "1" }),
        ("panic", None, None) => Some(KernelLine::Panic),
        ("error", None, None) => Some(KernelLine::UserError),
        _ => None,
    };
    parsed.unwrap_or_else(|| KernelLine::Plain(line.to_owned()))
}

fn encode_line(kind: &str, data: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(LINE_PREFIX.len() + kind.len() + 2 + 2 * data.len());
    line.extend_from_slice(LINE_PREFIX.as_bytes());
    line.extend_from_slice(kind.as_bytes());
    line.push(b' ');
    line.extend_from_slice(to_hex(data).as_bytes());
    line.push(b'\n');
    line
}

/// Lower-case hex, as chunk lines carry bytes.
fn to_hex(data: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(data)
}

/// The inverse of [`to_hex`]; None for odd lengths or non-hex digits.
fn from_hex(hex: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(hex.as_bytes())
        .ok()
}

/// Shows `data` as a rich output of type `mime` (`text/html`, `text/markdown`, `image/svg+xml`, …) in the
/// cell that is running. Outside the kernel it prints a line that says so.
pub fn display(mime: &str, data: &str) {
    let mime: String = mime.chars().filter(|c| !c.is_whitespace()).collect();
    let line = encode_line(&format!("display {mime}"), data.as_bytes());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&line).and_then(|_| out.flush());
}

/// Clears the output of the running cell (Jupyter's `clear_output`; with `wait`, when the next output
/// arrives).
pub fn clear_output(wait: bool) {
    let line = format!("{LINE_PREFIX}clear {}\n", u8::from(wait));
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes()).and_then(|_| out.flush());
}

/// A piece of the runner's stdout byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Program output, to be encoded.
    User(Vec<u8>),
    /// A protocol line (evcxr's or ours), passed on as it is, newline included.
    Protocol(Vec<u8>),
}

/// Splits the runner's stdout into program output and protocol lines. Program output is released as
/// soon as it cannot be the start of a protocol line, so partial lines (progress bars) flow live.
#[derive(Debug, Default)]
pub struct StdoutSplitter {
    pending: Vec<u8>,
    in_content: bool,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `data` that is a proper prefix of `token`.
fn partial_suffix(data: &[u8], token: &[u8]) -> usize {
    (1..token.len().min(data.len() + 1))
        .rev()
        .find(|&n| data[data.len() - n..] == token[..n])
        .unwrap_or(0)
}

impl StdoutSplitter {
    /// Feeds bytes read from the pipe; returns what can be forwarded now, in order.
    pub fn push(&mut self, data: &[u8]) -> Vec<Piece> {
        self.pending.extend_from_slice(data);
        let mut pieces = Vec::new();
        loop {
            if self.in_content {
                // Inside evcxr's content block every line is protocol, until its end marker.
                let Some(nl) = self.pending.iter().position(|&b| b == b'\n') else {
                    break;
                };
                let line: Vec<u8> = self.pending.drain(..=nl).collect();
                let text = &line[..line.len() - 1];
                if text == END_CONTENT.as_bytes() || text == PANIC_NOTIFICATION.as_bytes() {
                    self.in_content = false;
                }
                pieces.push(Piece::Protocol(line));
                continue;
            }
            let start = [EVCXR_PREFIX.as_bytes(), LINE_PREFIX.as_bytes()]
                .iter()
                .filter_map(|token| find(&self.pending, token))
                .min();
            match start {
                Some(at) => {
                    if at > 0 {
                        pieces.push(Piece::User(self.pending.drain(..at).collect()));
                    }
                    let Some(nl) = self.pending.iter().position(|&b| b == b'\n') else {
                        break;
                    };
                    let line: Vec<u8> = self.pending.drain(..=nl).collect();
                    if line.starts_with(BEGIN_CONTENT.as_bytes()) {
                        self.in_content = true;
                    }
                    pieces.push(Piece::Protocol(line));
                }
                None => {
                    let keep = partial_suffix(&self.pending, EVCXR_PREFIX.as_bytes())
                        .max(partial_suffix(&self.pending, LINE_PREFIX.as_bytes()));
                    let release = self.pending.len() - keep;
                    if release > 0 {
                        pieces.push(Piece::User(self.pending.drain(..release).collect()));
                    }
                    break;
                }
            }
        }
        pieces
    }
}

/// Encodes a split piece for evcxr's pipe: program output as a chunk line, protocol lines as they are,
/// preceded by our own note when they report a panic or an error (evcxr consumes those silently).
pub fn encode_piece(piece: &Piece) -> Vec<u8> {
    match piece {
        Piece::User(bytes) => encode_line("out", bytes),
        Piece::Protocol(line) => {
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            let note = if text == PANIC_NOTIFICATION.as_bytes() {
                Some("panic")
            } else if text == USER_ERROR_OCCURRED.as_bytes() {
                Some("error")
            } else {
                None
            };
            let mut out = Vec::new();
            if let Some(note) = note {
                out.extend_from_slice(format!("{LINE_PREFIX}{note}\n").as_bytes());
            }
            out.extend_from_slice(line);
            out
        }
    }
}

/// Encodes bytes written to stderr.
pub fn encode_stderr(bytes: &[u8]) -> Vec<u8> {
    encode_line("err", bytes)
}

/// In the runner process: moves stdout and stderr onto pipes and starts the relay thread that forwards
/// them to the original stdout (evcxr's pipe) in the kernel's format. Call once, before any output.
pub fn capture_runner_output() -> std::io::Result<()> {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
    use rustix::pipe::{PipeFlags, pipe_with};
    // The original stdout (evcxr's pipe) becomes the protocol channel; new pipes take stdout's and
    // stderr's places. All three live as long as the process (the exit handler still uses them), hence
    // 'static.
    let proto = rustix::io::fcntl_dupfd_cloexec(rustix::stdio::stdout(), 3)?;
    let (out, out_w) = pipe_with(PipeFlags::CLOEXEC)?;
    let (err, err_w) = pipe_with(PipeFlags::CLOEXEC)?;
    rustix::stdio::dup2_stdout(&out_w)?;
    rustix::stdio::dup2_stderr(&err_w)?;
    drop((out_w, err_w));
    for fd in [&out, &err] {
        fcntl_setfl(fd, fcntl_getfl(fd)? | OFlags::NONBLOCK)?;
    }
    let [out, err, proto]: [&'static OwnedFd; 3] =
        [out, err, proto].map(|fd| &*Box::leak(Box::new(fd)));
    *RELAY.lock().unwrap_or_else(|e| e.into_inner()) = Some(Relay {
        splitter: StdoutSplitter::default(),
        out,
        err,
        proto,
        buf: vec![0u8; 64 * 1024],
    });
    // What is still in the pipes when the process exits (an error message before exit(99), say)
    // would die with the relay thread: forward it from an exit handler.
    // SAFETY: registering a plain extern "C" function.
    unsafe {
        libc::atexit(drain_at_exit);
    }
    std::thread::Builder::new()
        .name("hasten-kernel-relay".into())
        .spawn(move || relay_loop(out, err))?;
    Ok(())
}

/// The relay's state; the thread and the exit handler take turns through the lock.
struct Relay {
    splitter: StdoutSplitter,
    out: &'static OwnedFd,
    err: &'static OwnedFd,
    proto: &'static OwnedFd,
    buf: Vec<u8>,
}

static RELAY: std::sync::Mutex<Option<Relay>> = std::sync::Mutex::new(None);

/// Writes all of `data` with write(2) itself, never through a std lock (the exit handler and a forked
/// worker must not wait on one); gives up on an error other than EINTR.
fn write_all_fd(fd: &OwnedFd, mut data: &[u8]) {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
    }
}

/// Reads one non-blocking descriptor until it is empty; false once it is closed.
fn read_available(fd: &OwnedFd, buf: &mut [u8], mut each: impl FnMut(&[u8])) -> bool {
    loop {
        match rustix::io::read(fd, &mut *buf) {
            Ok(0) => return false,
            Ok(n) => each(&buf[..n]),
            Err(rustix::io::Errno::INTR) => {}
            // EAGAIN: empty for now; any other error: treated as still open, as before.
            Err(_) => return true,
        }
    }
}

impl Relay {
    /// Forwards what stderr holds now. Done before every protocol line too, so stderr written before
    /// a cell ended reaches the kernel before the cell's end marker.
    fn pump_stderr(&mut self) -> bool {
        let (err, proto) = (self.err, self.proto);
        read_available(err, &mut self.buf, |bytes| {
            write_all_fd(proto, &encode_stderr(bytes))
        })
    }

    /// Forwards what stdout holds now; false once it is closed.
    fn pump_stdout(&mut self) -> bool {
        let mut data = Vec::new();
        let open = read_available(self.out, &mut self.buf, |bytes| {
            data.extend_from_slice(bytes)
        });
        for piece in self.splitter.push(&data) {
            if matches!(piece, Piece::Protocol(_)) {
                self.pump_stderr();
            }
            write_all_fd(self.proto, &encode_piece(&piece));
        }
        open
    }
}

extern "C" fn drain_at_exit() {
    let _ = std::io::stdout().flush();
    if let Ok(mut guard) = RELAY.try_lock()
        && let Some(relay) = guard.as_mut()
    {
        relay.pump_stderr();
        relay.pump_stdout();
        // A partial line still held back (it might have become a marker) is output after all.
        let rest = std::mem::take(&mut relay.splitter.pending);
        if !rest.is_empty() {
            write_all_fd(relay.proto, &encode_piece(&Piece::User(rest)));
        }
    }
}

fn relay_loop(out: &'static OwnedFd, err: &'static OwnedFd) {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut err_open = true;
    loop {
        let mut fds = vec![PollFd::new(out, PollFlags::IN)];
        if err_open {
            fds.push(PollFd::new(err, PollFlags::IN));
        }
        if poll(&mut fds, None).is_err() {
            continue;
        }
        let out_ready = !fds[0].revents().is_empty();
        let err_ready = fds.get(1).is_some_and(|fd| !fd.revents().is_empty());
        let mut guard = RELAY.lock().unwrap_or_else(|e| e.into_inner());
        let Some(relay) = guard.as_mut() else {
            return;
        };
        if err_ready {
            err_open = relay.pump_stderr();
        }
        if out_ready && !relay.pump_stdout() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut s = StdoutSplitter::default();
        chunks.iter().flat_map(|c| s.push(c)).collect()
    }

    #[test]
    fn output_without_newline_is_cut_from_the_completion_marker() {
        let pieces = split_all(&[b"50%", b"\r100%EVCXR_EXECUTION_COMPLETE\n"]);
        assert_eq!(
            pieces,
            vec![
                Piece::User(b"50%".to_vec()),
                Piece::User(b"\r100%".to_vec()),
                Piece::Protocol(b"EVCXR_EXECUTION_COMPLETE\n".to_vec()),
            ]
        );
    }

    #[test]
    fn a_possible_marker_start_is_held_back_until_decided() {
        let mut s = StdoutSplitter::default();
        assert_eq!(s.push(b"abcEVC"), vec![Piece::User(b"abc".to_vec())]);
        assert_eq!(s.push(b"X"), vec![]);
        assert_eq!(s.push(b"Y"), vec![Piece::User(b"EVCXY".to_vec())]);
    }

    #[test]
    fn content_blocks_pass_whole_even_when_they_contain_anything() {
        let pieces = split_all(&[
            b"x\nEVCXR_BEGIN_CONTENT text/plain\n1\nEVCXR_ in text\nEVCXR_END_CONTENT\n",
        ]);
        assert_eq!(
            pieces,
            vec![
                Piece::User(b"x\n".to_vec()),
                Piece::Protocol(b"EVCXR_BEGIN_CONTENT text/plain\n".to_vec()),
                Piece::Protocol(b"1\n".to_vec()),
                Piece::Protocol(b"EVCXR_ in text\n".to_vec()),
                Piece::Protocol(b"EVCXR_END_CONTENT\n".to_vec()),
            ]
        );
    }

    #[test]
    fn chunks_round_trip_through_the_line_format() {
        let bytes = "héllo\r\n\u{1F600}".as_bytes();
        let line = String::from_utf8(encode_piece(&Piece::User(bytes.to_vec()))).unwrap();
        assert_eq!(
            parse_line(line.trim_end()),
            KernelLine::Stdout(bytes.to_vec())
        );
        let line = String::from_utf8(encode_stderr(b"oops")).unwrap();
        assert_eq!(
            parse_line(line.trim_end()),
            KernelLine::Stderr(b"oops".to_vec())
        );
        let line = String::from_utf8(encode_line("display text/html", b"<b>x</b>")).unwrap();
        assert_eq!(
            parse_line(line.trim_end()),
            KernelLine::Display {
                mime: "text/html".into(),
                data: "<b>x</b>".into()
            }
        );
        assert_eq!(
            parse_line("HASTEN_KERNEL clear 1"),
            KernelLine::Clear { wait: true }
        );
        assert_eq!(
            parse_line("plain words"),
            KernelLine::Plain("plain words".into())
        );
        assert_eq!(
            parse_line("HASTEN_KERNEL out zz"),
            KernelLine::Plain("HASTEN_KERNEL out zz".into())
        );
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(from_hex(&to_hex(&[0, 15, 255])), Some(vec![0, 15, 255]));
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn panics_and_errors_get_a_note_before_evcxrs_line() {
        let out = encode_piece(&Piece::Protocol(b"EVCXR_PANIC_NOTIFICATION\n".to_vec()));
        assert_eq!(out, b"HASTEN_KERNEL panic\nEVCXR_PANIC_NOTIFICATION\n");
        let out = encode_piece(&Piece::Protocol(b"EVCXR_ERROR_OCCURRED\n".to_vec()));
        assert_eq!(out, b"HASTEN_KERNEL error\nEVCXR_ERROR_OCCURRED\n");
    }
}
