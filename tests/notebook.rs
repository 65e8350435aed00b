//! `notebook_launcher` and `debug_launcher` end to end: a real program forks real workers.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn notebook(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(workspace_bin("hasten-test-notebook"));
    cmd.args(args);
    // CI has no GPU; on a GPU host these tests still exercise the CPU path.
    cmd.env("CUDA_VISIBLE_DEVICES", "");
    run(cmd, env)
}

#[test]
fn every_operation_on_2_3_and_4_forked_ranks() {
    for n in ["2", "3", "4"] {
        let ran = notebook(&["ops", n], &[]);
        assert_eq!(ran.code, 0, "{}", ran.all());
        ran.expect_stderr(&format!("Launching training on {n} CPUs."));
        for rank in 0..n.parse::<usize>().unwrap() {
            let line = format!(
                "[rank{rank}]: ops checks on rank {rank} (cpu, {n} processes): 10 passed, 0 failed"
            );
            ran.expect_stdout(&line);
        }
        assert!(!ran.stdout.contains("FAILED"), "{}", ran.all());
    }
}

#[test]
fn debug_launcher_runs_on_cpu() {
    let ran = notebook(&["debug", "3"], &[]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("[rank2]: ops checks on rank 2 (cpu, 3 processes): 10 passed");
}

#[test]
fn the_main_rank_returns_its_value() {
    let pids = tempfile::tempdir().unwrap();
    let ran = notebook(
        &["value", "3"],
        &[("HASTEN_TEST_PID_DIR", pids.path().to_str().unwrap())],
    );
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout(
        r#"returned: Summary { world: 3, ranks_seen: [0, 1, 2], note: "hello from rank 0" }"#,
    );
    for rank in 0..3 {
        ran.expect_stdout(&format!("[rank{rank}]: rank {rank} says hello"));
    }
}

fn failing(how: &str, n: &str, code: i32, cause: &str) {
    let pids = tempfile::tempdir().unwrap();
    let ran = notebook(
        &["fail", n, how],
        &[("HASTEN_TEST_PID_DIR", pids.path().to_str().unwrap())],
    );
    assert_failed_cleanly(
        &ran,
        code,
        "launch failed: ",
        cause,
        pids.path(),
        n.parse().unwrap(),
    );
}

#[test]
fn a_panicking_rank_is_named_with_its_message() {
    failing("panic", "2", 101, "panicked at tests/bin/notebook.rs");
    failing("panic", "3", 101, "panicked at tests/bin/notebook.rs");
    let ran = notebook(&["fail", "2", "panic"], &[]);
    ran.expect_stderr(": rank 1 cannot go on\nlast lines");
}

#[test]
fn an_error_return_is_a_failure() {
    failing("error", "3", 1, "exited with code 1");
    let ran = notebook(&["fail", "2", "error"], &[]);
    ran.expect_stderr("rank 1 returned an error: the loss is NaN");
}

#[test]
fn exit_3_and_sigkill_are_failures() {
    failing("exit3", "4", 3, "exited with code 3");
    failing("sigkill", "2", 137, "killed by signal 9 (SIGKILL)");
}

#[test]
fn one_process_runs_in_process() {
    let ran = notebook(&["single"], &[]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("single process: same pid true, value 42");
    ran.expect_stderr("Launching training on CPU.");
}

#[test]
fn an_existing_process_group_is_refused() {
    let ran = notebook(&["refuse-group"], &[]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stderr("refused: invalid launch: a process group (or Accelerator) already exists");
}

#[test]
fn max_restarts_restarts_the_group() {
    let ran = notebook(&["restarts"], &[]);
    assert_eq!(ran.code, 1, "{}", ran.all());
    ran.expect_stderr("restarting the group (1/2)");
    ran.expect_stderr("restarting the group (2/2)");
    ran.expect_stderr("rank 1 returned an error: always failing");
}

#[test]
fn an_interrupt_stops_every_rank_and_spares_the_caller() {
    let pids = tempfile::tempdir().unwrap();
    let ran = notebook(
        &["interrupt"],
        &[("HASTEN_TEST_PID_DIR", pids.path().to_str().unwrap())],
    );
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("interrupted, and this process lives on");
    assert!(
        ran.elapsed < Duration::from_secs(10),
        "took {:?}",
        ran.elapsed
    );
    let recorded = recorded_pids(pids.path());
    assert_eq!(recorded.len(), 3, "{}", ran.all());
    for pid in recorded {
        assert!(!alive(pid), "worker {pid} outlived the interrupt");
    }
}
