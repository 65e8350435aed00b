//! Accelerate's own expectations for infer_auto_device_map (tests/test_modeling_utils.py), on skeletons
//! of the same models.

use super::*;
use std::collections::BTreeMap;

/// Accelerate's ModelForTest under `prefix`: Linear(3→4), BatchNorm1d(4), Linear(4→5) = 236 bytes.
fn model_for_test(s: ModelSkeleton, prefix: &str) -> ModelSkeleton {
    let p = |n: &str| {
        if prefix.is_empty() {
            n.to_owned()
        } else {
            format!("{prefix}.{n}")
        }
    };
    let s = if prefix.is_empty() {
        s
    } else {
        s.class(prefix, "ModelForTest")
    };
    s.param(&p("linear1.weight"), &[4, 3], Kind::Float)
        .param(&p("linear1.bias"), &[4], Kind::Float)
        .param(&p("batchnorm.weight"), &[4], Kind::Float)
        .param(&p("batchnorm.bias"), &[4], Kind::Float)
        .buffer(&p("batchnorm.running_mean"), &[4], Kind::Float)
        .buffer(&p("batchnorm.running_var"), &[4], Kind::Float)
        .buffer(&p("batchnorm.num_batches_tracked"), &[], Kind::Int64)
        .param(&p("linear2.weight"), &[5, 4], Kind::Float)
        .param(&p("linear2.bias"), &[5], Kind::Float)
}

fn gpus(memory: &[u64]) -> DeviceMapOptions {
    DeviceMapOptions {
        max_memory: memory
            .iter()
            .enumerate()
            .map(|(i, m)| (DeviceKey::Gpu(i), *m))
            .collect(),
        ..DeviceMapOptions::default()
    }
}

fn as_map(map: DeviceMap) -> BTreeMap<String, String> {
    map.into_iter().map(|(k, v)| (k, v.to_string())).collect()
}

fn expect(map: DeviceMap, want: &[(&str, &str)]) {
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(as_map(map), want);
}

#[test]
fn keeps_room_for_the_largest_layer_on_the_first_gpu() {
    let model = model_for_test(ModelSkeleton::new(), "");
    assert_eq!(model.module_sizes(None, &BTreeMap::new())[""], 236);
    expect(
        infer_auto_device_map(&model, &gpus(&[200, 200])),
        &[("linear1", "0"), ("batchnorm", "1"), ("linear2", "1")],
    );
    // Only the first GPU keeps room: 172 bytes on GPU 1 are just enough for batchnorm and linear2.
    expect(
        infer_auto_device_map(&model, &gpus(&[200, 172, 200])),
        &[("linear1", "0"), ("batchnorm", "1"), ("linear2", "1")],
    );
}

#[test]
fn tied_weights_can_fit_a_model_on_one_device() {
    // model.linear1.weight = model.linear2.weight: the shared 5x4 weight counts once.
    let model = ModelSkeleton::new()
        .param("linear1.weight", &[5, 4], Kind::Float)
        .param("linear1.bias", &[4], Kind::Float)
        .param("batchnorm.weight", &[4], Kind::Float)
        .param("batchnorm.bias", &[4], Kind::Float)
        .buffer("batchnorm.running_mean", &[4], Kind::Float)
        .buffer("batchnorm.running_var", &[4], Kind::Float)
        .buffer("batchnorm.num_batches_tracked", &[], Kind::Int64)
        .param("linear2.bias", &[5], Kind::Float)
        .tie("linear2.weight", "linear1.weight");
    expect(
        infer_auto_device_map(&model, &gpus(&[200, 200])),
        &[("", "0")],
    );
}

#[test]
fn bigger_models_split_at_layers_or_at_no_split_classes() {
    let mut model = ModelSkeleton::new();
    for i in ["0", "1", "2"] {
        model = model_for_test(model, i);
    }
    expect(
        infer_auto_device_map(&model, &gpus(&[500, 500])),
        &[
            ("0", "0"),
            ("1.linear1", "0"),
            ("1.batchnorm", "0"),
            ("1.linear2", "1"),
            ("2", "1"),
        ],
    );
    let opts = DeviceMapOptions {
        no_split_module_classes: vec!["ModelForTest".into()],
        ..gpus(&[500, 500])
    };
    expect(
        infer_auto_device_map(&model, &opts),
        &[("0", "0"), ("1", "1"), ("2", "1")],
    );
}

