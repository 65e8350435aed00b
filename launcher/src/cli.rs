//! The `hasten launch` flags (Accelerate's names; hyphenated spellings are accepted too) and their
//! merge with the config file into a [`LaunchConfig`]: command line first, then the config file, then
//! what the host has.

use crate::host;
use crate::{LaunchConfig, LaunchError, Result};
use clap::builder::TypedValueParser as _;
use hasten_core::{ClusterConfig, PrecisionType};
use std::ffi::OsString;
use std::path::PathBuf;

/// `hasten launch [options] PROGRAM [ARGS...]`
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LaunchArgs {
    /// Config file (YAML or JSON, Accelerate's keys). Default: Accelerate's default_config.yaml if present.
    #[arg(
        long = "config_file",
        visible_alias = "config-file",
        value_name = "FILE"
    )]
    pub config_file: Option<PathBuf>,
    /// Total number of processes across all machines. Default: the config's, else one per visible GPU, else 1.
    #[arg(
        long = "num_processes",
        visible_alias = "num-processes",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=hasten_core::MAX_WORLD_SIZE as i64).map(|n| n as usize)
    )]
    pub num_processes: Option<usize>,
    /// Number of machines. Default 1.
    #[arg(
        long = "num_machines",
        visible_alias = "num-machines",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=hasten_core::MAX_WORLD_SIZE as i64).map(|n| n as usize)
    )]
    pub num_machines: Option<usize>,
    /// This machine's rank, 0 to num_machines-1. Default 0.
    #[arg(
        long = "machine_rank",
        visible_alias = "machine-rank",
        value_name = "R"
    )]
    pub machine_rank: Option<usize>,
    /// Address of the machine running rank 0. Default 127.0.0.1.
    #[arg(
        long = "main_process_ip",
        visible_alias = "main-process-ip",
        value_name = "IP"
    )]
    pub main_process_ip: Option<String>,
    /// Rendezvous port on the main machine; 0 picks a free one. Default 29500.
    #[arg(
        long = "main_process_port",
        visible_alias = "main-process-port",
        value_name = "PORT"
    )]
    pub main_process_port: Option<u16>,
    /// no, fp16, bf16 or fp8; exported as ACCELERATE_MIXED_PRECISION. Default: the config's, else no.
    #[arg(
        long = "mixed_precision",
        visible_alias = "mixed-precision",
        value_name = "MODE"
    )]
    pub mixed_precision: Option<PrecisionType>,
    /// GPUs to use, e.g. 0,1 (written to CUDA_VISIBLE_DEVICES). Default: all.
    #[arg(long = "gpu_ids", visible_alias = "gpu-ids", value_name = "IDS")]
    pub gpu_ids: Option<String>,
    /// Run on the CPU even where GPUs exist.
    #[arg(long)]
    pub cpu: bool,
    /// With several processes on a machine, each sees only its own GPU (CUDA_VISIBLE_DEVICES = that GPU,
    /// so it computes on cuda:0), which starts CUDA faster; `false` shows every process all the GPUs
    /// (rank i on cuda:i), as Python Accelerate does. Default true.
    #[arg(
        long = "gpu_binding",
        visible_alias = "gpu-binding",
        value_name = "BOOL",
        env = hasten_core::GPU_BINDING_VAR,
        default_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub gpu_binding: bool,
    /// Multi-GPU training (the default whenever GPUs are visible; accepted for Accelerate compatibility).
    #[arg(long = "multi_gpu", visible_alias = "multi-gpu")]
    pub multi_gpu: bool,
    /// Sharded data parallelism (FSDP): the workers get ACCELERATE_USE_FSDP=true and the `--fsdp_*`
    /// settings as their FSDP_* variables (also from a config file with `distributed_type: FSDP` and its
    /// `fsdp_config`).
    #[arg(long = "use_fsdp", visible_alias = "use-fsdp")]
    pub use_fsdp: bool,
    /// The `--fsdp_*` settings.
    #[command(flatten)]
    pub fsdp: FsdpArgs,
    /// The `--parallelism_config_*` settings (FSDP2's hybrid sharding).
    #[command(flatten)]
    pub parallelism: crate::parallelism::ParallelismArgs,
    /// Debug mode in the workers (ACCELERATE_DEBUG_MODE=true): shapes are checked across ranks.
    #[arg(long)]
    pub debug: bool,
    /// Restart the whole group up to N times after a failure. Default 0.
    #[arg(
        long = "max_restarts",
        visible_alias = "max-restarts",
        value_name = "N"
    )]
    pub max_restarts: Option<u32>,
    /// OMP_NUM_THREADS of each worker. Default: CPU cores divided by processes per machine.
    #[arg(
        long = "num_cpu_threads_per_process",
        visible_alias = "num-cpu-threads-per-process",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=65536).map(|n| n as usize)
    )]
    pub num_cpu_threads_per_process: Option<usize>,
    /// Prefix of each relayed line; ${rank}, ${local_rank} and ${role_name} are replaced.
    #[arg(
        long = "log_line_prefix_template",
        visible_alias = "log-line-prefix-template",
        value_name = "TEMPLATE",
        default_value = "[rank${rank}]: "
    )]
    pub log_line_prefix_template: String,
    /// The program to run on every rank.
    #[arg(value_name = "PROGRAM")]
    pub program: OsString,
    /// Its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

