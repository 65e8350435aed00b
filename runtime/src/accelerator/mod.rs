//! The `Accelerator`: one object that makes the same training loop run on one CPU, one GPU or many.
//!
//! Split by concern: `builder` (settings and `build`), `config` (plugins and kwargs), `model` (the
//! prepared model the user owns), `step` (backward, accumulate, no_sync, clipping, free_memory), `ddp`
//! and `reducer` (parameter broadcast, gradient buckets averaged during the backward), `precision`
//! (autocast, gradient scaler), `optimizer` (optimizer and scheduler wrappers), `collectives`
//! (gather_for_metrics, reduce, padding), `utilities` (printing, process ordering,
//! split_between_processes, triggers, saving), `checkpoint` and `durable` (save_state/load_state),
//! `trackers`; this file holds the object, its properties and `prepare`.

mod builder;
mod checkpoint;
mod collectives;
mod config;
mod ddp;
mod durable;
pub mod fsdp;
mod model;
mod optimizer;
mod precision;
mod reducer;
mod save_model;
mod step;
mod trackers;
mod utilities;

pub use builder::AcceleratorBuilder;
pub use checkpoint::{ACCELERATOR_STATE_NAME, Checkpointable};
pub use config::{
    AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs,
    GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration,
};
pub use fsdp::{FullyShardedDataParallelPlugin, ParallelismConfig};
pub use model::PreparedModel;
pub use optimizer::{AcceleratedOptimizer, AcceleratedScheduler, Schedule};
pub use precision::{GradScaler, GradScalerKwargs, autocast};
pub use utilities::Splittable;

use crate::data::{DataLoader, DataLoaderShard, Dataset, ShardOptions};
use crate::{
    DistributedType, Error, GradientStateHandle, LoggerType, Nested, PrecisionType, ProcessState,
    RNGType, Result,
};
use ddp::ModelEntry;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tch::Device;

/// A model this Accelerator prepared, as its backward sees it: the gradient bookkeeping, and whether the
/// user still holds the [`PreparedModel`] (a dropped model is no longer averaged).
struct ModelLink {
    entry: Arc<Mutex<ModelEntry>>,
    alive: Weak<()>,
}

/// What the Accelerator keeps of a prepared optimizer, for `save_state`/`load_state`.
struct OptimizerLink {
    opt: Weak<Mutex<Box<dyn crate::Optimizer>>>,
    lr: Arc<Mutex<f64>>,
}

/// Accelerate's `Accelerator`: prepares models, optimizers, schedulers and data loaders for the job this
/// process belongs to, and runs the step logic (backward, accumulation, mixed precision, clipping).
pub struct Accelerator {
    state: ProcessState,
    group: crate::Group,
    gradient: GradientStateHandle,
    mixed_precision: PrecisionType,
    dataloader: DataLoaderConfiguration,
    ddp: DistributedDataParallelKwargs,
    autocast: AutocastKwargs,
    project: ProjectConfiguration,
    scaler: Option<Arc<Mutex<GradScaler>>>,
    skipped: Arc<AtomicBool>,
    /// The prepared models `save_state` writes, in order (Accelerate's `_models`; `free_memory` clears it).
    models: Vec<Arc<Mutex<ModelEntry>>>,
    /// Every model this Accelerator prepared that the user still holds: the backward averages their
    /// gradients (after `free_memory` too, as a DDP-wrapped module keeps doing in PyTorch).
    averaged: Vec<ModelLink>,
    optimizers: Vec<OptimizerLink>,
    /// Each prepared scheduler's step count and learning-rate cell.
    schedulers: Vec<(Arc<AtomicUsize>, Arc<Mutex<f64>>)>,
    /// Average gradients during the backward (hooks), not after it; `HASTEN_DDP_OVERLAP=0` turns it off.
    overlap: bool,
    step: usize,
    step_scheduler_with_optimizer: bool,
    rng_types: Vec<RNGType>,
    log_with: Vec<LoggerType>,
    /// Trackers to create in `init_trackers`.
    tracker_plan: trackers::TrackerPlan,
    /// Trackers started by `init_trackers`.
    trackers: Vec<Box<dyn crate::GeneralTracker>>,
    trigger: bool,
    /// Objects registered for checkpointing, in order.
    custom: Vec<Arc<Mutex<dyn Checkpointable>>>,
    /// Sharded data parallelism, when on and more than one process trains.
    fsdp: Option<FullyShardedDataParallelPlugin>,
    /// A ParallelismConfig's data-parallel sizes for this job: (replicas, ranks per replica).
    parallelism: Option<(usize, usize)>,
    /// The split into shard groups and replicas (HYBRID_SHARD, HSDP), made by the first model
    /// prepared under it.
    hybrid: Option<Arc<Mutex<fsdp::Hybrid>>>,
}

