//! Layers built the way `torch.nn` builds them, and Accelerate's `init_empty_weights` /
//! `init_on_device` for them.
//!
//! Two differences from tch's own layers matter to someone comparing with PyTorch: tch's `nn::linear`
//! draws its weights from a Kaiming-uniform with ReLU gain (√6/√fan_in, about 2.4× PyTorch's
//! 1/√fan_in), and computes `x·Wᵀ + b` as a matmul plus a separate add, where PyTorch calls one
//! `aten::linear` (a single GEMM with the bias fused in). [`linear`] matches PyTorch on both.
//!
//! tch has no meta device, so "empty" parameters are shape-only placeholders: one element expanded
//! with stride 0 to the full shape. A 70-billion-parameter model built this way costs a few bytes per
//! tensor; `load_checkpoint_in_model` replaces each placeholder with the loaded values. Each placeholder
//! also remembers how it would have been initialised, so `Accelerator::prepare_model` can materialise
//! it on the training device — under FSDP only this rank's shard of it — with the values an eager build
//! from the same generator state would have had.

pub(crate) mod hooks;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tch::nn::{self, Init, Module};
use tch::{Device, Kind, Tensor};

/// Where the variables created by hasten's layers go: the var store (the default), nowhere (shape-only
/// placeholders), or a chosen device.
#[derive(Debug, Clone, Copy, PartialEq)]
enum InitMode {
    VarStore,
    Empty,
    OnDevice(Device),
}

thread_local! {
    // Scoped by the closures below, like Accelerate's context managers; each thread has its own.
    static INIT_MODE: Cell<InitMode> = const { Cell::new(InitMode::VarStore) };
}

/// Puts the previous mode back when the closure returns or panics.
struct ModeGuard(InitMode);

impl Drop for ModeGuard {
    fn drop(&mut self) {
        INIT_MODE.with(|m| m.set(self.0));
    }
}

fn with_mode<R>(mode: InitMode, build: impl FnOnce() -> R) -> R {
    let _restore = ModeGuard(INIT_MODE.with(|m| m.replace(mode)));
    build()
}

/// Runs `build` with every parameter that hasten's layers (or [`parameter`]) create being an empty,
/// shape-only placeholder (Accelerate's `init_empty_weights`): no memory, no initialisation time. Load
/// real values with `load_checkpoint_in_model` or `load_checkpoint_and_dispatch`.
pub fn init_empty_weights<R>(build: impl FnOnce() -> R) -> R {
    with_mode(InitMode::Empty, build)
}

/// Runs `build` with every parameter that hasten's layers create being allocated and initialised on
/// `device`, whatever the var store's device (Accelerate's `init_on_device`).
pub fn init_on_device<R>(device: Device, build: impl FnOnce() -> R) -> R {
    with_mode(InitMode::OnDevice(device), build)
}

/// The shape-only placeholder standing for a tensor of `shape`: one element of `kind`, seen with every
/// stride 0 (also along dimensions of size 1, which `expand` would leave at stride 1).
pub fn empty_placeholder(shape: &[i64], kind: Kind) -> Tensor {
    placeholder_of(shape, kind, Device::Cpu)
}

fn placeholder_of(shape: &[i64], kind: Kind, device: Device) -> Tensor {
    let strides = vec![0; shape.len()];
    Tensor::zeros([1], (kind, device)).as_strided(shape, strides.as_slice(), None)
}

/// True when `t` is a shape-only placeholder (every stride 0, more than one element).
pub fn is_empty_placeholder(t: &Tensor) -> bool {
    t.numel() > 1 && t.stride().iter().all(|s| *s == 0)
}

/// How [`parameter`] would have initialised a variable it made as a placeholder: what
/// `prepare_model` runs to materialise it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recipe {
    pub init: Init,
    /// The var store's device and kind when the variable was made: an eager build draws there.
    pub device: Device,
    pub kind: Kind,
}