/// Accelerate's `--fsdp_*` flags. Each given one is exported to the workers as its FSDP_* variable
/// (`--fsdp_transformer_layer_cls_to_wrap` as FSDP_TRANSFORMER_CLS_TO_WRAP), where the runtime's
/// FullyShardedDataParallelPlugin reads it; a value the plugin does not accept is its error, naming the
/// variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FsdpArgs {
    /// 1 or 2 (default 1, as Accelerate).
    #[arg(
        long = "fsdp_version",
        visible_alias = "fsdp-version",
        value_name = "V"
    )]
    pub fsdp_version: Option<String>,
    /// FSDP1's strategy: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, HYBRID_SHARD_ZERO2 (or 1–5).
    #[arg(
        long = "fsdp_sharding_strategy",
        visible_alias = "fsdp-sharding-strategy",
        value_name = "S"
    )]
    pub fsdp_sharding_strategy: Option<String>,
    /// FSDP2: free the parameters after each forward (true) or keep them until the backward (false).
    #[arg(
        long = "fsdp_reshard_after_forward",
        visible_alias = "fsdp-reshard-after-forward",
        value_name = "B"
    )]
    pub fsdp_reshard_after_forward: Option<String>,
    /// NO_WRAP, TRANSFORMER_BASED_WRAP or SIZE_BASED_WRAP.
    #[arg(
        long = "fsdp_auto_wrap_policy",
        visible_alias = "fsdp-auto-wrap-policy",
        value_name = "P"
    )]
    pub fsdp_auto_wrap_policy: Option<String>,
    /// Blocks to wrap: VarStore path patterns, comma-separated (`blocks.*`).
    #[arg(
        long = "fsdp_transformer_layer_cls_to_wrap",
        visible_alias = "fsdp-transformer-layer-cls-to-wrap",
        value_name = "PATTERNS"
    )]
    pub fsdp_transformer_layer_cls_to_wrap: Option<String>,
    /// SIZE_BASED_WRAP's threshold in parameters.
    #[arg(
        long = "fsdp_min_num_params",
        visible_alias = "fsdp-min-num-params",
        value_name = "N"
    )]
    pub fsdp_min_num_params: Option<String>,
    /// Offload parameters and optimizer state to the CPU.
    #[arg(
        long = "fsdp_offload_params",
        visible_alias = "fsdp-offload-params",
        value_name = "B"
    )]
    pub fsdp_offload_params: Option<String>,
    /// FULL_STATE_DICT or SHARDED_STATE_DICT.
    #[arg(
        long = "fsdp_state_dict_type",
        visible_alias = "fsdp-state-dict-type",
        value_name = "T"
    )]
    pub fsdp_state_dict_type: Option<String>,
    /// Recompute each block's activations in the backward.
    #[arg(
        long = "fsdp_activation_checkpointing",
        visible_alias = "fsdp-activation-checkpointing",
        value_name = "B"
    )]
    pub fsdp_activation_checkpointing: Option<String>,
    /// Load the weights on the main process only.
    #[arg(
        long = "fsdp_cpu_ram_efficient_loading",
        visible_alias = "fsdp-cpu-ram-efficient-loading",
        value_name = "B"
    )]
    pub fsdp_cpu_ram_efficient_loading: Option<String>,
    /// FSDP1 only (ignored under version 2, as in Accelerate).
    #[arg(
        long = "fsdp_backward_prefetch",
        visible_alias = "fsdp-backward-prefetch",
        value_name = "P"
    )]
    pub fsdp_backward_prefetch: Option<String>,
    /// FSDP1 only (an error under version 2, as in Accelerate).
    #[arg(
        long = "fsdp_forward_prefetch",
        visible_alias = "fsdp-forward-prefetch",
        value_name = "B"
    )]
    pub fsdp_forward_prefetch: Option<String>,
    /// FSDP1 only (ignored under version 2).
    #[arg(
        long = "fsdp_use_orig_params",
        visible_alias = "fsdp-use-orig-params",
        value_name = "B"
    )]
    pub fsdp_use_orig_params: Option<String>,
    /// FSDP1 only (ignored under version 2; hasten starts every rank from the main process's weights).
    #[arg(
        long = "fsdp_sync_module_states",
        visible_alias = "fsdp-sync-module-states",
        value_name = "B"
    )]
    pub fsdp_sync_module_states: Option<String>,
}

