//! Launch plans: pure functions from the launch settings to what each rank gets. Nothing here touches
//! processes, ports or devices; the facts it needs (port, CPU count) come in as values.

use crate::{LaunchError, Result};
use hasten_core::PrecisionType;

/// The settings of one launch, after the config file and the command line are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchConfig {
    /// Total processes across all machines (`--num_processes`).
    pub num_processes: usize,
    /// Number of machines (`--num_machines`).
    pub num_machines: usize,
    /// This machine's index (`--machine_rank`).
    pub machine_rank: usize,
    /// Rendezvous host (`--main_process_ip`).
    pub main_process_ip: String,
    /// Rendezvous port, already resolved (never 0 here).
    pub main_process_port: u16,
    /// `--mixed_precision`, exported as ACCELERATE_MIXED_PRECISION.
    pub mixed_precision: PrecisionType,
    /// `--cpu`: force the CPU even where GPUs exist.
    pub use_cpu: bool,
    /// `--gpu_ids`: written to CUDA_VISIBLE_DEVICES (None or "all": leave it alone).
    pub gpu_ids: Option<String>,
    /// The GPUs this machine's launcher may use, as `CUDA_VISIBLE_DEVICES` entries in order (its own
    /// `CUDA_VISIBLE_DEVICES`, else every installed GPU); empty without GPUs. `--gpu_ids` narrows it.
    pub visible_gpus: Vec<String>,
    /// Each rank sees only its own GPU (`CUDA_VISIBLE_DEVICES` = the local rank's entry), as SLURM's GPU
    /// binding does; on by default, off with `HASTEN_GPU_BINDING=0`. See [`plan`].
    pub gpu_binding: bool,
    /// `--debug`: ACCELERATE_DEBUG_MODE=true in the workers.
    pub debug: bool,
    /// `--num_cpu_threads_per_process`: OMP_NUM_THREADS (None: cores / processes per machine).
    pub num_cpu_threads_per_process: Option<usize>,
    /// Logical CPUs on this machine, for the OMP_NUM_THREADS default.
    pub cpu_count: usize,
    /// The job's rendezvous secret, given to every rank as `HASTEN_RDZV_SECRET` (see
    /// [`crate::rdzv_secret`]); `None`: the rendezvous is not authenticated.
    pub rdzv_secret: Option<String>,
    /// Further variables for every rank: the integrations' settings (ACCELERATE_USE_FSDP and FSDP_*).
    pub extra_env: Vec<(String, String)>,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig {
            num_processes: 1,
            num_machines: 1,
            machine_rank: 0,
            main_process_ip: hasten_core::DEFAULT_MASTER_ADDR.to_owned(),
            main_process_port: hasten_core::DEFAULT_MASTER_PORT,
            mixed_precision: PrecisionType::No,
            use_cpu: false,
            gpu_ids: None,
            visible_gpus: Vec::new(),
            gpu_binding: true,
            debug: false,
            num_cpu_threads_per_process: None,
            cpu_count: 1,
            rdzv_secret: None,
            extra_env: Vec::new(),
        }
    }
}

/// What one rank is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlan {
    /// Global rank.
    pub rank: usize,
    /// Rank on this machine.
    pub local_rank: usize,
    /// The environment contract and Accelerate's variables for this rank.
    pub env: Vec<(String, String)>,
}

/// Every rank this machine starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Processes in the whole job.
    pub world_size: usize,
    /// Processes on this machine.
    pub nproc_per_node: usize,
    /// This machine's index.
    pub node_rank: usize,
    /// The ranks started here, in local-rank order.
    pub ranks: Vec<RankPlan>,
}

