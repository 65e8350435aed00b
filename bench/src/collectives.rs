//! C1 and C2, run under `hasten launch`: all-reduce bus bandwidth of bf16 tensors (1 MiB, 64 MiB, 1 GiB;
//! 5 warm-up, 20 timed) and the latency of `gather` on a 4-element tensor (100 calls).

#[path = "report.rs"]
mod report;

use hasten::tch::{Cuda, Device, Kind, Tensor};
use hasten::{ProcessGroup, ProcessState, ReduceOp};
use serde_json::json;
use std::time::Instant;

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        Cuda::synchronize(i as i64);
    }
}

fn main() -> Result<(), hasten::Error> {
    let state = ProcessState::from_env()?;
    let mut group = ProcessGroup::init(&state)?;
    let device = state.device;
    let n = group.world_size() as f64;
    for nbytes in [1usize << 20, 64 << 20, 1 << 30] {
        let mut t = Tensor::ones([(nbytes / 2) as i64], (Kind::BFloat16, device));
        for _ in 0..5 {
            group.all_reduce(&mut t, ReduceOp::Sum)?;
        }
        sync(device);
        let iters = 20;
        let start = Instant::now();
        for _ in 0..iters {
            group.all_reduce(&mut t, ReduceOp::Sum)?;
        }
        sync(device);
        let el = start.elapsed().as_secs_f64() / iters as f64;
        if state.is_main_process() {
            report::emit(json!({
                "part": format!("allreduce_bf16_{nbytes}"),
                "time_us": el * 1e6,
                "busbw_GBps": 2.0 * (n - 1.0) / n * nbytes as f64 / el / 1e9,
            }));
        }
    }
    let x = Tensor::ones([4], (Kind::Float, device));
    for _ in 0..10 {
        let _ = group.gather(x.shallow_clone())?;
    }
    sync(device);
    group.barrier()?;
    let start = Instant::now();
    for _ in 0..100 {
        let _ = group.gather(x.shallow_clone())?;
    }
    sync(device);
    if state.is_main_process() {
        report::emit(
            json!({"part": "gather_small_us", "value": start.elapsed().as_secs_f64() / 100.0 * 1e6}),
        );
    }
    Ok(())
}
