//! The `Accelerator`: one object that makes the same training loop run on one CPU, one GPU or many.
//!
//! Split by concern: `config` (plugins and kwargs), `ddp` (parameter broadcast, gradient buckets),
//! `precision` (autocast, gradient scaler), `optimizer` (optimizer and scheduler wrappers), `utilities`
//! (gather_for_metrics, split_between_processes, triggers, saving…), `model` (the prepared model the
//! user owns); this file holds the object, its builder, `prepare` and the step logic (backward,
//! accumulate, no_sync, clipping).

mod checkpoint;
mod config;
mod ddp;
mod durable;
mod model;
mod optimizer;
mod precision;
mod reducer;
mod trackers;
mod utilities;

pub use checkpoint::ACCELERATOR_STATE_NAME;
pub use config::{
    AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs,
    GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration,
};
pub use model::PreparedModel;
pub use optimizer::{AcceleratedOptimizer, AcceleratedScheduler, Schedule};
pub use precision::{GradScaler, GradScalerKwargs, autocast};
pub use utilities::Splittable;

use crate::data::{DataLoader, DataLoaderShard, Dataset, ShardOptions};
use crate::{
    DistributedType, Error, GradientState, GradientStateHandle, LoggerType, Nested, PrecisionType,
    ProcessGroup, ProcessState, RNGType, Result,
};
use ddp::ModelEntry;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tch::{Device, Tensor};

/// What the Accelerator keeps of a prepared optimizer, for `save_state`/`load_state`.
/// A model this Accelerator prepared, as its backward sees it: the gradient bookkeeping, and whether the
/// user still holds the [`PreparedModel`] (a dropped model is no longer averaged).
struct ModelLink {
    entry: Arc<Mutex<ModelEntry>>,
    alive: Weak<()>,
}

struct OptimizerLink {
    opt: Weak<Mutex<Box<dyn crate::Optimizer>>>,
    lr: Arc<Mutex<f64>>,
}

/// Builds an [`Accelerator`]. Every setter names Accelerate's default; values not given come from the
/// environment contract (`ACCELERATE_MIXED_PRECISION`, `ACCELERATE_USE_CPU`,
/// `ACCELERATE_GRADIENT_ACCUMULATION_STEPS`), as in Accelerate.
#[derive(Debug, Default)]
pub struct AcceleratorBuilder {
    mixed_precision: Option<PrecisionType>,
    accumulation: Option<GradientAccumulationPlugin>,
    cpu: bool,
    dataloader: DataLoaderConfiguration,
    ddp: DistributedDataParallelKwargs,
    scaler: GradScalerKwargs,
    init: InitProcessGroupKwargs,
    autocast: AutocastKwargs,
    project: ProjectConfiguration,
    rng_types: Option<Vec<RNGType>>,
    log_with: Vec<LoggerType>,
    custom_trackers: Vec<crate::tracking::CustomTracker>,
    step_scheduler_with_optimizer: Option<bool>,
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

    /// Whether the scheduler steps with the optimizer (default true).
    pub fn step_scheduler_with_optimizer(mut self, on: bool) -> Self {
        self.step_scheduler_with_optimizer = Some(on);
        self
    }

