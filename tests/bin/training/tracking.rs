//! The `tracking PROJECT_DIR` check of `hasten-test-training`: TensorBoard and a custom tracker.

use super::{Check, err};
use hasten::Accelerator;

/// A custom tracker that acts on every process (`main_process_only` false): one line per call in
/// `custom_rank{r}.txt`.
pub struct LinesTracker {
    path: std::path::PathBuf,
    lines: Vec<String>,
}

impl LinesTracker {
    pub fn new(path: std::path::PathBuf) -> Self {
        LinesTracker {
            path,
            lines: Vec::new(),
        }
    }
}

impl hasten::tracking::GeneralTracker for LinesTracker {
    fn name(&self) -> &str {
        "lines"
    }

    fn main_process_only(&self) -> bool {
        false
    }

    fn store_init_configuration(
        &mut self,
        values: &[(String, hasten::tracking::LogValue)],
    ) -> hasten::Result<()> {
        self.lines.push(format!("config {}", values.len()));
        Ok(())
    }

    fn log(
        &mut self,
        values: &[(String, hasten::tracking::LogValue)],
        step: Option<u64>,
    ) -> hasten::Result<()> {
        self.lines.push(format!("step {step:?}: {values:?}"));
        Ok(())
    }

    fn finish(&mut self) -> hasten::Result<()> {
        std::fs::write(&self.path, self.lines.join("\n") + "\n").map_err(|source| {
            hasten::Error::Io {
                op: "writing",
                path: self.path.clone(),
                source,
            }
        })
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Logs a short run to TensorBoard and the custom tracker; `tests/training.rs` reads the event files back
/// with TensorBoard's own reader.
pub fn tracking(acc: &mut Accelerator) -> Check {
    use hasten::tracking::{LogValue, TensorBoardTracker, log_values};
    let config = log_values([
        ("lr", LogValue::from(0.01)),
        ("epochs", 3.into()),
        ("fp16", false.into()),
        ("optimizer", "adamw".into()),
        ("warmup", LogValue::None),
    ]);
    acc.init_trackers("run", &config).map_err(err)?;
    for step in 0..5u64 {
        let loss = 1.0 / (step + 1) as f64;
        acc.log(&log_values([("loss", loss), ("lr", 0.01)]), Some(step))
            .map_err(err)?;
    }
    acc.log(
        &log_values([
            ("status", LogValue::from("done")),
            ("split", vec![("train", 0.5), ("eval", 0.75)].into()),
        ]),
        Some(5),
    )
    .map_err(err)?;
    // The writer itself (Accelerate's `get_tracker(name, unwrap=True)`): started on the main process only.
    let is_main = acc.is_main_process();
    let tb = acc.get_tracker("tensorboard").map_err(err)?;
    let writer = tb
        .as_any_mut()
        .downcast_mut::<TensorBoardTracker>()
        .ok_or("get_tracker(\"tensorboard\") is not a TensorBoardTracker")?
        .writer();
    match (writer, is_main) {
        (Some(w), true) => w.add_scalar("direct", 42.0, Some(9)).map_err(err)?,
        (None, false) => {}
        (w, _) => {
            return Err(format!(
                "writer present: {}, main process: {is_main}",
                w.is_some()
            ));
        }
    }
    match acc.get_tracker("wandb") {
        Err(e) if e.to_string().contains("tensorboard, lines") => {}
        other => {
            return Err(format!(
                "get_tracker(\"wandb\") gave {:?}",
                other.map(|t| t.name().to_owned())
            ));
        }
    }
    acc.end_training().map_err(err)
}
