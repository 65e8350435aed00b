//! A worker for the launcher tests: joins the group, all-reduces its rank, and fails on request.
//!
//! `hasten-test-worker [--ops] [--fail RANK:MODE]... [--sleep SECS]`: with `--ops`, runs every
//! collective operation against Accelerate's expected values (tests/ops_checks.rs) and exits non-zero if
//! one fails.
//!  where MODE is `panic`, `exit3`,
//! `sigkill`, `hang` or `stubborn` (hangs and ignores SIGTERM). Every rank writes its pid into `$HASTEN_TEST_PID_DIR` (when set) so a test can check that no
//! process outlives the launcher.

use hasten::tch::{Kind, Tensor};
use hasten::{ProcessGroup, ProcessState, ReduceOp};
use std::time::Duration;

#[path = "../ops_checks.rs"]
mod ops_checks;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut fail: Vec<(usize, String)> = Vec::new();
    let mut sleep = 0.0f64;
    let mut ops = false;
    let mut show_listen_fd = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--fail" => {
                let spec = it.next().ok_or("--fail needs RANK:MODE")?;
                let (r, m) = spec.split_once(':').ok_or("--fail needs RANK:MODE")?;
                fail.push((r.parse()?, m.to_owned()));
            }
            "--ops" => ops = true,
            "--show-listen-fd" => show_listen_fd = true,
            "--sleep" => sleep = it.next().ok_or("--sleep needs seconds")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let state = ProcessState::from_env()?;
    let rank = state.process_index();
    if let Ok(dir) = std::env::var("HASTEN_TEST_PID_DIR") {
        std::fs::write(format!("{dir}/{rank}.pid"), std::process::id().to_string())?;
    }
    println!(
        "rank {rank} of {} (local {} of {}) ready",
        state.num_processes(),
        state.local_process_index(),
        state.contract.local_world_size
    );
    if show_listen_fd {
        // Set, and naming a descriptor that is open in this process.
        let inherited = std::env::var(hasten::RDZV_LISTEN_FD_VAR)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            // SAFETY: F_GETFD only reads the descriptor's flags.
            .is_some_and(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1);
        println!("rank {rank} inherited a listener: {inherited}");
    }
    let mut group = ProcessGroup::init(&state)?;
    for (r, mode) in &fail {
        if *r == rank {
            eprintln!("rank {rank} fails on purpose ({mode})");
            match mode.as_str() {
                "panic" => panic!("rank {rank} gives up"),
                "exit3" => std::process::exit(3),
                // SAFETY: raising a signal on ourselves.
                "sigkill" => unsafe {
                    libc::raise(libc::SIGKILL);
                },
                "stubborn" => {
                    // SAFETY: ignoring SIGTERM; the launcher must escalate to SIGKILL.
                    unsafe {
                        libc::signal(libc::SIGTERM, libc::SIG_IGN);
                    }
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                "hang" => loop {
                    std::thread::sleep(Duration::from_secs(1));
                },
                other => return Err(format!("unknown failure mode {other}").into()),
            }
        }
    }
    std::thread::sleep(Duration::from_secs_f64(sleep));
    if ops {
        let failed = ops_checks::run_ops_checks(&mut group);
        group.barrier()?;
        std::process::exit(i32::from(failed > 0));
    }
    let mut t = Tensor::from_slice(&[rank as f32 + 1.0]).to_kind(Kind::Float);
    group.all_reduce(&mut t, ReduceOp::Sum)?;
    println!("rank {rank} all_reduce sum = {}", t.double_value(&[0]));
    group.barrier()?;
    Ok(())
}
