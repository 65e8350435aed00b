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
    for size in [32u32, 64] {
        let file = dir.join(format!("logo-{size}x{size}.png"));
        std::fs::write(&file, logo_png(size))
            .with_context(|| format!("writing {}", file.display()))?;
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

/// The logo: an orange square with a white "h", as an RGBA PNG of `size`×`size`.
pub fn logo_png(size: u32) -> Vec<u8> {
    // A 5×7 "h"; each glyph cell becomes a block of `size/8` pixels, centred.
    const GLYPH: [&str; 7] = [
        "X....", "X....", "X.XX.", "XX..X", "X...X", "X...X", "X...X",
    ];
    let cell = size / 8;
    let (ox, oy) = ((size - 5 * cell) / 2, (size - 7 * cell) / 2);
    let mut raw = Vec::with_capacity((size * (size * 4 + 1)) as usize);
    for y in 0..size {
        raw.push(0); // filter: none
        for x in 0..size {
            let (gx, gy) = (
                x.wrapping_sub(ox) / cell.max(1),
                y.wrapping_sub(oy) / cell.max(1),
            );
            let on = x >= ox
                && y >= oy
                && gx < 5
                && gy < 7
                && GLYPH[gy as usize].as_bytes()[gx as usize] == b'X';
            raw.extend_from_slice(if on {
                &[255, 255, 255, 255]
            } else {
                &[232, 106, 29, 255]
            });
        }
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&size.to_be_bytes());
    ihdr.extend_from_slice(&size.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &zlib_stored(&raw));
    chunk(&mut png, b"IEND", &[]);
    png
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

/// zlib without compression (stored blocks): a logo is a few kilobytes either way.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_png_reference_value() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

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
    fn logos_are_well_formed_pngs() {
        let png = logo_png(32);
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]));
        // IHDR says 32×32.
        assert_eq!(&png[16..24], &[0, 0, 0, 32, 0, 0, 0, 32]);
    }
}
