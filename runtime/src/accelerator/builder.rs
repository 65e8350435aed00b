//! The Accelerator's builder: every setting, from the caller or the environment contract, checked and
//! turned into an [`Accelerator`] that has joined its process group.

use super::fsdp::{FullyShardedDataParallelPlugin, ParallelismConfig};
use super::{
    Accelerator, AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs,
    GradScaler, GradScalerKwargs, GradientAccumulationPlugin, InitProcessGroupKwargs,
    ProjectConfiguration, reducer, trackers,
};
use crate::utils::{LoggerType, RNGType};
use crate::{
    Error, GradientState, GradientStateHandle, PrecisionType, ProcessGroup, ProcessState, Result,
};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Builds an [`Accelerator`]. Every setter names Accelerate's default; values not given come from the
/// environment contract (`ACCELERATE_MIXED_PRECISION`, `ACCELERATE_USE_CPU`,
/// `ACCELERATE_GRADIENT_ACCUMULATION_STEPS`), as in Accelerate.
#[derive(Debug, Default)]
pub struct AcceleratorBuilder {
    pub(super) mixed_precision: Option<PrecisionType>,
    pub(super) accumulation: Option<GradientAccumulationPlugin>,
    pub(super) cpu: bool,
    pub(super) dataloader: DataLoaderConfiguration,
    pub(super) ddp: DistributedDataParallelKwargs,
    pub(super) scaler: GradScalerKwargs,
    pub(super) init: InitProcessGroupKwargs,
    pub(super) autocast: AutocastKwargs,
    pub(super) project: ProjectConfiguration,
    pub(super) rng_types: Option<Vec<RNGType>>,
    pub(super) log_with: Vec<LoggerType>,
    pub(super) custom_trackers: Vec<crate::tracking::CustomTracker>,
    pub(super) step_scheduler_with_optimizer: Option<bool>,
    pub(super) fsdp: Option<FullyShardedDataParallelPlugin>,
    pub(super) parallelism: Option<ParallelismConfig>,
}

impl AcceleratorBuilder {
    /// `no`, `fp16` or `bf16` (default: `ACCELERATE_MIXED_PRECISION`, else `no`).
    pub fn mixed_precision(mut self, mode: PrecisionType) -> Self {
        self.mixed_precision = Some(mode);
        self
    }

    /// Micro-batches per optimizer step (default: `ACCELERATE_GRADIENT_ACCUMULATION_STEPS`, else 1).
    pub fn gradient_accumulation_steps(mut self, n: usize) -> Self {
        self.accumulation = Some(GradientAccumulationPlugin {
            num_steps: n.max(1),
            ..self.accumulation.unwrap_or_default()
        });
        self
    }

    /// The full accumulation settings (default: [`GradientAccumulationPlugin::default`]).
    pub fn gradient_accumulation_plugin(mut self, plugin: GradientAccumulationPlugin) -> Self {
        self.accumulation = Some(plugin);
        self
    }

    /// Run on the CPU even where GPUs exist (default false, or `ACCELERATE_USE_CPU`).
    pub fn cpu(mut self, on: bool) -> Self {
        self.cpu = on;
        self
    }

    /// How data loaders are sharded (default [`DataLoaderConfiguration::default`]).
    pub fn dataloader_config(mut self, config: DataLoaderConfiguration) -> Self {
        self.dataloader = config;
        self
    }

    /// Data-parallel settings (default [`DistributedDataParallelKwargs::default`]).
    pub fn ddp_kwargs(mut self, kwargs: DistributedDataParallelKwargs) -> Self {
        self.ddp = kwargs;
        self
    }

    /// fp16 loss-scaler settings (default [`GradScalerKwargs::default`]).
    pub fn grad_scaler_kwargs(mut self, kwargs: GradScalerKwargs) -> Self {
        self.scaler = kwargs;
        self
    }

    /// Process-group settings (default: rendezvous timeout from `HASTEN_RDZV_TIMEOUT`, else 120 s).
    pub fn init_process_group_kwargs(mut self, kwargs: InitProcessGroupKwargs) -> Self {
        self.init = kwargs;
        self
    }

    /// Autocast settings (default enabled).
    pub fn autocast_kwargs(mut self, kwargs: AutocastKwargs) -> Self {
        self.autocast = kwargs;
        self
    }

