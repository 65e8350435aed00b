//! Model skeletons from files, without reading any weight: safetensors headers (one file, a sharded
//! index, or a folder), or a JSON description with module classes.

use super::ordered_json::Json;
use super::sizes::TensorMeta;
use super::skeleton::{ModelSkeleton, merged_module_order};
use crate::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::Kind;

/// A safetensors dtype name as a `Kind`.
pub fn kind_from_safetensors(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        "F8_E4M3" => Kind::Float8e4m3fn,
        "F8_E5M2" => Kind::Float8e5m2,
        _ => return None,
    })
}

/// A dtype as Accelerate and PyTorch name it (`float32`, `bfloat16`, …) as a `Kind`.
pub fn kind_from_torch_name(name: &str) -> Option<Kind> {
    Some(match name.trim_start_matches("torch.") {
        "float64" | "double" => Kind::Double,
        "float32" | "float" => Kind::Float,
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "int64" | "long" => Kind::Int64,
        "int32" | "int" => Kind::Int,
        "int16" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        "float8_e4m3fn" => Kind::Float8e4m3fn,
        "float8_e5m2" => Kind::Float8e5m2,
        _ => return None,
    })
}

fn bad(path: &Path, detail: String) -> Error {
    Error::Checkpoint {
        path: path.to_owned(),
        detail,
    }
}

/// The tensors listed in one safetensors file's header, in file order.
pub fn read_safetensors_header(path: &Path) -> Result<Vec<(String, TensorMeta)>> {
    Ok(read_safetensors_entries(path)?
        .into_iter()
        .map(|e| (e.name, e.meta))
        .collect())
}

/// One tensor of a safetensors file: its name, shape and dtype, and where its bytes lie in the file.
#[derive(Debug, Clone)]
pub(crate) struct SafetensorsEntry {
    pub name: String,
    pub meta: TensorMeta,
    /// Offset of the first byte from the start of the file.
    pub start: u64,
    /// Number of bytes (elements × element size).
    pub len: u64,
}

/// Reads one safetensors header, checking that every tensor's byte range matches its shape and dtype
/// and lies inside the file, so a truncated or inconsistent shard is refused before anything is read.
pub(crate) fn read_safetensors_entries(path: &Path) -> Result<Vec<SafetensorsEntry>> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| {
        bad(
            path,
            "too short to be a safetensors file (no 8-byte header length)".into(),
        )
    })?;
    let n = u64::from_le_bytes(len);
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if n == 0 || n > 100 << 20 || n + 8 > file_len {
        return Err(bad(
            path,
            format!("the header claims {n} bytes, which this {file_len}-byte file cannot hold"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io("reading the header of", path, e))?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(path, format!("the header is not valid JSON: {e}")))?;
    // serde's map keeps the last of two equal keys; the file's own order keeps both, so a tensor named
    // twice is refused instead of half-read.
    if let Some(names) = std::str::from_utf8(&header)
        .ok()
        .and_then(|t| super::ordered_json::Json::parse(t).ok())
        .and_then(|j| {
            j.as_object()
                .map(|o| o.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
        })
    {
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = names.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(bad(
                path,
                format!("tensor {twice} is named twice in the header"),
            ));
        }
    }
    let data_start = 8 + n;
    let mut tensors: Vec<SafetensorsEntry> = Vec::new();
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let kind = kind_from_safetensors(dtype).ok_or_else(|| {
            bad(
                path,
                format!("tensor {name} has an unsupported dtype {dtype:?}"),
            )
        })?;
        let shape: Vec<i64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad(path, format!("tensor {name} has no shape")))?
            .iter()
            .map(|d| {
                d.as_i64()
                    .filter(|d| *d >= 0)
                    .ok_or_else(|| bad(path, format!("tensor {name} has an invalid dimension")))
            })
            .collect::<Result<_>>()?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .map(|o| o.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        let [begin, end] = offsets[..] else {
            return Err(bad(
                path,
                format!("tensor {name} has no valid data_offsets"),
            ));
        };
        let meta = TensorMeta {
            shape,
            kind,
            buffer: false,
        };
        let Some(expected) = meta.checked_bytes().filter(|b| *b < u64::MAX) else {
            return Err(bad(
                path,
                format!(
                    "tensor {name} has shape {:?}, too large for any file",
                    meta.shape
                ),
            ));
        };
        if end < begin || end - begin != expected {
            return Err(bad(
                path,
                format!(
                    "tensor {name} spans bytes {begin}..{end} but its shape and dtype need {expected}"
                ),
            ));
        }
        if data_start
            .checked_add(end)
            .is_none_or(|last| last > file_len)
        {
            return Err(bad(
                path,
                format!(
                    "tensor {name} ends at byte {} but the file has {file_len} (truncated?)",
                    data_start + end
                ),
            ));
        }
        tensors.push(SafetensorsEntry {
            name,
            meta,
            start: data_start + begin,
            len: expected,
        });
    }
    // File order is offset order; JSON object order is not guaranteed.
    tensors.sort_by_key(|e| e.start);
    for pair in tensors.windows(2) {
        if pair[0].start + pair[0].len > pair[1].start {
            return Err(bad(
                path,
                format!(
                    "tensors {} and {} overlap (bytes {}..{} and {}..)",
                    pair[0].name,
                    pair[1].name,
                    pair[0].start,
                    pair[0].start + pair[0].len,
                    pair[1].start
                ),
            ));
        }
    }
    Ok(tensors)
}

