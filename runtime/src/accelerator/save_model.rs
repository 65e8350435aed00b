//! Accelerate's `save_model`: the model's whole weights (gathered from the shards under FSDP) written as
//! safetensors by the main process, split by size the way huggingface_hub's
//! `split_torch_state_dict_into_shards` splits them, with `model.safetensors.index.json` when there is
//! more than one file. [`Accelerator::load_checkpoint_in_model`] reads them back (under FSDP each rank
//! only its slices).

use super::{Accelerator, PreparedModel};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

impl Accelerator {
    /// Accelerate's `save_model(model, save_directory)` with its default `max_shard_size="10GB"`: see
    /// [`save_model_sharded`](Self::save_model_sharded).
    pub fn save_model<M>(
        &self,
        model: &PreparedModel<M>,
        save_directory: impl AsRef<Path>,
    ) -> Result<()> {
        self.save_model_sharded(model, save_directory, "10GB")
    }

    /// Writes the model's weights into `save_directory`: `model.safetensors`, or shards
    /// `model-00001-of-0000N.safetensors` of at most `max_shard_size` (`"10GB"`, `"500MB"`: decimal
    /// units, as huggingface_hub parses them; a tensor larger than that gets a file of its own) and
    /// `model.safetensors.index.json` (`metadata.total_size`, `weight_map`). Every process calls it
    /// (under FSDP the weights are gathered, a collective); the main process writes. Tensors sharing
    /// memory are written once, under the first name, as Accelerate's
    /// `clean_state_dict_for_safetensors` does. As in Accelerate, shards of an earlier save are not
    /// removed.
    pub fn save_model_sharded<M>(
        &self,
        model: &PreparedModel<M>,
        save_directory: impl AsRef<Path>,
        max_shard_size: &str,
    ) -> Result<()> {
        let dir = save_directory.as_ref();
        if dir.is_file() {
            return Err(Error::InvalidValue {
                name: "save_directory".into(),
                detail: format!(
                    "Provided path ({}) should be a directory, not a file",
                    dir.display()
                ),
            });
        }
        let max = parse_size_to_int(max_shard_size)?;
        // Under FSDP every rank takes part in gathering the model, and only the writing ones keep it.
        let writer = self.writes_files();
        let mut state = super::step::state_dict_kept(model, writer)?;
        if !writer {
            return Ok(());
        }
        if let Some((name, _)) = state
            .iter()
            .find(|(_, t)| crate::layers::is_empty_placeholder(t))
        {
            return Err(Error::InvalidValue {
                name: name.clone(),
                detail: "You can't save the model since some parameters are on the meta device \
                         (a shape-only placeholder)."
                    .into(),
            });
        }
        // PyTorch's state dict lists parameters in the order the module made them; buffers follow.
        let made = model.entry().names.clone();
        let rank = |n: &str| made.iter().position(|m| m == n).unwrap_or(usize::MAX);
        state.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
        let removed = drop_shared(&mut state);
        if !removed.is_empty() && self.is_main_process() {
            crate::log::event!(
                warn,
                target: "hasten::checkpoint",
                "hasten: warning: Removed shared tensor {removed:?} while saving. This should be OK, \
                 but check by verifying that you don't receive any warning while reloading"
            );
        }
        let shards = split_into_shards(&state, max);
        let total: u64 = state.iter().map(|(_, t)| bytes(t)).sum();
        let named = |names: &[usize]| -> Vec<(String, Tensor)> {
            names
                .iter()
                .map(|&i| (state[i].0.clone(), state[i].1.shallow_clone()))
                .collect()
        };
        if shards.len() <= 1 {
            let all: Vec<usize> = (0..state.len()).collect();
            self.save(&named(&all), &dir.join("model.safetensors"))?;
            return Ok(());
        }
        let n = shards.len();
        let mut weight_map = BTreeMap::new();
        for (k, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
            for &i in shard {
                weight_map.insert(state[i].0.clone(), file.clone());
            }
            self.save(&named(shard), &dir.join(&file))?;
        }
        {
            let index = serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": weight_map,
            });
            let text = serde_json::to_string_pretty(&index).expect("a map of strings serialises");
            let path = dir.join("model.safetensors.index.json");
            std::fs::write(&path, text + "\n").map_err(|e| Error::io("writing", &path, e))?;
        }
        Ok(())
    }
}

