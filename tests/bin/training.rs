//! Correctness checks of the training library, run on every rank under `hasten launch`:
//! `hasten-test-training MODE` with MODE one of `ddp`, `ddp_buckets` (one bucket per parameter),
//! `ddp_unused` (plus a parameter no loss uses, with find_unused_parameters), `accumulate`,
//! `dataloader_end`, `scheduler`, `metrics`, `metrics_iterable` (dispatched from process 0, the default),
//! `metrics_iterable_shard` (each rank reads), `dispatch` (map-style, dispatched), `checkpoint PROJECT_DIR`, `rng`, `rng_types`
//! (`rng_types: [torch]`), `rng_types_default`,
//! `tracking PROJECT_DIR` (TensorBoard plus a custom tracker that logs on every rank), `fsdp` (under the
//! `FSDP_*` environment the test sets), `fsdp_empty PROJECT_DIR` (a model built under init_empty_weights,
//! save_model and sliced loading). Prints `training check MODE: ok` or `... FAILED: why` and exits non-zero on failure.

use hasten::data::{DataLoader, TensorDataset};
use hasten::optim::TchOptimizer;
use hasten::tch::nn::{self, Module, OptimizerConfig};
use hasten::tch::{Device, Kind, Tensor};
use hasten::{
    Accelerator, DistributedDataParallelKwargs, GradientAccumulationPlugin, PreparedModel,
    ReduceOp, Schedule,
};

#[path = "training/crash.rs"]
mod crash;
#[path = "training/fsdp.rs"]
mod fsdp;
#[path = "training/fsdp_init.rs"]
mod fsdp_init;
#[path = "training/loaders.rs"]
mod loaders;
#[path = "training/tracking.rs"]
mod tracking;

type Check = Result<(), String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A small MLP under `root`.
fn mlp(root: &nn::Path) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(root / "fc1", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(root / "fc2", 16, 4, Default::default()))
}

/// Deterministic data, the same on every rank.
fn data(n: i64) -> (Tensor, Tensor) {
    let x = Tensor::arange(n * 8, (Kind::Float, Device::Cpu))
        .view([n, 8])
        .sin();
    let y = Tensor::arange(n * 4, (Kind::Float, Device::Cpu))
        .view([n, 4])
        .cos();
    (x, y)
}

/// A reference model on this process alone, starting from `weights`.
fn reference(weights: &[(String, Tensor)]) -> Result<(nn::VarStore, nn::Sequential), String> {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs.root());
    hasten::tch::no_grad(|| -> Check {
        let vars = vs.variables();
        for (name, w) in weights {
            match vars.get(name) {
                Some(v) => v.shallow_clone().copy_(w),
                None if name == "spare" => {} // the unused parameter of `ddp_unused`
                None => return Err(format!("no variable {name}")),
            }
        }
        Ok(())
    })?;
    Ok((vs, model))
}

fn max_rel_diff(a: &[(String, Tensor)], b: &nn::VarStore) -> f64 {
    let vars = b.variables();
    a.iter()
        .filter_map(|(n, t)| Some((t, vars.get(n)?)))
        .map(|(t, r)| {
            ((t - r).abs().max().double_value(&[]) / r.abs().max().double_value(&[]).max(1e-12))
                .abs()
        })
        .fold(0.0, f64::max)
}

/// The prepared model's weights equal the reference's within 1e-5 (relative), or `what` and the difference.
fn same_weights<M>(
    acc: &Accelerator,
    model: &PreparedModel<M>,
    reference: &nn::VarStore,
    what: &str,
) -> Check {
    let diff = max_rel_diff(&acc.unwrap_model(model), reference);
    if diff > 1e-5 {
        return Err(format!("{what} by {diff:.2e} (relative)"));
    }
    Ok(())
}

