//! Accelerate's launch configuration file (`default_config.yaml`): its keys, its location, reading it and
//! writing a basic one. An existing Accelerate config works unchanged, and one hasten writes is read by
//! Accelerate.

use crate::kinds::DistributedType;
use crate::string_enum::string_enum;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

string_enum! {
    /// Where the job runs (`compute_environment`).
    pub enum ComputeEnvironment {
        /// This machine or a cluster of them.
        LocalMachine = "LOCAL_MACHINE",
        /// Amazon SageMaker.
        AmazonSagemaker = "AMAZON_SAGEMAKER",
    }
}

string_enum! {
    /// SageMaker's distribution modes.
    pub enum SageMakerDistributedType {
        /// One process.
        No = "NO",
        /// SageMaker data parallelism.
        DataParallel = "DATA_PARALLEL",
        /// SageMaker model parallelism.
        ModelParallel = "MODEL_PARALLEL",
    }
}

string_enum! {
    /// torch.compile backends, kept so that configs naming one parse; libtorch has no dynamo.
    pub enum DynamoBackend {
        /// No compilation.
        No = "NO",
        /// eager
        Eager = "EAGER",
        /// aot_eager
        AotEager = "AOT_EAGER",
        /// inductor
        Inductor = "INDUCTOR",
        /// aot_ts_nvfuser
        AotTsNvfuser = "AOT_TS_NVFUSER",
        /// nvprims_nvfuser
        NvprimsNvfuser = "NVPRIMS_NVFUSER",
        /// cudagraphs
        Cudagraphs = "CUDAGRAPHS",
        /// ofi
        Ofi = "OFI",
        /// fx2trt
        Fx2trt = "FX2TRT",
        /// onnxrt
        Onnxrt = "ONNXRT",
        /// tensorrt
        Tensorrt = "TENSORRT",
        /// aot_torchxla_trace_once
        AotTorchxlaTraceOnce = "AOT_TORCHXLA_TRACE_ONCE",
        /// torchxla_trace_once
        TorchxlaTraceOnce = "TORCHXLA_TRACE_ONCE",
        /// tvm
        Tvm = "TVM",
        /// hpu_backend
        HpuBackend = "HPU_BACKEND",
        /// neuron
        Neuron = "NEURON",
    }
}

string_enum! {
    /// Mixed-precision modes (`mixed_precision`, `ACCELERATE_MIXED_PRECISION`).
    pub enum PrecisionType {
        /// Full fp32.
        No = "no",
        /// fp8 (needs Transformer Engine or similar; not offered by libtorch alone).
        Fp8 = "fp8",
        /// fp16 autocast with dynamic loss scaling.
        Fp16 = "fp16",
        /// bf16 autocast.
        Bf16 = "bf16",
    }
}

/// Accelerate's `ClusterConfig`: every key `accelerate config` can write for a local machine or cluster.
///
/// Unknown keys are an error naming them, as in Accelerate. Integration sections (deepspeed, fsdp, …) are
/// kept as free-form maps so a config that has them still loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `compute_environment` (default LOCAL_MACHINE).
    #[serde(default = "default_compute_environment")]
    pub compute_environment: ComputeEnvironment,
    /// `distributed_type` (required).
    pub distributed_type: DistributedType,
    /// `mixed_precision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed_precision: Option<PrecisionType>,
    /// `use_cpu` (default false).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub use_cpu: bool,
    /// `debug` (default false): sets ACCELERATE_DEBUG_MODE in the workers.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub debug: bool,
    /// `num_processes`: total processes across machines (-1: not set).
    #[serde(default = "minus_one")]
    pub num_processes: i64,
    /// `machine_rank` (default 0).
    #[serde(default)]
    pub machine_rank: u32,
    /// `num_machines` (default 1).
    #[serde(default = "one")]
    pub num_machines: u32,
    /// `gpu_ids`: a comma list or "all".
    #[serde(
        default,
        deserialize_with = "lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub gpu_ids: Option<String>,
    /// `main_process_ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_process_ip: Option<String>,
    /// `main_process_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_process_port: Option<u16>,
    /// `rdzv_backend` (default "static").
    #[serde(default = "static_rdzv", skip_serializing_if = "Option::is_none")]
    pub rdzv_backend: Option<String>,
    /// `same_network` (default false).
    #[serde(
        default = "some_false",
        deserialize_with = "lenient_opt_bool",
        skip_serializing_if = "Option::is_none"
    )]
    pub same_network: Option<bool>,
    /// `main_training_function` (default "main").
    #[serde(default = "main_fn")]
    pub main_training_function: String,
    /// `enable_cpu_affinity` (default false).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub enable_cpu_affinity: bool,
    /// `downcast_bf16` (TPU only; default false).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub downcast_bf16: bool,
    /// `tpu_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpu_name: Option<String>,
    /// `tpu_zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpu_zone: Option<String>,
    /// `tpu_use_cluster` (default false).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub tpu_use_cluster: bool,
    /// `tpu_use_sudo` (default false).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub tpu_use_sudo: bool,
    /// `command_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_file: Option<String>,
    /// `commands`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<String>>,
    /// `tpu_vm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpu_vm: Option<Vec<String>>,
    /// `tpu_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpu_env: Option<Vec<String>>,
    /// Integration sections, kept verbatim: `fp8_config`, `deepspeed_config`, `fsdp_config`,
    /// `parallelism_config`, `megatron_lm_config`, `mpirun_config`, `dynamo_config`.
    #[serde(flatten)]
    pub sections: Sections,
}

