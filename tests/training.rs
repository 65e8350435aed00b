//! The training library's correctness on real processes (CPU, 2 and 3 ranks): DDP equals one process on
//! the concatenated batch, accumulation equals one larger batch, the data loader's end forces a sync, the
//! scheduler's step count, and gather_for_metrics covering the dataset exactly.

mod common;

use common::*;
use std::process::Command;

fn check(mode: &str) {
    check_with(mode, &[]);
}

/// The launcher flag for a precision `env` asks for: `hasten launch` exports its own
/// ACCELERATE_MIXED_PRECISION (from `--mixed_precision`, else `no`), as `accelerate launch` does, so the
/// variable set around it would never reach the workers.
fn precision_flag(env: &[(&str, &str)]) -> Vec<String> {
    env.iter()
        .filter(|(k, _)| *k == "ACCELERATE_MIXED_PRECISION")
        .flat_map(|(_, v)| ["--mixed_precision".to_string(), v.to_string()])
        .collect()
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
    .args(precision_flag(env))
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
fn an_unused_parameter_without_find_unused_parameters_is_an_error_naming_it() {
    check("ddp_unused_refused");
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

#[test]
fn an_iterable_dataset_read_by_every_rank_also_gathers_exactly() {
    check("metrics_iterable_shard");
}

#[test]
fn rng_types_synchronise_generators_when_an_epoch_starts() {
    check("rng_types");
    check("rng_types_default");
}

#[test]
fn batches_dispatched_from_process_0_are_accelerates() {
    check("dispatch");
}

/// Issue 14: skip_first_batches on a dispatching loader skips the loader's own batches, iterable loaders
/// skip and have a length, and split_batches with an odd batch size is refused when preparing, each with
/// the values Accelerate 1.15 gives on 2 and 3 processes.
#[test]
fn prepared_loaders_match_accelerate_on_2_and_3_processes() {
    check("loaders");
}

/// The Python that has TensorBoard (install/bootstrap.sh puts it in the test clients' venv).
fn python() -> String {
    std::env::var("HASTEN_PYTHON").expect(
        "HASTEN_PYTHON is not set: source the file install/bootstrap.sh prints (make test does)",
    )
}

#[test]
fn trackers_log_to_tensorboard_and_custom_trackers() {
    let project = tempfile::tempdir().unwrap();
    let ran = run_mode(2, "tracking", &[project.path().as_os_str()], &[]);
    // Accelerate skips trackers it cannot use; hasten says so, once (main process).
    assert_eq!(
        ran.all().matches("log_with `wandb` skipped").count(),
        1,
        "{}",
        ran.all()
    );
    // A custom tracker that is not main-process-only logs on every rank.
    for rank in 0..2 {
        let lines =
            std::fs::read_to_string(project.path().join(format!("custom_rank{rank}.txt"))).unwrap();
        assert!(lines.starts_with("config 5\n"), "{lines}");
        assert_eq!(lines.matches("step Some(").count(), 6, "{lines}");
    }
    // TensorBoard's own reader, checksums verified.
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/read_tensorboard.py"
        ))
        .arg(project.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = runs.as_object().unwrap();
    let main = &runs["run"];
    let loss: Vec<(u64, f64)> = serde_json::from_value(main["scalars"]["loss"].clone()).unwrap();
    let want = [1.0, 0.5, 1.0 / 3.0, 0.25, 0.2];
    assert_eq!(loss.len(), 5, "{main}");
    for (i, (step, value)) in loss.iter().enumerate() {
        assert_eq!(*step, i as u64);
        assert!((value - want[i]).abs() < 1e-7, "loss at {i}: {value}");
    }
    assert_eq!(main["scalars"]["direct"], serde_json::json!([[9, 42.0]]));
    assert_eq!(
        main["texts"]["status/text_summary"],
        serde_json::json!([[5, "done"]])
    );
    // add_scalars: one folder per curve, the chart's name as the tag.
    assert_eq!(
        runs["run/split_train"]["scalars"]["split"],
        serde_json::json!([[5, 0.5]])
    );
    assert_eq!(
        runs["run/split_eval"]["scalars"]["split"],
        serde_json::json!([[5, 0.75]])
    );
    // The hyperparameters: in a folder named by the time, with hparams.yml beside them.
    let (name, hp) = runs
        .iter()
        .find(|(k, v)| k.starts_with("run/1") && v["status"] == "STATUS_SUCCESS")
        .expect("an hparams run");
    assert_eq!(
        hp["hparams"],
        serde_json::json!({"lr": 0.01, "epochs": 3.0, "fp16": false, "optimizer": "adamw"})
    );
    assert_eq!(hp["hparam_types"]["fp16"], "DATA_TYPE_BOOL");
    let yml = std::fs::read_to_string(project.path().join(name).join("hparams.yml")).unwrap();
    assert_eq!(
        yml,
        "epochs: 3\nfp16: false\nlr: 0.01\noptimizer: adamw\nwarmup: null\n"
    );
    // Only rank 0 wrote: the run, its hparams folder and the two curves.
    assert_eq!(runs.len(), 4, "{:?}", runs.keys().collect::<Vec<_>>());
}

/// FSDP with every `hasten::layers::Block` a unit, as a config or `hasten launch` sets it.
const FSDP_BLOCKS: [(&str, &str); 4] = [
    ("ACCELERATE_USE_FSDP", "true"),
    ("FSDP_VERSION", "2"),
    ("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"),
    ("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block"),
];

/// README's loop with FSDP switched on by the environment alone (as `hasten launch` sets it for
/// `distributed_type: FSDP`), on `ranks` processes.
fn fsdp_check(ranks: &[usize], env: &[(&str, &str)]) {
    fsdp_mode("fsdp", ranks, env);
}

fn fsdp_mode(mode: &str, ranks: &[usize], env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("ACCELERATE_USE_FSDP", "true"));
    let bf16 = env.contains(&("ACCELERATE_MIXED_PRECISION", "bf16"));
    for &n in ranks {
        let ran = run_mode(n, mode, &[], &env);
        ran.expect_stdout("fsdp holds");
        if bf16 {
            ran.expect_stdout("mixed precision Bf16");
        }
    }
}

