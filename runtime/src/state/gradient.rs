//! Gradient state (Accelerate's `GradientState`): whether this step synchronises gradients, and where the
//! active data loader is. Shared by the `Accelerator`, its prepared data loaders and optimizers through a
//! [`GradientStateHandle`] instead of a process-wide singleton.

use std::sync::{Arc, Mutex, MutexGuard};

/// What the training loop's pieces need to agree on at each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradientState {
    /// True when this step's backward synchronises gradients and the optimizer steps.
    pub sync_gradients: bool,
    /// True while the last batch of the active data loader is being processed.
    pub end_of_dataloader: bool,
    /// Samples of the active loader's last global batch that are real (the rest repeat the start), or
    /// -1 when unknown; 0 when the dataset divides evenly.
    pub remainder: i64,
    /// True while a prepared data loader is being iterated.
    pub in_dataloader: bool,
    /// Gradient accumulation steps.
    pub num_steps: usize,
    /// Force a sync at the end of each data loader (GradientAccumulationPlugin.sync_with_dataloader).
    pub sync_with_dataloader: bool,
    /// Sync every batch even while accumulating (sync_each_batch).
    pub sync_each_batch: bool,
    /// Step the scheduler as if gradients were synchronised every batch (adjust_scheduler).
    pub adjust_scheduler: bool,
}

impl GradientState {
    /// True on the last batch of a data loader being iterated (Accelerate's `end_of_dataloader`
    /// property): outside a loader it is false, whatever the last loader left.
    pub fn at_end_of_dataloader(&self) -> bool {
        self.in_dataloader && self.end_of_dataloader
    }

    /// The real samples of the active loader's last global batch (Accelerate's `remainder`
    /// property): -1 outside a loader.
    pub fn active_remainder(&self) -> i64 {
        if self.in_dataloader {
            self.remainder
        } else {
            -1
        }
    }
}

impl Default for GradientState {
    fn default() -> Self {
        GradientState {
            sync_gradients: true,
            end_of_dataloader: false,
            remainder: -1,
            in_dataloader: false,
            num_steps: 1,
            sync_with_dataloader: true,
            sync_each_batch: false,
            adjust_scheduler: true,
        }
    }
}

/// A shared handle on one [`GradientState`].
#[derive(Debug, Clone, Default)]
pub struct GradientStateHandle(Arc<Mutex<GradientState>>);

impl GradientStateHandle {
    /// A handle on a fresh state.
    pub fn new(state: GradientState) -> Self {
        GradientStateHandle(Arc::new(Mutex::new(state)))
    }

    /// Locks the state for reading or writing.
    pub fn lock(&self) -> MutexGuard<'_, GradientState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the state now.
    pub fn get(&self) -> GradientState {
        self.lock().clone()
    }
}