/// The free-form integration sections of a config; empty ones are not written, as in Accelerate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Sections {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fp8_config: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deepspeed_config: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fsdp_config: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parallelism_config: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub megatron_lm_config: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mpirun_config: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dynamo_config: BTreeMap<String, serde_json::Value>,
}

/// A YAML scalar that may be a bool or one of `str_to_bool`'s strings: the questionnaire writes
/// `downcast_bf16: 'no'`, and Python accepts it, so hasten must too.
#[derive(Deserialize)]
#[serde(untagged)]
enum BoolLike {
    Bool(bool),
    Text(String),
}

fn bool_like<E: serde::de::Error>(v: BoolLike) -> std::result::Result<bool, E> {
    match v {
        BoolLike::Bool(b) => Ok(b),
        BoolLike::Text(t) => crate::environment::str_to_bool(&t)
            .ok_or_else(|| E::custom(format!("{t:?} is not a boolean (true/false, yes/no)"))),
    }
}

fn lenient_bool<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    bool_like(BoolLike::deserialize(d)?)
}

fn lenient_opt_bool<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<bool>, D::Error> {
    bool_like(BoolLike::deserialize(d)?).map(Some)
}

/// `gpu_ids: 0` is a YAML number; Accelerate treats it as the string "0".
fn lenient_opt_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(Some(s)),
        serde_json::Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(serde::de::Error::custom(format!(
            "expected a string, found {other}"
        ))),
    }
}

fn default_compute_environment() -> ComputeEnvironment {
    ComputeEnvironment::LocalMachine
}
fn minus_one() -> i64 {
    -1
}
fn one() -> u32 {
    1
}
fn static_rdzv() -> Option<String> {
    Some("static".into())
}
fn some_false() -> Option<bool> {
    Some(false)
}
fn main_fn() -> String {
    "main".into()
}

/// The config Accelerate's `write_basic_config` writes for `mixed_precision` and `num_gpus` visible GPUs.
pub fn basic_config(mixed_precision: PrecisionType, num_gpus: usize) -> ClusterConfig {
    let (num_processes, use_cpu, distributed_type) = match num_gpus {
        0 => (1, true, DistributedType::No),
        1 => (1, false, DistributedType::No),
        n => (n as i64, false, DistributedType::MultiGpu),
    };
    ClusterConfig {
        compute_environment: ComputeEnvironment::LocalMachine,
        distributed_type,
        mixed_precision: Some(mixed_precision),
        use_cpu,
        debug: false,
        num_processes,
        machine_rank: 0,
        num_machines: 1,
        gpu_ids: None,
        main_process_ip: None,
        main_process_port: None,
        rdzv_backend: static_rdzv(),
        same_network: some_false(),
        main_training_function: main_fn(),
        enable_cpu_affinity: false,
        downcast_bf16: false,
        tpu_name: None,
        tpu_zone: None,
        tpu_use_cluster: false,
        tpu_use_sudo: false,
        command_file: None,
        commands: None,
        tpu_vm: None,
        tpu_env: None,
        sections: Sections::default(),
    }
}

/// Accelerate's cache folder: `$HF_HOME/accelerate`, else `$XDG_CACHE_HOME/huggingface/accelerate`, else
/// `~/.cache/huggingface/accelerate`.
pub fn accelerate_cache_dir() -> PathBuf {
    let home = || {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
    };
    let hf_home = match std::env::var_os("HF_HOME") {
        Some(h) => PathBuf::from(h),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(x) => PathBuf::from(x).join("huggingface"),
            None => home().join(".cache").join("huggingface"),
        },
    };
    hf_home.join("accelerate")
}

/// The default config file, `<accelerate cache>/default_config.yaml`, shared with Python Accelerate.
pub fn default_config_file() -> PathBuf {
    accelerate_cache_dir().join("default_config.yaml")
}

