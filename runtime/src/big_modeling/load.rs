//! Loading a checkpoint into a model by device map (Accelerate's `load_checkpoint_in_model`), with
//! Accelerate's disk-offload format: one raw `NAME.dat` per tensor plus `index.json`.
//!
//! tch has no meta device, so an offloaded variable keeps its shape through a placeholder: one element
//! expanded with stride 0 to the full shape. It costs one element of memory until
//! [`load_offloaded_weights`] brings the real values back.

use super::describe::{SafetensorsEntry, checkpoint_files, read_safetensors_entries};
use super::device_map::{DeviceKey, DeviceMap};
use super::read::{ReadJob, Target, host_tensor, read_all, read_tensor, reader_threads};
use crate::{Error, Result};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Settings of [`load_checkpoint_in_model`] (Accelerate's keyword arguments).
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Module name → device. Without one, every tensor goes to the var store's device.
    pub device_map: Option<DeviceMap>,
    /// Cast floating tensors to this dtype on load.
    pub dtype: Option<Kind>,
    /// Where tensors mapped to `disk` are written; required when the map names the disk.
    pub offload_folder: Option<PathBuf>,
    /// Fail (before loading anything) when the checkpoint and the model do not hold the same tensors.
    pub strict: bool,
}

/// What [`load_checkpoint_in_model`] did, by tensor name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Loaded onto a GPU or the CPU.
    pub loaded: Vec<String>,
    /// Written to the offload folder (the model keeps a shape-only placeholder).
    pub offloaded: Vec<String>,
    /// In the checkpoint but not in the model (Accelerate warns and skips them).
    pub unexpected: Vec<String>,
    /// In the model but in no shard of the checkpoint (left as initialised).
    pub missing: Vec<String>,
}

/// The device the map gives `name`: the entry of its longest module prefix (`""` covers everything).
pub fn device_key_of(map: &DeviceMap, name: &str) -> Option<DeviceKey> {
    let mut module = name;
    loop {
        if let Some((_, device)) = map.iter().find(|(m, _)| m == module) {
            return Some(*device);
        }
        if module.is_empty() {
            return None;
        }
        module = module.rsplit_once('.').map_or("", |(parent, _)| parent);
    }
}

pub(super) fn tch_device(device: DeviceKey) -> Device {
    match device {
        DeviceKey::Gpu(i) => Device::Cuda(i),
        _ => Device::Cpu,
    }
}

