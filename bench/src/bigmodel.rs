//! B1, B2 and B3 of shared/bench/WORKLOADS.md, hasten's side of `py_bigmodel.py`:
//! `bench-bigmodel CHECKPOINT load|offload` (also `make`, `h2d`, and `maxmem`: how long
//! `get_max_memory` takes, i.e. CUDA coming up on every GPU). An empty 24-block skeleton (d=4096, h=16384), the sharded
//! bf16 checkpoint loaded and dispatched with device_map auto and blocks unsplit (offload: at most 3 GiB
//! on GPU 0 and 3 GiB on the CPU, the rest on disk), then two timed forwards of a 4×128×4096 input.

#[path = "report.rs"]
mod report;

use hasten::big_modeling::{
    DeviceKey, DeviceMapSpec, DispatchOptions, DispatchedSequential, ModelSkeleton,
};
use hasten::layers;
use hasten::tch::nn::{self, Module};
use hasten::tch::{Cuda, Device, Kind, Tensor};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

const BLOCKS: i64 = 24;

/// Bytes this process has had read from storage so far (`read_bytes` of /proc/self/io: page faults
/// and read-ahead included, page-cache hits not), or 0 where the kernel does not say.
fn storage_read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("read_bytes:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Samples [`storage_read_bytes`] every 100 ms on a thread until the returned flag is set; the thread
/// returns (seconds, MB read since the start) pairs, so a log shows whether the disk was busy all along.
fn io_timeline() -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<Vec<(f64, u64)>>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let start = Instant::now();
    let base = storage_read_bytes();
    let handle = std::thread::spawn(move || {
        let mut samples = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mb = (storage_read_bytes() - base) >> 20;
            samples.push(((start.elapsed().as_secs_f64() * 10.0).round() / 10.0, mb));
        }
        samples
    });
    (stop, handle)
}

/// Model width and hidden size: 4096 and 16384, or smaller through BENCH_D / BENCH_H (smoke tests on
/// machines without a big GPU).
fn dims() -> (i64, i64) {
    let get = |k: &str, d: i64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    (get("BENCH_D", 4096), get("BENCH_H", 16384))
}

