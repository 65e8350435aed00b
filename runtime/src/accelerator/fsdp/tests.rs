use super::*;
use tch::{Device, Kind};

fn named(names: &[(&str, i64)]) -> Vec<(String, Tensor)> {
    names
        .iter()
        .map(|(n, k)| {
            (
                (*n).to_owned(),
                Tensor::zeros([*k], (Kind::Float, Device::Cpu)),
            )
        })
        .collect()
}

fn unit_names(
    plugin: &FullyShardedDataParallelPlugin,
    params: &[(&str, i64)],
) -> Vec<(String, Vec<String>)> {
    plugin
        .units(named(params))
        .unwrap()
        .into_iter()
        .map(|(u, members)| (u, members.into_iter().map(|(n, _)| n).collect()))
        .collect()
}

const MODEL: [(&str, i64); 6] = [
    ("embed.weight", 100),
    ("blocks.0.fc.weight", 40),
    ("blocks.0.fc.bias", 4),
    ("blocks.1.fc.weight", 40),
    ("blocks.1.fc.bias", 4),
    ("head.weight", 8),
];

#[test]
fn no_wrap_is_one_unit() {
    let units = unit_names(&FullyShardedDataParallelPlugin::default(), &MODEL);
    assert_eq!(units.len(), 1);
    assert_eq!(units[0].0, "");
    assert_eq!(units[0].1.len(), 6);
}

#[test]
fn transformer_wrap_makes_a_unit_per_matching_path_and_names_a_pattern_that_matches_nothing() {
    let plugin = FullyShardedDataParallelPlugin {
        auto_wrap_policy: AutoWrapPolicy::TransformerBasedWrap(vec!["blocks.*".into()]),
        ..Default::default()
    };
    let units = unit_names(&plugin, &MODEL);
    let names: Vec<&str> = units.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(names, ["", "blocks.0", "blocks.1"]);
    assert_eq!(units[0].1, ["embed.weight", "head.weight"]);
    assert_eq!(units[1].1, ["blocks.0.fc.weight", "blocks.0.fc.bias"]);
    let missing = FullyShardedDataParallelPlugin {
        auto_wrap_policy: AutoWrapPolicy::TransformerBasedWrap(vec!["layers.*".into()]),
        ..Default::default()
    };
    let e = missing.units(named(&MODEL)).unwrap_err().to_string();
    assert!(
        e.contains("Could not find the transformer layer class layers.*"),
        "{e}"
    );
}

#[test]
fn size_wrap_wraps_every_module_over_the_threshold() {
    let plugin = FullyShardedDataParallelPlugin {
        auto_wrap_policy: AutoWrapPolicy::SizeBasedWrap(43),
        ..Default::default()
    };
    let units = unit_names(&plugin, &MODEL);
    let names: Vec<&str> = units.iter().map(|(u, _)| u.as_str()).collect();
    // embed (100), blocks (88), blocks.0 and blocks.1 (44 each), blocks.0.fc, blocks.1.fc (44): each
    // parameter goes to the deepest.
    assert_eq!(names, ["embed", "blocks.0.fc", "blocks.1.fc", ""]);
}

#[test]
fn the_environment_describes_the_plugin_as_accelerate_reads_it() {
    let p = crate::utils::patch_environment(
        [
            ("FSDP_VERSION", "2"),
            ("FSDP_RESHARD_AFTER_FORWARD", "false"),
            ("FSDP_AUTO_WRAP_POLICY", "transformer_based_wrap"),
            ("FSDP_TRANSFORMER_CLS_TO_WRAP", "blocks.*,head"),
        ],
        FullyShardedDataParallelPlugin::from_env,
    )
    .unwrap();
    assert_eq!(p.sharding_strategy, ShardingStrategy::ShardGradOp);
    assert_eq!(
        p.auto_wrap_policy,
        AutoWrapPolicy::TransformerBasedWrap(vec!["blocks.*".into(), "head".into()])
    );
    assert_eq!(p.state_dict_type, StateDictType::ShardedStateDict);
    let e = crate::utils::patch_environment(
        [
            ("FSDP_VERSION", "2"),
            ("FSDP_RESHARD_AFTER_FORWARD", "FULL_SHARD"),
        ],
        FullyShardedDataParallelPlugin::from_env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("This is not supported with FSDP2, please set to a `bool`"),
        "{e}"
    );
    let p = crate::utils::patch_environment(
        [("FSDP_SHARDING_STRATEGY", "2")],
        FullyShardedDataParallelPlugin::from_env,
    )
    .unwrap();
    assert_eq!(
        (p.fsdp_version, p.sharding_strategy),
        (1, ShardingStrategy::ShardGradOp)
    );
    assert_eq!(p.state_dict_type, StateDictType::FullStateDict);
    // Offload, activation checkpointing and HYBRID_SHARD run; the hybrid strategies keep (or not) the
    // parameters gathered between forward and backward as their non-hybrid forms do.
    let p = crate::utils::patch_environment(
        [
            ("FSDP_OFFLOAD_PARAMS", "true"),
            ("FSDP_ACTIVATION_CHECKPOINTING", "true"),
        ],
        FullyShardedDataParallelPlugin::from_env,
    )
    .unwrap();
    assert!(p.cpu_offload && p.activation_checkpointing);
    p.check_supported().unwrap();
    for (name, reshard) in [
        ("HYBRID_SHARD", true),
        ("4", true),
        ("HYBRID_SHARD_ZERO2", false),
    ] {
        let p = crate::utils::patch_environment(
            [("FSDP_SHARDING_STRATEGY", name)],
            FullyShardedDataParallelPlugin::from_env,
        )
        .unwrap();
        p.check_supported().unwrap();
        assert!(p.shards() && p.reshard_after_forward() == reshard, "{name}");
    }
}

