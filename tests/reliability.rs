//! Issue 15, end to end through `hasten launch`: a rank that is alive but never reaches a collective
//! (stuck in its own code, or stopped with SIGSTOP) does not hang the job. The ranks that wait fail after
//! the collective timeout with an error naming the missing rank, and the launcher ends the job, leaving
//! no process behind.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Launches `world` CPU ranks of the test worker where `rank` fails with `mode` (after joining the
/// group), the collective timeout at 2 s.
fn stuck(world: usize, rank: usize, mode: &str) -> (Ran, Vec<i32>) {
    let pids = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(hasten());
    cmd.args([
        "launch",
        "--num_processes",
        &world.to_string(),
        "--cpu",
        "--main_process_port",
        "0",
    ])
    .arg(worker())
    .args(["--fail", &format!("{rank}:{mode}")]);
    let ran = run(
        cmd,
        &[
            ("HASTEN_COLLECTIVE_TIMEOUT", "2"),
            ("HASTEN_TEST_PID_DIR", pids.path().to_str().unwrap()),
        ],
    );
    (ran, recorded_pids(pids.path()))
}

fn assert_named(ran: &Ran, pids: &[i32], world: usize, missing: usize) {
    assert_ne!(ran.code, 0, "{}", ran.all());
    let named = format!("timed out after 2 s: rank {missing} did not arrive");
    assert!(
        ran.all().contains(&named),
        "missing {named:?}\n{}",
        ran.all()
    );
    // Timeout 2 s, census window 1 s, then the launcher stops the rest (SIGTERM, SIGKILL after 2 s).
    assert!(
        ran.elapsed < Duration::from_secs(15),
        "took {:?}\n{}",
        ran.elapsed,
        ran.all()
    );
    assert_eq!(pids.len(), world, "every rank started: {}", ran.all());
    for pid in pids {
        assert!(!alive(*pid), "process {pid} outlived the launcher");
    }
}

#[test]
fn a_rank_stuck_in_its_own_code_is_named_and_the_job_ends() {
    let (ran, pids) = stuck(3, 1, "hang");
    assert_named(&ran, &pids, 3, 1);
    // Every rank that waited says so, not only the first.
    for rank in [0, 2] {
        assert!(
            ran.all().contains(&format!("[rank{rank}]: Error:"))
                || ran.all().contains(&format!("rank {rank} failed")),
            "{}",
            ran.all()
        );
    }
}

#[test]
fn a_stopped_rank_is_named_and_the_job_ends() {
    let (ran, pids) = stuck(2, 1, "stop");
    assert_named(&ran, &pids, 2, 1);
}

