//! Writing Accelerate's basic config, counting this machine's GPUs (the rest of the config file lives
//! in `hasten-core`).

use crate::{PrecisionType, Result};
use std::path::{Path, PathBuf};

/// Writes a basic config for this machine to `save_location` (default: [`crate::default_config_file`]),
/// as `accelerate config default` does, and returns its path. Refuses to replace an existing file.
///
/// The GPU count comes from [`crate::cuda_device_count`], so this initialises CUDA where present; the
/// launcher uses [`crate::write_basic_config_for`] with a count it read without doing so.
pub fn write_basic_config(
    mixed_precision: PrecisionType,
    save_location: Option<&Path>,
) -> Result<PathBuf> {
    Ok(crate::write_basic_config_for(
        mixed_precision,
        save_location,
        crate::cuda_device_count(),
    )?)
}