/// The `fsdp_config` keys (without their `fsdp_` prefix) and the variables they become.
const FSDP_KEYS: [(&str, &str); 15] = [
    ("version", "FSDP_VERSION"),
    ("sharding_strategy", "FSDP_SHARDING_STRATEGY"),
    ("reshard_after_forward", "FSDP_RESHARD_AFTER_FORWARD"),
    ("auto_wrap_policy", "FSDP_AUTO_WRAP_POLICY"),
    (
        "transformer_layer_cls_to_wrap",
        "FSDP_TRANSFORMER_CLS_TO_WRAP",
    ),
    ("min_num_params", "FSDP_MIN_NUM_PARAMS"),
    ("offload_params", "FSDP_OFFLOAD_PARAMS"),
    ("state_dict_type", "FSDP_STATE_DICT_TYPE"),
    ("activation_checkpointing", "FSDP_ACTIVATION_CHECKPOINTING"),
    (
        "cpu_ram_efficient_loading",
        "FSDP_CPU_RAM_EFFICIENT_LOADING",
    ),
    ("backward_prefetch", "FSDP_BACKWARD_PREFETCH"),
    ("forward_prefetch", "FSDP_FORWARD_PREFETCH"),
    ("use_orig_params", "FSDP_USE_ORIG_PARAMS"),
    ("sync_module_states", "FSDP_SYNC_MODULE_STATES"),
    ("ignored_modules", "FSDP_IGNORED_MODULES"),
];

impl FsdpArgs {
    fn get(&self, key: &str) -> Option<&String> {
        match key {
            "version" => self.fsdp_version.as_ref(),
            "sharding_strategy" => self.fsdp_sharding_strategy.as_ref(),
            "reshard_after_forward" => self.fsdp_reshard_after_forward.as_ref(),
            "auto_wrap_policy" => self.fsdp_auto_wrap_policy.as_ref(),
            "transformer_layer_cls_to_wrap" => self.fsdp_transformer_layer_cls_to_wrap.as_ref(),
            "min_num_params" => self.fsdp_min_num_params.as_ref(),
            "offload_params" => self.fsdp_offload_params.as_ref(),
            "state_dict_type" => self.fsdp_state_dict_type.as_ref(),
            "activation_checkpointing" => self.fsdp_activation_checkpointing.as_ref(),
            "cpu_ram_efficient_loading" => self.fsdp_cpu_ram_efficient_loading.as_ref(),
            "backward_prefetch" => self.fsdp_backward_prefetch.as_ref(),
            "forward_prefetch" => self.fsdp_forward_prefetch.as_ref(),
            "use_orig_params" => self.fsdp_use_orig_params.as_ref(),
            "sync_module_states" => self.fsdp_sync_module_states.as_ref(),
            _ => None,
        }
    }
}

