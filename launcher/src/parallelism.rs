//! Accelerate's `--parallelism_config_*` flags and a config file's `parallelism_config` section: the
//! data-parallel sizes of FSDP2's hybrid sharding (HSDP), exported to the workers as
//! `ACCELERATE_USE_PARALLELISM_CONFIG` and `PARALLELISM_CONFIG_*`, which the runtime's
//! `ParallelismConfig` reads (and checks: sizes, their product, tensor/context/sequence parallelism).

use crate::{LaunchArgs, LaunchError, Result};
use hasten_core::ClusterConfig;

/// The `--parallelism_config_*` settings. Any of them, `--use_parallelism_config`, or a non-empty
/// `parallelism_config` section in the config file switches the ParallelismConfig on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ParallelismArgs {
    /// Pass a ParallelismConfig to the workers (needs FSDP version 2, as in Accelerate).
    #[arg(
        long = "use_parallelism_config",
        visible_alias = "use-parallelism-config"
    )]
    pub use_parallelism_config: bool,
    /// Replicas of the sharded model (HSDP's replicate dimension). Default 1.
    #[arg(
        long = "parallelism_config_dp_replicate_size",
        visible_alias = "parallelism-config-dp-replicate-size",
        value_name = "N"
    )]
    pub dp_replicate_size: Option<String>,
    /// Ranks sharing each replica's shards. Default 1.
    #[arg(
        long = "parallelism_config_dp_shard_size",
        visible_alias = "parallelism-config-dp-shard-size",
        value_name = "N"
    )]
    pub dp_shard_size: Option<String>,
    /// Tensor parallelism (hasten runs 1 only: the workers refuse more, naming it).
    #[arg(
        long = "parallelism_config_tp_size",
        visible_alias = "parallelism-config-tp-size",
        value_name = "N"
    )]
    pub tp_size: Option<String>,
    /// Context parallelism (hasten runs 1 only).
    #[arg(
        long = "parallelism_config_cp_size",
        visible_alias = "parallelism-config-cp-size",
        value_name = "N"
    )]
    pub cp_size: Option<String>,
    /// Sequence parallelism (hasten runs 1 only).
    #[arg(
        long = "parallelism_config_sp_size",
        visible_alias = "parallelism-config-sp-size",
        value_name = "N"
    )]
    pub sp_size: Option<String>,
}

impl ParallelismArgs {
    fn sizes(&self) -> [(&'static str, Option<&String>); 5] {
        [
            ("dp_replicate_size", self.dp_replicate_size.as_ref()),
            ("dp_shard_size", self.dp_shard_size.as_ref()),
            ("tp_size", self.tp_size.as_ref()),
            ("cp_size", self.cp_size.as_ref()),
            ("sp_size", self.sp_size.as_ref()),
        ]
    }
}

/// The workers' ParallelismConfig variables (empty when nothing asks for one): flags before the config
/// file's section, whose keys may omit the `parallelism_config_` prefix. As in Accelerate, it needs FSDP
/// version 2.
pub fn parallelism_env(
    args: &LaunchArgs,
    file: Option<&ClusterConfig>,
) -> Result<Vec<(String, String)>> {
    let p = &args.parallelism;
    let section = file
        .map(|f| &f.sections.parallelism_config)
        .filter(|s| !s.is_empty());
    let on =
        p.use_parallelism_config || p.sizes().iter().any(|(_, v)| v.is_some()) || section.is_some();
    if !on {
        return Ok(Vec::new());
    }
    let fsdp = crate::cli::fsdp_env(args, file);
    let version = fsdp
        .iter()
        .find(|(k, _)| k == "FSDP_VERSION")
        .map(|(_, v)| v.trim());
    if fsdp.is_empty() || version != Some("2") {
        return Err(LaunchError::Invalid(
            "You cannot use `--use_parallelism_config` (or a config file's parallelism_config) \
             without `--use_fsdp` and `--fsdp_version=2`."
                .into(),
        ));
    }
    let mut env = vec![(
        "ACCELERATE_USE_PARALLELISM_CONFIG".to_owned(),
        "true".to_owned(),
    )];
    for (key, flag) in p.sizes() {
        let value = flag.cloned().or_else(|| {
            let section = section?;
            section
                .get(&format!("parallelism_config_{key}"))
                .or_else(|| section.get(key))
                .map(crate::cli::config_value)
        });
        if let Some(value) = value {
            env.push((
                format!("PARALLELISM_CONFIG_{}", key.to_ascii_uppercase()),
                value,
            ));
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_from_flags_and_the_config_file_need_fsdp_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hsdp.yaml");
        std::fs::write(
            &path,
            "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 4\nfsdp_config:\n  \
             fsdp_version: 2\nparallelism_config:\n  parallelism_config_dp_replicate_size: 2\n  \
             parallelism_config_dp_shard_size: 2\n",
        )
        .unwrap();
        let cfg = ClusterConfig::from_file(&path).unwrap();
        let env = parallelism_env(&LaunchArgs::default(), Some(&cfg)).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ACCELERATE_USE_PARALLELISM_CONFIG"), Some("true"));
        assert_eq!(get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE"), Some("2"));
        assert_eq!(get("PARALLELISM_CONFIG_DP_SHARD_SIZE"), Some("2"));
        // A flag wins over the file.
        let mut args = LaunchArgs::default();
        args.parallelism.dp_shard_size = Some("4".into());
        args.parallelism.dp_replicate_size = Some("1".into());
        let env = parallelism_env(&args, Some(&cfg)).unwrap();
        assert!(env.contains(&("PARALLELISM_CONFIG_DP_SHARD_SIZE".into(), "4".into())));
        // Nothing asked: nothing exported; asked without FSDP 2: Accelerate's error.
        assert!(
            parallelism_env(&LaunchArgs::default(), None)
                .unwrap()
                .is_empty()
        );
        let e = parallelism_env(&args, None).unwrap_err().to_string();
        assert!(e.contains("--fsdp_version=2"), "{e}");
        args.use_fsdp = true;
        args.fsdp.fsdp_version = Some("2".into());
        assert!(parallelism_env(&args, None).is_ok());
    }
}
