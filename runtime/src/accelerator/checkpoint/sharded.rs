//! Checkpoints of FSDP-sharded models: every rank writes its chunks
//! (`pytorch_model_fsdp_{i}_rank{r}.safetensors`) and its pieces of every optimizer's state
//! (`optimizer_{i}_rank{r}.safetensors`); under FULL_STATE_DICT the main process also writes the whole
//! model as the usual model file, which `load_state` can read into any number of processes.

use super::{Accelerator, ModelEntry, lock_entry};
use crate::Result;
use tch::Tensor;

/// What `save_state` writes of one FSDP-sharded model: every rank its chunks, and under
/// FULL_STATE_DICT the main process the whole model too.
pub(super) struct ShardedSave {
    pub(super) shards: Vec<(String, Tensor)>,
    pub(super) full: Option<Vec<(String, Tensor)>>,
}

/// A model's weights as `load_state` read them.
pub(super) enum LoadedModel {
    Plain(Vec<(String, Tensor)>),
    /// This rank's chunks (SHARDED_STATE_DICT).
    Shards(Vec<(String, Tensor)>),
    /// This rank's slices of the whole-model file (FULL_STATE_DICT, or an unsharded run's checkpoint).
    Full(crate::accelerator::fsdp::SlicedRead),
}

pub(super) fn rank_file(stem: &str, i: usize, rank: usize) -> String {
    format!("{stem}_{i}_rank{rank}.safetensors")
}

impl Accelerator {
    /// Per prepared model: what `save_state` writes of it if it is sharded (collective: the whole
    /// model is gathered under FULL_STATE_DICT).
    pub(super) fn sharded_saves(&mut self) -> Result<Vec<Option<ShardedSave>>> {
        let full = self.fsdp.as_ref().is_some_and(|p| {
            p.state_dict_type == crate::accelerator::fsdp::StateDictType::FullStateDict
        });
        let mut out = Vec::with_capacity(self.models.len());
        for entry in &self.models {
            let mut entry = lock_entry(entry);
            let ModelEntry { named, fsdp, .. } = &mut *entry;
            let Some(sharded) = fsdp.as_mut() else {
                out.push(None);
                continue;
            };
            let shards = sharded.shard_state()?;
            let full = if full {
                Some(sharded.full_state_dict(named)?)
            } else {
                None
            };
            out.push(Some(ShardedSave { shards, full }));
        }
        Ok(out)
    }
}
