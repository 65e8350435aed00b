//! `save_state` / `load_state`: everything needed to resume training, in one folder.
//!
//! The folder holds, as in Accelerate, one weights file per prepared model (`model.safetensors`,
//! `model_1.safetensors`…, interchangeable with Accelerate's), one state file per optimizer
//! (`optimizer.safetensors`…: PyTorch's per-parameter state flattened to `{index}.{field}`), each
//! process's generator states (`random_states_{rank}.safetensors`), and `accelerator_state.json` with the
//! scalar rest (learning rates, scheduler steps, the fp16 scaler, the accumulation step). Accelerate
//! pickles optimizers, schedulers and RNG states (`optimizer.bin`, `scheduler.bin`,
//! `random_states_0.pkl`); hasten cannot read or write pickles, so those files differ by design.
//!
//! Loading checks every file (presence, tensor names, shapes) before changing anything, so a damaged or
//! mismatched checkpoint is an error naming the file and tensor and the training state is untouched.

use super::Accelerator;
use super::ddp::ModelEntry;
use super::durable;
use crate::{Error, Result, SAFE_WEIGHTS_NAME};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tch::Tensor;

mod sharded;
use sharded::{LoadedModel, ShardedSave, rank_file};

/// The JSON file with the scalar state.
pub const ACCELERATOR_STATE_NAME: &str = "accelerator_state.json";
const FORMAT: &str = "hasten-checkpoint/1";

fn numbered(stem: &str, i: usize, ext: &str) -> String {
    if i == 0 {
        format!("{stem}.{ext}")
    } else {
        format!("{stem}_{i}.{ext}")
    }
}

/// A checkpoint error naming the file.
pub(in crate::accelerator) fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// Writes a safetensors file and flushes it to the disk.
fn write_tensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let on_cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&on_cpu, path).map_err(|e| bad(path, format!("writing: {e}")))?;
    durable::sync(path)
}

/// Deletes the oldest checkpoints under `base` beyond `limit`, keeping `newest` (just written): what
/// Accelerate does before saving, done after, so a kill in between never leaves fewer checkpoints.
fn rotate_checkpoints(base: &Path, newest: &Path, limit: usize) -> Result<()> {
    let older: Vec<PathBuf> = numbered_checkpoints(base)?
        .into_iter()
        .filter(|p| p != newest)
        .collect();
    // total_limit 0 keeps only the new one, as in Accelerate (which counts one more than there is).
    let excess = (older.len() + 1).saturating_sub(limit).min(older.len());
    if excess > 0 {
        crate::log::event!(
            info,
            target: "hasten::checkpoint",
            "hasten: deleting {excess} checkpoints to make room for new checkpoint."
        );
    }
    for old in &older[..excess] {
        std::fs::remove_dir_all(old).map_err(|e| Error::io("deleting", old, e))?;
    }
    Ok(())
}

/// Reads a safetensors file after checking its header against its size.
fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(bad(path, "missing"));
    }
    crate::big_modeling::read_safetensors_entries(path)?;
    Tensor::read_safetensors(path).map_err(|e| bad(path, format!("unreadable: {e}")))
}

