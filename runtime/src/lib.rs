//! # hasten
//!
//! HuggingFace Accelerate's runtime, in Rust, on libtorch (through `tch`): the same environment contract,
//! names, defaults and file formats, so a job, a config file or a checkpoint moves between Python
//! Accelerate and hasten unchanged.
//!
//! This crate holds what every worker process needs: its place in the job ([`ProcessState`], read from
//! torchrun's, SLURM's or MPI's variables), its device, Accelerate's enums and file names, environment
//! helpers, seeding and the launch configuration file.
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

mod config;
mod constants;
mod device;
mod distributed;
mod environment;
mod error;
mod libtorch;
mod ops;
mod random;
mod state;
mod string_enum;
mod tracking;

pub use config::{
    ClusterConfig, ComputeEnvironment, DynamoBackend, PrecisionType, SageMakerDistributedType,
    Sections, accelerate_cache_dir, basic_config, default_config_file, write_basic_config,
    write_basic_config_for,
};
pub use constants::*;
pub use device::{
    GpuInfo, MatmulCheck, cuda_device_count, cuda_devices, is_bf16_available, is_cuda_available,
    is_ipex_available, is_mps_available, is_npu_available, is_torch_version, is_tpu_available,
    is_xpu_available, matmul_check, select_device,
};
pub use distributed::{
    DEFAULT_RDZV_TIMEOUT, ProcessGroup, ReduceOp, distributed_state_initialized, nccl_version,
    rdzv_timeout_from_env,
};
pub use environment::{
    DEBUG_MODE_VAR, EnvPatch, MIXED_PRECISION_VAR, USE_CPU_VAR, clear_environment,
    debug_mode_from_env, parse_flag_from_env, patch_environment, str_to_bool,
};
pub use error::{Error, Result};
pub use libtorch::{CudaLoad, LibtorchInfo, libtorch};
pub use ops::{
    Nested, Reduction, concatenate, convert_to_fp32, listify, listify_tensor, map_tensors,
    send_to_device, slice_tensors, tensors_of,
};
pub use random::{HostRng, RNGType, host_rng, set_seed};
pub use state::{
    ContractSource, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, DistributedType, EnvContract,
    ProcessState,
};
pub use tracking::LoggerType;

/// tch, re-exported so user code uses the exact libtorch binding hasten was built with.
pub use tch;