/// After K steps, DDP parameters equal a single-process run on the concatenated batch. With `unused`,
/// the model also holds a parameter no loss uses: its gradient counts as zero and it stays as it was.
fn ddp(acc: &mut Accelerator, unused: bool) -> Check {
    let (p, r) = (acc.num_processes() as i64, acc.process_index() as i64);
    let global = 12;
    let (x, y) = data(global * 5);
    let vs = nn::VarStore::new(acc.device());
    // Different initial weights per rank: prepare must make them equal.
    hasten::tch::manual_seed(100 + r);
    let net = mlp(&vs.root());
    let spare = unused.then(|| vs.root().var("spare", &[3], nn::Init::Const(1.0)));
    let model = acc.prepare_model(net, vs).map_err(err)?;
    let initial = weights_of(acc, &model);
    let opt = TchOptimizer::build(nn::Sgd::default(), model.var_store(), 0.1).map_err(err)?;
    let mut opt = acc.prepare_optimizer(opt);
    let (ref_vs, ref_model) = reference(&initial)?;
    let mut ref_opt = nn::Sgd::default().build(&ref_vs, 0.1).map_err(err)?;
    let share = global / p;
    for step in 0..5 {
        let rows = x.narrow(0, step * global, global);
        let targets = y.narrow(0, step * global, global);
        let mine = rows.narrow(0, r * share, share);
        let my_targets = targets.narrow(0, r * share, share);
        opt.zero_grad();
        let loss = model
            .forward(&mine)
            .map_err(err)?
            .mse_loss(&my_targets, hasten::tch::Reduction::Mean);
        acc.backward(&loss).map_err(err)?;
        opt.step().map_err(err)?;
        ref_opt.zero_grad();
        ref_model
            .forward(&rows)
            .mse_loss(&targets, hasten::tch::Reduction::Mean)
            .backward();
        ref_opt.step();
    }
    if let Some(spare) = spare {
        if spare.grad().sum(Kind::Float).double_value(&[]) != 0.0
            || spare.sum(Kind::Float).double_value(&[]) != 3.0
        {
            return Err(format!(
                "the unused parameter changed or got a gradient: {spare}"
            ));
        }
    }
    same_weights(
        acc,
        &model,
        &ref_vs,
        "DDP parameters differ from the single-process run",
    )
}

/// Without find_unused_parameters, a parameter no loss uses is an error naming it and the rank, on
/// every rank (PyTorch's DDP refuses it too).
fn unused_refused(acc: &mut Accelerator) -> Check {
    let vs = nn::VarStore::new(acc.device());
    let net = mlp(&vs.root());
    let _spare = vs.root().var("spare", &[3], nn::Init::Const(1.0));
    let model = acc.prepare_model(net, vs).map_err(err)?;
    let (x, y) = data(4);
    let loss = model
        .forward(&x.to_device(acc.device()))
        .map_err(err)?
        .mse_loss(&y.to_device(acc.device()), hasten::tch::Reduction::Mean);
    match acc.backward(&loss) {
        Err(hasten::Error::UnusedParameter { parameter, rank })
            if parameter == "spare" && rank == acc.process_index() =>
        {
            Ok(())
        }
        Err(e) if acc.num_processes() == 1 => Err(format!("one process refused: {e}")),
        Ok(()) if acc.num_processes() == 1 => Ok(()),
        other => Err(format!(
            "an unused parameter without find_unused_parameters gave {other:?}"
        )),
    }
}

/// N accumulated micro-batches equal one N-times batch; gradients stay local until the sync step.
fn accumulate(acc: &mut Accelerator) -> Check {
    let (p, r) = (acc.num_processes() as i64, acc.process_index() as i64);
    let n = acc.gradient_accumulation_steps() as i64;
    let micro = 2;
    let (x, y) = data(micro * n * p);
    let vs = nn::VarStore::new(acc.device());
    let net = mlp(&vs.root());
    let model = acc.prepare_model(net, vs).map_err(err)?;
    let initial = weights_of(acc, &model);
    let opt = TchOptimizer::build(nn::Sgd::default(), model.var_store(), 0.05).map_err(err)?;
    let mut opt = acc.prepare_optimizer(opt);
    let mut syncs = Vec::new();
    for k in 0..n {
        // Rank r's micro-batch k: rows of the global batch, interleaved so every rank sees distinct data.
        let start = (k * p + r) * micro;
        let (xb, yb) = (x.narrow(0, start, micro), y.narrow(0, start, micro));
        syncs.push(acc.accumulate());
        let loss = model
            .forward(&xb)
            .map_err(err)?
            .mse_loss(&yb, hasten::tch::Reduction::Mean);
        acc.backward(&loss).map_err(err)?;
        if !acc.sync_gradients() && p > 1 {
            // Not synchronised yet: ranks hold different gradients.
            let local = model.parameters()[0]
                .grad()
                .sum(Kind::Float)
                .double_value(&[]);
            let all = acc.group().all_gather_object(&local).map_err(err)?;
            if all.windows(2).all(|w| w[0] == w[1]) {
                return Err("gradients were synchronised on an accumulation step".into());
            }
        }
        opt.step().map_err(err)?;
        opt.zero_grad();
    }
    let want: Vec<bool> = (1..=n).map(|k| k == n).collect();
    if syncs != want {
        return Err(format!(
            "sync_gradients per micro-batch {syncs:?}, want {want:?}"
        ));
    }
    let (ref_vs, ref_model) = reference(&initial)?;
    let mut ref_opt = nn::Sgd::default().build(&ref_vs, 0.05).map_err(err)?;
    ref_opt.zero_grad();
    ref_model
        .forward(&x)
        .mse_loss(&y, hasten::tch::Reduction::Mean)
        .backward();
    ref_opt.step();
    same_weights(
        acc,
        &model,
        &ref_vs,
        &format!("the accumulated run differs from one {n}x batch"),
    )
}

