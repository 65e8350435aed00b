//! Which libtorch this process runs on, and loading its CUDA half at run time.
//!
//! tch links only `libtorch_cpu`; libtorch registers its CUDA backend from static initialisers inside
//! `libtorch_cuda.so`. Rather than a `cuda` cargo feature (two builds, and a CUDA binary that fails to
//! start on a host without CUDA libraries), hasten loads `libtorch_cuda.so` with `dlopen` from the
//! directory of the `libtorch_cpu.so` actually mapped into this process. One binary therefore serves CPU
//! and GPU hosts: where the CUDA half or its libraries are missing, the load fails, the reason is kept for
//! `hasten env`, and everything runs on the CPU.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What happened when hasten tried to load libtorch's CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaLoad {
    /// `libtorch_cuda.so` is loaded; CUDA tensors work if the host has a GPU and a driver.
    Loaded,
    /// This libtorch has no `libtorch_cuda.so` (a CPU-only build).
    NotShipped,
    /// `libtorch_cuda.so` exists but could not be loaded (usually missing CUDA libraries).
    Failed(String),
    /// Loading was skipped because `HASTEN_NO_CUDA_LOAD` is set.
    Disabled,
}

/// Facts about the libtorch mapped into this process.
#[derive(Debug, Clone)]
pub struct LibtorchInfo {
    /// The folder holding `libtorch_cpu.so`, when it could be found.
    pub lib_dir: Option<PathBuf>,
    /// libtorch's version string, e.g. `2.11.0+cu130`.
    pub version: Option<String>,
    /// The outcome of loading the CUDA backend.
    pub cuda: CudaLoad,
}

/// The one process-wide record of libtorch, filled on first use. It is global because the thing it
/// describes (the shared libraries mapped into the process) is global; nothing in it is mutable.
static LIBTORCH: OnceLock<LibtorchInfo> = OnceLock::new();

/// Returns what is known about the libtorch mapped into this process, loading its CUDA backend first if
/// that has not happened yet. In a process that does not link libtorch (the `hasten` command line),
/// `lib_dir` is `None` and nothing is loaded.
///
/// Every hasten function that asks about CUDA goes through here, so user code never needs to call it.
pub fn libtorch() -> &'static LibtorchInfo {
    LIBTORCH.get_or_init(|| {
        let lib_dir = mapped_library_dir("libtorch_cpu.so");
        let version = lib_dir.as_deref().and_then(read_version);
        let cuda = if std::env::var_os("HASTEN_NO_CUDA_LOAD").is_some() {
            CudaLoad::Disabled
        } else {
            match lib_dir.as_deref() {
                Some(dir) => load_cuda_backend(dir),
                None => CudaLoad::Failed("libtorch_cpu.so is not loaded in this process".into()),
            }
        };
        LibtorchInfo {
            lib_dir,
            version,
            cuda,
        }
    })
}

/// Finds the folder of a shared library mapped into this process by reading `/proc/self/maps`.
fn mapped_library_dir(file_name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(Path::new)
        .find(|p| p.file_name().is_some_and(|n| n == file_name))
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

/// Reads libtorch's version from the Python package's `version.py` or a C++ distribution's `build-version`.
fn read_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(py) = std::fs::read_to_string(root.join("version.py")) {
        for line in py.lines() {
            if let Some(rest) = line.trim().strip_prefix("__version__") {
                let v = rest
                    .trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches(['\'', '"']);
                if !v.is_empty() {
                    return Some(v.to_owned());
                }
            }
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn load_cuda_backend(lib_dir: &Path) -> CudaLoad {
    let path = lib_dir.join("libtorch_cuda.so");
    if !path.exists() {
        return CudaLoad::NotShipped;
    }
    // Never closed (see dynlib): libtorch's CUDA hooks must stay registered for the life of the process.
    match crate::dynlib::Loaded::open_global(&path) {
        Ok(_) => CudaLoad::Loaded,
        Err(reason) => CudaLoad::Failed(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_py_and_build_version_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        std::fs::create_dir(&lib).unwrap();
        assert_eq!(read_version(&lib), None);
        std::fs::write(dir.path().join("build-version"), "2.11.0+cpu\n").unwrap();
        assert_eq!(read_version(&lib).as_deref(), Some("2.11.0+cpu"));
        std::fs::write(
            dir.path().join("version.py"),
            "from typing import Optional\n__version__ = '2.11.0+cu130'\n",
        )
        .unwrap();
        assert_eq!(read_version(&lib).as_deref(), Some("2.11.0+cu130"));
    }

    #[test]
    fn a_missing_cuda_library_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_cuda_backend(dir.path()), CudaLoad::NotShipped);
        std::fs::write(dir.path().join("libtorch_cuda.so"), b"not an ELF file").unwrap();
        match load_cuda_backend(dir.path()) {
            CudaLoad::Failed(reason) => assert!(reason.contains("libtorch_cuda.so"), "{reason}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
