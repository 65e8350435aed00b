//! Accelerate's `load_checkpoint_and_dispatch` (plan a device map for a `tch` model, then load the
//! checkpoint by it), and `dispatch_model`, `cpu_offload` and `disk_offload`, which build the
//! [`Dispatcher`] (hooks.rs) that runs each block where the map puts it.
//!
//! Accelerate then attaches forward hooks that move activations between devices; tch modules have no
//! hooks, so a hasten model's `forward` moves its input to each block's device itself
//! ([`device_of`] answers which).

use super::device_map::{DeviceKey, DeviceMap, DeviceMapOptions, infer_auto_device_map};
use super::hooks::{Dispatcher, offloaded_entries};
use super::load::{LoadOptions, LoadReport, device_key_of, load_checkpoint_in_model, tch_device};
use super::memory::{MaxMemory, get_balanced_memory, get_max_memory};
use super::offload_format::{offload_state_dict, placeholder, read_offload_index};
use super::ordered_json::python_list;
use super::skeleton::ModelSkeleton;
use super::var_store::natural_cmp;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// How to place the model (Accelerate's `device_map` argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMapSpec {
    /// `"auto"`: like `"balanced"`.
    Auto,
    /// `"balanced"`: spread evenly over the GPUs, then the CPU, then the disk.
    Balanced,
    /// `"balanced_low_0"`: as balanced, keeping GPU 0 as free as possible (for generation).
    BalancedLowZero,
    /// `"sequential"`: fill GPU 0, then GPU 1, …, then the CPU, then the disk.
    Sequential,
    /// An explicit map.
    Map(DeviceMap),
}

impl FromStr for DeviceMapSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "balanced" => Ok(Self::Balanced),
            "balanced_low_0" => Ok(Self::BalancedLowZero),
            "sequential" => Ok(Self::Sequential),
            other => Err(Error::InvalidValue {
                name: "device_map".into(),
                detail: format!(
                    "{other:?}: use \"auto\", \"balanced\", \"balanced_low_0\", \"sequential\" or a map"
                ),
            }),
        }
    }
}

/// Settings of [`load_checkpoint_and_dispatch`] (Accelerate's keyword arguments and defaults).
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// Where modules go (default `"auto"`).
    pub device_map: DeviceMapSpec,
    /// Memory per device; default: what is free now (`get_max_memory`).
    pub max_memory: Option<MaxMemory>,
    /// Module classes never split across devices (classes as the model skeleton names them).
    pub no_split_module_classes: Vec<String>,
    /// Cast floating tensors to this dtype (and plan with its size).
    pub dtype: Option<Kind>,
    /// Where tensors mapped to the disk go.
    pub offload_folder: Option<PathBuf>,
    /// Offload the buffers of modules mapped to the disk too (default false, as in Accelerate; see
    /// [`LoadOptions::offload_buffers`]).
    pub offload_buffers: bool,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            device_map: DeviceMapSpec::Auto,
            max_memory: None,
            no_split_module_classes: Vec::new(),
            dtype: None,
            offload_folder: None,
            offload_buffers: false,
        }
    }
}

/// The device `module` (or tensor) runs on under `map`: its longest prefix's entry. Offloaded modules
/// run on the CPU once their weights are brought back.
pub fn device_of(map: &DeviceMap, module: &str) -> Option<Device> {
    device_key_of(map, module).map(tch_device)
}

/// Accelerate's `check_device_map`: every state-dict tensor of `model` (tied aliases and buffers
/// included) must get a device from `map` (its own key, a module above it, or `""`); the error lists those
/// left out, in state-dict order, with Accelerate's text. Returns Accelerate's warnings: one for the keys
/// that are not modules of `model` (typos, and tensor keys too, as in Accelerate), with the keys as
/// Python prints a list (`['p', 'lin.weight']`).
pub fn check_device_map(model: &ModelSkeleton, map: &DeviceMap) -> Result<Vec<String>> {
    let warnings: Vec<String> = unknown_keys_warning(model, map).into_iter().collect();
    let uncovered: Vec<String> = model
        .state_dict_names()
        .into_iter()
        .filter(|name| device_key_of(map, name).is_none())
        .collect();
    if uncovered.is_empty() {
        return Ok(warnings);
    }
    Err(Error::InvalidValue {
        name: "device_map".into(),
        detail: format!(
            "The device_map provided does not give any device for the following parameters: {}",
            uncovered.join(", ")
        ),
    })
}