/// Loads `checkpoint` (a safetensors file, a sharded index or a folder) into `vs`, shard by shard, placing
/// each tensor where `opts.device_map` says. A shape that differs from the model's is an error naming the
/// tensor and the shard; tensors the model lacks are reported, not loaded.
pub fn load_checkpoint_in_model(
    vs: &VarStore,
    checkpoint: &Path,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    let mut variables: HashMap<String, Tensor> = vs.variables();
    let disk_used = opts
        .device_map
        .as_ref()
        .is_some_and(|m| m.iter().any(|(_, d)| *d == DeviceKey::Disk));
    let offload_folder = match (&opts.offload_folder, disk_used) {
        (None, true) => {
            return Err(Error::InvalidValue {
                name: "offload_folder".into(),
                detail: "the device map offloads modules to disk; pass an offload folder".into(),
            });
        }
        (folder, _) => folder.as_deref(),
    };
    // A tied alias the map does not name follows the tensor it shares storage with: placing it on its
    // own would move the shared tensor too.
    let mut follows: HashMap<String, String> = HashMap::new();
    if let Some(map) = &opts.device_map {
        let names: Vec<&str> = variables.keys().map(String::as_str).collect();
        if let Some(warning) = super::dispatch::unknown_keys_warning(&names, map) {
            eprintln!("hasten: warning: {warning}");
        }
        for group in super::dispatch::find_tied_parameters(vs) {
            if let Some(placed) = group.iter().find(|n| device_key_of(map, n).is_some()) {
                for name in group.iter().filter(|n| device_key_of(map, n).is_none()) {
                    follows.insert(name.clone(), placed.clone());
                }
            }
        }
        let mut names: Vec<&String> = variables
            .keys()
            .filter(|n| !follows.contains_key(*n))
            .collect();
        names.sort();
        if let Some(name) = names.into_iter().find(|n| device_key_of(map, n).is_none()) {
            return Err(Error::InvalidValue {
                name: "device_map".into(),
                detail: format!(
                    "{name} has no device: no entry for it or any module containing it"
                ),
            });
        }
    }
    let shards = checkpoint_files(checkpoint)?;
    // Check every shard's header before touching the model, so a bad checkpoint leaves it as it was.
    let mut in_checkpoint = std::collections::HashSet::new();
    let mut unexpected = Vec::new();
    let mut headers: Vec<Vec<SafetensorsEntry>> = Vec::new();
    for shard in &shards {
        let entries = read_safetensors_entries(shard)?;
        for e in &entries {
            if let Some(var) = variables.get(&e.name).filter(|v| v.size() != e.meta.shape) {
                return Err(shape_mismatch(shard, &e.name, &e.meta.shape, &var.size()));
            }
            if !variables.contains_key(&e.name) {
                unexpected.push(e.name.clone());
            }
            in_checkpoint.insert(e.name.clone());
        }
        headers.push(entries);
    }
    let mut missing: Vec<String> = variables
        .keys()
        .filter(|n| !in_checkpoint.contains(*n))
        .cloned()
        .collect();
    missing.sort();
    if opts.strict && (!missing.is_empty() || !unexpected.is_empty()) {
        return Err(Error::Checkpoint {
            path: checkpoint.to_owned(),
            detail: format!(
                "strict loading: missing keys {missing:?}, unexpected keys {unexpected:?}"
            ),
        });
    }
    // The headers already said what is missing and what the model lacks.
    let mut report = LoadReport {
        unexpected,
        missing,
        ..LoadReport::default()
    };
    // CPU copies of GPU-executed weights are page-locked, so moving them for each forward runs at full
    // bus speed (Accelerate leaves them pageable).
    let pin_cpu = opts
        .device_map
        .as_ref()
        .is_some_and(|m| m.iter().any(|(_, d)| matches!(d, DeviceKey::Gpu(_))));
    let mut jobs = Vec::new();
    let mut index = Map::new();
    let mut plans = Vec::new();
    for (shard_index, entries) in headers.into_iter().enumerate() {
        for e in entries {
            if !variables.contains_key(&e.name) {
                continue;
            }
            let cast = opts
                .dtype
                .filter(|k| *k != e.meta.kind && is_floating(e.meta.kind));
            let placed_as = follows.get(&e.name).unwrap_or(&e.name);
            let key = opts
                .device_map
                .as_ref()
                .and_then(|m| device_key_of(m, placed_as));
            let on_disk = key == Some(DeviceKey::Disk);
            let (target, plan) = if on_disk && cast.is_none() {
                let folder = offload_folder.expect("checked above: disk needs a folder");
                std::fs::create_dir_all(folder).map_err(|e| Error::io("creating", folder, e))?;
                index.insert(
                    e.name.clone(),
                    offload_entry(&e.name, e.meta.kind, &e.meta.shape)?,
                );
                (
                    Target::File(folder.join(format!("{}.dat", e.name))),
                    Plan::Offloaded,
                )
            } else {
                let device = if on_disk {
                    Device::Cpu
                } else {
                    key.map_or(vs.device(), tch_device)
                };
                let value = if device == Device::Cpu {
                    host_tensor(&e.meta.shape, e.meta.kind, pin_cpu && !on_disk)
                } else {
                    device_tensor(&e.name, &e.meta.shape, e.meta.kind, device)?
                };
                let plan = if on_disk {
                    Plan::OffloadAfterCast
                } else {
                    Plan::Loaded
                };
                (Target::Tensor(value.shallow_clone()), plan)
            };
            plans.push((
                e.name.clone(),
                cast,
                plan,
                e.meta.shape.clone(),
                e.meta.kind,
            ));
            jobs.push(ReadJob {
                shard: shard_index,
                name: e.name,
                start: e.start,
                len: e.len,
                target,
            });
        }
    }
    read_all(&shards, &jobs, reader_threads(), true)?;
    // Everything is read: only now does the model change.
    let _guard = tch::no_grad_guard();
    for ((name, cast, plan, shape, kind), job) in plans.into_iter().zip(jobs) {
        let var = variables
            .get_mut(&name)
            .expect("planned from the model's names");
        let read = match job.target {
            Target::Tensor(t) => Some(match cast {
                Some(kind) => t.to_kind(kind),
                None => t,
            }),
            Target::File(_) => None,
        };
        let new_data = match (plan, read) {
            (Plan::Loaded, Some(value)) => {
                report.loaded.push(name);
                value
            }
            (Plan::OffloadAfterCast, Some(value)) => {
                let folder = offload_folder.expect("checked above: disk needs a folder");
                offload_weight(&value, &name, folder, &mut index)?;
                report.offloaded.push(name);
                crate::layers::empty_placeholder(&shape, value.kind())
            }
            _ => {
                report.offloaded.push(name);
                crate::layers::empty_placeholder(&shape, kind)
            }
        };
        var.f_set_data(&new_data)
            .map_err(|e| Error::torch("load_checkpoint_in_model", e))?;
    }
    if let Some(folder) = offload_folder.filter(|_| !index.is_empty()) {
        save_offload_index(&index, folder)?;
    }
    Ok(report)
}

