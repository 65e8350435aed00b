//! Iterable datasets (streams without random access) and their loader. Prepared, process 0 reads the
//! stream and dispatches batches (Accelerate's default for iterable datasets), or, with
//! `dispatch_batches=false`, each rank keeps its contiguous slice of every window of `batch_size × P`
//! items (Accelerate's `IterableDatasetShard`).

use super::dataset::Collate;
use super::dispatch::{Coordination, Dispatch};
use super::loader::{EpochCounted, ShardOptions};
use super::shard::IterableDatasetShard;
use crate::{GradientStateHandle, Nested, Result, send_to_device};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A dataset read as a stream (PyTorch's `IterableDataset`).
pub trait IterableDataset: Send + Sync {
    /// One sample.
    type Item: Send + Clone + 'static;
    /// The samples of one epoch, in order (`epoch` lets a dataset reshuffle its sources).
    fn iter(&self, epoch: u64) -> Box<dyn Iterator<Item = Self::Item> + Send + '_>;
    /// The number of samples, when known (it lets `gather_for_metrics` drop the padding at the end).
    fn known_len(&self) -> Option<usize> {
        None
    }
}

type CollateFn<I, B> = Arc<dyn Fn(Vec<I>) -> Result<B> + Send + Sync>;

/// Batches of an iterable dataset.
pub struct IterableDataLoader<D: IterableDataset, B> {
    dataset: Arc<D>,
    batch_size: usize,
    drop_last: bool,
    collate: CollateFn<D::Item, B>,
    epoch: u64,
}

impl<D> IterableDataLoader<D, <D::Item as Collate>::Batch>
where
    D: IterableDataset + 'static,
    D::Item: Collate,
{
    /// Batches of `batch_size` in stream order, collated with [`Collate`].
    pub fn new(dataset: D, batch_size: usize) -> Self {
        IterableDataLoader {
            dataset: Arc::new(dataset),
            batch_size: batch_size.max(1),
            drop_last: false,
            collate: Arc::new(<D::Item as Collate>::collate),
            epoch: 0,
        }
    }
}

impl<D: IterableDataset + 'static, B: Send + 'static> IterableDataLoader<D, B> {
    /// Batches of `batch_size` collated by `collate`, for samples without a default collation.
    pub fn with_collate(
        dataset: D,
        batch_size: usize,
        collate: impl Fn(Vec<D::Item>) -> Result<B> + Send + Sync + 'static,
    ) -> Self {
        IterableDataLoader {
            dataset: Arc::new(dataset),
            batch_size: batch_size.max(1),
            drop_last: false,
            collate: Arc::new(collate),
            epoch: 0,
        }
    }

    /// Drops a short last batch (default false).
    pub fn drop_last(mut self, on: bool) -> Self {
        self.drop_last = on;
        self
    }

    /// Uses `f` instead of the default collation.
    pub fn collate_fn<B2: Send + 'static>(
        self,
        f: impl Fn(Vec<D::Item>) -> Result<B2> + Send + Sync + 'static,
    ) -> IterableDataLoader<D, B2> {
        IterableDataLoader {
            dataset: self.dataset,
            batch_size: self.batch_size,
            drop_last: self.drop_last,
            collate: Arc::new(f),
            epoch: self.epoch,
        }
    }

    /// Sets the epoch passed to the dataset.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Samples per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The batches of one epoch.
    pub fn iter(&self) -> impl Iterator<Item = Result<B>> + '_ {
        chunked(
            self.dataset.iter(self.epoch),
            self.batch_size,
            self.drop_last,
        )
        .map(move |items| (self.collate)(items))
    }
}

/// Groups a stream into lists of `size` (the last one shorter unless `drop_last`).
fn chunked<I: Iterator>(
    mut items: I,
    size: usize,
    drop_last: bool,
) -> impl Iterator<Item = Vec<I::Item>> {
    std::iter::from_fn(move || {
        let chunk: Vec<I::Item> = items.by_ref().take(size).collect();
        (!chunk.is_empty() && (!drop_last || chunk.len() == size)).then_some(chunk)
    })
}

/// An iterable loader prepared for one rank. As a prepared map-style loader, it counts epochs itself
/// (each epoch iterated to its end passes the next epoch to the dataset; `set_epoch` sets the count), and
/// with one process it takes the stream's batches as they come.
pub struct IterableDataLoaderShard<D: IterableDataset, B> {
    loader: IterableDataLoader<D, B>,
    options: ShardOptions,
    gradient_state: GradientStateHandle,
    /// Dispatching from process 0, or synchronising generators at each epoch.
    coordination: Coordination,
    /// Steps to read and drop at the start of each epoch (`skip_first_batches`).
    skip_batches: usize,
    /// The epoch the next `iter` passes to the dataset (Accelerate's `iteration`).
    epoch: Arc<AtomicU64>,
}