/// A config value as `accelerate launch` passes it on: YAML booleans lowercased, lists joined by
/// commas (as FSDP_TRANSFORMER_CLS_TO_WRAP holds them).
pub(crate) fn config_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => {
            items.iter().map(config_value).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
}

/// The variables that switch FSDP on in the workers: ACCELERATE_USE_FSDP and one FSDP_* per setting
/// given, flags before the config file's `fsdp_config` (whose keys may omit the `fsdp_` prefix, as
/// Accelerate allows). Empty when neither `--use_fsdp` nor `distributed_type: FSDP` asks for it.
pub fn fsdp_env(args: &LaunchArgs, file: Option<&ClusterConfig>) -> Vec<(String, String)> {
    let from_file = file.filter(|f| f.distributed_type == hasten_core::DistributedType::Fsdp);
    if !args.use_fsdp && from_file.is_none() {
        return Vec::new();
    }
    let mut env = vec![("ACCELERATE_USE_FSDP".to_owned(), "true".to_owned())];
    for (key, var) in FSDP_KEYS {
        let value = args.fsdp.get(key).cloned().or_else(|| {
            let section = &from_file?.sections.fsdp_config;
            section
                .get(&format!("fsdp_{key}"))
                .or_else(|| section.get(key))
                .map(config_value)
        });
        if let Some(value) = value {
            env.push((var.to_owned(), value));
        }
    }
    env
}

/// The config file in force: the one named (which must exist), else Accelerate's default if present.
pub fn load_config_file(named: Option<&PathBuf>) -> Result<Option<ClusterConfig>> {
    match named {
        Some(path) => {
            if !path.is_file() {
                return Err(LaunchError::Invalid(format!(
                    "the config file {} does not exist (--config_file); create one with `hasten config default`",
                    path.display()
                )));
            }
            let cfg = ClusterConfig::from_file(path)?;
            refuse_unsupported(&cfg, path)?;
            Ok(Some(cfg))
        }
        None => {
            let default = hasten_core::default_config_file();
            if default.is_file() {
                let cfg = ClusterConfig::from_file(&default)?;
                refuse_unsupported(&cfg, &default)?;
                Ok(Some(cfg))
            } else {
                Ok(None)
            }
        }
    }
}

/// A config file asking for a distribution hasten does not run (DeepSpeed, Megatron-LM, XLA, other
/// accelerators) is an error naming the file and the key: launching it would otherwise train as plain
/// DDP, every rank holding the whole model, its gradients and its optimizer state. FSDP runs.
pub fn refuse_unsupported(cfg: &ClusterConfig, path: &std::path::Path) -> Result<()> {
    use hasten_core::DistributedType as D;
    let instead = "hasten runs distributed_type NO, MULTI_CPU, MULTI_GPU (DDP) and FSDP; for a model that \
                   does not fit on one GPU, use FSDP (distributed_type: FSDP, or --use_fsdp)";
    let refuse = |what: String| {
        Err(LaunchError::Invalid(format!(
            "the config file {} asks for {what}, which hasten does not run (it would train as plain DDP \
             instead): {instead}",
            path.display()
        )))
    };
    match cfg.distributed_type {
        D::No | D::MultiCpu | D::MultiGpu | D::Fsdp => {}
        D::Deepspeed => return refuse("DeepSpeed (distributed_type: DEEPSPEED)".into()),
        other => return refuse(format!("distributed_type: {other}")),
    }
    // As in Accelerate, the deepspeed_config and fsdp_config sections count only under their
    // distributed_type (`accelerate launch` derives use_deepspeed / use_fsdp from it alone).
    Ok(())
}

