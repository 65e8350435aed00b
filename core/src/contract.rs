//! The environment contract: how a worker learns its place in the group.
//!
//! torchrun's variables come first; SLURM's and the MPI launchers' are fallbacks, read variable by
//! variable as Accelerate does. Parsing is a pure function of a lookup so it is tested without touching
//! the process environment.

use crate::{Error, Result};

/// Names of the variables, in the order they are consulted.
const RANK: &[&str] = &[
    "RANK",
    "SLURM_PROCID",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "MV2_COMM_WORLD_RANK",
];
const LOCAL_RANK: &[&str] = &[
    "LOCAL_RANK",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
];
const WORLD_SIZE: &[&str] = &[
    "WORLD_SIZE",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "MV2_COMM_WORLD_SIZE",
];
const LOCAL_WORLD_SIZE: &[&str] = &[
    "LOCAL_WORLD_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "MV2_COMM_WORLD_LOCAL_SIZE",
];

/// Accelerate's default rendezvous address and port (`--main_process_ip`, `--main_process_port`).
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// Accelerate's default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Set by hasten's launchers for rank 0 when they chose the rendezvous port themselves: the number of an
/// inherited descriptor already listening on that port. Choosing a free port and binding it later is a race
/// with every other program on the host; handing over the bound socket closes it.
pub const RDZV_LISTEN_FD_VAR: &str = "HASTEN_RDZV_LISTEN_FD";

/// The most processes a job may have: far beyond any cluster, and small enough that per-rank tables stay
/// small (a stray `WORLD_SIZE=1000000000000` is refused, not allocated).
pub const MAX_WORLD_SIZE: usize = 1 << 20;

/// The job's secret, which every rank proves to rank 0 when it joins (HMAC-SHA256 of a fresh nonce):
/// hasten's launchers make one for each job; with torchrun, SLURM or MPI set it yourself on every rank
/// (unset everywhere, the rendezvous admits whoever greets it correctly, as before).
pub const RDZV_SECRET_VAR: &str = "HASTEN_RDZV_SECRET";

/// A fresh secret for a job: 32 bytes from the kernel's random source, as hex.
pub fn new_rdzv_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(data_encoding::HEXLOWER.encode(&bytes))
}

/// Where the values came from; shown by `hasten env` and in rendezvous errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContractSource {
    /// No contract variable was set: a single process.
    SingleProcess,
    /// torchrun's variables (also what `hasten launch` and `notebook_launcher` set).
    Torchrun,
    /// SLURM's `SLURM_*` variables (`srun`).
    Slurm,
    /// An MPI launcher's variables (Open MPI, Intel MPI/PMI, MVAPICH2).
    Mpi,
}

/// A worker's place in the process group, read from the environment contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvContract {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Rank on this node, `0..local_world_size`.
    pub local_rank: usize,
    /// Number of processes in the whole job.
    pub world_size: usize,
    /// Number of processes on this node.
    pub local_world_size: usize,
    /// Rendezvous host.
    pub master_addr: String,
    /// Rendezvous port.
    pub master_port: u16,
    /// The port hasten's rendezvous uses: MASTER_PORT, except under torchrun, whose agent already serves
    /// its own store there (then MASTER_PORT + 1), or as `HASTEN_RDZV_PORT` says.
    pub rdzv_port: u16,
    /// Which launcher's variables supplied the rank.
    pub source: ContractSource,
}

impl Default for EnvContract {
    fn default() -> Self {
        EnvContract {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            master_addr: DEFAULT_MASTER_ADDR.to_owned(),
            master_port: DEFAULT_MASTER_PORT,
            rdzv_port: DEFAULT_MASTER_PORT,
            source: ContractSource::SingleProcess,
        }
    }
}

/// A value found under one of several names.
struct Found {
    var: &'static str,
    value: usize,
}

fn first_number(
    lookup: &dyn Fn(&str) -> Option<String>,
    names: &[&'static str],
    expected: &'static str,
) -> Result<Option<Found>> {
    for &var in names {
        if let Some(raw) = lookup(var) {
            let value = raw.trim().parse::<usize>().map_err(|_| Error::EnvParse {
                var: var.to_owned(),
                value: raw.clone(),
                expected,
            })?;
            return Ok(Some(Found { var, value }));
        }
    }
    Ok(None)
}

fn source_of(var: &str) -> ContractSource {
    if var.starts_with("SLURM_") {
        ContractSource::Slurm
    } else if var.starts_with("OMPI_") || var.starts_with("PMI_") || var.starts_with("MV2_") {
        ContractSource::Mpi
    } else {
        ContractSource::Torchrun
    }
}

/// The first host of a SLURM host list: `node[03-05,9],gpu1` → `node03`.
pub(crate) fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    // The first host ends at the first comma outside brackets.
    let mut depth = 0usize;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let first = &list[..end];
    match first.find('[') {
        None => Some(first.to_owned()),
        Some(open) => {
            let prefix = &first[..open];
            let inner = first[open + 1..].trim_end_matches(']');
            let range = inner.split(',').next()?;
            let start = range.split('-').next()?;
            Some(format!("{prefix}{start}"))
        }
    }
}