/// Accelerate's warning for device-map keys that name no module of `model` (`""` never warns).
pub(crate) fn unknown_keys_warning(model: &ModelSkeleton, map: &DeviceMap) -> Option<String> {
    let unknown: Vec<&str> = map
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !k.is_empty() && !model.is_module(k))
        .collect();
    (!unknown.is_empty()).then(|| {
        format!(
            "The following device_map keys do not match any submodules in the model: {}",
            python_list(&unknown)
        )
    })
}

/// Plans a device map for `vs` (described by `skeleton`, e.g. [`ModelSkeleton::from_var_store`]) and
/// loads `checkpoint` by it. Returns the map and what was loaded where.
pub fn load_checkpoint_and_dispatch(
    vs: &VarStore,
    skeleton: &ModelSkeleton,
    checkpoint: &Path,
    opts: &DispatchOptions,
) -> Result<(DeviceMap, LoadReport)> {
    // Planning may bring up CUDA on every GPU first (get_max_memory): let a cold disk start meanwhile.
    if let Ok(files) = super::describe::checkpoint_files(checkpoint) {
        super::read::start_readahead(files);
    }
    let special = BTreeMap::new();
    let plan = |max_memory: MaxMemory| {
        infer_auto_device_map(
            skeleton,
            &DeviceMapOptions {
                max_memory,
                no_split_module_classes: opts.no_split_module_classes.clone(),
                dtype: opts.dtype,
                offload_buffers: opts.offload_buffers,
                ..Default::default()
            },
        )
    };
    let device_map = match &opts.device_map {
        DeviceMapSpec::Map(map) => map.clone(),
        DeviceMapSpec::Sequential => plan(match &opts.max_memory {
            Some(m) => m.clone(),
            None => get_max_memory()?,
        }),
        balanced => plan(get_balanced_memory(
            skeleton,
            opts.max_memory.clone(),
            &opts.no_split_module_classes,
            opts.dtype,
            &special,
            *balanced == DeviceMapSpec::BalancedLowZero,
        )?),
    };
    // Accelerate checks the map when it dispatches the loaded model; checking it first loads nothing
    // for a map that would be refused. Its warnings come after the loader's, as in Accelerate.
    let map_warnings = check_device_map(skeleton, &device_map)?;
    let mut report = load_checkpoint_in_model(
        vs,
        checkpoint,
        &LoadOptions {
            device_map: Some(device_map.clone()),
            dtype: opts.dtype,
            offload_folder: opts.offload_folder.clone(),
            strict: false,
            offload_buffers: opts.offload_buffers,
        },
    )?;
    report.warnings.extend(map_warnings);
    Ok((device_map, report))
}

/// Accelerate's `dispatch_model`: runs `vs`'s modules by `map` (as `load_checkpoint_and_dispatch` or
/// `infer_auto_device_map` made it). `offload_folder` holds the disk-offloaded weights; `main_device`
/// (default: the first GPU of the map, else the CPU) runs the offloaded blocks and receives outputs.
pub fn dispatch_model(
    vs: &VarStore,
    map: DeviceMap,
    offload_folder: Option<&Path>,
    main_device: Option<Device>,
) -> Result<Dispatcher> {
    let folder = match offload_folder {
        Some(folder) => {
            let (index_path, index) = read_offload_index(folder)?;
            Some((folder.to_owned(), index_path, offloaded_entries(vs, index)))
        }
        None if map.iter().any(|(_, d)| *d == DeviceKey::Disk) => {
            let disk: Vec<&str> = map
                .iter()
                .filter(|(_, d)| *d == DeviceKey::Disk)
                .map(|(m, _)| m.as_str())
                .collect();
            return Err(Error::InvalidValue {
                name: "offload_folder".into(),
                detail: format!(
                    "We need an `offload_dir` to dispatch this model according to this `device_map`, \
                     the following submodules need to be offloaded: {}.",
                    disk.join(", ")
                ),
            });
        }
        None => None,
    };
    let first_gpu = map.iter().find_map(|(_, d)| match d {
        DeviceKey::Gpu(i) => Some(Device::Cuda(*i)),
        _ => None,
    });
    Ok(Dispatcher::new(
        vs,
        map,
        main_device.or(first_gpu).unwrap_or(Device::Cpu),
        folder,
    ))
}

