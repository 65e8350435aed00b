//! Where a kernel keeps its files. Each running kernel has a session directory of its own (evcxr's crate
//! and the libraries of its cells). Compiled dependencies (hasten, tch, libtorch's C++ glue) live in one
//! cargo build directory under the cache, shared by every kernel and filled once by `hasten-kernel warm`,
//! so a new notebook recompiles none of them. Its path never changes: cargo's fingerprints record it.
//!
//! Every kernel's cell crate is named `ctx`, so cargo links all of them to one path in that shared
//! directory. The rustc wrapper ([`rustc_wrapper`]) takes a lock for each cell's compile and hands evcxr a
//! private copy of the result, so kernels running at once never load each other's cells.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Set, with `RUSTC_WRAPPER` naming this binary, for notebook builds; its value is the session directory.
pub const RUSTC_WRAPPER_VAR: &str = "HASTEN_KERNEL_RUSTC_WRAPPER";
/// Where cargo (through evcxr) tells the wrapper to write the path of the library evcxr should load.
const EVCXR_SO_PATH_VAR: &str = "EVCXR_EXECUTION_SO_PATH";

/// Runs rustc for cargo. For the cell crate: under an exclusive lock on the shared build directory,
/// compile, copy the library into this kernel's session directory and point evcxr at the copy.
pub fn rustc_wrapper(session_dir: &Path) -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let Some((rustc, rest)) = args.split_first() else {
        eprintln!("hasten-kernel: rustc wrapper called without a compiler");
        return 2;
    };
    let value_of = |name: &str| {
        rest.iter()
            .position(|a| a == name)
            .and_then(|i| rest.get(i + 1))
            .map(PathBuf::from)
    };
    let cell_out = match value_of("--crate-name") {
        Some(n) if n.as_os_str() == "ctx" => value_of("--out-dir"),
        _ => None,
    };
    let Some(out_dir) = cell_out else {
        let err =
            std::os::unix::process::CommandExt::exec(std::process::Command::new(rustc).args(rest));
        eprintln!("hasten-kernel: running {}: {err}", rustc.to_string_lossy());
        return 2;
    };
    let lock_path = out_dir.join(".hasten-kernel-cell.lock");
    let lock = match std::fs::File::create(&lock_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hasten-kernel: creating {}: {e}", lock_path.display());
            return 2;
        }
    };
    // Released when the process exits. Not taking it only loses the serialisation it gives: go on.
    let _ = rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive);
    let status = match std::process::Command::new(rustc).args(rest).status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hasten-kernel: running {}: {e}", rustc.to_string_lossy());
            return 2;
        }
    };
    if !status.success() {
        return status.code().unwrap_or(1);
    }
    let built = out_dir.join("libctx.so");
    if built.exists() {
        let cells = session_dir.join("cells");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let private = cells.join(format!("libctx-{nanos}.so"));
        let copied = std::fs::create_dir_all(&cells).and_then(|()| std::fs::copy(&built, &private));
        match (copied, std::env::var_os(EVCXR_SO_PATH_VAR)) {
            (Ok(_), Some(so_path_file)) => {
                if let Err(e) =
                    std::fs::write(&so_path_file, private.as_os_str().as_encoded_bytes())
                {
                    eprintln!(
                        "hasten-kernel: writing {}: {e}",
                        PathBuf::from(so_path_file).display()
                    );
                    return 2;
                }
            }
            (Err(e), _) => {
                eprintln!(
                    "hasten-kernel: copying {} to {}: {e}",
                    built.display(),
                    private.display()
                );
                return 2;
            }
            (Ok(_), None) => {}
        }
    }
    0
}

/// Paths one kernel works with.
#[derive(Debug, Clone)]
pub struct SessionPaths {
    /// hasten's source tree (the workspace root), whose `runtime/`, `launcher/` and `kernel/io/` notebooks
    /// depend on.
    pub source: PathBuf,
    /// Cargo's build directory, shared by all kernels (`hasten-kernel warm` fills it).
    pub shared_build: PathBuf,
    /// This kernel's directory (removed when the kernel exits): its cargo config and copies of its
    /// cells' libraries.
    pub session_dir: PathBuf,
    /// evcxr's crate, inside the session directory.
    pub crate_dir: PathBuf,
    /// The slot this kernel holds (see [`SessionPaths::create`]); released when the kernel exits.
    pub slot: usize,
    _slot_lock: std::sync::Arc<std::fs::File>,
    /// libtorch for building tch and for loading cells.
    pub libtorch: Option<PathBuf>,
}

