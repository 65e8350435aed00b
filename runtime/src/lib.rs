//! # hasten
//!
//! HuggingFace Accelerate's runtime, in Rust, on libtorch (through `tch`): the same environment contract,
//! names, defaults and file formats, so a job, a config file or a checkpoint moves between Python
//! Accelerate and hasten unchanged.
//!
//! What a worker process needs, in layers:
//!
//! - [`Accelerator`]: Accelerate's training facade: `prepare` for models (DDP with gradient buckets
//!   all-reduced during the backward), optimizers, data loaders and schedulers; mixed precision,
//!   gradient accumulation and clipping, `save_state`/`load_state`, trackers. README's training loop.
//! - Data ([`DataLoader`], samplers, `BatchSamplerShard`, `IterableDatasetShard`,
//!   `skip_first_batches`) with Accelerate's sharding rules, and the collective operations on nested
//!   data (`gather`, `broadcast`, `reduce`, `pad_across_processes`, …).
//! - [`ProcessGroup`]: rendezvous over TCP and collectives, on NCCL for GPU tensors and TCP or shared
//!   memory for CPU ones, with timeouts that name the rank that did not arrive.
//! - Big-model inference: empty weights, device maps, checkpoint loading by map, CPU and disk offload,
//!   dispatch ([`load_checkpoint_and_dispatch`], [`dispatch_model`]).
//! - The job's ground: its place in the job ([`ProcessState`], from torchrun's, SLURM's or MPI's
//!   variables), devices, Accelerate's enums, file names and config file, seeding.
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

mod accelerator;
mod big_modeling;
mod config;
mod data;
mod device;
mod distributed;
pub mod layers;
mod memory;
mod ops;
mod optim;
mod random;
mod report;
mod shim;
mod state;
mod tracking;