impl Accelerator {
    /// An Accelerator with every setting from the environment (Accelerate's `Accelerator()`).
    pub fn new() -> Result<Self> {
        Self::builder().build()
    }

    /// A builder for the settings.
    pub fn builder() -> AcceleratorBuilder {
        AcceleratorBuilder::default()
    }

    /// The device this process computes on.
    pub fn device(&self) -> Device {
        self.state.device
    }

    /// NO, MULTI_CPU or MULTI_GPU.
    pub fn distributed_type(&self) -> DistributedType {
        self.state.distributed_type
    }

    /// Number of processes.
    pub fn num_processes(&self) -> usize {
        self.state.num_processes()
    }

    /// This process's global rank.
    pub fn process_index(&self) -> usize {
        self.state.process_index()
    }

    /// This process's rank on its node.
    pub fn local_process_index(&self) -> usize {
        self.state.local_process_index()
    }

    /// True on global rank 0.
    pub fn is_main_process(&self) -> bool {
        self.state.is_main_process()
    }

    /// True on rank 0 of this node.
    pub fn is_local_main_process(&self) -> bool {
        self.state.is_local_main_process()
    }

    /// True on the last rank.
    pub fn is_last_process(&self) -> bool {
        self.state.is_last_process()
    }

    /// True when this step synchronises gradients (and the optimizer steps).
    pub fn sync_gradients(&self) -> bool {
        self.gradient.get().sync_gradients
    }

    /// Forces (or suppresses) gradient synchronisation for the next backward.
    pub fn set_sync_gradients(&mut self, on: bool) {
        self.gradient.lock().sync_gradients = on;
    }

    /// The mixed-precision mode.
    pub fn mixed_precision(&self) -> PrecisionType {
        self.mixed_precision
    }

    /// Micro-batches per optimizer step.
    pub fn gradient_accumulation_steps(&self) -> usize {
        self.gradient.get().num_steps
    }

    /// Changes the accumulation steps.
    pub fn set_gradient_accumulation_steps(&mut self, n: usize) {
        self.gradient.lock().num_steps = n.max(1);
    }

    /// True when the last optimizer step was skipped (fp16 overflow).
    pub fn optimizer_step_was_skipped(&self) -> bool {
        self.skipped.load(Ordering::SeqCst)
    }

    /// The process state.
    pub fn state(&self) -> &ProcessState {
        &self.state
    }

    /// The process group, for collectives not wrapped here. It is shared with the data loaders this
    /// Accelerator prepared, and each of its methods locks it for that one operation, so it can be
    /// kept (or cloned) across a loader's steps.
    pub fn group(&self) -> &crate::Group {
        &self.group
    }

    /// The shared gradient state.
    pub fn gradient_state(&self) -> GradientStateHandle {
        self.gradient.clone()
    }

    /// The generators synchronised at each epoch.
    pub fn rng_types(&self) -> &[RNGType] {
        &self.rng_types
    }

    /// The trackers asked for.
    pub fn log_with(&self) -> &[LoggerType] {
        &self.log_with
    }

    /// The project settings.
    pub fn project_config(&self) -> &ProjectConfiguration {
        &self.project
    }

    /// How data loaders prepared from now on are sharded and dispatched (Accelerate's
    /// `accelerator.dataloader_config`).
    pub fn dataloader_config(&self) -> &DataLoaderConfiguration {
        &self.dataloader
    }

    /// Changes the data loader settings for loaders prepared from now on, as assigning to
    /// `accelerator.dataloader_config` does in Accelerate; loaders already prepared keep theirs.
    pub fn set_dataloader_config(&mut self, config: DataLoaderConfiguration) {
        self.dataloader = config;
    }

