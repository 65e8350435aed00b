//! `fsdp`: README's training loop with FSDP switched on by the environment alone (what `hasten launch`
//! sets for `distributed_type: FSDP`): losses and final parameters equal one process training on the
//! whole batch, with accumulation (2 micro-batches), clipping, AdamW and an unused parameter; each rank
//! holds about 1/N of the parameters, gradients and optimizer state (within 1e-5; 5e-2 under bf16). `fsdp_blocks`: the same with a
//! model of residual `hasten::layers::Block`s, each its own unit, gathered only while it runs.

use super::{Check, data, err, mlp};
use hasten::Accelerator;
use hasten::layers::Block;
use hasten::optim::{AdamW, Optimizer};
use hasten::tch::nn::{self, Module};
use hasten::tch::{Device, Kind, Tensor};

const STEPS: i64 = 4;
const MICRO: i64 = 2;
const MAX_NORM: f64 = 0.5;

/// Three residual blocks of width 8, then a head to 4 outputs.
#[derive(Debug)]
struct Stack {
    blocks: Vec<Block<nn::Sequential>>,
    head: nn::Linear,
}

impl Module for Stack {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self
            .blocks
            .iter()
            .fold(xs.shallow_clone(), |h, b| &h + b.forward(&h));
        self.head.forward(&h)
    }
}