/// The first run of digits in an entry's name, as Accelerate orders the entries of `checkpoints/`
/// (`re.findall(r"[\/]?([0-9]+)(?=[^\/]*$)", folder)[0]`): numerically, with the digits read as one
/// number however long.
fn first_number(path: &Path) -> Option<(usize, String)> {
    let name = path.file_name()?.to_str()?;
    let start = name.find(|c: char| c.is_ascii_digit())?;
    let digits: String = name[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let trimmed = match digits.trim_start_matches('0') {
        "" => "0".to_owned(),
        t => t.to_owned(),
    };
    // Compare by length, then by digits: the numeric order of numbers of any size.
    Some((trimmed.len(), trimmed))
}

/// The entries of `dir` that count as checkpoints under automatic naming, oldest first. As in
/// Accelerate, every entry whose name holds a number counts, folder or not, whatever else its name says,
/// ordered by that number (ties by name). Accelerate fails on an entry without a number (an IndexError
/// while sorting); hasten leaves such entries alone.
fn numbered_checkpoints(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<((usize, String), String, PathBuf)> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            // hasten's staging folders (hidden) are never checkpoints.
            .filter(|p| !durable::is_hidden(p))
            .filter_map(|p| {
                let key = first_number(&p)?;
                let name = p.file_name()?.to_string_lossy().into_owned();
                Some((key, name, p))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io("listing", dir, e)),
    };
    found.sort();
    Ok(found.into_iter().map(|(_, _, p)| p).collect())
}

/// The file of the `i`-th object registered for checkpointing.
fn custom_name(i: usize) -> String {
    format!("custom_checkpoint_{i}.safetensors")
}

/// What [`Accelerator::register_for_checkpointing`] takes: an object whose state is named tensors
/// (Accelerate asks for `state_dict` and `load_state_dict`). Numbers go in as 0-d tensors.
pub trait Checkpointable: Send {
    /// The state to save.
    fn state_dict(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores what `state_dict` returned. Check every tensor before changing anything: an error
    /// must leave the object as it was (`load_state` reports it naming the file).
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()>;
}

/// A prepared model's bookkeeping, even if a thread panicked while holding it.
fn lock_entry(entry: &std::sync::Mutex<ModelEntry>) -> std::sync::MutexGuard<'_, ModelEntry> {
    entry.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks that the saved weights of a model match its variables, naming the first difference.
fn check_weights(path: &Path, saved: &[(String, Tensor)], entry: &ModelEntry) -> Result<()> {
    for (name, var) in &entry.named {
        let t = saved
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| bad(path, format!("tensor {name} is missing")))?;
        if t.size() != var.size() {
            return Err(bad(
                path,
                format!(
                    "tensor {name} has shape {:?}, the model's is {:?}",
                    t.size(),
                    var.size()
                ),
            ));
        }
    }
    if let Some((extra, _)) = saved
        .iter()
        .find(|(n, _)| !entry.named.iter().any(|(m, _)| m == n))
    {
        return Err(bad(path, format!("tensor {extra} is not in the model")));
    }
    Ok(())
}

impl Accelerator {
    fn writes_shared_files(&self) -> bool {
        if self.project.save_on_each_node {
            self.is_local_main_process()
        } else {
            self.is_main_process()
        }
    }

    /// Accelerate's `save_state`: saves every prepared model, optimizer and scheduler, the fp16 scaler and
    /// each process's generator states into `output_dir` (every process must call it). With
    /// `ProjectConfiguration::automatic_checkpoint_naming` the folder is
    /// `{project_dir}/checkpoints/checkpoint_{iteration}` instead, the oldest ones beyond `total_limit`
    /// are deleted once it is written, and the iteration advances. Returns the folder.
    ///
    /// A kill at any moment loses nothing: the checkpoint is written into a hidden staging folder,
    /// flushed to the disk, and put in place by one atomic rename (replacing a checkpoint of the same
    /// name atomically too), so the folder holds the previous checkpoint or the new one, whole; old
    /// checkpoints go only after the new one is in place.
    pub fn save_state(&mut self, output_dir: Option<&Path>) -> Result<PathBuf> {
        let (dir, rotate) = if self.project.automatic_checkpoint_naming {
            let project = self
                .project
                .project_dir
                .clone()
                .ok_or(Error::InvalidValue {
                    name: "project_config.project_dir".into(),
                    detail: "automatic_checkpoint_naming needs a project folder".into(),
                })?;
            let base = project.join("checkpoints");
            let dir = base.join(format!("checkpoint_{}", self.project.iteration));
            if dir.exists() {
                return Err(Error::InvalidValue {
                    name: "project_config.iteration".into(),
                    detail: format!(
                        "checkpoint folder {} ({}) already exists; set the iteration to start from",
                        dir.display(),
                        self.project.iteration
                    ),
                });
            }
            (dir, Some(base))
        } else {
            let dir = output_dir.map(Path::to_owned).ok_or(Error::InvalidValue {
                name: "output_dir".into(),
                detail: "save_state needs a folder unless automatic_checkpoint_naming is on".into(),
            })?;
            (dir, None)
        };
        let sharded = self.sharded_saves()?;
        let per_rank = sharded.iter().any(Option::is_some);
        let publisher = self.writes_shared_files();
        let stage = durable::staging(&dir);
        if publisher {
            durable::prepare(&dir)?;
        }
        self.wait_for_everyone()?;
        if publisher {
            self.write_shared_files(&stage, &sharded)?;
        }
        let rank = self.process_index();
        let rng_name = format!("random_states_{rank}.safetensors");
        // Every rank writes its generators into the staging folder (on a node whose files nobody
        // publishes, a folder of its own: see below), and under FSDP its chunks of every sharded model
        // and its pieces of every optimizer's state.
        std::fs::create_dir_all(&stage).map_err(|e| Error::io("creating", &stage, e))?;
        write_tensors(&crate::rng_states()?, &stage.join(&rng_name))?;
        let mut rank_files = vec![rng_name];
        for (i, save) in sharded.iter().enumerate() {
            if let Some(save) = save {
                let name = rank_file("pytorch_model_fsdp", i, rank);
                write_tensors(&save.shards, &stage.join(&name))?;
                rank_files.push(name);
            }
        }
        if per_rank {
            for (i, link) in self.optimizers.iter().enumerate() {
                let state = link
                    .opt
                    .upgrade()
                    .and_then(|o| o.lock().unwrap_or_else(|e| e.into_inner()).state_dict());
                if let Some(state) = state {
                    let name = rank_file("optimizer", i, rank);
                    write_tensors(&state, &stage.join(&name))?;
                    rank_files.push(name);
                }
            }
        }
        self.wait_for_everyone()?;
        if publisher {
            durable::publish(&dir)?;
            if let (Some(base), Some(limit)) = (&rotate, self.project.total_limit) {
                rotate_checkpoints(base, &dir, limit)?;
            }
        }
        self.wait_for_everyone()?;
        if !publisher && stage.exists() {
            // A node that does not share the publisher's filesystem (and saves only on the main
            // process): its ranks' generator files go to its own copy of the folder, as in Accelerate.
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
            for name in &rank_files {
                let to = dir.join(name);
                std::fs::rename(stage.join(name), &to)
                    .map_err(|e| Error::io("moving into place", &to, e))?;
            }
            let _ = std::fs::remove_dir(&stage);
        }
        self.project.iteration += 1;
        Ok(dir)
    }

    /// Accelerate's `register_for_checkpointing`: `save_state` also saves `object` (as
    /// `custom_checkpoint_{i}.safetensors`, `i` counting registrations) and `load_state` restores it.
    /// The Accelerator keeps a shared handle; the caller keeps using its own.
    pub fn register_for_checkpointing<T: Checkpointable + 'static>(
        &mut self,
        object: Arc<Mutex<T>>,
    ) {
        self.custom.push(object);
    }

    fn write_shared_files(&mut self, dir: &Path, sharded: &[Option<ShardedSave>]) -> Result<()> {
        let per_rank = sharded.iter().any(Option::is_some);
        for (i, object) in self.custom.iter().enumerate() {
            let state = object
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state_dict()?;
            write_tensors(&state, &dir.join(custom_name(i)))?;
        }
        for (i, entry) in self.models.iter().enumerate() {
            let name = if i == 0 {
                SAFE_WEIGHTS_NAME.to_owned()
            } else {
                numbered("model", i, "safetensors")
            };
            match sharded.get(i) {
                Some(Some(save)) => {
                    if let Some(full) = &save.full {
                        write_tensors(full, &dir.join(name))?;
                    }
                }
                _ => write_tensors(&lock_entry(entry).named, &dir.join(name))?,
            }
        }
        let mut optimizers = Vec::new();
        for (i, link) in self.optimizers.iter().enumerate() {
            let lr = *link.lr.lock().unwrap_or_else(|e| e.into_inner());
            let state = match link.opt.upgrade() {
                Some(opt) => opt.lock().unwrap_or_else(|e| e.into_inner()).state_dict(),
                None => None,
            };
            let saved = match state {
                // Each rank writes its pieces itself (save_state).
                Some(_) if per_rank => true,
                Some(state) => {
                    write_tensors(&state, &dir.join(numbered("optimizer", i, "safetensors")))?;
                    true
                }
                None => {
                    crate::log::event!(
                        warn,
                        target: "hasten::checkpoint",
                        "hasten: warning: optimizer {i}'s state cannot be read (tch's optimizers keep it \
                         inside libtorch); only its learning rate is saved. hasten::optim::AdamW and \
                         hasten::optim::Sgd save theirs."
                    );
                    false
                }
            };
            optimizers.push(json!({"lr": lr, "state_saved": saved}));
        }
        let schedulers: Vec<Value> = self
            .schedulers
            .iter()
            .map(|(step, lr)| {
                json!({
                    "last_step": step.load(Ordering::SeqCst),
                    "lr": *lr.lock().unwrap_or_else(|e| e.into_inner()),
                })
            })
            .collect();
        let scaler = self.scaler.as_ref().map(|s| {
            let (scale, tracker) = s.lock().unwrap_or_else(|e| e.into_inner()).state();
            json!({"scale": scale, "growth_tracker": tracker})
        });
        let state = json!({
            "format": FORMAT,
            "models": self.models.len(),
            "custom_objects": self.custom.len(),
            "optimizers": optimizers,
            "schedulers": schedulers,
            "scaler": scaler,
            "step": self.step,
            "num_processes": self.num_processes(),
            "fsdp_per_rank": per_rank,
        });
        let path = dir.join(ACCELERATOR_STATE_NAME);
        let text = serde_json::to_string_pretty(&state).unwrap_or_default() + "\n";
        std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))?;
        durable::sync(&path)
    }

    /// Accelerate's `load_state`: restores what [`save_state`](Self::save_state) wrote into the prepared
    /// models, optimizers and schedulers, the scaler and this process's generators. Without a folder, the
    /// latest `checkpoint_{n}` of automatic checkpoint naming is used (and the iteration continues after
    /// it). Everything is checked before anything changes. Returns the folder.
    pub fn load_state(&mut self, input_dir: Option<&Path>) -> Result<PathBuf> {
        let dir = match input_dir {
            Some(d) if d.is_dir() => d.to_owned(),
            Some(d) => return Err(bad(d, "the checkpoint folder does not exist")),
            None if self.project.automatic_checkpoint_naming => {
                let base = self
                    .project
                    .project_dir
                    .clone()
                    .unwrap_or_default()
                    .join("checkpoints");
                // The newest complete one: a folder without its state file (written by something
                // else, or damaged) is passed over, with a warning.
                let mut found = numbered_checkpoints(&base)?;
                loop {
                    let Some(candidate) = found.pop() else {
                        return Err(bad(&base, "no complete checkpoint_{n} folder to load"));
                    };
                    if candidate.join(ACCELERATOR_STATE_NAME).is_file() {
                        break candidate;
                    }
                    crate::log::event!(
                        warn,
                        target: "hasten::checkpoint",
                        "hasten: warning: {} is not a complete checkpoint (no {ACCELERATOR_STATE_NAME}); \
                         loading an older one",
                        candidate.display()
                    );
                }
            }
            None => {
                return Err(Error::InvalidValue {
                    name: "input_dir".into(),
                    detail: "no folder given and automatic checkpoint naming is off".into(),
                });
            }
        };
        // 1. Read and check everything.
        let state_path = dir.join(ACCELERATOR_STATE_NAME);
        let text = std::fs::read_to_string(&state_path)
            .map_err(|e| Error::io("reading", &state_path, e))?;
        let state: Value =
            serde_json::from_str(&text).map_err(|e| bad(&state_path, format!("not JSON: {e}")))?;
        if state["format"] != FORMAT {
            return Err(bad(
                &state_path,
                format!("key \"format\" is not {FORMAT:?}"),
            ));
        }
        let saved_models = state["models"]
            .as_u64()
            .ok_or_else(|| bad(&state_path, "key \"models\" is missing"))?
            as usize;
        let saved_opts = state["optimizers"].as_array().cloned().unwrap_or_default();
        let saved_scheds = state["schedulers"].as_array().cloned().unwrap_or_default();
        // Checkpoints from before register_for_checkpointing have no key: none registered then.
        let saved_custom = state["custom_objects"].as_u64().unwrap_or(0) as usize;
        for (key, saved, prepared) in [
            ("models", saved_models, self.models.len()),
            ("custom_objects", saved_custom, self.custom.len()),
            ("optimizers", saved_opts.len(), self.optimizers.len()),
            ("schedulers", saved_scheds.len(), self.schedulers.len()),
        ] {
            if saved != prepared {
                return Err(bad(
                    &state_path,
                    format!(
                        "key {key:?}: the checkpoint has {saved}, this Accelerator prepared {prepared}"
                    ),
                ));
            }
        }
        let rank = self.process_index();
        let per_rank = state["fsdp_per_rank"].as_bool() == Some(true);
        if per_rank && state["num_processes"].as_u64() != Some(self.num_processes() as u64) {
            return Err(bad(
                &state_path,
                format!(
                    "key \"num_processes\": the checkpoint's FSDP shards are of {} processes, this \
                     job has {}",
                    state["num_processes"],
                    self.num_processes()
                ),
            ));
        }
        let mut weights = Vec::new();
        for (i, entry) in self.models.iter().enumerate() {
            let path = dir.join(if i == 0 {
                SAFE_WEIGHTS_NAME.to_owned()
            } else {
                numbered("model", i, "safetensors")
            });
            let entry = lock_entry(entry);
            let loaded = match entry.fsdp.as_ref() {
                None => {
                    let saved = read_tensors(&path)?;
                    check_weights(&path, &saved, &entry)?;
                    LoadedModel::Plain(saved)
                }
                Some(sharded) => {
                    let shards = dir.join(rank_file("pytorch_model_fsdp", i, rank));
                    if shards.is_file() {
                        let saved = read_tensors(&shards)?;
                        sharded.check_shard_state(&saved, &shards)?;
                        LoadedModel::Shards(saved)
                    } else {
                        // A whole model (FULL_STATE_DICT, or a checkpoint of an unsharded run):
                        // this rank reads its slices only.
                        let read = sharded.read_slices(&entry.named, &path)?;
                        if let Some(name) = read.missing_parameter() {
                            return Err(bad(&path, format!("tensor {name} is missing")));
                        }
                        LoadedModel::Full(read)
                    }
                }
            };
            weights.push(loaded);
        }
        let mut custom_states = Vec::new();
        for i in 0..saved_custom {
            let path = dir.join(custom_name(i));
            custom_states.push((read_tensors(&path)?, path));
        }
        let mut opt_states = Vec::new();
        for (i, saved) in saved_opts.iter().enumerate() {
            let lr = saved["lr"]
                .as_f64()
                .ok_or_else(|| bad(&state_path, format!("key optimizers[{i}].lr is missing")))?;
            let path = dir.join(if per_rank {
                rank_file("optimizer", i, rank)
            } else {
                numbered("optimizer", i, "safetensors")
            });
            let tensors = if saved["state_saved"].as_bool() == Some(true) {
                Some(read_tensors(&path)?)
            } else {
                None
            };
            opt_states.push((lr, tensors, path));
        }
        let mut sched_states = Vec::new();
        for (i, saved) in saved_scheds.iter().enumerate() {
            match (saved["last_step"].as_u64(), saved["lr"].as_f64()) {
                (Some(step), Some(lr)) => sched_states.push((step as usize, lr)),
                _ => {
                    return Err(bad(
                        &state_path,
                        format!("key schedulers[{i}] needs last_step and lr"),
                    ));
                }
            }
        }
        let scaler_state = match (&self.scaler, &state["scaler"]) {
            (Some(_), Value::Object(s)) => {
                match (
                    s.get("scale").and_then(Value::as_f64),
                    s.get("growth_tracker").and_then(Value::as_i64),
                ) {
                    (Some(scale), Some(tracker)) => Some((scale, tracker)),
                    _ => {
                        return Err(bad(
                            &state_path,
                            "key scaler needs scale and growth_tracker",
                        ));
                    }
                }
            }
            _ => None,
        };
        let rng_path = dir.join(format!(
            "random_states_{}.safetensors",
            self.process_index()
        ));
        let rng = match read_tensors(&rng_path) {
            Ok(t) => Some(t),
            Err(e) => {
                crate::log::event!(
                    warn,
                    target: "hasten::checkpoint",
                    "hasten: warning: could not load random states: {e}"
                );
                None
            }
        };
        // 2. Apply: optimizers and registered objects first (each checks its own tensors before
        // changing anything), then the rest.
        for ((lr, tensors, path), link) in opt_states.iter().zip(&self.optimizers) {
            if let (Some(tensors), Some(opt)) = (tensors, link.opt.upgrade()) {
                opt.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .load_state_dict(tensors)
                    .map_err(|e| bad(path, e.to_string()))?;
            }
            *link.lr.lock().unwrap_or_else(|e| e.into_inner()) = *lr;
        }
        for ((tensors, path), object) in custom_states.iter().zip(&self.custom) {
            object
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .load_state_dict(tensors)
                .map_err(|e| bad(path, e.to_string()))?;
        }
        for (loaded, entry) in weights.into_iter().zip(&self.models) {
            let mut entry = lock_entry(entry);
            let ModelEntry { named, fsdp, .. } = &mut *entry;
            match (loaded, fsdp.as_mut()) {
                (LoadedModel::Shards(saved), Some(sharded)) => sharded.load_shard_state(&saved)?,
                // Buffers (not sharded) come from the whole-model file too; with shards only they stay
                // as the main process's were at prepare.
                (LoadedModel::Full(read), Some(sharded)) => {
                    sharded.apply_slices(named, read, &dir)?;
                }
                (LoadedModel::Full(_), None) => {
                    unreachable!("slices are read for sharded models only")
                }
                (LoadedModel::Plain(saved) | LoadedModel::Shards(saved), _) => {
                    tch::no_grad(|| -> Result<()> {
                        for (name, var) in named.iter() {
                            if let Some((_, t)) = saved.iter().find(|(n, _)| n == name) {
                                var.shallow_clone()
                                    .f_copy_(t)
                                    .map_err(|e| Error::torch("load_state", e))?;
                            }
                        }
                        Ok(())
                    })?;
                }
            }
        }
        for ((step, lr), (cell, lr_cell)) in sched_states.iter().zip(&self.schedulers) {
            cell.store(*step, Ordering::SeqCst);
            *lr_cell.lock().unwrap_or_else(|e| e.into_inner()) = *lr;
        }
        if let (Some((scale, tracker)), Some(scaler)) = (scaler_state, &self.scaler) {
            scaler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .load_state(scale, tracker)?;
        }
        if let Some(step) = state["step"].as_u64() {
            self.step = step as usize;
        }
        if let Some(rng) = rng {
            crate::set_rng_states(&rng).map_err(|e| bad(&rng_path, e.to_string()))?;
        }
        if input_dir.is_none() {
            if let Some(n) = first_number(&dir).and_then(|(_, digits)| digits.parse::<usize>().ok())
            {
                self.project.iteration = n + 1;
            }
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests;