/// Room for tensor `name` on a GPU; an error naming the tensor and the device when there is none (no
/// CUDA, no such GPU, out of memory).
fn device_tensor(name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
    Tensor::f_empty(shape, (kind, device)).map_err(|e| Error::InvalidValue {
        name: "device_map".into(),
        detail: format!(
            "cannot place {name} on {device:?}: {}",
            Error::torch("allocating", e)
        ),
    })
}

fn is_floating(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half
            | Kind::Float
            | Kind::Double
            | Kind::BFloat16
            | Kind::Float8e4m3fn
            | Kind::Float8e5m2
            | Kind::Float8e4m3fnuz
            | Kind::Float8e5m2fnuz
    )
}

/// What happens to a tensor once its bytes are read.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Becomes the variable's data.
    Loaded,
    /// Was copied into the offload folder as it is; the variable gets a placeholder.
    Offloaded,
    /// Is cast, then written to the offload folder; the variable gets a placeholder.
    OffloadAfterCast,
}

/// Accelerate's `set_module_tensor_to_device`: moves the variable `name` of `vs` to `device`, replacing its
/// values with `value` when given (same shape, or an error naming the tensor) and casting floating
/// values to `dtype` when given.
pub fn set_module_tensor_to_device(
    vs: &VarStore,
    name: &str,
    device: Device,
    value: Option<&Tensor>,
    dtype: Option<Kind>,
) -> Result<()> {
    let mut variables = vs.variables();
    let var = variables.get_mut(name).ok_or_else(|| Error::InvalidValue {
        name: "tensor_name".into(),
        detail: format!("the model has no tensor {name}"),
    })?;
    let source = match value {
        Some(v) if v.size() != var.size() => {
            return Err(Error::InvalidValue {
                name: name.into(),
                detail: format!(
                    "trying to set a tensor of shape {:?} in {name} (which has shape {:?}), this looks incorrect",
                    v.size(),
                    var.size()
                ),
            });
        }
        Some(v) => v.shallow_clone(),
        None => var.detach(),
    };
    let kind = match dtype {
        Some(k) if is_floating(source.kind()) => k,
        _ => source.kind(),
    };
    let new_data = source
        .f_to_device_(device, kind, false, false)
        .map_err(|e| Error::torch("set_module_tensor_to_device", e))?;
    let _guard = tch::no_grad_guard();
    var.f_set_data(&new_data)
        .map_err(|e| Error::torch("set_module_tensor_to_device", e))
}

