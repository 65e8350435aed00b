//! Relaying the workers' output: one reader thread per pipe turns bytes into whole lines, and the
//! supervisor prints each line with its rank's prefix in a single write, so two ranks' lines never mix.
//!
//! Memory stays bounded whatever a rank prints: a line longer than [`MAX_SEGMENT`] is passed on in
//! pieces of that size, and the readers hand lines over through a bounded queue, so a rank that prints
//! faster than the terminal takes is slowed down by its full pipe (as it would be writing to the
//! terminal itself) instead of the launcher buffering its output. A carriage return ends a piece too,
//! so progress bars (`\r` updates without a newline) show as they happen.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::mpsc::SyncSender;

/// The longest piece of output passed on in one go: a longer line arrives as several.
pub const MAX_SEGMENT: usize = 64 * 1024;
/// How many pieces may wait between the readers and the supervisor (at most `MAX_SEGMENT` each).
pub(crate) const QUEUE_DEPTH: usize = 256;

/// Which of a worker's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Where relayed lines go.
pub trait OutputSink: Send + Sync {
    /// One complete line of a rank's output (without its newline), already prefixed.
    fn line(&self, stream: Stream, text: &str);
    /// A line a rank ended with a carriage return instead of a newline (a progress bar's update),
    /// already prefixed and without the `\r`: the next piece of this rank's output overwrites it.
    /// Sinks that cannot overwrite show it as a line.
    fn progress(&self, stream: Stream, text: &str) {
        self.line(stream, text);
    }
    /// A message from the launcher itself (restarts, failures).
    fn note(&self, text: &str);
}

/// Writes relayed lines to this process's stdout and stderr.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdioSink;

impl StdioSink {
    fn write(stream: Stream, text: &str, end: char) {
        let mut buf = String::with_capacity(text.len() + 1);
        buf.push_str(text);
        buf.push(end);
        // One write of the whole line on a locked handle: lines stay whole even with many ranks.
        let _ = match stream {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(buf.as_bytes()).and_then(|_| out.flush())
            }
            Stream::Stderr => {
                let mut err = std::io::stderr().lock();
                err.write_all(buf.as_bytes()).and_then(|_| err.flush())
            }
        };
    }
}

impl OutputSink for StdioSink {
    fn line(&self, stream: Stream, text: &str) {
        StdioSink::write(stream, text, '\n');
    }

    fn progress(&self, stream: Stream, text: &str) {
        StdioSink::write(stream, text, '\r');
    }

    fn note(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{text}").and_then(|_| err.flush());
    }
}

/// The prefix put before each relayed line, from a template with `${rank}`, `${local_rank}` and
/// `${role_name}` placeholders, as torch's `log_line_prefix_template`. Default: `[rank${rank}]: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinePrefix {
    template: String,
}

impl Default for LinePrefix {
    fn default() -> Self {
        LinePrefix::new("[rank${rank}]: ")
    }
}

impl LinePrefix {
    /// A prefix from a template.
    pub fn new(template: impl Into<String>) -> Self {
        LinePrefix {
            template: template.into(),
        }
    }

    /// The prefix for one rank.
    pub fn render(&self, rank: usize, local_rank: usize) -> String {
        self.template
            .replace("${rank}", &rank.to_string())
            .replace("${local_rank}", &local_rank.to_string())
            .replace("${role_name}", "default")
    }
}

/// How a piece of output ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// A newline (or the end of the stream, or [`MAX_SEGMENT`] reached).
    Newline,
    /// A carriage return: the next piece overwrites this one.
    Return,
    /// Not ended yet: the rank paused in the middle of a line (a prompt, a progress bar). Shown for
    /// now, overwritten by the whole piece once it ends.
    Partial,
}

/// What a reader thread reports.
pub(crate) enum Event {
    Line {
        index: usize,
        stream: Stream,
        text: String,
        end: End,
    },
    Eof {
        index: usize,
    },
    /// Everything a worker wrote to its status pipe (forked workers only), sent at end of file.
    Status {
        index: usize,
        bytes: Vec<u8>,
    },
}

/// Cuts a byte stream into pieces ending in `\n`, `\r` (but `\r\n` is one newline) or at
/// [`MAX_SEGMENT`] bytes, keeping at most one unfinished piece.
#[derive(Default)]
pub(crate) struct Segmenter {
    pending: Vec<u8>,
    /// How much of `pending` is on screen already as an [`End::Partial`] piece.
    shown: usize,
}

