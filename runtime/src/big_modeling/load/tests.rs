//! Loading, offloading and their errors, on small VarStores.

use super::*;
use crate::big_modeling::{
    load_offloaded_weight, load_offloaded_weights, offload_weight, save_offload_index,
};
use serde_json::{Value, json};
use tch::nn;

/// Two linear layers, "0" (4 → 3) and "1" (3 → 2), on the CPU.
fn model() -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let _a = nn::linear(&root / "0", 4, 3, Default::default());
    let _b = nn::linear(&root / "1", 3, 2, Default::default());
    vs
}

fn values(shape: &[i64], start: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    Tensor::arange(n, (Kind::Float, Device::Cpu))
        .g_add_scalar(start)
        .reshape(shape)
}

fn var(vs: &VarStore, name: &str) -> Tensor {
    vs.variables()[name].shallow_clone()
}

#[test]
fn loads_by_device_map_and_offloads_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let tensors = [
        ("0.weight", values(&[3, 4], 0.0)),
        ("0.bias", values(&[3], 100.0)),
        ("1.weight", values(&[2, 3], 200.0)),
        ("lm_head.weight", values(&[2], 0.0)),
    ];
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let vs = model();
    let offload = dir.path().join("offload");
    let report = load_checkpoint_in_model(
        &vs,
        dir.path(),
        &LoadOptions {
            device_map: Some(vec![
                ("0".into(), DeviceKey::Cpu),
                ("1".into(), DeviceKey::Disk),
            ]),
            offload_folder: Some(offload.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut loaded = report.loaded.clone();
    loaded.sort();
    assert_eq!(loaded, ["0.bias", "0.weight"]);
    assert_eq!(report.offloaded, ["1.weight"]);
    assert_eq!(report.unexpected, ["lm_head.weight"]);
    assert_eq!(report.missing, ["1.bias"]);
    assert!(var(&vs, "0.weight").equal(&tensors[0].1));
    assert!(var(&vs, "0.bias").equal(&tensors[1].1));

    // The offloaded variable keeps its shape on a one-element placeholder.
    let placeholder = var(&vs, "1.weight");
    assert_eq!(placeholder.size(), [2, 3]);
    assert_eq!(placeholder.stride(), [0, 0]);
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(offload.join("index.json")).unwrap())
            .unwrap();
    assert_eq!(
        index,
        json!({"1.weight": {"dtype": "float32", "shape": [2, 3]}})
    );
    assert_eq!(
        std::fs::read(offload.join("1.weight.dat")).unwrap().len(),
        6 * 4
    );

    assert_eq!(load_offloaded_weights(&vs, &offload).unwrap(), ["1.weight"]);
    assert!(var(&vs, "1.weight").equal(&tensors[2].1));
    assert!(
        load_offloaded_weight(&offload, "1.weight")
            .unwrap()
            .equal(&tensors[2].1)
    );
}

#[test]
fn sharded_checkpoints_cast_and_offload_uncast() {
    let dir = tempfile::tempdir().unwrap();
    let w0 = values(&[3, 4], 0.5);
    let w1 = values(&[2, 3], -3.0);
    Tensor::write_safetensors(&[("0.weight", &w0)], dir.path().join("a.safetensors")).unwrap();
    Tensor::write_safetensors(&[("1.weight", &w1)], dir.path().join("b.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"0.weight": "a.safetensors", "1.weight": "b.safetensors"}}"#,
    )
    .unwrap();
    let vs = model();
    let offload = dir.path().join("offload");
    load_checkpoint_in_model(
        &vs,
        dir.path(),
        &LoadOptions {
            device_map: Some(vec![
                ("".into(), DeviceKey::Cpu),
                ("1".into(), DeviceKey::Disk),
            ]),
            dtype: Some(Kind::BFloat16),
            offload_folder: Some(offload.clone()),
            // The biases are not in this checkpoint: a report, not an error.
            ..Default::default()
        },
    )
    .unwrap();
    let first = var(&vs, "0.weight");
    assert_eq!(first.kind(), Kind::BFloat16);
    assert!(first.equal(&w0.to_kind(Kind::BFloat16)));
    // Accelerate 1.15 (load_checkpoint_in_model, dtype=float16, a disk module): index.json says the
    // checkpoint's float32, while the model's meta placeholder has the requested dtype.
    let index = std::fs::read_to_string(offload.join("index.json")).unwrap();
    assert_eq!(
        index,
        "{\n  \"1.weight\": {\n    \"dtype\": \"float32\",\n    \"shape\": [\n      2,\n      3\n    ]\n  }\n}"
    );
    assert_eq!(var(&vs, "1.weight").kind(), Kind::BFloat16);
    let back = load_offloaded_weight(&offload, "1.weight").unwrap();
    assert_eq!(back.kind(), Kind::Float);
    assert!(back.equal(&w1));
    // Brought back into the model, the value takes the variable's dtype (set_module_tensor_to_device).
    load_offloaded_weights(&vs, &offload).unwrap();
    assert!(var(&vs, "1.weight").equal(&w1.to_kind(Kind::BFloat16)));
}

#[test]
fn state_dicts_and_single_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let w = values(&[3, 4], 2.0);
    Tensor::write_safetensors(&[("0.weight", &w), ("1.bias", &values(&[2], 9.0))], &file).unwrap();
    let map = vec![
        ("0".to_owned(), DeviceKey::Cpu),
        ("1".to_owned(), DeviceKey::Disk),
    ];
    let state = load_state_dict(&file, Some(&map)).unwrap();
    assert_eq!(state.len(), 2);
    assert_eq!(state[0].0, "0.weight");
    assert!(state[0].1.equal(&w));
    assert_eq!(state[1].1.device(), Device::Cpu);

    let vs = model();
    set_module_tensor_to_device(&vs, "0.weight", Device::Cpu, Some(&w), Some(Kind::Half)).unwrap();
    assert_eq!(var(&vs, "0.weight").kind(), Kind::Half);
    assert!(var(&vs, "0.weight").to_kind(Kind::Float).equal(&w));
    let err = set_module_tensor_to_device(&vs, "0.weight", Device::Cpu, Some(&w.tr()), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("0.weight") && err.contains("[4, 3]"), "{err}");
    let err = set_module_tensor_to_device(&vs, "nope", Device::Cpu, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    Tensor::write_safetensors(&[("0.weight", values(&[4, 3], 0.0))], &file).unwrap();
    let vs = model();
    let before = var(&vs, "0.weight").copy();
    let err = load_checkpoint_in_model(&vs, &file, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0.weight") && err.contains("[4, 3]") && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(
        var(&vs, "0.weight").equal(&before),
        "a failed load changed nothing"
    );

    // A mismatch in the second shard is found before the first shard is loaded.
    let good = values(&[2, 3], 7.0);
    Tensor::write_safetensors(&[("1.weight", &good)], dir.path().join("a.safetensors")).unwrap();
    Tensor::write_safetensors(
        &[("0.weight", values(&[4, 3], 0.0))],
        dir.path().join("b.safetensors"),
    )
    .unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"1.weight": "a.safetensors", "0.weight": "b.safetensors"}}"#,
    )
    .unwrap();
    let err = load_checkpoint_in_model(&vs, &index, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("b.safetensors"), "{err}");
    assert!(
        !var(&vs, "1.weight").equal(&good),
        "the first shard was not applied"
    );

    // strict: the model's 0.bias, 1.weight, 1.bias are missing from this checkpoint.
    let good_file = dir.path().join("good.safetensors");
    Tensor::write_safetensors(&[("0.weight", values(&[3, 4], 0.0))], &good_file).unwrap();
    let strict = LoadOptions {
        strict: true,
        ..Default::default()
    };
    let err = load_checkpoint_in_model(&vs, &good_file, &strict)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("good.safetensors")
            && err.contains("missing keys [\"0.bias\", \"1.bias\", \"1.weight\"]"),
        "{err}"
    );
    assert!(
        var(&vs, "0.weight").equal(&before),
        "strict failure loads nothing"
    );

    // A truncated shard: refused from its header, naming the shard and the tensor cut short.
    let cut = dir.path().join("cut.safetensors");
    Tensor::write_safetensors(&[("0.weight", values(&[3, 4], 1.0))], &cut).unwrap();
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    let err = load_checkpoint_in_model(&vs, &cut, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cut.safetensors") && err.contains("0.weight") && err.contains("truncated"),
        "{err}"
    );
    assert!(var(&vs, "0.weight").equal(&before));

    let disk_without_folder = LoadOptions {
        device_map: Some(vec![("".into(), DeviceKey::Disk)]),
        ..Default::default()
    };
    let err = load_checkpoint_in_model(&vs, &file, &disk_without_folder)
        .unwrap_err()
        .to_string();
    assert!(err.contains("offload_folder"), "{err}");

    // A checkpoint tensor no key covers: Accelerate's message (it only asks about the checkpoint's
    // tensors; hasten asks before loading anything).
    let partial_map = LoadOptions {
        device_map: Some(vec![("1".into(), DeviceKey::Cpu)]),
        ..Default::default()
    };
    let err = load_checkpoint_in_model(&vs, &good_file, &partial_map)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0.weight doesn't have any device set."),
        "{err}"
    );
    assert!(var(&vs, "0.weight").equal(&before));

    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\0\0\0\0\0\0\0{").unwrap();
    let err = load_checkpoint_in_model(&vs, &corrupt, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt.safetensors"), "{err}");

    let offload = dir.path().join("offload");
    let mut index = Vec::new();
    offload_weight(&values(&[2, 2], 0.0), "w", &offload, Some(&mut index)).unwrap();
    save_offload_index(&index, &offload).unwrap();
    std::fs::write(offload.join("w.dat"), [0u8; 5]).unwrap();
    let err = load_offloaded_weight(&offload, "w")
        .unwrap_err()
        .to_string();
    assert!(err.contains("w.dat") && err.contains("5 bytes"), "{err}");
}

/// `nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))` as a var store: "0" and "1", the batch norm's
/// statistics as buffers (variables that are not trained).
fn linear_then_batch_norm() -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let _lin = nn::linear(&root / "0", 2, 2, Default::default());
    let bn = &root / "1";
    let _w = bn.var("weight", &[2], nn::Init::Const(1.0));
    let _b = bn.var("bias", &[2], nn::Init::Const(0.0));
    let _mean = bn.zeros_no_train("running_mean", &[2]);
    let _var = bn.ones_no_train("running_var", &[2]);
    let _count = bn.add("num_batches_tracked", Tensor::from(0i64), false);
    vs
}

