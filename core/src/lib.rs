//! # hasten-core
//!
//! The part of hasten's runtime that needs no libtorch, so that the `hasten` command line and the
//! launchers start in milliseconds: the environment contract ([`EnvContract`]), Accelerate's string
//! enums and file names, the launch configuration file, environment helpers, and the loader that finds
//! (and completes with its CUDA half) the libtorch a process runs on.
//!
//! Everything here is re-exported by the `hasten` crate; use that one in programs.
#![deny(missing_docs)]

mod config;
mod constants;
mod contract;
pub mod dynlib;
mod environment;
mod error;
mod kinds;
mod libtorch;
mod lifecycle;
mod string_enum;

pub use config::{
    ClusterConfig, ComputeEnvironment, DynamoBackend, PrecisionType, SageMakerDistributedType,
    Sections, accelerate_cache_dir, basic_config, default_config_file, write_basic_config_for,
};
pub use constants::*;
pub use contract::{
    ContractSource, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, EnvContract, MAX_WORLD_SIZE,
    RDZV_LISTEN_FD_VAR, RDZV_SECRET_VAR, new_rdzv_secret,
};
pub use environment::{
    DEBUG_MODE_VAR, EnvPatch, GPU_BINDING_VAR, MIXED_PRECISION_VAR, USE_CPU_VAR, clear_environment,
    debug_mode_from_env, parse_flag_from_env, patch_environment, str_to_bool,
};
pub use error::{Error, Result};
pub use kinds::{DistributedType, LoggerType, RNGType};
pub use libtorch::{CudaLoad, LibtorchInfo, libtorch};
pub use lifecycle::{
    cuda_initialized_in_this_process, distributed_state_initialized,
    mark_distributed_state_initialized, sweep_stale_shm_segments,
};