/// Host facts the merge depends on, passed in so the merge stays pure.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// GPUs visible to the launcher, as `CUDA_VISIBLE_DEVICES` entries.
    pub gpus: Vec<String>,
    /// Logical CPUs.
    pub cpus: usize,
}

impl HostFacts {
    /// Reads the facts from this host without initialising CUDA.
    pub fn probe() -> Self {
        HostFacts {
            gpus: host::visible_gpus(),
            cpus: host::cpu_count(),
        }
    }
}

/// Merges the flags, the config file and the host facts. The port is returned as given (0 = any);
/// [`resolve_port`] turns it into a real one.
pub fn merge(args: &LaunchArgs, file: Option<&ClusterConfig>, host: HostFacts) -> LaunchConfig {
    let use_cpu = args.cpu || file.is_some_and(|f| f.use_cpu);
    let from_file_procs = file
        .map(|f| f.num_processes)
        .filter(|n| *n > 0)
        .and_then(|n| usize::try_from(n).ok());
    let default_procs = if use_cpu { 1 } else { host.gpus.len().max(1) };
    LaunchConfig {
        num_processes: args
            .num_processes
            .or(from_file_procs)
            .unwrap_or(default_procs),
        num_machines: args
            .num_machines
            .or(file.map(|f| f.num_machines as usize))
            .unwrap_or(1),
        machine_rank: args
            .machine_rank
            .or(file.map(|f| f.machine_rank as usize))
            .unwrap_or(0),
        main_process_ip: args
            .main_process_ip
            .clone()
            .or(file.and_then(|f| f.main_process_ip.clone()))
            .unwrap_or_else(|| hasten_core::DEFAULT_MASTER_ADDR.to_owned()),
        main_process_port: args
            .main_process_port
            .or(file.and_then(|f| f.main_process_port))
            .unwrap_or(hasten_core::DEFAULT_MASTER_PORT),
        mixed_precision: args
            .mixed_precision
            .or(file.and_then(|f| f.mixed_precision))
            .unwrap_or(PrecisionType::No),
        use_cpu,
        gpu_ids: args
            .gpu_ids
            .clone()
            .or(file.and_then(|f| f.gpu_ids.clone())),
        visible_gpus: host.gpus,
        gpu_binding: args.gpu_binding,
        debug: args.debug || file.is_some_and(|f| f.debug),
        num_cpu_threads_per_process: args.num_cpu_threads_per_process,
        cpu_count: host.cpus,
        rdzv_secret: None,
        extra_env: fsdp_env(args, file),
    }
}

/// The rendezvous secret for a job: `HASTEN_RDZV_SECRET` when set (every machine of a job must share it),
/// else a fresh one on a single machine; on several machines without one the rendezvous is not
/// authenticated, and `warn` says so.
pub fn rdzv_secret(num_machines: usize, warn: &dyn Fn(&str)) -> Result<Option<String>> {
    if let Some(secret) = std::env::var(hasten_core::RDZV_SECRET_VAR)
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        return Ok(Some(secret));
    }
    if num_machines > 1 {
        warn(&format!(
            "hasten: the rendezvous of this {num_machines}-machine job is not authenticated: set the same \
             {} on every machine to keep other processes out",
            hasten_core::RDZV_SECRET_VAR
        ));
        return Ok(None);
    }
    hasten_core::new_rdzv_secret()
        .map(Some)
        .map_err(|source| LaunchError::Os {
            op: "making the job's rendezvous secret",
            source,
        })
}

