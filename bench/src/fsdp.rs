//! F1/F2 of shared/bench/WORKLOADS.md, hasten's side of `py_fsdp.py`: `bench-fsdp fsdp|ddp BLOCKS
//! [STEPS]` under `hasten launch --num_processes N`. Model: BLOCKS residual blocks
//! `x + down(gelu(up(layernorm(x))))`, d=4096, h=16384, each a `hasten::layers::Block`, then
//! Linear(d, d); batch 4 × seq 512 × d random, MSE (fp32) to a random target; AdamW lr 1e-4; bf16 mixed
//! precision; 3 warm-up steps. FSDP: FULL_SHARD, one unit per Block (`transformer_cls_names_to_wrap`
//! = Block), reshard after forward, as py_fsdp.py asks Accelerate's FSDP2. Prints one BENCH line;
//! `--losses` adds every step's loss (read each step, so its timing is not a figure). `--empty` builds
//! the model under `init_empty_weights`, so prepare materialises each rank's shard only; the line then
//! says how much GPU memory (peak) and host memory (peak resident set) the start took per rank. `--ac`
//! switches on activation checkpointing (every block recomputed in its backward), `--offload` CPU
//! offload (shards, gradients and AdamW on the host), `--hybrid` HYBRID_SHARD (sharded within each
//! machine of the launch, replicated across machines).

#[path = "report.rs"]
mod report;

use hasten::accelerator::fsdp::{AutoWrapPolicy, ShardingStrategy};
use hasten::layers::{self, Block};
use hasten::optim::AdamW;
use hasten::tch::nn::{self, Module};
use hasten::tch::{Cuda, Device, Kind, Tensor};
use hasten::{Accelerator, FullyShardedDataParallelPlugin, PrecisionType};
use serde_json::json;

const D: i64 = 4096;
const H: i64 = 16384;

#[derive(Debug)]
struct Inner {
    ln: layers::LayerNorm,
    up: layers::Linear,
    down: layers::Linear,
}

impl Module for Inner {
    fn forward(&self, x: &Tensor) -> Tensor {
        x + self
            .down
            .forward(&self.up.forward(&self.ln.forward(x)).gelu("none"))
    }
}

#[derive(Debug)]
struct ModelF {
    blocks: Vec<Block<Inner>>,
    out: layers::Linear,
}

impl Module for ModelF {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self
            .blocks
            .iter()
            .fold(x.shallow_clone(), |h, b| b.forward(&h));
        self.out.forward(&h)
    }
}

fn model_f(root: &nn::Path, blocks: i64) -> ModelF {
    ModelF {
        blocks: (0..blocks)
            .map(|i| {
                let p = root / i;
                let inner = Inner {
                    ln: layers::layer_norm(&(&p / "ln"), &[D]),
                    up: layers::linear(&(&p / "up"), D, H, true),
                    down: layers::linear(&(&p / "down"), H, D, true),
                };
                Block::new(&p, inner)
            })
            .collect(),
        out: layers::linear(&(root / blocks), D, D, true),
    }
}

/// This process's peak resident set (VmHWM), in GB; 0 where /proc does not say.
fn host_peak_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb * 1e3 / 1e9)
}