#[test]
fn a_stuck_rank_0_is_named_by_the_others() {
    let (ran, pids) = stuck(3, 0, "hang");
    assert_named(&ran, &pids, 3, 0);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to the rendezvous port once rank 0 listens (within 20 s).
fn connect(port: u16) -> std::net::TcpStream {
    let started = std::time::Instant::now();
    loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "rank 0 never listened"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn two_ranks_on(port: u16) -> Ran {
    let mut cmd = Command::new(hasten());
    cmd.args([
        "launch",
        "--num_processes",
        "2",
        "--cpu",
        "--main_process_port",
        &port.to_string(),
    ])
    .arg(worker())
    .args(["--sleep", "0.5"]);
    run(cmd, &[])
}

/// A stranger that reaches the port and greets rank 0 as rank 1, without the job's secret, is refused:
/// it never joins, never sees anything but a nonce, and the job's sum is its own (1 + 2).
#[test]
fn a_stranger_cannot_join_a_job() {
    use std::io::{BufRead, BufReader, Read, Write};
    let port = free_port();
    let stranger = std::thread::spawn(move || {
        let mut s = connect(port);
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut hello = String::new();
        BufReader::new(&mut s).read_line(&mut hello).unwrap();
        s.write_all(b"HASTEN-RDZV-2 1 2 -\n").unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (hello, rest)
    });
    let ran = two_ranks_on(port);
    let (hello, rest) = stranger.join().unwrap();
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("[rank0]: rank 0 all_reduce sum = 3");
    ran.expect_stdout("[rank1]: rank 1 all_reduce sum = 3");
    assert!(
        hello.starts_with("HASTEN-HELLO ") && hello.trim().len() == 13 + 64,
        "{hello:?}"
    );
    assert!(
        rest.is_empty(),
        "the stranger was told {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        ran.stderr.contains("refused a connection")
            && ran.stderr.contains("did not prove the job's secret"),
        "{}",
        ran.all()
    );
}

/// Idle connections and garbage on the port do not hold the rendezvous up: each is read on its own,
/// with its own deadline.
#[test]
fn idle_connections_and_garbage_do_not_delay_the_rendezvous() {
    use std::io::Write;
    let port = free_port();
    let nuisance = std::thread::spawn(move || {
        let idle: Vec<_> = (0..3).map(|_| connect(port)).collect();
        let mut http = connect(port);
        let _ = http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut huge = connect(port);
        // A frame header announcing 2^62 bytes: nothing may be allocated for it.
        let _ = huge.write_all(&[0u8, 0, 0, 0, 0, 0, 0, 0, 0x40]);
        std::thread::sleep(Duration::from_secs(12));
        drop((idle, http, huge));
    });
    let ran = two_ranks_on(port);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("[rank1]: rank 1 all_reduce sum = 3");
    assert!(
        ran.elapsed < Duration::from_secs(8),
        "took {:?}\n{}",
        ran.elapsed,
        ran.all()
    );
    nuisance.join().unwrap();
}

#[allow(dead_code)]
#[path = "bin/training/crash.rs"]
mod crash;

/// Kills a process that saves checkpoints for ever at 50 random moments (after its first save), and
/// loads what is left each time: a whole checkpoint must always be there. Returns how many kills left
/// a staging folder behind (landed in the middle of writing a checkpoint).
fn kills_never_lose_a_checkpoint(mode: &str) -> usize {
    use std::io::{BufRead, BufReader};
    let mut mid_write = 0;
    for trial in 0..50u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(workspace_bin("hasten-test-training"))
            .args(["save-loop"])
            .arg(dir.path())
            .arg(mode)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "saved 0", "trial {trial}");
        // A spread of moments over the next saves (a cheap deterministic generator).
        let delay = (trial.wrapping_mul(2654435761) >> 7) % 60;
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        child.wait().unwrap();
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .chain(
                std::fs::read_dir(dir.path().join("checkpoints"))
                    .into_iter()
                    .flatten(),
            )
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial"));
        mid_write += usize::from(leftovers);
        let value = crash::load_after_kill(dir.path(), mode)
            .unwrap_or_else(|e| panic!("{mode}, trial {trial} (killed after {delay} ms): {e}"));
        assert!(value >= 0.0 && value.fract() == 0.0, "{value}");
    }
    println!("{mode}: 50 kills, {mid_write} in the middle of writing a checkpoint, 0 lost");
    mid_write
}

#[test]
fn kills_never_lose_the_checkpoint_saved_in_place() {
    assert!(
        kills_never_lose_a_checkpoint("same") > 0,
        "no kill landed mid-write"
    );
}

#[test]
fn kills_never_lose_a_checkpoint_with_total_limit_1() {
    assert!(
        kills_never_lose_a_checkpoint("limit1") > 0,
        "no kill landed mid-write"
    );
}

#[test]
fn kills_never_lose_a_checkpoint_with_total_limit_2() {
    assert!(
        kills_never_lose_a_checkpoint("limit2") > 0,
        "no kill landed mid-write"
    );
}

/// `kill -9` of the launcher takes its ranks with it (they die with their parent), where they used to
/// run on for good.
#[test]
fn ranks_die_with_a_killed_launcher() {
    let pids = tempfile::tempdir().unwrap();
    let mut launcher = Command::new(hasten())
        .args([
            "launch",
            "--num_processes",
            "3",
            "--cpu",
            "--main_process_port",
            "0",
        ])
        .arg(worker())
        .args(["--sleep", "60"])
        .env("HASTEN_TEST_PID_DIR", pids.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while recorded_pids(pids.path()).len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the ranks never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let ranks = recorded_pids(pids.path());
    let killed = std::time::Instant::now();
    while ranks.iter().any(|p| alive(*p)) {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "ranks outlived their launcher: {:?}",
            ranks.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
