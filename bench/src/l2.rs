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
    let entered = report::now() - t0;
    let state = ProcessState::from_env()?;
    let state_ready = report::now() - t0;
    let mut group = ProcessGroup::init(&state)?;
    let group_ready = report::now() - t0;
    let mut x = Tensor::ones([1], (Kind::Float, state.device));
    group.all_reduce(&mut x, ReduceOp::Sum)?;
    let sum = x.double_value(&[0]);
    let done = report::now() - t0;
    let mut phases = Tensor::from_slice(&[entered, state_ready, group_ready, done]);
    group.all_reduce(&mut phases, ReduceOp::Max)?;
    let p = Vec::<f64>::try_from(&phases).unwrap_or_default();
    if state.is_main_process() {
        report::emit(json!({
            "part": "launch_cli_first_collective_s", "value": done, "sum": sum,
            "phases_s_max_over_ranks": {"main_entered": p[0], "state_ready": p[1], "group_ready": p[2], "done": p[3]},
        }));
    }
    Ok(())
}
