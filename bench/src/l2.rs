//! L2: run under `hasten launch --num_processes 2`; joins the group and does one all-reduce on its GPU.
//! `HASTEN_BENCH_T0` (seconds since the epoch, set just before the launcher started) gives the origin.

#[path = "report.rs"]
mod report;

use hasten::tch::{Kind, Tensor};
use hasten::{ProcessGroup, ProcessState, ReduceOp};
use serde_json::json;

fn main() -> Result<(), hasten::Error> {
    let t0: f64 = std::env::var("HASTEN_BENCH_T0")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(report::now);
    let state = ProcessState::from_env()?;
    let mut group = ProcessGroup::init(&state)?;
    let mut x = Tensor::ones([1], (Kind::Float, state.device));
    group.all_reduce(&mut x, ReduceOp::Sum)?;
    let sum = x.double_value(&[0]);
    if state.is_main_process() {
        report::emit(
            json!({"part": "launch_cli_first_collective_s", "value": report::now() - t0, "sum": sum}),
        );
    }
    Ok(())
}
