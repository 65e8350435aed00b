//! Helpers shared by the integration tests: locating the real binaries and running them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A binary of the workspace, next to this test's own folder (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo nextest run --workspace` (or `make test`)",
        path.display()
    );
    path
}

/// The `hasten` command-line binary.
pub fn hasten() -> PathBuf {
    workspace_bin("hasten")
}

/// The test worker program.
pub fn worker() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hasten-test-worker"))
}

/// What a finished command did.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Ran {
    pub fn from_output(out: Output, elapsed: Duration) -> Ran {
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        }
    }

    pub fn all(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }

    /// Asserts that standard output contains `text`, showing everything the command printed if not.
    #[track_caller]
    pub fn expect_stdout(&self, text: &str) {
        assert!(
            self.stdout.contains(text),
            "missing {text:?} in stdout\n{}",
            self.all()
        );
    }

    /// Asserts that standard error contains `text`, showing everything the command printed if not.
    #[track_caller]
    pub fn expect_stderr(&self, text: &str) {
        assert!(
            self.stderr.contains(text),
            "missing {text:?} in stderr\n{}",
            self.all()
        );
    }
}

/// Runs a command to completion with extra environment variables.
pub fn run(mut cmd: Command, env: &[(&str, &str)]) -> Ran {
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Keep the caller's own contract variables (if any) from leaking into the test.
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        if !env.iter().any(|(e, _)| *e == k) {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    let started = Instant::now();
    let out = cmd.output().expect("run command");
    Ran::from_output(out, started.elapsed())
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z")
        }
    }
}

/// The pids the workers recorded in `dir`.
pub fn recorded_pids(dir: &std::path::Path) -> Vec<i32> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|s| s.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// What every failed launch must show: it ended within 10 s with `code`, named rank 1 and `cause` (after
/// `report_prefix`), printed the rank's last lines, and left none of the recorded processes behind.
pub fn assert_failed_cleanly(
    ran: &Ran,
    code: i32,
    report_prefix: &str,
    cause: &str,
    pid_dir: &std::path::Path,
    expected_ranks: usize,
) {
    assert_eq!(ran.code, code, "{}", ran.all());
    assert!(
        ran.elapsed < Duration::from_secs(10),
        "took {:?}\n{}",
        ran.elapsed,
        ran.all()
    );
    let report = format!("{report_prefix}rank 1 failed: {cause}");
    assert!(
        ran.stderr.contains(&report),
        "missing {report:?}\n{}",
        ran.all()
    );
    assert!(
        ran.stderr.contains("last lines of its output"),
        "{}",
        ran.all()
    );
    let recorded = recorded_pids(pid_dir);
    assert_eq!(
        recorded.len(),
        expected_ranks,
        "every rank started: {}",
        ran.all()
    );
    for pid in recorded {
        assert!(!alive(pid), "process {pid} outlived the launch");
    }
}