/// The number of tasks on node `node_id` from SLURM_TASKS_PER_NODE, e.g. `2(x3),1` → [2,2,2,1].
fn slurm_tasks_on_node(tasks_per_node: &str, node_id: usize) -> Option<usize> {
    let mut counts = Vec::new();
    for part in tasks_per_node.split(',') {
        let part = part.trim();
        match part.split_once("(x") {
            Some((n, rep)) => {
                let n: usize = n.parse().ok()?;
                let rep: usize = rep.trim_end_matches(')').parse().ok()?;
                counts.extend(std::iter::repeat_n(n, rep));
            }
            None => counts.push(part.parse().ok()?),
        }
    }
    counts.get(node_id).copied()
}

impl EnvContract {
    /// Reads the contract from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Reads the contract through `lookup` (a name → value function), so it can be computed from any map.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        const NUM: &str = "a non-negative integer";
        let rank = first_number(lookup, RANK, NUM)?;
        let world = first_number(lookup, WORLD_SIZE, NUM)?;
        let local_rank = first_number(lookup, LOCAL_RANK, NUM)?;
        let mut local_world = first_number(lookup, LOCAL_WORLD_SIZE, NUM)?;

        let (rank, world) = match (rank, world) {
            (None, None) => {
                let mut single = EnvContract::default();
                single.read_master(lookup, None)?;
                if let Some(local) = local_rank {
                    if local.value != 0 {
                        return Err(Error::EnvInconsistent {
                            detail: format!(
                                "{}={} but no RANK/WORLD_SIZE is set (a single process has local rank 0)",
                                local.var, local.value
                            ),
                        });
                    }
                }
                return Ok(single);
            }
            (Some(r), None) => {
                return Err(Error::EnvInconsistent {
                    detail: format!(
                        "{}={} is set but none of {} is",
                        r.var,
                        r.value,
                        WORLD_SIZE.join(", ")
                    ),
                });
            }
            (None, Some(w)) if w.value > 1 => {
                return Err(Error::EnvInconsistent {
                    detail: format!(
                        "{}={} is set but none of {} is",
                        w.var,
                        w.value,
                        RANK.join(", ")
                    ),
                });
            }
            (None, Some(w)) => (
                Found {
                    var: "RANK",
                    value: 0,
                },
                w,
            ),
            (Some(r), Some(w)) => (r, w),
        };

        if world.value == 0 || world.value > MAX_WORLD_SIZE {
            return Err(Error::EnvParse {
                var: world.var.to_owned(),
                value: world.value.to_string(),
                expected: "a number of processes from 1 to 1048576",
            });
        }
        if rank.value >= world.value {
            return Err(Error::EnvInconsistent {
                detail: format!(
                    "{}={} must be less than {}={}",
                    rank.var, rank.value, world.var, world.value
                ),
            });
        }

        let source = source_of(rank.var);
        if local_world.is_none() && source == ContractSource::Slurm {
            // srun sets SLURM_NTASKS_PER_NODE only when asked with --ntasks-per-node.
            let node = lookup("SLURM_NODEID").and_then(|v| v.trim().parse().ok());
            if let (Some(tpn), Some(node)) = (lookup("SLURM_TASKS_PER_NODE"), node) {
                local_world = slurm_tasks_on_node(&tpn, node).map(|value| Found {
                    var: "SLURM_TASKS_PER_NODE",
                    value,
                });
            }
        }
        let local_world = match local_world {
            Some(lw) => lw,
            // Without a per-node count the job is taken to be one node, as torchrun does.
            None => Found {
                var: world.var,
                value: world.value,
            },
        };
        if local_world.value == 0 || local_world.value > world.value {
            return Err(Error::EnvInconsistent {
                detail: format!(
                    "{}={} must be between 1 and {}={}",
                    local_world.var, local_world.value, world.var, world.value
                ),
            });
        }
        let local_rank = match local_rank {
            Some(lr) => lr,
            None => Found {
                var: rank.var,
                value: rank.value % local_world.value,
            },
        };
        if local_rank.value >= local_world.value {
            return Err(Error::EnvInconsistent {
                detail: format!(
                    "{}={} must be less than {}={}",
                    local_rank.var, local_rank.value, local_world.var, local_world.value
                ),
            });
        }

