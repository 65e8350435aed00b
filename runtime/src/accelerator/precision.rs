//! Mixed precision: autocast on the CPU or a GPU in fp16 or bf16 (through the C++ shim, since tch only
//! switches CUDA autocast on in fp16), and the fp16 gradient scaler, built from per-tensor ops and
//! libtorch's `_amp_update_scale_` as PyTorch's GradScaler is.

use crate::{Error, PrecisionType, Result};
use std::os::raw::c_int;
use tch::{Device, Kind, Tensor};

use crate::shim;

// c10::ScalarType codes.
const HALF: c_int = 5;
const BFLOAT16: c_int = 15;

fn device_code(device: Device) -> c_int {
    i32::from(device.is_cuda())
}

/// Restores the previous autocast settings of a device type when dropped (also during a panic).
struct AutocastGuard {
    device: c_int,
    was_enabled: bool,
    was_dtype: c_int,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        shim::autocast_set_enabled(self.device, self.was_enabled);
        if self.was_dtype >= 0 {
            // SAFETY: a code autocast_get_dtype returned.
            unsafe { shim::autocast_set_dtype(self.device, self.was_dtype) };
        }
        if shim::autocast_decrement_nesting() == 0 {
            shim::autocast_clear_cache();
        }
    }
}

/// Runs `f` with autocast on `device`'s type in `mode` (fp16 or bf16; `no` and fp8 run `f` as it is),
/// as `torch.autocast(device_type, dtype)` does, restoring the previous settings afterwards.
pub fn autocast<T>(device: Device, mode: PrecisionType, f: impl FnOnce() -> T) -> Result<T> {
    let dtype = match mode {
        PrecisionType::Fp16 => HALF,
        PrecisionType::Bf16 => BFLOAT16,
        PrecisionType::No | PrecisionType::Fp8 => return Ok(f()),
    };
    let dev = device_code(device);
    let was_enabled = shim::autocast_is_enabled(dev);
    let was_dtype = shim::autocast_get_dtype(dev);
    if was_enabled < 0 {
        return Err(Error::DeviceUnavailable {
            detail: format!("libtorch refused autocast {mode} on {device:?}"),
        });
    }
    // SAFETY: dtype is HALF or BFLOAT16, valid c10::ScalarType codes.
    let set_dtype = unsafe { shim::autocast_set_dtype(dev, dtype) };
    if set_dtype < 0 || shim::autocast_set_enabled(dev, true) < 0 {
        return Err(Error::DeviceUnavailable {
            detail: format!("libtorch refused autocast {mode} on {device:?}"),
        });
    }
    shim::autocast_increment_nesting();
    let guard = AutocastGuard {
        device: dev,
        was_enabled: was_enabled == 1,
        was_dtype,
    };
    let out = f();
    drop(guard);
    Ok(out)
}

/// Runs `f` with autocast off on `device`'s type (`torch.autocast(device_type, enabled=False)`),
/// restoring the previous setting afterwards, also when `f` panics.
pub(crate) fn without_autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    struct Restore(c_int);
    impl Drop for Restore {
        fn drop(&mut self) {
            shim::autocast_set_enabled(self.0, true);
        }
    }
    let dev = device_code(device);
    if shim::autocast_is_enabled(dev) != 1 {
        return f();
    }
    shim::autocast_set_enabled(dev, false);
    let _restore = Restore(dev);
    f()
}

/// Accelerate's `GradScalerKwargs`: the fp16 loss scaler's settings (PyTorch's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScalerKwargs {
    /// Starting scale (default 65536).
    pub init_scale: f64,
    /// Factor the scale grows by after `growth_interval` steps without overflow (default 2).
    pub growth_factor: f64,
    /// Factor the scale shrinks by after an overflow (default 0.5).
    pub backoff_factor: f64,
    /// Steps without overflow before growing (default 2000).
    pub growth_interval: i64,
    /// Whether scaling happens at all (default true).
    pub enabled: bool,
}

impl Default for GradScalerKwargs {
    fn default() -> Self {
        GradScalerKwargs {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            enabled: true,
        }
    }
}

/// Dynamic loss scaling for fp16 (PyTorch's GradScaler, one optimizer).
#[derive(Debug)]
pub struct GradScaler {
    kwargs: GradScalerKwargs,
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Option<Tensor>,
}

impl GradScaler {
    /// A scaler whose state lives on `device` (where the gradients are).
    pub fn new(kwargs: GradScalerKwargs, device: Device) -> Self {
        GradScaler {
            kwargs,
            scale: Tensor::from_slice(&[kwargs.init_scale as f32]).to_device(device),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
            found_inf: None,
        }
    }

    /// The current scale.
    pub fn scale_value(&self) -> f64 {
        self.scale.double_value(&[0])
    }

