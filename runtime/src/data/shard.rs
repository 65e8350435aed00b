//! Sharding data between processes exactly as Accelerate does (`BatchSamplerShard`,
//! `IterableDatasetShard`), so the same job gives each rank the same samples in hasten and in Python.
//! The expected batches are Accelerate's own test tables (shared/oracle/accelerate_cases.md).

use super::sampler::BatchSource;
use crate::{Error, Result};

/// One rank's share of a batch sampler's batches.
///
/// Without `split_batches`, batch k goes to rank k mod P, and a round is only emitted once every rank has
/// a full batch. With `split_batches`, every batch is cut into P slices and rank i takes slice i. With
/// `even_batches` (the default) the tail is completed from the start of the data so every rank gets the
/// same number of full batches; without it, ranks may get fewer or shorter batches.
pub struct BatchSamplerShard<S: BatchSource> {
    sampler: S,
    num_processes: usize,
    process_index: usize,
    split_batches: bool,
    even_batches: bool,
}

impl<S: BatchSource> BatchSamplerShard<S> {
    /// Shards `sampler` for rank `process_index` of `num_processes`. With `split_batches` the batch size
    /// must be a multiple of the number of processes.
    pub fn new(
        sampler: S,
        num_processes: usize,
        process_index: usize,
        split_batches: bool,
        even_batches: bool,
    ) -> Result<Self> {
        if num_processes == 0 || process_index >= num_processes {
            return Err(Error::InvalidShard {
                what: "BatchSamplerShard",
                process_index,
                num_processes,
                batch_size: None,
            });
        }
        if split_batches && sampler.batch_size().is_none_or(|b| b % num_processes != 0) {
            return Err(Error::SplitBatches {
                what: "`BatchSamplerShard`",
                batch_size: sampler.batch_size(),
                num_processes,
            });
        }
        Ok(BatchSamplerShard {
            sampler,
            num_processes,
            process_index,
            split_batches,
            even_batches,
        })
    }

    /// The wrapped sampler.
    pub fn sampler_mut(&mut self) -> &mut S {
        &mut self.sampler
    }

    /// Number of batches of the wrapped sampler (all ranks together).
    pub fn total_length(&self) -> usize {
        self.sampler.len()
    }

    /// Number of batches this rank gets.
    pub fn len(&self) -> usize {
        let total = self.sampler.len();
        let p = self.num_processes;
        if self.split_batches {
            return total;
        }
        if total % p == 0 {
            return total / p;
        }
        let length = total / p;
        if self.sampler.drop_last() {
            length
        } else if self.even_batches {
            length + 1
        } else {
            length + usize::from(self.process_index < total % p)
        }
    }

    /// True when this rank gets no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This rank's batches for the current epoch.
    pub fn batches(&self) -> Vec<Vec<usize>> {
        if self.split_batches {
            self.with_split()
        } else {
            self.without_split()
        }
    }

    fn with_split(&self) -> Vec<Vec<usize>> {
        let batch_size = self.sampler.batch_size().unwrap_or(1);
        let share = batch_size / self.num_processes;
        let slice = |b: &[usize]| -> Vec<usize> {
            let lo = (share * self.process_index).min(b.len());
            let hi = (share * (self.process_index + 1)).min(b.len());
            b[lo..hi].to_vec()
        };
        let all = self.sampler.batches();
        let mut out = Vec::new();
        for batch in all.iter().filter(|b| b.len() == batch_size) {
            out.push(slice(batch));
        }
        let (Some(first), Some(last)) = (all.first(), all.last()) else {
            return out;
        };
        if self.sampler.drop_last() || last.len() == batch_size {
            return out;
        }
        if !self.even_batches {
            if last.len() > share * self.process_index {
                out.push(slice(last));
            }
        } else {
            // Complete the short last batch from the first one (repeated for tiny datasets).
            let mut filler = first.clone();
            while filler.len() < batch_size {
                filler.extend_from_within(..);
            }
            let mut completed = last.clone();
            completed.extend_from_slice(&filler);
            out.push(slice(&completed));
        }
        out
    }