        let mut contract = EnvContract {
            rank: rank.value,
            local_rank: local_rank.value,
            world_size: world.value,
            local_world_size: local_world.value,
            master_addr: DEFAULT_MASTER_ADDR.to_owned(),
            master_port: DEFAULT_MASTER_PORT,
            rdzv_port: DEFAULT_MASTER_PORT,
            source,
        };
        contract.read_master(lookup, Some(source))?;
        Ok(contract)
    }

    fn read_master(
        &mut self,
        lookup: &dyn Fn(&str) -> Option<String>,
        source: Option<ContractSource>,
    ) -> Result<()> {
        if let Some(addr) = lookup("MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
            self.master_addr = addr.trim().to_owned();
        } else if source == Some(ContractSource::Slurm) {
            let nodes = lookup("SLURM_JOB_NODELIST").or_else(|| lookup("SLURM_NODELIST"));
            if let Some(host) = nodes.as_deref().and_then(first_slurm_host) {
                self.master_addr = host;
            }
        }
        if let Some(raw) = lookup("MASTER_PORT") {
            self.master_port = raw.trim().parse::<u16>().map_err(|_| Error::EnvParse {
                var: "MASTER_PORT".to_owned(),
                value: raw.clone(),
                expected: "a port number (0-65535)",
            })?;
        }
        self.rdzv_port = self.master_port;
        let port_var = if lookup("HASTEN_RDZV_PORT").is_some() {
            "HASTEN_RDZV_PORT"
        } else {
            "MASTER_PORT"
        };
        if let Some(raw) = lookup("HASTEN_RDZV_PORT") {
            self.rdzv_port = raw.trim().parse::<u16>().map_err(|_| Error::EnvParse {
                var: "HASTEN_RDZV_PORT".to_owned(),
                value: raw.clone(),
                expected: "a port number (0-65535)",
            })?;
        } else if lookup("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        {
            // torchrun's agent listens on MASTER_PORT itself (its TCPStore); take the next port.
            self.rdzv_port = self.master_port.checked_add(1).ok_or(Error::EnvParse {
                var: "MASTER_PORT".to_owned(),
                value: self.master_port.to_string(),
                expected: "a port below 65535 under torchrun (hasten rendezvouses on MASTER_PORT + 1)",
            })?;
        }
        // Port 0 would have rank 0 listen on a random port the other ranks cannot know.
        if self.rdzv_port == 0 && self.world_size > 1 {
            return Err(Error::EnvParse {
                var: port_var.to_owned(),
                value: "0".into(),
                expected: "a port number from 1 to 65535 when several processes rendezvous",
            });
        }
        Ok(())
    }

    /// Number of nodes, assuming every node runs `local_world_size` processes.
    pub fn num_nodes(&self) -> usize {
        self.world_size.div_ceil(self.local_world_size)
    }

    /// This node's index.
    pub fn node_rank(&self) -> usize {
        self.rank / self.local_world_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<EnvContract> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        EnvContract::from_lookup(&|k| map.get(k).cloned())
    }

    #[test]
    fn empty_environment_is_a_single_process() {
        let c = parse(&[]).unwrap();
        assert_eq!(c, EnvContract::default());
        assert_eq!((c.rank, c.world_size), (0, 1));
        assert_eq!(c.master_addr, "127.0.0.1");
        assert_eq!(c.master_port, 29500);
        assert_eq!(c.source, ContractSource::SingleProcess);
    }

    #[test]
    fn torchrun_variables() {
        let c = parse(&[
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.1.2.3"),
            ("MASTER_PORT", "12345"),
        ])
        .unwrap();
        assert_eq!(
            c,
            EnvContract {
                rank: 5,
                local_rank: 1,
                world_size: 8,
                local_world_size: 4,
                master_addr: "10.1.2.3".into(),
                master_port: 12345,
                rdzv_port: 12345,
                source: ContractSource::Torchrun,
            }
        );
        assert_eq!(c.num_nodes(), 2);
        assert_eq!(c.node_rank(), 1);
    }

    #[test]
    fn missing_local_values_default_to_one_node() {
        let c = parse(&[("RANK", "2"), ("WORLD_SIZE", "3")]).unwrap();
        assert_eq!((c.local_rank, c.local_world_size), (2, 3));
    }

    #[test]
    fn slurm_fallbacks() {
        let c = parse(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_TASKS_PER_NODE", "2(x2)"),
            ("SLURM_NODEID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ])
        .unwrap();
        assert_eq!(c.source, ContractSource::Slurm);
        assert_eq!(
            (c.rank, c.local_rank, c.world_size, c.local_world_size),
            (3, 1, 4, 2)
        );
        assert_eq!(c.master_addr, "gpu07");
        assert_eq!(c.master_port, 29500);
    }

    #[test]
    fn torchrun_wins_over_slurm() {
        let c = parse(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("MASTER_ADDR", "host-a"),
        ])
        .unwrap();
        assert_eq!((c.rank, c.world_size), (1, 2));
        assert_eq!(c.source, ContractSource::Torchrun);
        assert_eq!(c.master_addr, "host-a");
    }

    #[test]
    fn open_mpi_fallbacks() {
        let c = parse(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "2222"),
        ])
        .unwrap();
        assert_eq!(c.source, ContractSource::Mpi);
        assert_eq!(
            (c.rank, c.local_rank, c.world_size, c.local_world_size),
            (2, 0, 4, 2)
        );
        assert_eq!((c.master_addr.as_str(), c.master_port), ("head", 2222));
    }

    #[test]
    fn rank_not_below_world_size_names_both_variables() {
        let err = parse(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=2"), "{err}");
        assert!(err.contains("WORLD_SIZE=2"), "{err}");
    }

    #[test]
    fn non_numbers_name_the_variable() {
        let err = parse(&[("RANK", "one"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=\"one\""), "{err}");
        let err = parse(&[("RANK", "0"), ("WORLD_SIZE", "-2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("WORLD_SIZE=\"-2\""), "{err}");
        let err = parse(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_PORT=\"70000\""), "{err}");
        let err = parse(&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SLURM_PROCID"), "{err}");
    }

    #[test]
    fn inconsistent_local_values() {
        let err = parse(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("LOCAL_RANK=2"), "{err}");
        assert!(err.contains("LOCAL_WORLD_SIZE=2"), "{err}");
        let err = parse(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_WORLD_SIZE", "3"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("LOCAL_WORLD_SIZE=3"), "{err}");
        let err = parse(&[("RANK", "0"), ("WORLD_SIZE", "0")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("WORLD_SIZE"), "{err}");
    }

    #[test]
    fn half_a_contract_is_an_error() {
        let err = parse(&[("RANK", "0")]).unwrap_err().to_string();
        assert!(
            err.contains("RANK=0 is set but none of WORLD_SIZE"),
            "{err}"
        );
        let err = parse(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(
            err.contains("WORLD_SIZE=2 is set but none of RANK"),
            "{err}"
        );
        // WORLD_SIZE=1 alone is a valid single process.
        assert_eq!(parse(&[("WORLD_SIZE", "1")]).unwrap().world_size, 1);
    }

    #[test]
    fn rendezvous_port_under_torchrun_and_by_request() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29400")];
        assert_eq!(parse(&base).unwrap().rdzv_port, 29400);
        let mut torchrun = base.to_vec();
        torchrun.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        let c = parse(&torchrun).unwrap();
        assert_eq!((c.master_port, c.rdzv_port), (29400, 29401));
        let mut zero = torchrun.clone();
        zero.push(("HASTEN_RDZV_PORT", "0"));
        let err = parse(&zero).unwrap_err().to_string();
        assert!(
            err.contains("HASTEN_RDZV_PORT") && err.contains("from 1 to 65535"),
            "{err}"
        );
        torchrun.push(("HASTEN_RDZV_PORT", "31000"));
        assert_eq!(parse(&torchrun).unwrap().rdzv_port, 31000);
        let err = parse(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("HASTEN_RDZV_PORT", "x"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("HASTEN_RDZV_PORT"), "{err}");
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(first_slurm_host("node1").as_deref(), Some("node1"));
        assert_eq!(first_slurm_host("node1,node2").as_deref(), Some("node1"));
        assert_eq!(
            first_slurm_host("gpu[03-05,9],cpu1").as_deref(),
            Some("gpu03")
        );
        assert_eq!(first_slurm_host("a[1,4]").as_deref(), Some("a1"));
        assert_eq!(first_slurm_host(""), None);
        assert_eq!(slurm_tasks_on_node("2(x3),1", 3), Some(1));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 1), Some(2));
        assert_eq!(slurm_tasks_on_node("4", 1), None);
    }
}
