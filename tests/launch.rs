//! `hasten launch` end to end: real processes, real rendezvous, real failures.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn launch(args: &[&str], worker_args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(hasten());
    cmd.arg("launch").args(args).arg(worker()).args(worker_args);
    run(cmd, env)
}

fn expect_clean_exit(ran: &Ran, world: usize) {
    assert_eq!(ran.code, 0, "{}", ran.all());
    let expected_sum = (world * (world + 1) / 2) as f64;
    for rank in 0..world {
        let line = format!("[rank{rank}]: rank {rank} all_reduce sum = {expected_sum}");
        ran.expect_stdout(&line);
    }
}

#[test]
fn two_three_and_four_ranks_on_cpu() {
    for world in [2, 3, 4] {
        let n = world.to_string();
        let ran = launch(
            &["--num_processes", &n, "--cpu", "--main_process_port", "0"],
            &[],
            &[],
        );
        expect_clean_exit(&ran, world);
        for rank in 0..world {
            let ready =
                format!("[rank{rank}]: rank {rank} of {world} (local {rank} of {world}) ready");
            ran.expect_stdout(&ready);
        }
    }
}

#[test]
fn every_line_is_whole_and_prefixed() {
    let ran = launch(
        &["--num_processes", "4", "--cpu", "--main_process_port", "0"],
        &[],
        &[],
    );
    assert_eq!(ran.code, 0, "{}", ran.all());
    for line in ran.stdout.lines() {
        let (prefix, rest) = line.split_once("]: ").expect("prefixed line");
        let rank: usize = prefix
            .trim_start_matches("[rank")
            .parse()
            .expect("rank in prefix");
        assert!(
            rest.starts_with(&format!("rank {rank} ")),
            "spliced line: {line:?}"
        );
    }
}

#[test]
fn custom_prefix_template() {
    let ran = launch(
        &[
            "--num_processes",
            "2",
            "--cpu",
            "--main_process_port",
            "0",
            "--log_line_prefix_template",
            "<${local_rank}/${rank}> ",
        ],
        &[],
        &[],
    );
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("<1/1> rank 1 all_reduce sum = 3");
}

/// A failing rank: the launcher returns quickly, names the rank and cause, and leaves no process.
fn failing_rank(mode: &str, world: usize, expected_code: i32, expected_cause: &str) {
    let pids = tempfile::tempdir().unwrap();
    let n = world.to_string();
    // The other ranks would otherwise run for a minute: the launcher must stop them.
    let ran = launch(
        &["--num_processes", &n, "--cpu", "--main_process_port", "0"],
        &["--fail", &format!("1:{mode}"), "--sleep", "60"],
        &[("HASTEN_TEST_PID_DIR", pids.path().to_str().unwrap())],
    );
    assert_failed_cleanly(&ran, expected_code, "", expected_cause, pids.path(), world);
    ran.expect_stderr("rank 1 fails on purpose");
    if mode == "panic" {
        ran.expect_stderr(": rank 1 gives up\n");
    }
}

#[test]
fn a_panicking_rank_stops_the_group() {
    failing_rank("panic", 2, 101, "panicked at tests/bin/worker.rs");
    failing_rank("panic", 3, 101, "panicked at tests/bin/worker.rs");
}

#[test]
fn a_rank_exiting_with_3_stops_the_group() {
    failing_rank("exit3", 3, 3, "exited with code 3");
}

#[test]
fn a_sigkilled_rank_stops_the_group() {
    failing_rank("sigkill", 4, 137, "killed by signal 9 (SIGKILL)");
}

#[test]
fn a_rank_ignoring_sigterm_is_killed() {
    let pids = tempfile::tempdir().unwrap();
    let ran = launch(
        &["--num_processes", "3", "--cpu", "--main_process_port", "0"],
        &["--fail", "0:stubborn", "--fail", "2:exit3"],
        &[("HASTEN_TEST_PID_DIR", pids.path().to_str().unwrap())],
    );
    assert_eq!(ran.code, 3, "{}", ran.all());
    ran.expect_stderr("rank 2 failed: exited with code 3");
    assert!(
        ran.elapsed < Duration::from_secs(10),
        "took {:?}",
        ran.elapsed
    );
    for pid in recorded_pids(pids.path()) {
        assert!(!alive(pid), "process {pid} outlived the launcher");
    }
}

