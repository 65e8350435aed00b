//! The demo training program under `hasten launch` and inside `notebook_launcher`.

mod common;

use common::*;
use std::process::Command;

fn demo() -> std::path::PathBuf {
    workspace_bin("examples/train_demo")
}

/// The last epoch's test accuracy, in percent, from the main rank's report.
fn final_accuracy(stdout: &str) -> f64 {
    stdout
        .lines()
        .filter_map(|l| l.split("test accuracy ").nth(1))
        .filter_map(|rest| rest.split('%').next()?.parse().ok())
        .next_back()
        .unwrap_or(0.0)
}

#[test]
fn the_demo_trains_on_two_processes_through_hasten_launch() {
    for precision in ["no", "bf16"] {
        let mut cmd = Command::new(hasten());
        cmd.args([
            "launch",
            "--num_processes",
            "2",
            "--cpu",
            "--main_process_port",
            "0",
            "--mixed_precision",
            precision,
        ])
        .arg(demo());
        let ran = run(cmd, &[]);
        assert_eq!(ran.code, 0, "{}", ran.all());
        ran.expect_stdout(&format!(
            "[rank0]: training on 2 process(es), Cpu (MULTI_CPU), mixed precision {precision}"
        ));
        ran.expect_stdout("[rank0]: epoch 5: loss");
        assert!(
            !ran.stdout.contains("[rank1]: epoch"),
            "only the main process prints: {}",
            ran.all()
        );
        let accuracy = final_accuracy(&ran.stdout);
        assert!(accuracy >= 95.0, "accuracy {accuracy}%\n{}", ran.all());
    }
}

#[test]
fn the_demo_trains_inside_notebook_launcher() {
    let mut cmd = Command::new(demo());
    cmd.args(["--notebook", "3"])
        .env("CUDA_VISIBLE_DEVICES", "");
    let ran = run(cmd, &[]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stderr("Launching training on 3 CPUs.");
    ran.expect_stdout("[rank0]: training on 3 process(es)");
    ran.expect_stdout("notebook_launcher returned the main rank's accuracy: 0.9");
}

#[test]
fn the_big_model_example_splits_loads_and_matches_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(workspace_bin("examples/big_model"));
    cmd.arg(dir.path());
    let ran = run(cmd, &[]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    ran.expect_stdout("layers.5 -> Disk");
    // Disk blocks read their weights for their forward only, then hold placeholders again: as many
    // tensors as were offloaded.
    let stdout = ran.all();
    let offloaded = stdout
        .split("offloaded ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("the example reports what it offloaded");
    ran.expect_stdout(&format!(
        "{offloaded} offloaded tensors hold only placeholders again"
    ));
    ran.expect_stdout("big model: dispatched output matches the CPU reference");
    let index = std::fs::read_to_string(dir.path().join("offload/index.json")).unwrap();
    assert!(index.contains("\"layers.5.weight\""), "{index}");
}
