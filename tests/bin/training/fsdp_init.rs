//! `fsdp_empty PROJECT_DIR`: a model of hasten layers built under `init_empty_weights` and prepared
//! (FSDP when the environment says so, DDP otherwise) holds exactly the values an eager build on rank 0
//! makes (every rank seeded differently, so the values come from rank 0's generator), each rank only its
//! share under FSDP, and each rank's own generator continues afterwards. `save_model_sharded` writes
//! several files and an index; a second empty model, prepared and loaded from them with
//! `load_checkpoint_in_model` (under FSDP each rank reading its slices), equals the first exactly. A
//! checkpoint with a wrong shape is an error naming the tensor and the file, and changes nothing. The
//! optimizer is built before `prepare_model`.

use super::{Check, err};
use hasten::Accelerator;
use hasten::layers::{Block, LayerNorm, Linear, init_empty_weights, layer_norm, linear};
use hasten::optim::{AdamW, Optimizer};
use hasten::tch::nn::{self, Module};
use hasten::tch::{Kind, Tensor};

/// A norm made first, three residual blocks, a head made last: the root unit's parameters are made
/// before and after the blocks', so materialising in the order of making is checked.
#[derive(Debug)]
struct Net {
    norm: LayerNorm,
    blocks: Vec<Block<Ffn>>,
    head: Linear,
}

#[derive(Debug)]
struct Ffn {
    up: Linear,
    down: Linear,
}

impl Module for Ffn {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.down.forward(&self.up.forward(xs).tanh())
    }
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.norm.forward(xs);
        let h = self.blocks.iter().fold(h, |h, b| &h + b.forward(&h));
        self.head.forward(&h)
    }
}

/// Three residual blocks of width 6 under `root / "blocks"`.
fn blocks(root: &nn::Path) -> Vec<Block<Ffn>> {
    (0..3)
        .map(|i| {
            let p = root / "blocks" / i;
            let ffn = Ffn {
                up: linear(&(&p / "up"), 6, 10, true),
                down: linear(&(&p / "down"), 10, 6, true),
            };
            Block::new(&p, ffn)
        })
        .collect()
}

fn build(root: &nn::Path) -> Net {
    let norm = layer_norm(&(root / "norm"), &[6]);
    let blocks = blocks(root);
    Net {
        norm,
        blocks,
        head: linear(&(root / "head"), 6, 5, true),
    }
}

fn same(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) -> Check {
    if a.len() != b.len() {
        return Err(format!("{what}: {} tensors against {}", a.len(), b.len()));
    }
    for (name, t) in a {
        let other = b
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| format!("{what}: {name} is missing"))?;
        if !t.equal(&other.1) {
            return Err(format!("{what}: {name} differs"));
        }
    }
    Ok(())
}

pub fn empty(acc: &mut Accelerator, project: &std::path::Path) -> Check {
    let (p, r) = (acc.num_processes() as i64, acc.process_index() as i64);
    let fsdp = acc.distributed_type() == hasten::DistributedType::Fsdp;
    let vs = nn::VarStore::new(acc.device());
    // Each rank seeded differently: the values must come from rank 0's generator.
    hasten::tch::manual_seed(500 + r);
    let net = init_empty_weights(|| build(&vs.root()));
    let full_numel: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    // The optimizer built before prepare_model (as Accelerate allows): its state is made at the first
    // step, for this rank's pieces.
    let opt = AdamW::new(&vs, 1e-2);
    let model = acc.prepare_model(net, vs).map_err(err)?;
    // A rank seeded as rank 0 continues after the draws, as after an eager build (under DDP every
    // rank draws its own); one seeded otherwise has its own state back.
    let drawn = Tensor::rand([4], (Kind::Float, acc.device()));
    hasten::tch::manual_seed(500 + r);
    if !fsdp || r == 0 {
        let _draws = build(&nn::VarStore::new(acc.device()).root());
    }
    if !drawn.equal(&Tensor::rand([4], (Kind::Float, acc.device()))) {
        return Err("the generator does not continue where an eager build leaves it".into());
    }
    let eager_vs = nn::VarStore::new(acc.device());
    hasten::tch::manual_seed(500);
    let _eager = build(&eager_vs.root());
    let eager: Vec<(String, Tensor)> = eager_vs.variables().into_iter().collect();
    let got = acc.gather_state_dict(&model).map_err(err)?;
    same(
        &eager,
        &got,
        "materialised model vs an eager build on rank 0",
    )?;
    let local: i64 = model.parameters().iter().map(|t| t.numel() as i64).sum();
    // Each parameter's rows divided among the ranks, rounded up (FSDP2's dim-0 sharding).
    let most = super::fsdp::row_share(eager_vs.trainable_variables().iter(), p);
    if fsdp && local > most {
        return Err(format!(
            "rank {r} holds {local} of {full_numel} parameter elements on {p} ranks"
        ));
    }
    if !fsdp && local != full_numel {
        return Err(format!("DDP rank {r} holds {local} of {full_numel}"));
    }
    // A step, so the saved values are not the initial ones.
    let mut opt = acc.prepare_optimizer(opt);
    let x = Tensor::arange(4 * p * 6, (Kind::Float, acc.device()))
        .view([4 * p, 6])
        .sin();
    let xb = x.narrow(0, 4 * r, 4);
    let loss = model
        .call(|m| m.forward(&xb))
        .map_err(err)?
        .square()
        .mean(Kind::Float);
    acc.backward(&loss).map_err(err)?;
    opt.step().map_err(err)?;
    let trained = acc.gather_state_dict(&model).map_err(err)?;
    let saved = project.join("saved");
    acc.save_model_sharded(&model, &saved, "300").map_err(err)?;
    acc.wait_for_everyone().map_err(err)?;
    // A second empty model (other values), prepared, then loaded from the saved files.
    let vs2 = nn::VarStore::new(acc.device());
    hasten::tch::manual_seed(900);
    let net2 = init_empty_weights(|| build(&vs2.root()));
    let model2 = acc.prepare_model(net2, vs2).map_err(err)?;
    let report = acc.load_checkpoint_in_model(&model2, &saved).map_err(err)?;
    if !report.missing.is_empty()
        || !report.unexpected.is_empty()
        || report.loaded.len() != trained.len()
    {
        return Err(format!("load report: {report:?}"));
    }
    same(
        &trained,
        &acc.gather_state_dict(&model2).map_err(err)?,
        "loaded model vs saved",
    )?;
    // A file whose head.weight has the wrong shape: an error naming both, the model unchanged.
    let bad = project.join(format!("bad{r}.safetensors"));
    let mut tensors: Vec<(String, Tensor)> = trained
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    for (n, t) in &mut tensors {
        if n == "head.weight" {
            *t = Tensor::zeros([2, 2], (Kind::Float, hasten::tch::Device::Cpu));
        }
    }
    Tensor::write_safetensors(&tensors, &bad).map_err(err)?;
    let refused = acc
        .load_checkpoint_in_model(&model2, &bad)
        .err()
        .ok_or("a wrong shape was loaded")?
        .to_string();
    if !refused.contains("head.weight") || !refused.contains(&format!("bad{r}.safetensors")) {
        return Err(format!(
            "the error does not name the tensor and file: {refused}"
        ));
    }
    same(
        &trained,
        &acc.gather_state_dict(&model2).map_err(err)?,
        "model after a refused load",
    )?;
    println!("rank {r}: empty-weights init, save_model and sliced loading hold");
    Ok(())
}

