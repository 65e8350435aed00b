//! Modules without tensors, tied aliases and Accelerate's map order. Expected values: Accelerate 1.15.0
//! (tests/python/oracle/oracle_bigmodel_devmap.py and oracle_bigmodel_check.py), f32, Linear(4, 4) = 80 bytes.

use super::*;
fn mem(entries: &[(&str, u64)]) -> Vec<(DeviceKey, u64)> {
    entries
        .iter()
        .map(|(d, m)| (crate::big_modeling::parse_device_key(d).unwrap(), *m))
        .collect()
}

/// A map as (key, device) pairs, in order.
type Pairs = Vec<(String, String)>;

/// The map as (key, device) pairs, in order.
fn pairs(map: &DeviceMap) -> Pairs {
    map.iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect()
}

fn want(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Accelerate's infer_auto_device_map, unclean (`clean_result=False`) and clean.
fn both_maps(model: &ModelSkeleton, memory: &[(&str, u64)], no_split: &[&str]) -> (Pairs, Pairs) {
    let opts = DeviceMapOptions {
        max_memory: mem(memory),
        no_split_module_classes: no_split.iter().map(|c| (*c).to_owned()).collect(),
        keep_unclean: true,
        ..Default::default()
    };
    let unclean = infer_auto_device_map(model, &opts);
    let clean = infer_auto_device_map(
        model,
        &DeviceMapOptions {
            keep_unclean: false,
            ..opts
        },
    );
    (pairs(&unclean), pairs(&clean))
}

/// A = lin1(Linear) act(ReLU) block=Sequential(Linear, ReLU, Dropout, Linear) drop(Dropout) lin2(Linear).
fn model_a() -> ModelSkeleton {
    let s = linear(ModelSkeleton::new(), "lin1", 4, 4)
        .class("act", "ReLU")
        .class("block", "Sequential");
    let s = linear(s, "block.0", 4, 4)
        .class("block.1", "ReLU")
        .class("block.2", "Dropout");
    let s = linear(s, "block.3", 4, 4).class("drop", "Dropout");
    linear(s, "lin2", 4, 4)
}

#[test]
fn modules_without_tensors_are_listed_where_accelerate_lists_them() {
    let a = model_a();
    assert_eq!(a.module_sizes(None, &BTreeMap::new())[""], 320);
    let all = want(&[
        ("lin1", "0"),
        ("act", "0"),
        ("block", "0"),
        ("drop", "0"),
        ("lin2", "0"),
    ]);
    assert_eq!(
        both_maps(&a, &[("0", 10_000), ("cpu", 10_000)], &[]),
        (all, want(&[("", "0")]))
    );
    let split = want(&[
        ("lin1", "0"),
        ("act", "0"),
        ("block.0", "0"),
        ("block.1", "0"),
        ("block.2", "0"),
        ("block.3", "1"),
        ("drop", "1"),
        ("lin2", "1"),
    ]);
    assert_eq!(
        both_maps(&a, &[("0", 250), ("1", 1000)], &[]),
        (split.clone(), split)
    );
    let split_cpu = want(&[
        ("lin1", "0"),
        ("act", "0"),
        ("block.0", "0"),
        ("block.1", "0"),
        ("block.2", "0"),
        ("block.3", "cpu"),
        ("drop", "cpu"),
        ("lin2", "cpu"),
    ]);
    assert_eq!(
        both_maps(&a, &[("0", 250), ("cpu", 1000)], &[]),
        (split_cpu.clone(), split_cpu)
    );
    let whole_block = want(&[
        ("lin1", "0"),
        ("act", "0"),
        ("block", "1"),
        ("drop", "1"),
        ("lin2", "1"),
    ]);
    assert_eq!(
        both_maps(&a, &[("0", 250), ("1", 1000)], &["Sequential"]),
        (whole_block.clone(), whole_block)
    );
    // GPU 0 below the largest layer: even the 0-byte `act` moves on.
    assert_eq!(
        both_maps(&a, &[("0", 60), ("1", 1000)], &[]),
        (
            want(&[
                ("lin1", "1"),
                ("act", "1"),
                ("block", "1"),
                ("drop", "1"),
                ("lin2", "1"),
            ]),
            want(&[("", "1")])
        )
    );
    let disk = want(&[
        ("lin1", "cpu"),
        ("act", "cpu"),
        ("block.0", "cpu"),
        ("block.1", "cpu"),
        ("block.2", "cpu"),
        ("block.3", "disk"),
        ("drop", "disk"),
        ("lin2", "disk"),
    ]);
    assert_eq!(both_maps(&a, &[("cpu", 250)], &[]), (disk.clone(), disk));
    // One collapse: the collapsed `block` goes to the end of the map.
    assert_eq!(
        both_maps(&a, &[("0", 170), ("1", 1000)], &[]),
        (
            want(&[
                ("lin1", "0"),
                ("act", "0"),
                ("block.0", "1"),
                ("block.1", "1"),
                ("block.2", "1"),
                ("block.3", "1"),
                ("drop", "1"),
                ("lin2", "1"),
            ]),
            want(&[
                ("lin1", "0"),
                ("act", "0"),
                ("drop", "1"),
                ("lin2", "1"),
                ("block", "1"),
            ])
        )
    );
}

/// B = embed(Embedding 10x4) layers=3 x Block{fc, act(GELU), out} act(ReLU) norm(LayerNorm 4)
/// lm_head(Linear(4, 10), weight tied to embed's).
fn model_b(head_first: bool, head_bias: bool) -> ModelSkeleton {
    let mut s = ModelSkeleton::new();
    if head_first {
        s = s
            .param("lm_head.weight", &[10, 4], Kind::Float)
            .class("embed", "Embedding");
    } else {
        s = s.param("embed.weight", &[10, 4], Kind::Float);
    }
    for i in 0..3 {
        let block = format!("layers.{i}");
        s = linear(s.class(&block, "Block"), &format!("{block}.fc"), 4, 4)
            .class(&format!("{block}.act"), "GELU");
        s = linear(s, &format!("{block}.out"), 4, 4);
    }
    s = s
        .class("act", "ReLU")
        .param("norm.weight", &[4], Kind::Float)
        .param("norm.bias", &[4], Kind::Float);
    if head_first {
        return s.tie("embed.weight", "lm_head.weight");
    }
    s = s
        .class("lm_head", "Linear")
        .tie("lm_head.weight", "embed.weight");
    if head_bias {
        s = s.param("lm_head.bias", &[10], Kind::Float);
    }
    s
}

#[test]
fn a_tied_alias_module_comes_right_after_the_module_it_is_tied_to() {
    let b = model_b(false, false);
    assert_eq!(b.module_sizes(None, &BTreeMap::new())[""], 672);
    assert_eq!(
        b.tied_parameters(),
        [vec!["embed.weight".to_owned(), "lm_head.weight".to_owned()]]
    );
    assert_eq!(
        both_maps(&b, &[("0", 10_000)], &[]),
        (
            want(&[
                ("embed", "0"),
                ("lm_head", "0"),
                ("layers", "0"),
                ("act", "0"),
                ("norm", "0"),
            ]),
            want(&[("", "0")])
        )
    );
    let blocks = want(&[
        ("embed", "0"),
        ("lm_head", "0"),
        ("layers.0", "0"),
        ("layers.1", "1"),
        ("layers.2", "1"),
        ("act", "1"),
        ("norm", "1"),
    ]);
    assert_eq!(
        both_maps(&b, &[("0", 600), ("1", 10_000)], &["Block"]),
        (blocks.clone(), blocks)
    );
    assert_eq!(
        both_maps(&b, &[("0", 600), ("1", 10_000)], &[]),
        (
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
            ]),
            want(&[
                ("embed", "0"),
                ("lm_head", "0"),
                ("layers.0", "0"),
                ("layers.1", "0"),
                ("act", "1"),
                ("norm", "1"),
                ("layers.2", "1"),
            ])
        )
    );
    let tight = want(&[
        ("embed", "0"),
        ("lm_head", "0"),
        ("layers.0", "1"),
        ("layers.1", "1"),
        ("layers.2", "cpu"),
        ("act", "cpu"),
        ("norm", "cpu"),
    ]);
    assert_eq!(
        both_maps(&b, &[("0", 400), ("1", 400), ("cpu", 10_000)], &["Block"]),
        (tight.clone(), tight)
    );

    // lm_head registered first: it holds the 160 bytes, embed is the alias (size 0).
    let head_first = model_b(true, false);
    let sizes = head_first.module_sizes(None, &BTreeMap::new());
    assert_eq!(
        (sizes.get("embed"), sizes.get("lm_head")),
        (None, Some(&160))
    );
    assert_eq!(
        both_maps(&head_first, &[("0", 10_000)], &[]).0,
        want(&[
            ("lm_head", "0"),
            ("embed", "0"),
            ("layers", "0"),
            ("act", "0"),
            ("norm", "0"),
        ])
    );
    assert_eq!(
        both_maps(&head_first, &[("0", 400), ("1", 10_000)], &["Block"]),
        (
            want(&[
                ("lm_head", "0"),
                ("embed", "0"),
                ("layers.0", "1"),
                ("layers.1", "1"),
                ("layers.2", "1"),
                ("act", "1"),
                ("norm", "1"),
            ]),
            want(&[
                ("lm_head", "0"),
                ("embed", "0"),
                ("act", "1"),
                ("norm", "1"),
                ("layers", "1"),
            ])
        )
    );
    // lm_head with its own bias (40 bytes).
    let head_bias = model_b(false, true);
    assert_eq!(
        head_bias.module_sizes(None, &BTreeMap::new())["lm_head"],
        40
    );
    assert_eq!(
        both_maps(&head_bias, &[("0", 400), ("1", 10_000)], &["Block"]).1,
        want(&[
            ("embed", "0"),
            ("lm_head", "0"),
            ("act", "1"),
            ("norm", "1"),
            ("layers", "1"),
        ])
    );
}