#[test]
fn fsdp_blocks_gather_only_while_they_run_and_match_one_process() {
    let blocks = [
        ("FSDP_VERSION", "2"),
        ("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"),
        ("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block"),
    ];
    fsdp_mode("fsdp_blocks", &[2, 3, 4], &blocks);
    let mut grad_op = blocks.to_vec();
    grad_op.push(("FSDP_RESHARD_AFTER_FORWARD", "false"));
    fsdp_mode("fsdp_blocks", &[2], &grad_op);
    // Blocks without a wrap policy: one unit, gathered for the whole forward.
    fsdp_mode("fsdp_blocks", &[2], &[("FSDP_VERSION", "2")]);
    // bf16: parameters gathered and gradients reduced in bf16, shards and AdamW in fp32.
    let mut bf16 = blocks.to_vec();
    bf16.push(("ACCELERATE_MIXED_PRECISION", "bf16"));
    fsdp_mode("fsdp_blocks", &[2, 3], &bf16);
    // Activation checkpointing: each block recomputed in its backward (the worker counts the runs),
    // with the same results; also with SHARD_GRAD_OP and under bf16's autocast.
    let mut ac = blocks.to_vec();
    ac.push(("FSDP_ACTIVATION_CHECKPOINTING", "true"));
    fsdp_mode("fsdp_blocks", &[2, 3], &ac);
    let mut ac_grad_op = ac.clone();
    ac_grad_op.push(("FSDP_RESHARD_AFTER_FORWARD", "false"));
    fsdp_mode("fsdp_blocks", &[2], &ac_grad_op);
    ac.push(("ACCELERATE_MIXED_PRECISION", "bf16"));
    fsdp_mode("fsdp_blocks", &[2], &ac);
    // Offloading accepted (on CPU ranks the shards are in host memory anyway: the results must not
    // change; the GPU run in bench/RESULTS.md moves them).
    let mut offload = blocks.to_vec();
    offload.push(("FSDP_OFFLOAD_PARAMS", "true"));
    fsdp_mode("fsdp_blocks", &[2], &offload);
}

#[test]
fn fsdp_full_shard_matches_one_process_with_uneven_shards_on_2_3_and_4_ranks() {
    fsdp_check(&[2, 3, 4], &[("FSDP_VERSION", "2")]);
}

#[test]
fn fsdp_shard_grad_op_and_per_block_units_match_one_process() {
    fsdp_check(
        &[2, 3],
        &[
            ("FSDP_VERSION", "2"),
            ("FSDP_RESHARD_AFTER_FORWARD", "false"),
            ("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"),
            ("FSDP_TRANSFORMER_CLS_TO_WRAP", "fc1,fc2"),
        ],
    );
    // FSDP1's names for the same thing.
    fsdp_check(
        &[2],
        &[
            ("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP"),
            ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP"),
            ("FSDP_MIN_NUM_PARAMS", "50"),
        ],
    );
}

#[test]
fn fsdp_loops_that_zero_late_evaluate_before_the_step_or_run_twice_match_one_process() {
    let mut env = FSDP_BLOCKS.to_vec();
    for n in [2, 3] {
        run_mode(n, "fsdp_semantics", &[], &env).expect_stdout("fsdp semantics hold");
    }
    env.push(("FSDP_RESHARD_AFTER_FORWARD", "false"));
    run_mode(2, "fsdp_semantics", &[], &env).expect_stdout("fsdp semantics hold");
}