/// Turns launch settings into per-rank environments, checking them the way Accelerate does.
///
/// GPU binding: where several ranks share a machine that has at least as many GPUs, rank `i` gets
/// `CUDA_VISIBLE_DEVICES` = the `i`-th GPU alone, and so computes on `cuda:0` (Accelerate's rule, local
/// rank modulo the GPUs visible). CUDA's start-up in a process grows with the GPUs it can see (on a
/// 4-GPU host 1.1 s with all 4 visible against about 0.55 s with 2), and a rank only ever uses one;
/// NCCL still reaches the other GPUs over NVLink (it finds them by bus id). Without binding, every rank
/// sees all of them and rank `i` computes on `cuda:i`, as under Python Accelerate.
pub fn plan(cfg: &LaunchConfig) -> Result<LaunchPlan> {
    let invalid = |m: String| Err(LaunchError::Invalid(m));
    if cfg.num_processes == 0 || cfg.num_processes > hasten_core::MAX_WORLD_SIZE {
        return invalid(format!(
            "--num_processes {} must be from 1 to {}",
            cfg.num_processes,
            hasten_core::MAX_WORLD_SIZE
        ));
    }
    if cfg.num_machines == 0 {
        return invalid("--num_machines must be at least 1".into());
    }
    if cfg.num_processes % cfg.num_machines != 0 {
        return invalid(format!(
            "--num_processes {} (the total across machines) is not divisible by --num_machines {}",
            cfg.num_processes, cfg.num_machines
        ));
    }
    if cfg.machine_rank >= cfg.num_machines {
        return invalid(format!(
            "--machine_rank {} must be less than --num_machines {}",
            cfg.machine_rank, cfg.num_machines
        ));
    }
    if cfg.main_process_port == 0 {
        return invalid("the rendezvous port must be resolved before planning".into());
    }
    let per_node = cfg.num_processes / cfg.num_machines;
    let gpu_ids = cfg
        .gpu_ids
        .as_deref()
        .map(str::trim)
        .filter(|g| !g.is_empty() && !g.eq_ignore_ascii_case("all"));
    if let (Some(ids), false) = (gpu_ids, cfg.use_cpu) {
        let listed: Vec<&str> = ids.split(',').map(str::trim).collect();
        if listed.iter().any(|id| id.parse::<u32>().is_err()) {
            return invalid(format!(
                "--gpu_ids {ids:?} must be a comma-separated list of GPU indices"
            ));
        }
        if listed.len() < per_node {
            return invalid(format!(
                "--gpu_ids {ids} lists {} GPU(s) but {per_node} processes run on this machine",
                listed.len()
            ));
        }
    }
    let threads = cfg
        .num_cpu_threads_per_process
        .unwrap_or_else(|| (cfg.cpu_count / per_node).max(1));

    let mut common: Vec<(String, String)> = vec![
        ("WORLD_SIZE".into(), cfg.num_processes.to_string()),
        ("LOCAL_WORLD_SIZE".into(), per_node.to_string()),
        ("GROUP_RANK".into(), cfg.machine_rank.to_string()),
        ("MASTER_ADDR".into(), cfg.main_process_ip.clone()),
        ("MASTER_PORT".into(), cfg.main_process_port.to_string()),
        (
            hasten_core::MIXED_PRECISION_VAR.into(),
            cfg.mixed_precision.to_string(),
        ),
        (hasten_core::USE_CPU_VAR.into(), cfg.use_cpu.to_string()),
        (hasten_core::DEBUG_MODE_VAR.into(), cfg.debug.to_string()),
        ("OMP_NUM_THREADS".into(), threads.to_string()),
    ];
    if let Some(secret) = &cfg.rdzv_secret {
        common.push((hasten_core::RDZV_SECRET_VAR.into(), secret.clone()));
    }
    common.extend(cfg.extra_env.iter().cloned());
    let usable: Vec<String> = match gpu_ids {
        Some(ids) => ids.split(',').map(|id| id.trim().to_owned()).collect(),
        None => cfg.visible_gpus.clone(),
    };
    let bind = cfg.gpu_binding && !cfg.use_cpu && per_node > 1 && usable.len() >= per_node;
    if let (Some(ids), false, false) = (gpu_ids, cfg.use_cpu, bind) {
        common.push(("CUDA_VISIBLE_DEVICES".into(), ids.to_owned()));
    }
    let ranks = (0..per_node)
        .map(|local_rank| {
            let rank = cfg.machine_rank * per_node + local_rank;
            let mut env = vec![
                ("RANK".to_owned(), rank.to_string()),
                ("LOCAL_RANK".to_owned(), local_rank.to_string()),
            ];
            if bind {
                env.push((
                    "CUDA_VISIBLE_DEVICES".to_owned(),
                    usable[local_rank].clone(),
                ));
            }
            env.extend(common.iter().cloned());
            RankPlan {
                rank,
                local_rank,
                env,
            }
        })
        .collect();
    Ok(LaunchPlan {
        world_size: cfg.num_processes,
        nproc_per_node: per_node,
        node_rank: cfg.machine_rank,
        ranks,
    })
}

