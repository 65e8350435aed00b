//! S1/S2 and M1/M2 of shared/bench/WORKLOADS.md, run under `hasten launch --num_processes 1|2`:
//! `bench-train S|M [--init FILE] [--steps N] [--warmup N] [--losses] [--rank-data]`.
//!
//! With `--init FILE` the model's weights and the batch come from a safetensors file (written by
//! `bench-train M --write-init FILE` and read by `py_train.py` too), so both sides start equal and their
//! loss curves can be compared step by step (`--losses` prints every step's loss).
//!
//! The models use `hasten::layers` (torch.nn's layers: one `aten::linear` per Linear) and hasten's fused
//! optimizers; `--tch` builds them from tch's `nn::linear` (matmul + add) and tch's SGD instead
//! (`--tch-layers`, `--tch-opt`: one of the two), to measure what those choices cost.

#[path = "report.rs"]
mod report;

use hasten::tch::nn::{self, Module};
use hasten::tch::{Cuda, Device, Kind, Tensor};
use hasten::{Accelerator, PrecisionType, layers};
use serde_json::json;
use std::time::Instant;

/// A Linear layer: torch.nn's (hasten::layers) or tch's. With `--mm`, hasten's layer computed as
/// tch's is (matmul, then add the bias), to tell the forward apart from the initialisation.
fn dense(p: nn::Path, i: i64, o: i64, tch_layers: bool) -> Box<dyn Module> {
    if tch_layers {
        Box::new(nn::linear(p, i, o, Default::default()))
    } else if std::env::args().any(|a| a == "--mm") {
        let l = layers::linear(&p, i, o, true);
        Box::new(nn::func(move |x| {
            x.matmul(&l.ws.tr()) + l.bs.as_ref().expect("with bias")
        }))
    } else {
        Box::new(layers::linear(&p, i, o, true))
    }
}

fn model_s(root: &nn::Path, tch_layers: bool) -> nn::Sequential {
    let (a, b, c) = (
        dense(root / "0", 784, 512, tch_layers),
        dense(root / "2", 512, 512, tch_layers),
        dense(root / "4", 512, 10, tch_layers),
    );
    nn::seq()
        .add_fn(move |x| a.forward(x).relu())
        .add_fn(move |x| b.forward(x).relu())
        .add_fn(move |x| c.forward(x))
}

/// `x + down(gelu(up(layernorm(x))))`, named like the Python Block (`ln`, `up`, `down`).
fn block(p: &nn::Path, d: i64, h: i64, tch_layers: bool) -> nn::Func<'static> {
    let ln: Box<dyn Module> = if tch_layers {
        Box::new(nn::layer_norm(p / "ln", vec![d], Default::default()))
    } else {
        Box::new(layers::layer_norm(&(p / "ln"), &[d]))
    };
    let up = dense(p / "up", d, h, tch_layers);
    let down = dense(p / "down", h, d, tch_layers);
    nn::func(move |x| x + down.forward(&up.forward(&ln.forward(x)).gelu("none")))
}

