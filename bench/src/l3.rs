//! L3: `notebook_launcher(fn, args, N)` until every rank has finished its first DDP training step of
//! model S (prepare, forward, backward with the gradient all-reduce over NCCL, optimizer step), as
//! `py_l3.py` does; then until the call returns. Also reports when each phase ended (the slowest rank's
//! time) and that the gradients went through NCCL.

#[path = "report.rs"]
mod report;

use hasten::tch::nn::{self, Module};
use hasten::tch::{Cuda, Device, Kind, Tensor};
use hasten::{Accelerator, ReduceOp, layers};
use serde_json::json;

fn first_step(t0: f64) -> Result<f64, hasten::Error> {
    let entered = report::now() - t0;
    let mut acc = Accelerator::builder().build()?;
    let device = acc.device();
    let built = report::now() - t0;
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let (a, b, c) = (
        layers::linear(&(&root / "0"), 784, 512, true),
        layers::linear(&(&root / "2"), 512, 512, true),
        layers::linear(&(&root / "4"), 512, 10, true),
    );
    let net = nn::seq()
        .add_fn(move |x| a.forward(x).relu())
        .add_fn(move |x| b.forward(x).relu())
        .add_fn(move |x| c.forward(x));
    let model = acc.prepare_model(net, vs)?;
    let mut opt = acc.prepare_optimizer(hasten::optim::Sgd::new(model.var_store(), 1e-2));
    let prepared = report::now() - t0;
    let x = Tensor::randn([128, 784], (Kind::Float, device));
    let y = Tensor::randint(10, [128], (Kind::Int64, device));
    let loss = model.forward(&x)?.cross_entropy_for_logits(&y);
    acc.backward(&loss)?;
    opt.step()?;
    if let Device::Cuda(i) = device {
        Cuda::synchronize(i as i64);
    }
    let done = report::now() - t0;
    // The slowest rank decides: the max over ranks of each phase's end.
    let mut phases = Tensor::from_slice(&[entered, built, prepared, done]);
    let group = acc.group();
    // A gradient bucket this large never goes over TCP (see distributed/lazy.rs): with NCCL in the
    // group, the step's all-reduce went through it.
    let grad_bytes: usize = model.parameters().iter().map(|t| t.numel() * 4).sum();
    let uses_nccl = group.uses_nccl();
    group.all_reduce(&mut phases, ReduceOp::Max)?;
    let p = Vec::<f64>::try_from(&phases).unwrap_or_default();
    if acc.is_main_process() {
        report::emit(json!({
            "part": "launch_first_ddp_step_s", "value": p[3], "processes": acc.num_processes(),
            "device": format!("{device:?}"), "uses_nccl": uses_nccl, "grad_bytes": grad_bytes,
            "phases_s": {"worker_started": p[0], "accelerator_built": p[1], "prepared": p[2]},
        }));
    }
    Ok(p[3])
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    // Python's side has imported torch (and so loaded libtorch's CUDA half) before its clock starts;
    // loading it here first is the same.
    let _ = hasten::libtorch();
    let t0 = report::now();
    match hasten_launch::NotebookLauncher::new(n)
        .use_port(0)
        .launch(first_step, t0)
    {
        Ok(_) => report::emit(
            json!({"part": "launch_first_ddp_step_total_s", "value": report::now() - t0}),
        ),
        Err(e) => {
            eprintln!("bench-l3: {e}");
            std::process::exit(1);
        }
    }
}