    /// Where checkpoints and logs go (default: none).
    pub fn project_config(mut self, config: ProjectConfiguration) -> Self {
        self.project = config;
        self
    }

    /// Generators synchronised from process 0 each time a prepared data loader starts an epoch (default
    /// `generator`, which needs nothing: hasten's samplers are seeded alike on every rank; `Torch` adds
    /// libtorch's CPU generator and hasten's host one, `Cuda` this rank's GPU's).
    pub fn rng_types(mut self, types: Vec<RNGType>) -> Self {
        self.rng_types = Some(types);
        self
    }

    /// Experiment trackers (default none): `Tensorboard` (needs `project_config`'s project_dir or
    /// logging_dir), or `All`; the others are Python services hasten skips with a warning (see
    /// [`AcceleratorBuilder::tracker`] for your own).
    pub fn log_with(mut self, trackers: Vec<LoggerType>) -> Self {
        self.log_with = trackers;
        self
    }

    /// Shards models across the processes (Accelerate's `fsdp_plugin`; default: none, or the plugin the
    /// `FSDP_*` variables describe when `ACCELERATE_USE_FSDP` is set, as `hasten launch` sets them for a
    /// config with `distributed_type: FSDP`). It takes effect when more than one process trains.
    pub fn fsdp_plugin(mut self, plugin: FullyShardedDataParallelPlugin) -> Self {
        self.fsdp = Some(plugin);
        self
    }

    /// Data-parallel dimensions (Accelerate's `parallelism_config`; default: none, or what
    /// `ACCELERATE_USE_PARALLELISM_CONFIG` and `PARALLELISM_CONFIG_*` say): with an FSDP plugin,
    /// `dp_shard_size` ranks share each replica's shards and `dp_replicate_size` replicas average their
    /// gradients (FSDP2's HSDP).
    pub fn parallelism_config(mut self, config: ParallelismConfig) -> Self {
        self.parallelism = Some(config);
        self
    }

    /// Whether the scheduler steps with the optimizer (default true).
    pub fn step_scheduler_with_optimizer(mut self, on: bool) -> Self {
        self.step_scheduler_with_optimizer = Some(on);
        self
    }