fn listing(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn disk_buffers_follow_offload_buffers_and_disk_tensors_stay_uncast() {
    // Accelerate 1.15: load_checkpoint_in_model(Sequential(Linear(2, 2), BatchNorm1d(2)), ck,
    // device_map={"0": "cpu", "1": "disk"}, dtype=torch.float16, offload_buffers=...), the checkpoint
    // holding running_mean=5, running_var=3, num_batches_tracked=9.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let f = |v: &[f32]| Tensor::from_slice(v);
    Tensor::write_safetensors(
        &[
            ("0.weight", f(&[1.0, 2.0, 3.0, 4.0]).reshape([2, 2])),
            ("0.bias", f(&[5.0, 6.0])),
            ("1.weight", f(&[7.0, 8.0])),
            ("1.bias", f(&[9.0, 10.0])),
            ("1.running_mean", f(&[5.0, 5.0])),
            ("1.running_var", f(&[3.0, 3.0])),
            ("1.num_batches_tracked", Tensor::from(9i64)),
        ],
        &ck,
    )
    .unwrap();
    let opts = |folder: &Path, offload_buffers: bool| LoadOptions {
        device_map: Some(vec![
            ("0".into(), DeviceKey::Cpu),
            ("1".into(), DeviceKey::Disk),
        ]),
        dtype: Some(Kind::Half),
        offload_folder: Some(folder.to_owned()),
        offload_buffers,
        ..Default::default()
    };

    // offload_buffers=False: the buffers are neither written nor loaded; the model keeps its values.
    let vs = linear_then_batch_norm();
    let folder = dir.path().join("lc_false");
    let report = load_checkpoint_in_model(&vs, &ck, &opts(&folder, false)).unwrap();
    assert_eq!(
        std::fs::read_to_string(folder.join("index.json")).unwrap(),
        "{\n  \"1.bias\": {\n    \"dtype\": \"float32\",\n    \"shape\": [\n      2\n    ]\n  },\n  \"1.weight\": \
         {\n    \"dtype\": \"float32\",\n    \"shape\": [\n      2\n    ]\n  }\n}"
    );
    assert_eq!(
        listing(&folder),
        ["1.bias.dat", "1.weight.dat", "index.json"]
    );
    assert_eq!(
        std::fs::read(folder.join("1.weight.dat")).unwrap(),
        [0, 0, 0xe0, 0x40, 0, 0, 0, 0x41]
    );
    assert_eq!(
        report.skipped_buffers,
        ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    );
    assert_eq!(var(&vs, "0.weight").kind(), Kind::Half);
    assert_eq!(
        var(&vs, "1.weight").kind(),
        Kind::Half,
        "placeholder: the cast kind"
    );
    assert!(var(&vs, "1.running_mean").equal(&f(&[0.0, 0.0])));
    assert!(var(&vs, "1.running_var").equal(&f(&[1.0, 1.0])));
    assert_eq!(var(&vs, "1.num_batches_tracked").int64_value(&[]), 0);

    // offload_buffers=True: the buffers go to the folder too, uncast, the counter with shape [].
    let vs = linear_then_batch_norm();
    let folder = dir.path().join("lc_true");
    let report = load_checkpoint_in_model(&vs, &ck, &opts(&folder, true)).unwrap();
    assert!(report.skipped_buffers.is_empty());
    assert_eq!(
        listing(&folder),
        [
            "1.bias.dat",
            "1.num_batches_tracked.dat",
            "1.running_mean.dat",
            "1.running_var.dat",
            "1.weight.dat",
            "index.json"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(folder.join("index.json")).unwrap(),
        "{\n  \"1.bias\": {\n    \"dtype\": \"float32\",\n    \"shape\": [\n      2\n    ]\n  },\n  \
         \"1.num_batches_tracked\": {\n    \"dtype\": \"int64\",\n    \"shape\": []\n  },\n  \"1.running_mean\": {\n    \
         \"dtype\": \"float32\",\n    \"shape\": [\n      2\n    ]\n  },\n  \"1.running_var\": {\n    \"dtype\": \
         \"float32\",\n    \"shape\": [\n      2\n    ]\n  },\n  \"1.weight\": {\n    \"dtype\": \"float32\",\n    \
         \"shape\": [\n      2\n    ]\n  }\n}"
    );
    assert_eq!(
        std::fs::read(folder.join("1.num_batches_tracked.dat")).unwrap(),
        [9, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(var(&vs, "1.running_mean").kind(), Kind::Half);
    assert_eq!(var(&vs, "1.num_batches_tracked").kind(), Kind::Int64);
    load_offloaded_weights(&vs, &folder).unwrap();
    assert!(var(&vs, "1.running_mean").equal(&f(&[5.0, 5.0]).to_kind(Kind::Half)));
    assert_eq!(var(&vs, "1.num_batches_tracked").int64_value(&[]), 9);
}

#[test]
fn tied_parameters_on_different_devices_are_a_warning() {
    // Accelerate: "Tied parameters are on different devices: {'embed.weight': 'cpu', 'lm_head.weight':
    // 'disk'}. Please modify your custom device map or set `device_map='auto'`. " (logged).
    let vs = VarStore::new(Device::Cpu);
    let embed = vs
        .root()
        .sub("embed")
        .var("weight", &[4, 2], nn::Init::Const(1.0));
    let _head = vs
        .root()
        .sub("lm_head")
        .add("weight", embed.shallow_clone(), true);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("tied.safetensors");
    Tensor::write_safetensors(
        &[(
            "embed.weight",
            Tensor::zeros([4, 2], (Kind::Float, Device::Cpu)),
        )],
        &ck,
    )
    .unwrap();
    let report = load_checkpoint_in_model(
        &vs,
        &ck,
        &LoadOptions {
            device_map: Some(vec![
                ("embed".into(), DeviceKey::Cpu),
                ("lm_head".into(), DeviceKey::Disk),
            ]),
            offload_folder: Some(dir.path().join("off")),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        report.warnings,
        [
            "Tied parameters are on different devices: {'embed.weight': 'cpu', 'lm_head.weight': 'disk'}. \
          Please modify your custom device map or set `device_map='auto'`. "
        ]
    );
}
