//! Rendezvous through the environment contract alone (as under torchrun or srun), and its errors.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn start(env: &[(&str, String)]) -> Child {
    start_with(Command::new(worker()), env)
}

/// Starts `cmd` (the worker, with its arguments) as one rank described by `env` alone.
fn start_with(mut cmd: Command, env: &[(&str, String)]) -> Child {
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("ACCELERATE_USE_CPU", "1")
        .env("HASTEN_RDZV_TIMEOUT", "5");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    cmd.spawn().expect("spawn worker")
}

fn finish(child: Child) -> Ran {
    let start = Instant::now();
    Ran::from_output(child.wait_with_output().unwrap(), start.elapsed())
}

fn rank_env(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ]
}

#[test]
fn torchrun_style_environment_is_enough() {
    let port = free_port();
    let children: Vec<Child> = (0..3).map(|r| start(&rank_env(r, 3, port))).collect();
    for (rank, child) in children.into_iter().enumerate() {
        let ran = finish(child);
        assert_eq!(ran.code, 0, "{}", ran.all());
        ran.expect_stdout(&format!("rank {rank} all_reduce sum = 6"));
    }
}

#[test]
fn slurm_style_environment_is_enough() {
    let port = free_port();
    let children: Vec<Child> = (0..2)
        .map(|r| {
            start(&[
                ("SLURM_PROCID", r.to_string()),
                ("SLURM_LOCALID", r.to_string()),
                ("SLURM_NTASKS", "2".into()),
                ("SLURM_JOB_NODELIST", "localhost".into()),
                ("MASTER_PORT", port.to_string()),
            ])
        })
        .collect();
    for child in children {
        let ran = finish(child);
        assert_eq!(ran.code, 0, "{}", ran.all());
        ran.expect_stdout("all_reduce sum = 3");
    }
}

#[test]
fn wrong_world_size_fails_on_both_sides() {
    let port = free_port();
    let master = start(&rank_env(0, 2, port));
    let stranger = start(&rank_env(1, 3, port));
    let (m, s) = (finish(master), finish(stranger));
    for ran in [&m, &s] {
        assert_ne!(ran.code, 0, "{}", ran.all());
        ran.expect_stderr("wrong world size: rank 1");
        ran.expect_stderr("WORLD_SIZE=3");
    }
}

#[test]
fn duplicate_rank_is_refused() {
    let port = free_port();
    let master = start(&rank_env(0, 3, port));
    std::thread::sleep(Duration::from_millis(200));
    let a = start(&rank_env(1, 3, port));
    let b = start(&rank_env(1, 3, port));
    let results = [finish(master), finish(a), finish(b)];
    for ran in &results {
        assert_ne!(ran.code, 0, "{}", ran.all());
    }
    assert!(
        results[0]
            .stderr
            .contains("duplicate rank: two processes claim rank 1"),
        "{}",
        results[0].all()
    );
}

#[test]
fn unreachable_master_times_out_with_a_clear_error() {
    let port = free_port();
    let mut env = rank_env(1, 2, port);
    env.push(("HASTEN_RDZV_TIMEOUT", "1".into()));
    let ran = finish(start(&env));
    assert_ne!(ran.code, 0);
    ran.expect_stderr(&format!(
        "rank 1 could not reach the master at 127.0.0.1:{port} within 1 s"
    ));
    assert!(ran.elapsed < Duration::from_secs(5));
}

#[test]
fn missing_ranks_time_out_on_the_master() {
    let port = free_port();
    let mut env = rank_env(0, 3, port);
    env.push(("HASTEN_RDZV_TIMEOUT", "1".into()));
    let ran = finish(start(&env));
    assert_ne!(ran.code, 0);
    ran.expect_stderr("waiting for rank(s) 1, 2 to join");
}

#[test]
fn inconsistent_contract_is_refused_before_connecting() {
    let ran = finish(start(&[("RANK", "2".into()), ("WORLD_SIZE", "2".into())]));
    assert_ne!(ran.code, 0);
    ran.expect_stderr("RANK=2 must be less than WORLD_SIZE=2");
}

/// Ranks whose `HASTEN_SHM_SLOT_MB` differ (one with shared memory off) still agree: rank 0's value is
/// used by all. Before, a rank with a larger slot mapped past the segment's end and one with 0 left the
/// others waiting.
#[test]
fn ranks_with_different_shared_memory_slots_agree_on_rank_0s() {
    for (slot0, slot1) in [("1", "64"), ("64", "1"), ("0", "32"), ("32", "0")] {
        let timeout = [("HASTEN_COLLECTIVE_TIMEOUT", "20")];
        for (rank, ran) in two_ranks_with_slots([slot0, slot1], &["--ops"], &timeout)
            .iter()
            .enumerate()
        {
            assert_eq!(ran.code, 0, "slots {slot0}/{slot1}: {}", ran.all());
            ran.expect_stdout(&format!(
                "ops checks on rank {rank} (cpu, 2 processes): 10 passed, 0 failed"
            ));
        }
    }
}

/// Two ranks of one job started through the environment alone, rank r with `HASTEN_SHM_SLOT_MB` =
/// `slots[r]`, the worker given `args`, both with `env` added; what each did.
fn two_ranks_with_slots(slots: [&str; 2], args: &[&str], env: &[(&str, &str)]) -> Vec<Ran> {
    let port = free_port();
    let children: Vec<Child> = slots
        .iter()
        .enumerate()
        .map(|(rank, slot)| {
            let mut vars = rank_env(rank, 2, port);
            vars.push(("HASTEN_SHM_SLOT_MB", slot.to_string()));
            vars.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
            let mut cmd = Command::new(worker());
            cmd.args(args);
            start_with(cmd, &vars)
        })
        .collect();
    children.into_iter().map(finish).collect()
}

/// An unusable value on rank 0 is an error on every rank, naming the variable; on another rank it is
/// not used (rank 0's value is everyone's), so the job runs.
#[test]
fn an_unusable_shared_memory_slot_is_an_error_naming_the_variable() {
    for (slot0, slot1, fails) in [
        ("1e9", "1e9", true),
        ("1e9", "32", true),
        ("32", "1e9", false),
    ] {
        for ran in two_ranks_with_slots([slot0, slot1], &[], &[]) {
            if fails {
                assert_ne!(ran.code, 0, "{slot0}/{slot1}: {}", ran.all());
                ran.expect_stderr("HASTEN_SHM_SLOT_MB");
                assert!(!ran.all().contains("lost the connection"), "{}", ran.all());
            } else {
                assert_eq!(ran.code, 0, "{slot0}/{slot1}: {}", ran.all());
            }
        }
    }
}
