//! hasten's first demo: data-parallel training of a small classifier on a synthetic task.
//!
//! Run it on two CPU processes with `hasten launch --num_processes 2 --cpu train_demo`, on every GPU
//! with `hasten launch train_demo`, or alone as a plain program. Each rank trains on its half of every
//! batch; gradients are averaged across ranks after each backward, so every rank holds the same model.

use hasten::tch::nn::{self, Module, OptimizerConfig};
use hasten::tch::{Device, Kind, Tensor};
use hasten::{ProcessGroup, ProcessState, ReduceOp};

const CLASSES: i64 = 4;
const TRAIN: i64 = 8192;
const TEST: i64 = 2048;
const GLOBAL_BATCH: i64 = 256;
const EPOCHS: usize = 5;

/// Four interleaved spiral arms in the plane; the same points on every rank (fixed seed).
fn spirals(n: i64, seed: i64) -> (Tensor, Tensor) {
    hasten::tch::manual_seed(seed);
    let labels = Tensor::randint(CLASSES, [n], (Kind::Int64, Device::Cpu));
    let r = Tensor::rand([n], (Kind::Float, Device::Cpu)) * 0.9 + 0.1;
    let theta = labels.to_kind(Kind::Float) * (2.0 * std::f64::consts::PI / CLASSES as f64)
        + &r * 4.0
        + Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.15;
    let x = Tensor::stack(&[&r * theta.cos(), &r * theta.sin()], 1);
    (x, labels)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let state = ProcessState::from_env()?;
    let (rank, world) = (state.process_index(), state.num_processes());
    let device = state.device;
    println!(
        "rank {rank}/{world} on {device:?} ({}), libtorch {}",
        state.distributed_type,
        hasten::libtorch().version.as_deref().unwrap_or("?")
    );
    let mut group = ProcessGroup::init(&state)?;

    let (x_train, y_train) = spirals(TRAIN, 1);
    let (x_test, y_test) = spirals(TEST, 2);

    // Different seeds per rank on purpose: the broadcast below must make the models identical.
    hasten::set_seed(1234, true)?;
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let model = nn::seq()
        .add(nn::linear(&root / "fc1", 2, 128, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "fc2", 128, 128, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "fc3", 128, CLASSES, Default::default()));
    let mut params = vs.trainable_variables();
    hasten::tch::no_grad(|| -> hasten::Result<()> {
        for p in params.iter_mut() {
            group.broadcast(p, 0)?;
        }
        Ok(())
    })?;
    let mut opt = nn::Adam::default().build(&vs, 3e-3)?;

    let local_batch = GLOBAL_BATCH / world as i64;
    let steps = TRAIN / GLOBAL_BATCH;
    for epoch in 1..=EPOCHS {
        hasten::tch::manual_seed(epoch as i64); // same shuffle on every rank
        let order = Tensor::randperm(TRAIN, (Kind::Int64, Device::Cpu));
        let mut loss_sum = 0.0;
        for step in 0..steps {
            // This rank's contiguous slice of the global batch.
            let start = step * GLOBAL_BATCH + rank as i64 * local_batch;
            let idx = order.narrow(0, start, local_batch);
            let xb = x_train.index_select(0, &idx).to_device(device);
            let yb = y_train.index_select(0, &idx).to_device(device);
            let loss = model.forward(&xb).cross_entropy_for_logits(&yb);
            opt.zero_grad();
            loss.backward();
            for p in &params {
                let mut g = p.grad();
                group.all_reduce(&mut g, ReduceOp::Mean)?;
            }
            opt.step();
            loss_sum += loss.double_value(&[]);
        }
        // Accuracy on the test set, each rank scoring its share.
        let share = TEST / world as i64;
        let xs = x_test
            .narrow(0, rank as i64 * share, share)
            .to_device(device);
        let ys = y_test
            .narrow(0, rank as i64 * share, share)
            .to_device(device);
        let correct = hasten::tch::no_grad(|| model.forward(&xs).argmax(-1, false).eq_tensor(&ys))
            .sum(Kind::Float)
            .to_device(Device::Cpu);
        let mut totals = Tensor::stack(&[correct, Tensor::from(share as f32)], 0);
        let mut mean_loss = Tensor::from((loss_sum / steps as f64) as f32);
        group.all_reduce(&mut totals, ReduceOp::Sum)?;
        group.all_reduce(&mut mean_loss, ReduceOp::Mean)?;
        if state.is_main_process() {
            let t = Vec::<f32>::try_from(&totals)?;
            println!(
                "epoch {epoch}: loss {:.4}, test accuracy {:.1}% ({} of {} samples, {world} ranks)",
                mean_loss.double_value(&[]),
                100.0 * t[0] / t[1],
                t[0],
                t[1]
            );
        }
    }

    // Every rank must end with the same weights: compare each against rank 0's copy.
    let mut worst = 0.0f64;
    for p in &params {
        let mut reference = p.detach().copy();
        group.broadcast(&mut reference, 0)?;
        worst = worst.max((p.detach() - reference).abs().max().double_value(&[]));
    }
    let mut worst_t = Tensor::from(worst);
    group.all_reduce(&mut worst_t, ReduceOp::Max)?;
    group.barrier()?;
    if state.is_main_process() {
        println!(
            "parameters identical on all {world} ranks: {} (largest difference {:.1e})",
            worst_t.double_value(&[]) == 0.0,
            worst_t.double_value(&[])
        );
    }
    Ok(())
}
