//! Data for training: datasets, collation, samplers, the prefetching data loader, and Accelerate's
//! sharding of batches between processes.

mod dataset;
mod dispatch;
mod iterable;
mod loader;
mod sampler;
mod shard;

pub use dataset::{Collate, Dataset, TensorDataset, TensorTuple};
pub(crate) use dispatch::Coordination;
pub use iterable::{IterableDataLoader, IterableDataLoaderShard, IterableDataset};
pub use loader::{Batches, DataLoader, DataLoaderShard, ShardBatches, ShardOptions};
pub use sampler::{BatchSampler, BatchSource, FixedBatches, Sampler};
pub use shard::{BatchSamplerShard, IterableDatasetShard};