pub use accelerator::{
    ACCELERATOR_STATE_NAME, AcceleratedOptimizer, AcceleratedScheduler, Accelerator,
    AcceleratorBuilder, AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs,
    GradScaler, GradScalerKwargs, GradientAccumulationPlugin, InitProcessGroupKwargs,
    PreparedModel, ProjectConfiguration, Schedule, Splittable, autocast,
};
pub use big_modeling::{
    DeviceKey, DeviceMap, DeviceMapOptions, DeviceMapSpec, DispatchOptions, DispatchedSequential,
    Dispatcher, LoadOptions, LoadReport, MaxMemory, ModelSkeleton, OffloadFolder, TensorMeta,
    calculate_maximum_sizes, check_device_map, checkpoint_files, clean_device_map,
    compute_module_sizes, compute_module_total_buffer_size, convert_bytes,
    convert_file_size_to_int, cpu_offload, device_key_of, device_of, disk_offload, dispatch_model,
    dtype_byte_size, estimate_memory_table, estimate_training_usage, find_tied_parameters,
    get_balanced_memory, get_max_layer_size, get_max_memory, infer_auto_device_map,
    kind_from_safetensors, kind_from_torch_name, load_checkpoint_and_dispatch,
    load_checkpoint_in_model, load_offloaded_weight, load_offloaded_weights, load_state_dict,
    offload_state_dict, offload_weight, parse_device_key, parse_max_memory,
    read_safetensors_header, retie_parameters, save_offload_index, set_module_tensor_to_device,
};
pub use config::write_basic_config;
pub use hasten_core::{
    ClusterConfig, ComputeEnvironment, ContractSource, CudaLoad, DEBUG_MODE_VAR,
    DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, DistributedType, DynamoBackend, EnvContract,
    EnvPatch, Error, LibtorchInfo, LoggerType, MIXED_PRECISION_VAR, PrecisionType,
    RDZV_LISTEN_FD_VAR, RNGType, Result, SageMakerDistributedType, Sections, USE_CPU_VAR,
    accelerate_cache_dir, basic_config, clear_environment, debug_mode_from_env,
    default_config_file, distributed_state_initialized, parse_flag_from_env, patch_environment,
    str_to_bool, write_basic_config_for,
};
pub use memory::{
    BatchSizeError, ExecutableBatchSize, OutOfMemory, empty_device_cache,
    find_executable_batch_size, is_out_of_memory, should_reduce_batch_size,
};
// Accelerate's file names for checkpoints and weights.
pub use data::{
    BatchSampler, BatchSamplerShard, BatchSource, Batches, Collate, DataLoader, DataLoaderShard,
    Dataset, FixedBatches, IterableDataLoader, IterableDataLoaderShard, IterableDataset,
    IterableDatasetShard, Sampler, ShardBatches, ShardOptions, TensorDataset, TensorTuple,
};
pub use device::{
    GpuInfo, MatmulCheck, cuda_device_count, cuda_devices, is_bf16_available, is_cuda_available,
    is_ipex_available, is_mps_available, is_npu_available, is_torch_version, is_tpu_available,
    is_xpu_available, matmul_check, select_device,
};
pub use distributed::{
    DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_RDZV_TIMEOUT, Group, ProcessGroup, ReduceOp,
    collective_timeout_from_env, nccl_version, rdzv_timeout_from_env,
};
pub use hasten_core::{
    MODEL_NAME, OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_MODEL_NAME, SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_PATTERN_NAME, SAMPLER_NAME, SCALER_NAME, SCHEDULER_NAME,
    WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_PATTERN_NAME, shard_file_name, shard_suffix,
};
pub use layers::{init_empty_weights, init_on_device};
pub use ops::{
    Layout, Nested, Reduction, concatenate, convert_to_fp32, listify, listify_tensor, map_tensors,
    send_to_device, slice_tensors, tensors_of,
};
pub use optim::{AdamW, Optimizer, Sgd, TchOptimizer, clear_grads};
pub use random::{HostRng, host_rng, rng_states, set_rng_states, set_seed};
pub use report::env_report;
pub use state::{GradientState, GradientStateHandle, ProcessState};
pub use tracking::{
    GeneralTracker, LogValue, LogValues, SummaryWriter, TensorBoardTracker, log_values,
};

/// Facts about the libtorch this process runs on, loading its CUDA half on first use (see
/// [`LibtorchInfo`]). Every hasten function that asks about CUDA goes through here.
pub fn libtorch() -> &'static LibtorchInfo {
    // Make sure libtorch is mapped (it is, in any program calling this) before looking for it.
    let _ = tch::get_num_threads();
    hasten_core::libtorch()
}

/// rand, re-exported for [`HostRng`] (an `rand::RngCore`).
pub use rand;
/// tch, re-exported so user code uses the exact libtorch binding hasten was built with.
pub use tch;

/// What a training script or a notebook usually needs, for `use hasten::prelude::*;` (the Jupyter kernel
/// brings it into every notebook): the Accelerator and its configuration, data loading, optimizers and
/// schedules, collectives, seeding, and tch's everyday names. It leaves `Result` and `Error` alone, so
/// `std`'s stay in scope.
pub mod prelude {
    pub use crate::{
        AcceleratedOptimizer, AcceleratedScheduler, Accelerator, AdamW, AutocastKwargs, Collate,
        DataLoader, DataLoaderConfiguration, Dataset, DistributedDataParallelKwargs,
        DistributedType, GradScalerKwargs, GradientAccumulationPlugin, IterableDataLoader,
        IterableDataset, LogValue, LoggerType, PrecisionType, PreparedModel, ProcessGroup,
        ProcessState, ProjectConfiguration, Reduction, Schedule, Sgd, TchOptimizer, TensorDataset,
        layers, log_values, set_seed, tch,
    };
    pub use tch::nn::{self, Module, ModuleT, OptimizerConfig};
    pub use tch::{Device, IndexOp, Kind, Tensor};
}