#[test]
fn max_restarts_reruns_the_group() {
    let ran = launch(
        &[
            "--num_processes",
            "2",
            "--cpu",
            "--main_process_port",
            "0",
            "--max_restarts",
            "2",
        ],
        &["--fail", "1:exit3"],
        &[],
    );
    assert_eq!(ran.code, 3, "{}", ran.all());
    ran.expect_stderr("restarting the group (1/2)");
    ran.expect_stderr("restarting the group (2/2)");
    assert_eq!(
        ran.stdout.matches("[rank0]: rank 0 of 2").count(),
        3,
        "{}",
        ran.all()
    );
}

#[test]
fn a_chosen_port_is_handed_to_rank_0_already_listening() {
    // Port 0: the launcher binds a free port and passes the socket to rank 0 (no window in which another
    // program could take it); the other ranks must not hold it.
    let ran = launch(
        &["--num_processes", "3", "--cpu", "--main_process_port", "0"],
        &["--show-listen-fd"],
        &[],
    );
    expect_clean_exit(&ran, 3);
    ran.expect_stdout("[rank0]: rank 0 inherited a listener: true");
    ran.expect_stdout("[rank1]: rank 1 inherited a listener: false");
    ran.expect_stdout("[rank2]: rank 2 inherited a listener: false");
}

#[test]
fn two_machines_on_loopback() {
    let port = free_port().to_string();
    let spawn = |machine: &str| {
        let mut cmd = Command::new(hasten());
        cmd.args([
            "launch",
            "--num_processes",
            "4",
            "--num_machines",
            "2",
            "--machine_rank",
            machine,
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            &port,
            "--cpu",
        ])
        .arg(worker())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd.spawn().expect("spawn hasten launch")
    };
    let second = spawn("1");
    let first = spawn("0");
    let start = std::time::Instant::now();
    let a = Ran::from_output(first.wait_with_output().unwrap(), start.elapsed());
    let b = Ran::from_output(second.wait_with_output().unwrap(), start.elapsed());
    assert_eq!(a.code, 0, "{}", a.all());
    assert_eq!(b.code, 0, "{}", b.all());
    for rank in 0..2 {
        a.expect_stdout(&format!(
            "[rank{rank}]: rank {rank} of 4 (local {rank} of 2) ready"
        ));
        a.expect_stdout(&format!("[rank{rank}]: rank {rank} all_reduce sum = 10"));
    }
    for (rank, local) in [(2, 0), (3, 1)] {
        b.expect_stdout(&format!(
            "[rank{rank}]: rank {rank} of 4 (local {local} of 2) ready"
        ));
        b.expect_stdout(&format!("[rank{rank}]: rank {rank} all_reduce sum = 10"));
    }
}

#[test]
fn bad_launch_arguments_are_refused_before_starting() {
    let ran = launch(&["--num_processes", "3", "--num_machines", "2"], &[], &[]);
    assert_eq!(ran.code, 1, "{}", ran.all());
    ran.expect_stderr("--num_processes 3");
    let ran = launch(&["--config_file", "/nonexistent/hasten.yaml"], &[], &[]);
    assert_eq!(ran.code, 1, "{}", ran.all());
    ran.expect_stderr("/nonexistent/hasten.yaml");
    let mut cmd = Command::new(hasten());
    cmd.args([
        "launch",
        "--num_processes",
        "2",
        "--cpu",
        "--main_process_port",
        "0",
        "/nonexistent/program",
    ]);
    let ran = run(cmd, &[]);
    assert_eq!(ran.code, 1, "{}", ran.all());
    ran.expect_stderr("could not start rank 0 (/nonexistent/program)");
}

#[test]
fn config_file_supplies_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.yaml");
    std::fs::write(
        &cfg,
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 3\nuse_cpu: true\n\
         debug: true\nmain_process_port: 0\nmixed_precision: 'no'\n",
    )
    .unwrap();
    let ran = launch(&["--config_file", cfg.to_str().unwrap()], &[], &[]);
    expect_clean_exit(&ran, 3);
}

#[test]
fn config_default_writes_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accelerate/default_config.yaml");
    let write = || {
        let mut cmd = Command::new(hasten());
        cmd.args([
            "config",
            "default",
            "--mixed_precision",
            "bf16",
            "--config_file",
        ])
        .arg(&path);
        run(cmd, &[])
    };
    let first = write();
    assert_eq!(first.code, 0, "{}", first.all());
    first.expect_stdout("hasten config saved at");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"mixed_precision\": \"bf16\""), "{text}");
    let second = write();
    assert_ne!(second.code, 0);
    second.expect_stderr("will not override");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}

