//! Var stores as Accelerate sees the same PyTorch modules: parameters, tied groups, module order.
//! Expected values: Accelerate 1.15.0 (tests/python/oracle/oracle_bigmodel_tied.py, oracle_bigmodel_devmap.py).

use super::*;
use crate::big_modeling::{DeviceKey, DeviceMapOptions, parse_device_key};
use crate::infer_auto_device_map;
use std::collections::BTreeMap;
use tch::{Device, Kind, nn};

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn tie(vs: &VarStore, alias: &str, original: &Tensor) {
    let (module, name) = alias.rsplit_once('.').unwrap();
    let mut path = vs.root();
    for part in module.split('.') {
        path = path.sub(part);
    }
    let _ = path.add(name, original.shallow_clone(), true);
}

#[test]
fn tied_groups_are_sorted_as_plain_strings() {
    // Many: twelve layers, three heads and a tail, Linear(2, 2) each, five tied groups.
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let layers: Vec<nn::Linear> = (0..12)
        .map(|i| nn::linear(&root / "layers" / i, 2, 2, Default::default()))
        .collect();
    for (module, tied) in [
        ("heads.0", Some(("weight", &layers[1].ws))),
        ("heads.1", Some(("weight", &layers[1].ws))),
        ("heads.2", None),
        ("tail", Some(("weight", &layers[5].ws))),
    ] {
        let path = module.split('.').fold(vs.root(), |p, s| p.sub(s));
        match tied {
            Some((name, original)) => {
                let _ = path.add(name, original.shallow_clone(), true);
                let _ = path.var("bias", &[2], nn::Init::Const(0.0));
            }
            None => {
                let _ = path.var("weight", &[2, 2], nn::Init::Const(0.0));
            }
        }
    }
    tie(&vs, "heads.2.bias", layers[0].bs.as_ref().unwrap());
    // layers.10.weight = layers.2.weight and layers.11.bias = layers.9.bias: rebuilt as ties.
    let tied_store = |vs: &VarStore| {
        let mut variables = vs.variables();
        let w2 = variables["layers.2.weight"].shallow_clone();
        let b9 = variables["layers.9.bias"].shallow_clone();
        let _g = tch::no_grad_guard();
        variables.get_mut("layers.10.weight").unwrap().set_data(&w2);
        variables.get_mut("layers.11.bias").unwrap().set_data(&b9);
    };
    tied_store(&vs);
    let groups = find_tied_parameters(&vs);
    // Accelerate (seed 0; the group order changes with PYTHONHASHSEED, the groups do not):
    let accelerate = [
        strings(&["heads.0.weight", "heads.1.weight", "layers.1.weight"]),
        strings(&["layers.5.weight", "tail.weight"]),
        strings(&["layers.10.weight", "layers.2.weight"]),
        strings(&["layers.11.bias", "layers.9.bias"]),
        strings(&["heads.2.bias", "layers.0.bias"]),
    ];
    let mut sorted = accelerate.to_vec();
    sorted.sort();
    assert_eq!(groups, sorted);

    // Three: c registered first, b.weight = a.weight = c.weight.
    let vs = VarStore::new(Device::Cpu);
    let c = nn::linear(vs.root() / "c", 4, 4, Default::default());
    tie(&vs, "b.weight", &c.ws);
    tie(&vs, "a.weight", &c.ws);
    assert_eq!(
        find_tied_parameters(&vs),
        [strings(&["a.weight", "b.weight", "c.weight"])]
    );

    // SharedBuffer: buffers are not looked at; a view of p held as another parameter is not tied.
    let vs = VarStore::new(Device::Cpu);
    let shared = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let _x = vs.root().sub("x").add("b", shared.shallow_clone(), false);
    let _y = vs.root().sub("y").add("b", shared.shallow_clone(), false);
    let p = vs.root().var("p", &[4], nn::Init::Const(0.0));
    let _q = vs.root().add("q", p.narrow(0, 0, 2), true);
    assert!(find_tied_parameters(&vs).is_empty());
    assert_eq!(
        parameter_names(&vs),
        ["p", "q"].iter().map(|s| (*s).to_owned()).collect()
    );
}

#[test]
fn frozen_stores_keep_their_parameters_and_retie_takes_real_values() {
    let mut vs = VarStore::new(Device::Cpu);
    let _lin = nn::linear(vs.root() / "lin", 2, 2, Default::default());
    let _running = (vs.root() / "bn").zeros_no_train("running_mean", &[2]);
    vs.freeze();
    let mut names: Vec<String> = parameter_names(&vs).into_iter().collect();
    names.sort();
    assert_eq!(names, ["lin.bias", "lin.weight"]);

    // Accelerate's retie_parameters ties to the first tensor (in group order) not on the meta device.
    let vs = VarStore::new(Device::Cpu);
    let _a = vs.root().sub("a").add(
        "weight",
        crate::layers::empty_placeholder(&[2, 2], Kind::Float),
        true,
    );
    let b = vs
        .root()
        .sub("b")
        .var("weight", &[2, 2], nn::Init::Const(3.0));
    let group = vec![strings(&["a.weight", "b.weight"])];
    retie_parameters(&vs, &group).unwrap();
    assert!(vs.variables()["a.weight"].equal(&b));
    assert_eq!(find_tied_parameters(&vs), group);
}

