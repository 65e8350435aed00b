//! A sharded model's state: the whole model gathered (state dicts, FULL_STATE_DICT checkpoints), each
//! rank's chunks (`save_state` under SHARDED_STATE_DICT, and always for the optimizer's pieces), or a
//! whole-model checkpoint of which each rank reads only its slices (`load_state` of a FULL_STATE_DICT
//! checkpoint, `Accelerator::load_checkpoint_in_model`).

use super::*;
use crate::accelerator::checkpoint::bad;
use std::path::Path;

/// The name unit `k`'s chunk is saved under. The suffix names the layout (each parameter's rows), so a
/// chunk hasten wrote in the flat layout before (`unit{k}`, the same length when every parameter's rows
/// divide by the number of processes) is refused instead of read scrambled.
fn shard_key(k: usize) -> String {
    format!("unit{k}.rows")
}

impl ShardedModel {
    /// The whole model by name (collective): `named` (the model's variables) with every parameter's
    /// gathered value in place of its piece; buffers, which are not sharded, as they are.
    pub(crate) fn full_state_dict(
        &mut self,
        named: &[(String, Tensor)],
    ) -> Result<Vec<(String, Tensor)>> {
        self.full_state_dict_kept(named, true)
    }

    /// [`full_state_dict`](Self::full_state_dict) where `keep`; elsewhere this rank only takes part in
    /// the gathering and gets nothing (a rank that does not write the model holds no copy of it).
    pub(crate) fn full_state_dict_kept(
        &mut self,
        named: &[(String, Tensor)],
        keep: bool,
    ) -> Result<Vec<(String, Tensor)>> {
        let full = self.full_parameters(keep)?;
        if !keep {
            return Ok(Vec::new());
        }
        Ok(named
            .iter()
            .map(|(name, t)| {
                // A tied parameter's other names share its gathered value.
                let held = self
                    .aliases
                    .iter()
                    .find(|(alias, _)| alias == name)
                    .map_or(name, |(_, first)| first);
                let value = full.iter().find(|(n, _)| n == held).map_or(t, |(_, v)| v);
                (name.clone(), value.shallow_clone())
            })
            .collect())
    }