/// Accelerate's `load_state_dict`: the tensors of one safetensors file, each on the device `device_map`
/// gives it (its longest module prefix; the CPU without a map, or for tensors mapped to the disk), read
/// in parallel. In file order.
pub fn load_state_dict(
    file: &Path,
    device_map: Option<&DeviceMap>,
) -> Result<Vec<(String, Tensor)>> {
    let entries = read_safetensors_entries(file)?;
    let mut jobs = Vec::with_capacity(entries.len());
    for e in entries {
        let device = device_map
            .and_then(|m| device_key_of(m, &e.name))
            .map_or(Device::Cpu, tch_device);
        let tensor = if device == Device::Cpu {
            host_tensor(&e.meta.shape, e.meta.kind, false)
        } else {
            device_tensor(&e.name, &e.meta.shape, e.meta.kind, device)?
        };
        jobs.push(ReadJob {
            shard: 0,
            name: e.name,
            start: e.start,
            len: e.len,
            target: Target::Tensor(tensor),
        });
    }
    read_all(&[file.to_owned()], &jobs, reader_threads(), true)?;
    Ok(jobs
        .into_iter()
        .filter_map(|j| match j.target {
            Target::Tensor(t) => Some((j.name, t)),
            Target::File(_) => None,
        })
        .collect())
}

fn shape_mismatch(shard: &Path, name: &str, found: &[i64], model: &[i64]) -> Error {
    Error::Checkpoint {
        path: shard.to_owned(),
        detail: format!("tensor {name} has shape {found:?} but the model's has {model:?}"),
    }
}

fn numpy_dtype(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::Half => "float16",
        // Stored as int16 with the true dtype recorded separately, as Accelerate does (numpy has no bf16).
        Kind::BFloat16 | Kind::Int16 => "int16",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        _ => return None,
    })
}

fn kind_from_numpy(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "float32" => Kind::Float,
        "float64" => Kind::Double,
        "float16" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "int16" => Kind::Int16,
        "int64" => Kind::Int64,
        "int32" => Kind::Int,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        _ => return None,
    })
}

/// Writes `weight` to `folder/NAME.dat` (raw, C order) and records its dtype and shape in `index`
/// (Accelerate's `offload_weight`).
pub fn offload_weight(
    weight: &Tensor,
    name: &str,
    folder: &Path,
    index: &mut Map<String, Value>,
) -> Result<()> {
    let kind = weight.kind();
    let entry = offload_entry(name, kind, &weight.size())?;
    std::fs::create_dir_all(folder).map_err(|e| Error::io("creating", folder, e))?;
    let cpu = weight.to_device(Device::Cpu).contiguous();
    let numel = cpu.numel();
    let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
    cpu.f_copy_data_u8(&mut bytes, numel)
        .map_err(|e| Error::torch("offload_weight", e))?;
    let path = folder.join(format!("{name}.dat"));
    std::fs::write(&path, &bytes).map_err(|e| Error::io("writing", &path, e))?;
    index.insert(name.to_owned(), entry);
    Ok(())
}

/// The `index.json` entry of an offloaded tensor of `kind` and `shape`.
fn offload_entry(name: &str, kind: Kind, shape: &[i64]) -> Result<Value> {
    let dtype = numpy_dtype(kind).ok_or_else(|| Error::InvalidValue {
        name: "offload_weight".into(),
        detail: format!("{name} has dtype {kind:?}, which cannot be offloaded"),
    })?;
    // numpy cannot memmap a 0-d array, so Accelerate stores scalars with shape [1].
    let shape: Vec<i64> = if shape.is_empty() {
        vec![1]
    } else {
        shape.to_vec()
    };
    let mut entry = json!({ "dtype": dtype, "shape": shape });
    if kind == Kind::BFloat16 {
        entry["dtype"] = json!("bfloat16");
    }
    Ok(entry)
}

/// Merges `index` into `folder/index.json` (Accelerate's `save_offload_index`).
pub fn save_offload_index(index: &Map<String, Value>, folder: &Path) -> Result<()> {
    let path = folder.join("index.json");
    let mut current = match std::fs::read_to_string(&path) {
        Ok(text) => read_index_text(&text, &path)?,
        Err(_) => Map::new(),
    };
    current.extend(index.iter().map(|(k, v)| (k.clone(), v.clone())));
    let text = serde_json::to_string_pretty(&Value::Object(current)).expect("JSON map serialises");
    std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))
}

fn read_index_text(text: &str, path: &Path) -> Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::Checkpoint {
            path: path.to_owned(),
            detail: "is not a JSON object".into(),
        }),
        Err(e) => Err(Error::Checkpoint {
            path: path.to_owned(),
            detail: format!("not valid JSON: {e}"),
        }),
    }
}

