//! # hasten
//!
//! HuggingFace Accelerate's runtime, in Rust, on libtorch (through `tch`): the same environment contract,
//! names, defaults and file formats, so a job, a config file or a checkpoint moves between Python
//! Accelerate and hasten unchanged.
//!
//! The crate root holds what Accelerate's top-level `accelerate` package exports (the Accelerator, its
//! plugins and kwargs, the big-model entry points, `find_executable_batch_size`, the process state) and
//! the prelude; everything else lives in the module its name says:
//!
//! - [`accelerator`]: [`Accelerator`], its builder, plugins and kwargs, the [`PreparedModel`] and the
//!   optimizer/scheduler wrappers: `prepare` for models (DDP with gradient buckets all-reduced during the
//!   backward), optimizers, data loaders and schedulers; mixed precision, gradient accumulation and
//!   clipping, `save_state`/`load_state`, trackers. README's training loop.
//! - [`data`]: datasets, collation, samplers, the prefetching [`data::DataLoader`] and Accelerate's
//!   sharding rules (`BatchSamplerShard`, `IterableDatasetShard`, dispatching, `skip_first_batches`).
//! - [`ops`]: operations on nested data ([`Nested`]): `gather`, `broadcast`, `reduce`,
//!   `pad_across_processes`, `send_to_device`, …
//! - [`distributed`]: [`ProcessGroup`] (rendezvous over TCP; collectives on NCCL for GPU tensors and TCP
//!   or shared memory for CPU ones, with timeouts that name the rank that did not arrive) and the
//!   [`Group`] handle an Accelerator shares.
//! - [`big_modeling`]: empty weights, device maps, checkpoint loading by map, CPU and disk offload,
//!   dispatch ([`load_checkpoint_and_dispatch`], [`dispatch_model`]); [`layers`]: tch layers that can be
//!   built without memory.
//! - [`optim`]: fused [`optim::AdamW`] and [`optim::Sgd`], tch's optimizers ([`optim::TchOptimizer`]).
//! - [`tracking`]: experiment trackers; [`memory`]: finding a batch size that fits; [`random`]: seeding
//!   and generator states; [`state`]: the process and gradient states.
//! - [`utils`]: the job's ground as Accelerate's `accelerate.utils` has it: devices, Accelerate's enums,
//!   file names, config file and environment helpers.
//!
//! ```no_run
//! use hasten::{ProcessState, set_seed};
//!
//! let state = ProcessState::from_env()?;
//! set_seed(42, true)?; // offset by the rank: every rank draws differently
//! println!("rank {} of {} on {:?}", state.process_index(), state.num_processes(), state.device);
//! # Ok::<(), hasten::Error>(())
//! ```
//!
//! Binaries linking hasten find libtorch through an rpath set by a two-line build script (see
//! `runtime/build_libtorch.rs`); libtorch's CUDA half is loaded at run time when present ([`libtorch()`]).
#![deny(missing_docs)]

pub mod accelerator;
pub mod big_modeling;
mod config;
pub mod data;
mod device;
pub mod distributed;
mod error;
pub mod layers;
mod log;
pub mod memory;
pub mod ops;
pub mod optim;
pub mod random;
mod report;
mod shim;
pub mod state;
pub mod tracking;
pub mod utils;

// Accelerate's top level (`from accelerate import …`).
pub use accelerator::{
    AcceleratedOptimizer, AcceleratedScheduler, Accelerator, AcceleratorBuilder, AutocastKwargs,
    DataLoaderConfiguration, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin,
    GradScalerKwargs, GradientAccumulationPlugin, InitProcessGroupKwargs, ParallelismConfig,
    PreparedModel, ProjectConfiguration, Schedule,
};
pub use big_modeling::{
    cpu_offload, disk_offload, dispatch_model, infer_auto_device_map, load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
};
pub use distributed::{Group, ProcessGroup, ReduceOp};
pub use error::{Error, Result};
pub use hasten_core::{DistributedType, PrecisionType};
pub use layers::{init_empty_weights, init_on_device};
pub use memory::find_executable_batch_size;
pub use ops::{Nested, Reduction};
pub use random::set_seed;
pub use state::ProcessState;

// The rest keeps its crate-wide path inside hasten (`crate::X`); users name it by its module.
pub(crate) use data::{IterableDataLoader, IterableDataLoaderShard, IterableDataset};
pub(crate) use device::{
    cuda_device_count, cuda_devices, is_bf16_available, is_cuda_available, matmul_check,
    select_device,
};
pub(crate) use distributed::{collective_timeout_from_env, nccl_version, rdzv_timeout_from_env};
pub(crate) use hasten_core::{
    CudaLoad, EnvContract, LibtorchInfo, LoggerType, MIXED_PRECISION_VAR, RNGType,
    SAFE_WEIGHTS_NAME, default_config_file, parse_flag_from_env, write_basic_config_for,
};
pub(crate) use ops::{
    Layout, concatenate, convert_to_fp32, map_tensors, send_to_device, slice_tensors, tensors_of,
};
pub(crate) use optim::Optimizer;
pub(crate) use random::{rng_states, set_rng_states};
pub(crate) use state::{GradientState, GradientStateHandle};
pub(crate) use tracking::GeneralTracker;

/// rand, re-exported for [`random::HostRng`] (an `rand::RngCore`).
pub use rand;
/// tch, re-exported so user code uses the exact libtorch binding hasten was built with.
pub use tch;

/// What a training script or a notebook usually needs, for `use hasten::prelude::*;` (the Jupyter kernel
/// brings it into every notebook): the Accelerator and its configuration, data loading, optimizers and
/// schedules, collectives, seeding, and tch's everyday names. It leaves `Result` and `Error` alone, so
/// `std`'s stay in scope.
pub mod prelude {
    pub use crate::data::{
        Collate, DataLoader, Dataset, IterableDataLoader, IterableDataset, TensorDataset,
    };
    pub use crate::optim::{AdamW, Sgd, TchOptimizer};
    pub use crate::tracking::{LogValue, log_values};
    pub use crate::utils::LoggerType;
    pub use crate::{
        AcceleratedOptimizer, AcceleratedScheduler, Accelerator, AutocastKwargs,
        DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, GradScalerKwargs,
        GradientAccumulationPlugin, PrecisionType, PreparedModel, ProcessGroup, ProcessState,
        ProjectConfiguration, Reduction, Schedule, layers, set_seed, tch,
    };
    pub use tch::nn::{self, Module, ModuleT, OptimizerConfig};
    pub use tch::{Device, IndexOp, Kind, Tensor};
}

/// Facts about the libtorch this process runs on, loading its CUDA half on first use (see
/// [`LibtorchInfo`]). Every hasten function that asks about CUDA goes through here.
pub fn libtorch() -> &'static LibtorchInfo {
    // Make sure libtorch is mapped (it is, in any program calling this) before looking for it.
    let _ = tch::get_num_threads();
    hasten_core::libtorch()
}
