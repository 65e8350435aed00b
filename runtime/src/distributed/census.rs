//! Who did not arrive: when a collective times out, every rank that was waiting reports it to rank 0 over
//! a connection of its own (made at rendezvous, read by a thread of its own on rank 0, so it works while
//! the ranks' main threads are blocked in a collective or in CUDA). Rank 0 gathers the reports for a
//! short window; the ranks that did not report are the ones that never reached the collective (stuck,
//! stopped, or gone), and every reporter learns their numbers. If rank 0 itself does not answer, it is
//! the one that is missing.

use super::wire;
use std::collections::BTreeSet;
use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Greeting of a census connection (after the rank's main link is admitted).
pub(crate) const GREETING: &str = "HASTEN-CENSUS-1";

/// What rank 0 has heard about the first timed-out collective.
#[derive(Default)]
struct Incident {
    /// When the first report came.
    first: Option<Instant>,
    /// The ranks that reported.
    reporters: BTreeSet<usize>,
    /// The verdict, once the window closed.
    missing: Option<Vec<usize>>,
}

pub(super) struct Board {
    world: usize,
    window: Duration,
    incident: Mutex<Incident>,
    changed: Condvar,
}

impl Board {
    /// Records `rank`'s report and waits for the verdict.
    fn report(&self, rank: usize) -> Vec<usize> {
        let mut incident = self.incident.lock().unwrap_or_else(|e| e.into_inner());
        let first = *incident.first.get_or_insert_with(Instant::now);
        incident.reporters.insert(rank);
        self.changed.notify_all();
        loop {
            if let Some(missing) = &incident.missing {
                return missing.clone();
            }
            let deadline = first + self.window;
            let now = Instant::now();
            if incident.reporters.len() == self.world || now >= deadline {
                let missing: Vec<usize> = (0..self.world)
                    .filter(|r| !incident.reporters.contains(r))
                    .collect();
                incident.missing = Some(missing.clone());
                self.changed.notify_all();
                return missing;
            }
            incident = self
                .changed
                .wait_timeout(incident, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// This rank's end of the census.
pub(crate) enum Census {
    /// A group of one: nobody else can be missing.
    Alone,
    /// Rank 0: the board every report goes to.
    Root(Arc<Board>),
    /// Another rank: its connection to rank 0's board.
    Member {
        stream: Mutex<TcpStream>,
        rank: usize,
        window: Duration,
    },
}

/// How long rank 0 waits for more reports after the first: the waiting ranks time out within about the
/// time they entered the collective apart, so a fraction of the timeout, at least a second.
pub(crate) fn window_for(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

impl Census {
    /// Rank 0's board, serving the members' connections (`streams[r]` for rank r) on threads of their own.
    pub(crate) fn root(world: usize, timeout: Duration, streams: Vec<(usize, TcpStream)>) -> Self {
        let board = Arc::new(Board {
            world,
            window: window_for(timeout),
            incident: Mutex::new(Incident::default()),
            changed: Condvar::new(),
        });
        for (rank, mut stream) in streams {
            let board = board.clone();
            let _ = std::thread::Builder::new()
                .name(format!("hasten-census-{rank}"))
                .spawn(move || {
                    let _ = stream.set_read_timeout(None);
                    // One report per job: a timed-out collective ends it. Read errors mean the rank is gone,
                    // which its missing report already says.
                    if wire::recv(&mut stream, rank, "census").is_ok() {
                        let missing = board.report(rank);
                        let _ = wire::send(&mut stream, &encode(&missing), rank, "census");
                    }
                });
        }
        Census::Root(board)
    }

    /// Another rank's end: its census connection to rank 0.
    pub(crate) fn member(rank: usize, timeout: Duration, stream: TcpStream) -> Self {
        Census::Member {
            stream: Mutex::new(stream),
            rank,
            window: window_for(timeout),
        }
    }

    /// Reports that this rank timed out in a collective and returns the ranks that never reached it
    /// (every rank that did not time out with it). Empty when that cannot be known.
    pub(crate) fn missing_after_timeout(&self) -> Vec<usize> {
        match self {
            Census::Alone => Vec::new(),
            Census::Root(board) => board.report(0),
            Census::Member {
                stream,
                rank,
                window,
            } => {
                let mut stream = stream.lock().unwrap_or_else(|e| e.into_inner());
                // Rank 0 answers once its window closes; if it does not, it is the one that is stuck.
                let answer = stream
                    .set_read_timeout(Some(*window + Duration::from_secs(10)))
                    .ok()
                    .and_then(|()| {
                        wire::send(&mut stream, rank.to_string().as_bytes(), 0, "census").ok()
                    })
                    .and_then(|()| wire::recv(&mut *stream, 0, "census").ok());
                answer.and_then(|a| decode(&a)).unwrap_or_else(|| vec![0])
            }
        }
    }
}

fn encode(ranks: &[usize]) -> Vec<u8> {
    ranks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

fn decode(bytes: &[u8]) -> Option<Vec<usize>> {
    let text = std::str::from_utf8(bytes).ok()?;
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',').map(|r| r.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(world: usize, window_ms: u64) -> Arc<Board> {
        Arc::new(Board {
            world,
            window: Duration::from_millis(window_ms),
            incident: Mutex::new(Incident::default()),
            changed: Condvar::new(),
        })
    }

    #[test]
    fn the_ranks_that_do_not_report_are_missing() {
        let b = board(4, 300);
        let waiters: Vec<_> = [0usize, 1, 3]
            .into_iter()
            .map(|r| {
                let b = b.clone();
                std::thread::spawn(move || b.report(r))
            })
            .collect();
        for w in waiters {
            assert_eq!(w.join().unwrap(), vec![2]);
        }
        // Everyone reporting closes the window at once.
        let b = board(2, 60_000);
        let other = {
            let b = b.clone();
            std::thread::spawn(move || b.report(1))
        };
        let started = Instant::now();
        assert_eq!(b.report(0), Vec::<usize>::new());
        assert_eq!(other.join().unwrap(), Vec::<usize>::new());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn verdicts_travel_as_text() {
        assert_eq!(decode(&encode(&[1, 3])), Some(vec![1, 3]));
        assert_eq!(decode(&encode(&[])), Some(vec![]));
        assert_eq!(decode(b"1,x"), None);
        assert_eq!(window_for(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(
            window_for(Duration::from_secs(600)),
            Duration::from_secs(30)
        );
    }
}