    /// Prepares a model (Accelerate's `prepare(model)`): `module` built over `vs`, which moves to this
    /// process's device; every rank starts from rank 0's variables, and their gradients are averaged in
    /// the backward. The returned model owns both and runs its forward under this Accelerator's mixed
    /// precision with fp32 outputs ([`PreparedModel::forward`]).
    pub fn prepare_model<M>(
        &mut self,
        module: M,
        mut vs: tch::nn::VarStore,
    ) -> Result<PreparedModel<M>> {
        // A model built under init_empty_weights moves as placeholders; it is materialised on the
        // device below: whole here, or each rank its shard (FSDP).
        crate::layers::move_placeholders(&vs, self.state.device)?;
        if vs.device() != self.state.device {
            vs.set_device(self.state.device);
        }
        let sharded = self.fsdp.as_ref().filter(|p| p.shards());
        if sharded.is_none() {
            crate::layers::materialize_all(&vs)?;
        }
        // FSDP starts every rank from the main process's weights, buffers included (Accelerate's
        // sync_module_states / cpu_ram_efficient_loading broadcast them).
        let buffers = self.ddp.broadcast_buffers || sharded.is_some();
        if sharded.is_some() {
            let has = vs
                .trainable_variables()
                .iter()
                .any(|t| crate::layers::recipe_of(t).is_some());
            fsdp::agree_on_empty_weights(&mut self.group.lock(), has)?;
        } else if let Some(plugin) = self.fsdp.as_ref()
            && (plugin.cpu_offload || plugin.activation_checkpointing)
            && self.state.use_distributed()
        {
            crate::log::event!(
                warn,
                target: "hasten::fsdp",
                "hasten: warning: NO_SHARD runs as DDP: cpu_offload and activation_checkpointing are \
                 ignored"
            );
        }
        ddp::broadcast_variables(&mut self.group.lock(), &vs, buffers)?;
        let cap = (self.ddp.bucket_cap_mb * 1024.0 * 1024.0) as usize;
        let mut entry = ModelEntry::new(&vs, cap.max(1));
        match sharded {
            Some(plugin) => {
                let named: Vec<(String, tch::Tensor)> = entry
                    .names
                    .iter()
                    .cloned()
                    .zip(entry.params.iter().map(tch::Tensor::shallow_clone))
                    .collect();
                let mesh = match plugin.shard_group_size(&self.state, self.parallelism) {
                    None => fsdp::Mesh::flat(self.group.clone()),
                    Some(per_group) => {
                        let hybrid = match &self.hybrid {
                            Some(h) => h.clone(),
                            None => fsdp::Hybrid::split(&self.group, per_group)?,
                        };
                        self.hybrid = Some(hybrid.clone());
                        fsdp::Mesh::hybrid(self.group.clone(), hybrid)
                    }
                };
                entry.fsdp = Some(fsdp::ShardedModel::new(
                    plugin.units(named)?,
                    &entry.names,
                    mesh,
                    plugin.reshard_after_forward(),
                    &fsdp::block_paths(),
                    // Accelerate's FSDP2 policy under bf16: parameters gathered, gradients reduced
                    // and blocks run in bf16 (ShardedModel::cast_forward); what no block holds runs
                    // under autocast. Not with autocast switched off: fp32 inputs would meet bf16
                    // weights there.
                    (self.mixed_precision == PrecisionType::Bf16 && self.autocast.enabled)
                        .then_some(tch::Kind::BFloat16),
                    plugin.cpu_offload,
                )?);
                let aliases = entry.aliases.clone();
                if let Some(sharded) = entry.fsdp.as_mut() {
                    sharded.activation_checkpointing = plugin.activation_checkpointing;
                    sharded.aliases = aliases;
                    if plugin.activation_checkpointing {
                        sharded.check_activation_checkpointing()?;
                    }
                }
            }
            None => entry.hook(&self.group.lock()),
        }
        let entry = Arc::new(Mutex::new(entry));
        if entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fsdp
            .is_some()
        {
            fsdp::register_model(&entry);
        }
        let alive = Arc::new(());
        self.models.push(entry.clone());
        self.averaged.push(ModelLink {
            entry: entry.clone(),
            alive: Arc::downgrade(&alive),
        });
        let precision = model::ForwardPrecision {
            device: self.state.device,
            mixed_precision: self.mixed_precision,
            enabled: self.autocast.enabled,
        };
        Ok(PreparedModel::new(module, vs, entry, alive, precision))
    }

    /// Wraps an optimizer (hasten's fused [`crate::optim::AdamW`] or [`crate::optim::Sgd`], a tch optimizer through
    /// [`crate::optim::TchOptimizer`], or any [`crate::Optimizer`]) built over a prepared model's variables. Its
    /// learning rate is the one it was built with.
    pub fn prepare_optimizer(
        &mut self,
        opt: impl crate::Optimizer + 'static,
    ) -> AcceleratedOptimizer {
        let params = opt.params();
        let lr = opt.lr();
        let prepared = AcceleratedOptimizer::new(
            Box::new(opt),
            params,
            lr,
            self.gradient.clone(),
            self.scaler.clone(),
            self.skipped.clone(),
        );
        self.optimizers.push(OptimizerLink {
            opt: Arc::downgrade(&prepared.shared()),
            lr: prepared.lr_cell(),
        });
        prepared
    }

