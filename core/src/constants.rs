//! File names of Accelerate's `save_state` and `save_model`, so checkpoint folders are interchangeable
//! with Python's.

/// Stem of pickled PyTorch weights.
pub const MODEL_NAME: &str = "pytorch_model";
/// Stem of safetensors weights.
pub const SAFE_MODEL_NAME: &str = "model";
/// Stem of optimizer states (`optimizer.bin`, `optimizer_1.bin`, …).
pub const OPTIMIZER_NAME: &str = "optimizer";
/// Stem of scheduler states.
pub const SCHEDULER_NAME: &str = "scheduler";
/// Stem of sampler states.
pub const SAMPLER_NAME: &str = "sampler";
/// The fp16 gradient scaler's state.
pub const SCALER_NAME: &str = "scaler.pt";
/// Stem of per-rank RNG states (`random_states_{rank}.pkl`).
pub const RNG_STATE_NAME: &str = "random_states";
/// Unsharded pickled weights.
pub const WEIGHTS_NAME: &str = "pytorch_model.bin";
/// Unsharded safetensors weights.
pub const SAFE_WEIGHTS_NAME: &str = "model.safetensors";
/// Index of sharded pickled weights.
pub const WEIGHTS_INDEX_NAME: &str = "pytorch_model.bin.index.json";
/// Index of sharded safetensors weights.
pub const SAFE_WEIGHTS_INDEX_NAME: &str = "model.safetensors.index.json";
/// Pattern of safetensors shards; `{suffix}` is e.g. `-00001-of-00005`.
pub const SAFE_WEIGHTS_PATTERN_NAME: &str = "model{suffix}.safetensors";
/// Pattern of pickled shards.
pub const WEIGHTS_PATTERN_NAME: &str = "pytorch_model{suffix}.bin";

/// The shard suffix Accelerate (via huggingface_hub) uses: `-00001-of-00005` for the first of five.
pub fn shard_suffix(index: usize, total: usize) -> String {
    format!("-{:05}-of-{:05}", index + 1, total)
}

/// A shard's file name from a pattern and its position.
pub fn shard_file_name(pattern: &str, index: usize, total: usize) -> String {
    pattern.replace("{suffix}", &shard_suffix(index, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerate_names() {
        assert_eq!(MODEL_NAME, "pytorch_model");
        assert_eq!(SAFE_MODEL_NAME, "model");
        assert_eq!(OPTIMIZER_NAME, "optimizer");
        assert_eq!(SCHEDULER_NAME, "scheduler");
        assert_eq!(SAMPLER_NAME, "sampler");
        assert_eq!(SCALER_NAME, "scaler.pt");
        assert_eq!(RNG_STATE_NAME, "random_states");
        assert_eq!(WEIGHTS_NAME, "pytorch_model.bin");
        assert_eq!(SAFE_WEIGHTS_NAME, "model.safetensors");
        assert_eq!(WEIGHTS_INDEX_NAME, "pytorch_model.bin.index.json");
        assert_eq!(SAFE_WEIGHTS_INDEX_NAME, "model.safetensors.index.json");
    }

    #[test]
    fn shard_names() {
        assert_eq!(
            shard_file_name(SAFE_WEIGHTS_PATTERN_NAME, 0, 5),
            "model-00001-of-00005.safetensors"
        );
        assert_eq!(
            shard_file_name(WEIGHTS_PATTERN_NAME, 4, 5),
            "pytorch_model-00005-of-00005.bin"
        );
    }
}