fn loader(
    acc: &mut Accelerator,
    n: i64,
    batch: usize,
) -> Result<hasten::data::DataLoaderShard<TensorDataset, Vec<Tensor>>, String> {
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu));
    let features = labels.to_kind(Kind::Float).unsqueeze(1).repeat([1, 8]);
    let ds = TensorDataset::new(vec![features, labels]).map_err(err)?;
    acc.prepare_data_loader(DataLoader::new(ds, batch))
        .map_err(err)
}

/// The end of the data loader forces a sync mid-accumulation.
fn dataloader_end(acc: &mut Accelerator) -> Check {
    // 20 samples, batch 2 per rank, 2 ranks: 5 batches per rank; accumulation 2.
    let p = acc.num_processes() as i64;
    let dl = loader(acc, 10 * p, 2)?;
    let vs = nn::VarStore::new(acc.device());
    let net = mlp(&vs.root());
    let model = acc.prepare_model(net, vs).map_err(err)?;
    let opt = TchOptimizer::build(nn::Sgd::default(), model.var_store(), 0.01).map_err(err)?;
    let mut opt = acc.prepare_optimizer(opt);
    let mut pattern = Vec::new();
    for batch in dl.iter().map_err(err)? {
        let batch = batch.map_err(err)?;
        pattern.push(acc.accumulate());
        let loss = model.forward(&batch[0]).map_err(err)?.sum(Kind::Float);
        acc.backward(&loss).map_err(err)?;
        opt.step().map_err(err)?;
        opt.zero_grad();
    }
    if pattern != [false, true, false, true, true] {
        return Err(format!(
            "sync pattern {pattern:?}, want [false, true, false, true, true]"
        ));
    }
    Ok(())
}

/// The scheduler steps num_processes times per optimizer step, and never on accumulation steps.
fn scheduler(acc: &mut Accelerator) -> Check {
    let p = acc.num_processes();
    let vs = nn::VarStore::new(acc.device());
    let net = mlp(&vs.root());
    let model = acc.prepare_model(net, vs).map_err(err)?;
    let opt = TchOptimizer::build(nn::Sgd::default(), model.var_store(), 1.0).map_err(err)?;
    let mut opt = acc.prepare_optimizer(opt);
    let mut sched = acc.prepare_scheduler(
        Schedule::Linear {
            warmup: 0,
            total: 100,
        },
        &opt,
    );
    let x = Tensor::ones([2, 8], (Kind::Float, acc.device()));
    for _ in 0..6 {
        acc.accumulate();
        let loss = model.forward(&x).map_err(err)?.sum(Kind::Float);
        acc.backward(&loss).map_err(err)?;
        opt.step().map_err(err)?;
        sched.step();
        opt.zero_grad();
    }
    let steps = acc.gradient_accumulation_steps();
    let want = 6 / steps * p;
    if sched.last_step() != want {
        return Err(format!(
            "scheduler took {} steps, want {want}",
            sched.last_step()
        ));
    }
    let lr = 1.0 - want as f64 / 100.0;
    if (opt.lr() - lr).abs() > 1e-12 {
        return Err(format!("learning rate {}, want {lr}", opt.lr()));
    }
    Ok(())
}

/// A copy of a prepared model's variables.
fn weights_of<M>(acc: &Accelerator, model: &PreparedModel<M>) -> Vec<(String, Tensor)> {
    acc.unwrap_model(model)
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect()
}

fn identical(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) -> Check {
    for ((n, x), (_, y)) in a.iter().zip(b) {
        if !x.equal(y) {
            return Err(format!("{what}: {n} differs"));
        }
    }
    Ok(())
}

