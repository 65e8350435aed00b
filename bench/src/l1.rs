//! L1: `notebook_launcher(fn, args, 2)` from the call until every rank has finished one all-reduce of a
//! 1-element tensor on its GPU, then until the call returns. Also reports when each phase ended (the
//! slowest rank's time).

#[path = "report.rs"]
mod report;

use hasten::tch::{Kind, Tensor};
use hasten::{ProcessGroup, ProcessState, ReduceOp};
use serde_json::json;

fn first_collective(t0: f64) -> Result<f64, hasten::Error> {
    let entered = report::now() - t0;
    let state = ProcessState::from_env()?;
    let state_ready = report::now() - t0;
    let mut group = ProcessGroup::init(&state)?;
    let group_ready = report::now() - t0;
    let mut x = Tensor::ones([1], (Kind::Float, state.device));
    group.all_reduce(&mut x, ReduceOp::Sum)?;
    let sum = x.double_value(&[0]); // waits for the GPU
    let done = report::now() - t0;
    // The slowest rank decides: the max over ranks of each phase's end.
    let mut phases = Tensor::from_slice(&[entered, state_ready, group_ready, done]);
    group.all_reduce(&mut phases, ReduceOp::Max)?;
    let p = Vec::<f64>::try_from(&phases).unwrap_or_default();
    if state.is_main_process() {
        report::emit(json!({
            "part": "launch_first_collective_s", "value": p[3], "sum": sum, "nccl_active": group.nccl_active(),
            "phases_s": {"worker_started": p[0], "state_ready": p[1], "group_ready": p[2]},
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
        .launch(first_collective, t0)
    {
        Ok(_) => report::emit(json!({"part": "launch_total_s", "value": report::now() - t0})),
        Err(e) => {
            eprintln!("bench-l1: {e}");
            std::process::exit(1);
        }
    }
}