/// An input layer whose weight the output layer shares (tied, as language models tie embeddings),
/// around three residual blocks.
#[derive(Debug)]
struct Tied {
    inp: Linear,
    blocks: Vec<Block<Ffn>>,
    out_w: Tensor,
}

impl Module for Tied {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.inp.forward(xs).tanh();
        let h = self.blocks.iter().fold(h, |h, b| &h + b.forward(&h));
        h.linear::<Tensor>(&self.out_w, None)
    }
}

fn tied(root: &nn::Path) -> Tied {
    let inp = linear(&(root / "inp"), 6, 6, true);
    let blocks = blocks(root);
    let out_w = (root / "out").add("weight", inp.ws.shallow_clone(), true);
    Tied { inp, blocks, out_w }
}

/// `fsdp_tied`: a model with a tied parameter, prepared (FSDP or DDP by the environment) and trained 3
/// steps with AdamW on each rank's share, against one process on the whole batch: the tied weight is
/// one parameter (updated once per step, its gradient the sum of both uses), losses and final values
/// within 1e-5, and the state dict names it twice with one value.
pub fn tied_parameters(acc: &mut Accelerator) -> Check {
    let (p, r) = (acc.num_processes() as i64, acc.process_index() as i64);
    hasten::tch::manual_seed(700);
    let vs = nn::VarStore::new(acc.device());
    let net = tied(&vs.root());
    let opt = AdamW::new(&vs, 1e-2);
    let reference_vs = nn::VarStore::new(acc.device());
    hasten::tch::manual_seed(700);
    let reference = tied(&reference_vs.root());
    let mut reference_opt = AdamW::new(&reference_vs, 1e-2);
    let model = acc.prepare_model(net, vs).map_err(err)?;
    let mut opt = acc.prepare_optimizer(opt);
    let share = 4;
    let x = Tensor::arange(3 * share * p * 6, (Kind::Float, acc.device()))
        .view([3 * share * p, 6])
        .cos();
    for step in 0..3 {
        let rows = x.narrow(0, step * share * p, share * p);
        let mine = rows.narrow(0, r * share, share);
        opt.zero_grad();
        let loss = model
            .call(|m| m.forward(&mine))
            .map_err(err)?
            .square()
            .mean(Kind::Float);
        acc.backward(&loss).map_err(err)?;
        opt.step().map_err(err)?;
        let losses = acc
            .group()
            .all_gather_object(&loss.double_value(&[]))
            .map_err(err)?;
        let got = losses.iter().sum::<f64>() / p as f64;
        reference_opt.zero_grad();
        let want = reference.forward(&rows).square().mean(Kind::Float);
        want.backward();
        reference_opt.step().map_err(err)?;
        let want = want.double_value(&[]);
        if (got - want).abs() > 1e-5 * want.abs().max(1e-3) {
            return Err(format!("step {step}: loss {got}, one process {want}"));
        }
    }
    let state = acc.gather_state_dict(&model).map_err(err)?;
    let value = |name: &str| {
        state
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| format!("{name} is not in the state dict"))
    };
    if !value("inp.weight")?.equal(&value("out.weight")?) {
        return Err("the tied weight's two names hold different values".into());
    }
    for (name, t) in reference_vs.variables() {
        let got = value(&name)?.to_device(t.device());
        let diff = (&got - &t).abs().max().double_value(&[]);
        if diff > 1e-5 {
            return Err(format!("{name} differs from one process by {diff}"));
        }
    }
    println!("rank {r}: tied parameters train as one");
    Ok(())
}