/// save_state / load_state with automatic checkpoint naming (total_limit 2) under `project`: resuming
/// from the latest checkpoint repeats the same steps exactly (weights, AdamW state, scheduler, dropout's
/// generator); a truncated weights file or a wrong model count is an error naming it and changes nothing.
fn checkpoint(acc: &mut Accelerator, project: &std::path::Path) -> Check {
    let (p, r) = (acc.num_processes() as i64, acc.process_index() as i64);
    let (x, y) = data(6 * p);
    let device = acc.device();
    let (mine, targets) = (
        x.narrow(0, r * 6, 6).to_device(device),
        y.narrow(0, r * 6, 6).to_device(device),
    );
    let vs = nn::VarStore::new(device);
    let net = mlp(&vs.root());
    let model = acc.prepare_model(net, vs).map_err(err)?;
    let mut opt = acc.prepare_optimizer(hasten::optim::AdamW::new(model.var_store(), 0.01));
    let mut sched = acc.prepare_scheduler(
        Schedule::Linear {
            warmup: 2,
            total: 40,
        },
        &opt,
    );
    let mut train =
        |acc: &mut Accelerator, sched: &mut hasten::AcceleratedScheduler, steps: usize| -> Check {
            for _ in 0..steps {
                opt.zero_grad();
                let out = model.forward(&mine).map_err(err)?.dropout(0.3, true);
                let loss = out.mse_loss(&targets, hasten::tch::Reduction::Mean);
                acc.backward(&loss).map_err(err)?;
                opt.step().map_err(err)?;
                sched.step();
            }
            Ok(())
        };
    for _ in 0..3 {
        train(acc, &mut sched, 2)?;
        acc.save_state(None).map_err(err)?;
    }
    let saved = weights_of(acc, &model);
    train(acc, &mut sched, 3)?;
    let continued = weights_of(acc, &model);
    let (lr, steps) = (sched.lr(), sched.last_step());
    let dir = acc.load_state(None).map_err(err)?;
    let checkpoints = project.join("checkpoints");
    if dir != checkpoints.join("checkpoint_2")
        || checkpoints.join("checkpoint_0").exists()
        || !checkpoints.join("checkpoint_1").is_dir()
        || acc.project_config().iteration != 3
    {
        return Err(format!(
            "loaded {}, iteration {}; want checkpoint_2 of 1 and 2 (total_limit) and iteration 3",
            dir.display(),
            acc.project_config().iteration
        ));
    }
    identical(&weights_of(acc, &model), &saved, "weights after load_state")?;
    train(acc, &mut sched, 3)?;
    identical(
        &weights_of(acc, &model),
        &continued,
        "weights after resuming",
    )?;
    if sched.lr() != lr || sched.last_step() != steps {
        return Err(format!(
            "scheduler at {} / lr {} after resuming, want {steps} / {lr}",
            sched.last_step(),
            sched.lr()
        ));
    }
    // Damaged copies (one per rank): errors naming the file or key, and the model untouched.
    let bad = project.join(format!("bad_{r}"));
    std::fs::create_dir_all(&bad).map_err(err)?;
    for entry in std::fs::read_dir(&dir).map_err(err)? {
        let path = entry.map_err(err)?.path();
        std::fs::copy(&path, bad.join(path.file_name().unwrap_or_default())).map_err(err)?;
    }
    let weights = bad.join("model.safetensors");
    let len = std::fs::metadata(&weights).map_err(err)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .and_then(|f| f.set_len(len / 2))
        .map_err(err)?;
    let before = weights_of(acc, &model);
    match acc.load_state(Some(&bad)) {
        Err(e) if e.to_string().contains("model.safetensors") => {}
        other => return Err(format!("a truncated model.safetensors loaded as {other:?}")),
    }
    let state = bad.join(hasten::accelerator::ACCELERATOR_STATE_NAME);
    let text = std::fs::read_to_string(&state).map_err(err)?;
    std::fs::write(&state, text.replace("\"models\": 1", "\"models\": 2")).map_err(err)?;
    match acc.load_state(Some(&bad)) {
        Err(e) if e.to_string().contains("\"models\"") => {}
        other => return Err(format!("a checkpoint of 2 models loaded as {other:?}")),
    }
    identical(
        &weights_of(acc, &model),
        &before,
        "weights after failed loads",
    )
}

