//! `hasten env`: what a bug report needs (versions, libtorch and its CUDA backend, devices, config),
//! and with `--check` a bf16 matmul on every device.

use crate::CudaLoad;
use std::fmt::Write;
use tch::Device;

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn total_ram() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The environment report, as text. Initialises CUDA (it lists GPUs through the driver).
pub fn env_report(check: bool) -> String {
    let mut out = String::new();
    let info = crate::libtorch();
    let _ = writeln!(out, "- hasten version: {}", env!("CARGO_PKG_VERSION"));
    if let Some(v) = crate::nccl_version() {
        let _ = writeln!(out, "- NCCL version: {v}");
    }
    let _ = writeln!(
        out,
        "- Platform: {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    let _ = writeln!(
        out,
        "- libtorch version: {}",
        info.version.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        out,
        "- libtorch folder: {}",
        info.lib_dir
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), |p| p.display().to_string())
    );
    let cuda = match &info.cuda {
        CudaLoad::Loaded => "loaded".to_owned(),
        CudaLoad::NotShipped => "not part of this libtorch (CPU build)".to_owned(),
        CudaLoad::Failed(reason) => format!("not loaded: {reason}"),
        CudaLoad::Disabled => "not loaded (HASTEN_NO_CUDA_LOAD is set)".to_owned(),
    };
    let _ = writeln!(out, "- libtorch CUDA backend: {cuda}");
    let _ = writeln!(out, "- CUDA available: {}", crate::is_cuda_available());
    let _ = writeln!(out, "- bf16 available: {}", crate::is_bf16_available());
    let _ = writeln!(
        out,
        "- CPU cores: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if let Some(ram) = total_ram() {
        let _ = writeln!(out, "- System RAM: {:.2} GiB", gib(ram));
    }
    let gpus = crate::cuda_devices();
    match &gpus {
        Ok(list) if list.is_empty() => {
            let _ = writeln!(out, "- GPUs: none");
        }
        Ok(list) => {
            let _ = writeln!(out, "- GPUs: {}", list.len());
            for g in list {
                let _ = writeln!(
                    out,
                    "  - cuda:{} {} (compute capability {}.{}): {:.1} GiB total, {:.1} GiB free",
                    g.index,
                    g.name,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    gib(g.total_memory),
                    gib(g.free_memory)
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "- GPUs: could not be listed: {e}");
        }
    }
    let config = crate::default_config_file();
    if config.is_file() {
        let _ = writeln!(out, "- Default config ({}):", config.display());
        match std::fs::read_to_string(&config) {
            Ok(text) => {
                for line in text.lines() {
                    let _ = writeln!(out, "    {line}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "    unreadable: {e}");
            }
        }
    } else {
        let _ = writeln!(out, "- Default config: not found ({})", config.display());
    }
    if check {
        let mut devices = vec![Device::Cpu];
        if crate::is_cuda_available() {
            devices.extend((0..crate::cuda_device_count()).map(Device::Cuda));
        }
        let _ = writeln!(out, "- Checks (bf16 matmul against fp32):");
        for device in devices {
            // A CPU without native bf16 (AVX2 only) multiplies bf16 on a scalar path: 4096x4096 takes
            // minutes there, 512x512 a fraction of a second, and proves the same.
            let n = if device == Device::Cpu { 512 } else { 4096 };
            let started = std::time::Instant::now();
            match crate::matmul_check(device, n) {
                Ok(c) => {
                    let _ = writeln!(
                        out,
                        "  - {device:?} ({n}x{n}): ok, max relative error {:.2e} ({:.0} ms)",
                        c.max_rel_error,
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "  - {device:?} ({n}x{n}): FAILED: {e}");
                }
            }
        }
    }
    out
}
