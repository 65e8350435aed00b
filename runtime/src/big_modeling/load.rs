//! Loading a checkpoint into a model by device map (Accelerate's `load_checkpoint_in_model`), with
//! Accelerate's disk-offload format (see `offload_format`).
//!
//! tch has no meta device, so an offloaded variable keeps its shape through a placeholder: one element
//! expanded with stride 0 to the full shape. It costs one element of memory until
//! [`load_offloaded_weights`](super::load_offloaded_weights) brings the real values back.

use super::describe::{SafetensorsEntry, checkpoint_files, read_safetensors_entries};
use super::device_map::{DeviceKey, DeviceMap};
use super::offload_format::{OffloadIndex, offload_entry, placeholder, save_offload_index};
use super::ordered_json::python_repr;
use super::read::{ReadJob, Target, host_tensor, read_all, reader_threads};
use super::var_store::{find_tied_parameters, parameter_names};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Settings of [`load_checkpoint_in_model`] (Accelerate's keyword arguments).
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Module name → device. Without one, every tensor goes to the var store's device.
    pub device_map: Option<DeviceMap>,
    /// Cast floating tensors to this dtype on load. Tensors mapped to the disk are written as the
    /// checkpoint holds them (as Accelerate does); their placeholders take this dtype, and the values are
    /// cast when they are brought back.
    pub dtype: Option<Kind>,
    /// Where tensors mapped to `disk` are written; required when the map names the disk.
    pub offload_folder: Option<PathBuf>,
    /// Fail (before loading anything) when the checkpoint and the model do not hold the same tensors.
    pub strict: bool,
    /// Write buffers mapped to the disk to the offload folder too (default false, as in Accelerate: such
    /// buffers are neither written nor loaded, and keep the model's values).
    pub offload_buffers: bool,
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
    /// Buffers mapped to the disk, neither loaded nor offloaded because `offload_buffers` is off (they
    /// keep the model's values, as in Accelerate).
    pub skipped_buffers: Vec<String>,
    /// Accelerate's warnings (e.g. tied parameters placed on different devices), in the order raised.
    pub warnings: Vec<String>,
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

/// A device as Python prints a device-map value: `0`, `'cpu'`, `'disk'`.
pub(super) fn python_device(device: DeviceKey) -> String {
    match device {
        DeviceKey::Gpu(i) => i.to_string(),
        other => python_repr(&other.to_string()),
    }
}

/// Accelerate's warning for each group of tied parameters that `map` spreads over several devices.
fn tied_on_different_devices(groups: &[Vec<String>], map: &DeviceMap) -> Vec<String> {
    let mut warnings = Vec::new();
    for group in groups {
        let devices: Vec<(&String, DeviceKey)> = group
            .iter()
            .filter_map(|n| device_key_of(map, n).map(|d| (n, d)))
            .collect();
        if devices.iter().any(|(_, d)| *d != devices[0].1) {
            let entries: Vec<String> = devices
                .iter()
                .map(|(n, d)| format!("{}: {}", python_repr(n), python_device(*d)))
                .collect();
            warnings.push(format!(
                "Tied parameters are on different devices: {{{}}}. Please modify your custom device map or \
                 set `device_map='auto'`. ",
                entries.join(", ")
            ));
        }
    }
    warnings
}

/// Loads `checkpoint` (a safetensors file, a sharded index or a folder) into `vs`, shard by shard, placing
/// each tensor where `opts.device_map` says. A shape that differs from the model's is an error naming the
/// tensor and the shard; tensors the model lacks are reported, not loaded. Every check (headers, shapes,
/// devices) is done before the model changes.
pub fn load_checkpoint_in_model(
    vs: &VarStore,
    checkpoint: &Path,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    let mut variables: HashMap<String, Tensor> = vs.variables();
    let parameters = parameter_names(vs);
    let disk_used = opts
        .device_map
        .as_ref()
        .is_some_and(|m| m.iter().any(|(_, d)| *d == DeviceKey::Disk));
    let offload_folder = match (&opts.offload_folder, disk_used) {
        (None, true) => {
            return Err(Error::InvalidValue {
                name: "offload_folder".into(),
                detail: "At least one of the model submodule will be offloaded to disk, please pass along \
                         an `offload_folder`."
                    .into(),
            });
        }
        (folder, _) => folder.as_deref(),
    };
    let mut warnings = Vec::new();
    // A tied alias the map does not name follows the tensor it shares storage with: placing it on its
    // own would move the shared tensor too. (Accelerate raises "The `device_map` does not contain the
    // module ." there.)
    let mut follows: HashMap<String, String> = HashMap::new();
    if let Some(map) = &opts.device_map {
        let groups = find_tied_parameters(vs);
        warnings.extend(tied_on_different_devices(&groups, map));
        for group in groups {
            if let Some(placed) = group.iter().find(|n| device_key_of(map, n).is_some()) {
                for name in group.iter().filter(|n| device_key_of(map, n).is_none()) {
                    follows.insert(name.clone(), placed.clone());
                }
            }
        }
    }
    let shards = checkpoint_files(checkpoint)?;
    // Check every shard's header before touching the model, so a bad checkpoint leaves it as it was.
    let mut in_checkpoint = std::collections::HashSet::new();
    let mut unexpected = Vec::new();
    let mut headers: Vec<Vec<SafetensorsEntry>> = Vec::new();
    for shard in &shards {
        let entries = read_safetensors_entries(shard)?;
        // Accelerate goes through a shard's tensors in name order (safetensors' `keys()`); so does the
        // device check here, and so does the offload index.
        let mut by_name: Vec<&SafetensorsEntry> = entries.iter().collect();
        by_name.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        for e in by_name {
            let name = e.name.as_str();
            let Some(var) = variables.get(name) else {
                unexpected.push(name.to_owned());
                continue;
            };
            if var.size() != e.meta.shape {
                return Err(shape_mismatch(shard, name, &e.meta.shape, &var.size()));
            }
            let placed_as = follows.get(name).map_or(name, String::as_str);
            let uncovered = opts
                .device_map
                .as_ref()
                .is_some_and(|map| device_key_of(map, placed_as).is_none());
            if uncovered {
                return Err(Error::InvalidValue {
                    name: "device_map".into(),
                    detail: format!("{name} doesn't have any device set."),
                });
            }
            if !in_checkpoint.insert(name.to_owned()) {
                return Err(Error::Checkpoint {
                    path: shard.clone(),
                    detail: format!("tensor {name} is also in an earlier shard"),
                });
            }
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
        warnings,
        ..LoadReport::default()
    };
    // CPU copies of GPU-executed weights are page-locked, so moving them for each forward runs at full
    // bus speed (Accelerate leaves them pageable).
    let pin_cpu = opts
        .device_map
        .as_ref()
        .is_some_and(|m| m.iter().any(|(_, d)| matches!(d, DeviceKey::Gpu(_))));
    let mut jobs = Vec::new();
    let mut index = OffloadIndex::new();
    let mut plans = Vec::new();
    for (shard_index, entries) in headers.into_iter().enumerate() {
        let mut shard_index_entries = Vec::new();
        for e in entries {
            if !variables.contains_key(&e.name) {
                continue;
            }
            // Accelerate's set_module_tensor_to_device: a value takes the model's dtype (as
            // PyTorch's load_state_dict does), or `dtype` where one is given (floating tensors only).
            let want = match opts.dtype {
                Some(kind) if is_floating(e.meta.kind) => Some(kind),
                Some(_) => None,
                None => variables.get(&e.name).map(Tensor::kind),
            };
            let cast = want.filter(|k| *k != e.meta.kind);
            let placed_as = follows.get(&e.name).unwrap_or(&e.name);
            let key = opts
                .device_map
                .as_ref()
                .and_then(|m| device_key_of(m, placed_as));
            let (target, plan) = if key == Some(DeviceKey::Disk) {
                if !opts.offload_buffers && !parameters.contains(&e.name) {
                    report.skipped_buffers.push(e.name);
                    continue;
                }
                let folder = offload_folder.expect("checked above: disk needs a folder");
                std::fs::create_dir_all(folder).map_err(|e| Error::io("creating", folder, e))?;
                // The checkpoint's bytes as they are: Accelerate offloads the uncast tensor.
                shard_index_entries.push((
                    e.name.clone(),
                    offload_entry(&e.name, e.meta.kind, &e.meta.shape)?,
                ));
                (
                    Target::File(folder.join(format!("{}.dat", e.name))),
                    Plan::Offloaded(cast.unwrap_or(e.meta.kind)),
                )
            } else {
                let device = key.map_or(vs.device(), tch_device);
                let value = if device == Device::Cpu {
                    host_tensor(&e.meta.shape, e.meta.kind, pin_cpu)
                } else {
                    device_tensor(&e.name, &e.meta.shape, e.meta.kind, device)?
                };
                (Target::Tensor(value.shallow_clone()), Plan::Loaded(cast))
            };
            plans.push((e.name.clone(), plan, e.meta.shape.clone()));
            jobs.push(ReadJob {
                shard: shard_index,
                name: e.name,
                start: e.start,
                len: e.len,
                target,
            });
        }
        shard_index_entries.sort_by(|(a, _), (b, _)| a.cmp(b));
        index.extend(shard_index_entries);
    }
    read_all(&shards, &jobs, reader_threads(), true)?;
    // Everything is read and cast before the first variable changes, so a failure leaves the model
    // as it was.
    let _guard = tch::no_grad_guard();
    let mut ready = Vec::with_capacity(plans.len());
    for ((name, plan, shape), job) in plans.into_iter().zip(jobs) {
        let shard = &shards[job.shard];
        let offloaded = matches!(plan, Plan::Offloaded(_));
        let new_data = match (plan, job.target) {
            (Plan::Loaded(cast), Target::Tensor(t)) => match cast {
                Some(kind) => t.f_to_kind(kind).map_err(|e| Error::Checkpoint {
                    path: shard.clone(),
                    detail: format!("casting {name} to {kind:?}: {}", Error::torch("to", e)),
                })?,
                None => t,
            },
            (Plan::Offloaded(kind), _) => placeholder(&shape, kind),
            (Plan::Loaded(_), Target::File(_)) => {
                unreachable!("tensors to load are read into memory")
            }
        };
        ready.push((name, new_data, job.shard, offloaded));
    }
    for (name, new_data, shard, offloaded) in ready {
        let var = variables
            .get_mut(&name)
            .expect("planned from the model's names");
        var.f_set_data(&new_data).map_err(|e| Error::Checkpoint {
            path: shards[shard].clone(),
            detail: format!("setting {name}: {}", Error::torch("set_data", e)),
        })?;
        if offloaded {
            report.offloaded.push(name);
        } else {
            report.loaded.push(name);
        }
    }
    if let Some(folder) = offload_folder {
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
    /// Becomes the variable's data, cast to the kind given.
    Loaded(Option<Kind>),
    /// Was copied into the offload folder as it is; the variable gets a placeholder of this kind.
    Offloaded(Kind),
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

pub(super) fn shape_mismatch(shard: &Path, name: &str, found: &[i64], model: &[i64]) -> Error {
    Error::Checkpoint {
        path: shard.to_owned(),
        detail: format!("tensor {name} has shape {found:?} but the model's has {model:?}"),
    }
}

#[cfg(test)]
mod tests;
