//! `hasten-kernel install` / `uninstall`: the kernelspec Jupyter finds the kernel by.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// The kernelspec's directory name, which is the kernel name clients ask for.
pub const KERNEL_NAME: &str = "hasten";
/// What Jupyter shows in its kernel list.
pub const DISPLAY_NAME: &str = "Rust (hasten)";

/// Where a kernelspec goes, as `jupyter kernelspec install` understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The user's Jupyter data directory (`JUPYTER_DATA_DIR`, else `~/.local/share/jupyter`).
    User,
    /// The active Python environment (`VIRTUAL_ENV` or `CONDA_PREFIX`).
    SysPrefix,
    /// `<prefix>/share/jupyter`.
    Prefix(PathBuf),
}

/// The kernelspec directory for `target`.
pub fn kernel_dir(target: &Target) -> Result<PathBuf> {
    let data_dir = match target {
        Target::User => match std::env::var_os("JUPYTER_DATA_DIR").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home = std::env::var_os("HOME").context("HOME is not set: use --prefix")?;
                Path::new(&home).join(".local/share/jupyter")
            }
        },
        Target::SysPrefix => {
            let prefix = std::env::var_os("VIRTUAL_ENV")
                .or_else(|| std::env::var_os("CONDA_PREFIX"))
                .filter(|v| !v.is_empty());
            match prefix {
                Some(p) => Path::new(&p).join("share/jupyter"),
                None => bail!(
                    "--sys-prefix: no Python environment is active (neither VIRTUAL_ENV nor \
                     CONDA_PREFIX is set); use --user or --prefix"
                ),
            }
        }
        Target::Prefix(p) => p.join("share/jupyter"),
    };
    Ok(data_dir.join("kernels").join(KERNEL_NAME))
}

/// The kernel.json for the binary at `exe`.
pub fn kernel_json(exe: &Path) -> serde_json::Value {
    serde_json::json!({
        "argv": [exe.display().to_string(), "--connection-file", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "rust",
        // Interrupts arrive as control messages, so the kernel can stop the cell's ranks and keep the
        // notebook's variables instead of being killed by a signal.
        "interrupt_mode": "message",
        "metadata": { "debugger": false }
    })
}

/// Writes the kernelspec (kernel.json and two logos) and returns its directory.
pub fn install(target: &Target) -> Result<PathBuf> {
    let dir = kernel_dir(target)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("finding this binary's path")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let json = serde_json::to_string_pretty(&kernel_json(&exe))?;
    let file = dir.join("kernel.json");
    std::fs::write(&file, json + "\n").with_context(|| format!("writing {}", file.display()))?;
    for (name, png) in LOGOS {
        let file = dir.join(name);
        std::fs::write(&file, png).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(dir)
}

/// Removes the kernelspec; says so when there was none.
pub fn uninstall(target: &Target) -> Result<Option<PathBuf>> {
    let dir = kernel_dir(target)?;
    if !dir.join("kernel.json").exists() {
        return Ok(None);
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(Some(dir))
}

/// The logos Jupyter shows for the kernel (an orange square with a white "h"), shipped as files.
const LOGOS: [(&str, &[u8]); 2] = [
    ("logo-32x32.png", include_bytes!("../assets/logo-32x32.png")),
    ("logo-64x64.png", include_bytes!("../assets/logo-64x64.png")),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_json_runs_this_binary_with_the_connection_file() {
        let json = kernel_json(Path::new("/opt/bin/hasten-kernel"));
        assert_eq!(json["argv"][0], "/opt/bin/hasten-kernel");
        assert_eq!(json["argv"][2], "{connection_file}");
        assert_eq!(json["display_name"], "Rust (hasten)");
        assert_eq!(json["language"], "rust");
        assert_eq!(json["interrupt_mode"], "message");
    }

    #[test]
    fn prefix_installs_under_share_jupyter() {
        let dir = kernel_dir(&Target::Prefix("/p".into())).unwrap();
        assert_eq!(dir, Path::new("/p/share/jupyter/kernels/hasten"));
    }

    #[test]
    fn the_shipped_logos_are_pngs_of_their_named_size() {
        for (name, png) in LOGOS {
            let size: u32 = name[5..7].parse().unwrap();
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name}");
            // IHDR: width and height.
            assert_eq!(png[16..20], size.to_be_bytes(), "{name}");
            assert_eq!(png[20..24], size.to_be_bytes(), "{name}");
        }
    }
}