/// The shard files of a checkpoint: one `.safetensors` file, a `*.index.json` (its `weight_map`), or a
/// folder holding `model.safetensors` (taken first, as Accelerate does, even beside an index) or
/// exactly one index.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io("listing", path, e))?
            .flatten()
            .map(|e| e.path())
            .collect();
        let indexes: Vec<&PathBuf> = entries
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
            .collect();
        if path.join(crate::SAFE_WEIGHTS_NAME).is_file() {
            return Ok(vec![path.join(crate::SAFE_WEIGHTS_NAME)]);
        }
        return match indexes.as_slice() {
            [index] => checkpoint_files(index),
            [] => Err(bad(
                path,
                "is not a folder containing a `.index.json` file or a model.safetensors file"
                    .into(),
            )),
            _ => Err(bad(
                path,
                "containing more than one `.index.json` file, delete the irrelevant ones.".into(),
            )),
        };
    }
    if path.to_string_lossy().ends_with(".json") {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(path, format!("not valid JSON: {e}")))?;
        // An index without "weight_map" is a flat name → file map, as Accelerate accepts.
        let map = json.get("weight_map").unwrap_or(&json);
        let map = map
            .as_object()
            .ok_or_else(|| bad(path, "the weight_map is not an object".into()))?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                bad(
                    path,
                    format!("weight_map entry {tensor} does not name a file"),
                )
            })?;
            // A shard is a file name in the index's folder: a path that leaves it (`../x`, `/etc/x`)
            // is refused, not read.
            let plain = Path::new(file)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain || file.is_empty() {
                return Err(bad(
                    path,
                    format!(
                        "weight_map entry {tensor} names {file:?}, which is not a file in the index's folder"
                    ),
                ));
            }
            let full = folder.join(file);
            if !files.contains(&full) {
                files.push(full);
            }
        }
        files.sort();
        return Ok(files);
    }
    Ok(vec![path.to_owned()])
}

impl ModelSkeleton {
    /// The skeleton of a safetensors checkpoint (file, index or folder), from the headers alone.
    pub fn from_safetensors(path: &Path) -> Result<Self> {
        let mut skeleton = ModelSkeleton::new();
        for file in checkpoint_files(path)? {
            for (name, meta) in read_safetensors_header(&file)? {
                skeleton = skeleton.param(&name, &meta.shape, meta.kind);
            }
        }
        Ok(skeleton)
    }