/// `HASTEN_CACHE`, else `~/.cache/hasten` (as install/bootstrap.sh).
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("HASTEN_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    // XDG's cache folder first, as install/bootstrap.sh resolves it, so both find the same cache.
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("hasten");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("hasten")
}

/// hasten's source tree: `HASTEN_SOURCE`, else the tree this kernel was built from.
pub fn source_dir() -> PathBuf {
    match std::env::var_os("HASTEN_SOURCE").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    }
}

/// libtorch: `LIBTORCH`, else the one hasten was built with.
pub fn libtorch_dir() -> Option<PathBuf> {
    std::env::var_os("LIBTORCH")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let built = env!("HASTEN_KERNEL_BUILD_LIBTORCH");
            (!built.is_empty()).then(|| PathBuf::from(built))
        })
}

/// The Rust toolchain's library directory for this host (`rustc --print target-libdir`), where the
/// libstd that cells link is.
pub fn rust_libdir() -> Option<PathBuf> {
    let out = std::process::Command::new("rustc")
        .args(["--print", "target-libdir"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| PathBuf::from(text.trim()))
}

impl SessionPaths {
    /// Creates this kernel's session directory (and removes those of kernels that are gone).
    pub fn create() -> Result<SessionPaths> {
        let root = cache_root().join("kernel");
        let sessions = root.join("sessions");
        std::fs::create_dir_all(&sessions)
            .with_context(|| format!("creating {}", sessions.display()))?;
        remove_stale_sessions(&sessions);
        let session_dir = sessions.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&session_dir);
        let crate_dir = session_dir.join("crate");
        std::fs::create_dir_all(&crate_dir)
            .with_context(|| format!("creating {}", crate_dir.display()))?;
        let (slot, lock) = take_slot(&root.join("slots"))?;
        // Every kernel's cell crate is `ctx` 1.0.0, and cargo hashes a root package without its path:
        // kernels sharing the build directory would share the crate's fingerprint and take each other's
        // build as up to date. A per-slot profile setting gives each concurrent kernel a distinct hash
        // (and the same one again for the next kernel in that slot, which keeps its incremental state).
        let config_dir = session_dir.join(".cargo");
        std::fs::create_dir_all(&config_dir)?;
        let config = format!(
            "# Written by hasten-kernel for slot {slot}: see kernel/src/session.rs.\n\
             [profile.dev.package.ctx]\ncodegen-units = {}\n",
            16 + slot
        );
        std::fs::write(config_dir.join("config.toml"), config)
            .with_context(|| format!("writing {}", config_dir.display()))?;
        Ok(SessionPaths {
            source: source_dir(),
            shared_build: root.join("build"),
            session_dir,
            crate_dir,
            slot,
            _slot_lock: std::sync::Arc::new(lock),
            libtorch: libtorch_dir(),
        })
    }

    /// Puts the workspace's Cargo.lock in the session crate, so notebooks build against the exact
    /// versions hasten was tested with (and reuse the shared build directory's artifacts).
    pub fn seed_lock_file(&self) {
        let lock = self.source.join("Cargo.lock");
        if lock.is_file() {
            let _ = std::fs::copy(lock, self.crate_dir.join("Cargo.lock"));
        }
    }

    /// Removes the session directory.
    pub fn remove(&self) {
        if std::env::var_os("HASTEN_KERNEL_KEEP_SESSION").is_some() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.session_dir);
    }
}

/// The lowest slot no running kernel holds, locked (flock) for as long as the returned file lives.
fn take_slot(dir: &Path) -> Result<(usize, std::fs::File)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for slot in 0..256 {
        let path = dir.join(format!("slot-{slot}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let taken =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok();
        if taken {
            return Ok((slot, file));
        }
    }
    anyhow::bail!(
        "256 hasten kernels are running: no free slot in {}",
        dir.display()
    )
}

/// Session directories are named by the kernel's pid; those whose process is gone are left-overs.
fn remove_stale_sessions(sessions: &Path) {
    let Ok(entries) = std::fs::read_dir(sessions) else {
        return;
    };
    for entry in entries.flatten() {
        let alive = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
            // Signal 0 only checks that the process exists.
            .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