impl Segmenter {
    /// Adds `bytes`; calls `emit` for every piece that is complete.
    pub(crate) fn push(&mut self, mut bytes: &[u8], emit: &mut dyn FnMut(&[u8], End)) {
        // A carriage return left at the end of the previous chunk: decided now.
        if self.pending.last() == Some(&b'\r') && !bytes.is_empty() {
            self.pending.pop();
            let end = if bytes[0] == b'\n' {
                bytes = &bytes[1..];
                End::Newline
            } else {
                End::Return
            };
            self.emit_pending(end, emit);
        }
        while let Some(at) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (piece, rest) = bytes.split_at(at);
            self.extend(piece, emit);
            if rest[0] == b'\r' && rest.len() == 1 {
                // Maybe the first half of `\r\n`: wait for the next byte.
                self.pending.push(b'\r');
                bytes = &[];
                break;
            }
            let end = if rest[0] == b'\n' || rest.get(1) == Some(&b'\n') {
                End::Newline
            } else {
                End::Return
            };
            bytes = &rest[if rest[0] == b'\r' && end == End::Newline {
                2
            } else {
                1
            }..];
            self.emit_pending(end, emit);
        }
        self.extend(bytes, emit);
    }

    /// Appends to the unfinished piece, passing on whole [`MAX_SEGMENT`]s as soon as more follows, so
    /// that no piece, however it ends, is longer.
    fn extend(&mut self, bytes: &[u8], emit: &mut dyn FnMut(&[u8], End)) {
        self.pending.extend_from_slice(bytes);
        while self.pending.len() > MAX_SEGMENT {
            let rest = self.pending.split_off(MAX_SEGMENT);
            emit(&self.pending, End::Newline);
            self.pending = rest;
            self.shown = 0;
        }
    }

    fn emit_pending(&mut self, end: End, emit: &mut dyn FnMut(&[u8], End)) {
        // An empty piece before a carriage return (a progress bar's leading `\r`) shows nothing, and
        // one already on screen as it is needs no second drawing.
        let on_screen = self.shown > 0 && self.shown == self.pending.len();
        if !(end == End::Return && (self.pending.is_empty() || on_screen)) {
            emit(&self.pending, end);
        }
        self.pending.clear();
        self.shown = 0;
    }

    /// Shows the unfinished piece as it is, because the rank paused: a carriage return held back in
    /// case a newline followed ends its piece; anything else is emitted as [`End::Partial`] and kept.
    pub(crate) fn paused(&mut self, emit: &mut dyn FnMut(&[u8], End)) {
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
            self.emit_pending(End::Return, emit);
        } else if !self.pending.is_empty() && self.shown != self.pending.len() {
            emit(&self.pending, End::Partial);
            self.shown = self.pending.len();
        }
    }

    /// The unfinished piece at the end of the stream, if any.
    pub(crate) fn finish(&mut self, emit: &mut dyn FnMut(&[u8], End)) {
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
        }
        if !self.pending.is_empty() {
            emit(&self.pending, End::Newline);
        }
        self.pending.clear();
        self.shown = 0;
    }
}

/// How long a rank may pause in the middle of a line before the part written so far is shown.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether `pipe` has data (or its end) within `wait`.
fn readable_within(pipe: &File, wait: std::time::Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(pipe, PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: wait.as_secs() as _,
        tv_nsec: wait.subsec_nanos() as _,
    };
    // An error reads as "readable", so the read that follows reports it.
    !matches!(poll(&mut fds, Some(&timeout)), Ok(0))
}

