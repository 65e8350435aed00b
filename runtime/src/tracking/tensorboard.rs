//! TensorBoard: a `SummaryWriter` with PyTorch's file layout, and Accelerate's `TensorBoardTracker` on it.

use super::event::{self, HParam};
use super::{GeneralTracker, LogValue};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Writes one TensorBoard event file in a folder, as `torch.utils.tensorboard.SummaryWriter`: the file is
/// `events.out.tfevents.{time}.{host}.{pid}.{n}`, `add_scalars` writes each curve to its own sub-folder, and
/// `add_hparams` to a sub-folder named by the time.
pub struct SummaryWriter {
    dir: PathBuf,
    path: PathBuf,
    file: BufWriter<File>,
    /// `add_scalars`' writers, by sub-folder.
    curves: BTreeMap<String, SummaryWriter>,
}

impl std::fmt::Debug for SummaryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SummaryWriter")
            .field("path", &self.path)
            .finish()
    }
}

impl SummaryWriter {
    /// Creates `dir` (and its parents) and a new event file in it.
    pub fn new(dir: impl AsRef<Path>) -> Result<Self> {
        // Writers opened in the same second by one process still get distinct files.
        static OPENED: AtomicUsize = AtomicUsize::new(0);
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            op: "creating the TensorBoard folder",
            path: dir.clone(),
            source,
        })?;
        let now = wall_time();
        let host = String::from_utf8_lossy(&crate::distributed::hostname()).into_owned();
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.{}",
            now as u64,
            std::process::id(),
            OPENED.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = File::create(&path).map_err(|source| Error::Io {
            op: "creating",
            path: path.clone(),
            source,
        })?;
        let mut writer = SummaryWriter {
            dir,
            path,
            file: BufWriter::new(file),
            curves: BTreeMap::new(),
        };
        writer.write(&event::file_version_event(now))?;
        writer.flush()?;
        Ok(writer)
    }

    /// The folder this writer logs to.
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(&event::record(data))
            .map_err(|source| Error::Io {
                op: "writing",
                path: self.path.clone(),
                source,
            })
    }

    fn summary(&mut self, step: Option<u64>, values: Vec<event::Message>) -> Result<()> {
        let step = step.map_or(0, |s| s as i64);
        self.write(&event::summary_event(wall_time(), step, values))
    }

    /// A point of the curve `tag` (stored as a 32-bit float, as TensorBoard's `simple_value`).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: Option<u64>) -> Result<()> {
        self.summary(step, vec![event::scalar_value(tag, value as f32)])
    }

    /// Text under `{tag}/text_summary` in the Text tab.
    pub fn add_text(&mut self, tag: &str, text: &str, step: Option<u64>) -> Result<()> {
        self.summary(step, vec![event::text_value(tag, text)])
    }

    /// Several curves drawn on one chart `main_tag`: each in the sub-folder `{main_tag}_{name}`.
    pub fn add_scalars(
        &mut self,
        main_tag: &str,
        values: &[(String, f64)],
        step: Option<u64>,
    ) -> Result<()> {
        for (name, value) in values {
            let sub = format!("{}_{name}", main_tag.replace('/', "_"));
            let writer = match self.curves.entry(sub) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let writer = SummaryWriter::new(self.dir.join(e.key()))?;
                    e.insert(writer)
                }
            };
            writer.add_scalar(main_tag, *value, step)?;
        }
        Ok(())
    }

    /// Hyperparameters for the HParams tab, in the sub-folder `run_name`, with `metrics` logged there as
    /// scalars (PyTorch's `add_hparams`). Entries without a value are left out, as PyTorch does.
    pub fn add_hparams(
        &mut self,
        hparams: &[(String, LogValue)],
        metrics: &[(String, f64)],
        run_name: &str,
    ) -> Result<PathBuf> {
        let mut values = Vec::new();
        for (name, v) in hparams {
            let hp = match v {
                LogValue::Int(i) => HParam::Number(*i as f64),
                LogValue::Float(x) => HParam::Number(*x),
                LogValue::Bool(b) => HParam::Flag(*b),
                LogValue::Str(s) => HParam::Text(s.clone()),
                LogValue::None => continue,
                LogValue::Scalars(_) => {
                    return Err(Error::InvalidValue {
                        name: format!("hyperparameter {name:?}"),
                        detail: "a hyperparameter is an int, float, str, bool or None, not a dict"
                            .into(),
                    });
                }
            };
            values.push((name.clone(), hp));
        }
        let names: Vec<String> = metrics.iter().map(|(n, _)| n.clone()).collect();
        let mut w = SummaryWriter::new(self.dir.join(run_name))?;
        w.summary(None, event::hparams_values(&values, &names))?;
        for (name, value) in metrics {
            w.add_scalar(name, *value, None)?;
        }
        w.flush()?;
        Ok(w.dir.clone())
    }

    /// Writes buffered events to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|source| Error::Io {
            op: "writing",
            path: self.path.clone(),
            source,
        })?;
        for w in self.curves.values_mut() {
            w.flush()?;
        }
        Ok(())
    }
}