/// Writes a random checkpoint of the model as py_bigmodel.py's `make` does (shards of at most 2 GB and
/// an index), for smoke tests; the benchmark itself reads the one Python writes.
fn make(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let (d, h) = dims();
    std::fs::create_dir_all(dir)?;
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    let mut size = 0;
    for i in 0..BLOCKS {
        for (name, shape) in [
            ("ln.weight", vec![d]),
            ("ln.bias", vec![d]),
            ("up.weight", vec![h, d]),
            ("up.bias", vec![h]),
            ("down.weight", vec![d, h]),
            ("down.bias", vec![d]),
        ] {
            let t = (Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02)
                .to_kind(Kind::BFloat16);
            let bytes = t.numel() * 2;
            if size + bytes > 2_000_000_000 && !shards.last().unwrap().is_empty() {
                shards.push(vec![]);
                size = 0;
            }
            size += bytes;
            shards.last_mut().unwrap().push((format!("{i}.{name}"), t));
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        Tensor::write_safetensors(shard, dir.join(&file))?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    Ok(())
}

/// `x + down(gelu(up(ln(x))))`, named like py_bigmodel.py's Block.
fn block(p: &nn::Path) -> Box<dyn Module> {
    let (d, h) = dims();
    let ln = layers::layer_norm(&(p / "ln"), &[d]);
    let up = layers::linear(&(p / "up"), d, h, true);
    let down = layers::linear(&(p / "down"), h, d, true);
    Box::new(nn::func(move |x| {
        x + down.forward(&up.forward(&ln.forward(x)).gelu("none"))
    }))
}

fn sync_all() {
    if !hasten::utils::is_cuda_available() {
        return;
    }
    for i in 0..hasten::utils::cuda_device_count() {
        Cuda::synchronize(i as i64);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let checkpoint = PathBuf::from(
        args.get(1)
            .ok_or("usage: bench-bigmodel CHECKPOINT load|offload|make|h2d|maxmem")?,
    );
    let mode = args.get(2).map_or("load", String::as_str);
    if mode == "make" {
        return make(&checkpoint);
    }
    if mode == "h2d" {
        // The bus's ceiling: 1 GiB host → GPU 0 from pageable and from page-locked memory. (hasten first:
        // it loads libtorch's CUDA half, which tch's pin_memory needs.)
        assert!(hasten::utils::is_cuda_available(), "h2d needs a GPU");
        let host = Tensor::ones([1 << 30], (Kind::Uint8, Device::Cpu));
        let pinned = host.pin_memory(Device::Cuda(0));
        for (what, src) in [("pageable", &host), ("pinned", &pinned)] {
            let _ = src.to_device(Device::Cuda(0));
            sync_all();
            let t = Instant::now();
            let _gpu = src.to_device_(Device::Cuda(0), Kind::Uint8, true, false);
            sync_all();
            let gbps = (1u64 << 30) as f64 / t.elapsed().as_secs_f64() / 1e9;
            report::emit(json!({"part": format!("h2d_{what}"), "GB_per_s": gbps}));
        }
        return Ok(());
    }
    if mode == "maxmem" {
        // What planning costs before the first read: CUDA brought up on every GPU to ask for free memory.
        let t = Instant::now();
        let memory = hasten::big_modeling::get_max_memory()?;
        report::emit(
            json!({"part": "get_max_memory", "s": t.elapsed().as_secs_f64(), "devices": memory.len()}),
        );
        return Ok(());
    }
    let (d, _) = dims();
    // Python's clock starts after `import torch`, which loads libtorch's CUDA half without initialising
    // CUDA; loading it here first is the same. Everything from there to the dispatched model is timed,
    // on both sides, CUDA's start included: as in py_bigmodel.py, CUDA first comes up inside
    // load_checkpoint_and_dispatch (reading GPU memory to plan), so whether there are GPUs is read from
    // the driver's /proc entries, which starts nothing.
    let _ = hasten::libtorch();
    let (stop_timeline, timeline) = io_timeline();
    let read_before = storage_read_bytes();
    let t = Instant::now();
    let gpu = hasten_launch::visible_gpu_count() > 0;
    let vs = nn::VarStore::new(Device::Cpu);
    let blocks: Vec<(String, Box<dyn Module>)> = layers::init_empty_weights(|| {
        (0..BLOCKS)
            .map(|i| (i.to_string(), block(&(vs.root() / i))))
            .collect()
    });
    let names: Vec<String> = (0..BLOCKS).map(|i| i.to_string()).collect();
    let classes: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "Block")).collect();
    let skeleton = ModelSkeleton::from_var_store(&vs, &classes);
    let empty_s = t.elapsed().as_secs_f64();
    let offload = std::env::temp_dir().join("hasten_offload");
    let _ = std::fs::remove_dir_all(&offload);
    let mut opts = DispatchOptions {
        device_map: DeviceMapSpec::Auto,
        no_split_module_classes: vec!["Block".into()],
        dtype: Some(Kind::BFloat16),
        ..Default::default()
    };
    // Offload mode: 3 GiB on GPU 0 and 3 GiB on the CPU, the rest on disk. BENCH_OFFLOAD_BYTES scales
    // that for smoke tests (on a machine without a GPU, the CPU alone).
    let budget: u64 = std::env::var("BENCH_OFFLOAD_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3 << 30);
    if mode == "offload" {
        let mut max_memory = vec![(DeviceKey::Cpu, budget)];
        if gpu {
            max_memory.insert(0, (DeviceKey::Gpu(0), budget));
        }
        opts.max_memory = Some(max_memory);
        opts.offload_folder = Some(offload.clone());
    }
    let (map, report) = hasten::load_checkpoint_and_dispatch(&vs, &skeleton, &checkpoint, &opts)?;
    let mut devices: Vec<String> = map.iter().map(|(_, d)| format!("{d:?}")).collect();
    let per_device: Vec<(String, usize)> = {
        devices.sort();
        let mut counts: Vec<(String, usize)> = Vec::new();
        for d in devices {
            match counts.last_mut() {
                Some((last, n)) if *last == d => *n += 1,
                _ => counts.push((d, 1)),
            }
        }
        counts
    };
    let folder = (mode == "offload").then_some(offload.as_path());
    let main_device = if gpu && hasten::utils::is_cuda_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let dispatcher = hasten::dispatch_model(&vs, map, folder, Some(main_device))?;
    let model = DispatchedSequential::new(dispatcher, blocks);
    sync_all();
    let load_s = t.elapsed().as_secs_f64();
    let read_mb = (storage_read_bytes() - read_before) >> 20;
    stop_timeline.store(true, std::sync::atomic::Ordering::Relaxed);
    let timeline = timeline.join().unwrap_or_default();
    // Seeded, so the load and offload runs give the same output (a check that offloading is exact).
    hasten::tch::manual_seed(0);
    let x = Tensor::randn([4, 128, d], (Kind::BFloat16, main_device));
    let mut forwards = Vec::new();
    let mut checksum = 0.0;
    hasten::tch::no_grad(|| -> Result<(), hasten::Error> {
        for _ in 0..2 {
            let t = Instant::now();
            let y = model.try_forward(&x)?;
            sync_all();
            forwards.push(t.elapsed().as_secs_f64());
            checksum = y
                .to_kind(Kind::Float)
                .abs()
                .mean(Kind::Float)
                .double_value(&[]);
        }
        Ok(())
    })?;
    report::emit(json!({
        "part": format!("bigmodel_load_{mode}_hasten"),
        "empty_s": empty_s,
        "load_s": load_s,
        "fwd1_s": forwards[0],
        "fwd2_s": forwards[1],
        "blocks_per_device": per_device,
        "loaded": report.loaded.len(),
        "offloaded": report.offloaded.len(),
        "mean_abs_out": checksum,
        "storage_read_mb": read_mb,
        "storage_read_mb_timeline": timeline,
    }));
    let _ = std::fs::remove_dir_all(&offload);
    Ok(())
}
