//! Accelerate's offload-folder format (`utils/offload.py`): one raw `NAME.dat` per tensor (C order, native
//! little-endian bytes, no header) plus an `index.json` giving each tensor's numpy dtype name and shape.
//!
//! The rules, as Accelerate 1.15 writes and reads them:
//! - bf16 is stored as its int16 bits with dtype `"bfloat16"`; fp8 kinds as their int8 bits with the torch
//!   name (`"float8_e4m3fn"`, `"float8_e5m2"`, …); everything else under numpy's name.
//! - A 0-d tensor gets `"shape": []` (numpy's shape, taken before the file is written) and a one-element
//!   file; it reads back as a 0-d tensor.
//! - `index.json` keeps insertion order: state-dict order for a model. Saving an index updates the file in
//!   place, as Python's `dict.update` does: keys already there keep their position, new keys are appended.
//!   An empty index writes no file at all. The text is `json.dump(index, f, indent=2)`'s, byte for byte.
//! - An entry may instead point into a safetensors file (`{"safetensors_file", "weight_name", "dtype"}`,
//!   as transformers writes them): the tensor is read from there and cast to `dtype` when given.

use super::describe::{kind_from_torch_name, read_safetensors_entries};
use super::ordered_json::Json;
use super::read::read_tensor;
use crate::{Error, Result};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// An offload index: tensor name → `{"dtype": …, "shape": […]}`, in insertion order.
pub type OffloadIndex = Vec<(String, Value)>;

/// The dtype name Accelerate records for `kind`.
fn offload_dtype_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::Half => "float16",
        // numpy has no bf16 and no fp8: their bits are stored as int16 / int8 under the torch name.
        Kind::BFloat16 => "bfloat16",
        Kind::Float8e4m3fn => "float8_e4m3fn",
        Kind::Float8e5m2 => "float8_e5m2",
        Kind::Float8e4m3fnuz => "float8_e4m3fnuz",
        Kind::Float8e5m2fnuz => "float8_e5m2fnuz",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Int16 => "int16",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        _ => return None,
    })
}

/// The kind of an `index.json` dtype name (the inverse of [`offload_dtype_name`]).
fn kind_from_offload_name(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "float32" => Kind::Float,
        "float64" => Kind::Double,
        "float16" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "float8_e4m3fn" => Kind::Float8e4m3fn,
        "float8_e5m2" => Kind::Float8e5m2,
        "float8_e4m3fnuz" => Kind::Float8e4m3fnuz,
        "float8_e5m2fnuz" => Kind::Float8e5m2fnuz,
        "int64" => Kind::Int64,
        "int32" => Kind::Int,
        "int16" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        "complex64" => Kind::ComplexFloat,
        "complex128" => Kind::ComplexDouble,
        _ => return None,
    })
}

/// The `index.json` entry of an offloaded tensor of `kind` and `shape` (`[]` for a 0-d tensor).
pub(super) fn offload_entry(name: &str, kind: Kind, shape: &[i64]) -> Result<Value> {
    let dtype = offload_dtype_name(kind).ok_or_else(|| Error::InvalidValue {
        name: "offload_weight".into(),
        detail: format!("{name} has dtype {kind:?}, which cannot be offloaded"),
    })?;
    Ok(json!({ "dtype": dtype, "shape": shape }))
}

/// Sets `name`'s entry: in place when the index has it already, else at the end (Python's `dict`).
pub(super) fn index_insert(index: &mut OffloadIndex, name: &str, entry: Value) {
    match index.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = entry,
        None => index.push((name.to_owned(), entry)),
    }
}

/// Writes `weight` to `folder/NAME.dat` (raw, C order) and, when `index` is given, records its dtype and
/// shape there (Accelerate's `offload_weight`; with no index only the file is written).
pub fn offload_weight(
    weight: &Tensor,
    name: &str,
    folder: &Path,
    index: Option<&mut OffloadIndex>,
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
    if let Some(index) = index {
        index_insert(index, name, entry);
    }
    Ok(())
}