#[test]
fn a_split_module_drops_its_direct_buffers() {
    // C = x(Linear) mod{scale (buffer, registered first), w (parameter), a(Linear), b(Linear)}.
    let c = linear(ModelSkeleton::new(), "x", 4, 4)
        .buffer("mod.scale", &[4], Kind::Float)
        .param("mod.w", &[4], Kind::Float);
    let c = linear(linear(c, "mod.a", 4, 4), "mod.b", 4, 4);
    let split = want(&[("x", "0"), ("mod.w", "0"), ("mod.a", "1"), ("mod.b", "1")]);
    assert_eq!(
        both_maps(&c, &[("0", 200), ("1", 1000)], &[]),
        (split.clone(), split)
    );
    let map = infer_auto_device_map(
        &c,
        &DeviceMapOptions {
            max_memory: mem(&[("0", 200), ("1", 1000)]),
            ..Default::default()
        },
    );
    let err = crate::big_modeling::check_device_map(&c, &map)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "The device_map provided does not give any device for the following parameters: mod.scale"
        ),
        "{err}"
    );
}

#[test]
fn collapsed_parents_go_to_the_end() {
    let mut map: DeviceMap = ["a.0", "a.1", "b", "c.x", "c.y", "d.0.p", "d.0.q", "d.1"]
        .iter()
        .zip([0, 0, 1, 1, 1, 0, 0, 1])
        .map(|(k, g)| ((*k).to_owned(), DeviceKey::Gpu(g)))
        .collect();
    clean_device_map(&mut map, "");
    // Accelerate gives the same entries, in an order that changes with PYTHONHASHSEED (seed 0: b, d.1,
    // d.0, c, a); here the children are visited in map order.
    assert_eq!(
        pairs(&map),
        want(&[
            ("b", "1"),
            ("d.1", "1"),
            ("a", "0"),
            ("c", "1"),
            ("d.0", "0")
        ])
    );
    let mut same: DeviceMap = ["x.0", "x.1", "y"]
        .iter()
        .map(|k| ((*k).to_owned(), DeviceKey::Gpu(0)))
        .collect();
    clean_device_map(&mut same, "");
    assert_eq!(pairs(&same), want(&[("", "0")]));
}