fn three_layers() -> ModelSkeleton {
    let mut model = ModelSkeleton::new();
    for i in ["layer1", "layer2", "layer3"] {
        model = model_for_test(model, i);
    }
    model
}

/// Removes `alias` from the tensors (it is the same tensor as another) — built by hand below instead.
fn three_layers_tied(aliases: &[(&str, &str)]) -> ModelSkeleton {
    let mut model = ModelSkeleton::new();
    for (name, meta) in three_layers().tensors() {
        if aliases.iter().any(|(a, _)| a == name) {
            continue;
        }
        model = if meta.buffer {
            model.buffer(name, &meta.shape, meta.kind)
        } else {
            model.param(name, &meta.shape, meta.kind)
        };
    }
    for layer in ["layer1", "layer2", "layer3"] {
        model = model.class(layer, "ModelForTest");
    }
    for (alias, original) in aliases {
        model = model.tie(alias, original);
    }
    model
}

#[test]
fn tied_weights_pull_modules_together() {
    let model = three_layers_tied(&[("layer3.linear2.weight", "layer1.linear2.weight")]);
    expect(
        infer_auto_device_map(&model, &gpus(&[400, 500])),
        &[
            ("layer1", "0"),
            ("layer3.linear2", "0"),
            ("layer2", "1"),
            ("layer3.linear1", "1"),
            ("layer3.batchnorm", "1"),
        ],
    );
    let model = three_layers_tied(&[
        ("layer3.linear2.weight", "layer1.linear2.weight"),
        ("layer2.linear2.weight", "layer1.linear2.weight"),
    ]);
    expect(
        infer_auto_device_map(&model, &gpus(&[400, 500])),
        &[
            ("layer1", "0"),
            ("layer2.linear2", "0"),
            ("layer3.linear2", "0"),
            ("layer2.linear1", "1"),
            ("layer2.batchnorm", "1"),
            ("layer3.linear1", "1"),
            ("layer3.batchnorm", "1"),
        ],
    );
    let model = three_layers_tied(&[
        ("layer3.linear2.weight", "layer1.linear2.weight"),
        ("layer2.linear2.weight", "layer1.linear2.weight"),
        ("layer2.linear1.weight", "layer1.linear1.weight"),
    ]);
    expect(
        infer_auto_device_map(&model, &gpus(&[400, 500])),
        &[
            ("layer1", "0"),
            ("layer2.linear1", "0"),
            ("layer2.linear2", "0"),
            ("layer3.linear2", "0"),
            ("layer2.batchnorm", "1"),
            ("layer3.linear1", "1"),
            ("layer3.batchnorm", "1"),
        ],
    );
}

