//! The session's input history, for `history_request` (tail, range and search, as IPython answers them).

use crate::code::glob_match;
use jupyter_protocol::{HistoryEntry, HistoryRequest};

/// The one session this kernel process serves (IPython numbers sessions; a kernel restart is a new
/// process, hence a new history).
pub const SESSION: usize = 1;

/// Executed cells, with their execution count and plain-text result.
#[derive(Debug, Default)]
pub struct History {
    entries: Vec<(usize, String, String)>,
}

impl History {
    /// Records a cell that was run with `store_history`.
    pub fn push(&mut self, count: usize, input: &str, output: &str) {
        self.entries
            .push((count, input.to_owned(), output.to_owned()));
    }

    /// Answers a request.
    pub fn query(&self, request: &HistoryRequest) -> Vec<HistoryEntry> {
        let (selected, output): (Vec<&(usize, String, String)>, bool) = match request {
            HistoryRequest::Tail { n, output, .. } => {
                let n = usize::try_from(*n).unwrap_or(0);
                (
                    self.entries
                        .iter()
                        .skip(self.entries.len().saturating_sub(n))
                        .collect(),
                    *output,
                )
            }
            HistoryRequest::Range {
                session,
                start,
                stop,
                output,
                ..
            } => {
                let ours = session.is_none_or(|s| s <= 0 || s as usize == SESSION);
                let (start, stop) = (*start as i64, *stop as i64);
                let selected = self
                    .entries
                    .iter()
                    .filter(|(count, ..)| {
                        let c = *count as i64;
                        ours && c >= start && (stop <= 0 || c < stop)
                    })
                    .collect();
                (selected, *output)
            }
            HistoryRequest::Search {
                pattern,
                unique,
                n,
                output,
                ..
            } => {
                let mut selected: Vec<&(usize, String, String)> = self
                    .entries
                    .iter()
                    .filter(|(_, input, _)| glob_match(pattern, input))
                    .collect();
                if *unique {
                    // Keep the last occurrence of each input, in order.
                    let mut seen = std::collections::HashSet::new();
                    selected.reverse();
                    selected.retain(|(_, input, _)| seen.insert(input.clone()));
                    selected.reverse();
                }
                if *n > 0 {
                    let n = *n as usize;
                    selected = selected.split_off(selected.len().saturating_sub(n));
                }
                (selected, *output)
            }
        };
        selected
            .into_iter()
            .map(|(count, input, out)| {
                if output {
                    HistoryEntry::InputOutput(SESSION, *count, (input.clone(), out.clone()))
                } else {
                    HistoryEntry::Input(SESSION, *count, input.clone())
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(entries: Vec<HistoryEntry>) -> Vec<usize> {
        entries
            .into_iter()
            .map(|e| match e {
                HistoryEntry::Input(_, c, _) | HistoryEntry::InputOutput(_, c, _) => c,
            })
            .collect()
    }

    #[test]
    fn tail_range_and_search_select_like_ipython() {
        let mut h = History::default();
        for (i, code) in ["1+1", "2+2", "1+1", "x"].iter().enumerate() {
            h.push(i + 1, code, "");
        }
        let tail = HistoryRequest::Tail {
            n: 2,
            output: false,
            raw: true,
        };
        assert_eq!(counts(h.query(&tail)), vec![3, 4]);
        let range = HistoryRequest::Range {
            session: Some(1),
            start: 2,
            stop: 3,
            output: false,
            raw: true,
        };
        assert_eq!(counts(h.query(&range)), vec![2]);
        let search = |unique, n| HistoryRequest::Search {
            pattern: "*+*".into(),
            unique,
            output: false,
            raw: true,
            n,
        };
        assert_eq!(counts(h.query(&search(false, 0))), vec![1, 2, 3]);
        assert_eq!(counts(h.query(&search(true, 0))), vec![2, 3]);
        assert_eq!(counts(h.query(&search(false, 2))), vec![2, 3]);
    }
}