/// The model of Accelerate's check_device_map runs: p (a root parameter), lin, lin2 (Linear(2, 2)), act
/// (ReLU), bn (BatchNorm1d(2)), np_buf (a non-persistent root buffer).
fn model_m() -> ModelSkeleton {
    let s = ModelSkeleton::new().param("p", &[2], Kind::Float);
    let s = linear(linear(s, "lin", 2, 2), "lin2", 2, 2).class("act", "ReLU");
    s.param("bn.weight", &[2], Kind::Float)
        .param("bn.bias", &[2], Kind::Float)
        .buffer("bn.running_mean", &[2], Kind::Float)
        .buffer("bn.running_var", &[2], Kind::Float)
        .buffer("bn.num_batches_tracked", &[], Kind::Int64)
        .non_persistent_buffer("np_buf", &[1], Kind::Float)
}

fn check(model: &ModelSkeleton, keys: &[&str]) -> (Vec<String>, Option<String>) {
    let map: DeviceMap = keys
        .iter()
        .map(|k| ((*k).to_owned(), DeviceKey::Cpu))
        .collect();
    match crate::big_modeling::check_device_map(model, &map) {
        Ok(warnings) => (warnings, None),
        Err(e) => {
            let warnings = crate::big_modeling::dispatch::unknown_keys_warning(model, &map)
                .into_iter()
                .collect();
            (warnings, Some(e.to_string()))
        }
    }
}