    fn without_split(&self) -> Vec<Vec<usize>> {
        let p = self.num_processes;
        let rank = self.process_index;
        let batch_size = self.sampler.batch_size();
        let drop_last = self.sampler.drop_last();
        let full = |b: &Vec<usize>| batch_size.is_none_or(|s| b.len() == s);
        let all = self.sampler.batches();

        let mut out = Vec::new();
        // The first round's indices (or whole batches, when sizes vary), to cycle through at the end.
        let mut initial_flat: Vec<usize> = Vec::new();
        let mut initial_batches: Vec<Vec<usize>> = Vec::new();
        let mut pending: Option<Vec<usize>> = None;
        for (idx, batch) in all.iter().enumerate() {
            if !drop_last && idx < p {
                match batch_size {
                    None => initial_batches.push(batch.clone()),
                    Some(_) => initial_flat.extend_from_slice(batch),
                }
            }
            if idx % p == rank {
                pending = Some(batch.clone());
            }
            // A round is complete when its last batch is full: only then does every rank yield.
            if idx % p == p - 1 && full(batch) {
                out.extend(pending.take());
            }
        }
        let have_initial = !initial_flat.is_empty() || !initial_batches.is_empty();
        if drop_last || !have_initial {
            return out;
        }
        if !self.even_batches {
            out.extend(pending);
            return out;
        }
        if let Some(b) = pending.take().filter(full) {
            out.push(b);
        }
        // Tiny datasets: repeat the initial data until a whole round can be built from it.
        match batch_size {
            None => {
                while initial_batches.len() < p {
                    initial_batches.extend_from_within(..);
                }
            }
            Some(s) => {
                while initial_flat.len() < p * s {
                    initial_flat.extend_from_within(..);
                }
            }
        }
        let Some(last) = all.last() else {
            return out;
        };
        let mut idx = all.len() - 1;
        let mut batch = last.clone();
        if full(&batch) {
            // The last batch was full, so its rank yielded it already: continue with the next slot.
            batch.clear();
            idx += 1;
        }
        // Complete rounds until every rank has yielded the same number of batches.
        let mut cycle = 0;
        while idx % p != 0 || !batch.is_empty() {
            match batch_size {
                None => {
                    let b = initial_batches[cycle % initial_batches.len()].clone();
                    if idx % p == rank {
                        out.push(b);
                    }
                    cycle += 1;
                }
                Some(s) => {
                    let end = cycle + s - batch.len();
                    batch.extend_from_slice(&initial_flat[cycle..end]);
                    if idx % p == rank {
                        out.push(std::mem::take(&mut batch));
                    }
                    cycle = end;
                }
            }
            batch.clear();
            idx += 1;
        }
        out
    }
}

/// One rank's share of an iterable dataset (Accelerate's `IterableDatasetShard`): windows of
/// `batch_size × P` items (`batch_size` with `split_batches`) are buffered, and each rank takes its
/// contiguous slice of every window. Unless `drop_last`, the last window is completed with items from the
/// first.
pub struct IterableDatasetShard<I: Iterator> {
    inner: I,
    window: usize,
    slice: std::ops::Range<usize>,
    drop_last: bool,
    first: Option<Vec<I::Item>>,
    ready: std::collections::VecDeque<I::Item>,
    done: bool,
}

impl<I> IterableDatasetShard<I>
where
    I: Iterator,
    I::Item: Clone,
{
    /// Shards `items` for rank `process_index` of `num_processes`.
    pub fn new(
        items: I,
        batch_size: usize,
        drop_last: bool,
        num_processes: usize,
        process_index: usize,
        split_batches: bool,
    ) -> Result<Self> {
        if num_processes == 0 || process_index >= num_processes || batch_size == 0 {
            return Err(Error::InvalidShard {
                what: "IterableDatasetShard",
                process_index,
                num_processes,
                batch_size: Some(batch_size),
            });
        }
        if split_batches && batch_size % num_processes != 0 {
            return Err(Error::SplitBatches {
                what: "`IterableDatasetShard`",
                batch_size: Some(batch_size),
                num_processes,
            });
        }
        let (window, per_rank) = if split_batches {
            (batch_size, batch_size / num_processes)
        } else {
            (batch_size * num_processes, batch_size)
        };
        Ok(IterableDatasetShard {
            inner: items,
            window,
            slice: process_index * per_rank..(process_index + 1) * per_rank,
            drop_last,
            first: None,
            ready: Default::default(),
            done: false,
        })
    }

    /// The number of items each rank gets from a dataset of `len` items (Accelerate's `__len__`).
    pub fn len_for(len: usize, batch_size: usize, drop_last: bool, num_processes: usize) -> usize {
        let round = batch_size * num_processes;
        if drop_last {
            (len / round) * batch_size
        } else {
            len.div_ceil(round) * batch_size
        }
    }

    fn take_slice(&mut self, window: &[I::Item]) {
        self.ready
            .extend(window[self.slice.clone()].iter().cloned());
    }
}

impl<I> Iterator for IterableDatasetShard<I>
where
    I: Iterator,
    I::Item: Clone,
{
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        while self.ready.is_empty() && !self.done {
            let window: Vec<I::Item> = self.inner.by_ref().take(self.window).collect();
            if window.len() == self.window {
                self.take_slice(&window);
                if self.first.is_none() {
                    self.first = Some(window);
                }
                continue;
            }
            self.done = true;
            if !self.drop_last && !window.is_empty() {
                let first = self.first.clone().unwrap_or_else(|| window.clone());
                let mut completed = window;
                while completed.len() < self.window {
                    completed.extend(first.iter().cloned());
                }
                self.take_slice(&completed);
            }
        }
        self.ready.pop_front()
    }
}

#[cfg(test)]
mod tests;