#[test]
fn fsdp_save_state_and_load_state_resume_exactly_sharded_and_full() {
    let blocks = FSDP_BLOCKS;
    for kind in ["SHARDED_STATE_DICT", "FULL_STATE_DICT"] {
        let mut env = blocks.to_vec();
        env.push(("FSDP_STATE_DICT_TYPE", kind));
        for n in [2, 3] {
            let project = tempfile::tempdir().unwrap();
            run_mode(n, "fsdp_checkpoint", &[project.path().as_os_str()], &env)
                .expect_stdout("fsdp checkpoint resumes exactly");
            let dir = project.path().join("fsdp_ckpt");
            // (Under FULL_STATE_DICT the worker removed its chunk files to load the whole model.)
            let chunks_kept = kind == "SHARDED_STATE_DICT";
            for rank in 0..n {
                let chunks = dir.join(format!("pytorch_model_fsdp_0_rank{rank}.safetensors"));
                assert!(
                    chunks.is_file() == chunks_kept
                        && dir
                            .join(format!("optimizer_0_rank{rank}.safetensors"))
                            .is_file(),
                    "rank {rank}'s files are missing in {}",
                    dir.display()
                );
            }
        }
    }
}

#[test]
fn models_built_under_empty_weights_materialise_as_rank_0_would_and_load_in_slices() {
    let blocks = FSDP_BLOCKS;
    let runs: [(usize, &[(&str, &str)]); 4] = [
        (2, &blocks),
        (3, &blocks),
        (4, &blocks[..2]),
        // DDP: materialised whole on every rank, then rank 0's values broadcast.
        (2, &[]),
    ];
    for (n, env) in runs {
        let project = tempfile::tempdir().unwrap();
        run_mode(n, "fsdp_empty", &[project.path().as_os_str()], env)
            .expect_stdout("empty-weights init, save_model and sliced loading hold");
        let saved = project.path().join("saved");
        let files = std::fs::read_dir(&saved).unwrap().count();
        assert!(
            files > 2,
            "save_model wrote {files} files into {}",
            saved.display()
        );
    }
}

#[test]
fn tied_parameters_train_as_one_under_fsdp_and_ddp() {
    let blocks = FSDP_BLOCKS;
    for n in [2, 3] {
        run_mode(n, "fsdp_tied", &[], &blocks).expect_stdout("tied parameters train as one");
    }
    run_mode(2, "fsdp_tied", &[], &[]).expect_stdout("tied parameters train as one");
}