/// Starts a thread that reads `pipe` and forwards each piece of output to `tx`, waiting while the
/// queue is full.
pub(crate) fn spawn_reader(index: usize, stream: Stream, mut pipe: File, tx: SyncSender<Event>) {
    std::thread::Builder::new()
        .name(format!("hasten-relay-{index}-{stream:?}"))
        .spawn(move || {
            let mut chunk = vec![0u8; MAX_SEGMENT];
            let mut segmenter = Segmenter::default();
            let mut receiver_gone = false;
            let mut send = |bytes: &[u8], end: End| {
                if receiver_gone {
                    return;
                }
                let text = String::from_utf8_lossy(bytes).into_owned();
                let event = Event::Line {
                    index,
                    stream,
                    text,
                    end,
                };
                receiver_gone = tx.send(event).is_err();
            };
            // Output stopped in the middle of a piece that has not been shown yet.
            let mut mid_piece = false;
            loop {
                // Mid-piece with nothing more to read for a moment: show what there is.
                if mid_piece && !readable_within(&pipe, PAUSE) {
                    segmenter.paused(&mut send);
                    mid_piece = false;
                }
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        segmenter.push(&chunk[..n], &mut send);
                        mid_piece = !segmenter.pending.is_empty();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            segmenter.finish(&mut send);
            let _ = tx.send(Event::Eof { index });
        })
        .map(drop)
        .unwrap_or_else(|e| eprintln!("hasten: could not start an output relay thread: {e}"));
}

/// Starts a thread that reads a worker's status pipe to its end and reports the bytes.
pub(crate) fn spawn_status_reader(index: usize, mut pipe: File, tx: SyncSender<Event>) {
    std::thread::Builder::new()
        .name(format!("hasten-status-{index}"))
        .spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = tx.send(Event::Status { index, bytes });
        })
        .map(drop)
        .unwrap_or_else(|e| eprintln!("hasten: could not start a status reader thread: {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(chunks: &[&[u8]]) -> Vec<(String, End)> {
        let mut out = Vec::new();
        let mut s = Segmenter::default();
        let mut emit =
            |b: &[u8], end: End| out.push((String::from_utf8_lossy(b).into_owned(), end));
        for chunk in chunks {
            s.push(chunk, &mut emit);
        }
        s.finish(&mut emit);
        out
    }

    #[test]
    fn carriage_returns_end_pieces_and_crlf_is_one_newline() {
        use End::*;
        assert_eq!(
            segments(&[b"\r 10%\r 20%", b"\r100%\n", b"a\r\nb\r", b"\nc"]),
            vec![
                (" 10%".into(), Return),
                (" 20%".into(), Return),
                ("100%".into(), Newline),
                ("a".into(), Newline),
                ("b".into(), Newline),
                ("c".into(), Newline),
            ]
        );
        assert_eq!(
            segments(&[b"x\r", b"y"]),
            vec![("x".into(), Return), ("y".into(), Newline)]
        );
        assert_eq!(
            segments(&[b"\n\n"]),
            vec![("".into(), Newline), ("".into(), Newline)]
        );
    }

    #[test]
    fn a_pause_shows_the_unfinished_piece_and_keeps_it() {
        use End::*;
        let mut out = Vec::new();
        let mut s = Segmenter::default();
        let mut emit =
            |b: &[u8], end: End| out.push((String::from_utf8_lossy(b).into_owned(), end));
        s.push(b"\r 50%", &mut emit);
        s.paused(&mut emit);
        s.push(b"|##\r", &mut emit);
        s.paused(&mut emit);
        s.push(b"done\n", &mut emit);
        // Shown while paused, then not drawn a second time when its carriage return comes.
        s.push(b"\r 60%", &mut emit);
        s.paused(&mut emit);
        s.paused(&mut emit);
        s.push(b"\r 70%\n", &mut emit);
        assert_eq!(
            out,
            vec![
                (" 50%".into(), Partial),
                (" 50%|##".into(), Return),
                ("done".into(), Newline),
                (" 60%".into(), Partial),
                (" 70%".into(), Newline),
            ]
        );
    }

    #[test]
    fn a_line_ending_just_after_a_whole_segment_is_still_bounded() {
        // The piece reaches exactly MAX_SEGMENT in one chunk; its end comes with more text later.
        let long = vec![b'x'; MAX_SEGMENT];
        let pieces = segments(&[&long, b"tail\n"]);
        let lengths: Vec<usize> = pieces.iter().map(|(p, _)| p.len()).collect();
        assert_eq!(lengths, vec![MAX_SEGMENT, 4]);
    }

    #[test]
    fn a_line_without_end_is_passed_on_in_bounded_pieces() {
        let long = vec![b'x'; 3 * MAX_SEGMENT + 5];
        let pieces = segments(&[&long[..MAX_SEGMENT - 1], &long[MAX_SEGMENT - 1..]]);
        let lengths: Vec<usize> = pieces.iter().map(|(t, _)| t.len()).collect();
        assert_eq!(lengths, vec![MAX_SEGMENT, MAX_SEGMENT, MAX_SEGMENT, 5]);
    }

    #[test]
    fn prefix_templates() {
        assert_eq!(LinePrefix::default().render(3, 1), "[rank3]: ");
        assert_eq!(
            LinePrefix::new("${role_name}${local_rank}|${rank}> ").render(5, 1),
            "default1|5> "
        );
    }
}