/// `folder/index.json`: its path and its entries.
pub(super) fn read_offload_index(folder: &Path) -> Result<(PathBuf, Map<String, Value>)> {
    let index_path = folder.join("index.json");
    let text =
        std::fs::read_to_string(&index_path).map_err(|e| Error::io("reading", &index_path, e))?;
    let index = read_index_text(&text, &index_path)?;
    Ok((index_path, index))
}

/// Reads one offloaded tensor back (to the CPU) from `folder`, using the entry of `index.json`.
pub fn load_offloaded_weight(folder: &Path, name: &str) -> Result<Tensor> {
    let (index_path, index) = read_offload_index(folder)?;
    let entry = index.get(name).ok_or_else(|| Error::Checkpoint {
        path: index_path.clone(),
        detail: format!("has no entry for {name}"),
    })?;
    read_offloaded(folder, name, entry, &index_path, false)
}

/// One tensor's `.dat`, checked against its index entry, read into host memory (page-locked when
/// `pinned`, for a fast copy to a GPU).
pub(super) fn read_offloaded(
    folder: &Path,
    name: &str,
    entry: &Value,
    index_path: &Path,
    pinned: bool,
) -> Result<Tensor> {
    let (path, shape, kind) = offloaded_file(folder, name, entry, index_path)?;
    read_tensor(&path, 0, &shape, kind, pinned)
}

/// Where one offloaded tensor's `.dat` is, with its shape and kind, after checking the file's size
/// against the index entry.
pub(super) fn offloaded_file(
    folder: &Path,
    name: &str,
    entry: &Value,
    index_path: &Path,
) -> Result<(PathBuf, Vec<i64>, Kind)> {
    let bad = |detail: String| Error::Checkpoint {
        path: index_path.to_owned(),
        detail,
    };
    let dtype = entry["dtype"].as_str().unwrap_or_default();
    let kind = kind_from_numpy(dtype)
        .ok_or_else(|| bad(format!("{name}: unknown dtype {:?}", entry["dtype"])))?;
    let shape: Vec<i64> = entry["shape"]
        .as_array()
        .and_then(|dims| dims.iter().map(Value::as_i64).collect())
        .ok_or_else(|| {
            bad(format!(
                "{name}: shape {} is not a list of sizes",
                entry["shape"]
            ))
        })?;
    let path = folder.join(format!("{name}.dat"));
    let found = std::fs::metadata(&path)
        .map_err(|e| Error::io("reading", &path, e))?
        .len();
    let expected = shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
    if found != expected {
        return Err(Error::Checkpoint {
            path,
            detail: format!(
                "holds {found} bytes, but index.json says {name} is {dtype} {shape:?} ({expected} bytes)"
            ),
        });
    }
    Ok((path, shape, kind))
}

/// Writes every tensor of `state` to `folder` and merges their entries into `folder/index.json`
/// (Accelerate's `offload_state_dict`).
pub fn offload_state_dict(folder: &Path, state: &[(String, Tensor)]) -> Result<()> {
    let mut index = Map::new();
    for (name, tensor) in state {
        offload_weight(tensor, name, folder, &mut index)?;
    }
    save_offload_index(&index, folder)
}

/// Brings every tensor of `folder/index.json` that `vs` has back into the model, on the CPU (Accelerate's
/// `load_offloaded_weights`). Returns the names restored.
pub fn load_offloaded_weights(vs: &VarStore, folder: &Path) -> Result<Vec<String>> {
    let (index_path, index) = read_offload_index(folder)?;
    let index: BTreeMap<String, Value> = index.into_iter().collect();
    let mut variables = vs.variables();
    let mut restored = Vec::new();
    for (name, entry) in &index {
        let Some(var) = variables.get_mut(name) else {
            continue;
        };
        let mut value = read_offloaded(folder, name, entry, &index_path, false)?;
        if var.dim() == 0 {
            value = value.reshape([] as [i64; 0]);
        }
        let _guard = tch::no_grad_guard();
        var.f_set_data(&value)
            .map_err(|e| Error::torch("load_offloaded_weights", e))?;
        restored.push(name.clone());
    }
    Ok(restored)
}

#[cfg(test)]
mod tests;