impl ClusterConfig {
    /// Reads a YAML or JSON config file. Errors name the file and, where there is one, the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        Self::from_str_named(&text, path)
    }

    /// Parses config text; `path` only names the source in errors.
    pub fn from_str_named(text: &str, path: &Path) -> Result<Self> {
        let config_err = |detail: String| Error::Config {
            path: path.to_owned(),
            detail,
        };
        let mut value: serde_json::Value = serde_norway::from_str(text)
            .map_err(|e| config_err(format!("not valid YAML/JSON: {e}")))?;
        let map = value.as_object_mut().ok_or_else(|| {
            config_err("the top level must be a mapping of keys to values".into())
        })?;
        // Accelerate's process_config upgrades older files before validating them.
        if !map.contains_key("distributed_type") {
            return Err(config_err("a `distributed_type` must be specified".into()));
        }
        if let Some(fp16) = map.remove("fp16") {
            if !map.contains_key("mixed_precision") && fp16.as_bool() == Some(true) {
                map.insert("mixed_precision".into(), "fp16".into());
            }
        }
        if let Some(backend) = map.remove("dynamo_backend") {
            if backend.as_str() != Some("NO") {
                map.insert(
                    "dynamo_config".into(),
                    serde_json::json!({ "dynamo_backend": backend }),
                );
            }
        }
        let distributed_no = map.get("distributed_type").and_then(|v| v.as_str()) == Some("NO");
        if !map.contains_key("num_processes") && distributed_no {
            map.insert("num_processes".into(), 1.into());
        }
        // Null values mean "not set", as when Python wrote None.
        map.retain(|_, v| !v.is_null());
        let config: ClusterConfig =
            serde_json::from_value(value).map_err(|e| config_err(e.to_string()))?;
        // -1 is "not set"; any other count below 1 (or beyond what a job can hold) is an error, not
        // a silent single process.
        if config.num_processes != -1
            && !(1..=crate::MAX_WORLD_SIZE as i64).contains(&config.num_processes)
        {
            return Err(config_err(format!(
                "num_processes: {} is not a number of processes (1 to {}, or -1 for not set)",
                config.num_processes,
                crate::MAX_WORLD_SIZE
            )));
        }
        if config.num_machines == 0 || config.num_machines as usize > crate::MAX_WORLD_SIZE {
            return Err(config_err(format!(
                "num_machines: {} is not a number of machines (1 or more)",
                config.num_machines
            )));
        }
        Ok(config)
    }

    /// The text Accelerate writes for this config: JSON, keys sorted, two-space indent, trailing newline.
    /// JSON is valid YAML, so the `.yaml` file it goes into reads with either parser.
    pub fn to_accelerate_json(&self) -> String {
        // serde_json::Value's map is ordered by key, which gives Accelerate's `sort_keys=True`.
        let value = serde_json::to_value(self).unwrap_or_default();
        let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// Writes a basic config for a machine with `num_gpus` GPUs to `save_location` (default:
/// [`default_config_file`]), as `accelerate config default` does, and returns its path. Refuses to replace
/// an existing file. (`hasten::utils::write_basic_config` counts the GPUs itself.)
pub fn write_basic_config_for(
    mixed_precision: PrecisionType,
    save_location: Option<&Path>,
    num_gpus: usize,
) -> Result<PathBuf> {
    let path = save_location.map_or_else(default_config_file, Path::to_path_buf);
    if path.exists() {
        return Err(Error::ConfigExists { path });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io("creating the folder of", parent, e))?;
    }
    let text = basic_config(mixed_precision, num_gpus).to_accelerate_json();
    // create_new: never clobber a file that appeared since the check above.
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::ConfigExists { path: path.clone() },
            _ => Error::io("creating", &path, e),
        })?;
    file.write_all(text.as_bytes())
        .map_err(|e| Error::io("writing", &path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Accelerate 1.15's write_basic_config writes on a CPU-only machine, byte for byte.
    const ACCELERATE_CPU_BASIC: &str = r#"{
  "compute_environment": "LOCAL_MACHINE",
  "debug": false,
  "distributed_type": "NO",
  "downcast_bf16": false,
  "enable_cpu_affinity": false,
  "machine_rank": 0,
  "main_training_function": "main",
  "mixed_precision": "no",
  "num_machines": 1,
  "num_processes": 1,
  "rdzv_backend": "static",
  "same_network": false,
  "tpu_use_cluster": false,
  "tpu_use_sudo": false,
  "use_cpu": true
}
"#;

    #[test]
    fn basic_config_matches_accelerate_on_cpu() {
        assert_eq!(
            basic_config(PrecisionType::No, 0).to_accelerate_json(),
            ACCELERATE_CPU_BASIC
        );
    }

    #[test]
    fn basic_config_for_gpus() {
        let one = basic_config(PrecisionType::Bf16, 1);
        assert_eq!(
            (one.distributed_type, one.num_processes, one.use_cpu),
            (DistributedType::No, 1, false)
        );
        let four = basic_config(PrecisionType::Fp16, 4);
        assert_eq!(
            (four.distributed_type, four.num_processes, four.use_cpu),
            (DistributedType::MultiGpu, 4, false)
        );
        assert!(
            four.to_accelerate_json()
                .contains("\"mixed_precision\": \"fp16\"")
        );
    }

    #[test]
    fn write_refuses_to_overwrite_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/accelerate/default_config.yaml");
        let written = write_basic_config_for(PrecisionType::Bf16, Some(&path), 2).unwrap();
        assert_eq!(written, path);
        let text = std::fs::read_to_string(&path).unwrap();
        let err = write_basic_config_for(PrecisionType::No, Some(&path), 0).unwrap_err();
        assert!(matches!(err, Error::ConfigExists { .. }), "{err}");
        assert!(err.to_string().contains("will not override"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text,
            "the file is untouched"
        );
        let back = ClusterConfig::from_file(&path).unwrap();
        assert_eq!(back, basic_config(PrecisionType::Bf16, 2));
    }

    #[test]
    fn default_location_follows_hf_home() {
        crate::patch_environment([("HF_HOME", "/tmp/hf-home-test")], || {
            assert_eq!(
                default_config_file(),
                PathBuf::from("/tmp/hf-home-test/accelerate/default_config.yaml")
            );
        });
    }

    #[test]
    fn reads_a_yaml_config_written_by_accelerate_config() {
        let yaml = "compute_environment: LOCAL_MACHINE\ndebug: true\ndistributed_type: MULTI_GPU\n\
                    downcast_bf16: 'no'\ngpu_ids: 0,1\nmachine_rank: 0\nmain_training_function: main\n\
                    mixed_precision: bf16\nnum_machines: 1\nnum_processes: 2\nrdzv_backend: static\n\
                    same_network: true\ntpu_env: []\ntpu_use_cluster: false\ntpu_use_sudo: false\nuse_cpu: false\n";
        // `downcast_bf16: 'no'` is what the questionnaire really writes: a string where a bool belongs.
        let cfg = ClusterConfig::from_str_named(yaml, Path::new("cfg.yaml")).unwrap();
        assert!(!cfg.downcast_bf16);
        assert_eq!(cfg.same_network, Some(true));
        assert_eq!(cfg.distributed_type, DistributedType::MultiGpu);
        assert_eq!(cfg.mixed_precision, Some(PrecisionType::Bf16));
        assert_eq!(cfg.gpu_ids.as_deref(), Some("0,1"));
        assert_eq!(cfg.num_processes, 2);
        assert!(cfg.debug);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let p = Path::new("/etc/x.yaml");
        let err = ClusterConfig::from_str_named("distributed_type: NO\nnum_procs: 2\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/x.yaml") && err.contains("num_procs"),
            "{err}"
        );
        let err = ClusterConfig::from_str_named("distributed_type: MULTI_TPU\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MULTI_TPU") && err.contains("DistributedType"),
            "{err}"
        );
        let err = ClusterConfig::from_str_named("num_processes: 2\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("distributed_type"), "{err}");
        let err = ClusterConfig::from_str_named("distributed_type: NO\ndebug: maybe\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"maybe\" is not a boolean"), "{err}");
        let one_gpu =
            ClusterConfig::from_str_named("distributed_type: NO\ngpu_ids: 0\n", p).unwrap();
        assert_eq!(one_gpu.gpu_ids.as_deref(), Some("0"));
        let err = ClusterConfig::from_str_named("- a\n- b\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mapping"), "{err}");
        let err = ClusterConfig::from_str_named("distributed_type: [NO\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid YAML"), "{err}");
    }

    #[test]
    fn old_keys_are_upgraded() {
        let cfg = ClusterConfig::from_str_named(
            "distributed_type: NO\nfp16: true\ndynamo_backend: INDUCTOR\n",
            Path::new("old.yaml"),
        )
        .unwrap();
        assert_eq!(cfg.mixed_precision, Some(PrecisionType::Fp16));
        assert_eq!(cfg.num_processes, 1);
        assert_eq!(
            cfg.sections.dynamo_config.get("dynamo_backend"),
            Some(&serde_json::json!("INDUCTOR"))
        );
    }
}