/// Accelerate's `cpu_offload`: every weight stays on the CPU and comes to `execution_device` for the
/// forward of the block using it.
pub fn cpu_offload(vs: &VarStore, execution_device: Device) -> Result<Dispatcher> {
    dispatch_model(
        vs,
        vec![(String::new(), DeviceKey::Cpu)],
        None,
        Some(execution_device),
    )
}

/// Accelerate's `disk_offload`: writes every weight of `vs` to `folder` (unless its index already
/// lists them), leaves shape-only placeholders in the model, and reads each block's weights for its
/// forward only. A var store keeps no registration order, so `index.json` lists the tensors by name,
/// numbers compared as numbers (Accelerate: state-dict order).
pub fn disk_offload(vs: &VarStore, folder: &Path, execution_device: Device) -> Result<Dispatcher> {
    if !folder.join("index.json").is_file() {
        let mut state: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        state.sort_by(|(a, _), (b, _)| natural_cmp(a, b));
        offload_state_dict(folder, &state)?;
    }
    let _guard = tch::no_grad_guard();
    for (_, mut var) in vs.variables() {
        let placeholder = placeholder(&var.size(), var.kind());
        var.f_set_data(&placeholder)
            .map_err(|e| Error::torch("disk_offload", e))?;
    }
    dispatch_model(
        vs,
        vec![(String::new(), DeviceKey::Disk)],
        Some(folder),
        Some(execution_device),
    )
}

#[cfg(test)]
mod tests {
    use super::super::var_store::natural_cmp;
    use super::*;
    use crate::big_modeling::{DeviceKey, find_tied_parameters, retie_parameters};
    use tch::{Tensor, nn};