#[test]
fn weights_tied_within_one_container() {
    // linear1, linear2, linear3 (weight and bias tied to linear1's), linear4, registered in that order.
    let model = ModelSkeleton::new()
        .param("linear1.weight", &[4, 4], Kind::Float)
        .param("linear1.bias", &[4], Kind::Float)
        .param("linear2.weight", &[6, 6], Kind::Float)
        .param("linear2.bias", &[6], Kind::Float)
        .class("linear3", "Linear")
        .tie("linear3.weight", "linear1.weight")
        .tie("linear3.bias", "linear1.bias")
        .param("linear4.weight", &[6, 6], Kind::Float)
        .param("linear4.bias", &[6], Kind::Float);
    // linear3 holds only tied tensors: a module of size 0 that follows linear1. Accelerate 1.15 gives
    // [('linear1', 0), ('linear3', 0), ('linear2', 1), ('linear4', 1)], clean or not.
    let map = infer_auto_device_map(&model, &gpus(&[250, 400]));
    let got: Vec<(String, String)> = map.into_iter().map(|(k, v)| (k, v.to_string())).collect();
    let want: Vec<(String, String)> = [
        ("linear1", "0"),
        ("linear3", "0"),
        ("linear2", "1"),
        ("linear4", "1"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn max_layer_and_cleaning() {
    let model = three_layers();
    let sizes = model.module_sizes(None, &BTreeMap::new());
    let items: Vec<String> = model.children("");
    let (size, names) = get_max_layer_size(&model, &items, &sizes, &[]);
    assert_eq!((size, names.len()), (100, 3));
    let (size, names) = get_max_layer_size(&model, &items, &sizes, &["ModelForTest".into()]);
    assert_eq!(
        (size, names),
        (
            236,
            vec!["layer1".to_owned(), "layer2".into(), "layer3".into()]
        )
    );
    let mut map: DeviceMap = vec![
        ("a.x".into(), DeviceKey::Gpu(0)),
        ("a.y".into(), DeviceKey::Gpu(0)),
        ("b.x".into(), DeviceKey::Cpu),
        ("b.y".into(), DeviceKey::Disk),
    ];
    clean_device_map(&mut map, "");
    assert_eq!(
        as_map(map),
        [("a", "0"), ("b.x", "cpu"), ("b.y", "disk")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    );
}

#[test]
fn the_cpu_and_the_disk_take_what_the_gpus_cannot() {
    let mut model = ModelSkeleton::new();
    for i in ["0", "1", "2"] {
        model = model_for_test(model, i);
    }
    let opts = DeviceMapOptions {
        max_memory: vec![(DeviceKey::Cpu, 500), (DeviceKey::Gpu(0), 500)],
        no_split_module_classes: vec!["ModelForTest".into()],
        ..DeviceMapOptions::default()
    };
    // GPU 0 keeps 236 bytes for the largest block still to place, so it takes one block; the CPU does the
    // same for block 1, but for the last block there is nothing left to keep room for.
    let map = as_map(infer_auto_device_map(&model, &opts));
    assert_eq!(map["0"], "0");
    assert_eq!(map["1"], "cpu");
    assert_eq!(map["2"], "cpu");
    // With less host memory the last block goes to the disk.
    let tight = DeviceMapOptions {
        max_memory: vec![(DeviceKey::Cpu, 400), (DeviceKey::Gpu(0), 500)],
        ..opts
    };
    let map = as_map(infer_auto_device_map(&model, &tight));
    assert_eq!(
        (map["0"].as_str(), map["1"].as_str(), map["2"].as_str()),
        ("0", "disk", "disk")
    );
}

#[test]
fn offloaded_buffers_that_fit_no_gpu_are_warned_about() {
    // The batch norm's 40 bytes of buffers go to the CPU with it; GPU 0 (100 bytes, 90 used) has no room.
    let model = model_for_test(ModelSkeleton::new(), "");
    let map: DeviceMap = vec![
        ("linear1".into(), DeviceKey::Gpu(0)),
        ("batchnorm".into(), DeviceKey::Cpu),
        ("linear2".into(), DeviceKey::Cpu),
    ];
    let memory = vec![(DeviceKey::Gpu(0), 100), (DeviceKey::Cpu, 1000)];
    let used: BTreeMap<DeviceKey, u64> = [(DeviceKey::Gpu(0), 90)].into_iter().collect();
    let opts = DeviceMapOptions::default();
    let warning = buffer_warning(&model, &map, &memory, &used, &opts).expect("a warning");
    assert!(
        warning.contains("requires 40 bytes of buffer") && warning.contains("offload_buffers=True"),
        "{warning}"
    );
    // Room on the GPU, offload_buffers, or no GPU at all: no warning.
    let roomy: BTreeMap<DeviceKey, u64> = [(DeviceKey::Gpu(0), 10)].into_iter().collect();
    assert_eq!(buffer_warning(&model, &map, &memory, &roomy, &opts), None);
    let offload = DeviceMapOptions {
        offload_buffers: true,
        ..Default::default()
    };
    assert_eq!(buffer_warning(&model, &map, &memory, &used, &offload), None);
    let cpu_only = vec![(DeviceKey::Cpu, 1000)];
    assert_eq!(buffer_warning(&model, &map, &cpu_only, &used, &opts), None);
}

fn linear(s: ModelSkeleton, name: &str, inp: i64, out: i64) -> ModelSkeleton {
    s.param(&format!("{name}.weight"), &[out, inp], Kind::Float)
        .param(&format!("{name}.bias"), &[out], Kind::Float)
}

fn only_gpu0(bytes: u64, fallback: bool) -> DeviceMapOptions {
    DeviceMapOptions {
        fallback_allocation: fallback,
        ..gpus(&[bytes])
    }
}

#[test]
fn fallback_allocation_finds_a_smaller_module_for_an_empty_device() {
    // Accelerate's test: module = Sequential(Linear(10,4), Linear(4,4), Linear(4,8)), 256 bytes on GPU 0.
    let mut model = ModelSkeleton::new();
    model = linear(model, "module.linear1", 10, 4);
    model = linear(model, "module.linear2", 4, 4);
    model = linear(model, "module.linear3", 4, 8);
    let without = place(&model, &only_gpu0(256, false));
    assert!(without.map.iter().all(|(_, d)| *d != DeviceKey::Gpu(0)));
    let info = insufficient_memory_info(&without.minimum).expect("an info message");
    assert!(
        info.contains("insufficient memory") && info.contains("  - 0: 336 bytes required"),
        "{info}"
    );
    let with = place(&model, &only_gpu0(256, true));
    assert_eq!(insufficient_memory_info(&with.minimum), None);
    expect(
        infer_auto_device_map(&model, &only_gpu0(256, true)),
        &[
            ("module.linear1", "disk"),
            ("module.linear2", "0"),
            ("module.linear3", "disk"),
        ],
    );
    // Nothing small enough: still nothing on GPU 0, and the message says what was needed.
    let mut tiny = ModelSkeleton::new();
    for l in ["linear1", "linear2", "linear3"] {
        tiny = linear(tiny, &format!("module.{l}"), 10, 10);
    }
    let none = place(&tiny, &only_gpu0(30, true));
    assert!(none.map.iter().all(|(_, d)| *d != DeviceKey::Gpu(0)));
    assert!(insufficient_memory_info(&none.minimum).is_some());
}

#[test]
fn fallback_allocation_keeps_ties_and_counts_buffers() {
    // Tied linear1.weight = linear2.weight: fits whole on GPU 0, as without the fallback.
    let tied = linear(ModelSkeleton::new(), "linear1", 10, 10)
        .param("linear2.bias", &[10], Kind::Float)
        .tie("linear2.weight", "linear1.weight");
    expect(
        infer_auto_device_map(&tied, &only_gpu0(600, true)),
        &[("", "0")],
    );
    // Linear(10,10)+5-float buffer, BatchNorm1d(10)+5-float buffer, Linear(10,10)+5-float buffer, 678
    // bytes: only the batch norm finds room, and its offloaded neighbours' buffers fit no GPU.
    let model = linear(ModelSkeleton::new(), "linear1", 10, 10)
        .buffer("linear1.buffer1", &[5], Kind::Float)
        .param("batchnorm.weight", &[10], Kind::Float)
        .param("batchnorm.bias", &[10], Kind::Float)
        .buffer("batchnorm.running_mean", &[10], Kind::Float)
        .buffer("batchnorm.running_var", &[10], Kind::Float)
        .buffer("batchnorm.num_batches_tracked", &[], Kind::Int64)
        .buffer("batchnorm.buffer2", &[5], Kind::Float);
    let model = linear(model, "linear2", 10, 10).buffer("linear2.buffer3", &[5], Kind::Float);
    let opts = only_gpu0(678, true);
    let placement = place(&model, &opts);
    let warning = buffer_warning(
        &model,
        &placement.map,
        &placement.max_memory,
        &placement.used,
        &opts,
    );
    assert!(warning.is_some_and(|w| w.contains("offload_buffers")));
    expect(
        infer_auto_device_map(&model, &opts),
        &[("batchnorm", "0"), ("linear1", "disk"), ("linear2", "disk")],
    );
}

mod tensorless;
