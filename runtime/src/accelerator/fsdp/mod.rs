//! Sharded data parallelism, Accelerate's `FullyShardedDataParallelPlugin` with FSDP2's semantics: every
//! rank keeps only its shard of each parameter, its gradient and its optimizer state; a forward gathers
//! the parameters, the backward reduce-scatters the gradients. `shard` holds the mechanism; this file the
//! plugin, its settings from the environment (`ACCELERATE_USE_FSDP`, `FSDP_*`, what `accelerate launch`
//! and `hasten launch` set), and how parameters are grouped into units.

mod context;
mod parallelism;
mod shard;

pub(crate) use context::{
    before_optimizer_step, block_paths, forget_stashed_gradients, register_block, register_model,
    with_active,
};
pub use parallelism::ParallelismConfig;
pub(crate) use shard::{Hybrid, Mesh, ShardedModel, SlicedRead, agree_on_empty_weights};

use crate::{Error, Result};
use tch::Tensor;

/// Named parameters (VarStore name, tensor).
pub(crate) type Named = Vec<(String, Tensor)>;

/// How parameters are sharded (Accelerate's `sharding_strategy`, FSDP1's names; FSDP2 expresses the
/// first two as `reshard_after_forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardingStrategy {
    /// Parameters, gradients and optimizer state sharded; parameters freed after the forward and
    /// gathered again for the backward (ZeRO-3). FSDP2's `reshard_after_forward=True`.
    FullShard,
    /// Gradients and optimizer state sharded; parameters kept gathered from the forward through the
    /// backward (ZeRO-2). FSDP2's `reshard_after_forward=False`.
    ShardGradOp,
    /// Nothing sharded: data parallelism as DDP does it.
    NoShard,
    /// FULL_SHARD among the processes of each machine, replicated across machines: gathers and
    /// reduce-scatters stay within a machine, and each gradient chunk is averaged with its replicas on
    /// the other machines. FSDP2's 2-D mesh with `reshard_after_forward=True`.
    HybridShard,
    /// SHARD_GRAD_OP among the processes of each machine, replicated across machines.
    HybridShardZero2,
}

impl ShardingStrategy {
    const NAMES: [&'static str; 5] = [
        "FULL_SHARD",
        "SHARD_GRAD_OP",
        "NO_SHARD",
        "HYBRID_SHARD",
        "HYBRID_SHARD_ZERO2",
    ];

    /// Accelerate's forms: the name in any case, or its number 1–5.
    pub fn parse(value: &str, var: &str) -> Result<Self> {
        let v = value.trim().to_ascii_uppercase();
        let index = match v.parse::<usize>() {
            Ok(n) if (1..=5).contains(&n) => n - 1,
            _ => Self::NAMES
                .iter()
                .position(|n| *n == v)
                .ok_or_else(|| Error::InvalidValue {
                    name: var.into(),
                    detail: format!(
                        "{value:?} is not a sharding strategy: one of {} (or 1–5)",
                        Self::NAMES.join(", ")
                    ),
                })?,
        };
        Ok([
            Self::FullShard,
            Self::ShardGradOp,
            Self::NoShard,
            Self::HybridShard,
            Self::HybridShardZero2,
        ][index])
    }
}

/// Which groups of parameters are gathered and freed together (Accelerate's `auto_wrap_policy`). A tch
/// model has no module classes: its modules are its VarStore paths (`blocks.3.attn`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AutoWrapPolicy {
    /// One unit: the whole model.
    NoWrap,
    /// A unit for every VarStore path matching one of these patterns, dotted path segments where `*`
    /// matches any one segment (`blocks.*` makes each block a unit): hasten's form of
    /// `transformer_cls_names_to_wrap`. `Block` (Accelerate's usual class name) means every part of the
    /// model built as a [`crate::layers::Block`].
    TransformerBasedWrap(Vec<String>),
    /// A unit for every VarStore path (module) holding more than this many parameters in all.
    SizeBasedWrap(i64),
}

/// What `save_state` writes for a sharded model (Accelerate's `state_dict_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateDictType {
    /// The whole model, gathered, written by the main process.
    FullStateDict,
    /// Each rank's shards (FSDP2's default in Accelerate).
    ShardedStateDict,
}