/// `mode` on `machines` machines of `per_machine` CPU ranks each, all on this host (one `hasten launch`
/// per machine, as on a cluster): every rank reports ok.
fn run_machines(
    (machines, per_machine): (usize, usize),
    mode: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> Vec<Ran> {
    let ran = launch_machines((machines, per_machine), mode, args, env);
    for (m, r) in ran.iter().enumerate() {
        assert_eq!(r.code, 0, "machine {m}: {}", r.all());
        for rank in m * per_machine..(m + 1) * per_machine {
            r.expect_stdout(&format!("[rank{rank}]: training check {mode}: ok"));
        }
    }
    ran
}

/// The launches of [`run_machines`], one per machine, as they ended.
fn launch_machines(
    (machines, per_machine): (usize, usize),
    mode: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> Vec<Ran> {
    let port = free_port().to_string();
    let (total, count) = ((machines * per_machine).to_string(), machines.to_string());
    std::thread::scope(|s| {
        let launches: Vec<_> = (0..machines)
            .map(|m| {
                let (port, total, count) = (&port, &total, &count);
                s.spawn(move || {
                    let mut cmd = Command::new(hasten());
                    cmd.args(["launch", "--num_processes", total, "--num_machines", count])
                        .args(["--machine_rank", &m.to_string(), "--cpu"])
                        .args([
                            "--main_process_ip",
                            "127.0.0.1",
                            "--main_process_port",
                            port,
                        ])
                        .args(precision_flag(env))
                        .arg(workspace_bin("hasten-test-training"))
                        .arg(mode)
                        .args(args);
                    run(cmd, env)
                })
            })
            .collect();
        launches.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_stuck_rank_in_a_hybrid_job_is_named_on_both_machines_and_the_job_ends() {
    // Rank 3 (machine 1) stops before its backward: its machine's partner waits in the shard group's
    // collectives, machine 0 in the replicas' average; all fail after the timeout naming rank 3.
    let mut env = FSDP_BLOCKS.to_vec();
    env.extend([
        ("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD"),
        ("HASTEN_COLLECTIVE_TIMEOUT", "2"),
        ("HASTEN_TEST_HANG_RANK", "3"),
    ]);
    let started = std::time::Instant::now();
    let ran = launch_machines((2, 2), "fsdp_blocks", &[], &env);
    for (m, r) in ran.iter().enumerate() {
        assert_ne!(r.code, 0, "machine {m}: {}", r.all());
        assert!(
            r.all().contains("rank 3 did not arrive"),
            "machine {m}: {}",
            r.all()
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn hybrid_shard_shards_within_each_machine_and_matches_one_process() {
    let mut hybrid = FSDP_BLOCKS.to_vec();
    hybrid.retain(|(k, _)| *k != "FSDP_VERSION");
    hybrid.push(("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD"));
    // 2 machines × 2 ranks: each machine's ranks hold half the model each; 2 × 3: uneven thirds; 3 × 1:
    // nothing sharded, every machine a replica.
    for (machines, per_machine) in [(2, 2), (2, 3), (3, 1)] {
        for r in run_machines((machines, per_machine), "fsdp_blocks", &[], &hybrid) {
            r.expect_stdout(&format!("sharded over {per_machine} ranks"));
        }
    }
    // SHARD_GRAD_OP's hybrid form, bf16, and the whole model as one unit.
    let mut zero2 = hybrid.clone();
    zero2.retain(|(k, _)| *k != "FSDP_SHARDING_STRATEGY");
    zero2.push(("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD_ZERO2"));
    run_machines((2, 2), "fsdp_blocks", &[], &zero2);
    let mut bf16 = hybrid.clone();
    bf16.push(("ACCELERATE_MIXED_PRECISION", "bf16"));
    for r in run_machines((2, 2), "fsdp_blocks", &[], &bf16) {
        r.expect_stdout("mixed precision Bf16");
    }
    run_machines(
        (2, 2),
        "fsdp",
        &[],
        &[
            ("ACCELERATE_USE_FSDP", "true"),
            ("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD"),
        ],
    );
    // On one machine HYBRID_SHARD is FULL_SHARD.
    fsdp_mode("fsdp_blocks", &[2], &hybrid);
    // Checkpoints: each rank writes its chunks (replicas too), or the main process the whole model;
    // both resume exactly.
    for kind in ["SHARDED_STATE_DICT", "FULL_STATE_DICT"] {
        let mut env = hybrid.clone();
        env.push(("FSDP_STATE_DICT_TYPE", kind));
        let project = tempfile::tempdir().unwrap();
        let project = project.path().as_os_str();
        for r in run_machines((2, 2), "fsdp_checkpoint", &[project], &env) {
            r.expect_stdout("fsdp checkpoint resumes exactly");
        }
    }
}

#[test]
fn a_parallelism_config_shards_within_dp_shard_size_ranks_and_replicates_across() {
    // FSDP2's HSDP, as `hasten launch --parallelism_config_*` exports it: 2 replicas of 2 shards, and 3
    // replicas of 2 shards (6 ranks); each group of dp_shard_size consecutive ranks shares the shards.
    let mut hsdp = FSDP_BLOCKS.to_vec();
    hsdp.extend([
        ("ACCELERATE_USE_PARALLELISM_CONFIG", "true"),
        ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2"),
    ]);
    for (n, replicas) in [(4, "2"), (6, "3")] {
        let mut env = hsdp.clone();
        env.push(("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", replicas));
        run_mode(n, "fsdp_blocks", &[], &env).expect_stdout("sharded over 2 ranks");
    }
    // No sizes under FSDP: one replica, sharded over every process (Accelerate builds no mesh then);
    // the worker checks that each rank holds a quarter.
    let mut plain = FSDP_BLOCKS.to_vec();
    plain.push(("ACCELERATE_USE_PARALLELISM_CONFIG", "true"));
    run_mode(4, "fsdp_blocks", &[], &plain).expect_stdout("sharded over 4 ranks");
    // Through the launcher's flags; and sizes that do not multiply to the number of processes fail on
    // every rank, naming them.
    let flags = |replicate: &str| {
        let mut cmd = Command::new(hasten());
        cmd.args([
            "launch",
            "--num_processes",
            "4",
            "--cpu",
            "--main_process_port",
            "0",
        ])
        .args(["--use_fsdp", "--fsdp_version", "2"])
        .args(["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"])
        .args(["--fsdp_transformer_layer_cls_to_wrap", "Block"])
        .args(["--parallelism_config_dp_replicate_size", replicate])
        .args(["--parallelism_config_dp_shard_size", "2"])
        .arg(workspace_bin("hasten-test-training"))
        .arg("fsdp_blocks");
        run(cmd, &[])
    };
    let ran = flags("2");
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("[rank3]: training check fsdp_blocks: ok");
    let ran = flags("3");
    assert_ne!(ran.code, 0, "{}", ran.all());
    ran.expect_stderr("total_size (6) does not match num_processes (4)");
}
