//! Devices: what this process can use, which one a rank takes, and a quick check that a GPU computes.

use crate::libtorch;
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// True when libtorch can run on at least one CUDA GPU in this process.
///
/// Loads libtorch's CUDA backend on first use (see [`crate::libtorch()`]); this initialises the CUDA
/// driver, so a launcher must not call it before forking workers.
pub fn is_cuda_available() -> bool {
    matches!(libtorch().cuda, crate::CudaLoad::Loaded) && tch::Cuda::is_available()
}

/// Number of CUDA GPUs visible to this process (after `CUDA_VISIBLE_DEVICES`); 0 without CUDA.
pub fn cuda_device_count() -> usize {
    if is_cuda_available() {
        usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
    } else {
        0
    }
}

/// True when bf16 arithmetic is available at full speed on the device hasten would use.
///
/// On the CPU libtorch always supports bf16, as Accelerate reports. On CUDA this asks for native bf16
/// (compute capability 8.0 or later); Accelerate also answers true on older GPUs, which only emulate bf16.
pub fn is_bf16_available() -> bool {
    if !is_cuda_available() {
        return true;
    }
    match gpus(false) {
        Ok(gpus) => gpus.first().is_some_and(|g| g.compute_capability.0 >= 8),
        Err(_) => false,
    }
}

/// Always false: hasten builds for Linux, and libtorch's Metal (MPS) backend exists only on macOS.
pub fn is_mps_available() -> bool {
    false
}

/// Always false: TPUs need torch_xla, a Python extension that libtorch (and so tch) does not include.
pub fn is_tpu_available() -> bool {
    false
}

/// Always false: the libtorch builds hasten targets (PyTorch 2.11 CPU and CUDA wheels) have no Intel XPU
/// backend, and tch exposes no XPU device.
pub fn is_xpu_available() -> bool {
    false
}

/// Always false: Ascend NPUs need the out-of-tree `torch_npu` extension, which tch cannot load.
pub fn is_npu_available() -> bool {
    false
}

/// Always false: Intel Extension for PyTorch is a Python package with no C++ API that tch can use.
pub fn is_ipex_available() -> bool {
    false
}

/// Compares the running libtorch's version with `version` using `op` (`<`, `<=`, `==`, `!=`, `>=`, `>`).
///
/// Local labels such as `+cu130` are ignored, and missing components count as 0 (`2.11` = `2.11.0`).
pub fn is_torch_version(op: &str, version: &str) -> Result<bool> {
    let running = libtorch()
        .version
        .as_deref()
        .ok_or_else(|| Error::Version {
            op: op.to_owned(),
            version: version.to_owned(),
            detail: "the running libtorch's version could not be determined".into(),
        })?;
    compare_versions(running, op, version)
}

fn numeric_parts(v: &str) -> Option<Vec<u64>> {
    let base = v.trim().split('+').next()?;
    let mut parts = Vec::new();
    for piece in base.split('.') {
        // "0a0" or "0rc1": keep the leading digits, as a release of that number.
        let digits: String = piece.chars().take_while(char::is_ascii_digit).collect();
        parts.push(digits.parse().ok()?);
    }
    Some(parts)
}

pub(crate) fn compare_versions(left: &str, op: &str, right: &str) -> Result<bool> {
    let bad = |detail: String| Error::Version {
        op: op.to_owned(),
        version: right.to_owned(),
        detail,
    };
    let mut a = numeric_parts(left).ok_or_else(|| bad(format!("cannot parse {left:?}")))?;
    let mut b = numeric_parts(right).ok_or_else(|| bad(format!("cannot parse {right:?}")))?;
    let n = a.len().max(b.len());
    a.resize(n, 0);
    b.resize(n, 0);
    let ord = a.cmp(&b);
    use std::cmp::Ordering::*;
    Ok(match op.trim() {
        "<" => ord == Less,
        "<=" => ord != Greater,
        "==" => ord == Equal,
        "!=" => ord != Equal,
        ">=" => ord != Less,
        ">" => ord == Greater,
        other => return Err(bad(format!("unknown operator {other:?}"))),
    })
}

