//! The data loader: batches of a dataset, collated on worker threads ahead of the training loop; and its
//! prepared form, which gives each rank its shard (Accelerate's `DataLoaderShard`), moves batches to the
//! device, and tells the gradient state when the last batch is being processed.

use super::dataset::{Collate, Dataset};
use super::dispatch::{Coordination, Dispatch};
use super::sampler::{BatchSampler, BatchSource, Sampler};
use super::shard::BatchSamplerShard;
use crate::{GradientStateHandle, Nested, Result, send_to_device};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use tch::Device;

type CollateFn<I, B> = Arc<dyn Fn(Vec<I>) -> Result<B> + Send + Sync>;

/// Batches of a map-style dataset (PyTorch's `DataLoader`).
pub struct DataLoader<D: Dataset, B> {
    dataset: Arc<D>,
    batch_sampler: BatchSampler,
    collate: CollateFn<D::Item, B>,
    num_workers: usize,
    prefetch_factor: usize,
}

impl<D> DataLoader<D, <D::Item as Collate>::Batch>
where
    D: Dataset + 'static,
    D::Item: Collate,
{
    /// Batches of `batch_size` in order, collated with [`Collate`], the last one kept even if short.
    pub fn new(dataset: D, batch_size: usize) -> Self {
        let len = dataset.len();
        DataLoader {
            dataset: Arc::new(dataset),
            batch_sampler: BatchSampler::new(Sampler::Sequential { len }, batch_size, false),
            collate: Arc::new(<D::Item as Collate>::collate),
            num_workers: 0,
            prefetch_factor: 2,
        }
    }
}

impl<D: Dataset + 'static, B: Send + 'static> DataLoader<D, B> {
    /// Shuffles every epoch with a permutation drawn from `seed + epoch` (default: in order).
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.batch_sampler.sampler = Sampler::Random {
            len: self.dataset.len(),
            seed,
            epoch: 0,
        };
        self
    }

    /// Replaces the seed of a shuffled loader (the Accelerator's `data_seed`); an ordered loader stays
    /// ordered.
    pub fn reseed(&mut self, new_seed: u64) {
        if let Sampler::Random { seed, .. } = &mut self.batch_sampler.sampler {
            *seed = new_seed;
        }
    }

    /// Drops a short last batch (default false).
    pub fn drop_last(mut self, on: bool) -> Self {
        self.batch_sampler.drop_last = on;
        self
    }

    /// Collates on this many threads ahead of the loop (default 0: in the loop's thread).
    pub fn num_workers(mut self, n: usize) -> Self {
        self.num_workers = n;
        self
    }

    /// Batches each worker prepares ahead (default 2).
    pub fn prefetch_factor(mut self, n: usize) -> Self {
        self.prefetch_factor = n.max(1);
        self
    }

    /// Uses `f` instead of the default collation.
    pub fn collate_fn<B2: Send + 'static>(
        self,
        f: impl Fn(Vec<D::Item>) -> Result<B2> + Send + Sync + 'static,
    ) -> DataLoader<D, B2> {
        DataLoader {
            dataset: self.dataset,
            batch_sampler: self.batch_sampler,
            collate: Arc::new(f),
            num_workers: self.num_workers,
            prefetch_factor: self.prefetch_factor,
        }
    }

    /// Samples per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_sampler.batch_size
    }

    /// Number of batches in an epoch.
    pub fn len(&self) -> usize {
        self.batch_sampler.len()
    }

    /// True when an epoch has no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dataset.
    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// Sets the epoch, which reshuffles a shuffled loader.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.batch_sampler.set_epoch(epoch);
    }

    /// The batches of one epoch, in order.
    pub fn iter(&self) -> Batches<B> {
        self.batches_of(self.batch_sampler.batches())
    }

    fn batches_of(&self, indices: Vec<Vec<usize>>) -> Batches<B> {
        Batches::start(
            self.dataset.clone(),
            indices,
            self.collate.clone(),
            self.num_workers,
            self.prefetch_factor,
        )
    }
}

/// An epoch of batches. With workers, batch i is collated by worker i mod N and read back in order.
pub struct Batches<B> {
    inner: BatchesInner<B>,
    next: usize,
    total: usize,
}

enum BatchesInner<B> {
    Inline(Box<dyn FnMut(usize) -> Result<B> + Send>),
    Workers(Vec<Receiver<Result<B>>>),
}