    /// A skeleton from hasten's JSON model description:
    /// `{"tensors": {"name": {"shape": [..], "dtype": "float32", "buffer": false, "persistent": true}, ...},
    ///   "modules": {"path": "ClassName", ...}, "no_split_module_classes": ["ClassName"],
    ///   "tied_parameters": [["embed.weight", "lm_head.weight"], ...]}`.
    ///
    /// Order is read from the file, as registration order: tensors in the order listed; modules in the
    /// order `"modules"` lists them (all of `named_modules()` gives PyTorch's order exactly; a module that
    /// holds no tensor, like an activation, must be listed to exist), the modules only tensor names
    /// mention fitted around them (see [`ModelSkeleton::from_var_store`]). Of a tied group, the name
    /// listed first in `"tensors"` holds the memory; the others are aliases (listed or not). Returns the
    /// skeleton and the no-split classes.
    pub fn from_json_description(path: &Path) -> Result<(Self, Vec<String>)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        let json = Json::parse(&text).map_err(|e| bad(path, format!("not valid JSON: {e}")))?;
        let tensors = json
            .get("tensors")
            .and_then(Json::as_object)
            .ok_or_else(|| bad(path, "no \"tensors\" object".into()))?;
        let mut described: Vec<(&str, TensorMeta, bool)> = Vec::with_capacity(tensors.len());
        for (name, info) in tensors {
            let dtype = info
                .get("dtype")
                .and_then(Json::as_str)
                .unwrap_or("float32");
            let kind = kind_from_torch_name(dtype).ok_or_else(|| {
                bad(
                    path,
                    format!("tensor {name} has an unknown dtype {dtype:?}"),
                )
            })?;
            let shape: Vec<i64> = info
                .get("shape")
                .and_then(Json::as_array)
                .ok_or_else(|| bad(path, format!("tensor {name} has no \"shape\"")))?
                .iter()
                .map(|d| {
                    d.as_i64().ok_or_else(|| {
                        bad(path, format!("tensor {name} has a non-integer dimension"))
                    })
                })
                .collect::<Result<_>>()?;
            let buffer = info.get("buffer").and_then(Json::as_bool).unwrap_or(false);
            let persistent = info
                .get("persistent")
                .and_then(Json::as_bool)
                .unwrap_or(true);
            described.push((
                name,
                TensorMeta {
                    shape,
                    kind,
                    buffer,
                },
                persistent,
            ));
        }
        let mut modules: Vec<(&str, Option<&str>)> = Vec::new();
        if let Some(listed) = json.get("modules") {
            let listed = listed
                .as_object()
                .ok_or_else(|| bad(path, "\"modules\" is not an object".into()))?;
            for (module, class) in listed {
                modules.push((module, class.as_str()));
            }
        }
        let tied: Vec<Vec<String>> = match json.get("tied_parameters") {
            None => Vec::new(),
            Some(groups) => groups
                .as_array()
                .ok_or_else(|| bad(path, "\"tied_parameters\" is not a list".into()))?
                .iter()
                .map(|g| {
                    g.as_array()
                        .and_then(|names| {
                            names
                                .iter()
                                .map(|n| n.as_str().map(str::to_owned))
                                .collect::<Option<Vec<String>>>()
                        })
                        .ok_or_else(|| {
                            bad(
                                path,
                                "\"tied_parameters\" holds a group that is not a list of names"
                                    .into(),
                            )
                        })
                })
                .collect::<Result<_>>()?,
        };
        let mut names: Vec<String> = described.iter().map(|(n, _, _)| (*n).to_owned()).collect();
        names.extend(tied.iter().flatten().cloned());
        let tensor_names: std::collections::HashSet<&str> =
            described.iter().map(|(n, _, _)| *n).collect();
        let listed: Vec<String> = modules
            .iter()
            .filter(|(m, _)| !tensor_names.contains(m))
            .map(|(m, _)| (*m).to_owned())
            .collect();
        let mut skeleton = ModelSkeleton::new();
        for module in merged_module_order(&listed, &names) {
            skeleton.register_module(&module);
        }
        for (name, meta, persistent) in described {
            skeleton = if meta.buffer && !persistent {
                skeleton.non_persistent_buffer(name, &meta.shape, meta.kind)
            } else if meta.buffer {
                skeleton.buffer(name, &meta.shape, meta.kind)
            } else {
                skeleton.param(name, &meta.shape, meta.kind)
            };
        }
        for (module, class) in modules {
            if let Some(class) = class {
                skeleton = skeleton.class(module, class);
            }
        }
        for group in &tied {
            let holder = group
                .iter()
                .filter_map(|n| {
                    skeleton
                        .tensors()
                        .iter()
                        .position(|(t, _)| t == n)
                        .map(|i| (i, n))
                })
                .min()
                .map(|(_, n)| n.clone())
                .ok_or_else(|| {
                    bad(
                        path,
                        format!("no name of the tied group {group:?} is listed in \"tensors\""),
                    )
                })?;
            for alias in group.iter().filter(|n| **n != holder) {
                skeleton = skeleton.tie(alias, &holder);
            }
        }
        let no_split: Vec<String> = json
            .get("no_split_module_classes")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok((skeleton, no_split))
    }
}