/// The device a rank uses: on CUDA, GPU `local_rank` modulo the GPUs this process sees (Accelerate's
/// rule, so a rank that sees only its own GPU, as under hasten's launchers or SLURM's GPU binding,
/// computes on `cuda:0`); the CPU without CUDA or when it is forced.
///
/// Pure, so the rule is tested without GPUs; [`crate::ProcessState::from_env`] feeds it the real values.
pub fn select_device(local_rank: usize, use_cpu: bool, cuda_devices: usize) -> Device {
    if use_cpu || cuda_devices == 0 {
        Device::Cpu
    } else {
        Device::Cuda(local_rank % cuda_devices)
    }
}

/// One CUDA GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Index as seen by this process (after `CUDA_VISIBLE_DEVICES`).
    pub index: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: usize,
    /// Free memory in bytes at the time of the call.
    pub free_memory: usize,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// PCI address as nvidia-smi prints it (`00000000:18:00.0`): the same physical GPU has the same one
    /// in every process, whatever `CUDA_VISIBLE_DEVICES` numbers it.
    pub pci_bus_id: String,
}

/// Lists the CUDA GPUs through the driver API, or returns an empty list where there is no driver.
///
/// Reading free memory needs each device's primary context (the one libtorch uses too), so, like
/// [`is_cuda_available`], this initialises CUDA in the calling process. The contexts are made on one
/// thread per GPU at once (each takes 0.1–0.3 s) and kept, as PyTorch keeps those `mem_get_info` makes:
/// the GPUs are asked about because they are about to be used, and releasing the last reference would
/// destroy a context libtorch then has to make again.
pub fn cuda_devices() -> Result<Vec<GpuInfo>> {
    gpus(true)
}

/// The GPUs with or without their free memory (without: no context is made; free_memory is 0).
fn gpus(free_memory: bool) -> Result<Vec<GpuInfo>> {
    use cudarc::driver::{result, sys};
    // cudarc panics when libcuda is absent, so ask first.
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Ok(Vec::new());
    }
    if result::init().is_err() {
        // A driver library without a usable GPU (e.g. no device nodes in a container).
        return Ok(Vec::new());
    }
    let count = result::device::get_count().map_err(driver_error("cuDeviceGetCount"))?;
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..count)
            .map(|ordinal| scope.spawn(move || gpu_info(ordinal, free_memory)))
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(Error::DeviceUnavailable {
                        detail: "the thread reading a GPU's properties panicked".into(),
                    })
                })
            })
            .collect()
    })
}

fn driver_error(op: &'static str) -> impl Fn(cudarc::driver::result::DriverError) -> Error + Copy {
    move |e| Error::DeviceUnavailable {
        detail: format!("CUDA driver call {op} failed: {e:?}"),
    }
}