impl<D: IterableDataset + 'static, B: Nested + Send + 'static> IterableDataLoaderShard<D, B> {
    /// Prepares `loader` for the rank described by `options`.
    pub fn new(
        loader: IterableDataLoader<D, B>,
        options: ShardOptions,
        gradient_state: GradientStateHandle,
    ) -> Self {
        let loader_epoch = loader.epoch;
        IterableDataLoaderShard {
            loader,
            options,
            gradient_state,
            coordination: Coordination::Alone,
            skip_batches: 0,
            epoch: Arc::new(AtomicU64::new(loader_epoch)),
        }
    }

    /// The same loader, working with the other processes as `coordination` says (set by the Accelerator).
    pub(crate) fn coordinated(mut self, coordination: Coordination) -> Self {
        self.coordination = coordination;
        self
    }

    /// True when process 0 reads the stream and dispatches its batches.
    pub fn dispatches(&self) -> bool {
        self.coordination.dispatch_group().is_some()
    }

    /// Sets the epoch passed to the dataset.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
        self.loader.set_epoch(epoch);
    }

    /// The epoch the next `iter` passes to the dataset.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The same loader, reading and dropping its first `n` steps of each epoch (Accelerate's
    /// `skip_first_batches` on an iterable loader: the skipped steps are still read, and dispatched when
    /// process 0 dispatches, so the data stays in step). The epoch is kept; [`len`](Self::len) is not
    /// reduced, as in Accelerate.
    pub fn skip_first_batches(mut self, n: usize) -> Self {
        self.skip_batches = n;
        self
    }

    /// Steps in an epoch when the dataset knows its length (`IterableDataset::known_len`), else `None`.
    /// Dispatching: process 0's batches per step as for a map-style loader; otherwise one step per window
    /// of `batch_size × P` samples (`batch_size` with split_batches), the last one padded unless drop_last.
    pub fn len(&self) -> Option<usize> {
        let n = self.loader.dataset.known_len()?;
        let o = &self.options;
        let p = o.num_processes.max(1);
        let bs = self.loader.batch_size.max(1);
        let count = |items: usize, window: usize| {
            if self.loader.drop_last {
                items / window
            } else {
                items.div_ceil(window)
            }
        };
        Some(if self.dispatches() {
            let whole = count(n, bs);
            match (o.split_batches, self.loader.drop_last) {
                (true, _) => whole,
                (false, true) => whole / p,
                (false, false) => whole.div_ceil(p),
            }
        } else if o.split_batches || p == 1 {
            count(n, bs)
        } else {
            count(n, bs * p)
        })
    }

    /// True when the dataset knows its length and an epoch has no step.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// This rank's batches of the current epoch, on its device, tracking the end of the loader.
    pub fn iter(&self) -> Result<Box<dyn Iterator<Item = Result<B>> + '_>> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let batches: Box<dyn Iterator<Item = Result<B>> + '_> =
            if let Some(group) = self.coordination.dispatch_group() {
                let source = (self.options.process_index == 0).then(|| {
                    chunked(
                        self.loader.dataset.iter(epoch),
                        self.loader.batch_size,
                        self.loader.drop_last,
                    )
                    .map(|items| (self.loader.collate)(items))
                });
                Box::new(Dispatch::new(
                    source,
                    group.clone(),
                    self.options,
                    self.loader.drop_last,
                    self.gradient_state.clone(),
                    self.skip_batches,
                ))
            } else {
                self.coordination.start_epoch()?;
                Box::new(self.local(epoch)?)
            };
        Ok(Box::new(EpochCounted::new(batches, &self.epoch)))
    }

    /// This rank's own slice of the stream (no dispatching): every sample on one process, else
    /// Accelerate's `IterableDatasetShard`.
    fn local(&self, epoch: u64) -> Result<impl Iterator<Item = Result<B>> + '_> {
        let o = &self.options;
        let batch_size = self.loader.batch_size;
        let p = o.num_processes.max(1);
        let (per_rank, total_batch) = match (p, o.split_batches) {
            (1, _) => (batch_size, batch_size),
            (_, true) => (batch_size / p, batch_size),
            (_, false) => (batch_size, batch_size * p),
        };
        let stream = self.loader.dataset.iter(epoch);
        let items: Box<dyn Iterator<Item = D::Item> + Send + '_> = if p == 1 {
            stream
        } else {
            Box::new(IterableDatasetShard::new(
                stream,
                batch_size,
                self.loader.drop_last,
                p,
                o.process_index,
                o.split_batches,
            )?)
        };
        {
            let mut g = self.gradient_state.lock();
            g.in_dataloader = true;
            g.end_of_dataloader = false;
            g.remainder = match (self.loader.drop_last, self.loader.dataset.known_len()) {
                (true, _) => -1,
                (false, Some(n)) => (n % total_batch.max(1)) as i64,
                (false, None) => -1,
            };
        }
        let collate = self.loader.collate.clone();
        // One process keeps a short last batch unless drop_last; a shard's windows are whole already.
        let drop_short = p == 1 && self.loader.drop_last;
        let mut batches = chunked(items, per_rank.max(1), drop_short)
            .map(move |b| collate(b))
            .skip(self.skip_batches)
            .peekable();
        let (device, non_blocking, state) = (o.device, o.non_blocking, self.gradient_state.clone());
        Ok(std::iter::from_fn(move || {
            let Some(current) = batches.next() else {
                state.lock().in_dataloader = false;
                return None;
            };
            if batches.peek().is_none() {
                state.lock().end_of_dataloader = true;
            }
            Some(current.and_then(|b| send_to_device(b, device, non_blocking, &[])))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    struct Stream(i64);

    impl IterableDataset for Stream {
        type Item = i64;
        fn iter(&self, epoch: u64) -> Box<dyn Iterator<Item = i64> + Send + '_> {
            let offset = epoch as i64 * 1000;
            Box::new((0..self.0).map(move |i| i + offset))
        }
        fn known_len(&self) -> Option<usize> {
            Some(self.0 as usize)
        }
    }

    fn options(rank: usize) -> ShardOptions {
        ShardOptions {
            num_processes: 2,
            process_index: rank,
            split_batches: false,
            even_batches: true,
            device: Device::Cpu,
            non_blocking: false,
        }
    }

    #[test]
    fn plain_batches() {
        let dl = IterableDataLoader::new(Stream(7), 3);
        let got: Vec<Vec<i64>> = dl
            .iter()
            .map(|b| Vec::<i64>::try_from(&b.unwrap()).unwrap())
            .collect();
        assert_eq!(got, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(
            IterableDataLoader::new(Stream(7), 3)
                .drop_last(true)
                .iter()
                .count(),
            2
        );
    }

    #[test]
    fn prepared_shards_take_their_slices_and_track_the_end() {
        let state = GradientStateHandle::default();
        let mut shard = IterableDataLoaderShard::new(
            IterableDataLoader::new(Stream(14), 3),
            options(1),
            state.clone(),
        );
        let mut seen = Vec::new();
        for b in shard.iter().unwrap() {
            seen.push(Vec::<i64>::try_from(&b.unwrap()).unwrap());
            assert_eq!(state.get().end_of_dataloader, seen.len() == 3);
        }
        // Windows of 6: [0..6) → 3,4,5; [6..12) → 9,10,11; tail [12, 13] + first window → 1,2,3.
        assert_eq!(seen, vec![vec![3, 4, 5], vec![9, 10, 11], vec![1, 2, 3]]);
        assert_eq!(state.get().remainder, 14 % 6);
        assert!(!state.get().in_dataloader);
        shard.set_epoch(1);
        let first: Vec<i64> =
            Vec::<i64>::try_from(&shard.iter().unwrap().next().unwrap().unwrap()).unwrap();
        assert_eq!(first, vec![1003, 1004, 1005]);
    }

    #[test]
    fn one_process_keeps_the_stream_as_it_is_and_skips_steps() {
        let state = GradientStateHandle::default();
        let one = ShardOptions {
            num_processes: 1,
            process_index: 0,
            ..options(0)
        };
        let batches = |shard: &IterableDataLoaderShard<Stream, tch::Tensor>| -> Vec<Vec<i64>> {
            shard
                .iter()
                .unwrap()
                .map(|b| Vec::<i64>::try_from(&b.unwrap()).unwrap())
                .collect()
        };
        // n=3, bs=2: [0,1] [2], nothing padded (Accelerate at P=1); len 2.
        let shard =
            IterableDataLoaderShard::new(IterableDataLoader::new(Stream(3), 2), one, state.clone());
        assert_eq!(shard.len(), Some(2));
        assert_eq!(batches(&shard), vec![vec![0, 1], vec![2]]);
        let shard = IterableDataLoaderShard::new(
            IterableDataLoader::new(Stream(7), 3).drop_last(true),
            one,
            state.clone(),
        );
        assert_eq!(shard.len(), Some(2));
        assert_eq!(batches(&shard), vec![vec![0, 1, 2], vec![3, 4, 5]]);
        // Skipping drops steps and leaves len as it was; each finished epoch moves the epoch on.
        let shard = IterableDataLoaderShard::new(IterableDataLoader::new(Stream(7), 3), one, state)
            .skip_first_batches(1);
        assert_eq!(shard.len(), Some(3));
        assert_eq!(batches(&shard), vec![vec![3, 4, 5], vec![6]]);
        assert_eq!(shard.epoch(), 1);
        assert_eq!(batches(&shard), vec![vec![1003, 1004, 1005], vec![1006]]);
    }
}