impl<B: Send + 'static> Batches<B> {
    fn start<D: Dataset + 'static>(
        dataset: Arc<D>,
        indices: Vec<Vec<usize>>,
        collate: CollateFn<D::Item, B>,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let total = indices.len();
        let build = move |ds: &D, idx: &[usize]| collate(idx.iter().map(|&i| ds.get(i)).collect());
        if workers == 0 {
            return Batches {
                inner: BatchesInner::Inline(Box::new(move |i| build(&dataset, &indices[i]))),
                next: 0,
                total,
            };
        }
        let indices = Arc::new(indices);
        let build = Arc::new(build);
        let receivers = (0..workers)
            .map(|w| {
                let (tx, rx): (SyncSender<Result<B>>, Receiver<Result<B>>) = sync_channel(prefetch);
                let (ds, idx, build) = (dataset.clone(), indices.clone(), build.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("hasten-data-{w}"))
                    .spawn(move || {
                        for i in (w..idx.len()).step_by(workers) {
                            // The receiver is gone when the loop stopped early: stop too.
                            if tx.send(build(&ds, &idx[i])).is_err() {
                                break;
                            }
                        }
                    });
                if let Err(e) = spawned {
                    crate::log::event!(
                        warn,
                        target: "hasten::data",
                        "hasten: could not start data worker {w}: {e}"
                    );
                }
                rx
            })
            .collect();
        Batches {
            inner: BatchesInner::Workers(receivers),
            next: 0,
            total,
        }
    }
}

impl<B> Iterator for Batches<B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        if self.next >= self.total {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some(match &mut self.inner {
            BatchesInner::Inline(f) => f(i),
            BatchesInner::Workers(rx) => rx[i % rx.len()].recv().unwrap_or_else(|_| {
                Err(crate::Error::DataWorkerStopped {
                    worker: i % rx.len(),
                    batch: i,
                })
            }),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.next;
        (left, Some(left))
    }
}

/// How a prepared data loader shards and places its batches (Accelerate's `DataLoaderConfiguration`
/// fields that apply here, plus the process's place).
#[derive(Debug, Clone, Copy)]
pub struct ShardOptions {
    /// Number of processes.
    pub num_processes: usize,
    /// This process's rank.
    pub process_index: usize,
    /// Cut each batch across processes instead of dealing whole batches (default false).
    pub split_batches: bool,
    /// Complete the tail so every process gets the same number of batches (default true).
    pub even_batches: bool,
    /// Where batches go.
    pub device: Device,
    /// Asynchronous host-to-GPU copies (default false).
    pub non_blocking: bool,
}

/// A data loader prepared for one rank: its shard of every epoch, on its device.
///
/// As Accelerate's `DataLoaderShard`, it counts epochs itself: each epoch iterated to its end moves a
/// shuffled loader on to the next order (`set_epoch` sets the count). With one process it takes every
/// batch as the loader makes them (nothing is padded or dealt).
pub struct DataLoaderShard<D: Dataset, B> {
    loader: DataLoader<D, B>,
    options: ShardOptions,
    gradient_state: GradientStateHandle,
    skip_batches: usize,
    /// Accelerate's `iteration`: the epoch the next `iter` draws, advanced when an epoch ends.
    epoch: Arc<AtomicU64>,
    /// Dispatching from process 0, or synchronising generators at each epoch.
    coordination: Coordination,
}

impl<D: Dataset + 'static, B: Nested + Send + 'static> DataLoaderShard<D, B> {
    /// Prepares `loader` for the rank described by `options`, reporting to `gradient_state`.
    pub fn new(
        loader: DataLoader<D, B>,
        options: ShardOptions,
        gradient_state: GradientStateHandle,
    ) -> Self {
        DataLoaderShard {
            loader,
            options,
            gradient_state,
            skip_batches: 0,
            epoch: Arc::new(AtomicU64::new(0)),
            coordination: Coordination::Alone,
        }
    }

    /// The same loader, working with the other processes as `coordination` says (set by the Accelerator).
    pub(crate) fn coordinated(mut self, coordination: Coordination) -> Self {
        self.coordination = coordination;
        self
    }

    /// True when process 0 reads the data and dispatches its batches.
    pub fn dispatches(&self) -> bool {
        self.coordination.dispatch_group().is_some()
    }

    /// Batches of the whole job per step: `batch_size × P`, or `batch_size` with split_batches.
    pub fn total_batch_size(&self) -> usize {
        if self.options.split_batches {
            self.loader.batch_size()
        } else {
            self.loader.batch_size() * self.options.num_processes
        }
    }

