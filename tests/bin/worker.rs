//! A worker for the launcher tests: joins the group, all-reduces its rank, and fails on request.
//!
//! `hasten-test-worker [--ops] [--fail RANK:MODE]... [--sleep SECS] [--print WHAT] [--cuda-elems N]`.
//! `--fail RANK:MODE` makes that rank fail before the all-reduce, where MODE is `panic`, `exit3`,
//! `sigkill`, `hang` (an endless loop), `stop` (SIGSTOP) or `stubborn` (hangs and ignores SIGTERM).
//! With `--cuda-elems`, the all-reduces are of N floats on the rank's GPU (NCCL), and a warm-up
//! all-reduce brings NCCL up before any failure. With `--print`, rank 0 first prints `lines:N` (N short
//! lines, as fast as it can), `longline:BYTES` (one line of BYTES without a newline, in 1 MiB writes)
//! or `progress` (a progress bar drawn with carriage returns, pausing mid-line) for the relay tests.
//! With `--ops`, runs every collective operation against Accelerate's expected values
//! (tests/ops_checks.rs) and exits non-zero if one fails. Every rank writes its pid into
//! `$HASTEN_TEST_PID_DIR` (when set) so a test can check that no process outlives the launcher.

use hasten::tch::{Kind, Tensor};
use hasten::{ProcessGroup, ProcessState, ReduceOp};
use std::time::Duration;

#[path = "../ops_checks.rs"]
mod ops_checks;

/// Errors are printed with their message (Display), as a program meant for people would; `main`
/// returning the error would print its Debug form.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut fail: Vec<(usize, String)> = Vec::new();
    let mut sleep = 0.0f64;
    let mut ops = false;
    let mut show_listen_fd = false;
    let mut print: Option<String> = None;
    let mut cuda_elems = 0i64;
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
            "--cuda-elems" => cuda_elems = it.next().ok_or("--cuda-elems needs N")?.parse()?,
            "--print" => print = Some(it.next().ok_or("--print needs what")?.clone()),
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
    if let Some(what) = &print
        && rank == 0
    {
        print_for_relay_tests(what)?;
    }
    if show_listen_fd {
        // Set, and naming a descriptor that is open in this process.
        let inherited = std::env::var(hasten::utils::RDZV_LISTEN_FD_VAR)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            // SAFETY: F_GETFD only reads the descriptor's flags.
            .is_some_and(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1);
        println!("rank {rank} inherited a listener: {inherited}");
    }
    let mut group = ProcessGroup::init(&state)?;
    if cuda_elems > 0 {
        // One NCCL collective first, so a failure below strikes a launched NCCL operation (not the
        // communicator's creation).
        let device = hasten::utils::select_device(state.local_process_index(), false, 1);
        let mut warm = Tensor::ones([cuda_elems], (Kind::Float, device));
        group.all_reduce(&mut warm, ReduceOp::Sum)?;
        println!(
            "rank {rank}: NCCL warm-up all_reduce = {}",
            warm.double_value(&[0])
        );
    }
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
                // SAFETY: stopping ourselves, as `kill -STOP` would.
                "stop" => unsafe {
                    libc::raise(libc::SIGSTOP);
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
    if cuda_elems > 0 {
        // On this rank's GPU, so the all-reduce goes through NCCL.
        let device = hasten::utils::select_device(state.local_process_index(), false, 1);
        t = t.to_device(device).repeat([cuda_elems]);
    }
    group.all_reduce(&mut t, ReduceOp::Sum)?;
    println!("rank {rank} all_reduce sum = {}", t.double_value(&[0]));
    group.barrier()?;
    Ok(())
}

fn print_for_relay_tests(what: &str) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match what.split_once(':') {
        Some(("lines", n)) => {
            let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
            for i in 0..n.parse::<u64>()? {
                writeln!(out, "line {i}")?;
            }
            out.flush()?;
        }
        Some(("longline", bytes)) => {
            let block = vec![b'x'; 1 << 20];
            let mut left: usize = bytes.parse()?;
            while left > 0 {
                let n = left.min(block.len());
                out.write_all(&block[..n])?;
                left -= n;
            }
            out.flush()?;
        }
        None if what == "progress" => {
            for percent in [10, 20, 30] {
                write!(out, "\r{percent:3}%|")?;
                out.flush()?;
                std::thread::sleep(Duration::from_millis(200));
            }
            // A long pause in the middle of an update: the relay must show it before the bar ends.
            write!(out, "\r 50%|")?;
            out.flush()?;
            std::thread::sleep(Duration::from_secs(2));
            writeln!(out, "\r100%|")?;
            out.flush()?;
        }
        _ => return Err(format!("--print: unknown {what:?}").into()),
    }
    Ok(())
}
