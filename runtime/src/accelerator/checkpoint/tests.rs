use super::*;
use crate::ProjectConfiguration;

fn names(dir: &Path) -> Vec<String> {
    numbered_checkpoints(dir)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn entries_count_and_sort_by_their_first_number_as_in_accelerate() {
    let dir = tempfile::tempdir().unwrap();
    for d in [
        "checkpoint_10",
        "checkpoint_9",
        "checkpoint_3.tmp",
        "run_2_of_10",
        "foo",
        "checkpoint_x",
    ] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    std::fs::write(dir.path().join("checkpoint_7"), "a file").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "").unwrap();
    assert_eq!(
        names(dir.path()),
        [
            "run_2_of_10",
            "checkpoint_3.tmp",
            "checkpoint_7",
            "checkpoint_9",
            "checkpoint_10"
        ]
    );
    assert_eq!(
        first_number(Path::new("checkpoint_007")),
        Some((1, "7".into()))
    );
    assert_eq!(
        first_number(Path::new("checkpoint_0")),
        Some((1, "0".into()))
    );
    assert_eq!(
        names(Path::new("/nonexistent/checkpoints")),
        Vec::<String>::new()
    );
}

fn saves(limit: Option<usize>, times: usize) -> Vec<String> {
    let project = tempfile::tempdir().unwrap();
    let mut acc = Accelerator::builder()
        .cpu(true)
        .project_config(ProjectConfiguration {
            project_dir: Some(project.path().to_owned()),
            automatic_checkpoint_naming: true,
            total_limit: limit,
            ..Default::default()
        })
        .build()
        .unwrap();
    for _ in 0..times {
        acc.save_state(None).unwrap();
    }
    names(&project.path().join("checkpoints"))
}

#[test]
fn total_limit_keeps_the_newest_and_zero_keeps_only_the_new_one() {
    // Accelerate 1.15, four saves from an empty folder.
    assert_eq!(
        saves(None, 4),
        [
            "checkpoint_0",
            "checkpoint_1",
            "checkpoint_2",
            "checkpoint_3"
        ]
    );
    assert_eq!(saves(Some(0), 4), ["checkpoint_3"]);
    assert_eq!(saves(Some(1), 4), ["checkpoint_3"]);
    assert_eq!(saves(Some(2), 4), ["checkpoint_2", "checkpoint_3"]);
    assert_eq!(saves(Some(2), 1), ["checkpoint_0"]);
}

#[test]
fn load_state_without_a_folder_picks_the_highest_number() {
    let project = tempfile::tempdir().unwrap();
    let config = ProjectConfiguration {
        project_dir: Some(project.path().to_owned()),
        automatic_checkpoint_naming: true,
        ..Default::default()
    };
    let mut acc = Accelerator::builder()
        .cpu(true)
        .project_config(config.clone())
        .build()
        .unwrap();
    for _ in 0..3 {
        acc.save_state(None).unwrap();
    }
    let checkpoints = project.path().join("checkpoints");
    // checkpoint_10 sorts after checkpoint_9 (numerically), and is what load_state picks.
    std::fs::rename(
        checkpoints.join("checkpoint_0"),
        checkpoints.join("checkpoint_10"),
    )
    .unwrap();
    let mut fresh = Accelerator::builder()
        .cpu(true)
        .project_config(config)
        .build()
        .unwrap();
    let loaded = fresh.load_state(None).unwrap();
    assert_eq!(loaded, checkpoints.join("checkpoint_10"));
    // hasten continues after the loaded checkpoint (Accelerate keeps its iteration at 0, so its next
    // save fails on the existing checkpoint_0; see README).
    assert_eq!(fresh.project_config().iteration, 11);
}

/// A user object with a step count and a running mean, for register_for_checkpointing.
struct Meter {
    steps: i64,
    mean: f64,
}

impl Checkpointable for Meter {
    fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("steps".into(), Tensor::from(self.steps)),
            ("mean".into(), Tensor::from(self.mean)),
        ])
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let get = |name: &str| {
            state
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| Error::InvalidValue {
                    name: name.into(),
                    detail: "missing from the meter's state".into(),
                })
        };
        let (steps, mean) = (get("steps")?, get("mean")?);
        self.steps = steps.int64_value(&[]);
        self.mean = mean.double_value(&[]);
        Ok(())
    }
}

#[test]
fn registered_objects_are_saved_and_restored_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut acc = Accelerator::builder().cpu(true).build().unwrap();
    let meter = Arc::new(Mutex::new(Meter {
        steps: 7,
        mean: 0.25,
    }));
    acc.register_for_checkpointing(meter.clone());
    let saved = acc.save_state(Some(&dir.path().join("ckpt"))).unwrap();
    assert!(saved.join("custom_checkpoint_0.safetensors").is_file());
    *meter.lock().unwrap() = Meter {
        steps: 9,
        mean: 1.5,
    };
    acc.load_state(Some(&saved)).unwrap();
    let m = meter.lock().unwrap();
    assert_eq!((m.steps, m.mean), (7, 0.25));
    drop(m);
    // A second registration: the checkpoint holds one object, this Accelerator two.
    acc.register_for_checkpointing(Arc::new(Mutex::new(Meter {
        steps: 0,
        mean: 0.0,
    })));
    let err = acc.load_state(Some(&saved)).unwrap_err().to_string();
    assert!(
        err.contains("custom_objects") && err.contains("has 1"),
        "{err}"
    );
    // A damaged object file is an error naming it, and the object keeps its state.
    let mut fresh = Accelerator::builder().cpu(true).build().unwrap();
    let other = Arc::new(Mutex::new(Meter {
        steps: 3,
        mean: 3.0,
    }));
    fresh.register_for_checkpointing(other.clone());
    let file = saved.join("custom_checkpoint_0.safetensors");
    std::fs::write(&file, b"not safetensors").unwrap();
    let err = fresh.load_state(Some(&saved)).unwrap_err().to_string();
    assert!(err.contains("custom_checkpoint_0.safetensors"), "{err}");
    assert_eq!(other.lock().unwrap().steps, 3);
}
