//! Loading, offloading and their errors, on small VarStores.

use super::*;
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
fn sharded_checkpoints_cast_and_bf16_offload() {
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
            strict: false,
        },
    )
    .unwrap();
    let first = var(&vs, "0.weight");
    assert_eq!(first.kind(), Kind::BFloat16);
    assert!(first.equal(&w0.to_kind(Kind::BFloat16)));
    let index = std::fs::read_to_string(offload.join("index.json")).unwrap();
    assert!(index.contains("\"bfloat16\""), "{index}");
    let back = load_offloaded_weight(&offload, "1.weight").unwrap();
    assert_eq!(back.kind(), Kind::BFloat16);
    assert!(back.equal(&w1.to_kind(Kind::BFloat16)));
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

    let partial_map = LoadOptions {
        device_map: Some(vec![("0".into(), DeviceKey::Cpu)]),
        ..Default::default()
    };
    let err = load_checkpoint_in_model(&vs, &file, &partial_map)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1.bias") && err.contains("no device"), "{err}");

    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\0\0\0\0\0\0\0{").unwrap();
    let err = load_checkpoint_in_model(&vs, &corrupt, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt.safetensors"), "{err}");

    let offload = dir.path().join("offload");
    let mut index = Map::new();
    offload_weight(&values(&[2, 2], 0.0), "w", &offload, &mut index).unwrap();
    save_offload_index(&index, &offload).unwrap();
    std::fs::write(offload.join("w.dat"), [0u8; 5]).unwrap();
    let err = load_offloaded_weight(&offload, "w")
        .unwrap_err()
        .to_string();
    assert!(err.contains("w.dat") && err.contains("5 bytes"), "{err}");
}