/// Placeholders made under [`init_empty_weights`], by the address of their one element, with the tensor
/// owning that element: kept alive here, so no other tensor can get the address while the entry exists.
/// A variable whose data was replaced (loaded, materialised) no longer has the address, so a stale entry
/// is never found; each costs one element.
static RECIPES: Mutex<BTreeMap<usize, (Recipe, Tensor)>> = Mutex::new(BTreeMap::new());

fn recipes() -> std::sync::MutexGuard<'static, BTreeMap<usize, (Recipe, Tensor)>> {
    RECIPES.lock().unwrap_or_else(|e| e.into_inner())
}

fn remember(placeholder: &Tensor, recipe: Recipe) {
    recipes().insert(
        placeholder.data_ptr() as usize,
        (recipe, placeholder.shallow_clone()),
    );
}

/// The recipe of `t` if it is still the placeholder [`parameter`] made under [`init_empty_weights`]
/// (the registry keeps each placeholder's element alive, so no other tensor has its address; a
/// one-element parameter's placeholder has no zero stride to tell it by).
pub(crate) fn recipe_of(t: &Tensor) -> Option<Recipe> {
    recipes().get(&(t.data_ptr() as usize)).map(|(r, _)| *r)
}

/// A placeholder like `t` (which has `recipe`) on `device`: moving a model moves its placeholders without
/// allocating them (a plain `to_device` of an expanded tensor allocates it whole).
pub(crate) fn placeholder_on(t: &Tensor, recipe: Recipe, device: Device) -> Tensor {
    let moved = placeholder_of(&t.size(), t.kind(), device);
    remember(&moved, recipe);
    moved
}

/// The whole tensor of `shape` as an eager [`parameter`] call would have made it, drawing from the
/// recipe device's generator.
pub(crate) fn materialize(shape: &[i64], recipe: Recipe) -> Result<Tensor, tch::TchError> {
    nn::f_init(recipe.init, shape, recipe.device, recipe.kind)
}

/// Forgets the recipe of the placeholder whose element is at `addr` (it has been materialised).
pub(crate) fn forget_recipe(addr: usize) {
    recipes().remove(&addr);
}

/// Gets `vs`'s placeholders ready for a move to `device` (`prepare_model`): those with a recipe become
/// placeholders on `device`, so moving the var store does not allocate them; a placeholder without one
/// (made by hand, or left by an offload) is an error naming it, since nothing could fill it.
pub(crate) fn move_placeholders(vs: &nn::VarStore, device: Device) -> crate::Result<()> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in named {
        if let Some(recipe) = recipe_of(&t) {
            let old = t.data_ptr() as usize;
            t.shallow_clone()
                .f_set_data(&placeholder_on(&t, recipe, device))
                .map_err(|e| crate::Error::torch("moving a placeholder", e))?;
            forget_recipe(old);
        } else if is_empty_placeholder(&t) {
            return Err(crate::Error::InvalidValue {
                name: name.clone(),
                detail:
                    "is a shape-only placeholder with no initialisation to run (made by hand, or \
                         left by an offload): load its values (load_checkpoint_in_model) before \
                         prepare_model, or build it with hasten's layers under init_empty_weights"
                        .into(),
            });
        }
    }
    Ok(())
}

/// Materialises every placeholder of `vs` that has a recipe, whole, in the order the variables were
/// made (an eager build's order of draws).
pub(crate) fn materialize_all(vs: &nn::VarStore) -> crate::Result<()> {
    let _no_grad = tch::no_grad_guard();
    for t in vs.trainable_variables() {
        if let Some(recipe) = recipe_of(&t) {
            let old = t.data_ptr() as usize;
            let value = materialize(&t.size(), recipe)
                .and_then(|v| v.f_to_device(t.device()))
                .map_err(|e| crate::Error::torch("materialising a parameter", e))?;
            t.shallow_clone()
                .f_set_data(&value)
                .map_err(|e| crate::Error::torch("materialising a parameter", e))?;
            forget_recipe(old);
        }
    }
    Ok(())
}

