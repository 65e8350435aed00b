//! The optimizer and scheduler wrappers (Accelerate's `AcceleratedOptimizer` and
//! `AcceleratedScheduler`), and the learning-rate schedules tch lacks.

use super::precision::GradScaler;
use crate::optim::Optimizer;
use crate::{GradientStateHandle, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// The optimizer, shared with the Accelerator that prepared it (for `save_state`/`load_state`).
pub(crate) type SharedOptimizer = Arc<Mutex<Box<dyn Optimizer>>>;

/// An optimizer whose `step` and `zero_grad` act only on steps that synchronise gradients, and which
/// unscales fp16 gradients and skips steps that overflowed.
pub struct AcceleratedOptimizer {
    opt: SharedOptimizer,
    params: Vec<Tensor>,
    gradient: GradientStateHandle,
    scaler: Option<Arc<Mutex<GradScaler>>>,
    skipped: Arc<AtomicBool>,
    lr: Arc<Mutex<f64>>,
    applied_lr: f64,
}

impl AcceleratedOptimizer {
    pub(crate) fn new(
        mut opt: Box<dyn Optimizer>,
        params: Vec<Tensor>,
        lr: f64,
        gradient: GradientStateHandle,
        scaler: Option<Arc<Mutex<GradScaler>>>,
        skipped: Arc<AtomicBool>,
    ) -> Self {
        opt.set_lr(lr);
        AcceleratedOptimizer {
            opt: Arc::new(Mutex::new(opt)),
            params,
            gradient,
            scaler,
            skipped,
            lr: Arc::new(Mutex::new(lr)),
            applied_lr: lr,
        }
    }

    /// Updates the parameters, unless this is an accumulation step or the fp16 gradients overflowed
    /// (then [`step_was_skipped`](Self::step_was_skipped) is true and the scale backs off).
    pub fn step(&mut self) -> Result<()> {
        if !self.gradient.get().sync_gradients {
            return Ok(());
        }
        let lr = *self.lr.lock().unwrap_or_else(|e| e.into_inner());
        crate::accelerator::fsdp::before_optimizer_step()?;
        let mut opt = self.opt.lock().unwrap_or_else(|e| e.into_inner());
        if lr != self.applied_lr {
            opt.set_lr(lr);
            self.applied_lr = lr;
        }
        match &self.scaler {
            None => {
                opt.step()?;
                self.skipped.store(false, Ordering::SeqCst);
            }
            Some(scaler) => {
                let mut s = scaler.lock().unwrap_or_else(|e| e.into_inner());
                s.unscale(&self.params)?;
                let overflow = s.found_inf();
                if !overflow {
                    opt.step()?;
                }
                s.update()?;
                self.skipped.store(overflow, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Drops the gradients (set_to_none, PyTorch's default), unless this is an accumulation step.
    pub fn zero_grad(&mut self) {
        if self.gradient.get().sync_gradients {
            self.opt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .zero_grad();
            // Under FSDP a forward may have set gradients aside while gathering; they go too.
            super::fsdp::forget_stashed_gradients();
        }
    }

    /// True when the last step was skipped because fp16 gradients overflowed.
    pub fn step_was_skipped(&self) -> bool {
        self.skipped.load(Ordering::SeqCst)
    }

    /// The learning rate the next step uses.
    pub fn lr(&self) -> f64 {
        *self.lr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        *self.lr.lock().unwrap_or_else(|e| e.into_inner()) = lr;
    }

    /// Runs `f` on the wrapped optimizer. (A closure rather than a lock guard: `save_state` and
    /// `load_state` reach the optimizer too, and a guard kept across them would make the process wait on
    /// itself.)
    pub fn with_inner<R>(&self, f: impl FnOnce(&mut dyn Optimizer) -> R) -> R {
        f(self.opt.lock().unwrap_or_else(|e| e.into_inner()).as_mut())
    }

    pub(crate) fn shared(&self) -> SharedOptimizer {
        self.opt.clone()
    }

    pub(crate) fn lr_cell(&self) -> Arc<Mutex<f64>> {
        self.lr.clone()
    }

    pub(crate) fn skipped_flag(&self) -> Arc<AtomicBool> {
        self.skipped.clone()
    }
}

/// Learning-rate schedules (the common ones of `transformers.get_scheduler`), as a factor of the base
/// learning rate at each scheduler step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Always the base rate.
    Constant,
    /// Linear warm-up from 0 over `warmup` steps, then constant.
    ConstantWithWarmup {
        /// Warm-up steps.
        warmup: usize,
    },
    /// Linear warm-up, then linear decay to 0 at `total`.
    Linear {
        /// Warm-up steps.
        warmup: usize,
        /// Steps in the whole run.
        total: usize,
    },
    /// Linear warm-up, then a cosine decay over `cycles` half-waves (0.5: down to 0 at `total`).
    Cosine {
        /// Warm-up steps.
        warmup: usize,
        /// Steps in the whole run.
        total: usize,
        /// Number of cosine half-waves (default 0.5).
        cycles: f64,
    },
}

impl Schedule {
    /// The factor of the base learning rate after `step` scheduler steps.
    pub fn factor(&self, step: usize) -> f64 {
        let warm = |w: usize| (step < w).then(|| step as f64 / w.max(1) as f64);
        match *self {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup { warmup } => warm(warmup).unwrap_or(1.0),
            Schedule::Linear { warmup, total } => warm(warmup).unwrap_or_else(|| {
                ((total.saturating_sub(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64)
                    .max(0.0)
            }),
            Schedule::Cosine {
                warmup,
                total,
                cycles,
            } => warm(warmup).unwrap_or_else(|| {
                let progress =
                    (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos())).max(0.0)
            }),
        }
    }
}

/// A scheduler that follows its optimizer: it does not step on accumulation steps or skipped steps,
/// and steps once per process per optimizer step (the loader's batches are P times larger than a
/// single process's), unless batches are split.
pub struct AcceleratedScheduler {
    schedule: Schedule,
    base_lr: f64,
    /// Shared with the Accelerator, which saves and restores it.
    last_step: Arc<AtomicUsize>,
    lr: Arc<Mutex<f64>>,
    skipped: Arc<AtomicBool>,
    gradient: GradientStateHandle,
    steps_per_step: usize,
    step_with_optimizer: bool,
}

impl AcceleratedScheduler {
    pub(crate) fn new(
        schedule: Schedule,
        optimizer: &AcceleratedOptimizer,
        gradient: GradientStateHandle,
        steps_per_step: usize,
        step_with_optimizer: bool,
    ) -> Self {
        let base_lr = optimizer.lr();
        let lr = optimizer.lr_cell();
        // Like PyTorch's LambdaLR, the rate is set for step 0 at construction.
        *lr.lock().unwrap_or_else(|e| e.into_inner()) = base_lr * schedule.factor(0);
        AcceleratedScheduler {
            schedule,
            base_lr,
            last_step: Arc::new(AtomicUsize::new(0)),
            lr,
            skipped: optimizer.skipped_flag(),
            gradient,
            steps_per_step,
            step_with_optimizer,
        }
    }

    /// Advances the schedule as Accelerate does (see the type's documentation).
    pub fn step(&mut self) {
        if self.step_with_optimizer {
            if !self.gradient.get().sync_gradients || self.skipped.load(Ordering::SeqCst) {
                return;
            }
            for _ in 0..self.steps_per_step {
                self.advance();
            }
        } else {
            self.advance();
        }
    }

    fn advance(&mut self) {
        let step = self.last_step.fetch_add(1, Ordering::SeqCst) + 1;
        *self.lr.lock().unwrap_or_else(|e| e.into_inner()) =
            self.base_lr * self.schedule.factor(step);
    }

    /// Scheduler steps taken.
    pub fn last_step(&self) -> usize {
        self.last_step.load(Ordering::SeqCst)
    }

    pub(crate) fn link(&self) -> (Arc<AtomicUsize>, Arc<Mutex<f64>>) {
        (self.last_step.clone(), self.lr.clone())
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        *self.lr.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accelerator::precision::GradScalerKwargs;
    use tch::{Device, Kind};

    #[test]
    fn an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let w = vs.root().ones("w", &[3]);
        let opt = crate::optim::TchOptimizer::build(tch::nn::Sgd::default(), &vs, 0.1).unwrap();
        let scaler = Arc::new(Mutex::new(GradScaler::new(
            GradScalerKwargs::default(),
            Device::Cpu,
        )));
        let gradient = GradientStateHandle::default();
        let skipped = Arc::new(AtomicBool::new(false));
        let mut opt = AcceleratedOptimizer::new(
            Box::new(opt),
            vec![w.shallow_clone()],
            0.1,
            gradient,
            Some(scaler.clone()),
            skipped,
        );
        // A scaled loss whose gradient overflows.
        let loss = (&w * f64::INFINITY).sum(Kind::Float);
        scaler.lock().unwrap().scale_loss(&loss).unwrap().backward();
        opt.step().unwrap();
        assert!(opt.step_was_skipped());
        assert_eq!(
            Vec::<f32>::try_from(&w).unwrap(),
            vec![1.0; 3],
            "the parameters did not move"
        );
        assert_eq!(scaler.lock().unwrap().scale_value(), 32768.0);
        // A finite step goes through.
        opt.zero_grad();
        let loss = w.sum(Kind::Float);
        scaler.lock().unwrap().scale_loss(&loss).unwrap().backward();
        opt.step().unwrap();
        assert!(!opt.step_was_skipped());
        let after = Vec::<f32>::try_from(&w).unwrap();
        assert!((after[0] - 0.9).abs() < 1e-6, "{after:?}");
    }

    #[test]
    fn schedules() {
        let lin = Schedule::Linear {
            warmup: 2,
            total: 10,
        };
        let f: Vec<f64> = (0..=10).map(|s| lin.factor(s)).collect();
        assert_eq!(&f[..3], &[0.0, 0.5, 1.0]);
        assert!((f[6] - 0.5).abs() < 1e-12);
        assert_eq!(f[10], 0.0);
        let cos = Schedule::Cosine {
            warmup: 0,
            total: 10,
            cycles: 0.5,
        };
        assert!((cos.factor(0) - 1.0).abs() < 1e-12);
        assert!((cos.factor(5) - 0.5).abs() < 1e-12);
        assert!(cos.factor(10).abs() < 1e-12);
        assert_eq!(Schedule::ConstantWithWarmup { warmup: 4 }.factor(1), 0.25);
        assert_eq!(Schedule::ConstantWithWarmup { warmup: 4 }.factor(9), 1.0);
        assert_eq!(Schedule::Constant.factor(123), 1.0);
    }
}
