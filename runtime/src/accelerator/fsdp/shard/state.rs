//! A sharded model in checkpoints: each rank's chunks (`save_state` under SHARDED_STATE_DICT, and
//! always for the optimizer's pieces), or the whole model read back into this rank's chunks.

use super::*;
use crate::accelerator::checkpoint::bad;
use std::path::Path;

impl ShardedModel {
    /// This rank's chunk of every unit, named `unit{k}`, the model on its pieces (gradients set aside
    /// by a gather go back first).
    pub(crate) fn shard_state(&mut self) -> Result<Vec<(String, Tensor)>> {
        self.reshard()?;
        Ok(self
            .units
            .iter()
            .enumerate()
            .map(|(k, u)| (format!("unit{k}"), u.shard.shallow_clone()))
            .collect())
    }

    /// An error unless `saved` (read from `path`) holds one chunk per unit of this model's sizes.
    pub(crate) fn check_shard_state(&self, saved: &[(String, Tensor)], path: &Path) -> Result<()> {
        if saved.len() != self.units.len() {
            return Err(bad(
                path,
                format!(
                    "holds {} FSDP units, this model has {} (another model, wrap policy or number \
                     of processes?)",
                    saved.len(),
                    self.units.len()
                ),
            ));
        }
        for (k, unit) in self.units.iter().enumerate() {
            let name = format!("unit{k}");
            let t = saved
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| bad(path, format!("tensor {name} is missing")))?;
            if t.size() != [unit.chunk] {
                return Err(bad(
                    path,
                    format!(
                        "tensor {name} (unit {:?}) has shape {:?}, this rank's chunk is [{}] (another \
                         number of processes?)",
                        unit.name,
                        t.size(),
                        unit.chunk
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Copies a checked [`shard_state`](Self::shard_state) into the chunks.
    pub(crate) fn load_shard_state(&mut self, saved: &[(String, Tensor)]) -> Result<()> {
        self.reshard()?;
        tch::no_grad(|| {
            for (k, unit) in self.units.iter().enumerate() {
                let name = format!("unit{k}");
                if let Some((_, t)) = saved.iter().find(|(n, _)| *n == name) {
                    unit.shard
                        .shallow_clone()
                        .f_copy_(t)
                        .map_err(torch("load_state"))?;
                }
            }
            Ok(())
        })
    }

    /// An error unless `full` (the whole model by name, read from `path`) holds every parameter of the
    /// units with its shape.
    pub(crate) fn check_full_state(&self, full: &[(String, Tensor)], path: &Path) -> Result<()> {
        for unit in &self.units {
            for (i, name) in unit.names.iter().enumerate() {
                let t = full
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| bad(path, format!("tensor {name} is missing")))?;
                if t.size() != unit.shapes[i] {
                    return Err(bad(
                        path,
                        format!(
                            "tensor {name} has shape {:?}, the model's is {:?}",
                            t.size(),
                            unit.shapes[i]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Puts this rank's slice of a checked whole model into the chunks (any number of processes
    /// wrote it).
    pub(crate) fn load_full_state(&mut self, full: &[(String, Tensor)]) -> Result<()> {
        self.reshard()?;
        let (rank, world) = (self.rank, self.world);
        tch::no_grad(|| {
            for unit in &self.units {
                let mut parts = Vec::with_capacity(unit.names.len() + 1);
                for name in &unit.names {
                    if let Some((_, t)) = full.iter().find(|(n, _)| n == name) {
                        parts.push(
                            t.f_to_device(unit.shard.device())
                                .and_then(|t| t.f_to_kind(unit.shard.kind()))
                                .and_then(|t| t.f_reshape([-1]))
                                .map_err(torch("load_state"))?,
                        );
                    }
                }
                let flat = padded_flat(parts, unit.chunk * world, "load_state")?;
                unit.shard
                    .shallow_clone()
                    .f_copy_(&flat.narrow(0, rank * unit.chunk, unit.chunk))
                    .map_err(torch("load_state"))?;
            }
            Ok(())
        })
    }
}