#[test]
fn a_checkpointed_forward_recomputes_with_the_same_dropout_and_gives_the_same_gradients() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let opts = (tch::Kind::Float, tch::Device::Cpu);
    tch::manual_seed(3);
    let w = Tensor::randn([6, 5], opts).set_requires_grad(true);
    let block = |w: Tensor, calls: Arc<AtomicUsize>| {
        move |x: &Tensor| {
            calls.fetch_add(1, Ordering::Relaxed);
            x.matmul(&w).dropout(0.5, true).tanh()
        }
    };
    // The input needing a gradient, and not (then the parameter ties the block into the graph).
    for input_grad in [true, false] {
        let x = Tensor::randn([4, 6], opts).set_requires_grad(input_grad);
        let plain_calls = Arc::new(AtomicUsize::new(0));
        tch::manual_seed(11);
        let y = block(w.shallow_clone(), plain_calls)(&x);
        (&y * &y).sum(tch::Kind::Float).backward();
        let after_plain = Tensor::rand([3], opts);
        let (gw, gx) = (w.grad().copy(), x.grad());
        let gx = gx.defined().then(|| gx.copy());
        crate::optim::clear_grads(&[w.shallow_clone(), x.shallow_clone()]);
        let calls = Arc::new(AtomicUsize::new(0));
        tch::manual_seed(11);
        let f = block(w.shallow_clone(), calls.clone());
        // SAFETY: the closure owns what it uses.
        let z = unsafe { crate::shim::checkpoint(&x, &w, Box::new(f)) }.unwrap();
        assert!(z.equal(&y), "the same dropout mask");
        assert!(z.requires_grad());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        (&z * &z).sum(tch::Kind::Float).backward();
        assert_eq!(
            calls.load(Ordering::Relaxed),
            2,
            "recomputed in the backward"
        );
        assert!(w.grad().allclose(&gw, 1e-6, 1e-7, false));
        match gx {
            Some(gx) => assert!(x.grad().allclose(&gx, 1e-6, 1e-7, false)),
            None => assert!(!x.grad().defined()),
        }
        // The recomputation redrew the mask from the forward's state and put the generator back.
        assert!(Tensor::rand([3], opts).equal(&after_plain));
        crate::optim::clear_grads(&[w.shallow_clone()]);
    }
    // The input changed in place before the backward: libtorch's error, not a recomputation from the
    // changed values (PyTorch's checkpoint saves its inputs the same way).
    let x = Tensor::randn([4, 6], opts).set_requires_grad(true);
    let h = &x * 2;
    let f = block(w.shallow_clone(), Arc::new(AtomicUsize::new(0)));
    // SAFETY: the closure owns what it uses.
    let z = unsafe { crate::shim::checkpoint(&h, &w, Box::new(f)) }.unwrap();
    let _ = h.shallow_clone().f_add_scalar_(1.0).unwrap();
    let err = z
        .sum(tch::Kind::Float)
        .f_backward()
        .unwrap_err()
        .to_string();
    assert!(err.contains("modified by an inplace operation"), "{err}");
    crate::optim::clear_grads(&[w.shallow_clone()]);
    // Without gradients it is just the forward; a panic in it is the error.
    let x = Tensor::ones([2, 6], opts);
    let out = tch::no_grad(|| {
        // SAFETY: the closure owns what it uses.
        unsafe { crate::shim::checkpoint(&x, &w, Box::new(|x: &Tensor| x.shallow_clone() * 2)) }
    })
    .unwrap();
    assert!(!out.requires_grad());
    // SAFETY: as above.
    let err = unsafe {
        crate::shim::checkpoint(
            &x,
            &w,
            Box::new(|_: &Tensor| -> Tensor { panic!("no luck") }),
        )
    }
    .unwrap_err();
    assert!(err.contains("no luck"), "{err}");
}
