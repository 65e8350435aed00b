//! Data for training: samplers and Accelerate's sharding of batches between processes.
//!
//! (The `Dataset` trait, collation and the prefetching `DataLoader` that `Accelerator::prepare` wraps come
//! next; what is here is the part whose semantics Accelerate's tests pin down exactly.)

mod sampler;
mod shard;

pub use sampler::{BatchSampler, BatchSource, FixedBatches, Sampler};
pub use shard::{BatchSamplerShard, IterableDatasetShard};
