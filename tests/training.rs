//! The training library's correctness on real processes (CPU, 2 and 3 ranks): DDP equals one process on
//! the concatenated batch, accumulation equals one larger batch, the data loader's end forces a sync, the
//! scheduler's step count, and gather_for_metrics covering the dataset exactly.

mod common;

use common::*;
use std::process::Command;

fn check(mode: &str) {
    check_with(mode, &[]);
}

/// Runs `hasten-test-training MODE ARGS…` on `n` CPU ranks and checks that every rank reported ok.
fn run_mode(n: usize, mode: &str, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(hasten());
    cmd.args([
        "launch",
        "--num_processes",
        &n.to_string(),
        "--cpu",
        "--main_process_port",
        "0",
    ])
    .arg(workspace_bin("hasten-test-training"))
    .arg(mode)
    .args(args);
    let ran = run(cmd, env);
    assert_eq!(ran.code, 0, "{}", ran.all());
    for rank in 0..n {
        ran.expect_stdout(&format!("[rank{rank}]: training check {mode}: ok"));
    }
    ran
}

fn check_with(mode: &str, env: &[(&str, &str)]) -> Vec<Ran> {
    [2, 3]
        .into_iter()
        .map(|n| run_mode(n, mode, &[], env))
        .collect()
}

#[test]
fn ddp_matches_one_process_on_the_whole_batch() {
    check("ddp");
}

/// Runs `mode` on 2 and 3 ranks with `HASTEN_TRACE_DDP=1` (and `env`); every run's trace has `text`.
fn check_traced(mode: &str, env: &[(&str, &str)], text: &str) {
    let mut env = env.to_vec();
    env.push(("HASTEN_TRACE_DDP", "1"));
    for ran in check_with(mode, &env) {
        assert!(ran.stderr.contains(text), "missing {text:?}\n{}", ran.all());
    }
}

#[test]
fn gradient_buckets_are_averaged_during_the_backward() {
    // One bucket per parameter (4): each is all-reduced from its gradient hook while the backward goes
    // on; with HASTEN_DDP_OVERLAP=0 all four wait for the end. Both give the single-process weights.
    let text = |n| format!("backward: {n} of 4 buckets all-reduced during the backward");
    check_traced("ddp_buckets", &[], &text(4));
    check_traced("ddp_buckets", &[("HASTEN_DDP_OVERLAP", "0")], &text(0));
}

#[test]
fn unused_parameters_count_as_zero_gradients() {
    // The unused parameter's bucket never completes during the backward; it is launched (as zeros) after.
    check_traced(
        "ddp_unused",
        &[],
        "of 5 buckets all-reduced during the backward",
    );
}

#[test]
fn save_state_and_load_state_resume_exactly() {
    for n in [2, 3] {
        let project = tempfile::tempdir().unwrap();
        run_mode(n, "checkpoint", &[project.path().as_os_str()], &[]);
        let c = project.path().join("checkpoints/checkpoint_2");
        for file in [
            "model.safetensors",
            "optimizer.safetensors",
            "accelerator_state.json",
        ] {
            assert!(c.join(file).is_file(), "{file} missing");
        }
        for rank in 0..n {
            assert!(
                c.join(format!("random_states_{rank}.safetensors"))
                    .is_file()
            );
        }
    }
}

#[test]
fn synchronize_rng_states_copies_rank_0s_generators() {
    check("rng");
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
