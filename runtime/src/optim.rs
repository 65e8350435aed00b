//! Optimizers as the Accelerator drives them: tch's (through [`TchOptimizer`], which keeps the learning
//! rate libtorch does not give back), and fused AdamW and SGD.
//!
//! Two things PyTorch users get by default and tch does not: `zero_grad` drops gradients instead of
//! zero-filling them (set_to_none, PyTorch's default since 2.0: the next backward writes instead of
//! adds), and the optimizers update all parameters in one multi-tensor kernel (PyTorch's default foreach
//! path; `fused=True` is the single kernel used here), where tch's loop launches a few kernels per
//! parameter. Both come through hasten's C++ shim.

use crate::shim;
use crate::{Error, Result};
use std::os::raw::c_int;
use tch::{Kind, Tensor};

/// The shim's status of a fused optimizer kernel as a Result (libtorch has printed the cause already).
fn fused_status(r: c_int, kernel: &str) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    Err(Error::DeviceUnavailable {
        detail: format!("the fused {kernel} kernel failed (libtorch printed why above)"),
    })
}

/// Drops the gradients of `params` (set_to_none).
pub fn clear_grads(params: &[Tensor]) {
    shim::clear_grads(params);
}

/// `params` with each parameter once: a tied parameter (one tensor under several names, e.g. an
/// embedding shared with the output layer) is listed by the VarStore once per name, where PyTorch's
/// `parameters()` gives it once, so it would be updated twice per step.
pub(crate) fn distinct(params: Vec<Tensor>) -> Vec<Tensor> {
    let mut seen = std::collections::HashSet::new();
    params
        .into_iter()
        .filter(|p| p.numel() == 0 || seen.insert((p.data_ptr() as usize, p.size(), p.stride())))
        .collect()
}

/// Makes `grad` the gradient of `param` (same shape and dtype).
pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    if shim::set_grad(param, grad) != 0 {
        return Err(Error::DeviceUnavailable {
            detail: "libtorch refused to set a gradient".into(),
        });
    }
    Ok(())
}

/// What the Accelerator needs of an optimizer.
pub trait Optimizer: Send {
    /// Updates the parameters from their gradients.
    fn step(&mut self) -> Result<()>;
    /// Drops the gradients.
    fn zero_grad(&mut self);
    /// The learning rate it was built with (or last set).
    fn lr(&self) -> f64;
    /// Sets the learning rate.
    fn set_lr(&mut self, lr: f64);
    /// The parameters it updates.
    fn params(&self) -> Vec<Tensor>;
    /// Its state as named tensors, PyTorch's `state_dict()["state"]` flattened to `{index}.{field}`
    /// (`0.exp_avg`, `3.momentum_buffer`…), for `save_state`. `None` when the state cannot be read
    /// (tch's optimizers keep theirs inside libtorch).
    fn state_dict(&self) -> Option<Vec<(String, Tensor)>> {
        None
    }
    /// Restores what [`Optimizer::state_dict`] returned: every tensor is checked (presence, shape)
    /// before any is copied, so an error leaves the optimizer as it was.
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let _ = state;
        Err(Error::InvalidValue {
            name: "optimizer".into(),
            detail: "this optimizer's state cannot be restored (tch's optimizers keep it inside libtorch; \
                     hasten::optim::AdamW and hasten::optim::Sgd can)"
                .into(),
        })
    }
}

/// `state`'s tensor `name`, with `like`'s shape, or an error naming it.
fn state_tensor<'a>(
    state: &'a [(String, Tensor)],
    name: &str,
    like: &Tensor,
) -> Result<&'a Tensor> {
    let t = state
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| Error::InvalidValue {
            name: name.to_owned(),
            detail: "missing from the optimizer state".into(),
        })?;
    if t.size() != like.size() {
        return Err(Error::InvalidValue {
            name: name.to_owned(),
            detail: format!(
                "the saved state has shape {:?}, the optimizer's {:?}",
                t.size(),
                like.size()
            ),
        });
    }
    Ok(t)
}

/// Copies checked state tensors into place.
fn copy_state(pairs: Vec<(Tensor, &Tensor)>) -> Result<()> {
    tch::no_grad(|| {
        for (mut dst, src) in pairs {
            dst.f_copy_(src)
                .map_err(|e| Error::torch("load optimizer state", e))?;
        }
        Ok(())
    })
}