/// Turns port 0 into a free port and, on a single machine, steps off a busy port with a warning (as
/// Accelerate does); on several machines a busy port on the main machine is an error.
pub fn resolve_port(
    cfg: &mut LaunchConfig,
    warn: &dyn Fn(&str),
) -> Result<Option<host::PortReservation>> {
    let os = |source| LaunchError::Os {
        op: "finding a free port",
        source,
    };
    if cfg.main_process_port == 0 {
        let reserved = host::reserve_port(&cfg.main_process_ip).map_err(os)?;
        cfg.main_process_port = reserved.port();
        return Ok(Some(reserved));
    }
    if cfg.machine_rank == 0 && !host::port_is_free(cfg.main_process_port) {
        if cfg.num_machines > 1 {
            return Err(LaunchError::Invalid(format!(
                "--main_process_port {} is already in use on this machine, the main one; pick another",
                cfg.main_process_port
            )));
        }
        let busy = cfg.main_process_port;
        let reserved = host::reserve_port("127.0.0.1").map_err(os)?;
        cfg.main_process_port = reserved.port();
        warn(&format!(
            "hasten: port {busy} is in use; using free port {} for this single-machine run",
            cfg.main_process_port
        ));
        return Ok(Some(reserved));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        launch: LaunchArgs,
    }

    fn args(line: &[&str]) -> LaunchArgs {
        Cli::try_parse_from(std::iter::once("hasten").chain(line.iter().copied()))
            .unwrap()
            .launch
    }

    const HOST: HostFacts = HostFacts {
        gpus: Vec::new(),
        cpus: 4,
    };

    #[test]
    fn flags_with_underscores_or_hyphens() {
        let a = args(&[
            "--num_processes",
            "2",
            "--main-process-port",
            "0",
            "--cpu",
            "prog",
            "--lr",
            "3",
        ]);
        assert_eq!(a.num_processes, Some(2));
        assert_eq!(a.main_process_port, Some(0));
        assert!(a.cpu);
        assert_eq!(a.program, "prog");
        assert_eq!(a.args, vec![OsString::from("--lr"), OsString::from("3")]);
        assert!(Cli::try_parse_from(["hasten", "--mixed_precision", "fp32", "p"]).is_err());
    }

    #[test]
    fn flags_override_the_config_file() {
        let file = ClusterConfig {
            num_processes: 4,
            debug: true,
            mixed_precision: Some(PrecisionType::Bf16),
            main_process_port: Some(1234),
            ..hasten_core::basic_config(PrecisionType::No, 4)
        };
        let cfg = merge(
            &args(&["--num_processes", "2", "p"]),
            Some(&file),
            HOST.clone(),
        );
        assert_eq!(cfg.num_processes, 2);
        assert!(cfg.debug);
        assert_eq!(cfg.mixed_precision, PrecisionType::Bf16);
        assert_eq!(cfg.main_process_port, 1234);
        let cfg = merge(
            &args(&["--mixed_precision", "fp16", "p"]),
            Some(&file),
            HOST.clone(),
        );
        assert_eq!(
            (cfg.num_processes, cfg.mixed_precision),
            (4, PrecisionType::Fp16)
        );
    }

    #[test]
    fn defaults_without_a_config() {
        let cfg = merge(&args(&["p"]), None, HOST.clone());
        assert_eq!(cfg.num_processes, 1);
        assert_eq!(cfg.main_process_port, 29500);
        assert_eq!(cfg.main_process_ip, "127.0.0.1");
        let gpus = merge(
            &args(&["p"]),
            None,
            HostFacts {
                gpus: vec!["0".into(), "1".into()],
                cpus: 4,
            },
        );
        assert_eq!(gpus.num_processes, 2);
        let cpu = merge(
            &args(&["--cpu", "p"]),
            None,
            HostFacts {
                gpus: vec!["0".into(), "1".into()],
                cpus: 4,
            },
        );
        assert_eq!(cpu.num_processes, 1);
    }

    #[test]
    fn ports_are_resolved() {
        let mut cfg = merge(
            &args(&["--main_process_port", "0", "p"]),
            None,
            HOST.clone(),
        );
        let reserved = resolve_port(&mut cfg, &|_| {})
            .unwrap()
            .expect("port 0 is reserved");
        assert_ne!(cfg.main_process_port, 0);
        assert_eq!(reserved.port(), cfg.main_process_port);
        assert!(!host::port_is_free(cfg.main_process_port));

        let held = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let busy = held.local_addr().unwrap().port();
        let mut cfg = LaunchConfig {
            main_process_port: busy,
            ..LaunchConfig::default()
        };
        let warned = std::cell::RefCell::new(String::new());
        let reserved = resolve_port(&mut cfg, &|w| *warned.borrow_mut() = w.to_owned()).unwrap();
        assert_ne!(cfg.main_process_port, busy);
        assert_eq!(reserved.map(|r| r.port()), Some(cfg.main_process_port));
        assert!(warned.borrow().contains(&format!("port {busy} is in use")));

        let mut multi = LaunchConfig {
            main_process_port: busy,
            num_machines: 2,
            num_processes: 2,
            ..LaunchConfig::default()
        };
        let err = resolve_port(&mut multi, &|_| {}).unwrap_err().to_string();
        assert!(
            err.contains(&format!("--main_process_port {busy}")),
            "{err}"
        );
    }

    #[test]
    fn deepspeed_and_other_configs_are_refused_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for (kind, said) in [
            ("DEEPSPEED", "distributed_type: DEEPSPEED"),
            ("XLA", "distributed_type: XLA"),
        ] {
            let path = dir.path().join(format!("{kind}.yaml"));
            std::fs::write(
                &path,
                format!("compute_environment: LOCAL_MACHINE\ndistributed_type: {kind}\nnum_processes: 2\n"),
            )
            .unwrap();
            let err = load_config_file(Some(&path)).unwrap_err().to_string();
            for needle in [said, &path.display().to_string(), "plain DDP", "FSDP"] {
                assert!(err.contains(needle), "{kind}: {err} lacks {needle}");
            }
        }
        // Sections under another distributed_type are ignored, as `accelerate launch` ignores them.
        let path = dir.path().join("gpu.yaml");
        std::fs::write(
            &path,
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n",
        )
        .unwrap();
        let cfg = load_config_file(Some(&path)).unwrap().unwrap();
        assert!(fsdp_env(&LaunchArgs::default(), Some(&cfg)).is_empty());
    }

    #[test]
    fn an_fsdp_config_and_flags_become_the_workers_fsdp_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fsdp.yaml");
        std::fs::write(
            &path,
            "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  \
             fsdp_version: 2\n  fsdp_reshard_after_forward: true\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  \
             transformer_layer_cls_to_wrap: [blocks.*, head]\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n",
        )
        .unwrap();
        let cfg = load_config_file(Some(&path)).unwrap().unwrap();
        let args = LaunchArgs {
            fsdp: FsdpArgs {
                fsdp_reshard_after_forward: Some("false".into()),
                ..FsdpArgs::default()
            },
            ..LaunchArgs::default()
        };
        let env = fsdp_env(&args, Some(&cfg));
        let get = |k: &str| env.iter().find(|(v, _)| v == k).map(|(_, x)| x.as_str());
        assert_eq!(get("ACCELERATE_USE_FSDP"), Some("true"));
        assert_eq!(get("FSDP_VERSION"), Some("2"));
        // The flag wins over the file.
        assert_eq!(get("FSDP_RESHARD_AFTER_FORWARD"), Some("false"));
        assert_eq!(get("FSDP_TRANSFORMER_CLS_TO_WRAP"), Some("blocks.*,head"));
        assert_eq!(get("FSDP_STATE_DICT_TYPE"), Some("SHARDED_STATE_DICT"));
        assert_eq!(get("FSDP_OFFLOAD_PARAMS"), None);
        let merged = merge(
            &args,
            Some(&cfg),
            HostFacts {
                gpus: vec![],
                cpus: 2,
            },
        );
        assert!(
            merged
                .extra_env
                .contains(&("FSDP_VERSION".into(), "2".into()))
        );
        // --use_fsdp alone switches it on.
        let flag = LaunchArgs {
            use_fsdp: true,
            ..LaunchArgs::default()
        };
        assert_eq!(
            fsdp_env(&flag, None),
            [("ACCELERATE_USE_FSDP".to_owned(), "true".to_owned())]
        );
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let err = load_config_file(Some(&PathBuf::from("/nonexistent/cfg.yaml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/cfg.yaml"), "{err}");
    }
}