/// Merges `index` into `folder/index.json` (Accelerate's `save_offload_index`): entries already in the
/// file keep their position (and, when not in `index`, their exact content), new ones are appended. An
/// empty index writes nothing.
pub fn save_offload_index(index: &[(String, Value)], folder: &Path) -> Result<()> {
    if index.is_empty() {
        return Ok(());
    }
    let path = folder.join("index.json");
    let mut current: Vec<(String, Json)> = match std::fs::read_to_string(&path) {
        Ok(text) => parse_index_text(&text, &path)?,
        Err(_) => Vec::new(),
    };
    for (name, entry) in index {
        let entry = Json::from_value(entry);
        match current.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = entry,
            None => current.push((name.clone(), entry)),
        }
    }
    let text = Json::Object(current).to_python_text();
    std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))
}

fn parse_index_text(text: &str, path: &Path) -> Result<Vec<(String, Json)>> {
    match Json::parse(text) {
        Ok(Json::Object(pairs)) => Ok(pairs),
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

/// `folder/index.json`: its path and its entries, in file order.
pub(super) fn read_offload_index(folder: &Path) -> Result<(PathBuf, OffloadIndex)> {
    let index_path = folder.join("index.json");
    let text =
        std::fs::read_to_string(&index_path).map_err(|e| Error::io("reading", &index_path, e))?;
    let index = parse_index_text(&text, &index_path)?
        .into_iter()
        .map(|(name, entry)| (name, entry.to_value()))
        .collect();
    Ok((index_path, index))
}

/// Where one offloaded tensor's bytes are and what they hold.
#[derive(Debug, Clone)]
pub(super) struct OffloadedTensor {
    /// The `.dat` file, or the safetensors file an entry points into.
    pub path: PathBuf,
    /// Offset of the first byte.
    pub start: u64,
    pub shape: Vec<i64>,
    /// The kind of the bytes on disk.
    pub kind: Kind,
    /// The kind to cast to once read (a safetensors entry's `dtype`).
    pub cast: Option<Kind>,
}

impl OffloadedTensor {
    /// Number of bytes to read.
    pub fn byte_len(&self) -> u64 {
        self.shape
            .iter()
            .map(|d| (*d).max(0) as u64)
            .product::<u64>()
            * self.kind.elt_size_in_bytes() as u64
    }
}

/// Finds one offloaded tensor from its index entry: `folder/NAME.dat`, whose file must hold at least the
/// bytes its shape needs (Accelerate's memmap reads a prefix of a longer file), or a tensor of a
/// safetensors file.
pub(super) fn offloaded_file(
    folder: &Path,
    name: &str,
    entry: &Value,
    index_path: &Path,
) -> Result<OffloadedTensor> {
    let bad = |detail: String| Error::Checkpoint {
        path: index_path.to_owned(),
        detail,
    };
    if let Some(file) = entry.get("safetensors_file") {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("{name}: safetensors_file is not a path")))?;
        let weight_name = entry
            .get("weight_name")
            .and_then(Value::as_str)
            .unwrap_or(name);
        let path = PathBuf::from(file);
        let found = read_safetensors_entries(&path)?
            .into_iter()
            .find(|e| e.name == weight_name)
            .ok_or_else(|| Error::Checkpoint {
                path: path.clone(),
                detail: format!("has no tensor {weight_name} (index.json entry {name})"),
            })?;
        let cast = match entry.get("dtype").and_then(Value::as_str) {
            Some(dtype) => Some(
                kind_from_torch_name(dtype)
                    .ok_or_else(|| bad(format!("{name}: unknown dtype {dtype:?}")))?,
            ),
            None => None,
        };
        return Ok(OffloadedTensor {
            path,
            start: found.start,
            shape: found.meta.shape,
            kind: found.meta.kind,
            cast,
        });
    }
    let dtype = entry["dtype"].as_str().unwrap_or_default();
    let kind = kind_from_offload_name(dtype)
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
    let tensor = OffloadedTensor {
        path,
        start: 0,
        shape,
        kind,
        cast: None,
    };
    let expected = tensor.byte_len();
    if found < expected {
        return Err(Error::Checkpoint {
            path: tensor.path,
            detail: format!(
                "holds {found} bytes, but index.json says {name} is {dtype} {:?} ({expected} bytes)",
                tensor.shape
            ),
        });
    }
    Ok(tensor)
}