fn main() -> hasten::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "fsdp".into());
    let blocks: i64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(8);
    let steps: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10);
    let warm = 3;
    let with_losses = args.iter().any(|a| a == "--losses");
    let empty = args.iter().any(|a| a == "--empty");
    let checkpointing = args.iter().any(|a| a == "--ac");
    let offload = args.iter().any(|a| a == "--offload");
    let hybrid = args.iter().any(|a| a == "--hybrid");
    let mut builder = Accelerator::builder().mixed_precision(PrecisionType::Bf16);
    if mode == "fsdp" {
        builder = builder.fsdp_plugin(FullyShardedDataParallelPlugin {
            fsdp_version: 2,
            sharding_strategy: if hybrid {
                ShardingStrategy::HybridShard
            } else {
                ShardingStrategy::FullShard
            },
            auto_wrap_policy: AutoWrapPolicy::TransformerBasedWrap(vec!["Block".into()]),
            activation_checkpointing: checkpointing,
            cpu_offload: offload,
            ..FullyShardedDataParallelPlugin::default()
        });
    }
    let mut acc = builder.build()?;
    let device = acc.device();
    let index = match device {
        Device::Cuda(i) => i as i64,
        _ => 0,
    };
    hasten::tch::manual_seed(0);
    let t_build = report::now();
    let vs = nn::VarStore::new(device);
    let net = if empty {
        layers::init_empty_weights(|| model_f(&vs.root(), blocks))
    } else {
        model_f(&vs.root(), blocks)
    };
    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    let part = format!(
        "{mode}{}_F{blocks}_np{}",
        if hybrid { "_hybrid" } else { "" },
        acc.num_processes()
    );
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> hasten::Result<serde_json::Value> {
            let model = acc.prepare_model(net, vs)?;
            let mut opt = acc.prepare_optimizer(AdamW::new(model.var_store(), 1e-4));
            let build_s = report::now() - t_build;
            let start_peak = hasten::memory::max_memory_allocated(device).unwrap_or(0) as f64 / 1e9;
            let start_peaks = acc.group().all_gather_object(&start_peak)?;
            let host_peaks = acc.group().all_gather_object(&host_peak_gb())?;
            let x = Tensor::randn([4, 512, D], (Kind::Float, device));
            let y = Tensor::randn([4, 512, D], (Kind::Float, device));
            hasten::memory::reset_peak_memory_stats(device);
            let mut start = report::now();
            let mut loss = 0.0;
            let mut losses = Vec::new();
            let mut phase_peaks: Vec<(String, f64)> = Vec::new();
            let mut phase_ms: Vec<(String, f64)> = Vec::new();
            let mut phase_start = report::now();
            for i in 0..warm + steps {
                if i == warm {
                    Cuda::synchronize(index);
                    start = report::now();
                }
                // Warm-up step 1 also says where the peak is (forward, backward or optimizer step) and
                // how long each phase takes with the GPU drained at its end (not a figure: the
                // synchronisations stop the overlap between phases).
                let phases = i == 1;
                let mut phase = |name: &str| {
                    if phases {
                        Cuda::synchronize(index);
                        let now = report::now();
                        phase_ms.push((name.to_owned(), (now - phase_start) * 1e3));
                        phase_start = now;
                        let gb =
                            hasten::memory::max_memory_allocated(device).unwrap_or(0) as f64 / 1e9;
                        phase_peaks.push((name.to_owned(), gb));
                        hasten::memory::reset_peak_memory_stats(device);
                    }
                };
                phase("before");
                opt.zero_grad();
                let out = model.forward(&x)?;
                let l = out.mse_loss(&y, hasten::tch::Reduction::Mean);
                phase("forward");
                acc.backward(&l)?;
                phase("backward");
                opt.step()?;
                phase("step");
                if with_losses {
                    losses.push(l.double_value(&[]));
                }
                if i + 1 == warm + steps {
                    loss = l.double_value(&[]);
                }
            }
            Cuda::synchronize(index);
            let elapsed = report::now() - start;
            let peak = hasten::memory::max_memory_allocated(device).unwrap_or(0) as f64 / 1e9;
            let peaks = acc.group().all_gather_object(&peak)?;
            Ok(json!({
                "part": part,
                "distributed_type": format!("{:?}", acc.distributed_type()),
                "params": params,
                "steps_per_s": steps as f64 / elapsed,
                "tokens_per_s_global": (steps * 4 * 512 * acc.num_processes()) as f64 / elapsed,
                "loss": loss,
                "peak_gpu_GB": peaks.iter().copied().fold(0.0, f64::max),
                "peak_gpu_GB_per_rank": peaks,
                "build_s": build_s,
                "empty_weights": empty,
                "activation_checkpointing": checkpointing,
                "cpu_offload": offload,
                "start_peak_gpu_GB_per_rank": start_peaks,
                "host_peak_rss_GB_per_rank": host_peaks,
                "losses": losses,
                "phase_peaks_GB_rank0": phase_peaks,
                "phase_ms_rank0": phase_ms,
            }))
        },
    ));
    match outcome {
        Ok(Ok(value)) => {
            if acc.is_main_process() {
                report::emit(value);
            }
            Ok(())
        }
        Ok(Err(e)) if hasten::memory::is_out_of_memory(&e) => {
            report::emit(
                json!({"part": part, "oom": true, "params": params, "error": e.to_string()}),
            );
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            if hasten::memory::should_reduce_batch_size(&text) {
                report::emit(
                    json!({"part": part, "oom": true, "params": params, "error": text.lines().next()}),
                );
                return Ok(());
            }
            std::panic::resume_unwind(panic)
        }
    }
}