/// Accelerate's `FullyShardedDataParallelPlugin` (version 2 semantics), given to
/// [`crate::AcceleratorBuilder::fsdp_plugin`] or read from the environment when `ACCELERATE_USE_FSDP` is
/// set. It takes effect when more than one process trains, as in Accelerate.
#[derive(Clone, Debug, PartialEq)]
pub struct FullyShardedDataParallelPlugin {
    /// 1 or 2 (`FSDP_VERSION`, default 1 as in Accelerate). Both run hasten's one mechanism, which
    /// follows FSDP2; version 1 takes its strategy from `sharding_strategy`.
    pub fsdp_version: u8,
    /// FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD or HYBRID_SHARD_ZERO2.
    pub sharding_strategy: ShardingStrategy,
    /// Units (`FSDP_AUTO_WRAP_POLICY`, default NO_WRAP).
    pub auto_wrap_policy: AutoWrapPolicy,
    /// Keep the shards — parameters, gradients and so the optimizer's state and step — in the CPU's
    /// (page-locked) memory, gathering onto the GPU for the forward and backward (`FSDP_OFFLOAD_PARAMS`,
    /// FSDP2's CPUOffloadPolicy).
    pub cpu_offload: bool,
    /// Recompute each block's activations in the backward instead of keeping them
    /// (`FSDP_ACTIVATION_CHECKPOINTING`): every [`crate::layers::Block`] that is a unit keeps only its
    /// input, and its backward runs its forward again first.
    pub activation_checkpointing: bool,
    /// Load the weights on the main process only (`FSDP_CPU_RAM_EFFICIENT_LOADING`). hasten starts every
    /// rank from the main process's weights either way.
    pub cpu_ram_efficient_loading: bool,
    /// `FSDP_STATE_DICT_TYPE` (default SHARDED_STATE_DICT under version 2, FULL_STATE_DICT under 1).
    pub state_dict_type: StateDictType,
}