fn gpu_info(ordinal: i32, free_memory: bool) -> Result<GpuInfo> {
    use cudarc::driver::{result, sys};
    let driver = driver_error;
    let dev = result::device::get(ordinal).map_err(driver("cuDeviceGet"))?;
    let name = result::device::get_name(dev).map_err(driver("cuDeviceGetName"))?;
    // SAFETY: `dev` came from cuDeviceGet. The primary context is retained and never released (see
    // cuda_devices); it is made current on this short-lived thread only.
    let (total_memory, major, minor, pci_bus_id, free) = unsafe {
        use sys::CUdevice_attribute::*;
        let total = result::device::total_mem(dev).map_err(driver("cuDeviceTotalMem"))?;
        let attribute =
            |a| result::device::get_attribute(dev, a).map_err(driver("cuDeviceGetAttribute"));
        let major = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let pci = format!(
            "{:08X}:{:02X}:{:02X}.0",
            attribute(CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
            attribute(CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
            attribute(CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
        );
        let free = if free_memory {
            let ctx =
                result::primary_ctx::retain(dev).map_err(driver("cuDevicePrimaryCtxRetain"))?;
            result::ctx::set_current(ctx).map_err(driver("cuCtxSetCurrent"))?;
            result::mem_get_info()
                .map(|(free, _)| free)
                .map_err(driver("cuMemGetInfo"))?
        } else {
            0
        };
        (total, major, minor, pci, free)
    };
    Ok(GpuInfo {
        index: usize::try_from(ordinal).unwrap_or_default(),
        name,
        total_memory,
        free_memory: free,
        compute_capability: (major, minor),
        pci_bus_id,
    })
}

/// The outcome of [`matmul_check`].
#[derive(Debug, Clone, PartialEq)]
pub struct MatmulCheck {
    /// Where it ran.
    pub device: Device,
    /// Matrix side.
    pub n: i64,
    /// Largest relative difference between the bf16 product and an fp32 product of the same inputs.
    pub max_rel_error: f64,
}

/// Multiplies two random `n`×`n` bf16 matrices on `device` and compares with fp32.
///
/// A smoke test for a new host: it proves libtorch reaches the device and computes sensibly. The
/// tolerance a caller should apply is bf16's (about 1e-2 relative, at these sizes).
pub fn matmul_check(device: Device, n: i64) -> Result<MatmulCheck> {
    let torch = |op: &'static str| move |source| Error::torch(op, source);
    let a = Tensor::f_randn([n, n], (Kind::Float, device)).map_err(torch("randn"))?;
    let b = Tensor::f_randn([n, n], (Kind::Float, device)).map_err(torch("randn"))?;
    let a16 = a.f_to_kind(Kind::BFloat16).map_err(torch("to bf16"))?;
    let b16 = b.f_to_kind(Kind::BFloat16).map_err(torch("to bf16"))?;
    let reference = a16
        .f_to_kind(Kind::Float)
        .and_then(|x| x.f_matmul(&b16.to_kind(Kind::Float)))
        .map_err(torch("matmul fp32"))?;
    let product = a16
        .f_matmul(&b16)
        .and_then(|p| p.f_to_kind(Kind::Float))
        .map_err(torch("matmul bf16"))?;
    let scale = reference
        .abs()
        .max()
        .double_value(&[])
        .max(f64::MIN_POSITIVE);
    let max_rel_error = (&product - &reference).abs().max().double_value(&[]) / scale;
    Ok(MatmulCheck {
        device,
        n,
        max_rel_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_is_local_rank_modulo_the_gpus_else_cpu() {
        assert_eq!(select_device(0, false, 0), Device::Cpu);
        assert_eq!(select_device(3, false, 0), Device::Cpu);
        assert_eq!(select_device(1, false, 2), Device::Cuda(1));
        assert_eq!(select_device(1, true, 2), Device::Cpu);
        // Accelerate: local_process_index % device_count(): a rank bound to its own GPU takes cuda:0.
        assert_eq!(select_device(3, false, 1), Device::Cuda(0));
        assert_eq!(select_device(2, false, 2), Device::Cuda(0));
    }

    #[test]
    fn finds_the_mapped_libtorch_and_its_version() {
        let info = crate::libtorch();
        let dir = info.lib_dir.as_ref().expect("libtorch_cpu.so is mapped");
        assert!(dir.join("libtorch_cpu.so").exists());
        let version = info.version.as_deref().expect("a version file");
        assert!(version.starts_with("2.11."), "{version}");
    }

    #[test]
    fn version_comparisons() {
        assert!(compare_versions("2.11.0+cu130", ">=", "2.11").unwrap());
        assert!(compare_versions("2.11.0+cu130", "==", "2.11.0").unwrap());
        assert!(compare_versions("2.11.0", "<", "2.13").unwrap());
        assert!(compare_versions("2.11.0", ">", "2.9.1").unwrap());
        assert!(!compare_versions("2.11.0", "!=", "2.11").unwrap());
        assert!(compare_versions("2.11.0a0", "<=", "2.11.0").unwrap());
        assert!(compare_versions("2.11.0", "~=", "2").is_err());
        assert!(compare_versions("2.11.0", ">", "two").is_err());
    }

    #[test]
    fn running_torch_is_2_11() {
        assert!(is_torch_version("==", "2.11").unwrap());
        assert!(is_torch_version(">=", "2.0").unwrap());
        assert!(!is_torch_version("<", "2.11").unwrap());
    }

    #[test]
    fn backends_this_build_cannot_serve_answer_false() {
        assert!(!is_mps_available());
        assert!(!is_tpu_available());
        assert!(!is_xpu_available());
        assert!(!is_npu_available());
        assert!(!is_ipex_available());
    }

    #[test]
    fn bf16_matmul_on_the_cpu_is_close_to_fp32() {
        tch::manual_seed(0);
        let check = matmul_check(Device::Cpu, 64).unwrap();
        assert!(check.max_rel_error < 2e-2, "{check:?}");
    }

    #[test]
    fn cuda_answers_agree() {
        // On a CPU host the driver is absent: every CUDA question says no, consistently.
        let gpus = cuda_devices().unwrap();
        assert_eq!(cuda_device_count() > 0, is_cuda_available());
        if !is_cuda_available() {
            assert!(is_bf16_available());
        } else {
            assert_eq!(gpus.len(), cuda_device_count());
        }
    }
}