#[test]
fn check_device_map_warns_for_every_key_that_is_not_a_module() {
    let m = model_m();
    assert_eq!(
        m.named_modules(),
        ["", "lin", "lin2", "act", "bn"].map(String::from)
    );
    let warn = |keys: &str| {
        vec![format!(
            "The following device_map keys do not match any submodules in the model: {keys}"
        )]
    };
    let full = ["p", "lin", "lin2", "bn"];
    assert_eq!(check(&m, &full), (warn("['p']"), None));
    assert_eq!(check(&m, &[""]), (vec![], None));
    assert_eq!(check(&m, &["typo", ""]), (warn("['typo']"), None));
    assert_eq!(
        check(&m, &["p", "lin.weight", "lin.bias", "lin2", "bn"]),
        (warn("['p', 'lin.weight', 'lin.bias']"), None)
    );
    assert_eq!(
        check(&m, &["p", "lin", "lin2", "bn", "act"]),
        (warn("['p']"), None)
    );
    assert_eq!(
        check(&m, &["p", "lin", "lin2", "bn", "lin3", "bn.running"]),
        (warn("['p', 'lin3', 'bn.running']"), None)
    );
    assert_eq!(
        check(&m, &["p", "lin", "lin2", "bn", "np_buf"]),
        (warn("['p', 'np_buf']"), None)
    );
    assert_eq!(
        check(&m, &["p", "lin", "lin2", "bn", "lin."]),
        (warn("['p', 'lin.']"), None)
    );
    assert_eq!(
        check(
            &m,
            &[
                "p",
                "lin",
                "lin2",
                "bn.weight",
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
                "bn.num_batches_tracked"
            ]
        ),
        (
            warn(
                "['p', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked']"
            ),
            None
        )
    );
    let missing = "invalid device_map: The device_map provided does not give any device for the \
                   following parameters: ";
    let (warnings, err) = check(&m, &["p", "lin"]);
    assert_eq!(warnings, warn("['p']"));
    assert_eq!(
        err.unwrap(),
        format!(
            "{missing}lin2.weight, lin2.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, \
             bn.num_batches_tracked"
        )
    );
    let (warnings, err) = check(&m, &["p", "li", "lin2", "bn"]);
    assert_eq!(warnings, warn("['p', 'li']"));
    assert_eq!(err.unwrap(), format!("{missing}lin.weight, lin.bias"));
    let (warnings, err) = check(&m, &[]);
    assert!(warnings.is_empty());
    assert_eq!(
        err.unwrap(),
        format!(
            "{missing}p, lin.weight, lin.bias, lin2.weight, lin2.bias, bn.weight, bn.bias, \
             bn.running_mean, bn.running_var, bn.num_batches_tracked"
        )
    );

    // Tied: the alias is a state-dict name of its own.
    let tied = ModelSkeleton::new()
        .param("embed.weight", &[4, 2], Kind::Float)
        .class("lm_head", "Linear")
        .tie("lm_head.weight", "embed.weight");
    let (warnings, err) = check(&tied, &["embed"]);
    assert!(warnings.is_empty());
    assert_eq!(err.unwrap(), format!("{missing}lm_head.weight"));
    assert_eq!(check(&tied, &["embed", "lm_head"]), (vec![], None));

    // The auto map with 60 bytes of host memory lists the root tensors and `act`; checking it warns
    // about the tensor keys.
    let auto = infer_auto_device_map(
        &m,
        &DeviceMapOptions {
            max_memory: mem(&[("cpu", 60)]),
            ..Default::default()
        },
    );
    assert_eq!(
        pairs(&auto),
        want(&[
            ("p", "cpu"),
            ("lin", "disk"),
            ("lin2", "disk"),
            ("act", "disk"),
            ("bn", "disk"),
            ("np_buf", "disk"),
        ])
    );
    assert_eq!(
        crate::big_modeling::check_device_map(&m, &auto).unwrap(),
        warn("['p', 'np_buf']")
    );
}
