//! hasten's demo: the training loop Accelerate's users write, in Rust. A classifier learns four
//! interleaved spirals; the Accelerator shards the data, averages gradients across processes,
//! accumulates micro-batches, applies mixed precision, and gathers metrics.
//!
//! - alone:                       `train_demo`
//! - on 2 CPU processes:          `hasten launch --num_processes 2 --cpu train_demo`
//! - on every GPU, in bf16:       `hasten launch --mixed_precision bf16 train_demo`
//! - from a running program:      `train_demo --notebook 2` (calls `notebook_launcher` on itself)

use hasten::data::{DataLoader, TensorDataset};
use hasten::tch::nn;
use hasten::tch::{Device, Kind, Tensor};
use hasten::{Accelerator, Schedule};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Config {
    epochs: u64,
    batch_size: usize,
    accumulation_steps: usize,
    lr: f64,
    seed: u64,
}

/// Four interleaved spiral arms in the plane (the same points on every rank: a fixed seed).
fn spirals(n: i64, seed: i64) -> hasten::Result<TensorDataset<(Tensor, Tensor)>> {
    hasten::tch::manual_seed(seed);
    let labels = Tensor::randint(4, [n], (Kind::Int64, Device::Cpu));
    let r = Tensor::rand([n], (Kind::Float, Device::Cpu)) * 0.9 + 0.1;
    let theta = labels.to_kind(Kind::Float) * (std::f64::consts::PI / 2.0)
        + &r * 4.0
        + Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.2;
    let x = Tensor::stack(&[&r * theta.cos(), &r * theta.sin()], 1);
    TensorDataset::from_tensors((x, labels))
}

fn training_loop(cfg: Config) -> hasten::Result<f64> {
    let mut acc = Accelerator::builder()
        .gradient_accumulation_steps(cfg.accumulation_steps)
        .build()?;
    acc.print(format!(
        "training on {} process(es), {:?} ({}), mixed precision {}",
        acc.num_processes(),
        acc.device(),
        acc.distributed_type(),
        acc.mixed_precision()
    ));
    let train = DataLoader::new(spirals(8192, 1)?, cfg.batch_size).shuffle(cfg.seed);
    // As with Accelerate, count the schedule in the unprepared loader's batches: the scheduler steps once
    // per process for every optimizer step.
    let total = train.len() * cfg.epochs as usize / cfg.accumulation_steps;
    let mut train = acc.prepare_data_loader(train)?;
    let test = acc.prepare_data_loader(DataLoader::new(spirals(2000, 2)?, 256))?;

    hasten::set_seed(cfg.seed, false)?;
    let vs = nn::VarStore::new(acc.device());
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "fc1", 2, 128, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "fc2", 128, 128, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "fc3", 128, 4, Default::default()));
    // The prepared model owns the network and its variables: same weights on every rank, gradients
    // averaged in the backward, its forward under mixed precision with fp32 logits.
    let model = acc.prepare_model(net, vs)?;
    let mut opt = acc.prepare_optimizer(hasten::optim::AdamW::new(model.var_store(), cfg.lr));
    let mut sched = acc.prepare_scheduler(
        Schedule::Cosine {
            warmup: total / 10,
            total,
            cycles: 0.5,
        },
        &opt,
    );

    let mut accuracy = 0.0;
    for epoch in 1..=cfg.epochs {
        train.set_epoch(epoch);
        let mut loss_sum = 0.0;
        let mut batches = 0;
        for batch in train.iter()? {
            let (x, y) = batch?;
            acc.accumulate(); // this micro-batch; gradients sync every `accumulation_steps`
            let loss = model.forward(&x)?.cross_entropy_for_logits(&y);
            acc.backward(&loss)?;
            if acc.sync_gradients() {
                acc.clip_grad_norm_(&model, 1.0, 2.0)?;
            }
            opt.step()?; // only on synchronising micro-batches; skipped on fp16 overflow
            sched.step();
            opt.zero_grad();
            loss_sum += loss.double_value(&[]);
            batches += 1;
        }
        let (mut correct, mut seen) = (0i64, 0i64);
        for batch in test.iter()? {
            let (x, labels) = batch?;
            let predictions = hasten::tch::no_grad(|| model.forward(&x))?.argmax(-1, false);
            let (predictions, labels) = acc.gather_for_metrics((predictions, labels))?;
            correct += predictions
                .eq_tensor(&labels)
                .sum(Kind::Int64)
                .int64_value(&[]);
            seen += labels.size()[0];
        }
        accuracy = correct as f64 / seen as f64;
        let mean_loss = acc.reduce(
            Tensor::from(loss_sum / batches.max(1) as f64),
            hasten::Reduction::Mean,
            1.0,
        )?;
        acc.print(format!(
            "epoch {epoch}: loss {:.4}, test accuracy {:.1}% ({correct} of {seen} samples), lr {:.2e}",
            mean_loss.double_value(&[]),
            100.0 * accuracy,
            opt.lr()
        ));
    }
    acc.wait_for_everyone()?;
    Ok(accuracy)
}

fn main() {
    let cfg = Config {
        epochs: 5,
        batch_size: 32,
        accumulation_steps: 2,
        lr: 3e-3,
        seed: 42,
    };
    let args: Vec<String> = std::env::args().collect();
    let outcome = match args.iter().position(|a| a == "--notebook") {
        Some(i) => {
            let n = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(2);
            hasten_launch::notebook_launcher(training_loop, cfg, n)
                .map(|acc| {
                    println!(
                        "notebook_launcher returned the main rank's accuracy: {:.3}",
                        acc
                    )
                })
                .map_err(|e| e.to_string())
        }
        None => training_loop(cfg).map(drop).map_err(|e| e.to_string()),
    };
    if let Err(e) = outcome {
        eprintln!("train_demo: {e}");
        std::process::exit(1);
    }
}