/// Reads one offloaded tensor (see [`offloaded_file`]) into host memory, page-locked when `pinned`.
pub(super) fn read_offloaded(
    folder: &Path,
    name: &str,
    entry: &Value,
    index_path: &Path,
    pinned: bool,
) -> Result<Tensor> {
    let found = offloaded_file(folder, name, entry, index_path)?;
    let tensor = read_tensor(&found.path, found.start, &found.shape, found.kind, pinned)?;
    Ok(match found.cast {
        Some(kind) if kind != found.kind => tensor.to_kind(kind),
        _ => tensor,
    })
}

/// Reads one offloaded tensor back (to the CPU) from `folder`, using its `index.json` entry (Accelerate's
/// `load_offloaded_weight`).
pub fn load_offloaded_weight(folder: &Path, name: &str) -> Result<Tensor> {
    let (index_path, index) = read_offload_index(folder)?;
    let entry = index
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, e)| e)
        .ok_or_else(|| Error::Checkpoint {
            path: index_path.clone(),
            detail: format!("has no entry for {name}"),
        })?;
    read_offloaded(folder, name, entry, &index_path, false)
}

/// Writes every tensor of `state` to `folder`, in order, and merges their entries into
/// `folder/index.json` (Accelerate's `offload_state_dict`; an empty state writes no index).
pub fn offload_state_dict(folder: &Path, state: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(folder).map_err(|e| Error::io("creating", folder, e))?;
    let mut index = OffloadIndex::new();
    for (name, tensor) in state {
        offload_weight(tensor, name, folder, Some(&mut index))?;
    }
    save_offload_index(&index, folder)
}

/// The shape-only placeholder an offloaded variable keeps (see `layers::empty_placeholder`); a 0-d
/// variable, which cannot be expanded from one element, keeps a real one-element scalar instead.
pub(super) fn placeholder(shape: &[i64], kind: Kind) -> Tensor {
    if shape.is_empty() {
        Tensor::zeros([] as [i64; 0], (kind, Device::Cpu))
    } else {
        crate::layers::empty_placeholder(shape, kind)
    }
}

/// `value` made fit for the variable `var`: the same shape (a one-element value for a 0-d variable, as
/// hasten wrote scalars before it followed Accelerate's `[]`, is reshaped) and the variable's kind (as
/// `set_module_tensor_to_device` casts a value to the parameter's dtype). Another shape is an error
/// naming the tensor.
pub(super) fn fit_to(var: &Tensor, value: Tensor, name: &str) -> Result<Tensor> {
    let value = if value.size() == var.size() {
        value
    } else if value.numel() == 1 && var.dim() == 0 {
        value.reshape([] as [i64; 0])
    } else {
        return Err(Error::InvalidValue {
            name: name.into(),
            detail: format!(
                "trying to set a tensor of shape {:?} in {name} (which has shape {:?}), this looks incorrect",
                value.size(),
                var.size()
            ),
        });
    };
    Ok(if value.kind() == var.kind() {
        value
    } else {
        value.to_kind(var.kind())
    })
}

/// Brings every tensor of `folder/index.json` that `vs` has back into the model, on the CPU, in index
/// order (Accelerate's `load_offloaded_weights`). Returns the names restored.
pub fn load_offloaded_weights(vs: &VarStore, folder: &Path) -> Result<Vec<String>> {
    let (index_path, index) = read_offload_index(folder)?;
    let mut variables = vs.variables();
    let mut restored = Vec::new();
    for (name, entry) in &index {
        let Some(var) = variables.get_mut(name) else {
            continue;
        };
        let value = fit_to(
            var,
            read_offloaded(folder, name, entry, &index_path, false)?,
            name,
        )?;
        let _guard = tch::no_grad_guard();
        var.f_set_data(&value)
            .map_err(|e| Error::torch("load_offloaded_weights", e))?;
        restored.push(name.clone());
    }
    Ok(restored)
}

#[cfg(test)]
mod tests;