/// A tch optimizer (`nn::Adam`, `nn::Sgd`, `nn::RmsProp`, …) with the learning rate it was built with,
/// which libtorch does not give back: `TchOptimizer::build(nn::Adam::default(), &vs, 1e-3)?`.
pub struct TchOptimizer {
    inner: tch::nn::Optimizer,
    lr: f64,
}

impl TchOptimizer {
    /// Builds `config` over `vs`'s trainable variables with learning rate `lr`.
    pub fn build(
        config: impl tch::nn::OptimizerConfig,
        vs: &tch::nn::VarStore,
        lr: f64,
    ) -> Result<Self> {
        let inner = config
            .build(vs, lr)
            .map_err(|e| Error::torch("building the optimizer", e))?;
        Ok(TchOptimizer { inner, lr })
    }

    /// The tch optimizer.
    pub fn inner(&self) -> &tch::nn::Optimizer {
        &self.inner
    }

    /// The tch optimizer, mutably: per-group learning rates, weight decay or momentum
    /// (`set_lr_group`, `set_weight_decay_group`, …). Set the learning rate itself through
    /// [`Optimizer::set_lr`], which this type remembers.
    pub fn inner_mut(&mut self) -> &mut tch::nn::Optimizer {
        &mut self.inner
    }
}

impl Optimizer for TchOptimizer {
    fn step(&mut self) -> Result<()> {
        self.inner.step();
        Ok(())
    }

    fn zero_grad(&mut self) {
        clear_grads(&self.inner.trainable_variables());
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.inner.set_lr(lr);
        self.lr = lr;
    }

    fn params(&self) -> Vec<Tensor> {
        self.inner.trainable_variables()
    }
}

/// AdamW with decoupled weight decay, one fused kernel for all parameters. Defaults are PyTorch's:
/// betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
pub struct AdamW {
    params: Vec<Tensor>,
    // Made at the first step, as PyTorch makes them (see `ensure_state`).
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: Vec<Tensor>,
    /// Whether a step ran (or a state was loaded): from then on the state must fit the parameters.
    stepped: bool,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// AdamW over a VarStore's trainable variables (a tied one once).
    pub fn new(vs: &tch::nn::VarStore, lr: f64) -> Self {
        Self::over(distinct(vs.trainable_variables()), lr)
    }

    /// AdamW over given parameters. Its state is made at the first step, on the parameters' device
    /// and in their shape then, so it may be built before `prepare_model` moves the model to its
    /// device or shards it (FSDP), or over a model built under `init_empty_weights`.
    pub fn over(params: Vec<Tensor>, lr: f64) -> Self {
        let none = || {
            params
                .iter()
                .map(|_| Tensor::zeros([0], (Kind::Float, tch::Device::Cpu)))
                .collect::<Vec<_>>()
        };
        AdamW {
            exp_avg: none(),
            exp_avg_sq: none(),
            steps: none(),
            params,
            stepped: false,
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    /// Sets (beta1, beta2) (default (0.9, 0.999)).
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.betas = (beta1, beta2);
        self
    }

    /// Sets eps (default 1e-8).
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets the decoupled weight decay (default 0.01).
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
}

impl AdamW {
    /// Zeros for `p`'s state: its moments (fp32, its shape) and its step count.
    fn fresh_state(p: &Tensor) -> Result<[Tensor; 3]> {
        let zeros = || {
            p.f_zeros_like()
                .and_then(|z| z.f_to_kind(Kind::Float))
                .map_err(|e| Error::torch("AdamW state", e))
        };
        let step = Tensor::f_zeros([], (Kind::Float, p.device()))
            .map_err(|e| Error::torch("AdamW state", e))?;
        Ok([zeros()?, zeros()?, step])
    }

    /// Whether parameter `i`'s state has its shape and device.
    fn fits(&self, i: usize) -> bool {
        let (p, m) = (&self.params[i], &self.exp_avg[i]);
        m.size() == p.size() && m.device() == p.device() && self.steps[i].dim() == 0
    }