fn model_m(root: &nn::Path, tch_layers: bool) -> nn::Sequential {
    let (d, h) = (2048, 8192);
    let mut seq = nn::seq();
    for i in 0..8 {
        seq = seq.add(block(&(root / i.to_string()), d, h, tch_layers));
    }
    let last = dense(root / "8", d, d, tch_layers);
    seq.add_fn(move |x| last.forward(x))
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        Cuda::synchronize(i as i64);
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).cloned().unwrap_or_else(|| "S".into());
    let is_m = kind == "M";
    let flag = |name: &str| args.iter().any(|a| a == name);
    let tch_layers = flag("--tch") || flag("--tch-layers");
    let tch_opt = flag("--tch") || flag("--tch-opt");
    let mut acc = Accelerator::builder()
        .mixed_precision(if is_m {
            PrecisionType::Bf16
        } else {
            PrecisionType::No
        })
        .build()?;
    let device = acc.device();
    hasten::tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = if is_m {
        model_m(&vs.root(), tch_layers)
    } else {
        model_s(&vs.root(), tch_layers)
    };
    let (x, y) = if is_m {
        (
            Tensor::randn([16, 256, 2048], (Kind::Float, device)),
            Tensor::randn([16, 256, 2048], (Kind::Float, device)),
        )
    } else {
        (
            Tensor::randn([128, 784], (Kind::Float, device)),
            Tensor::randint(10, [128], (Kind::Int64, device)),
        )
    };
    if let Some(path) = arg(&args, "--write-init") {
        // Weights and batch for both sides of the loss-curve comparison.
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu)))
            .collect();
        named.push(("data.x".into(), x.to_device(Device::Cpu)));
        named.push(("data.y".into(), y.to_device(Device::Cpu)));
        Tensor::write_safetensors(&named, &path)?;
        println!("wrote {} tensors to {path}", named.len());
        return Ok(());
    }
    let (x, y) = match arg(&args, "--init") {
        Some(path) => {
            let loaded: std::collections::HashMap<String, Tensor> =
                Tensor::read_safetensors(&path)?.into_iter().collect();
            hasten::tch::no_grad(|| {
                for (name, mut var) in vs.variables() {
                    var.copy_(&loaded[&name]);
                }
            });
            (
                loaded["data.x"].to_device(device),
                loaded["data.y"].to_device(device),
            )
        }
        None => (x, y),
    };
    // --rank-data: each rank its own inputs (scaled by 1 + rank/2), so the averaged gradients differ
    // from every rank's own and a synchronisation race would show in the loss curve.
    let x = if flag("--rank-data") {
        &x * (1.0 + 0.5 * acc.process_index() as f64)
    } else {
        x
    };
    let model = acc.prepare_model(net, vs)?;
    let vs = model.var_store();
    let lr = if is_m { 1e-4 } else { 1e-2 };
    let mut opt = if is_m {
        acc.prepare_optimizer(hasten::optim::AdamW::new(vs, lr))
    } else if tch_opt {
        acc.prepare_optimizer(hasten::optim::TchOptimizer::build(
            nn::Sgd::default(),
            vs,
            lr,
        )?)
    } else {
        acc.prepare_optimizer(hasten::optim::Sgd::new(vs, lr))
    };
    let warmup: usize = arg(&args, "--warmup")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if is_m { 5 } else { 30 });
    let steps: usize = arg(&args, "--steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if is_m { 30 } else { 300 });
    let print_losses = args.iter().any(|a| a == "--losses");
    let mut start = Instant::now();
    let mut last_loss = 0.0;
    let mut losses = Vec::new();
    for i in 0..warmup + steps {
        if i == warmup {
            sync(device);
            start = Instant::now();
        }
        opt.zero_grad();
        // Under bf16 for M, with the output back in fp32 (the prepared model's forward).
        let loss = if is_m {
            model
                .forward(&x)?
                .mse_loss(&y, hasten::tch::Reduction::Mean)
        } else {
            model.forward(&x)?.cross_entropy_for_logits(&y)
        };
        acc.backward(&loss)?;
        opt.step()?;
        if print_losses {
            losses.push(loss.double_value(&[]));
        }
        if i + 1 == warmup + steps {
            last_loss = loss.double_value(&[]);
        }
    }
    sync(device);
    let elapsed = start.elapsed().as_secs_f64();
    if acc.is_main_process() {
        let per = if is_m { 16 * 256 } else { 128 };
        let n = acc.num_processes();
        report::emit(json!({
            "part": format!(
                "ddp_{kind}_np{n}{}{}{}",
                if tch_layers { "_tchlayers" } else { "" },
                if flag("--mm") { "_mm" } else { "" },
                if tch_opt { "_tchsgd" } else { "" }
            ),
            "steps_per_s": steps as f64 / elapsed,
            "items_per_s_global": (steps * per * n) as f64 / elapsed,
            "loss": last_loss,
            "params": vs.trainable_variables().iter().map(|t| t.numel()).sum::<usize>(),
        }));
        if print_losses {
            report::emit(json!({"part": format!("losses_{kind}_np{n}"), "losses": losses}));
        }
    }
    Ok(())
}