    #[test]
    fn names_sort_like_registration() {
        let mut names = vec!["layers.10.w", "layers.2.w", "embed.w", "layers.2.b"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["embed.w", "layers.2.b", "layers.2.w", "layers.10.w"]
        );
        assert!(
            "balanced_low_0".parse::<DeviceMapSpec>().unwrap() == DeviceMapSpec::BalancedLowZero
        );
        let err = "everywhere"
            .parse::<DeviceMapSpec>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("device_map") && err.contains("everywhere"),
            "{err}"
        );
    }

    #[test]
    fn sequential_fills_the_cpu_then_offloads_the_rest() {
        // Four 16×16 fp32 blocks (1,088 bytes each with bias). The CPU holds three, but as in Accelerate
        // room for the largest layer stays free on a device when later modules go to disk: two fit.
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let layers: Vec<nn::Linear> = (0..4)
            .map(|i| nn::linear(&root / "layers" / i, 16, 16, Default::default()))
            .collect();
        let classes: Vec<(String, &str)> =
            (0..4).map(|i| (format!("layers.{i}"), "Block")).collect();
        let class_refs: Vec<(&str, &str)> = classes.iter().map(|(p, c)| (p.as_str(), *c)).collect();
        let skeleton = ModelSkeleton::from_var_store(&vs, &class_refs);
        assert_eq!(skeleton.tensors()[0].0, "layers.0.bias");

        let dir = tempfile::tempdir().unwrap();
        let saved: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy().fill_(1.5)))
            .collect();
        Tensor::write_safetensors(&saved, dir.path().join("model.safetensors")).unwrap();
        let offload = dir.path().join("offload");
        let (map, report) = load_checkpoint_and_dispatch(
            &vs,
            &skeleton,
            dir.path(),
            &DispatchOptions {
                device_map: DeviceMapSpec::Sequential,
                max_memory: Some(vec![(DeviceKey::Cpu, 3 * 1088 + 100)]),
                no_split_module_classes: vec!["Block".into()],
                offload_folder: Some(offload.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            map,
            vec![
                ("layers.0".to_owned(), DeviceKey::Cpu),
                ("layers.1".to_owned(), DeviceKey::Cpu),
                ("layers.2".to_owned(), DeviceKey::Disk),
                ("layers.3".to_owned(), DeviceKey::Disk),
            ]
        );
        assert_eq!((report.loaded.len(), report.offloaded.len()), (4, 4));
        assert_eq!(device_of(&map, "layers.1.weight"), Some(Device::Cpu));
        assert!(
            layers[0]
                .ws
                .equal(&Tensor::full([16, 16], 1.5, (Kind::Float, Device::Cpu)))
        );
        assert_eq!(layers[3].ws.stride(), [0, 0], "offloaded: placeholder");
        assert!(offload.join("layers.3.weight.dat").is_file());

        assert_eq!(
            check_device_map(&skeleton, &map).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(unknown_keys_warning(&skeleton, &map), None);
        // Python's list formatting, as Accelerate's warning prints it.
        let typo = vec![("layer.0".to_owned(), DeviceKey::Cpu), map[0].clone()];
        assert_eq!(
            unknown_keys_warning(&skeleton, &typo).as_deref(),
            Some(
                "The following device_map keys do not match any submodules in the model: ['layer.0']"
            )
        );
        let err = check_device_map(&skeleton, &map[..3].to_vec())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layers.3.bias, layers.3.weight") && !err.contains("layers.2"),
            "{err}"
        );
    }

    #[test]
    fn map_warnings_come_back_in_the_report() {
        // Accelerate's dispatch_model checks the map: a tensor key ('p') is not a module and warns; a
        // map leaving tensors out is refused (here before anything is loaded).
        let vs = VarStore::new(Device::Cpu);
        let p = vs.root().var("p", &[2], nn::Init::Const(0.0));
        let _lin = nn::linear(vs.root() / "lin", 2, 2, Default::default());
        let dir = tempfile::tempdir().unwrap();
        let saved: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy().fill_(2.0)))
            .collect();
        Tensor::write_safetensors(&saved, dir.path().join("model.safetensors")).unwrap();
        let skeleton = ModelSkeleton::from_var_store(&vs, &[]);
        let opts = |map: &[&str]| DispatchOptions {
            device_map: DeviceMapSpec::Map(
                map.iter()
                    .map(|k| ((*k).to_owned(), DeviceKey::Cpu))
                    .collect(),
            ),
            ..Default::default()
        };
        let err = load_checkpoint_and_dispatch(&vs, &skeleton, dir.path(), &opts(&["p"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "The device_map provided does not give any device for the following parameters: \
                 lin.bias, lin.weight"
            ),
            "{err}"
        );
        assert!(p.equal(&Tensor::zeros([2], (Kind::Float, Device::Cpu))));
        let (_, report) =
            load_checkpoint_and_dispatch(&vs, &skeleton, dir.path(), &opts(&["p", "lin"])).unwrap();
        assert_eq!(
            report.warnings,
            ["The following device_map keys do not match any submodules in the model: ['p']"]
        );
        assert!(p.equal(&Tensor::full([2], 2.0, (Kind::Float, Device::Cpu))));
    }

    #[test]
    fn tied_weights_are_found_kept_together_and_retied() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let embed = root
            .sub("embed")
            .var("weight", &[8, 4], nn::Init::Const(0.5));
        // The output layer reuses the embedding's tensor, as language models do.
        let _head = root.sub("head").add("weight", embed.shallow_clone(), true);
        let _other = root.sub("mid").var("weight", &[4, 4], nn::Init::Const(1.0));
        let groups = find_tied_parameters(&vs);
        assert_eq!(
            groups,
            vec![vec!["embed.weight".to_owned(), "head.weight".to_owned()]]
        );
        let skeleton = ModelSkeleton::from_var_store(&vs, &[]);
        assert_eq!(skeleton.tied_parameters(), groups.as_slice());
        // The tied tensor counts once: 8×4 + 4×4 floats.
        assert_eq!(
            skeleton.module_sizes(None, &BTreeMap::new())[""],
            (32 + 16) * 4
        );

        // Two separate variables that should share storage (a tie lost when a model was rebuilt).
        let loose = VarStore::new(Device::Cpu);
        let _a = loose
            .root()
            .sub("a")
            .var("weight", &[2, 2], nn::Init::Const(1.0));
        let _b = loose
            .root()
            .sub("b")
            .var("weight", &[2, 2], nn::Init::Const(2.0));
        assert!(find_tied_parameters(&loose).is_empty());
        let pair = vec![vec!["a.weight".to_owned(), "b.weight".to_owned()]];
        retie_parameters(&loose, &pair).unwrap();
        assert_eq!(find_tied_parameters(&loose), pair);
        assert!(
            loose.variables()["b.weight"].equal(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu)))
        );

        // Loading by a map that places only the embedding: the tied head follows it, nothing moves apart.
        let dir = tempfile::tempdir().unwrap();
        let saved = [(
            "embed.weight",
            Tensor::full([8, 4], 2.0, (Kind::Float, Device::Cpu)),
        )];
        Tensor::write_safetensors(&saved, dir.path().join("model.safetensors")).unwrap();
        let map = vec![
            ("embed".to_owned(), DeviceKey::Cpu),
            ("mid".to_owned(), DeviceKey::Cpu),
        ];
        let opts = LoadOptions {
            device_map: Some(map),
            ..Default::default()
        };
        load_checkpoint_in_model(&vs, dir.path(), &opts).unwrap();
        assert!(vs.variables()["head.weight"].equal(&saved[0].1));
        assert_eq!(find_tied_parameters(&vs), groups);

        let err = retie_parameters(&vs, &[vec!["embed.weight".into(), "nope".into()]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn a_70b_skeleton_holds_no_tensor_memory() {
        // Llama-2-70B's shapes: 80 layers, hidden 8192, MLP 28672, 8 KV heads of 128, vocabulary 32000.
        let (h, m, kv, vocab) = (8192, 28672, 1024, 32000);
        let mut model =
            ModelSkeleton::new().param("model.embed_tokens.weight", &[vocab, h], Kind::BFloat16);
        for i in 0..80 {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("self_attn.q_proj.weight", [h, h]),
                ("self_attn.k_proj.weight", [kv, h]),
                ("self_attn.v_proj.weight", [kv, h]),
                ("self_attn.o_proj.weight", [h, h]),
                ("mlp.gate_proj.weight", [m, h]),
                ("mlp.up_proj.weight", [m, h]),
                ("mlp.down_proj.weight", [h, m]),
            ] {
                model = model.param(&format!("{p}.{name}"), &shape, Kind::BFloat16);
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                model = model.param(&format!("{p}.{norm}.weight"), &[h], Kind::BFloat16);
            }
            model = model.class(&p, "LlamaDecoderLayer");
        }
        model = model
            .param("model.norm.weight", &[h], Kind::BFloat16)
            .param("lm_head.weight", &[vocab, h], Kind::BFloat16);
        let numel: i64 = model
            .tensors()
            .iter()
            .map(|(_, t)| t.shape.iter().product::<i64>())
            .sum();
        assert_eq!(numel, 68_976_648_192, "Llama-2-70B's parameter count");
        let sizes = model.module_sizes(None, &BTreeMap::new());
        assert_eq!(sizes[""], 2 * 68_976_648_192);
        let map = infer_auto_device_map(
            &model,
            &DeviceMapOptions {
                max_memory: vec![
                    (DeviceKey::Gpu(0), 80 << 30),
                    (DeviceKey::Gpu(1), 80 << 30),
                    (DeviceKey::Cpu, 64 << 30),
                ],
                no_split_module_classes: vec!["LlamaDecoderLayer".into()],
                ..Default::default()
            },
        );
        check_device_map(&model, &map).unwrap();
        assert_eq!(
            device_of(&map, "model.layers.0.mlp.up_proj.weight"),
            Some(Device::Cuda(0))
        );
        assert_eq!(
            device_of(&map, "model.layers.79.mlp.up_proj.weight"),
            Some(Device::Cuda(1))
        );
    }
}