/// After synchronize_rng_states every rank draws what rank 0 draws (hasten's and libtorch's generators),
/// though each was seeded differently.
fn rng(acc: &mut Accelerator) -> Check {
    use hasten::rand::RngCore;
    // On a GPU the GPU's generator draws too.
    let gpu = acc.device();
    let draw = || {
        let host = hasten::random::host_rng().next_u32() as f32;
        Tensor::cat(
            &[
                Tensor::randn([3], (Kind::Float, Device::Cpu)),
                Tensor::randn([2], (Kind::Float, gpu)).to_device(Device::Cpu),
                Tensor::from_slice(&[host]),
            ],
            0,
        )
        .view([1, 6])
    };
    let rows = |acc: &mut Accelerator| -> Result<Vec<Tensor>, String> {
        let mine = draw().to_device(acc.device());
        Ok(acc
            .gather(mine)
            .map_err(err)?
            .to_device(Device::Cpu)
            .unbind(0))
    };
    hasten::set_seed(1000 + acc.process_index() as u64, false).map_err(err)?;
    let before = rows(acc)?;
    if before.iter().skip(1).all(|r| r.equal(&before[0])) {
        return Err("differently seeded ranks drew the same numbers".into());
    }
    acc.synchronize_rng_states().map_err(err)?;
    let after = rows(acc)?;
    match after.iter().position(|r| !r.equal(&after[0])) {
        Some(i) => Err(format!(
            "rank {i} drew {} after synchronising, rank 0 {}",
            after[i], after[0]
        )),
        None => Ok(()),
    }
}

