//! The training library's correctness on real processes (CPU, 2 and 3 ranks): DDP equals one process on
//! the concatenated batch, accumulation equals one larger batch, the data loader's end forces a sync, the
//! scheduler's step count, and gather_for_metrics covering the dataset exactly.

mod common;

use common::*;
use std::process::Command;

fn check(mode: &str) {
    for n in ["2", "3"] {
        let mut cmd = Command::new(hasten());
        cmd.args([
            "launch",
            "--num_processes",
            n,
            "--cpu",
            "--main_process_port",
            "0",
        ])
        .arg(workspace_bin("hasten-test-training"))
        .arg(mode);
        let ran = run(cmd, &[]);
        assert_eq!(ran.code, 0, "{}", ran.all());
        for rank in 0..n.parse::<usize>().unwrap() {
            let line = format!("[rank{rank}]: training check {mode}: ok");
            ran.expect_stdout(&line);
        }
    }
}

#[test]
fn ddp_matches_one_process_on_the_whole_batch() {
    check("ddp");
}

#[test]
fn accumulation_matches_one_larger_batch() {
    check("accumulate");
}

#[test]
fn the_end_of_the_dataloader_forces_a_sync() {
    check("dataloader_end");
}

#[test]
fn the_scheduler_steps_once_per_process_per_optimizer_step() {
    check("scheduler");
}

#[test]
fn gather_for_metrics_returns_the_dataset_exactly() {
    check("metrics");
}

#[test]
fn gather_for_metrics_returns_an_iterable_dataset_exactly() {
    check("metrics_iterable");
}