/// Variables from other launchers that must not reach a worker: they would describe a different job
/// (hasten's own contract variables are always set, so they win anyway; these are the fallbacks), and
/// an inherited listening descriptor meant for some other job's rank 0.
pub const FOREIGN_CONTRACT_VARS: &[&str] = &[
    hasten_core::RDZV_LISTEN_FD_VAR,
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "MV2_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE",
    // torchrun's agent store lives on MASTER_PORT only under torchrun.
    "TORCHELASTIC_USE_AGENT_STORE",
    // The launcher chose (and may hold) the rendezvous port: an inherited override would send the ranks
    // elsewhere.
    "HASTEN_RDZV_PORT",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(rank: &RankPlan, key: &str) -> Option<String> {
        rank.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn two_cpu_processes() {
        let p = plan(&LaunchConfig {
            num_processes: 2,
            use_cpu: true,
            cpu_count: 8,
            main_process_port: 1234,
            ..LaunchConfig::default()
        })
        .unwrap();
        assert_eq!((p.world_size, p.nproc_per_node, p.node_rank), (2, 2, 0));
        assert_eq!(p.ranks.len(), 2);
        let r1 = &p.ranks[1];
        assert_eq!((r1.rank, r1.local_rank), (1, 1));
        for (k, v) in [
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
            ("ACCELERATE_USE_CPU", "true"),
            ("ACCELERATE_MIXED_PRECISION", "no"),
            ("ACCELERATE_DEBUG_MODE", "false"),
            ("OMP_NUM_THREADS", "4"),
        ] {
            assert_eq!(env_of(r1, k).as_deref(), Some(v), "{k}");
        }
        assert_eq!(env_of(r1, "CUDA_VISIBLE_DEVICES"), None);
    }

    #[test]
    fn second_machine_gets_the_upper_ranks() {
        let p = plan(&LaunchConfig {
            num_processes: 4,
            num_machines: 2,
            machine_rank: 1,
            main_process_ip: "10.0.0.1".into(),
            main_process_port: 29500,
            ..LaunchConfig::default()
        })
        .unwrap();
        let ranks: Vec<(usize, usize)> = p.ranks.iter().map(|r| (r.rank, r.local_rank)).collect();
        assert_eq!(ranks, vec![(2, 0), (3, 1)]);
        assert_eq!(env_of(&p.ranks[0], "GROUP_RANK").as_deref(), Some("1"));
        assert_eq!(env_of(&p.ranks[0], "WORLD_SIZE").as_deref(), Some("4"));
        assert_eq!(
            env_of(&p.ranks[0], "MASTER_ADDR").as_deref(),
            Some("10.0.0.1")
        );
    }

    #[test]
    fn gpu_ids_become_cuda_visible_devices() {
        let p = plan(&LaunchConfig {
            num_processes: 2,
            gpu_ids: Some("2,3".into()),
            gpu_binding: false,
            mixed_precision: PrecisionType::Bf16,
            debug: true,
            ..LaunchConfig::default()
        })
        .unwrap();
        assert_eq!(
            env_of(&p.ranks[0], "CUDA_VISIBLE_DEVICES").as_deref(),
            Some("2,3")
        );
        assert_eq!(
            env_of(&p.ranks[0], "ACCELERATE_MIXED_PRECISION").as_deref(),
            Some("bf16")
        );
        assert_eq!(
            env_of(&p.ranks[0], "ACCELERATE_DEBUG_MODE").as_deref(),
            Some("true")
        );
        let all = plan(&LaunchConfig {
            gpu_ids: Some("all".into()),
            ..LaunchConfig::default()
        })
        .unwrap();
        assert_eq!(env_of(&all.ranks[0], "CUDA_VISIBLE_DEVICES"), None);
    }

    fn visible_of(p: &LaunchPlan) -> Vec<Option<String>> {
        p.ranks
            .iter()
            .map(|r| env_of(r, "CUDA_VISIBLE_DEVICES"))
            .collect()
    }

    #[test]
    fn each_rank_is_bound_to_its_own_gpu() {
        let gpus = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        let four = LaunchConfig {
            num_processes: 2,
            visible_gpus: gpus(4),
            ..LaunchConfig::default()
        };
        let some = |v: &str| Some(v.to_owned());
        assert_eq!(
            visible_of(&plan(&four).unwrap()),
            vec![some("0"), some("1")]
        );
        // --gpu_ids picks the GPUs, then each rank gets one of them.
        let ids = LaunchConfig {
            gpu_ids: Some("3, 1".into()),
            ..four.clone()
        };
        assert_eq!(visible_of(&plan(&ids).unwrap()), vec![some("3"), some("1")]);
        // The launcher's own CUDA_VISIBLE_DEVICES (UUIDs included) is what it hands out.
        let uuids = LaunchConfig {
            visible_gpus: vec!["GPU-aa".into(), "GPU-bb".into()],
            ..four.clone()
        };
        assert_eq!(
            visible_of(&plan(&uuids).unwrap()),
            vec![some("GPU-aa"), some("GPU-bb")]
        );
        // The second machine's ranks count from its own first GPU.
        let second = LaunchConfig {
            num_processes: 4,
            num_machines: 2,
            machine_rank: 1,
            ..four.clone()
        };
        assert_eq!(
            visible_of(&plan(&second).unwrap()),
            vec![some("0"), some("1")]
        );
        // No binding: opted out, one rank, the CPU, or fewer GPUs than ranks (they share, as Accelerate's
        // local rank modulo the GPU count does).
        let off = LaunchConfig {
            gpu_binding: false,
            ..four.clone()
        };
        assert_eq!(visible_of(&plan(&off).unwrap()), vec![None, None]);
        let one = LaunchConfig {
            num_processes: 1,
            ..four.clone()
        };
        assert_eq!(visible_of(&plan(&one).unwrap()), vec![None]);
        let cpu = LaunchConfig {
            use_cpu: true,
            ..four.clone()
        };
        assert_eq!(visible_of(&plan(&cpu).unwrap()), vec![None, None]);
        let short = LaunchConfig {
            num_processes: 3,
            visible_gpus: gpus(2),
            ..four
        };
        assert_eq!(visible_of(&plan(&short).unwrap()), vec![None, None, None]);
    }

    #[test]
    fn invalid_settings_name_the_flag() {
        let err = |cfg: LaunchConfig| plan(&cfg).unwrap_err().to_string();
        let e = err(LaunchConfig {
            num_processes: 3,
            num_machines: 2,
            ..LaunchConfig::default()
        });
        assert!(
            e.contains("--num_processes 3") && e.contains("--num_machines 2"),
            "{e}"
        );
        let e = err(LaunchConfig {
            num_machines: 2,
            num_processes: 2,
            machine_rank: 2,
            ..LaunchConfig::default()
        });
        assert!(e.contains("--machine_rank 2"), "{e}");
        let e = err(LaunchConfig {
            num_processes: 0,
            ..LaunchConfig::default()
        });
        assert!(e.contains("--num_processes"), "{e}");
        let e = err(LaunchConfig {
            num_processes: 3,
            gpu_ids: Some("0,1".into()),
            ..LaunchConfig::default()
        });
        assert!(
            e.contains("--gpu_ids 0,1") && e.contains("3 processes"),
            "{e}"
        );
        let e = err(LaunchConfig {
            gpu_ids: Some("zero".into()),
            ..LaunchConfig::default()
        });
        assert!(e.contains("comma-separated"), "{e}");
    }

    #[test]
    fn threads_default_to_cores_per_process() {
        let p = plan(&LaunchConfig {
            num_processes: 4,
            cpu_count: 2,
            ..LaunchConfig::default()
        })
        .unwrap();
        assert_eq!(env_of(&p.ranks[0], "OMP_NUM_THREADS").as_deref(), Some("1"));
        let p = plan(&LaunchConfig {
            num_cpu_threads_per_process: Some(3),
            ..LaunchConfig::default()
        })
        .unwrap();
        assert_eq!(env_of(&p.ranks[0], "OMP_NUM_THREADS").as_deref(), Some("3"));
    }
}