/// Writes the header-only description of named tensors as a safetensors file whose data is zeros — for
/// tests of header reading.
#[cfg(test)]
pub(crate) fn write_header_only(path: &Path, tensors: &[(&str, &[i64], &str)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape, dtype) in tensors {
        let elt = match *dtype {
            "F32" | "I32" => 4,
            "F16" | "BF16" => 2,
            "I64" | "F64" => 8,
            _ => 1,
        };
        let bytes = shape.iter().product::<i64>() as u64 * elt;
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let text = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap_or_default();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.resize(out.len() + offset as usize, 0);
    std::fs::write(path, out).unwrap_or_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_files_indexes_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        write_header_only(
            &dir.path().join("a.safetensors"),
            &[("w", &[2, 3], "F32"), ("b", &[3], "BF16")],
        );
        write_header_only(&dir.path().join("b.safetensors"), &[("c", &[4], "I64")]);
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata": {"total_size": 64}, "weight_map": {"w": "a.safetensors", "b": "a.safetensors", "c": "b.safetensors"}}"#,
        )
        .unwrap();
        let skeleton = ModelSkeleton::from_safetensors(dir.path()).unwrap();
        let names: Vec<&str> = skeleton.tensors().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["w", "b", "c"]);
        assert_eq!(skeleton.tensors()[1].1.kind, Kind::BFloat16);
        // A whole-model file beside an index is taken first, as Accelerate takes it.
        write_header_only(&dir.path().join("model.safetensors"), &[("w", &[2], "F32")]);
        assert_eq!(
            checkpoint_files(dir.path()).unwrap(),
            [dir.path().join("model.safetensors")]
        );
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        assert_eq!(
            skeleton.module_sizes(None, &Default::default())[""],
            24 + 6 + 32
        );
        // A corrupt header names the file.
        std::fs::write(
            dir.path().join("bad.safetensors"),
            [200u8, 0, 0, 0, 0, 0, 0, 0, b'{'],
        )
        .unwrap();
        let err = ModelSkeleton::from_safetensors(&dir.path().join("bad.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("header claims"),
            "{err}"
        );
    }

    #[test]
    fn json_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        std::fs::write(
            &path,
            r#"{"tensors": {"0.up.weight": {"shape": [8, 4], "dtype": "float16"},
                            "0.ln.running": {"shape": [4], "dtype": "float32", "buffer": true}},
                "modules": {"0": "Block"}, "no_split_module_classes": ["Block"]}"#,
        )
        .unwrap();
        let (skeleton, no_split) = ModelSkeleton::from_json_description(&path).unwrap();
        assert_eq!(no_split, vec!["Block".to_owned()]);
        assert_eq!(skeleton.class_of("0"), Some("Block"));
        let running = skeleton
            .tensors()
            .iter()
            .find(|(name, _)| name == "0.ln.running")
            .expect("buffer listed");
        assert!(running.1.buffer);
        // File order is registration order: layers.10 stays before layers.2.
        std::fs::write(
            &path,
            r#"{"tensors": {"layers.10.w": {"shape": [2]}, "layers.2.w": {"shape": [2]},
                            "mask": {"shape": [2], "buffer": true, "persistent": false}}}"#,
        )
        .unwrap();
        let (skeleton, _) = ModelSkeleton::from_json_description(&path).unwrap();
        let names: Vec<&str> = skeleton.tensors().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["layers.10.w", "layers.2.w", "mask"]);
        assert_eq!(skeleton.children("layers"), ["layers.10", "layers.2"]);
        assert_eq!(skeleton.state_dict_names(), ["layers.10.w", "layers.2.w"]);
        std::fs::write(
            &path,
            r#"{"tensors": {"x": {"shape": [1], "dtype": "float7"}}}"#,
        )
        .unwrap();
        let err = ModelSkeleton::from_json_description(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.json") && err.contains("float7"),
            "{err}"
        );
    }

    #[test]
    fn json_descriptions_hold_modules_without_tensors_and_tied_aliases() {
        // Accelerate 1.15's model B (oracle_bigmodel_devmap.py) with lm_head registered first, described
        // as named_modules() and state_dict() list it; the tied embed.weight is not a tensor of its own.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        let mut tensors = vec![r#""lm_head.weight": {"shape": [10, 4]}"#.to_owned()];
        let mut modules = vec![
            r#""": "B""#.to_owned(),
            r#""lm_head": "Linear""#.into(),
            r#""embed": "Embedding""#.into(),
            r#""layers": "ModuleList""#.into(),
        ];
        for i in 0..3 {
            for l in ["fc", "out"] {
                tensors.push(format!(r#""layers.{i}.{l}.weight": {{"shape": [4, 4]}}"#));
                tensors.push(format!(r#""layers.{i}.{l}.bias": {{"shape": [4]}}"#));
            }
            modules.push(format!(r#""layers.{i}": "Block""#));
            modules.push(format!(r#""layers.{i}.fc": "Linear""#));
            modules.push(format!(r#""layers.{i}.act": "GELU""#));
            modules.push(format!(r#""layers.{i}.out": "Linear""#));
        }
        tensors.push(r#""norm.weight": {"shape": [4]}, "norm.bias": {"shape": [4]}"#.into());
        modules.push(r#""act": "ReLU", "norm": "LayerNorm""#.into());
        std::fs::write(
            &path,
            format!(
                r#"{{"tensors": {{{}}}, "modules": {{{}}}, "no_split_module_classes": ["Block"],
                    "tied_parameters": [["embed.weight", "lm_head.weight"]]}}"#,
                tensors.join(", "),
                modules.join(", ")
            ),
        )
        .unwrap();
        let (skeleton, no_split) = ModelSkeleton::from_json_description(&path).unwrap();
        assert_eq!(
            skeleton.children(""),
            ["lm_head", "embed", "layers", "act", "norm"]
        );
        let sizes = skeleton.module_sizes(None, &Default::default());
        assert_eq!((sizes[""], sizes.get("embed")), (672, None));
        let map = crate::infer_auto_device_map(
            &skeleton,
            &crate::big_modeling::DeviceMapOptions {
                max_memory: vec![
                    (crate::big_modeling::DeviceKey::Gpu(0), 400),
                    (crate::big_modeling::DeviceKey::Gpu(1), 10_000),
                ],
                no_split_module_classes: no_split,
                ..Default::default()
            },
        );
        let map: Vec<(String, String)> = map.into_iter().map(|(k, v)| (k, v.to_string())).collect();
        let want: Vec<(String, String)> = [
            ("lm_head", "0"),
            ("embed", "0"),
            ("act", "1"),
            ("norm", "1"),
            ("layers", "1"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(map, want);
    }
}