fn bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// huggingface_hub's `parse_size_to_int`: a number and one of TB, GB, MB, KB (powers of ten); a bare
/// number is bytes.
fn parse_size_to_int(size: &str) -> Result<u64> {
    let text = size.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n);
    }
    let bad = |detail: String| Error::InvalidValue {
        name: "max_shard_size".into(),
        detail,
    };
    let split = text.len().saturating_sub(2);
    let (number, unit) = (
        text.get(..split).unwrap_or(""),
        text.get(split..).unwrap_or(""),
    );
    let scale = match unit.to_ascii_uppercase().as_str() {
        "TB" => 1e12,
        "GB" => 1e9,
        "MB" => 1e6,
        "KB" => 1e3,
        _ => {
            return Err(bad(format!(
                "Unit '{}' not supported. Supported units are TB, GB, MB, KB. Got '{text}'.",
                unit.to_ascii_uppercase()
            )));
        }
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|e| bad(format!("Could not parse the size value from '{text}': {e}")))?;
    if !(value >= 0.0 && value.is_finite()) {
        return Err(bad(format!("'{text}' is not a size")));
    }
    Ok((value * scale) as u64)
}

/// Removes every tensor sharing memory with an earlier one (Accelerate's
/// `clean_state_dict_for_safetensors`); returns the names removed.
fn drop_shared(state: &mut Vec<(String, Tensor)>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut removed = Vec::new();
    state.retain(|(name, t)| {
        let fresh = t.numel() == 0 || seen.insert(t.data_ptr() as usize);
        if !fresh {
            removed.push(name.clone());
        }
        fresh
    });
    removed
}

/// The indices of `state` in each shard: in order, a new shard when the next tensor would pass `max`
/// bytes, and a tensor larger than `max` alone in a shard of its own (huggingface_hub's
/// `split_state_dict_into_shards_factory`).
fn split_into_shards(state: &[(String, Tensor)], max: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let (mut current, mut size) = (Vec::new(), 0u64);
    for (i, (_, t)) in state.iter().enumerate() {
        let b = bytes(t);
        if b > max {
            shards.push(vec![i]);
            continue;
        }
        if size + b > max {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += b;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: i64) -> (String, Tensor) {
        (format!("t{n}"), Tensor::zeros([n], tch::kind::FLOAT_CPU))
    }

    #[test]
    fn shards_split_as_huggingface_hub_splits_them() {
        // 4-byte floats: 40, 24, 80, 16, 40 bytes with a 64-byte limit. The tensor over the limit gets
        // its shard at once, before the one being filled (as in huggingface_hub).
        let state = vec![t(10), t(6), t(20), t(4), t(10)];
        assert_eq!(
            split_into_shards(&state, 64),
            [vec![2], vec![0, 1], vec![3, 4]]
        );
        assert_eq!(split_into_shards(&state, 1000), [vec![0, 1, 2, 3, 4]]);
        assert_eq!(parse_size_to_int("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size_to_int(" 1.5mb ").unwrap(), 1_500_000);
        assert_eq!(parse_size_to_int("123").unwrap(), 123);
        let err = parse_size_to_int("10GiB").unwrap_err().to_string();
        assert!(err.contains("Unit 'IB' not supported"), "{err}");
        assert!(parse_size_to_int("xGB").is_err());
    }

    #[test]
    fn shared_tensors_are_written_once() {
        let a = Tensor::ones([3], tch::kind::FLOAT_CPU);
        let mut state = vec![
            ("a".to_owned(), a.shallow_clone()),
            ("b".to_owned(), Tensor::ones([3], tch::kind::FLOAT_CPU)),
            ("tied".to_owned(), a),
        ];
        assert_eq!(drop_shared(&mut state), ["tied"]);
        assert_eq!(state.len(), 2);
    }
}