    fn shard<'a>(&self, sampler: &'a BatchSampler) -> Result<BatchSamplerShard<&'a BatchSampler>> {
        BatchSamplerShard::new(
            sampler,
            self.options.num_processes,
            self.options.process_index,
            self.options.split_batches,
            self.options.even_batches,
        )
    }

    /// This rank's batches of indices for the current epoch (all of them on one process).
    fn epoch_batches(&self) -> Result<Vec<Vec<usize>>> {
        let mut sampler = self.loader.batch_sampler.clone();
        sampler.set_epoch(self.epoch.load(Ordering::SeqCst));
        if self.options.num_processes == 1 {
            return Ok(sampler.batches());
        }
        Ok(self.shard(&sampler)?.batches())
    }

    /// Number of batches this rank gets in an epoch (after any skipped ones).
    pub fn len(&self) -> usize {
        let k = self.skip_batches;
        if self.dispatches() {
            // Process 0 sends P of the loader's batches per step (one with split_batches); skipping
            // drops batches of the loader, not steps, as Accelerate's SkipBatchSampler does.
            let (whole, p) = (
                self.loader.len().saturating_sub(k),
                self.options.num_processes.max(1),
            );
            return match (
                self.options.split_batches,
                self.loader.batch_sampler.drop_last,
            ) {
                (true, _) => whole,
                (false, true) => whole / p,
                (false, false) => whole.div_ceil(p),
            };
        }
        let n = if self.options.num_processes == 1 {
            self.loader.len()
        } else {
            self.shard(&self.loader.batch_sampler)
                .map_or(0, |s| s.len())
        };
        n.saturating_sub(k)
    }

    /// True when this rank gets no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the epoch (reshuffling a shuffled loader the same way on every rank).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
        self.loader.set_epoch(epoch);
    }

    /// The epoch the next `iter` draws: the last `set_epoch`, plus one for every epoch iterated to its
    /// end since (Accelerate's `iteration`).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The same loader, starting `n` batches into each epoch (Accelerate's `skip_first_batches`), to
    /// resume mid-epoch. The epoch is kept. On a loader that dispatches from process 0, `n` counts the
    /// loader's own batches (process 0 reads `P` of them per step without split_batches), as in
    /// Accelerate; otherwise this rank's steps.
    pub fn skip_first_batches(mut self, n: usize) -> Self {
        self.skip_batches = n;
        self
    }

    /// This rank's batches of the current epoch, on its device. While they are iterated the gradient
    /// state knows it is inside a data loader, and `end_of_dataloader` is true during the last batch.
    pub fn iter(&self) -> Result<ShardBatches<B>> {
        if let Some(group) = self.coordination.dispatch_group() {
            let source = (self.options.process_index == 0).then(|| {
                let mut sampler = self.loader.batch_sampler.clone();
                sampler.set_epoch(self.epoch.load(Ordering::SeqCst));
                let mut batches = sampler.batches();
                batches.drain(..self.skip_batches.min(batches.len()));
                self.loader.batches_of(batches)
            });
            let dispatch = Dispatch::new(
                source,
                group.clone(),
                self.options,
                self.loader.batch_sampler.drop_last,
                self.gradient_state.clone(),
                0,
            );
            return Ok(ShardBatches {
                inner: EpochCounted::new(Inner::Dispatched(dispatch), &self.epoch),
            });
        }
        self.coordination.start_epoch()?;
        let mut indices = self.epoch_batches()?;
        indices.drain(..self.skip_batches.min(indices.len()));
        {
            let mut g = self.gradient_state.lock();
            g.in_dataloader = true;
            g.end_of_dataloader = false;
            // Accelerate counts the remainder only where a short last step can carry padding; with
            // drop_last it stays unknown (-1).
            g.remainder = if self.loader.batch_sampler.drop_last {
                -1
            } else {
                (self.loader.dataset.len() % self.total_batch_size().max(1)) as i64
            };
        }
        let local = LocalBatches {
            inner: self.loader.batches_of(indices),
            ahead: None,
            device: self.options.device,
            non_blocking: self.options.non_blocking,
            gradient_state: self.gradient_state.clone(),
        };
        Ok(ShardBatches {
            inner: EpochCounted::new(Inner::Local(local), &self.epoch),
        })
    }
}

/// A rank's batches for one epoch: its own shard, or its slices of what process 0 dispatches.
pub struct ShardBatches<B> {
    inner: EpochCounted<Inner<B>>,
}