/// Model B of the device-map runs, as a var store, and the (module, class) list `named_modules()` gives.
fn model_b(head_first: bool) -> (VarStore, Vec<(String, String)>) {
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let embed = root
        .sub("embed")
        .var("weight", &[10, 4], nn::Init::Const(0.0));
    for i in 0..3 {
        let _fc = nn::linear(&root / "layers" / i / "fc", 4, 4, Default::default());
        let _out = nn::linear(&root / "layers" / i / "out", 4, 4, Default::default());
    }
    let _norm_w = root.sub("norm").var("weight", &[4], nn::Init::Const(1.0));
    let _norm_b = root.sub("norm").var("bias", &[4], nn::Init::Const(0.0));
    tie(&vs, "lm_head.weight", &embed);
    let mut modules = vec![("embed".to_owned(), "Embedding".to_owned())];
    modules.push(("layers".into(), "ModuleList".into()));
    for i in 0..3 {
        modules.push((format!("layers.{i}"), "Block".into()));
        modules.push((format!("layers.{i}.fc"), "Linear".into()));
        modules.push((format!("layers.{i}.act"), "GELU".into()));
        modules.push((format!("layers.{i}.out"), "Linear".into()));
    }
    modules.push(("act".into(), "ReLU".into()));
    modules.push(("norm".into(), "LayerNorm".into()));
    let head = ("lm_head".to_owned(), "Linear".to_owned());
    if head_first {
        modules.insert(0, head);
    } else {
        modules.push(head);
    }
    (vs, modules)
}

fn map_of(
    skeleton: &ModelSkeleton,
    memory: &[(&str, u64)],
    no_split: &[&str],
    unclean: bool,
) -> Vec<(String, String)> {
    let opts = DeviceMapOptions {
        max_memory: memory
            .iter()
            .map(|(d, m)| (parse_device_key(d).unwrap(), *m))
            .collect(),
        no_split_module_classes: no_split.iter().map(|c| (*c).to_owned()).collect(),
        keep_unclean: unclean,
        ..Default::default()
    };
    infer_auto_device_map(skeleton, &opts)
        .into_iter()
        .map(|(k, v): (String, DeviceKey)| (k, v.to_string()))
        .collect()
}

fn want(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn a_var_store_with_its_module_list_maps_as_accelerate_maps_the_model() {
    let (vs, modules) = model_b(false);
    let refs: Vec<(&str, &str)> = modules
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    let skeleton = ModelSkeleton::from_var_store(&vs, &refs);
    assert_eq!(
        skeleton.named_modules()[..6],
        strings(&[
            "",
            "embed",
            "layers",
            "layers.0",
            "layers.0.fc",
            "layers.0.act"
        ])
    );
    assert_eq!(
        skeleton.children(""),
        strings(&["embed", "layers", "act", "norm", "lm_head"])
    );
    assert_eq!(
        map_of(&skeleton, &[("0", 600), ("1", 10_000)], &[], true),
        want(&[
            ("embed", "0"),
            ("lm_head", "0"),
            ("layers.0", "0"),
            ("layers.1", "0"),
            ("layers.2.fc", "1"),
            ("layers.2.act", "1"),
            ("layers.2.out", "1"),
            ("act", "1"),
            ("norm", "1"),
        ])
    );
    assert_eq!(
        map_of(&skeleton, &[("0", 600), ("1", 10_000)], &[], false),
        want(&[
            ("embed", "0"),
            ("lm_head", "0"),
            ("layers.0", "0"),
            ("layers.1", "0"),
            ("act", "1"),
            ("norm", "1"),
            ("layers.2", "1"),
        ])
    );

    // lm_head registered first: it holds the memory, embed is the alias.
    let (vs, modules) = model_b(true);
    let refs: Vec<(&str, &str)> = modules
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    let skeleton = ModelSkeleton::from_var_store(&vs, &refs);
    let sizes = skeleton.module_sizes(None, &BTreeMap::new());
    assert_eq!(
        (sizes.get("embed"), sizes.get("lm_head")),
        (None, Some(&160))
    );
    assert_eq!(
        map_of(&skeleton, &[("0", 400), ("1", 10_000)], &["Block"], false),
        want(&[
            ("lm_head", "0"),
            ("embed", "0"),
            ("act", "1"),
            ("norm", "1"),
            ("layers", "1"),
        ])
    );
    assert_eq!(
        skeleton.state_dict_names()[..3],
        strings(&["lm_head.weight", "embed.weight", "layers.0.fc.bias"])
    );
}
