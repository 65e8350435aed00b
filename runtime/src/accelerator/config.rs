//! The Accelerator's settings: Accelerate's plugins, configurations and kwargs handlers, with its
//! defaults.

use std::time::Duration;

/// Gradient accumulation (Accelerate's `GradientAccumulationPlugin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradientAccumulationPlugin {
    /// Micro-batches per optimizer step (default 1).
    pub num_steps: usize,
    /// Count the scheduler's steps as if every batch were an optimizer step (default true).
    pub adjust_scheduler: bool,
    /// Synchronise (and step) at the end of each data loader even mid-accumulation (default true).
    pub sync_with_dataloader: bool,
    /// Synchronise gradients on every batch, even while accumulating (default false).
    pub sync_each_batch: bool,
}

impl Default for GradientAccumulationPlugin {
    fn default() -> Self {
        GradientAccumulationPlugin {
            num_steps: 1,
            adjust_scheduler: true,
            sync_with_dataloader: true,
            sync_each_batch: false,
        }
    }
}

/// How prepared data loaders shard and place batches (Accelerate's `DataLoaderConfiguration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLoaderConfiguration {
    /// Cut each batch across processes instead of dealing whole batches (default false).
    pub split_batches: bool,
    /// Process 0 reads the data and sends each process its part of every batch (Accelerate's
    /// `DataLoaderDispatcher`). Default `None`: true for iterable datasets, false for map-style ones.
    pub dispatch_batches: Option<bool>,
    /// Complete the tail so every process gets as many batches (default true).
    pub even_batches: bool,
    /// Shuffle with a seed shared by all ranks (default false; hasten's shuffling is always seeded).
    pub use_seedable_sampler: bool,
    /// The seed for seedable sampling (default none).
    pub data_seed: Option<u64>,
    /// Asynchronous host-to-GPU copies of batches (default false).
    pub non_blocking: bool,
}

impl Default for DataLoaderConfiguration {
    fn default() -> Self {
        DataLoaderConfiguration {
            split_batches: false,
            dispatch_batches: None,
            even_batches: true,
            use_seedable_sampler: false,
            data_seed: None,
            non_blocking: false,
        }
    }
}

/// Data-parallel settings (Accelerate's `DistributedDataParallelKwargs`, the fields that apply).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedDataParallelKwargs {
    /// Size of a gradient all-reduce bucket in MiB (default 25).
    pub bucket_cap_mb: f64,
    /// Tolerate parameters without gradients in a step: they count as zero (default false, which
    /// makes a missing gradient an error, as DDP does).
    pub find_unused_parameters: bool,
    /// Broadcast buffers (batch-norm statistics…) from rank 0 at prepare time (default true).
    pub broadcast_buffers: bool,
}

impl Default for DistributedDataParallelKwargs {
    fn default() -> Self {
        DistributedDataParallelKwargs {
            bucket_cap_mb: 25.0,
            find_unused_parameters: false,
            broadcast_buffers: true,
        }
    }
}

/// Process-group settings (Accelerate's `InitProcessGroupKwargs`, the fields that apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InitProcessGroupKwargs {
    /// The process group's timeout, as in Accelerate: how long joining may take and how long a
    /// collective may wait for the other ranks before it fails, naming the ranks that never arrived
    /// (default: `HASTEN_RDZV_TIMEOUT`, else 120 s, to join; `HASTEN_COLLECTIVE_TIMEOUT`, else 600 s, a
    /// collective).
    pub timeout: Option<Duration>,
}

/// Autocast settings (Accelerate's `AutocastKwargs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutocastKwargs {
    /// Whether `autocast` casts at all (default true).
    pub enabled: bool,
}

impl Default for AutocastKwargs {
    fn default() -> Self {
        AutocastKwargs { enabled: true }
    }
}

/// Where the Accelerator saves (Accelerate's `ProjectConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProjectConfiguration {
    /// The project folder.
    pub project_dir: Option<std::path::PathBuf>,
    /// Where trackers log (default: the project folder).
    pub logging_dir: Option<std::path::PathBuf>,
    /// Name checkpoints `checkpoints/checkpoint_{i}` automatically (default false).
    pub automatic_checkpoint_naming: bool,
    /// Keep at most this many automatic checkpoints (default: all).
    pub total_limit: Option<usize>,
    /// The next checkpoint's number (default 0).
    pub iteration: usize,
    /// Save on every node's local main process instead of the main process only (default false).
    pub save_on_each_node: bool,
}