enum Inner<B> {
    Local(LocalBatches<B>),
    Dispatched(Dispatch<Batches<B>, B>),
}

impl<B: Nested + Send + 'static> Iterator for Inner<B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        match self {
            Inner::Local(local) => local.next(),
            Inner::Dispatched(dispatch) => dispatch.next(),
        }
    }
}

impl<B: Nested + Send + 'static> Iterator for ShardBatches<B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        self.inner.next()
    }
}

/// An epoch's batches that advance their loader's epoch count once they end (Accelerate's
/// `iteration += 1` after its loader's generator is exhausted). An epoch that failed does not count.
pub(super) struct EpochCounted<I> {
    inner: I,
    epoch: Option<Arc<AtomicU64>>,
}

impl<I> EpochCounted<I> {
    pub(super) fn new(inner: I, epoch: &Arc<AtomicU64>) -> Self {
        EpochCounted {
            inner,
            epoch: Some(epoch.clone()),
        }
    }
}

impl<B, I: Iterator<Item = Result<B>>> Iterator for EpochCounted<I> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        let next = self.inner.next();
        match &next {
            Some(Err(_)) => self.epoch = None,
            None => {
                if let Some(epoch) = self.epoch.take() {
                    epoch.fetch_add(1, Ordering::SeqCst);
                }
            }
            Some(Ok(_)) => {}
        }
        next
    }
}

/// A rank's own shard. One batch is read ahead so the last one is known as the last.
struct LocalBatches<B> {
    inner: Batches<B>,
    ahead: Option<Result<B>>,
    device: Device,
    non_blocking: bool,
    gradient_state: GradientStateHandle,
}

impl<B: Nested> LocalBatches<B> {
    fn next(&mut self) -> Option<Result<B>> {
        let current = match self.ahead.take() {
            Some(b) => Some(b),
            None => self.inner.next(),
        };
        let Some(current) = current else {
            let mut g = self.gradient_state.lock();
            g.in_dataloader = false;
            return None;
        };
        self.ahead = self.inner.next();
        if self.ahead.is_none() {
            self.gradient_state.lock().end_of_dataloader = true;
        }
        Some(current.and_then(|b| send_to_device(b, self.device, self.non_blocking, &[])))
    }
}