    /// A scheduler following `optimizer` through `schedule`.
    pub fn prepare_scheduler(
        &mut self,
        schedule: Schedule,
        optimizer: &AcceleratedOptimizer,
    ) -> AcceleratedScheduler {
        let steps = if self.dataloader.split_batches {
            1
        } else {
            self.num_processes()
        };
        let scheduler = AcceleratedScheduler::new(
            schedule,
            optimizer,
            self.gradient.clone(),
            steps,
            self.step_scheduler_with_optimizer,
        );
        self.schedulers.push(scheduler.link());
        scheduler
    }

    /// The loader options for this rank, checked as Accelerate's `prepare_data_loader` checks them.
    fn shard_options(&self, batch_size: usize) -> Result<ShardOptions> {
        let p = self.num_processes();
        if self.dataloader.split_batches && batch_size > 1 && batch_size % p != 0 {
            return Err(Error::SplitBatches {
                what: "a `DataLoader`",
                batch_size: Some(batch_size),
                num_processes: p,
            });
        }
        Ok(ShardOptions {
            num_processes: self.num_processes(),
            process_index: self.process_index(),
            split_batches: self.dataloader.split_batches,
            even_batches: self.dataloader.even_batches,
            device: self.state.device,
            non_blocking: self.dataloader.non_blocking,
        })
    }

    /// Prepares a data loader: this rank's shard of every epoch, on this rank's device. A shuffled
    /// loader draws the same order on every rank (its seed plus the epoch; `DataLoaderConfiguration::data_seed`
    /// replaces the seed), which is what Accelerate's seedable sampler and RNG synchronisation ensure. With
    /// `dispatch_batches: Some(true)`, process 0 reads every batch and sends each process its part. With
    /// one process the loader's batches are taken as they are. As in Accelerate, split_batches with a
    /// batch size that is not a multiple of the number of processes is an error here.
    pub fn prepare_data_loader<D: Dataset + 'static, B: Nested + Send + 'static>(
        &mut self,
        mut loader: DataLoader<D, B>,
    ) -> Result<DataLoaderShard<D, B>> {
        if let Some(seed) = self.dataloader.data_seed {
            loader.reseed(seed);
        }
        let options = self.shard_options(loader.batch_size())?;
        let dispatch = self.dataloader.dispatch_batches == Some(true);
        Ok(DataLoaderShard::new(loader, options, self.gradient.clone())
            .coordinated(self.coordination(dispatch)))
    }

    /// Prepares a loader over an iterable dataset. By default (as in Accelerate) process 0 reads the
    /// stream and dispatches batches: each step it takes `P` batches, and every process gets its part
    /// (`DataLoaderDispatcher`). With `dispatch_batches: Some(false)` every rank reads the stream and keeps
    /// its slice of each window of `batch_size × P` samples (`IterableDatasetShard`).
    pub fn prepare_iterable_data_loader<
        D: crate::IterableDataset + 'static,
        B: Nested + Send + 'static,
    >(
        &mut self,
        loader: crate::IterableDataLoader<D, B>,
    ) -> Result<crate::IterableDataLoaderShard<D, B>> {
        let options = self.shard_options(loader.batch_size())?;
        let dispatch = self.dataloader.dispatch_batches != Some(false);
        Ok(
            crate::IterableDataLoaderShard::new(loader, options, self.gradient.clone())
                .coordinated(self.coordination(dispatch)),
        )
    }

    /// How a loader prepared now works with the other processes: dispatching from process 0 (when asked
    /// and there are others), else synchronising the `rng_types` that need it at each epoch (`generator`
    /// alone needs nothing, as hasten's samplers are seeded alike everywhere).
    fn coordination(&self, dispatch: bool) -> crate::data::Coordination {
        use crate::data::Coordination;
        if self.num_processes() == 1 {
            return Coordination::Alone;
        }
        if dispatch {
            return Coordination::Dispatch(self.group.clone());
        }
        let types: Vec<RNGType> = self
            .rng_types
            .iter()
            .copied()
            .filter(|t| matches!(t, RNGType::Torch | RNGType::Cuda))
            .collect();
        if types.is_empty() {
            Coordination::Alone
        } else {
            Coordination::SyncRng(self.group.clone(), types)
        }
    }

    /// Runs `f` under this Accelerator's mixed precision (fp16/bf16 autocast), as `accelerator.autocast()`.
    pub fn autocast<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        if !self.autocast.enabled {
            return Ok(f());
        }
        autocast(self.state.device, self.mixed_precision, f)
    }
}

#[cfg(test)]
mod tests;
