//! Big-model inference end to end, as Accelerate's users write it: build the model with empty weights,
//! let `load_checkpoint_and_dispatch` plan a device map that splits it over a GPU (when there is one), the
//! CPU and the disk and load the checkpoint by it, then run it through `dispatch_model`'s hooks — the
//! model's own forward, each `Block` running where the map put it, offloaded blocks getting their
//! weights for their forward only — and compare with the model run on the CPU.
//!
//! `big_model [FOLDER]` (default: a fresh temporary folder). Exit status 1 when the outputs differ.

use hasten::big_modeling::{
    DeviceKey, DeviceMapSpec, DispatchOptions, DispatchedModel, ModelSkeleton,
};
use hasten::layers::{self, Block};
use hasten::tch::{Device, Kind, Tensor, nn, nn::Module, nn::VarStore};
use std::path::PathBuf;

const WIDTH: i64 = 256;
const BLOCKS: i64 = 6;

/// Six `Linear + ReLU` blocks and a head, each a [`Block`] at the path its weights live under.
fn model(vs: &VarStore) -> nn::Sequential {
    let root = vs.root();
    let mut seq = nn::seq();
    for i in 0..BLOCKS {
        let path = &root / "layers" / i;
        let layer = layers::linear(&path, WIDTH, WIDTH, true);
        seq = seq.add(Block::new(
            &path,
            nn::func(move |x| layer.forward(x).relu()),
        ));
    }
    let head = &root / "head";
    seq.add(Block::new(&head, layers::linear(&head, WIDTH, 10, true)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let given = std::env::args().nth(1).map(PathBuf::from);
    let folder = given.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("hasten-big-model-{}", std::process::id()))
    });
    std::fs::create_dir_all(&folder)?;
    hasten::set_seed(0, false)?;

    // The reference: a model trained nowhere, saved, and run on the CPU.
    let reference_vs = VarStore::new(Device::Cpu);
    let reference = model(&reference_vs);
    let checkpoint = folder.join("model.safetensors");
    reference_vs.save(&checkpoint)?;
    let input = Tensor::randn([8, WIDTH], (Kind::Float, Device::Cpu));
    let expected = reference.forward(&input);

    // The same architecture with empty weights: no memory, no initialisation.
    let vs = VarStore::new(Device::Cpu);
    let empty = layers::init_empty_weights(|| model(&vs));
    // Every module in registration order (the blocks, then the head), as PyTorch's named_modules lists
    // them: the order a device map follows.
    let classes: Vec<(String, &str)> = (0..BLOCKS)
        .map(|i| (format!("layers.{i}"), "Block"))
        .chain([("head".to_owned(), "Linear")])
        .collect();
    let class_refs: Vec<(&str, &str)> = classes.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    let skeleton = ModelSkeleton::from_var_store(&vs, &class_refs);

    // Room for three blocks on GPU 0 (when there is one) and three on the CPU; the rest goes to disk.
    println!("CUDA available: {}", hasten::utils::is_cuda_available());
    let block = (WIDTH * WIDTH + WIDTH) as u64 * 4;
    let mut max_memory = vec![(DeviceKey::Cpu, 3 * block)];
    if hasten::utils::is_cuda_available() {
        max_memory.insert(0, (DeviceKey::Gpu(0), 3 * block));
    }
    let offload = folder.join("offload");
    let (map, report) = hasten::load_checkpoint_and_dispatch(
        &vs,
        &skeleton,
        &checkpoint,
        &DispatchOptions {
            device_map: DeviceMapSpec::Sequential,
            max_memory: Some(max_memory),
            no_split_module_classes: vec!["Block".into()],
            offload_folder: Some(offload.clone()),
            ..Default::default()
        },
    )?;
    for (module, device) in &map {
        println!("{module:>10} -> {device:?}");
    }
    println!(
        "loaded {} tensors, offloaded {} to {}",
        report.loaded.len(),
        report.offloaded.len(),
        offload.display()
    );

    // Accelerate's dispatch_model: blocks run where the map says, offloaded ones on the main device.
    let dispatcher = hasten::dispatch_model(&vs, map, Some(&offload), None)?;
    println!("offloaded blocks run on {:?}", dispatcher.main_device());
    let model = DispatchedModel::new(dispatcher, empty)?;
    let output = hasten::tch::no_grad(|| model.try_forward(&input))?.to_device(Device::Cpu);
    let placeholders = vs
        .variables()
        .values()
        .filter(|t| layers::is_empty_placeholder(t))
        .count();
    println!("{placeholders} offloaded tensors hold only placeholders again");
    let diff = (&output - &expected).abs().max().double_value(&[]);
    println!("max |output - reference| = {diff:e}");
    if given.is_none() {
        let _ = std::fs::remove_dir_all(&folder);
    }
    if diff > 1e-4 {
        eprintln!("big_model: the dispatched model disagrees with the reference by {diff}");
        std::process::exit(1);
    }
    println!("big model: dispatched output matches the CPU reference");
    Ok(())
}