impl Default for FullyShardedDataParallelPlugin {
    fn default() -> Self {
        FullyShardedDataParallelPlugin {
            fsdp_version: 2,
            sharding_strategy: ShardingStrategy::FullShard,
            auto_wrap_policy: AutoWrapPolicy::NoWrap,
            cpu_offload: false,
            activation_checkpointing: false,
            cpu_ram_efficient_loading: false,
            state_dict_type: StateDictType::ShardedStateDict,
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn flag(name: &str) -> Result<bool> {
    Ok(crate::parse_flag_from_env(name, false)?)
}

impl FullyShardedDataParallelPlugin {
    /// The plugin `accelerate launch` describes to its workers through `FSDP_*` variables (what
    /// Accelerate's `__post_init__` reads), with Accelerate's defaults for the rest.
    pub fn from_env() -> Result<Self> {
        let version = match var("FSDP_VERSION") {
            None => 1,
            Some(v) => match v.trim() {
                "1" => 1,
                "2" => 2,
                _ => {
                    return Err(Error::InvalidValue {
                        name: "FSDP_VERSION".into(),
                        detail: format!("{v:?} is not an FSDP version: 1 or 2"),
                    });
                }
            },
        };
        let sharding_strategy = if version == 1 {
            // FSDP1 reads the strategy by name; FSDP_RESHARD_AFTER_FORWARD holds one too there.
            match var("FSDP_SHARDING_STRATEGY").or_else(|| var("FSDP_RESHARD_AFTER_FORWARD")) {
                Some(v) => ShardingStrategy::parse(&v, "FSDP_SHARDING_STRATEGY")?,
                None => ShardingStrategy::FullShard,
            }
        } else {
            match var("FSDP_RESHARD_AFTER_FORWARD") {
                None => ShardingStrategy::FullShard,
                Some(v) => match hasten_core::str_to_bool(&v) {
                    Some(true) => ShardingStrategy::FullShard,
                    Some(false) => ShardingStrategy::ShardGradOp,
                    None => {
                        return Err(Error::InvalidValue {
                            name: "FSDP_RESHARD_AFTER_FORWARD".into(),
                            detail: format!(
                                "reshard_after_forward set to {v}. This is not supported with FSDP2, \
                                 please set to a `bool`"
                            ),
                        });
                    }
                },
            }
        };
        let auto_wrap_policy = match var("FSDP_AUTO_WRAP_POLICY")
            .map(|v| v.trim().to_ascii_uppercase())
            .as_deref()
        {
            None | Some("NO_WRAP") => AutoWrapPolicy::NoWrap,
            Some("TRANSFORMER_BASED_WRAP") => {
                let names = var("FSDP_TRANSFORMER_CLS_TO_WRAP").ok_or_else(|| Error::InvalidValue {
                    name: "FSDP_TRANSFORMER_CLS_TO_WRAP".into(),
                    detail: "TRANSFORMER_BASED_WRAP needs the blocks to wrap: VarStore path patterns \
                             such as `blocks.*` (a tch model has no module classes)"
                        .into(),
                })?;
                AutoWrapPolicy::TransformerBasedWrap(
                    names.split(',').map(|s| s.trim().to_owned()).collect(),
                )
            }
            Some("SIZE_BASED_WRAP") => {
                let n = match var("FSDP_MIN_NUM_PARAMS") {
                    None => 0,
                    Some(v) => v.trim().parse::<i64>().map_err(|_| Error::InvalidValue {
                        name: "FSDP_MIN_NUM_PARAMS".into(),
                        detail: format!("`min_num_params` must be an integer. Got {v:?}"),
                    })?,
                };
                if n == 0 {
                    AutoWrapPolicy::NoWrap
                } else {
                    AutoWrapPolicy::SizeBasedWrap(n)
                }
            }
            Some(other) => {
                return Err(Error::InvalidValue {
                    name: "FSDP_AUTO_WRAP_POLICY".into(),
                    detail: format!(
                        "Invalid auto wrap policy: {other}. Must be one of ['TRANSFORMER_BASED_WRAP', \
                         'SIZE_BASED_WRAP', 'NO_WRAP']"
                    ),
                });
            }
        };
        let state_dict_type = match var("FSDP_STATE_DICT_TYPE")
            .map(|v| v.trim().to_ascii_uppercase())
            .as_deref()
        {
            None if version == 1 => StateDictType::FullStateDict,
            None => StateDictType::ShardedStateDict,
            Some("FULL_STATE_DICT" | "1") => StateDictType::FullStateDict,
            Some("SHARDED_STATE_DICT" | "3") => StateDictType::ShardedStateDict,
            Some(other) => {
                return Err(Error::InvalidValue {
                    name: "FSDP_STATE_DICT_TYPE".into(),
                    detail: format!(
                        "{other:?}: hasten writes FULL_STATE_DICT or SHARDED_STATE_DICT (FSDP2 does not \
                         support LOCAL_STATE_DICT)"
                    ),
                });
            }
        };
        if version == 2 && flag("FSDP_FORWARD_PREFETCH")? {
            return Err(Error::InvalidValue {
                name: "FSDP_FORWARD_PREFETCH".into(),
                detail: "forward_prefetch is not yet implemented in FSDP2, set to None or use \
                         `fsdp_version=1`"
                    .into(),
            });
        }
        if let Some(v) = var("FSDP_IGNORED_MODULES") {
            return Err(Error::InvalidValue {
                name: "FSDP_IGNORED_MODULES".into(),
                detail: format!("{v:?}: ignored modules are not supported by hasten's FSDP yet"),
            });
        }
        Ok(FullyShardedDataParallelPlugin {
            fsdp_version: version,
            sharding_strategy,
            auto_wrap_policy,
            cpu_offload: flag("FSDP_OFFLOAD_PARAMS")?,
            activation_checkpointing: flag("FSDP_ACTIVATION_CHECKPOINTING")?,
            cpu_ram_efficient_loading: flag("FSDP_CPU_RAM_EFFICIENT_LOADING")?,
            state_dict_type,
        })
    }

    /// An error for the settings hasten's FSDP does not run yet, naming the setting and what to use
    /// instead (never a run that quietly does something else).
    pub(crate) fn check_supported(&self) -> Result<()> {
        let refuse = |name: &str, detail: &str| {
            Err(Error::InvalidValue {
                name: name.into(),
                detail: detail.into(),
            })
        };
        if let AutoWrapPolicy::SizeBasedWrap(n) = self.auto_wrap_policy
            && n < 0
        {
            return refuse(
                "min_num_params (FSDP_MIN_NUM_PARAMS)",
                "must be a non-negative number of parameters",
            );
        }
        Ok(())
    }

    /// Whether a block's parameters are freed after its forward and gathered again for its backward.
    pub(crate) fn reshard_after_forward(&self) -> bool {
        matches!(
            self.sharding_strategy,
            ShardingStrategy::FullShard | ShardingStrategy::HybridShard
        )
    }

    /// How many ranks share each parameter's shards when that is fewer than the job's (`None`: the
    /// whole job). A ParallelismConfig with several replicas (FSDP2's HSDP) says it; else HYBRID_SHARD on
    /// more than one machine: the processes of one machine (the job's ranks are numbered machine by
    /// machine; on one machine HYBRID_SHARD is FULL_SHARD).
    pub(crate) fn shard_group_size(
        &self,
        state: &crate::ProcessState,
        parallelism: Option<(usize, usize)>,
    ) -> Option<usize> {
        if let Some((replicate, shard)) = parallelism {
            return (replicate > 1).then_some(shard);
        }
        let hybrid = matches!(
            self.sharding_strategy,
            ShardingStrategy::HybridShard | ShardingStrategy::HybridShardZero2
        );
        let (world, per_machine) = (state.contract.world_size, state.contract.local_world_size);
        (hybrid && per_machine < world).then_some(per_machine)
    }

    /// Whether parameters are sharded at all (NO_SHARD runs as DDP).
    pub(crate) fn shards(&self) -> bool {
        self.sharding_strategy != ShardingStrategy::NoShard
    }

    /// Groups named parameters into units by the wrap policy: each parameter goes to the deepest
    /// wrapped path holding it, else to the root unit (""); a unit holding several dtypes is split by
    /// dtype. Units come in the order of their first parameter.
    pub(crate) fn units(&self, named: Named) -> Result<Vec<(String, Named)>> {
        let segments = |name: &str| name.split('.').map(str::to_owned).collect::<Vec<_>>();
        let wrapped: Vec<String> = match &self.auto_wrap_policy {
            AutoWrapPolicy::NoWrap => Vec::new(),
            AutoWrapPolicy::TransformerBasedWrap(patterns) => {
                let mut found = Vec::new();
                for pattern in patterns {
                    let pat = segments(pattern);
                    let before = found.len();
                    if pattern == "Block" {
                        // Accelerate names a module class; hasten's block type is `layers::Block`.
                        for path in block_paths() {
                            if named.iter().any(|(n, _)| is_below(n, &path))
                                && !found.contains(&path)
                            {
                                found.push(path);
                            }
                        }
                    }
                    for (name, _) in &named {
                        let seg = segments(name);
                        // The module is the path the pattern matches, and a parameter lies below it.
                        if seg.len() > pat.len()
                            && pat.iter().zip(&seg).all(|(p, s)| p == "*" || p == s)
                        {
                            let module = seg[..pat.len()].join(".");
                            if !found.contains(&module) {
                                found.push(module);
                            }
                        }
                    }
                    if found.len() == before {
                        return Err(Error::InvalidValue {
                            name: "transformer_cls_names_to_wrap (FSDP_TRANSFORMER_CLS_TO_WRAP)"
                                .into(),
                            detail: format!(
                                "Could not find the transformer layer class {pattern} in the model: no \
                                 VarStore path matches it (patterns are dotted paths, `*` for one \
                                 segment, e.g. `blocks.*`)"
                            ),
                        });
                    }
                }
                found
            }
            AutoWrapPolicy::SizeBasedWrap(min) => {
                let mut sizes: Vec<(String, i64)> = Vec::new();
                for (name, t) in &named {
                    let seg = segments(name);
                    for depth in 1..seg.len() {
                        let module = seg[..depth].join(".");
                        match sizes.iter_mut().find(|(m, _)| *m == module) {
                            Some((_, n)) => *n += t.numel() as i64,
                            None => sizes.push((module, t.numel() as i64)),
                        }
                    }
                }
                sizes
                    .into_iter()
                    .filter(|(_, n)| n > min)
                    .map(|(m, _)| m)
                    .collect()
            }
        };
        let mut units: Vec<((String, tch::Kind), Named)> = Vec::new();
        for (name, t) in named {
            let unit = wrapped
                .iter()
                .filter(|m| is_below(&name, m))
                .max_by_key(|m| m.len())
                .cloned()
                .unwrap_or_default();
            let key = (unit, t.kind());
            match units.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push((name, t)),
                None => units.push((key, vec![(name, t)])),
            }
        }
        let names: Vec<String> = units
            .iter()
            .map(|((unit, kind), _)| {
                if units.iter().filter(|((u, _), _)| u == unit).count() > 1 {
                    format!("{unit} ({kind:?})")
                } else {
                    unit.clone()
                }
            })
            .collect();
        Ok(names
            .into_iter()
            .zip(units.into_iter().map(|(_, members)| members))
            .collect())
    }
}

/// Whether the variable `name` lies below the VarStore path `path` (`blocks.1.fc.weight` below
/// `blocks.1`, not below `blocks.10`).
fn is_below(name: &str, path: &str) -> bool {
    name.strip_prefix(path)
        .is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests;
