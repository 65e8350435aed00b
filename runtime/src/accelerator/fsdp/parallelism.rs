//! Accelerate's `ParallelismConfig`, its data-parallel dimensions: how FSDP2 expresses hybrid sharding
//! (HSDP) — `dp_shard_size` ranks share each parameter's shards, and `dp_replicate_size` such groups hold
//! replicas of them. Set by [`crate::AcceleratorBuilder::parallelism_config`], or by `hasten launch` /
//! `accelerate launch` through `ACCELERATE_USE_PARALLELISM_CONFIG` and `PARALLELISM_CONFIG_*`.

use crate::{Error, Result};

/// Accelerate's `ParallelismConfig` (data parallelism only: tensor, context and sequence parallelism
/// are an error naming their size). The ranks form a mesh `(dp_replicate, dp_shard)` in row-major order,
/// as Accelerate builds it: ranks `r·S … r·S + S − 1` share one set of shards (S = `dp_shard_size`), and
/// the ranks at the same place of every such group are replicas. A size left at `None` is 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParallelismConfig {
    /// How many replicas of the sharded model (`PARALLELISM_CONFIG_DP_REPLICATE_SIZE`).
    pub dp_replicate_size: Option<usize>,
    /// How many ranks share each replica's shards (`PARALLELISM_CONFIG_DP_SHARD_SIZE`).
    pub dp_shard_size: Option<usize>,
}

fn size_from_env(dim: &str) -> Result<Option<usize>> {
    let name = format!("PARALLELISM_CONFIG_{dim}_SIZE");
    super::var(&name)
        .map(|v| {
            v.trim().parse::<usize>().map_err(|_| Error::InvalidValue {
                name: name.clone(),
                detail: format!("{v:?} is not a size (a whole number, at least 1)"),
            })
        })
        .transpose()
}

impl ParallelismConfig {
    /// The config `ACCELERATE_USE_PARALLELISM_CONFIG` and the `PARALLELISM_CONFIG_*` variables describe
    /// (`None` unless that flag is set, as in Accelerate).
    pub fn from_env() -> Result<Option<Self>> {
        if !crate::parse_flag_from_env("ACCELERATE_USE_PARALLELISM_CONFIG", false)? {
            return Ok(None);
        }
        for dim in ["TP", "CP", "SP"] {
            if let Some(n) = size_from_env(dim)?
                && n != 1
            {
                return Err(Error::InvalidValue {
                    name: format!("PARALLELISM_CONFIG_{dim}_SIZE"),
                    detail: format!(
                        "{} parallelism of size {n}: hasten runs data parallelism only \
                         (dp_replicate_size, dp_shard_size)",
                        match dim {
                            "TP" => "tensor",
                            "CP" => "context",
                            _ => "sequence",
                        }
                    ),
                });
            }
        }
        Ok(Some(ParallelismConfig {
            dp_replicate_size: size_from_env("DP_REPLICATE")?,
            dp_shard_size: size_from_env("DP_SHARD")?,
        }))
    }

    /// The sizes for a job of `world` processes: (replicas, ranks per replica). Accelerate's rules: every
    /// size at least 1; all 1 means one replica per process, or under FSDP (`sharded`) one replica
    /// sharded over every process; otherwise their product must be the number of processes.
    pub(crate) fn resolve(&self, world: usize, sharded: bool) -> Result<(usize, usize)> {
        let (replicate, shard) = (
            self.dp_replicate_size.unwrap_or(1),
            self.dp_shard_size.unwrap_or(1),
        );
        for (name, n) in [("dp_replicate_size", replicate), ("dp_shard_size", shard)] {
            if n == 0 {
                return Err(Error::InvalidValue {
                    name: format!("ParallelismConfig {name}"),
                    detail: format!("{name} must be at least 1, but got {n}"),
                });
            }
        }
        if replicate * shard == 1 {
            return Ok(if sharded { (1, world) } else { (world, 1) });
        }
        if replicate * shard != world {
            return Err(Error::InvalidValue {
                name: "ParallelismConfig".into(),
                detail: format!(
                    "ParallelismConfig total_size ({}) does not match num_processes ({world}). Please \
                     adjust dp_replicate_size ({replicate}) / dp_shard_size ({shard})",
                    replicate * shard
                ),
            });
        }
        Ok((replicate, shard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_accelerates_rules() {
        let pc = |r, s| ParallelismConfig {
            dp_replicate_size: r,
            dp_shard_size: s,
        };
        assert_eq!(pc(Some(2), Some(2)).resolve(4, true).unwrap(), (2, 2));
        assert_eq!(pc(None, Some(4)).resolve(4, true).unwrap(), (1, 4));
        // No sizes: one replica per process (DDP), or under FSDP the model sharded over all of them.
        assert_eq!(pc(None, None).resolve(4, false).unwrap(), (4, 1));
        assert_eq!(pc(None, None).resolve(4, true).unwrap(), (1, 4));
        let e = pc(Some(2), None).resolve(1, false).unwrap_err().to_string();
        assert!(e.contains("num_processes (1)"), "{e}");
        let e = pc(Some(2), Some(3))
            .resolve(4, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("total_size (6)") && e.contains("num_processes (4)"),
            "{e}"
        );
        let e = pc(Some(0), Some(4))
            .resolve(4, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dp_replicate_size must be at least 1"), "{e}");
        let read = |vars: &[(&str, &str)]| {
            crate::utils::patch_environment(vars.to_vec(), ParallelismConfig::from_env)
        };
        assert_eq!(read(&[]).unwrap(), None);
        assert_eq!(
            read(&[
                ("ACCELERATE_USE_PARALLELISM_CONFIG", "true"),
                ("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "2"),
                ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2"),
                ("PARALLELISM_CONFIG_TP_SIZE", "1"),
            ])
            .unwrap(),
            Some(pc(Some(2), Some(2)))
        );
        let e = read(&[
            ("ACCELERATE_USE_PARALLELISM_CONFIG", "true"),
            ("PARALLELISM_CONFIG_TP_SIZE", "2"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("PARALLELISM_CONFIG_TP_SIZE") && e.contains("tensor"),
            "{e}"
        );
        let e = read(&[
            ("ACCELERATE_USE_PARALLELISM_CONFIG", "true"),
            ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "two"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("PARALLELISM_CONFIG_DP_SHARD_SIZE"), "{e}");
    }
}
