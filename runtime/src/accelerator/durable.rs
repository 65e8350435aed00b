//! Checkpoints that survive a kill at any point: a checkpoint is written into a hidden staging folder
//! beside its destination, every file and the folder are flushed to the disk, and only then does the
//! folder take its name, in one atomic rename (an atomic exchange when a checkpoint of that name is
//! being replaced). A reader therefore finds either the previous checkpoint or the new one, whole,
//! never a mix; old checkpoints are rotated out only after the new one is in place.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The staging folder of `dir`: hidden (`.{name}.partial`) so that it never counts as a checkpoint, the
/// same name on every rank so they all write into it.
pub(crate) fn staging(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!(".{name}.partial"))
}

/// True for the hidden entries hasten uses while writing (never a checkpoint).
pub(crate) fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Flushes a file (or a folder's entries) to the disk.
pub(crate) fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("flushing to disk", path, e))
}

/// A clean staging folder for `dir` (a killed save may have left one).
pub(crate) fn prepare(dir: &Path) -> Result<PathBuf> {
    let stage = staging(dir);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).map_err(|e| Error::io("removing", &stage, e))?;
    }
    std::fs::create_dir_all(&stage).map_err(|e| Error::io("creating", &stage, e))?;
    Ok(stage)
}

/// Gives the complete staging folder its name: renamed into place, or exchanged with the checkpoint it
/// replaces (which is then removed). The parent folder is flushed so the new name survives a crash.
pub(crate) fn publish(dir: &Path) -> Result<()> {
    let stage = staging(dir);
    sync(&stage)?;
    if dir.exists() {
        exchange(&stage, dir)?;
        // `stage` now holds the previous checkpoint.
        std::fs::remove_dir_all(&stage).map_err(|e| Error::io("removing", &stage, e))?;
    } else {
        std::fs::rename(&stage, dir).map_err(|e| Error::io("renaming into place", dir, e))?;
    }
    if let Some(parent) = dir.parent() {
        sync(parent)?;
    }
    Ok(())
}

/// Swaps two folders atomically (Linux's renameat2 with RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(|e| {
        Error::io(
            "exchanging the new checkpoint with",
            b,
            std::io::Error::from(e),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        assert_eq!(staging(&dir), root.path().join(".ckpt.partial"));
        for round in 0..2 {
            let stage = prepare(&dir).unwrap();
            std::fs::write(stage.join("state.json"), format!("{round}")).unwrap();
            assert_eq!(
                dir.join("state.json").exists(),
                round > 0,
                "nothing visible yet"
            );
            publish(&dir).unwrap();
            assert_eq!(
                std::fs::read_to_string(dir.join("state.json")).unwrap(),
                round.to_string()
            );
            assert!(!staging(&dir).exists());
        }
        assert!(is_hidden(&staging(&dir)));
        assert!(!is_hidden(&dir));
    }
}
