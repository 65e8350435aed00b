//! A program that calls `notebook_launcher` the way a notebook cell would, for the launcher tests.
//!
//! `hasten-test-notebook MODE [N]`: `ops N` runs the collective checks on N forked ranks; `value N`
//! returns a value from the main rank; `fail N HOW` makes rank 1 fail (panic, error, exit3, sigkill)
//! while the others wait; `single` runs in-process; `refuse-group` and `refuse-cuda` must be refused;
//! `restarts` fails every time with max_restarts 2; `interrupt` gets SIGINT while ranks run; `debug N`
//! uses debug_launcher. Worker pids go to `$HASTEN_TEST_PID_DIR` when set.

use hasten::{ProcessGroup, ProcessState};
use hasten_launch::{NotebookLauncher, debug_launcher, notebook_launcher};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[path = "../ops_checks.rs"]
mod ops_checks;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Summary {
    world: usize,
    ranks_seen: Vec<usize>,
    note: String,
}

fn record_pid(rank: usize) {
    if let Ok(dir) = std::env::var("HASTEN_TEST_PID_DIR") {
        let _ = std::fs::write(format!("{dir}/{rank}.pid"), std::process::id().to_string());
    }
}

fn ops(_: ()) -> Result<usize, hasten::Error> {
    let state = ProcessState::from_env()?;
    let mut group = ProcessGroup::init(&state)?;
    let failed = ops_checks::run_ops_checks(&mut group);
    group.barrier()?;
    Ok(failed)
}

fn value(note: String) -> Result<Summary, hasten::Error> {
    let state = ProcessState::from_env()?;
    record_pid(state.process_index());
    let mut group = ProcessGroup::init(&state)?;
    println!("rank {} says hello", group.rank());
    let ranks_seen = group.gather_object(&[group.rank()])?;
    Ok(Summary {
        world: group.world_size(),
        ranks_seen,
        note: format!("{note} from rank {}", group.rank()),
    })
}

fn fail(how: String) -> Result<(), String> {
    let state = ProcessState::from_env().map_err(|e| e.to_string())?;
    let rank = state.process_index();
    record_pid(rank);
    let mut group = ProcessGroup::init(&state).map_err(|e| e.to_string())?;
    println!("rank {rank} started");
    if rank == 1 {
        match how.as_str() {
            "panic" => panic!("rank 1 cannot go on"),
            "error" => return Err("the loss is NaN".into()),
            "exit3" => std::process::exit(3),
            // SAFETY: raising a signal on ourselves.
            "sigkill" => unsafe {
                libc::raise(libc::SIGKILL);
            },
            other => return Err(format!("unknown failure {other}")),
        }
    }
    std::thread::sleep(Duration::from_secs(60));
    group.barrier().map_err(|e| e.to_string())
}

/// Tests run side by side, so each launch takes a free port instead of Accelerate's default 29500.
fn launcher(n: usize) -> NotebookLauncher {
    NotebookLauncher::new(n).use_port(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("");
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let code = match mode {
        "ops" => match launcher(n).launch(ops, ()) {
            Ok(Some(0)) => 0,
            Ok(failed) => {
                eprintln!("checks failed on the main rank: {failed:?}");
                1
            }
            Err(e) => {
                eprintln!("launch failed: {e}");
                e.exit_code()
            }
        },
        "debug" => match debug_launcher(ops, (), n) {
            Ok(failed) => i32::from(failed > 0),
            Err(e) => {
                eprintln!("launch failed: {e}");
                e.exit_code()
            }
        },
        "value" => {
            let summary = launcher(n)
                .launch(value, "hello".to_owned())
                .expect("launch")
                .expect("a value");
            println!("returned: {summary:?}");
            assert_eq!(summary.world, n);
            assert_eq!(summary.ranks_seen, (0..n).collect::<Vec<_>>());
            assert_eq!(summary.note, "hello from rank 0");
            // The launcher returns as soon as every rank reported success; the workers, still ending,
            // are reaped in the background: none may linger, not even as a zombie.
            let dir = std::env::var("HASTEN_TEST_PID_DIR").unwrap_or_default();
            let pids: Vec<String> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                        .collect()
                })
                .unwrap_or_default();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while pids
                .iter()
                .any(|p| std::path::Path::new(&format!("/proc/{}", p.trim())).exists())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let gone = pids
                .iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{}", p.trim())).exists());
            println!("workers recorded: {}, all reaped: {gone}", pids.len());
            0
        }
        "fail" => {
            let how = args.get(2).cloned().unwrap_or_default();
            match launcher(n).launch(fail, how) {
                Ok(_) => {
                    eprintln!("the launch should have failed");
                    1
                }
                Err(e) => {
                    eprintln!("launch failed: {e}");
                    e.exit_code()
                }
            }
        }
        "single" => {
            let parent = std::process::id();
            let pid =
                notebook_launcher(|x: u32| Ok::<_, String>((std::process::id(), x * 2)), 21, 1)
                    .expect("launch");
            println!(
                "single process: same pid {}, value {}",
                pid.0 == parent,
                pid.1
            );
            0
        }
        "refuse-group" => {
            let state = ProcessState::from_env().expect("state");
            let _group = ProcessGroup::init(&state).expect("group of one");
            match notebook_launcher(|()| Ok::<_, String>(()), (), 2) {
                Err(e) => {
                    eprintln!("refused: {e}");
                    0
                }
                Ok(()) => 1,
            }
        }
        "refuse-cuda" => {
            println!(
                "cuda available here: {}",
                hasten::utils::is_cuda_available()
            );
            match notebook_launcher(|()| Ok::<_, String>(()), (), 2) {
                Err(e) => {
                    eprintln!("refused: {e}");
                    0
                }
                Ok(()) => 1,
            }
        }
        "restarts" => match NotebookLauncher::new(2)
            .cpu(true)
            .use_port(0)
            .max_restarts(2)
            .launch(
                |()| -> Result<(), String> {
                    let state = ProcessState::from_env().map_err(|e| e.to_string())?;
                    if state.process_index() == 1 {
                        return Err("always failing".into());
                    }
                    Ok(())
                },
                (),
            ) {
            Ok(_) => 1,
            Err(e) => {
                eprintln!("launch failed: {e}");
                e.exit_code()
            }
        },
        "interrupt" => {
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(1500));
                // SAFETY: signalling ourselves, as a notebook's interrupt does.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGINT);
                }
            });
            let result = NotebookLauncher::new(3).cpu(true).use_port(0).launch(
                |()| -> Result<(), String> {
                    let state = ProcessState::from_env().map_err(|e| e.to_string())?;
                    record_pid(state.process_index());
                    println!("rank {} waiting", state.process_index());
                    std::thread::sleep(Duration::from_secs(60));
                    Ok(())
                },
                (),
            );
            match result {
                Err(hasten_launch::LaunchError::Interrupted) => {
                    println!("interrupted, and this process lives on");
                    0
                }
                other => {
                    eprintln!("expected an interruption, got {other:?}");
                    1
                }
            }
        }
        other => {
            eprintln!("unknown mode {other:?}");
            2
        }
    };
    std::process::exit(code);
}