    /// Makes the state of every parameter whose state is missing or no longer fits it: before the first
    /// step a model may have moved to its device or been sharded since the optimizer was built. After a
    /// step that would lose the moments: an error naming the parameter.
    fn ensure_state(&mut self) -> Result<()> {
        for i in 0..self.params.len() {
            if self.fits(i) {
                continue;
            }
            if self.stepped {
                let p = &self.params[i];
                return Err(Error::InvalidValue {
                    name: format!("AdamW parameter {i}"),
                    detail: format!(
                        "its state has shape {:?} on {:?}, the parameter is now {:?} on {:?}: the model \
                         was moved or sharded after the optimizer stepped",
                        self.exp_avg[i].size(),
                        self.exp_avg[i].device(),
                        p.size(),
                        p.device()
                    ),
                });
            }
            let [m, v, step] = Self::fresh_state(&self.params[i])?;
            (self.exp_avg[i], self.exp_avg_sq[i], self.steps[i]) = (m, v, step);
        }
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step(&mut self) -> Result<()> {
        self.ensure_state()?;
        self.stepped = true;
        let r = shim::fused_adamw(
            &self.params,
            &self.exp_avg,
            &self.exp_avg_sq,
            &self.steps,
            self.lr,
            self.betas,
            self.weight_decay,
            self.eps,
        );
        fused_status(r, "AdamW")
    }

    fn zero_grad(&mut self) {
        clear_grads(&self.params);
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn params(&self) -> Vec<Tensor> {
        self.params.iter().map(Tensor::shallow_clone).collect()
    }

    fn state_dict(&self) -> Option<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(3 * self.params.len());
        for i in 0..self.params.len() {
            // Before the first step: the zeros the first step would start from.
            let [m, v, step] = if self.fits(i) {
                [
                    self.exp_avg[i].shallow_clone(),
                    self.exp_avg_sq[i].shallow_clone(),
                    self.steps[i].shallow_clone(),
                ]
            } else {
                Self::fresh_state(&self.params[i]).ok()?
            };
            out.push((format!("{i}.step"), step));
            out.push((format!("{i}.exp_avg"), m));
            out.push((format!("{i}.exp_avg_sq"), v));
        }
        Some(out)
    }

    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.ensure_state()?;
        let mut pairs = Vec::new();
        for i in 0..self.params.len() {
            for (field, dst) in [
                ("step", &self.steps[i]),
                ("exp_avg", &self.exp_avg[i]),
                ("exp_avg_sq", &self.exp_avg_sq[i]),
            ] {
                let src = state_tensor(state, &format!("{i}.{field}"), dst)?;
                pairs.push((dst.shallow_clone(), src));
            }
        }
        copy_state(pairs)?;
        self.stepped = true;
        Ok(())
    }
}

/// SGD (momentum, dampening, Nesterov, weight decay, maximize) in one fused kernel for all parameters,
/// with `torch.optim.SGD`'s semantics and defaults (momentum 0, dampening 0, no weight decay). A
/// parameter's momentum buffer starts as its first gradient, as in PyTorch.
pub struct Sgd {
    params: Vec<Tensor>,
    momenta: Vec<Option<Tensor>>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
}

impl Sgd {
    /// SGD over a VarStore's trainable variables (a tied one once).
    pub fn new(vs: &tch::nn::VarStore, lr: f64) -> Self {
        Self::over(distinct(vs.trainable_variables()), lr)
    }

    /// SGD over given parameters.
    pub fn over(params: Vec<Tensor>, lr: f64) -> Self {
        let momenta = params.iter().map(|_| None).collect();
        Sgd {
            params,
            momenta,
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }

    /// Sets the momentum factor (default 0).
    pub fn momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }

    /// Sets the dampening of the momentum (default 0).
    pub fn dampening(mut self, dampening: f64) -> Self {
        self.dampening = dampening;
        self
    }

    /// Sets the L2 penalty added to the gradient (default 0).
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }

    /// Uses Nesterov momentum (default off; needs momentum > 0 and no dampening, as in PyTorch).
    pub fn nesterov(mut self, nesterov: bool) -> Self {
        self.nesterov = nesterov;
        self
    }

    /// Maximizes the objective instead of minimizing it (default off).
    pub fn maximize(mut self, maximize: bool) -> Self {
        self.maximize = maximize;
        self
    }