impl<T: BatchSource + Sync + ?Sized> BatchSource for &T {
    fn batch_size(&self) -> Option<usize> {
        (**self).batch_size()
    }
    fn drop_last(&self) -> bool {
        (**self).drop_last()
    }
    fn batches(&self) -> Vec<Vec<usize>> {
        (**self).batches()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::TensorDataset;
    use tch::{Kind, Tensor};

    fn dataset(n: i64) -> TensorDataset {
        TensorDataset::new(vec![Tensor::arange(n, (Kind::Int64, Device::Cpu))]).unwrap()
    }

    fn values(batches: impl Iterator<Item = Result<Vec<Tensor>>>) -> Vec<Vec<i64>> {
        batches
            .map(|b| Vec::<i64>::try_from(&b.unwrap()[0]).unwrap())
            .collect()
    }

    #[test]
    fn workers_keep_the_order() {
        for workers in [0, 1, 3] {
            let dl = DataLoader::new(dataset(10), 3).num_workers(workers);
            assert_eq!(
                values(dl.iter()),
                vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]],
                "{workers} workers"
            );
        }
        let dl = DataLoader::new(dataset(10), 3).drop_last(true);
        assert_eq!(dl.len(), 3);
        // Stopping early does not hang the workers.
        let dl = DataLoader::new(dataset(100), 2).num_workers(2);
        assert_eq!(dl.iter().take(3).count(), 3);
    }

    #[test]
    fn shuffling_is_per_epoch_and_reproducible() {
        let mut dl = DataLoader::new(dataset(20), 5).shuffle(7);
        let e0 = values(dl.iter());
        assert_eq!(
            e0,
            values(DataLoader::new(dataset(20), 5).shuffle(7).iter())
        );
        dl.set_epoch(1);
        assert_ne!(values(dl.iter()), e0);
        let mut other = DataLoader::new(dataset(20), 5).shuffle(7);
        other.reseed(8);
        assert_ne!(values(other.iter()), e0);
        let mut ordered = DataLoader::new(dataset(20), 5);
        ordered.reseed(8);
        assert_eq!(
            values(ordered.iter())[0],
            vec![0, 1, 2, 3, 4],
            "reseeding keeps an ordered loader ordered"
        );
    }

    #[test]
    fn shards_track_the_end_of_the_dataloader_and_the_remainder() {
        let state = GradientStateHandle::default();
        let options = |rank| ShardOptions {
            num_processes: 2,
            process_index: rank,
            split_batches: false,
            even_batches: true,
            device: Device::Cpu,
            non_blocking: false,
        };
        // range(22), batch 3, 2 ranks: Accelerate's table (rank 1 ends with [21, 0, 1]).
        let shard =
            DataLoaderShard::new(DataLoader::new(dataset(22), 3), options(1), state.clone());
        assert_eq!(shard.len(), 4);
        let it = shard.iter().unwrap();
        assert_eq!(state.get().remainder, 22 % 6);
        let mut seen = Vec::new();
        for b in it {
            seen.push(Vec::<i64>::try_from(&b.unwrap()[0]).unwrap());
            assert_eq!(
                state.get().end_of_dataloader,
                seen.len() == 4,
                "after batch {}",
                seen.len()
            );
            assert!(state.get().in_dataloader);
        }
        assert!(!state.get().in_dataloader);
        assert_eq!(
            seen,
            vec![
                vec![3, 4, 5],
                vec![9, 10, 11],
                vec![15, 16, 17],
                vec![21, 0, 1]
            ]
        );
        // Resuming mid-epoch.
        let resumed = DataLoaderShard::new(DataLoader::new(dataset(22), 3), options(1), state)
            .skip_first_batches(2);
        assert_eq!(resumed.len(), 2);
        assert_eq!(
            values(resumed.iter().unwrap()),
            vec![vec![15, 16, 17], vec![21, 0, 1]]
        );
    }

    fn one_process(split: bool, even: bool) -> ShardOptions {
        ShardOptions {
            num_processes: 1,
            process_index: 0,
            split_batches: split,
            even_batches: even,
            device: Device::Cpu,
            non_blocking: false,
        }
    }

    #[test]
    fn one_process_takes_the_batches_as_they_are() {
        // Accelerate 1.15 at P=1: no sharding, the short last batch kept, whatever split/even say.
        for (split, even) in [(false, true), (true, true), (false, false), (true, false)] {
            let state = GradientStateHandle::default();
            for (n, bs, want) in [
                (3, 2, vec![vec![0, 1], vec![2]]),
                (5, 2, vec![vec![0, 1], vec![2, 3], vec![4]]),
                (7, 3, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]),
            ] {
                let shard = DataLoaderShard::new(
                    DataLoader::new(dataset(n), bs),
                    one_process(split, even),
                    state.clone(),
                );
                assert_eq!(shard.len(), want.len());
                let it = shard.iter().unwrap();
                assert_eq!(state.get().remainder, n % bs as i64);
                assert_eq!(values(it), want, "n={n} bs={bs} split={split} even={even}");
            }
            // drop_last: the short batch goes, and the remainder stays unknown (-1), as in Accelerate.
            let shard = DataLoaderShard::new(
                DataLoader::new(dataset(7), 3).drop_last(true),
                one_process(split, even),
                state.clone(),
            );
            let it = shard.iter().unwrap();
            assert_eq!(state.get().remainder, -1);
            assert_eq!(values(it), vec![vec![0, 1, 2], vec![3, 4, 5]]);
        }
    }

    #[test]
    fn each_finished_epoch_draws_the_next_order() {
        // Accelerate's DataLoaderShard counts epochs itself: iterating to the end moves on (seed 42:
        // epochs 0 and 1 are torch.randperm with seeds 42 and 43); a broken-off epoch does not count.
        let state = GradientStateHandle::default();
        let mut shard = DataLoaderShard::new(
            DataLoader::new(dataset(10), 5).shuffle(42),
            one_process(false, true),
            state,
        );
        let flat = |b: Vec<Vec<i64>>| b.concat();
        assert_eq!(
            flat(values(shard.iter().unwrap())),
            [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]
        );
        assert_eq!(shard.epoch(), 1);
        assert_eq!(shard.iter().unwrap().take(1).count(), 1);
        assert_eq!(shard.epoch(), 1, "an epoch stopped early does not count");
        assert_eq!(
            flat(values(shard.iter().unwrap())),
            [8, 4, 9, 0, 5, 1, 6, 7, 2, 3]
        );
        shard.set_epoch(0);
        assert_eq!(flat(values(shard.iter().unwrap()))[..2], [2, 6]);
    }
}
