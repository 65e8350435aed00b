//! Experiment tracking on the Accelerator: `init_trackers`, `log`, `get_tracker`, `end_training`, with
//! Accelerate's rules (trackers act on the main process unless they say otherwise; TensorBoard needs a
//! logging folder, checked when the Accelerator is built).

use super::{Accelerator, ProjectConfiguration};
use crate::tracking::{CustomTracker, GeneralTracker, LogValue, TensorBoardTracker};
use crate::{Error, LoggerType, Result};
use std::path::PathBuf;

/// The trackers an Accelerator will start: the built-in kinds asked for and the custom ones given.
#[derive(Debug, Default)]
pub(super) struct TrackerPlan {
    /// Built-in trackers to create in `init_trackers` (TensorBoard is the only one hasten has).
    pub(super) kinds: Vec<LoggerType>,
    pub(super) logging_dir: Option<PathBuf>,
    pub(super) custom: Vec<CustomTracker>,
}

/// Accelerate's `filter_trackers`: drops repeats, expands `all`, requires a logging folder for TensorBoard
/// (an error naming the setting), and skips the trackers that need a Python service with a warning
/// (Accelerate skips those it cannot import silently, which hides a typo'd setup).
pub(super) fn plan(
    log_with: &[LoggerType],
    project: &ProjectConfiguration,
    custom: Vec<CustomTracker>,
    is_main: bool,
) -> Result<TrackerPlan> {
    let logging_dir = project
        .logging_dir
        .clone()
        .or_else(|| project.project_dir.clone());
    let all = log_with.contains(&LoggerType::All);
    let mut kinds = Vec::new();
    for kind in log_with {
        match kind {
            LoggerType::All => {}
            LoggerType::Tensorboard => {
                if logging_dir.is_none() {
                    return Err(Error::InvalidValue {
                        name: "log_with".into(),
                        detail: "logging with `tensorboard` requires a logging folder: set \
                                 ProjectConfiguration's project_dir or logging_dir"
                            .into(),
                    });
                }
                if !kinds.contains(kind) {
                    kinds.push(*kind);
                }
            }
            other => {
                if is_main {
                    crate::log::event!(
                        warn,
                        target: "hasten::tracking",
                        "hasten: warning: log_with `{other}` skipped: hasten writes TensorBoard natively; \
                         for {other}, pass a GeneralTracker of your own to AcceleratorBuilder::tracker"
                    );
                }
            }
        }
    }
    // `all` means every tracker available: TensorBoard, where there is a folder for it.
    if all && logging_dir.is_some() && !kinds.contains(&LoggerType::Tensorboard) {
        kinds.push(LoggerType::Tensorboard);
    }
    Ok(TrackerPlan {
        kinds,
        logging_dir,
        custom,
    })
}

impl Accelerator {
    /// Starts a run named `project_name` on every tracker (TensorBoard writes to
    /// `{logging_dir}/{project_name}`) and stores `config` as its hyperparameters (Accelerate's
    /// `init_trackers`). Trackers act on the main process only unless they say otherwise.
    pub fn init_trackers(
        &mut self,
        project_name: &str,
        config: &[(String, LogValue)],
    ) -> Result<()> {
        let plan = &mut self.tracker_plan;
        for kind in std::mem::take(&mut plan.kinds) {
            if kind == LoggerType::Tensorboard {
                let dir = plan.logging_dir.clone().unwrap_or_default();
                self.trackers
                    .push(Box::new(TensorBoardTracker::new(project_name, dir)));
            }
        }
        self.trackers
            .extend(std::mem::take(&mut plan.custom).into_iter().map(|c| c.0));
        let is_main = self.is_main_process();
        for t in self.trackers.iter_mut() {
            if is_main || !t.main_process_only() {
                t.start()?;
                if !config.is_empty() {
                    t.store_init_configuration(config)?;
                }
            }
        }
        Ok(())
    }

    /// Logs `values` at `step` to every tracker (main process only, as Accelerate). Build the values with
    /// [`crate::tracking::log_values`]: `accelerator.log(&log_values([("loss", 0.5), ("lr", 1e-3)]), Some(step))`.
    pub fn log(&mut self, values: &[(String, LogValue)], step: Option<u64>) -> Result<()> {
        let is_main = self.is_main_process();
        for t in self.trackers.iter_mut() {
            if is_main || !t.main_process_only() {
                t.log(values, step)?;
            }
        }
        Ok(())
    }

    /// The tracker named `name` (`"tensorboard"`, or a custom tracker's name); `as_any_mut().downcast_mut`
    /// reaches its concrete type, e.g. [`TensorBoardTracker::writer`]. An unknown name is an error listing
    /// the trackers there are.
    pub fn get_tracker(&mut self, name: &str) -> Result<&mut dyn GeneralTracker> {
        match self.trackers.iter().position(|t| t.name() == name) {
            Some(i) => Ok(self.trackers[i].as_mut()),
            None => Err(Error::InvalidValue {
                name: "tracker".into(),
                detail: format!(
                    "{name:?} is not a tracker of this Accelerator (it has: {}; did init_trackers run?)",
                    if self.trackers.is_empty() {
                        "none".into()
                    } else {
                        let names: Vec<&str> = self.trackers.iter().map(|t| t.name()).collect();
                        names.join(", ")
                    }
                ),
            }),
        }
    }

    /// Finishes every tracker (flushes and closes TensorBoard's files), as Accelerate's `end_training`.
    pub fn end_training(&mut self) -> Result<()> {
        let is_main = self.is_main_process();
        for mut t in std::mem::take(&mut self.trackers) {
            if is_main || !t.main_process_only() {
                t.finish()?;
            }
        }
        Ok(())
    }
}

impl super::AcceleratorBuilder {
    /// Adds a tracker of your own (Accelerate's custom `GeneralTracker` in `log_with`); it is started by
    /// `init_trackers` with the built-in ones.
    pub fn tracker(mut self, tracker: impl GeneralTracker + 'static) -> Self {
        self.custom_trackers.push(CustomTracker(Box::new(tracker)));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(dir: Option<&str>) -> ProjectConfiguration {
        ProjectConfiguration {
            project_dir: dir.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn tensorboard_needs_a_logging_folder() {
        let e = plan(&[LoggerType::Tensorboard], &project(None), Vec::new(), true).unwrap_err();
        assert!(e.to_string().contains("logging_dir"), "{e}");
        let p = plan(
            &[
                LoggerType::Tensorboard,
                LoggerType::Tensorboard,
                LoggerType::Wandb,
            ],
            &project(Some("/tmp/p")),
            Vec::new(),
            false,
        )
        .unwrap();
        assert_eq!(p.kinds, [LoggerType::Tensorboard]);
        assert_eq!(
            p.logging_dir.as_deref(),
            Some(std::path::Path::new("/tmp/p"))
        );
    }

    #[test]
    fn logging_dir_wins_over_the_project_folder_and_all_means_tensorboard_where_it_can() {
        let config = ProjectConfiguration {
            logging_dir: Some("/tmp/logs".into()),
            ..project(Some("/tmp/p"))
        };
        let p = plan(&[LoggerType::All], &config, Vec::new(), false).unwrap();
        assert_eq!(p.kinds, [LoggerType::Tensorboard]);
        assert_eq!(
            p.logging_dir.as_deref(),
            Some(std::path::Path::new("/tmp/logs"))
        );
        // Without a folder, `all` has nothing built in to start (custom trackers still are).
        let p = plan(&[LoggerType::All], &project(None), Vec::new(), false).unwrap();
        assert!(p.kinds.is_empty());
    }
}