/// A trainable variable `name` under `path`, created as the current mode says (see
/// [`init_empty_weights`] and [`init_on_device`]); in the var store's kind.
pub fn parameter(path: &nn::Path, name: &str, shape: &[i64], init: Init) -> Tensor {
    match INIT_MODE.with(Cell::get) {
        InitMode::VarStore => path.var(name, shape, init),
        InitMode::Empty => {
            let placeholder = empty_placeholder(shape, path.kind());
            remember(
                &placeholder,
                Recipe {
                    init,
                    device: path.device(),
                    kind: path.kind(),
                },
            );
            path.add(name, placeholder, true)
        }
        InitMode::OnDevice(device) => path.add(
            name,
            nn::init::init(init, shape, device).to_kind(path.kind()),
            true,
        ),
    }
}

/// `torch.nn.Linear`: weight `[out, in]` and bias `[out]`, both uniform in ±1/√in, and a forward that is
/// one `aten::linear`.
#[derive(Debug)]
pub struct Linear {
    /// The weight, `[out_features, in_features]`.
    pub ws: Tensor,
    /// The bias, `[out_features]`, when the layer has one.
    pub bs: Option<Tensor>,
}

/// A [`Linear`] layer named `weight` and `bias` under `path`, with PyTorch's initialisation.
pub fn linear(path: &nn::Path, in_features: i64, out_features: i64, bias: bool) -> Linear {
    // kaiming_uniform_(a=√5) on a [out, in] weight is uniform in ±1/√in; the bias uses the same bound.
    let bound = 1.0 / (in_features.max(1) as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    Linear {
        ws: parameter(path, "weight", &[out_features, in_features], init),
        bs: bias.then(|| parameter(path, "bias", &[out_features], init)),
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.ws, self.bs.as_ref())
    }
}

/// `torch.nn.LayerNorm` over the last dimensions, with a weight (ones) and a bias (zeros).
#[derive(Debug)]
pub struct LayerNorm {
    /// The scale.
    pub ws: Tensor,
    /// The shift.
    pub bs: Tensor,
    shape: Vec<i64>,
    eps: f64,
}

/// A [`LayerNorm`] over `shape` (eps 1e-5, PyTorch's default), named `weight` and `bias` under `path`.
pub fn layer_norm(path: &nn::Path, shape: &[i64]) -> LayerNorm {
    LayerNorm {
        ws: parameter(path, "weight", shape, Init::Const(1.0)),
        bs: parameter(path, "bias", shape, Init::Const(0.0)),
        shape: shape.to_vec(),
        eps: 1e-5,
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(&self.shape, Some(&self.ws), Some(&self.bs), self.eps, true)
    }
}

/// `torch.nn.Embedding`: a `[num, dim]` table drawn from N(0, 1).
#[derive(Debug)]
pub struct Embedding {
    /// The table.
    pub ws: Tensor,
}

/// An [`Embedding`] of `num` rows of `dim`, named `weight` under `path`.
pub fn embedding(path: &nn::Path, num: i64, dim: i64) -> Embedding {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 1.0,
    };
    Embedding {
        ws: parameter(path, "weight", &[num, dim], init),
    }
}

