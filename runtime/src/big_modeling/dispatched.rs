//! A dispatched model that owns its blocks: a model built of [`crate::layers::Block`]s runs through
//! its [`Dispatcher`] by the same block hooks a prepared FSDP model uses (`layers::hooks`), so its
//! forward is the model's own — no list of blocks, no closures around them.

use super::hooks::{Dispatcher, under};
use crate::layers::hooks::{BlockHooks, Forward, Recompute, with_hooks};
use crate::{Error, Result};
use std::cell::RefCell;
use tch::Tensor;
use tch::nn::Module;

/// The dispatcher as the active block hooks: each block runs where the device map puts it. A failure
/// (an unreadable offloaded weight) is kept and the forward unwinds with its message.
struct Dispatch<'a> {
    dispatcher: &'a Dispatcher,
    error: RefCell<Option<Error>>,
    /// The blocks running now: a block inside one of them is already in place (its weights came
    /// with the outer block's).
    running: RefCell<Vec<String>>,
}

impl BlockHooks for Dispatch<'_> {
    fn run_block(
        &self,
        path: &str,
        xs: &Tensor,
        forward: Forward<'_>,
        _recompute: Recompute<'_>,
    ) -> Tensor {
        let placed = self.running.borrow().iter().any(|outer| under(path, outer));
        if placed {
            return forward(xs);
        }
        self.running.borrow_mut().push(path.to_owned());
        let out = self.dispatcher.run(path, xs, forward);
        self.running.borrow_mut().pop();
        match out {
            Ok(out) => out,
            Err(e) => {
                let text = e.to_string();
                self.error.borrow_mut().get_or_insert(e);
                panic!("{text}");
            }
        }
    }
}

/// Runs `forward` (a model's forward, whose blocks call the hooks) with `dispatcher` placing each
/// block; a dispatch failure comes back as its error.
pub(super) fn run_dispatched(
    dispatcher: &Dispatcher,
    forward: impl FnOnce() -> Tensor,
) -> Result<Tensor> {
    let hooks = Dispatch {
        dispatcher,
        error: RefCell::new(None),
        running: RefCell::new(Vec::new()),
    };
    let out =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| with_hooks(&hooks, forward)));
    match out {
        Ok(y) => Ok(dispatcher.to_main(&y)),
        Err(panic) => match hooks.error.take() {
            Some(e) => Err(e),
            None => std::panic::resume_unwind(panic),
        },
    }
}