    fn launch(&self, params: &[Tensor], momenta: &[Tensor], first: bool) -> Result<()> {
        let r = shim::fused_sgd(
            params,
            momenta,
            self.lr,
            self.momentum,
            self.dampening,
            self.weight_decay,
            self.nesterov,
            self.maximize,
            first,
        );
        fused_status(r, "SGD")
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::InvalidValue {
                name: "nesterov".into(),
                detail: "Nesterov momentum requires a momentum and zero dampening".into(),
            });
        }
        if self.momentum == 0.0 {
            return self.launch(&self.params, &[], false);
        }
        // Buffers that exist step together; a parameter's first gradient seeds its new buffer.
        let (mut old_p, mut old_m, mut new_p, mut new_m) = (vec![], vec![], vec![], vec![]);
        for (param, buffer) in self.params.iter().zip(&mut self.momenta) {
            match buffer {
                Some(b) => {
                    old_p.push(param.shallow_clone());
                    old_m.push(b.shallow_clone());
                }
                None if param.grad().defined() => {
                    let b = param.grad().empty_like();
                    new_p.push(param.shallow_clone());
                    new_m.push(b.shallow_clone());
                    *buffer = Some(b);
                }
                None => {}
            }
        }
        if !old_p.is_empty() {
            self.launch(&old_p, &old_m, false)?;
        }
        if !new_p.is_empty() {
            self.launch(&new_p, &new_m, true)?;
        }
        Ok(())
    }

    fn zero_grad(&mut self) {
        clear_grads(&self.params);
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn params(&self) -> Vec<Tensor> {
        self.params.iter().map(Tensor::shallow_clone).collect()
    }

    fn state_dict(&self) -> Option<Vec<(String, Tensor)>> {
        Some(
            self.momenta
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    Some((format!("{i}.momentum_buffer"), m.as_ref()?.shallow_clone()))
                })
                .collect(),
        )
    }

    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        // A parameter without a saved buffer had no gradient yet: its buffer starts fresh again.
        let mut momenta = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let name = format!("{i}.momentum_buffer");
            momenta.push(match state.iter().any(|(n, _)| *n == name) {
                true => Some(
                    state_tensor(state, &name, p)?
                        .to_device(p.device())
                        .to_kind(p.kind())
                        .copy(),
                ),
                false => None,
            });
        }
        self.momenta = momenta;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::{Device, nn};

    /// A small two-layer model with seeded weights: two calls give two identical models.
    fn tiny_model(seed: i64) -> (nn::VarStore, nn::Sequential) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = nn::seq()
            .add(nn::linear(vs.root() / "a", 5, 7, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(vs.root() / "b", 7, 2, Default::default()));
        (vs, model)
    }

    /// Trains 3 steps, snapshots weights and optimizer state, trains 3 more; then restores the snapshot
    /// into a fresh optimizer and trains the same 3 steps: the weights must come out identical.
    fn resumes_exactly(make_opt: impl Fn(&nn::VarStore) -> Box<dyn Optimizer>) {
        let (vs, model) = tiny_model(5);
        let x = Tensor::arange(20, (Kind::Float, Device::Cpu))
            .view([4, 5])
            .cos();
        let mut opt = make_opt(&vs);
        let train = |opt: &mut dyn Optimizer| {
            for _ in 0..3 {
                opt.zero_grad();
                model.forward(&x).square().sum(Kind::Float).backward();
                opt.step().unwrap();
            }
        };
        train(opt.as_mut());
        let weights: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let state: Vec<(String, Tensor)> = opt
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        assert!(!state.is_empty());
        train(opt.as_mut());
        let continued: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        tch::no_grad(|| {
            for (n, t) in &weights {
                vs.variables()[n].shallow_clone().copy_(t);
            }
        });
        let mut fresh = make_opt(&vs);
        // A wrong shape is an error naming the tensor.
        let mut wrong: Vec<(String, Tensor)> = state
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let last = wrong.len() - 1;
        wrong[last].1 = Tensor::zeros([9, 9], (Kind::Float, Device::Cpu));
        let err = fresh.load_state_dict(&wrong).unwrap_err().to_string();
        assert!(
            err.contains(&wrong[last].0) && err.contains("[9, 9]"),
            "{err}"
        );
        fresh.load_state_dict(&state).unwrap();
        train(fresh.as_mut());
        for (n, t) in &continued {
            assert!(vs.variables()[n].equal(t), "{n} differs after resuming");
        }
    }

    #[test]
    fn adamw_state_is_made_at_the_first_step_in_the_parameters_shape_then() {
        let p = Tensor::ones([4, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::over(vec![p.shallow_clone()], 0.1);
        // Sharded (or moved) after the optimizer was built, before its first step.
        let piece = Tensor::ones([5], (Kind::Float, tch::Device::Cpu));
        p.shallow_clone().set_data(&piece);
        set_grad(&p, &Tensor::ones([5], (Kind::Float, tch::Device::Cpu))).unwrap();
        opt.step().unwrap();
        let state = opt.state_dict().unwrap();
        assert_eq!(state[1].1.size(), [5], "{:?}", state[1].0);
        assert!(p.max().double_value(&[]) < 1.0, "stepped");
        // After a step the moments would be lost: an error naming the parameter.
        p.shallow_clone()
            .set_data(&Tensor::ones([2], (Kind::Float, tch::Device::Cpu)));
        let e = opt.step().unwrap_err().to_string();
        assert!(
            e.contains("AdamW parameter 0") && e.contains("after the optimizer stepped"),
            "{e}"
        );
    }

    #[test]
    fn adamw_and_sgd_resume_from_their_state_exactly() {
        resumes_exactly(|vs| Box::new(AdamW::new(vs, 0.01)));
        resumes_exactly(|vs| Box::new(Sgd::new(vs, 0.05).momentum(0.9).nesterov(true)));
        let (vs, _) = tiny_model(1);
        let mut tch_sgd = TchOptimizer::build(nn::Sgd::default(), &vs, 0.1).unwrap();
        assert!(Optimizer::state_dict(&tch_sgd).is_none());
        assert_eq!(tch_sgd.lr(), 0.1);
        assert!(tch_sgd.load_state_dict(&[]).is_err());
    }

    #[test]
    fn fused_adamw_matches_tch_adamw() {
        let make = || tiny_model(3);
        let x = Tensor::arange(20, (Kind::Float, Device::Cpu))
            .view([4, 5])
            .sin();
        let (vs1, m1) = make();
        let (vs2, m2) = make();
        let mut reference = nn::AdamW::default().build(&vs1, 0.01).unwrap();
        let mut fused = AdamW::new(&vs2, 0.01);
        for _ in 0..5 {
            reference.zero_grad();
            m1.forward(&x).square().sum(Kind::Float).backward();
            reference.step();
            Optimizer::zero_grad(&mut fused);
            m2.forward(&x).square().sum(Kind::Float).backward();
            fused.step().unwrap();
        }
        let (a, b) = (vs1.variables(), vs2.variables());
        for (name, t) in &a {
            let diff = (t - &b[name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name} differs by {diff}");
        }
    }

    #[test]
    fn fused_sgd_matches_tch_sgd() {
        let make = || tiny_model(5);
        let x = Tensor::arange(20, (Kind::Float, Device::Cpu))
            .view([4, 5])
            .cos();
        for (momentum, dampening, wd, nesterov) in [
            (0.0, 0.0, 0.0, false),
            (0.9, 0.1, 1e-2, false),
            (0.9, 0.0, 0.0, true),
        ] {
            let (vs1, m1) = make();
            let (vs2, m2) = make();
            let mut reference = nn::Sgd {
                momentum,
                dampening,
                wd,
                nesterov,
            }
            .build(&vs1, 0.05)
            .unwrap();
            let mut fused = Sgd::new(&vs2, 0.05)
                .momentum(momentum)
                .dampening(dampening)
                .weight_decay(wd)
                .nesterov(nesterov);
            for _ in 0..4 {
                reference.zero_grad();
                m1.forward(&x).square().sum(Kind::Float).backward();
                reference.step();
                Optimizer::zero_grad(&mut fused);
                m2.forward(&x).square().sum(Kind::Float).backward();
                fused.step().unwrap();
            }
            let (a, b) = (vs1.variables(), vs2.variables());
            for (name, t) in &a {
                let diff = (t - &b[name]).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "momentum {momentum}: {name} differs by {diff}");
            }
        }
        let bad = Sgd::new(&nn::VarStore::new(Device::Cpu), 0.1).nesterov(true);
        let err = { bad }.step().unwrap_err().to_string();
        assert!(err.contains("nesterov"), "{err}");
    }

    #[test]
    fn zero_grad_drops_gradients() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().ones("w", &[3]);
        let mut opt = TchOptimizer::build(nn::Sgd::default(), &vs, 0.1).unwrap();
        w.sum(Kind::Float).backward();
        assert!(w.grad().defined());
        Optimizer::zero_grad(&mut opt);
        assert!(!w.grad().defined());
    }
}
