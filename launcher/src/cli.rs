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

/// A config file asking for a distribution hasten does not run (DeepSpeed, FSDP, Megatron-LM, XLA,
/// other accelerators) is an error naming the file and the key: launching it would otherwise train as
/// plain DDP, every rank holding the whole model, its gradients and its optimizer state.
pub fn refuse_unsupported(cfg: &ClusterConfig, path: &std::path::Path) -> Result<()> {
    use hasten_core::DistributedType as D;
    let instead = "hasten runs distributed_type NO, MULTI_CPU and MULTI_GPU (DDP); for a model that does \
                   not fit on one GPU, use Python Accelerate until hasten's sharded training lands";
    let refuse = |what: String| {
        Err(LaunchError::Invalid(format!(
            "the config file {} asks for {what}, which hasten does not run (it would train as plain DDP \
             instead): {instead}",
            path.display()
        )))
    };
    match cfg.distributed_type {
        D::No | D::MultiCpu | D::MultiGpu => {}
        D::Deepspeed => return refuse("DeepSpeed (distributed_type: DEEPSPEED)".into()),
        D::Fsdp => return refuse("FSDP (distributed_type: FSDP)".into()),
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
    fn deepspeed_and_fsdp_configs_are_refused_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for (kind, said) in [
            ("DEEPSPEED", "distributed_type: DEEPSPEED"),
            ("FSDP", "distributed_type: FSDP"),
            ("XLA", "distributed_type: XLA"),
        ] {
            let path = dir.path().join(format!("{kind}.yaml"));
            std::fs::write(
                &path,
                format!("compute_environment: LOCAL_MACHINE\ndistributed_type: {kind}\nnum_processes: 2\n"),
            )
            .unwrap();
            let err = load_config_file(Some(&path)).unwrap_err().to_string();
            for needle in [said, &path.display().to_string(), "plain DDP", "MULTI_GPU"] {
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
        assert!(load_config_file(Some(&path)).unwrap().is_some());
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let err = load_config_file(Some(&PathBuf::from("/nonexistent/cfg.yaml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/cfg.yaml"), "{err}");
    }
}