/// How often a block's inner module ran: each forward once, and again in the backward under
/// activation checkpointing.
static INNER_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Set when a block's first layer saw an fp32 input: under FSDP's bf16 policy blocks take bf16 inputs
/// (Accelerate's FSDP2 casts each unit's inputs to its param_dtype; no autocast).
static FP32_INTO_BLOCK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn model(root: &nn::Path, blocks: bool) -> Box<dyn Module> {
    if !blocks {
        return Box::new(mlp(root));
    }
    let blocks = (0..3)
        .map(|i| {
            let p = root / "blocks" / i;
            let inner = nn::seq()
                .add_fn(|x| {
                    if x.kind() == Kind::Float {
                        FP32_INTO_BLOCK.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    x.shallow_clone()
                })
                .add(nn::linear(&p / "up", 8, 16, Default::default()))
                .add_fn(|x| {
                    INNER_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    x.tanh()
                })
                .add(nn::linear(&p / "down", 16, 8, Default::default()));
            Block::new(&p, inner)
        })
        .collect();
    Box::new(Stack {
        blocks,
        head: nn::linear(root / "head", 8, 4, Default::default()),
    })
}

/// One process's reference: the same model and AdamW on the whole batch, clipped the same way.
struct Reference {
    vs: nn::VarStore,
    model: Box<dyn Module>,
    opt: AdamW,
}

impl Reference {
    fn new(weights: &[(String, Tensor)], blocks: bool) -> Result<Self, String> {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = model(&vs.root(), blocks);
        let _spare = vs.root().var("spare", &[3], nn::Init::Const(1.0));
        hasten::tch::no_grad(|| -> Check {
            let vars = vs.variables();
            for (name, w) in weights {
                let v = vars
                    .get(name)
                    .ok_or_else(|| format!("no variable {name}"))?;
                v.shallow_clone().copy_(w);
            }
            Ok(())
        })?;
        let opt = AdamW::new(&vs, 1e-2);
        Ok(Reference { vs, model, opt })
    }

    /// Every variable of `trained` equals the reference's within `tol` (relative to its largest value),
    /// or an error naming the first that does not, and `when`.
    fn matches(&self, trained: &[(String, Tensor)], tol: f64, when: &str) -> Check {
        let vars = self.vs.variables();
        for (name, t) in trained {
            let want = vars
                .get(name)
                .ok_or_else(|| format!("no variable {name}"))?;
            let diff = (t - want).abs().max().double_value(&[])
                / want.abs().max().double_value(&[]).max(1e-12);
            if diff > tol {
                return Err(format!(
                    "{when}: {name} differs from the one-process run by {diff:.2e} (relative)"
                ));
            }
        }
        Ok(())
    }

    /// One optimizer step on `x`/`y`; returns the loss and the gradients' total norm before clipping.
    fn step(&mut self, x: &Tensor, y: &Tensor) -> Result<(f64, f64), String> {
        self.opt.zero_grad();
        let loss = self
            .model
            .forward(x)
            .mse_loss(y, hasten::tch::Reduction::Mean);
        loss.backward();
        let grads: Vec<Tensor> = self
            .vs
            .trainable_variables()
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        let total = grads
            .iter()
            .map(|g| g.square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let coef = MAX_NORM / (total + 1e-6);
        if coef < 1.0 {
            hasten::tch::no_grad(|| {
                for g in &grads {
                    let _ = g.shallow_clone().f_mul_scalar_(coef);
                }
            });
        }
        self.opt.step().map_err(err)?;
        Ok((loss.double_value(&[]), total))
    }
}

fn numel(tensors: &[Tensor]) -> i64 {
    tensors.iter().map(|t| t.numel() as i64).sum()
}

/// The most elements one rank holds of `tensors` sharded over `n` ranks as FSDP2 shards them: by rows,
/// each tensor's rows divided by `n`, rounded up.
pub(super) fn row_share<'a>(tensors: impl IntoIterator<Item = &'a Tensor>, n: i64) -> i64 {
    tensors
        .into_iter()
        .map(|t| {
            let shape = t.size();
            let rows = shape.first().copied().unwrap_or(1);
            (rows + n - 1) / n * shape.iter().skip(1).product::<i64>()
        })
        .sum()
}

pub fn fsdp(acc: &mut Accelerator, blocks: bool) -> Check {
    let (p, r) = (acc.num_processes() as i64, acc.process_index() as i64);
    if acc.distributed_type() != hasten::DistributedType::Fsdp {
        return Err(format!(
            "distributed_type is {:?}, not FSDP",
            acc.distributed_type()
        ));
    }
    // Under bf16 (parameters gathered and gradients reduced in bf16) the run is compared with the fp32
    // one at bf16's precision.
    let tol = if acc.mixed_precision() == hasten::PrecisionType::Bf16 {
        5e-2
    } else {
        1e-5
    };
    // HYBRID_SHARD across machines shards among each machine's ranks and replicates across machines.
    let hybrid = std::env::var("FSDP_SHARDING_STRATEGY").is_ok_and(|v| v.starts_with("HYBRID"));
    let local = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(p);
    let hsdp_shard = std::env::var("PARALLELISM_CONFIG_DP_SHARD_SIZE")
        .ok()
        .and_then(|v| v.parse::<i64>().ok());
    let sharded_over = match hsdp_shard {
        Some(s) => s,
        None if hybrid => local,
        None => p,
    };
    let global = 6 * p;
    let (x, y) = data(global * MICRO * STEPS);
    let vs = nn::VarStore::new(acc.device());
    // Different initial weights per rank: prepare must start every rank from the main process's.
    hasten::tch::manual_seed(200 + r);
    let net = model(&vs.root(), blocks);
    let _spare = vs.root().var("spare", &[3], nn::Init::Const(1.0));
    let full_numel = numel(&vs.trainable_variables());
    let most_held = row_share(&vs.trainable_variables(), sharded_over);
    // The blocks before the last: the last one's backward comes right after the forward, so it stays
    // gathered from the second forward on.
    let before_last = |n: &str| n.starts_with("blocks.") && !n.starts_with("blocks.2.");
    let block_vars = vs.variables();
    let most_in_blocks = row_share(
        block_vars
            .iter()
            .filter(|(n, _)| before_last(n))
            .map(|(_, t)| t),
        sharded_over,
    );
    let model = acc.prepare_model(net, vs).map_err(err)?;
    let initial = acc.gather_state_dict(&model).map_err(err)?;
    let held = numel(&model.parameters());
    let opt = AdamW::new(model.var_store(), 1e-2);
    let mut opt = acc.prepare_optimizer(opt);
    let mut reference = Reference::new(&initial, blocks)?;
    let share = global / p;
    for step in 0..STEPS {
        let mut losses = Vec::new();
        let mut norm = None;
        for k in 0..MICRO {
            let start = (step * MICRO + k) * global + r * share;
            let (xb, yb) = (
                x.narrow(0, start, share).to_device(acc.device()),
                y.narrow(0, start, share).to_device(acc.device()),
            );
            acc.accumulate();
            FP32_INTO_BLOCK.store(false, std::sync::atomic::Ordering::Relaxed);
            let loss = model
                .call(|m| m.forward(&xb))
                .map_err(err)?
                .mse_loss(&yb, hasten::tch::Reduction::Mean);
            losses.push(loss.double_value(&[]));
            if blocks && tol > 1e-5 {
                // The root (the head) stays gathered until the backward: in bf16, the policy's dtype.
                let vars = model.var_store().variables();
                let head = vars.get("head.weight").ok_or("no head.weight")?;
                if head.kind() != Kind::BFloat16 {
                    return Err(format!("the gathered head is {:?}, not bf16", head.kind()));
                }
                if FP32_INTO_BLOCK.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err("a block got an fp32 input under the bf16 policy".into());
                }
            }
            if blocks
                && std::env::var("FSDP_AUTO_WRAP_POLICY").is_ok()
                && std::env::var("FSDP_RESHARD_AFTER_FORWARD").as_deref() != Ok("false")
                && std::env::var("FSDP_SHARDING_STRATEGY").as_deref() != Ok("HYBRID_SHARD_ZERO2")
            {
                // FULL_SHARD: after the forward every block but the last holds only its piece again;
                // the root (head, spare) stays gathered until the backward.
                let vars = model.var_store().variables();
                let held_by = |keep: &dyn Fn(&str) -> bool| -> i64 {
                    vars.iter()
                        .filter(|(n, _)| keep(n))
                        .map(|(_, t)| t.numel() as i64)
                        .sum()
                };
                let blocks_numel = held_by(&before_last);
                if blocks_numel > most_in_blocks {
                    return Err(format!(
                        "after the forward the blocks hold {blocks_numel} elements on rank {r}: not freed"
                    ));
                }
                // From the second forward on, the last block (last in the forward before) stays
                // gathered for its backward.
                let last = held_by(&|n| n.starts_with("blocks.2."));
                if (step, k) != (0, 0) && last != 16 * 8 * 2 + 16 + 8 {
                    return Err(format!(
                        "after the forward the last block holds {last} elements on rank {r}, not all"
                    ));
                }
            }
            if step == 1 && std::env::var("HASTEN_TEST_HANG_RANK").is_ok_and(|v| v == r.to_string())
            {
                // A rank stuck in its own code before the backward's collectives (reliability tests).
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            acc.backward(&loss).map_err(err)?;
            if acc.sync_gradients() {
                let grads: Vec<Tensor> = model.parameters().iter().map(Tensor::grad).collect();
                if grads.iter().any(|g| g.defined() && g.numel() as i64 > held) {
                    return Err("a gradient is larger than this rank's shard".into());
                }
                norm = Some(acc.clip_grad_norm_(&model, MAX_NORM, 2.0).map_err(err)?);
            }
            opt.step().map_err(err)?;
            opt.zero_grad();
        }
        let mean: f64 = losses.iter().sum::<f64>() / MICRO as f64;
        let all = acc.group().all_gather_object(&mean).map_err(err)?;
        let loss = all.iter().sum::<f64>() / p as f64;
        let rows = x.narrow(0, step * MICRO * global, MICRO * global);
        let targets = y.narrow(0, step * MICRO * global, MICRO * global);
        let (want, want_norm) = reference.step(&rows, &targets)?;
        if ((loss - want) / want).abs() > tol {
            return Err(format!(
                "step {step}: loss {loss} under FSDP, {want} on one process"
            ));
        }
        // The norm covers every rank's shard of every gradient: it checks the averaged gradients
        // themselves, which AdamW's updates alone would hardly show (they do not depend on scale).
        let norm = norm.ok_or("no synchronising micro-batch")?;
        if ((norm - want_norm) / want_norm).abs() > tol {
            return Err(format!(
                "step {step}: gradient norm {norm} under FSDP, {want_norm} on one process"
            ));
        }
    }
    let state = opt.with_inner(|o| o.state_dict()).unwrap_or_default();
    let state_numel: i64 = state
        .iter()
        .filter(|(n, _)| !n.ends_with(".step"))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    // Every element lives on one rank of each machine (of the job, unless hybrid); each parameter's
    // share is its rows divided by the ranks sharing it, rounded up.
    let locals = acc.group().all_gather_object(&held).map_err(err)?;
    if locals.iter().sum::<i64>() != full_numel * (p / sharded_over)
        || locals.iter().any(|&l| l > most_held)
        || state_numel != 2 * held
    {
        return Err(format!(
            "ranks hold {locals:?} parameter elements of {full_numel} (rank {r}: {state_numel} \
             optimizer-state elements)"
        ));
    }
    let trained = acc.gather_state_dict(&model).map_err(err)?;
    // AdamW's step is about lr × the sign of a gradient where the gradient is small against its running
    // magnitude, so bf16's rounding can turn a near-zero gradient's step around: after the steps a
    // parameter may differ by a few lr (1e-2) where the loss and gradient norm still agree to 5e-2.
    let param_tol = if tol > 1e-5 { 1e-1 } else { tol };
    reference.matches(&trained, param_tol, "at the end")?;
    // Accelerate's get_state_dict under FSDP: the whole model on the main process, nothing elsewhere.
    let main_only = acc.get_state_dict(&model).map_err(err)?;
    let want = if acc.is_main_process() {
        trained.len()
    } else {
        0
    };
    if main_only.len() != want {
        return Err(format!(
            "get_state_dict gave rank {r} {} tensors, {want} expected",
            main_only.len()
        ));
    }
    if blocks {
        // 3 blocks: every training forward, recomputed once under activation checkpointing, and the
        // reference's forward per step.
        let ac = std::env::var("FSDP_ACTIVATION_CHECKPOINTING").as_deref() == Ok("true");
        let want = 3 * (STEPS * MICRO) as usize * (1 + usize::from(ac)) + 3 * STEPS as usize;
        let calls = INNER_CALLS.load(std::sync::atomic::Ordering::Relaxed);
        if calls != want {
            return Err(format!(
                "the blocks ran {calls} times, {want} expected (activation checkpointing: {ac})"
            ));
        }
    }
    println!(
        "rank {r}: fsdp holds {held} of {full_numel} parameters ({:.3} of the model, sharded over \
         {sharded_over} ranks), optimizer state {state_numel}, mixed precision {:?}",
        held as f64 / full_numel as f64,
        acc.mixed_precision()
    );
    Ok(())
}

/// What a loop may do around the sharded model, each step against one process on the whole batch (SGD,
/// so a wrong gradient scale shows): the forward before `zero_grad` (the gradients of the step before
/// must not leak in), an evaluation forward between the backward and the step (the step still sees the
/// gradients), a training forward nobody backpropagates before the step, and two forwards before one
/// backward (`loss(a) + loss(b)`).
pub fn semantics(acc: &mut Accelerator) -> Check {
    use hasten::optim::Sgd;
    let (p, r) = (acc.num_processes() as i64, acc.process_index() as i64);
    let global = 4 * p;
    let (x, y) = data(global * 2 * 4);
    let vs = nn::VarStore::new(acc.device());
    hasten::tch::manual_seed(300 + r);
    let net = model(&vs.root(), true);
    let _spare = vs.root().var("spare", &[3], nn::Init::Const(1.0));
    let model_ = acc.prepare_model(net, vs).map_err(err)?;
    let initial = acc.gather_state_dict(&model_).map_err(err)?;
    let mut opt = acc.prepare_optimizer(Sgd::new(model_.var_store(), 0.1));
    let reference = Reference::new(&initial, true)?;
    let mut ref_opt = Sgd::new(&reference.vs, 0.1);
    let share = global / p;
    let mine = |t: &Tensor, batch: i64| t.narrow(0, batch * global + r * share, share);
    let all = |t: &Tensor, batch: i64| t.narrow(0, batch * global, global);
    let mse = |a: &Tensor, b: &Tensor| a.mse_loss(b, hasten::tch::Reduction::Mean);
    // This rank's loss on its share of `batch`, through the prepared model.
    let loss_on = |batch: i64| -> Result<Tensor, String> {
        let out = model_.call(|m| m.forward(&mine(&x, batch))).map_err(err)?;
        Ok(mse(&out, &mine(&y, batch)))
    };
    for step in 0..4 {
        let (a, b) = (2 * step, 2 * step + 1);
        match step {
            // A plain step: its gradients stay on the parameters after the step.
            0 => {
                opt.zero_grad();
                acc.backward(&loss_on(a)?).map_err(err)?;
            }
            1 => {
                // The forward first, then zero_grad (PyTorch's tutorial order).
                let loss = loss_on(a)?;
                opt.zero_grad();
                acc.backward(&loss).map_err(err)?;
            }
            2 => {
                opt.zero_grad();
                acc.backward(&loss_on(a)?).map_err(err)?;
                // An evaluation forward before the step.
                let _ = hasten::tch::no_grad(|| model_.call(|m| m.forward(&mine(&x, b))))
                    .map_err(err)?;
                // A training forward nobody backpropagates: it leaves the root and the last block
                // gathered; the step still sees the gradients and steps the pieces.
                let _ = model_.call(|m| m.forward(&mine(&x, b))).map_err(err)?;
            }
            _ => {
                opt.zero_grad();
                let (la, lb) = (loss_on(a)?, loss_on(b)?);
                acc.backward(&(la + lb)).map_err(err)?;
            }
        }
        opt.step().map_err(err)?;
        // The reference: the same step on the whole batch.
        ref_opt.zero_grad();
        let loss = if step == 3 {
            mse(&reference.model.forward(&all(&x, a)), &all(&y, a))
                + mse(&reference.model.forward(&all(&x, b)), &all(&y, b))
        } else {
            mse(&reference.model.forward(&all(&x, a)), &all(&y, a))
        };
        loss.backward();
        ref_opt.step().map_err(err)?;
        let trained = acc.gather_state_dict(&model_).map_err(err)?;
        reference.matches(&trained, 1e-5, &format!("after step {step}"))?;
    }
    println!("rank {r}: fsdp semantics hold");
    Ok(())
}

/// `fsdp_checkpoint PROJECT_DIR`: save_state after two steps, two more steps, load_state, the same two
/// steps again: the model and AdamW's state come back exactly (SHARDED_STATE_DICT: every rank's chunks
/// and pieces; FULL_STATE_DICT: the whole model as model.safetensors too).
pub fn checkpoint(acc: &mut Accelerator, project: &std::path::Path) -> Check {
    let (p, r) = (acc.num_processes() as i64, acc.process_index() as i64);
    let global = 4 * p;
    let (x, y) = data(global * 4);
    let vs = nn::VarStore::new(acc.device());
    hasten::tch::manual_seed(400 + r);
    let net = model(&vs.root(), true);
    let model_ = acc.prepare_model(net, vs).map_err(err)?;
    let mut opt = acc.prepare_optimizer(AdamW::new(model_.var_store(), 1e-2));
    let share = global / p;
    let mut step = |acc: &mut Accelerator, batch: i64| -> Check {
        let xb = x.narrow(0, batch * global + r * share, share);
        let yb = y.narrow(0, batch * global + r * share, share);
        opt.zero_grad();
        let loss = model_
            .call(|m| m.forward(&xb))
            .map_err(err)?
            .mse_loss(&yb, hasten::tch::Reduction::Mean);
        acc.backward(&loss).map_err(err)?;
        opt.step().map_err(err)
    };
    step(acc, 0)?;
    step(acc, 1)?;
    let dir = project.join("fsdp_ckpt");
    acc.save_state(Some(&dir)).map_err(err)?;
    step(acc, 2)?;
    step(acc, 3)?;
    let want = acc.gather_state_dict(&model_).map_err(err)?;
    acc.load_state(Some(&dir)).map_err(err)?;
    step(acc, 2)?;
    step(acc, 3)?;
    let got = acc.gather_state_dict(&model_).map_err(err)?;
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        if !a.equal(b) {
            return Err(format!(
                "{name} differs after load_state and the same steps"
            ));
        }
    }
    let full = std::env::var("FSDP_STATE_DICT_TYPE").as_deref() == Ok("FULL_STATE_DICT");
    let whole = dir.join("model.safetensors").is_file();
    if whole != full {
        return Err(format!(
            "model.safetensors written: {whole}, FULL_STATE_DICT: {full}"
        ));
    }
    if !full {
        // A chunk file in the flat layout hasten wrote before sharding by rows (its tensors named
        // unit{k}, here the same lengths) is refused, naming it, instead of read scrambled.
        acc.wait_for_everyone().map_err(err)?;
        let own = dir.join(format!("pytorch_model_fsdp_0_rank{r}.safetensors"));
        let saved = Tensor::read_safetensors(&own).map_err(|e| e.to_string())?;
        let flat: Vec<(String, Tensor)> = saved
            .iter()
            .map(|(n, t)| (n.trim_end_matches(".rows").to_string(), t.shallow_clone()))
            .collect();
        Tensor::write_safetensors(&flat, &own).map_err(|e| e.to_string())?;
        acc.wait_for_everyone().map_err(err)?;
        match acc.load_state(Some(&dir)) {
            Ok(_) => return Err("a chunk file of the flat layout was loaded".into()),
            Err(e) if e.to_string().contains("flat layout") => {}
            Err(e) => return Err(format!("a chunk file of the flat layout: {e}")),
        }
        Tensor::write_safetensors(&saved, &own).map_err(|e| e.to_string())?;
    }
    if full {
        // The whole-model file alone (the chunk files gone) gives each rank its slice.
        acc.wait_for_everyone().map_err(err)?;
        let own = dir.join(format!("pytorch_model_fsdp_0_rank{r}.safetensors"));
        std::fs::remove_file(&own).map_err(|e| format!("{}: {e}", own.display()))?;
        acc.wait_for_everyone().map_err(err)?;
        acc.load_state(Some(&dir)).map_err(err)?;
        step(acc, 2)?;
        step(acc, 3)?;
        let again = acc.gather_state_dict(&model_).map_err(err)?;
        for ((name, a), (_, b)) in want.iter().zip(&again) {
            if !a.equal(b) {
                return Err(format!("{name} differs after loading the whole-model file"));
            }
        }
    }
    println!("rank {r}: fsdp checkpoint resumes exactly");
    Ok(())
}