/// gather_for_metrics covers the dataset exactly, although the last batches repeat samples.
fn metrics(acc: &mut Accelerator) -> Check {
    let dl = loader(acc, 21, 4)?;
    let mut seen = Vec::new();
    for batch in dl.iter().map_err(err)? {
        let labels = batch.map_err(err)?.remove(1);
        let all = acc.gather_for_metrics(labels).map_err(err)?;
        seen.extend(Vec::<i64>::try_from(&all).map_err(err)?);
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    if sorted != (0..21).collect::<Vec<_>>() {
        return Err(format!(
            "gathered {} labels {seen:?}, want each of 0..21 once",
            seen.len()
        ));
    }
    let mut total = Tensor::from(seen.len() as f32);
    acc.group()
        .all_reduce(&mut total, ReduceOp::Max)
        .map_err(err)?;
    Ok(())
}

/// The same for an iterable dataset of known length, its batches dispatched from process 0 or not.
fn metrics_iterable(acc: &mut Accelerator, dispatched: bool) -> Check {
    struct Labels;
    impl hasten::data::IterableDataset for Labels {
        type Item = i64;
        fn iter(&self, _epoch: u64) -> Box<dyn Iterator<Item = i64> + Send + '_> {
            Box::new(0..21)
        }
        fn known_len(&self) -> Option<usize> {
            Some(21)
        }
    }
    let dl = acc
        .prepare_iterable_data_loader(hasten::data::IterableDataLoader::new(Labels, 4))
        .map_err(err)?;
    if dl.dispatches() != dispatched {
        return Err(format!(
            "dispatches: {}, want {dispatched}",
            dl.dispatches()
        ));
    }
    // The group handle is kept across the loader's steps, which run their own collectives on the same
    // group (a lock guard kept like this made the process wait on itself).
    let group = acc.group().clone();
    let mut seen = Vec::new();
    let mut steps = 0usize;
    for batch in dl.iter().map_err(err)? {
        let all = acc.gather_for_metrics(batch.map_err(err)?).map_err(err)?;
        seen.extend(Vec::<i64>::try_from(&all).map_err(err)?);
        steps += group.all_gather_object(&1usize).map_err(err)?.len();
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    if sorted != (0..21).collect::<Vec<_>>() {
        return Err(format!(
            "gathered {} labels {seen:?}, want each of 0..21 once",
            seen.len()
        ));
    }
    if steps % acc.num_processes() != 0 || steps == 0 {
        return Err(format!("{steps} answers to the per-step all_gather_object"));
    }
    Ok(())
}

/// Batches dispatched from process 0 (map-style, `dispatch_batches: Some(true)`): each rank's slices are
/// Accelerate's (worked out by hand from `DataLoaderDispatcher.__iter__` for 21 samples in batches of 4),
/// `len` agrees, and gather_for_metrics still returns the dataset exactly (skip_first_batches: the
/// `loaders` check).
fn dispatch(acc: &mut Accelerator) -> Check {
    let (p, rank) = (acc.num_processes(), acc.process_index());
    let want: Vec<Vec<i64>> = match (p, rank) {
        // Steps of 2 batches (8 samples); the last step has 5: 3 each, completed with samples 0, 1.
        (2, 0) => vec![(0..4).collect(), (8..12).collect(), vec![16, 17, 18]],
        (2, 1) => vec![(4..8).collect(), (12..16).collect(), vec![19, 20, 0]],
        // Steps of 3 batches (12 samples); the last step has 9: 3 each.
        (3, r) => {
            let r = r as i64;
            vec![
                (4 * r..4 * r + 4).collect(),
                (12 + 3 * r..15 + 3 * r).collect(),
            ]
        }
        _ => return Err(format!("no expectation for {p} processes")),
    };
    let dl = loader(acc, 21, 4)?;
    if !dl.dispatches() || dl.len() != want.len() {
        return Err(format!(
            "dispatches: {}, len {} (want {})",
            dl.dispatches(),
            dl.len(),
            want.len()
        ));
    }
    let mut got = Vec::new();
    for batch in dl.iter().map_err(err)? {
        let batch = batch.map_err(err)?;
        // The features came along with the labels, row for row.
        let features = Vec::<f32>::try_from(&batch[0].select(1, 7)).map_err(err)?;
        let labels = Vec::<i64>::try_from(&batch[1]).map_err(err)?;
        if features.iter().zip(&labels).any(|(f, l)| *f != *l as f32) {
            return Err(format!(
                "features {features:?} do not match labels {labels:?}"
            ));
        }
        got.push(labels);
    }
    if got != want {
        return Err(format!("rank {rank} got {got:?}, want {want:?}"));
    }
    metrics(acc)?;
    // Process 0's loader failing stops every process with its message instead of leaving them waiting.
    let labels = Tensor::arange(21, (Kind::Int64, Device::Cpu));
    let ds = TensorDataset::new(vec![labels]).map_err(err)?;
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let failing = DataLoader::new(ds, 4).collate_fn(move |items: Vec<Vec<Tensor>>| {
        if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 3 {
            return Err(hasten::Error::InvalidValue {
                name: "sample".into(),
                detail: "unreadable record 13".into(),
            });
        }
        <Vec<Tensor> as hasten::data::Collate>::collate(items)
    });
    let dl = acc.prepare_data_loader(failing).map_err(err)?;
    let outcome: Result<Vec<_>, _> = dl.iter().map_err(err)?.collect();
    match outcome {
        Err(e)
            if e.to_string().contains("process 0's data loader failed")
                && e.to_string().contains("unreadable record 13") =>
        {
            Ok(())
        }
        other => Err(format!(
            "a failing loader on process 0 gave {:?}",
            other.map(|v| v.len())
        )),
    }
}

/// `rng_types`: with `torch`, starting an epoch copies process 0's CPU generator to every rank (ranks seeded
/// differently draw alike afterwards); with the default (`generator`) nothing is synchronised.
fn rng_types(acc: &mut Accelerator, synced: bool) -> Check {
    hasten::set_seed(5, true).map_err(err)?; // offset by the rank
    let draws = |acc: &mut Accelerator| -> Result<bool, String> {
        let mine =
            Vec::<f32>::try_from(Tensor::randn([4], (Kind::Float, Device::Cpu))).map_err(err)?;
        let all = acc.group().all_gather_object(&mine).map_err(err)?;
        Ok(all.iter().all(|d| *d == all[0]))
    };
    if draws(acc)? {
        return Err("ranks seeded differently drew alike".into());
    }
    let dl = loader(acc, 8, 2)?;
    let first = dl.iter().map_err(err)?.next();
    if first.is_none() {
        return Err("no batch".into());
    }
    match draws(acc)? {
        same if same == synced => Ok(()),
        same => Err(format!(
            "after the epoch started, ranks drew alike: {same}, want {synced}"
        )),
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "save-loop" {
        let dir = std::env::args().nth(2).unwrap_or_default();
        let kind = std::env::args().nth(3).unwrap_or_default();
        if let Err(e) = crash::save_loop(std::path::Path::new(&dir), &kind) {
            eprintln!("save-loop: {e}");
            std::process::exit(1);
        }
        return;
    }
    // HASTEN_TEST_GPU=1 runs `rng` and `checkpoint` on GPUs instead (on the GPU machine).
    let gpu = std::env::var("HASTEN_TEST_GPU").is_ok_and(|v| v == "1");
    let builder = Accelerator::builder().cpu(!gpu);
    let builder = match mode.as_str() {
        "accumulate" => builder.gradient_accumulation_steps(3),
        "fsdp" | "fsdp_blocks" => builder.gradient_accumulation_steps(2),
        "dataloader_end" | "scheduler" => {
            builder.gradient_accumulation_plugin(GradientAccumulationPlugin {
                num_steps: 2,
                ..GradientAccumulationPlugin::default()
            })
        }
        "ddp_buckets" | "ddp_unused" | "ddp_unused_refused" => {
            builder.ddp_kwargs(DistributedDataParallelKwargs {
                // 100 bytes: one bucket per parameter, so buckets complete one by one during the backward.
                bucket_cap_mb: 100.0 / (1024.0 * 1024.0),
                find_unused_parameters: mode == "ddp_unused",
                ..DistributedDataParallelKwargs::default()
            })
        }
        "checkpoint" => builder.project_config(hasten::ProjectConfiguration {
            project_dir: std::env::args().nth(2).map(Into::into),
            automatic_checkpoint_naming: true,
            total_limit: Some(2),
            ..Default::default()
        }),
        "dispatch" | "metrics_iterable_shard" => {
            builder.dataloader_config(hasten::DataLoaderConfiguration {
                dispatch_batches: Some(mode == "dispatch"),
                ..Default::default()
            })
        }
        "rng_types" => builder.rng_types(vec![hasten::utils::RNGType::Torch]),
        "tracking" => {
            let dir = std::path::PathBuf::from(std::env::args().nth(2).unwrap_or_default());
            let rank = std::env::var("RANK").unwrap_or_default();
            builder
                .project_config(hasten::ProjectConfiguration {
                    project_dir: Some(dir.clone()),
                    ..Default::default()
                })
                .log_with(vec![
                    hasten::utils::LoggerType::Tensorboard,
                    hasten::utils::LoggerType::Wandb,
                ])
                .tracker(tracking::LinesTracker::new(
                    dir.join(format!("custom_rank{rank}.txt")),
                ))
        }
        _ => builder,
    };
    let outcome = builder
        .build()
        .map_err(err)
        .and_then(|mut acc| match mode.as_str() {
            "ddp" | "ddp_buckets" => ddp(&mut acc, false),
            "ddp_unused" => ddp(&mut acc, true),
            "ddp_unused_refused" => unused_refused(&mut acc),
            "rng" => rng(&mut acc),
            "checkpoint" => {
                let project = std::env::args().nth(2).unwrap_or_default();
                checkpoint(&mut acc, std::path::Path::new(&project))
            }
            "tracking" => tracking::tracking(&mut acc),
            "accumulate" => accumulate(&mut acc),
            "fsdp" => fsdp::fsdp(&mut acc, false),
            "fsdp_blocks" => fsdp::fsdp(&mut acc, true),
            "fsdp_semantics" => fsdp::semantics(&mut acc),
            "fsdp_checkpoint" => {
                let project = std::env::args().nth(2).unwrap_or_default();
                fsdp::checkpoint(&mut acc, std::path::Path::new(&project))
            }
            "fsdp_empty" => {
                let project = std::env::args().nth(2).unwrap_or_default();
                fsdp_init::empty(&mut acc, std::path::Path::new(&project))
            }
            "fsdp_tied" => fsdp_init::tied_parameters(&mut acc),
            "dataloader_end" => dataloader_end(&mut acc),
            "scheduler" => scheduler(&mut acc),
            "metrics" => metrics(&mut acc),
            "metrics_iterable" => metrics_iterable(&mut acc, true),
            "metrics_iterable_shard" => metrics_iterable(&mut acc, false),
            "dispatch" => dispatch(&mut acc),
            "loaders" => loaders::loaders(&mut acc),
            "rng_types" => rng_types(&mut acc, true),
            "rng_types_default" => rng_types(&mut acc, false),
            other => Err(format!("unknown mode {other:?}")),
        });
    match outcome {
        Ok(()) => println!("training check {mode}: ok"),
        Err(e) => {
            println!("training check {mode}: FAILED: {e}");
            std::process::exit(1);
        }
    }
}