    /// The loss times the scale.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        if !self.kwargs.enabled {
            return Ok(loss.shallow_clone());
        }
        loss.f_mul(&self.scale.to_kind(loss.kind()))
            .map_err(|e| Error::torch("GradScaler.scale", e))
    }

    /// Divides the gradients by the scale and records whether any is inf or NaN. Idempotent within a
    /// step (clip_grad_norm_ unscales first; the optimizer step does not unscale twice).
    pub fn unscale(&mut self, params: &[Tensor]) -> Result<()> {
        if !self.kwargs.enabled || self.found_inf.is_some() {
            return Ok(());
        }
        let torch = |e| Error::torch("GradScaler.unscale_", e);
        let inv = self.scale.f_reciprocal().map_err(torch)?;
        let mut found = Tensor::zeros([1], (Kind::Float, self.scale.device()));
        tch::no_grad(|| -> Result<()> {
            for p in params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let bad = g
                    .f_isfinite()
                    .and_then(|f| f.f_all())
                    .and_then(|a| a.f_logical_not())
                    .and_then(|n| n.f_to_kind(Kind::Float))
                    .map_err(torch)?;
                found = found
                    .f_maximum(&bad.f_reshape([1]).map_err(torch)?)
                    .map_err(torch)?;
                g.f_mul_(&inv.to_kind(g.kind())).map(drop).map_err(torch)?;
            }
            Ok(())
        })?;
        self.found_inf = Some(found);
        Ok(())
    }

    /// Whether this step's gradients overflowed (after [`unscale`](Self::unscale)).
    pub fn found_inf(&self) -> bool {
        self.found_inf
            .as_ref()
            .is_some_and(|f| f.double_value(&[0]) > 0.0)
    }

    /// Grows or backs off the scale for the next step and forgets this step's inf check.
    pub fn update(&mut self) -> Result<()> {
        if !self.kwargs.enabled {
            return Ok(());
        }
        let found = self
            .found_inf
            .take()
            .unwrap_or_else(|| Tensor::zeros([1], (Kind::Float, self.scale.device())));
        let _ = self
            .scale
            .f_internal_amp_update_scale_(
                &self.growth_tracker,
                &found,
                self.kwargs.growth_factor,
                self.kwargs.backoff_factor,
                self.kwargs.growth_interval,
            )
            .map_err(|e| Error::torch("GradScaler.update", e))?;
        Ok(())
    }

    /// The state to checkpoint (scale, growth tracker).
    pub fn state(&self) -> (f64, i64) {
        (self.scale_value(), self.growth_tracker.int64_value(&[0]))
    }

    /// Restores a checkpointed state (scale, growth tracker).
    pub fn load_state(&mut self, scale: f64, growth_tracker: i64) -> Result<()> {
        tch::no_grad(|| {
            let _ = self.scale.f_fill_(scale)?;
            self.growth_tracker.f_fill_(growth_tracker).map(drop)
        })
        .map(drop)
        .map_err(|e| Error::torch("GradScaler.load_state", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_autocast_runs_matmuls_in_bf16_and_restores() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let out = autocast(Device::Cpu, PrecisionType::Bf16, || a.matmul(&a)).unwrap();
        assert_eq!(out.kind(), Kind::BFloat16);
        // Outside the closure, fp32 again.
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        let plain = autocast(Device::Cpu, PrecisionType::No, || a.matmul(&a)).unwrap();
        assert_eq!(plain.kind(), Kind::Float);
        // A panic inside still restores.
        let r =
            std::panic::catch_unwind(|| autocast(Device::Cpu, PrecisionType::Bf16, || panic!("x")));
        assert!(r.is_err());
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }

    #[test]
    fn the_scaler_skips_on_inf_and_backs_off() {
        let kwargs = GradScalerKwargs {
            init_scale: 1024.0,
            growth_interval: 2,
            ..GradScalerKwargs::default()
        };
        let mut s = GradScaler::new(kwargs, Device::Cpu);
        let w = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        // A finite step: gradients are unscaled exactly.
        let loss = (&w * 2.0).sum(Kind::Float);
        s.scale_loss(&loss).unwrap().backward();
        s.unscale(std::slice::from_ref(&w)).unwrap();
        assert!(!s.found_inf());
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![2.0; 3]);
        s.update().unwrap();
        assert_eq!(s.scale_value(), 1024.0);
        // An overflow: found, and the scale halves.
        let mut g = w.grad();
        let _ = g.fill_(f64::INFINITY);
        s.unscale(std::slice::from_ref(&w)).unwrap();
        assert!(s.found_inf());
        s.update().unwrap();
        assert_eq!(s.scale_value(), 512.0);
        // Two clean steps grow it back.
        for _ in 0..2 {
            let mut g = w.grad();
            let _ = g.fill_(1.0);
            s.unscale(std::slice::from_ref(&w)).unwrap();
            s.update().unwrap();
        }
        assert_eq!(s.scale_value(), 1024.0);
        assert_eq!(s.state().0, 1024.0);
    }
}
