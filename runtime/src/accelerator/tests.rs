//! Unit tests of the Accelerator: prepared models, accumulation, mixed-precision outputs, refusals.

use super::*;
use tch::Tensor;

#[test]
fn forward_autocasts_and_returns_fp32_outputs() {
    let mut acc = Accelerator::builder()
        .cpu(true)
        .mixed_precision(PrecisionType::Bf16)
        .build()
        .unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let w = vs.root().ones("w", &[4, 4]);
    let model = acc.prepare_model(w, vs).unwrap();
    let x = Tensor::ones([2, 4], (tch::Kind::Float, Device::Cpu));
    // The matmul runs in bf16 under autocast; the caller gets fp32 back, the int tensor untouched.
    let inner = acc.autocast(|| x.matmul(model.module())).unwrap();
    assert_eq!(inner.kind(), tch::Kind::BFloat16);
    let (y, ids) = model
        .call(|w| (x.matmul(w), Tensor::from_slice(&[1i64, 2])))
        .unwrap();
    assert_eq!((y.kind(), ids.kind()), (tch::Kind::Float, tch::Kind::Int64));
    assert_eq!(y.double_value(&[0, 0]), 4.0);
    // The plain module is the model as built: no autocast.
    assert_eq!(x.matmul(model.module()).kind(), tch::Kind::Float);
}

#[test]
fn a_prepared_model_is_owned_and_outlives_free_memory() {
    let mut acc = Accelerator::builder().cpu(true).build().unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = tch::nn::linear(vs.root() / "fc", 3, 2, Default::default());
    let model = acc.prepare_model(net, vs).unwrap();
    let names: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["fc.bias", "fc.weight"]);
    // The optimizer's learning rate is the one it was built with: given once.
    let opt = acc.prepare_optimizer(crate::optim::Sgd::new(model.var_store(), 0.25));
    assert_eq!(opt.lr(), 0.25);
    // no_sync marks the model for the body only, and a panicking body puts the flag back too.
    acc.no_sync(&model, |_| assert!(model.entry().no_sync));
    assert!(!model.entry().no_sync);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        acc.no_sync(&model, |_| panic!("in the body"))
    }));
    assert!(panicked.is_err());
    assert!(!model.entry().no_sync);
    // accumulate returns whether this micro-batch synchronises.
    assert!(acc.accumulate());
    acc.free_memory();
    let x = Tensor::ones([4, 3], (tch::Kind::Float, Device::Cpu));
    assert_eq!(model.forward(&x).unwrap().size(), [4, 2]);
    let (_, vs) = model.into_inner();
    assert_eq!(vs.trainable_variables().len(), 2);
}

#[test]
fn models_from_elsewhere_are_refused_and_dropped_ones_are_no_longer_averaged() {
    let build = || {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let net = tch::nn::linear(vs.root() / "fc", 3, 2, Default::default());
        (net, vs)
    };
    let mut acc = Accelerator::builder().cpu(true).build().unwrap();
    let mut other = Accelerator::builder().cpu(true).build().unwrap();
    let (net, vs) = build();
    let theirs = other.prepare_model(net, vs).unwrap();
    let err = acc.clip_grad_norm_(&theirs, 1.0, 2.0).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnknownModel {
                op: "unscale_gradients",
                variables: 2
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("prepared by another Accelerator"),
        "{err}"
    );
    let (net, vs) = build();
    let mine = acc.prepare_model(net, vs).unwrap();
    let x = Tensor::ones([4, 3], (tch::Kind::Float, Device::Cpu));
    acc.backward(&mine.forward(&x).unwrap().sum(tch::Kind::Float))
        .unwrap();
    assert_eq!(acc.averaged.len(), 1);
    drop(mine);
    let (net, vs) = build();
    let next = acc.prepare_model(net, vs).unwrap();
    acc.backward(&next.forward(&x).unwrap().sum(tch::Kind::Float))
        .unwrap();
    assert_eq!(acc.averaged.len(), 1, "the dropped model is still averaged");
}

#[test]
fn outputs_are_fp32_even_with_autocast_disabled_and_loaders_end_inside_them() {
    let mut acc = Accelerator::builder()
        .cpu(true)
        .mixed_precision(PrecisionType::Bf16)
        .autocast_kwargs(AutocastKwargs { enabled: false })
        .build()
        .unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let w = vs.root().ones("w", &[2, 2]).to_kind(tch::Kind::BFloat16);
    let model = acc.prepare_model(w, vs).unwrap();
    let x = Tensor::ones([1, 2], (tch::Kind::BFloat16, Device::Cpu));
    // No autocast: the matmul runs in the inputs' bf16; the output comes back as fp32.
    assert_eq!(
        model.call(|w| x.matmul(w)).unwrap().kind(),
        tch::Kind::Float
    );
    // A loader that has finished no longer counts as "at its end": accumulation goes on.
    let mut g = acc.gradient.lock();
    g.num_steps = 2;
    g.end_of_dataloader = true;
    g.in_dataloader = false;
    drop(g);
    assert!(!acc.accumulate(), "a finished loader forced a sync");
    acc.gradient.lock().in_dataloader = true;
    assert!(acc.accumulate(), "the last batch of a loader did not sync");
}

#[test]
fn deepspeed_from_accelerate_launch_is_refused_and_fsdp_alone_is_ignored() {
    crate::utils::patch_environment([("ACCELERATE_USE_DEEPSPEED", "true")], || {
        let Err(err) = Accelerator::builder().cpu(true).build() else {
            panic!("ACCELERATE_USE_DEEPSPEED=true built an Accelerator");
        };
        assert!(
            matches!(&err, Error::InvalidValue { name, .. } if name == "ACCELERATE_USE_DEEPSPEED"),
            "{err}"
        );
        assert!(err.to_string().contains("plain DDP"), "{err}");
    });
    // As in Accelerate, the FSDP plugin applies only when several processes train; a bad setting is
    // still an error naming it.
    crate::utils::patch_environment([("ACCELERATE_USE_FSDP", "true")], || {
        let acc = Accelerator::builder().cpu(true).build().unwrap();
        assert_eq!(acc.distributed_type(), crate::DistributedType::No);
    });
    crate::utils::patch_environment(
        [("ACCELERATE_USE_FSDP", "true"), ("FSDP_VERSION", "3")],
        || {
            let Err(err) = Accelerator::builder().cpu(true).build() else {
                panic!("FSDP_VERSION=3 built an Accelerator");
            };
            assert!(err.to_string().contains("FSDP_VERSION"), "{err}");
        },
    );
}
