//! L1: `notebook_launcher(fn, args, 2)` from the call until every rank has finished one all-reduce of a
//! 1-element tensor on its GPU, then until the call returns.

#[path = "report.rs"]
mod report;

use hasten::tch::{Kind, Tensor};
use hasten::{ProcessGroup, ProcessState, ReduceOp};
use serde_json::json;

fn first_collective(t0: f64) -> Result<f64, hasten::Error> {
    let state = ProcessState::from_env()?;
    let mut group = ProcessGroup::init(&state)?;
    let mut x = Tensor::ones([1], (Kind::Float, state.device));
    group.all_reduce(&mut x, ReduceOp::Sum)?;
    let sum = x.double_value(&[0]); // waits for the GPU
    // The slowest rank decides: take the max over ranks of the time each finished.
    let mut done = Tensor::from(report::now() - t0);
    group.all_reduce(&mut done, ReduceOp::Max)?;
    let elapsed = done.double_value(&[]);
    if state.is_main_process() {
        report::emit(
            json!({"part": "launch_first_collective_s", "value": elapsed, "sum": sum, "nccl": group.uses_nccl()}),
        );
    }
    Ok(elapsed)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
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