    /// Reads the environment contract, joins the process group and builds the Accelerator.
    pub fn build(self) -> Result<Accelerator> {
        // Set by `accelerate launch` for DeepSpeed and FSDP configs: running on would be plain DDP,
        // every rank holding the whole model, gradients and optimizer state.
        for (var, what) in [
            ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
            ("ACCELERATE_USE_FSDP", "FSDP"),
        ] {
            if crate::parse_flag_from_env(var, false)? {
                return Err(Error::InvalidValue {
                    name: var.into(),
                    detail: format!(
                        "{what} is asked for, which hasten does not run (it would train as plain DDP \
                         instead); launch with distributed_type MULTI_GPU (DDP), or use Python Accelerate \
                         for a model that does not fit on one GPU"
                    ),
                });
            }
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
            Ok(v) => Some(v.trim().parse::<usize>().map_err(|_| Error::EnvParse {
                var: "ACCELERATE_GRADIENT_ACCUMULATION_STEPS".into(),
                value: v,
                expected: "a positive integer",
            })?),
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
        if mixed_precision == PrecisionType::Fp16 && !state.device.is_cuda() {
            return Err(Error::DeviceUnavailable {
                detail: "fp16 mixed precision needs a GPU; on the CPU use bf16".into(),
            });
        }
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
        })
    }
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
        if vs.device() != self.state.device {
            vs.set_device(self.state.device);
        }
        ddp::broadcast_variables(&mut self.group.lock(), &vs, self.ddp.broadcast_buffers)?;
        let cap = (self.ddp.bucket_cap_mb * 1024.0 * 1024.0) as usize;
        let mut entry = ModelEntry::new(&vs, cap.max(1));
        entry.hook(&self.group.lock());
        let entry = Arc::new(Mutex::new(entry));
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

    /// Backpropagates `loss`: divided by the accumulation steps, scaled under fp16, and followed, on
    /// synchronising steps, by averaging every prepared model's gradients across ranks.
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let state = self.gradient.get();
        let torch = |e| Error::torch("backward", e);
        let mut loss = loss.shallow_clone();
        if state.num_steps > 1 {
            loss = loss.f_div_scalar(state.num_steps as f64).map_err(torch)?;
        }
        if let Some(scaler) = &self.scaler {
            loss = scaler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .scale_loss(&loss)?;
        }
        let sync = state.sync_gradients || (state.sync_each_batch && self.state.use_distributed());
        if !sync {
            return loss.f_backward().map_err(torch);
        }
        self.averaged.retain(|m| m.alive.strong_count() > 0);
        let mut guards: Vec<std::sync::MutexGuard<'_, ModelEntry>> = self
            .averaged
            .iter()
            .map(|m| m.entry.lock().unwrap_or_else(|e| e.into_inner()))
            .filter(|m| !m.no_sync)
            .collect();
        let mut entries: Vec<&mut ModelEntry> = guards.iter_mut().map(|g| &mut **g).collect();
        ddp::backward_with_averaging(
            &mut self.group.lock(),
            &mut entries,
            self.ddp.find_unused_parameters,
            self.overlap,
            || loss.f_backward().map_err(torch),
        )
    }

    /// Accelerate's `accumulate`, called at the start of each micro-batch: counts it and decides whether
    /// it synchronises (every `gradient_accumulation_steps`, and at the end of the data loader), which
    /// it returns (also [`sync_gradients`](Self::sync_gradients)). Gradients are averaged, and the
    /// prepared optimizers and schedulers step, only on synchronising micro-batches.
    pub fn accumulate(&mut self) -> bool {
        let mut g = self.gradient.lock();
        if g.sync_with_dataloader && g.at_end_of_dataloader() {
            self.step = 0;
            g.sync_gradients = true;
        } else {
            self.step += 1;
            g.sync_gradients = self.step % g.num_steps.max(1) == 0;
        }
        g.sync_gradients
    }

    /// Runs `body` without averaging `model`'s gradients in its backward passes (DDP's `no_sync`). The
    /// model synchronises as before once `body` returns or panics (a notebook cell that panicked
    /// leaves the model as it was).
    pub fn no_sync<M, R>(
        &mut self,
        model: &PreparedModel<M>,
        body: impl FnOnce(&mut Self) -> R,
    ) -> R {
        /// Puts the previous flag back when dropped, on return and on unwinding alike.
        struct Restore<'a>(&'a Mutex<ModelEntry>, bool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).no_sync = self.1;
            }
        }
        let previous = std::mem::replace(&mut model.entry().no_sync, true);
        let _restore = Restore(&model.entry, previous);
        body(self)
    }

    /// An error unless this Accelerator prepared `model` (and the user still holds it).
    fn check_prepared<M>(&self, op: &'static str, model: &PreparedModel<M>) -> Result<()> {
        if self
            .averaged
            .iter()
            .any(|m| Arc::ptr_eq(&m.entry, &model.entry))
        {
            return Ok(());
        }
        Err(Error::UnknownModel {
            op,
            variables: model.entry().named.len(),
        })
    }

    /// Divides fp16 gradients by the loss scale now (before clipping or inspecting them).
    pub fn unscale_gradients<M>(&mut self, model: &PreparedModel<M>) -> Result<()> {
        self.check_prepared("unscale_gradients", model)?;
        if let Some(scaler) = &self.scaler {
            let params: Vec<Tensor> = model
                .entry()
                .params
                .iter()
                .map(Tensor::shallow_clone)
                .collect();
            scaler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unscale(&params)?;
        }
        Ok(())
    }

    /// Clips the gradients' total `norm_type` norm to `max_norm` (unscaling first) and returns the total
    /// norm before clipping, as `torch.nn.utils.clip_grad_norm_`.
    pub fn clip_grad_norm_<M>(
        &mut self,
        model: &PreparedModel<M>,
        max_norm: f64,
        norm_type: f64,
    ) -> Result<f64> {
        self.unscale_gradients(model)?;
        let torch = |e| Error::torch("clip_grad_norm_", e);
        let grads: Vec<Tensor> = model
            .entry()
            .params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        tch::no_grad(|| {
            let norms: Vec<Tensor> = grads
                .iter()
                .map(|g| {
                    g.f_reshape([-1])
                        .and_then(|flat| {
                            flat.f_norm_scalaropt_dim(norm_type, [0i64].as_slice(), false)
                        })
                        .and_then(|n| n.f_to_kind(tch::Kind::Float))
                })
                .map(|r| r.map_err(torch))
                .collect::<Result<_>>()?;
            let total = if norm_type.is_infinite() {
                Tensor::f_stack(&norms, 0)
                    .and_then(|s| s.f_max())
                    .map_err(torch)?
            } else {
                Tensor::f_stack(&norms, 0)
                    .and_then(|s| s.f_norm_scalaropt_dim(norm_type, [0i64].as_slice(), false))
                    .map_err(torch)?
            };
            let total_norm = total.double_value(&[]);
            let coef = max_norm / (total_norm + 1e-6);
            if coef < 1.0 {
                for g in &grads {
                    g.shallow_clone()
                        .f_mul_scalar_(coef)
                        .map(drop)
                        .map_err(torch)?;
                }
            }
            Ok(total_norm)
        })
    }

    /// Clamps every gradient element to `[-clip_value, clip_value]` (unscaling first).
    pub fn clip_grad_value_<M>(&mut self, model: &PreparedModel<M>, clip_value: f64) -> Result<()> {
        self.unscale_gradients(model)?;
        tch::no_grad(|| {
            for p in &model.entry().params {
                let g = p.grad();
                if g.defined() {
                    g.shallow_clone()
                        .f_clamp_(-clip_value, clip_value)
                        .map(drop)
                        .map_err(|e| Error::torch("clip_grad_value_", e))?;
                }
            }
            Ok(())
        })
    }

    /// A prepared model's variables by name (Accelerate's `unwrap_model(model).state_dict()`): the same
    /// tensors the VarStore holds, free of any wrapper. See also [`PreparedModel::into_inner`].
    pub fn unwrap_model<M>(&self, model: &PreparedModel<M>) -> Vec<(String, Tensor)> {
        model.state_dict()
    }

    /// Accelerate's `free_memory`: forgets the prepared models, optimizers and schedulers (`save_state`
    /// no longer writes them) and resets the accumulation counter. As in PyTorch, where the user's
    /// DDP-wrapped module keeps averaging, a [`PreparedModel`] still held is still averaged in the
    /// backward; dropping it ends that.
    pub fn free_memory(&mut self) {
        self.models.clear();
        self.optimizers.clear();
        self.schedulers.clear();
        self.step = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_autocasts_and_returns_fp32_outputs() {
        let mut acc = Accelerator::builder()
            .cpu(true)
            .mixed_precision(PrecisionType::Bf16)
            .build()
            .unwrap();
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let w = vs.root().ones("w", &[4, 4]);
        let model = acc.prepare_model(w, vs).unwrap();
        let x = Tensor::ones([2, 4], (tch::Kind::Float, Device::Cpu));
        // The matmul runs in bf16 under autocast; the caller gets fp32 back, the int tensor untouched.
        let inner = acc.autocast(|| x.matmul(model.module())).unwrap();
        assert_eq!(inner.kind(), tch::Kind::BFloat16);
        let (y, ids) = model
            .call(|w| (x.matmul(w), Tensor::from_slice(&[1i64, 2])))
            .unwrap();
        assert_eq!((y.kind(), ids.kind()), (tch::Kind::Float, tch::Kind::Int64));
        assert_eq!(y.double_value(&[0, 0]), 4.0);
        // The plain module is the model as built: no autocast.
        assert_eq!(x.matmul(model.module()).kind(), tch::Kind::Float);
    }

    #[test]
    fn a_prepared_model_is_owned_and_outlives_free_memory() {
        let mut acc = Accelerator::builder().cpu(true).build().unwrap();
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let net = tch::nn::linear(vs.root() / "fc", 3, 2, Default::default());
        let model = acc.prepare_model(net, vs).unwrap();
        let names: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["fc.bias", "fc.weight"]);
        // The optimizer's learning rate is the one it was built with: given once.
        let opt = acc.prepare_optimizer(crate::optim::Sgd::new(model.var_store(), 0.25));
        assert_eq!(opt.lr(), 0.25);
        // no_sync marks the model for the body only, and a panicking body puts the flag back too.
        acc.no_sync(&model, |_| assert!(model.entry().no_sync));
        assert!(!model.entry().no_sync);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            acc.no_sync(&model, |_| panic!("in the body"))
        }));
        assert!(panicked.is_err());
        assert!(!model.entry().no_sync);
        // accumulate returns whether this micro-batch synchronises.
        assert!(acc.accumulate());
        acc.free_memory();
        let x = Tensor::ones([4, 3], (tch::Kind::Float, Device::Cpu));
        assert_eq!(model.forward(&x).unwrap().size(), [4, 2]);
        let (_, vs) = model.into_inner();
        assert_eq!(vs.trainable_variables().len(), 2);
    }

    #[test]
    fn models_from_elsewhere_are_refused_and_dropped_ones_are_no_longer_averaged() {
        let build = || {
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let net = tch::nn::linear(vs.root() / "fc", 3, 2, Default::default());
            (net, vs)
        };
        let mut acc = Accelerator::builder().cpu(true).build().unwrap();
        let mut other = Accelerator::builder().cpu(true).build().unwrap();
        let (net, vs) = build();
        let theirs = other.prepare_model(net, vs).unwrap();
        let err = acc.clip_grad_norm_(&theirs, 1.0, 2.0).unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnknownModel {
                    op: "unscale_gradients",
                    variables: 2
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("prepared by another Accelerator"),
            "{err}"
        );
        let (net, vs) = build();
        let mine = acc.prepare_model(net, vs).unwrap();
        let x = Tensor::ones([4, 3], (tch::Kind::Float, Device::Cpu));
        acc.backward(&mine.forward(&x).unwrap().sum(tch::Kind::Float))
            .unwrap();
        assert_eq!(acc.averaged.len(), 1);
        drop(mine);
        let (net, vs) = build();
        let next = acc.prepare_model(net, vs).unwrap();
        acc.backward(&next.forward(&x).unwrap().sum(tch::Kind::Float))
            .unwrap();
        assert_eq!(acc.averaged.len(), 1, "the dropped model is still averaged");
    }

    #[test]
    fn outputs_are_fp32_even_with_autocast_disabled_and_loaders_end_inside_them() {
        let mut acc = Accelerator::builder()
            .cpu(true)
            .mixed_precision(PrecisionType::Bf16)
            .autocast_kwargs(AutocastKwargs { enabled: false })
            .build()
            .unwrap();
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let w = vs.root().ones("w", &[2, 2]).to_kind(tch::Kind::BFloat16);
        let model = acc.prepare_model(w, vs).unwrap();
        let x = Tensor::ones([1, 2], (tch::Kind::BFloat16, Device::Cpu));
        // No autocast: the matmul runs in the inputs' bf16; the output comes back as fp32.
        assert_eq!(
            model.call(|w| x.matmul(w)).unwrap().kind(),
            tch::Kind::Float
        );
        // A loader that has finished no longer counts as "at its end": accumulation goes on.
        let mut g = acc.gradient.lock();
        g.num_steps = 2;
        g.end_of_dataloader = true;
        g.in_dataloader = false;
        drop(g);
        assert!(!acc.accumulate(), "a finished loader forced a sync");
        acc.gradient.lock().in_dataloader = true;
        assert!(acc.accumulate(), "the last batch of a loader did not sync");
    }

    #[test]
    fn deepspeed_or_fsdp_from_accelerate_launch_is_refused() {
        for var in ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"] {
            crate::utils::patch_environment([(var, "true")], || {
                let Err(err) = Accelerator::builder().cpu(true).build() else {
                    panic!("{var}=true built an Accelerator");
                };
                assert!(
                    matches!(&err, Error::InvalidValue { name, .. } if name == var),
                    "{err}"
                );
                assert!(err.to_string().contains("plain DDP"), "{err}");
            });
        }
        crate::utils::patch_environment([("ACCELERATE_USE_FSDP", "false")], || {
            Accelerator::builder().cpu(true).build().unwrap();
        });
    }
}