/// A model whose parts are [`crate::layers::Block`]s, run where its device map says (Accelerate's
/// `dispatch_model` result): each block's input moves to the block's device, an offloaded block's
/// weights come over for its call only, and the output comes back on the main device. The model's
/// forward is its own; the blocks find the dispatcher through the block hooks.
///
/// ```no_run
/// # use hasten::tch::{nn, Device, Tensor};
/// # use hasten::layers::{self, Block};
/// # fn main() -> hasten::Result<()> {
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = layers::init_empty_weights(|| nn::seq().add(Block::new(&(vs.root() / "l0"),
///     layers::linear(&(vs.root() / "l0"), 8, 8, true))).add(Block::new(&(vs.root() / "l1"),
///     layers::linear(&(vs.root() / "l1"), 8, 8, true))));
/// # let map = vec![("l0".to_string(), hasten::big_modeling::DeviceKey::Cpu), ("l1".to_string(), hasten::big_modeling::DeviceKey::Cpu)];
/// let dispatcher = hasten::dispatch_model(&vs, map, None, None)?;
/// let model = hasten::big_modeling::DispatchedModel::new(dispatcher, model)?;
/// let y = model.try_forward(&Tensor::ones([2, 8], hasten::tch::kind::FLOAT_CPU))?;
/// # let _ = y; Ok(()) }
/// ```
#[derive(Debug)]
pub struct DispatchedModel<M> {
    module: M,
    dispatcher: Dispatcher,
}

impl<M: Module> DispatchedModel<M> {
    /// `module` run through `dispatcher`. Every variable of the dispatched var store must lie in a
    /// `Block` (a part outside the blocks would run wherever its weights happen to be): otherwise an
    /// error naming it.
    pub fn new(dispatcher: Dispatcher, module: M) -> Result<Self> {
        let blocks = crate::accelerator::fsdp::block_paths();
        let inside = |name: &str| blocks.iter().any(|b| under(name, b));
        if let Some(name) = dispatcher.variable_names().find(|n| !inside(n)) {
            return Err(Error::InvalidValue {
                name: format!("DispatchedModel variable {name}"),
                detail:
                    "it lies in no hasten::layers::Block, and a dispatched model runs its blocks \
                         where the device map places them: build that part as a Block (or list the \
                         parts in a DispatchedSequential)"
                        .into(),
            });
        }
        Ok(DispatchedModel { module, dispatcher })
    }

    /// The forward pass, on the main device; an unreadable offloaded weight is an error naming its
    /// file.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        run_dispatched(&self.dispatcher, || self.module.forward(xs))
    }

    /// The model.
    pub fn module(&self) -> &M {
        &self.module
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }
}

impl<M: Module> Module for DispatchedModel<M> {
    /// Panics where [`DispatchedModel::try_forward`] returns an error.
    fn forward(&self, xs: &Tensor) -> Tensor {
        output_or_panic(self.try_forward(xs))
    }
}

/// A dispatched forward's output, as a `Module::forward` (which cannot return an error) gives it.
pub(super) fn output_or_panic(out: Result<Tensor>) -> Tensor {
    match out {
        Ok(y) => y,
        Err(e) => panic!("dispatched forward failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::device_map::DeviceKey;
    use super::super::dispatch::dispatch_model;
    use super::super::hooks::DispatchedSequential;
    use super::*;
    use crate::big_modeling::LoadOptions;
    use crate::layers::{self, Block};
    use crate::load_checkpoint_in_model;
    use tch::nn::{self, VarStore};
    use tch::{Device, Kind};

    /// Four blocks `layers.i` (linear + tanh), the last holding a block of its own (`layers.3.inner`).
    fn model(vs: &VarStore) -> nn::Sequential {
        let root = vs.root() / "layers";
        let mut seq = nn::seq();
        for i in 0..3 {
            let layer = layers::linear(&(&root / i), 8, 8, true);
            seq = seq.add(Block::new(
                &(&root / i),
                nn::func(move |x| layer.forward(x).tanh()),
            ));
        }
        let inner = Block::new(
            &(&root / 3 / "inner"),
            layers::linear(&(&root / 3 / "inner"), 8, 8, true),
        );
        seq.add(Block::new(
            &(&root / 3),
            nn::func(move |x| inner.forward(x).tanh()),
        ))
    }

    #[test]
    fn a_model_of_blocks_runs_dispatched_through_its_own_forward() {
        let dir = tempfile::tempdir().unwrap();
        let reference = VarStore::new(Device::Cpu);
        let plain = model(&reference);
        reference
            .save(dir.path().join("model.safetensors"))
            .unwrap();
        let x = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let expected = plain.forward(&x);

        let vs = VarStore::new(Device::Cpu);
        let empty = layers::init_empty_weights(|| model(&vs));
        let map = vec![
            ("layers.0".to_string(), DeviceKey::Cpu),
            ("layers.1".to_string(), DeviceKey::Disk),
            ("layers.2".to_string(), DeviceKey::Cpu),
            ("layers.3".to_string(), DeviceKey::Disk),
        ];
        let offload = dir.path().join("offload");
        load_checkpoint_in_model(
            &vs,
            dir.path(),
            &LoadOptions {
                device_map: Some(map.clone()),
                offload_folder: Some(offload.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let dispatched = DispatchedModel::new(
            dispatch_model(&vs, map, Some(&offload), None).unwrap(),
            empty,
        )
        .unwrap();
        for _ in 0..2 {
            let y = dispatched.try_forward(&x).unwrap();
            assert!(y.allclose(&expected, 1e-6, 1e-6, false), "run twice, same");
        }
        // The disk blocks' weights (the inner block's too) leave again.
        for name in ["layers.1.weight", "layers.3.inner.weight"] {
            assert!(
                layers::is_empty_placeholder(&vs.variables()[name]),
                "{name}"
            );
        }
        // A damaged file is an error naming it, not a panic; the model keeps its placeholders.
        std::fs::write(offload.join("layers.3.inner.weight.dat"), b"short").unwrap();
        let err = dispatched.try_forward(&x).unwrap_err().to_string();
        assert!(err.contains("layers.3.inner.weight.dat"), "{err}");
        assert!(layers::is_empty_placeholder(
            &vs.variables()["layers.3.inner.weight"]
        ));
    }

    #[test]
    fn listed_parts_run_through_the_same_hooks_and_parts_outside_blocks_are_named() {
        let vs = VarStore::new(Device::Cpu);
        let m = model(&vs);
        let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
        let expected = m.forward(&x);
        // The blocks listed by name in a DispatchedSequential: each runs once through the dispatcher
        // (the blocks inside are already in place).
        let listed: Vec<(String, Box<dyn Module>)> =
            vec![("layers".into(), Box::new(m) as Box<dyn Module>)];
        let dir = tempfile::tempdir().unwrap();
        let disk = super::super::dispatch::disk_offload(&vs, dir.path(), Device::Cpu).unwrap();
        assert!(layers::is_empty_placeholder(
            &vs.variables()["layers.0.weight"]
        ));
        let seq = DispatchedSequential::new(disk, listed);
        assert!(
            seq.try_forward(&x)
                .unwrap()
                .allclose(&expected, 1e-6, 1e-6, false)
        );
        // A variable outside every block.
        let _head = layers::linear(&(vs.root() / "head"), 8, 2, true);
        let map = vec![(String::new(), DeviceKey::Cpu)];
        let err = DispatchedModel::new(dispatch_model(&vs, map, None, None).unwrap(), model(&vs))
            .unwrap_err()
            .to_string();
        assert!(err.contains("head.") && err.contains("Block"), "{err}");
    }
}