impl Drop for SummaryWriter {
    fn drop(&mut self) {
        // Losing the last events of a run that ended without `end_training` helps no one; errors here
        // have nowhere to go.
        let _ = self.file.flush();
    }
}

/// Accelerate's `TensorBoardTracker`: logs to `{logging_dir}/{run_name}`.
#[derive(Debug)]
pub struct TensorBoardTracker {
    run_name: String,
    logging_dir: PathBuf,
    writer: Option<SummaryWriter>,
}

impl TensorBoardTracker {
    /// A tracker for the run `run_name` (the project name given to `init_trackers`); nothing is written
    /// before `start`.
    pub fn new(run_name: impl Into<String>, logging_dir: impl Into<PathBuf>) -> Self {
        TensorBoardTracker {
            run_name: run_name.into(),
            logging_dir: logging_dir.into(),
            writer: None,
        }
    }

    /// The writer (Accelerate's `tracker` property), once started.
    pub fn writer(&mut self) -> Option<&mut SummaryWriter> {
        self.writer.as_mut()
    }

    fn started(&mut self) -> Result<&mut SummaryWriter> {
        self.writer.as_mut().ok_or_else(|| Error::InvalidValue {
            name: "tensorboard tracker".into(),
            detail: format!(
                "not started (call init_trackers first); it would log to {}",
                self.logging_dir.join(&self.run_name).display()
            ),
        })
    }
}

impl GeneralTracker for TensorBoardTracker {
    fn name(&self) -> &str {
        "tensorboard"
    }

    fn requires_logging_directory(&self) -> bool {
        true
    }

    fn start(&mut self) -> Result<()> {
        self.writer = Some(SummaryWriter::new(self.logging_dir.join(&self.run_name))?);
        Ok(())
    }

    /// The HParams summaries plus `hparams.yml` (keys sorted, as PyYAML's `dump`), both in a sub-folder
    /// named by the time (Accelerate makes two such folders, one for each; one is easier to find).
    fn store_init_configuration(&mut self, values: &[(String, LogValue)]) -> Result<()> {
        let run = format!("{}", wall_time());
        let writer = self.started()?;
        let dir = writer.add_hparams(values, &[], &run)?;
        writer.flush()?;
        let yaml: BTreeMap<&str, serde_json::Value> = values
            .iter()
            .map(|(k, v)| (k.as_str(), yaml_value(v)))
            .collect();
        let path = dir.join("hparams.yml");
        let text = serde_norway::to_string(&yaml).map_err(|e| Error::InvalidValue {
            name: "init_trackers config".into(),
            detail: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(|source| Error::Io {
            op: "writing",
            path,
            source,
        })
    }

    /// Numbers become scalars, text goes to the Text tab, a [`LogValue::Scalars`] becomes one chart of
    /// several curves; the file is flushed after each call, as Accelerate does.
    fn log(&mut self, values: &[(String, LogValue)], step: Option<u64>) -> Result<()> {
        let writer = self.started()?;
        for (name, v) in values {
            match v {
                LogValue::Str(s) => writer.add_text(name, s, step)?,
                LogValue::Scalars(curves) => writer.add_scalars(name, curves, step)?,
                LogValue::None => {}
                number => {
                    if let Some(x) = number.as_f64() {
                        writer.add_scalar(name, x, step)?;
                    }
                }
            }
        }
        writer.flush()
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(mut w) = self.writer.take() {
            w.flush()?;
        }
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

fn yaml_value(v: &LogValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        LogValue::Int(i) => Value::from(*i),
        LogValue::Float(x) => Value::from(*x),
        LogValue::Bool(b) => Value::from(*b),
        LogValue::Str(s) => Value::from(s.as_str()),
        LogValue::None => Value::Null,
        LogValue::Scalars(c) => Value::Object(
            c.iter()
                .map(|(k, x)| (k.clone(), Value::from(*x)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracker_used_before_init_trackers_says_so() {
        let mut t = TensorBoardTracker::new("run", "/tmp/nowhere");
        let e = t
            .log(&[("loss".into(), LogValue::Float(1.0))], None)
            .unwrap_err();
        assert!(e.to_string().contains("init_trackers"), "{e}");
        assert!(e.to_string().contains("/tmp/nowhere/run"), "{e}");
    }

    #[test]
    fn a_dict_is_not_a_hyperparameter() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TensorBoardTracker::new("run", dir.path());
        t.start().unwrap();
        let e = t
            .store_init_configuration(&[("d".into(), vec![("a", 1.0)].into())])
            .unwrap_err();
        assert!(e.to_string().contains("\"d\""), "{e}");
    }

    #[test]
    fn every_writer_has_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = SummaryWriter::new(dir.path()).unwrap();
        let b = SummaryWriter::new(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        // The file-version record is on disk at once (a reader started early sees a valid file).
        assert!(std::fs::metadata(a.path()).unwrap().len() > 16);
    }
}