impl Module for Embedding {
    fn forward(&self, xs: &Tensor) -> Tensor {
        Tensor::embedding(&self.ws, xs, -1, false, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    #[test]
    fn linear_matches_torch_init_and_math() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let layer = linear(&(vs.root() / "fc"), 400, 30, true);
        let bound = 1.0 / 20.0;
        let max = layer.ws.abs().max().double_value(&[]);
        assert!(
            max <= bound && max > 0.9 * bound,
            "weights within ±1/√in: {max}"
        );
        let bias = layer.bs.as_ref().unwrap();
        assert!(bias.abs().max().double_value(&[]) <= bound);
        let x = Tensor::randn([5, 400], (Kind::Float, Device::Cpu));
        let expected = x.matmul(&layer.ws.tr()) + bias;
        let diff = (layer.forward(&x) - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
        assert_eq!(vs.variables().len(), 2);
        assert!(vs.variables().contains_key("fc.weight"));
    }

    #[test]
    fn empty_weights_cost_nothing_and_the_mode_ends_with_the_closure() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        // Dimensions of size 1 too: a [1] bias and an [n, 1] weight keep their recipes.
        let small = init_empty_weights(|| linear(&(&root / "head"), 3, 1, true));
        assert!(is_empty_placeholder(&small.ws) && recipe_of(&small.ws).is_some());
        assert!(recipe_of(small.bs.as_ref().unwrap()).is_some());
        // 20 × (8192 × 28672 × 2 + …) ≈ 9.4 billion parameters: would be 37 GB if allocated.
        let blocks: Vec<(LayerNorm, Linear, Linear)> = init_empty_weights(|| {
            (0..20)
                .map(|i| {
                    let p = &root / i;
                    (
                        layer_norm(&(&p / "ln"), &[8192]),
                        linear(&(&p / "up"), 8192, 28672, true),
                        linear(&(&p / "down"), 28672, 8192, true),
                    )
                })
                .collect()
        });
        assert!(blocks.iter().all(|(_, up, _)| is_empty_placeholder(&up.ws)));
        assert_eq!(blocks[3].1.ws.size(), [28672, 8192]);
        let params: i64 = vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .sum::<usize>() as i64;
        assert!(params > 9_000_000_000, "{params}");
        // Outside the closure, layers are real again; a panic inside also ends the mode.
        let real = linear(&(&root / "after"), 4, 4, false);
        assert!(!is_empty_placeholder(&real.ws));
        let _ = std::panic::catch_unwind(|| init_empty_weights(|| panic!("building failed")));
        assert!(!is_empty_placeholder(
            &linear(&(&root / "again"), 4, 4, false).ws
        ));
        let on = init_on_device(Device::Cpu, || layer_norm(&(&root / "ln"), &[3]));
        assert_eq!(Vec::<f32>::try_from(&on.ws).unwrap(), [1.0, 1.0, 1.0]);
    }

    #[test]
    fn placeholders_move_without_memory_and_materialise_as_an_eager_build() {
        let build = |vs: &VarStore| {
            (
                linear(&(vs.root() / "fc"), 30, 20, true),
                embedding(&(vs.root() / "emb"), 7, 3),
            )
        };
        tch::manual_seed(3);
        let eager = VarStore::new(Device::Cpu);
        let _ = build(&eager);
        let vs = VarStore::new(Device::Cpu);
        let _ = init_empty_weights(|| build(&vs));
        move_placeholders(&vs, Device::Cpu).unwrap();
        assert!(vs.variables().values().all(is_empty_placeholder));
        tch::manual_seed(3);
        materialize_all(&vs).unwrap();
        let vars = vs.variables();
        for (name, t) in eager.variables() {
            assert!(t.equal(&vars[&name]), "{name}");
        }
        // A placeholder nothing can fill is refused, named.
        let by_hand = VarStore::new(Device::Cpu);
        let _x = by_hand
            .root()
            .add("x", empty_placeholder(&[4, 4], Kind::Float), true);
        let err = move_placeholders(&by_hand, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x") && err.contains("placeholder"), "{err}");
    }

    #[test]
    fn layer_norm_and_embedding_forward() {
        let vs = VarStore::new(Device::Cpu);
        let ln = layer_norm(&(vs.root() / "ln"), &[4]);
        let x = Tensor::arange(8, (Kind::Float, Device::Cpu)).view([2, 4]);
        let y = ln.forward(&x);
        assert!(y.mean(Kind::Float).abs().double_value(&[]) < 1e-6);
        let emb = embedding(&(vs.root() / "emb"), 10, 3);
        let idx = Tensor::from_slice(&[1i64, 7]);
        assert_eq!(emb.forward(&idx).size(), [2, 3]);
        assert!(emb.forward(&idx).get(1).equal(&emb.ws.get(7)));
    }
}

/// A block of a model (a transformer layer, a residual block): a sub-module the Accelerator treats as
/// one piece. Under FSDP, the unit at the block's VarStore path (`FSDP_TRANSFORMER_CLS_TO_WRAP=Block`
/// makes every block one, as Accelerate's class name does) is gathered just before the block runs,
/// freed after it under FULL_SHARD, and gathered again just before its backward, so only the blocks
/// running hold their whole parameters. Anywhere else it is just its module.
///
/// ```
/// use hasten::layers::{Block, linear};
/// use hasten::tch::nn::{self, Module};
///
/// let vs = nn::VarStore::new(hasten::tch::Device::Cpu);
/// let blocks: Vec<Block<_>> =
///     (0..2).map(|i| Block::new(&(vs.root() / "blocks" / i), linear(&(vs.root() / "blocks" / i), 4, 4, true))).collect();
/// let x = hasten::tch::Tensor::ones([2, 4], hasten::tch::kind::FLOAT_CPU);
/// let y = blocks.iter().fold(x, |h, b| b.forward(&h));
/// assert_eq!(blocks[1].path(), "blocks.1");
/// # let _ = y;
/// ```
#[derive(Debug)]
pub struct Block<M> {
    path: String,
    // Boxed, so its address survives moves of the block: a checkpointed block's backward runs it again
    // through that address (see `recompute`).
    inner: Box<M>,
    /// Dropped with the block: a recomputation checks it first.
    alive: std::sync::Arc<()>,
}

impl<M> Block<M> {
    /// `inner`, built under `path`, as a block.
    pub fn new(path: &nn::Path, inner: M) -> Self {
        let path = path.components().collect::<Vec<_>>().join(".");
        crate::accelerator::fsdp::register_block(&path);
        Block {
            path,
            inner: Box::new(inner),
            alive: std::sync::Arc::new(()),
        }
    }

    /// The block's VarStore path (`blocks.3`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The module inside.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// [`nn::ModuleT::forward_t`] of a module with a training mode, run as a block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor
    where
        M: nn::ModuleT + 'static,
    {
        hooks::run_block(
            &self.path,
            xs,
            Box::new(|x| self.inner.forward_t(x, train)),
            Box::new(|| self.recompute(move |m, x| m.forward_t(x, train))),
        )
    }

    /// The block's forward as a checkpointed block's backward calls it again: through the boxed
    /// module's address, after checking that the block still exists (a graph can outlive its model).
    fn recompute(
        &self,
        call: impl Fn(&M, &Tensor) -> Tensor + 'static,
    ) -> Box<dyn Fn(&Tensor) -> Tensor>
    where
        M: 'static,
    {
        let module: *const M = &*self.inner;
        let alive = std::sync::Arc::downgrade(&self.alive);
        let path = self.path.clone();
        Box::new(move |x| {
            assert!(
                alive.strong_count() > 0,
                "block {path} was dropped before its backward could recompute it"
            );
            // SAFETY: the module is boxed, so its address does not change while the block lives, and
            // the block is alive (checked above); it is only read, by the backward of a graph its own
            // forward built, while the thread owning it waits for that backward.
            call(unsafe { &*module }, x)
        })
    }
}

impl<M: nn::Module + 'static> nn::Module for Block<M> {
    fn forward(&self, xs: &Tensor) -> Tensor {
        hooks::run_block(
            &self.path,
            xs,
            Box::new(|x| self.inner.forward(x)),
            Box::new(|| self.recompute(|m, x| m.forward(x))),
        )
    }
}
