//! The job's ground, as Accelerate's `accelerate.utils` has it: what devices this process can use,
//! Accelerate's enums, file names and config file, the environment contract and its helpers, and the
//! report `hasten env` prints.

pub use crate::config::write_basic_config;
pub use crate::device::{
    GpuInfo, MatmulCheck, cuda_device_count, cuda_devices, is_bf16_available, is_cuda_available,
    is_ipex_available, is_mps_available, is_npu_available, is_torch_version, is_tpu_available,
    is_xpu_available, matmul_check, select_device,
};
pub use crate::report::env_report;
pub use hasten_core::{
    ClusterConfig, ComputeEnvironment, ContractSource, CudaLoad, DEBUG_MODE_VAR,
    DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, DistributedType, DynamoBackend, EnvContract,
    EnvPatch, LibtorchInfo, LoggerType, MIXED_PRECISION_VAR, PrecisionType, RDZV_LISTEN_FD_VAR,
    RNGType, SageMakerDistributedType, Sections, USE_CPU_VAR, accelerate_cache_dir, basic_config,
    clear_environment, debug_mode_from_env, default_config_file, distributed_state_initialized,
    parse_flag_from_env, patch_environment, str_to_bool, write_basic_config_for,
};
// Accelerate's file names for checkpoints and weights.
pub use hasten_core::{
    MODEL_NAME, OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_MODEL_NAME, SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_PATTERN_NAME, SAMPLER_NAME, SCALER_NAME, SCHEDULER_NAME,
    WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_PATTERN_NAME, shard_file_name, shard_suffix,
};
