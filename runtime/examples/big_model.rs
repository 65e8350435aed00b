//! Big-model inference end to end: save a checkpoint, plan a device map that splits the model over a GPU
//! (when there is one), the CPU and the disk, load it by that map, run the forward pass across devices
//! (disk blocks read their weights for their forward only) and compare with the model run on the CPU.
//!
//! `big_model [FOLDER]` (default: a fresh temporary folder). Exit status 1 when the outputs differ.

use hasten::tch::{Device, Kind, Tensor, nn, nn::Module, nn::VarStore};
use hasten::{DeviceKey, DeviceMap, DeviceMapSpec, DispatchOptions, ModelSkeleton, OffloadFolder};
use std::path::PathBuf;

const WIDTH: i64 = 256;
const BLOCKS: i64 = 6;

struct Model {
    blocks: Vec<nn::Linear>,
    head: nn::Linear,
}

impl Model {
    fn new(vs: &VarStore) -> Self {
        let root = vs.root();
        Model {
            blocks: (0..BLOCKS)
                .map(|i| nn::linear(&root / "layers" / i, WIDTH, WIDTH, Default::default()))
                .collect(),
            head: nn::linear(&root / "head", WIDTH, 10, Default::default()),
        }
    }

    /// tch has no forward hooks, so the forward pass moves activations to each block's device itself, and
    /// runs each disk-offloaded block on `exec` with its weights read for that forward only.
    fn forward(
        &self,
        dispatch: Option<(&VarStore, &DeviceMap, &OffloadFolder, Device)>,
        x: &Tensor,
    ) -> Result<Tensor, hasten::Error> {
        let mut x = x.shallow_clone();
        let run = |module: &str, layer: &nn::Linear, x: Tensor| match dispatch {
            None => Ok(layer.forward(&x)),
            Some((vs, map, offload, exec))
                if hasten::device_key_of(map, module) == Some(DeviceKey::Disk) =>
            {
                let x = x.to_device(exec);
                offload.with_module_on(vs, module, exec, || layer.forward(&x))
            }
            Some((_, map, _, _)) => {
                let device = hasten::device_of(map, module).unwrap_or(Device::Cpu);
                Ok(layer.forward(&x.to_device(device)))
            }
        };
        for (i, block) in self.blocks.iter().enumerate() {
            x = run(&format!("layers.{i}"), block, x)?.relu();
        }
        Ok(run("head", &self.head, x)?.to_device(Device::Cpu))
    }
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
    let reference = Model::new(&reference_vs);
    let checkpoint = folder.join("model.safetensors");
    reference_vs.save(&checkpoint)?;
    let input = Tensor::randn([8, WIDTH], (Kind::Float, Device::Cpu));
    let expected = reference.forward(None, &input)?;

    // A fresh model (other random weights) loaded by a planned map: two blocks on GPU 0 when there is one,
    // two on the CPU, the rest on disk.
    println!("CUDA available: {}", hasten::is_cuda_available());
    let block = (WIDTH * WIDTH + WIDTH) as u64 * 4;
    let mut max_memory = vec![(DeviceKey::Cpu, 3 * block)];
    if hasten::is_cuda_available() {
        max_memory.push((DeviceKey::Gpu(0), 3 * block));
    }
    let vs = VarStore::new(Device::Cpu);
    let model = Model::new(&vs);
    let classes: Vec<(String, &str)> = (0..BLOCKS)
        .map(|i| (format!("layers.{i}"), "Block"))
        .collect();
    let class_refs: Vec<(&str, &str)> = classes.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    let skeleton = ModelSkeleton::from_var_store(&vs, &class_refs);
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
    // Disk blocks run where the first block runs (GPU 0 when there is one), weights read per forward.
    let exec = hasten::device_of(&map, "layers.0").unwrap_or(Device::Cpu);
    let folder_index = OffloadFolder::open(&offload)?;
    let output = model.forward(Some((&vs, &map, &folder_index, exec)), &input)?;
    let still_offloaded = model
        .blocks
        .iter()
        .filter(|b| b.ws.stride().iter().all(|s| *s == 0))
        .count();
    println!("disk blocks ran on {exec:?}; {still_offloaded} blocks hold only placeholders again");
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
