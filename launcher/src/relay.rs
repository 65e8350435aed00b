//! Relaying the workers' output: one reader thread per pipe turns bytes into whole lines, and the
//! supervisor prints each line with its rank's prefix in a single write, so two ranks' lines never mix.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc::Sender;

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
    /// A message from the launcher itself (restarts, failures).
    fn note(&self, text: &str);
}

/// Writes relayed lines to this process's stdout and stderr.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdioSink;

impl OutputSink for StdioSink {
    fn line(&self, stream: Stream, text: &str) {
        let mut buf = String::with_capacity(text.len() + 1);
        buf.push_str(text);
        buf.push('\n');
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

/// What a reader thread reports.
pub(crate) enum Event {
    Line {
        index: usize,
        stream: Stream,
        text: String,
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

/// Starts a thread that reads `pipe` line by line and forwards each line to `tx`.
pub(crate) fn spawn_reader(index: usize, stream: Stream, pipe: File, tx: Sender<Event>) {
    std::thread::Builder::new()
        .name(format!("hasten-relay-{index}-{stream:?}"))
        .spawn(move || {
            let mut reader = BufReader::with_capacity(64 * 1024, pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if buf.last() == Some(&b'\n') {
                            buf.pop();
                        }
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        if tx
                            .send(Event::Line {
                                index,
                                stream,
                                text,
                            })
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            let _ = tx.send(Event::Eof { index });
        })
        .map(drop)
        .unwrap_or_else(|e| eprintln!("hasten: could not start an output relay thread: {e}"));
}

/// Starts a thread that reads a worker's status pipe to its end and reports the bytes.
pub(crate) fn spawn_status_reader(index: usize, mut pipe: File, tx: Sender<Event>) {
    use std::io::Read;
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

    #[test]
    fn prefix_templates() {
        assert_eq!(LinePrefix::default().render(3, 1), "[rank3]: ");
        assert_eq!(
            LinePrefix::new("${role_name}${local_rank}|${rank}> ").render(5, 1),
            "default1|5> "
        );
    }
}