#[test]
fn env_report_runs_without_ld_library_path() {
    let mut cmd = Command::new(hasten());
    cmd.args(["env", "--check"]).env_remove("LD_LIBRARY_PATH");
    let ran = run(cmd, &[]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("- libtorch version: 2.11.0");
    ran.expect_stdout("- Cpu (512x512): ok, max relative error");
}

/// A safetensors file holding only zeros: `estimate-memory` reads the header, never the data.
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, &str, &[usize], usize)]) {
    let mut offset = 0;
    let entries: Vec<String> = tensors
        .iter()
        .map(|(name, dtype, shape, elem)| {
            let bytes = shape.iter().product::<usize>() * elem;
            let entry = format!(
                r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{offset},{}]}}"#,
                offset + bytes
            );
            offset += bytes;
            entry
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.resize(file.len() + offset, 0);
    std::fs::write(path, file).unwrap();
}

#[test]
fn estimate_memory_prints_accelerates_table_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    // 256,000 B + 65,536 B in fp32: 314.0 KB in all, the embedding (250.0 KB) the largest layer.
    write_safetensors(
        &model,
        &[
            ("embed.weight", "F32", &[1000, 64], 4),
            ("0.up.weight", "F32", &[256, 64], 4),
        ],
    );
    let estimate = |args: &[&str]| {
        let mut cmd = Command::new(hasten());
        // Relative names keep the title narrower than the columns, as for a Hub model id.
        cmd.arg("estimate-memory")
            .args(args)
            .current_dir(dir.path());
        run(cmd, &[])
    };
    let ran = estimate(&["m.safetensors"]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("Memory Usage for loading `");
    ran.expect_stdout("│ dtype │Largest Layer│Total Size│Training using Adam│");
    ran.expect_stdout("│float32│   250.0 KB  │ 314.0 KB │      1.23 MB      │");
    ran.expect_stdout("│  int4 │   31.25 KB  │ 39.25 KB │        N/A        │");

    let ran = estimate(&["m.safetensors", "--dtypes", "bfloat16"]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("│bfloat16│   125.0 KB  │ 157.0 KB │      628.0 KB     │");
    assert!(!ran.stdout.contains("float32"), "{}", ran.all());

    let ran = estimate(&["m.safetensors", "--dtypes", "float8"]);
    assert_eq!(ran.code, 2, "{}", ran.all());
    ran.expect_stderr("invalid value 'float8' for '--dtypes");
    ran.expect_stderr("possible values: float32, float16, bfloat16, int8, int4");

    // A header that claims more bytes than the file holds: the error names the file.
    let corrupt = dir.path().join("corrupt.safetensors");
    let mut bytes = 4096u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"x\":");
    std::fs::write(&corrupt, bytes).unwrap();
    let ran = estimate(&["corrupt.safetensors"]);
    assert_eq!(ran.code, 1, "{}", ran.all());
    ran.expect_stderr("corrupt.safetensors");
}

#[test]
fn every_operation_through_hasten_launch_on_2_3_and_4_ranks() {
    for n in ["2", "3", "4"] {
        for debug in [false, true] {
            let mut args = vec!["--num_processes", n, "--cpu", "--main_process_port", "0"];
            if debug {
                args.push("--debug");
            }
            let ran = launch(&args, &["--ops"], &[]);
            assert_eq!(ran.code, 0, "{}", ran.all());
            for rank in 0..n.parse::<usize>().unwrap() {
                let line = format!(
                    "[rank{rank}]: ops checks on rank {rank} (cpu, {n} processes): 10 passed, 0 failed"
                );
                ran.expect_stdout(&line);
            }
        }
    }
}

#[test]
fn large_collectives_through_chunked_shared_memory_and_through_tcp() {
    // 1 MiB slots split the 2.4 MB tensors of the checks into chunks; 0 turns shared memory off.
    for slot_mb in ["1", "0"] {
        let ran = launch(
            &["--num_processes", "3", "--cpu", "--main_process_port", "0"],
            &["--ops"],
            &[("HASTEN_SHM_SLOT_MB", slot_mb)],
        );
        assert_eq!(ran.code, 0, "{}", ran.all());
        assert_eq!(
            ran.stdout.matches("10 passed, 0 failed").count(),
            3,
            "{}",
            ran.all()
        );
    }
}