    /// Every parameter's full value by name, gathered (collective), leaving the model as it was.
    fn full_parameters(&mut self, keep: bool) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for unit in &self.units {
            // Offloaded chunks go to the GPU for the collective.
            let shard = unit
                .shard
                .f_to_device(unit.full.device())
                .map_err(torch("FSDP state dict"))?;
            let gathered = self
                .mesh
                .all_gather_cat(&shard)
                .map_err(|e| chained("FSDP state dict", e))?;
            if !keep {
                continue;
            }
            for (i, name) in unit.names.iter().enumerate() {
                // On the CPU, as Accelerate's get_state_dict offloads it: a second whole model on
                // every GPU would defeat the sharding.
                let t = unit
                    .gathered_param(&gathered, i, self.mesh.size())
                    .and_then(|v| v.f_to_device(tch::Device::Cpu))
                    .map_err(torch("FSDP state dict"))?
                    .copy();
                out.push((name.clone(), t));
            }
        }
        Ok(out)
    }

    /// This rank's chunk of every unit, named [`shard_key`], the model on its pieces (gradients set
    /// aside by a gather go back first).
    pub(crate) fn shard_state(&mut self) -> Result<Vec<(String, Tensor)>> {
        self.reshard()?;
        Ok(self
            .units
            .iter()
            .enumerate()
            .map(|(k, u)| (shard_key(k), u.shard.shallow_clone()))
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
            let name = shard_key(k);
            let flat = format!("unit{k}");
            let t = saved
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| {
                    bad(
                        path,
                        if saved.iter().any(|(n, _)| *n == flat) {
                            format!(
                                "holds {flat}, a unit's chunk in the flat layout hasten wrote before it \
                                 sharded each parameter by rows: load it with the hasten that wrote \
                                 it, or from a FULL_STATE_DICT checkpoint"
                            )
                        } else {
                            format!("tensor {name} is missing")
                        },
                    )
                })?;
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
        self.wait_before_host_writes();
        tch::no_grad(|| {
            for (k, unit) in self.units.iter().enumerate() {
                let name = shard_key(k);
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

    /// Loads `checkpoint` (a safetensors file, a sharded index or a folder) into this rank's chunks,
    /// reading only this rank's slice of every parameter; `named` (the model's variables) gives the
    /// buffers, which are read whole. Every header is checked and every slice read before the model
    /// changes. No collective: each rank reads its own bytes.
    pub(crate) fn load_checkpoint(
        &mut self,
        named: &[(String, Tensor)],
        checkpoint: &Path,
    ) -> Result<crate::big_modeling::LoadReport> {
        let read = self.read_slices(named, checkpoint)?;
        self.apply_slices(named, read, checkpoint)
    }

    /// Reads this rank's slice of every parameter of `checkpoint`, and the buffers of `named` whole
    /// (the first half of [`load_checkpoint`](Self::load_checkpoint)).
    pub(crate) fn read_slices(
        &self,
        named: &[(String, Tensor)],
        checkpoint: &Path,
    ) -> Result<SlicedRead> {
        use crate::big_modeling::SliceRequest;
        let rank = self.mesh.rank();
        let mut requests = Vec::new();
        let mut places = Vec::new();
        for (k, unit) in self.units.iter().enumerate() {
            for (i, name) in unit.names.iter().enumerate() {
                let (lo, len) = unit.piece(i, rank);
                let start = if len > 0 { unit.piece_from(i, rank) } else { 0 };
                let aliases = self
                    .aliases
                    .iter()
                    .filter(|(_, first)| first == name)
                    .map(|(alias, _)| alias.clone())
                    .collect();
                requests.push(SliceRequest {
                    name: name.clone(),
                    aliases,
                    shape: unit.shapes[i].clone(),
                    start,
                    len,
                    device: unit.shard.device(),
                    kind: unit.shard.kind(),
                });
                places.push(Some((k, lo, len)));
            }
        }
        for (name, t) in named {
            // Parameters (a tied one's other names included) were requested above; buffers whole.
            if self.units.iter().any(|u| u.names.contains(name))
                || self.aliases.iter().any(|(alias, _)| alias == name)
            {
                continue;
            }
            requests.push(SliceRequest {
                name: name.clone(),
                aliases: Vec::new(),
                shape: t.size(),
                start: 0,
                len: t.numel() as i64,
                device: t.device(),
                kind: t.kind(),
            });
            places.push(None);
        }
        let read = crate::big_modeling::read_slices(checkpoint, &requests)?;
        Ok(SlicedRead {
            names: requests.into_iter().map(|r| r.name).collect(),
            places,
            values: read.values,
            unexpected: read.unexpected,
        })
    }

    /// Copies what [`read_slices`](Self::read_slices) read into the chunks and buffers.
    pub(crate) fn apply_slices(
        &mut self,
        named: &[(String, Tensor)],
        read: SlicedRead,
        checkpoint: &Path,
    ) -> Result<crate::big_modeling::LoadReport> {
        self.reshard()?;
        self.wait_before_host_writes();
        let mut report = crate::big_modeling::LoadReport {
            unexpected: read.unexpected,
            ..Default::default()
        };
        let _no_grad = tch::no_grad_guard();
        for ((name, place), value) in read.names.into_iter().zip(read.places).zip(read.values) {
            let Some(value) = value else {
                report.missing.push(name);
                continue;
            };
            let target = match place {
                Some((k, lo, len)) => self.units[k].shard.narrow(0, lo, len),
                None => named
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, t)| t.view([-1]))
                    .expect("requested from the model's names"),
            };
            target
                .shallow_clone()
                .f_copy_(&value)
                .map_err(|e| bad(checkpoint, format!("copying {name}: {e}")))?;
            report.loaded.push(name);
        }
        report.missing.sort();
        Ok(report)
    }
}

/// This rank's slices of a checkpoint, read and not yet copied into the model.
pub(crate) struct SlicedRead {
    names: Vec<String>,
    /// Per name: a parameter's unit, start in the chunk and length; `None` for a buffer.
    places: Vec<Option<(usize, i64, i64)>>,
    values: Vec<Option<Tensor>>,
    unexpected: Vec<String>,
}

impl SlicedRead {
    /// The first parameter the checkpoint lacks (buffers may be missing).
    pub(crate) fn missing_parameter(&self) -> Option<&str> {
        self.names
            .iter()
            .zip(&self.places)
            .zip(&self.values)
            .find(|((_, place), value)| place.is_some() && value.is_none())
            .map(|((name, _), _)| name.as_str())
    }
}