    /// Reads the environment contract, joins the process group and builds the Accelerator.
    pub fn build(self) -> Result<Accelerator> {
        // Set by `accelerate launch` for DeepSpeed configs: running on would be plain DDP, every rank
        // holding the whole model, gradients and optimizer state.
        if crate::parse_flag_from_env("ACCELERATE_USE_DEEPSPEED", false)? {
            return Err(Error::InvalidValue {
                name: "ACCELERATE_USE_DEEPSPEED".into(),
                detail: "DeepSpeed is asked for, which hasten does not run (it would train as plain DDP \
                         instead); for sharded training use FSDP (distributed_type FSDP, or \
                         AcceleratorBuilder::fsdp_plugin)"
                    .into(),
            });
        }
        let fsdp = match self.fsdp {
            Some(plugin) => Some(plugin),
            None if crate::parse_flag_from_env("ACCELERATE_USE_FSDP", false)? => {
                Some(FullyShardedDataParallelPlugin::from_env()?)
            }
            None => None,
        };
        if let Some(plugin) = &fsdp {
            plugin.check_supported()?;
        }
        let parallelism = match self.parallelism {
            Some(config) => Some(config),
            None => ParallelismConfig::from_env()?,
        };
        if let (Some(_), Some(plugin)) = (&parallelism, &fsdp)
            && plugin.fsdp_version != 2
        {
            return Err(Error::InvalidValue {
                name: "ParallelismConfig".into(),
                detail: "a ParallelismConfig is only compatible with FSDP version 2 (fsdp_version 2) or \
                         plain data parallelism; this FSDP plugin is version 1"
                    .into(),
            });
        }
        let env_mode = match std::env::var(crate::MIXED_PRECISION_VAR) {
            Ok(v) if !v.trim().is_empty() => Some(v.parse::<PrecisionType>()?),
            _ => None,
        };
        let mixed_precision = self
            .mixed_precision
            .or(env_mode)
            .unwrap_or(PrecisionType::No);
        let env_steps = match std::env::var("ACCELERATE_GRADIENT_ACCUMULATION_STEPS") {
            Ok(v) => Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| hasten_core::Error::EnvParse {
                        var: "ACCELERATE_GRADIENT_ACCUMULATION_STEPS".into(),
                        value: v,
                        expected: "a positive integer",
                    })?,
            ),
            Err(_) => None,
        };
        let accumulation = self.accumulation.unwrap_or(GradientAccumulationPlugin {
            num_steps: env_steps.unwrap_or(1).max(1),
            ..GradientAccumulationPlugin::default()
        });
        let mut state = ProcessState::from_env()?;
        if self.cpu && !state.use_cpu {
            state = ProcessState::new(state.contract, true, state.debug, 0)?;
        }
        if mixed_precision == PrecisionType::Fp8 {
            return Err(Error::DeviceUnavailable {
                detail: "fp8 mixed precision needs Transformer Engine or torchao, which libtorch alone does not have; \
                         use bf16"
                    .into(),
            });
        }
        // As in Accelerate, the plugin applies to distributed runs only.
        let fsdp = fsdp.filter(|_| state.use_distributed());
        if fsdp.is_some() {
            state.distributed_type = crate::DistributedType::Fsdp;
            if mixed_precision == PrecisionType::Fp16 {
                return Err(Error::InvalidValue {
                    name: "mixed_precision".into(),
                    detail: "fp16 with FSDP needs a loss scaler that agrees across shards, which hasten \
                             does not have yet: use bf16"
                        .into(),
                });
            }
        }
        if mixed_precision == PrecisionType::Fp16 && !state.device.is_cuda() {
            return Err(Error::DeviceUnavailable {
                detail: "fp16 mixed precision needs a GPU; on the CPU use bf16".into(),
            });
        }
        let parallelism = match parallelism {
            Some(config) => {
                let sharded = fsdp.as_ref().is_some_and(|p| p.shards());
                let (replicate, shard) = config.resolve(state.contract.world_size, sharded)?;
                if shard > 1 && !sharded {
                    return Err(Error::InvalidValue {
                        name: "ParallelismConfig dp_shard_size".into(),
                        detail: format!(
                            "dp_shard_size {shard} shards the model, which needs FSDP that shards (an \
                             FSDP plugin with FULL_SHARD, SHARD_GRAD_OP or HYBRID_SHARD, or \
                             distributed_type FSDP with fsdp_version 2)"
                        ),
                    });
                }
                state.use_distributed().then_some((replicate, shard))
            }
            None => None,
        };
        // Accelerate's InitProcessGroupKwargs timeout is the process group's: how long joining may take,
        // and how long a collective may wait for the others.
        let (rendezvous, collective) = match self.init.timeout {
            Some(t) => (t, t),
            None => (
                crate::rdzv_timeout_from_env()?,
                crate::collective_timeout_from_env()?,
            ),
        };
        let tracker_plan = trackers::plan(
            &self.log_with,
            &self.project,
            self.custom_trackers,
            state.is_main_process(),
        )?;
        let group = ProcessGroup::init_with_timeouts(&state, rendezvous, collective)?;
        let scaler = (mixed_precision == PrecisionType::Fp16)
            .then(|| Arc::new(Mutex::new(GradScaler::new(self.scaler, state.device))));
        let gradient = GradientStateHandle::new(GradientState {
            num_steps: accumulation.num_steps,
            sync_with_dataloader: accumulation.sync_with_dataloader,
            sync_each_batch: accumulation.sync_each_batch,
            adjust_scheduler: accumulation.adjust_scheduler,
            ..GradientState::default()
        });
        Ok(Accelerator {
            state,
            group: crate::Group::new(group),
            gradient,
            mixed_precision,
            dataloader: self.dataloader,
            ddp: self.ddp,
            autocast: self.autocast,
            project: self.project,
            scaler,
            skipped: Arc::new(AtomicBool::new(false)),
            models: Vec::new(),
            averaged: Vec::new(),
            optimizers: Vec::new(),
            schedulers: Vec::new(),
            overlap: reducer::overlap_from_env(),
            step: 0,
            step_scheduler_with_optimizer: self.step_scheduler_with_optimizer.unwrap_or(true),
            rng_types: self.rng_types.unwrap_or_else(|| vec![RNGType::Generator]),
            log_with: self.log_with,
            tracker_plan,
            trackers: Vec::new(),
            trigger: false,
            custom: Vec::new(),
            fsdp,
            parallelism,
            hybrid: None,
        })
    }
}
