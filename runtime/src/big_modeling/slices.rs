//! Reading pieces of a checkpoint's tensors: a sharded model (FSDP) loads into each rank only its slice
//! of every parameter, so no process reads, or holds, the whole model.

use super::describe::{checkpoint_files, read_safetensors_entries};
use super::load::shape_mismatch;
use super::read::{ReadJob, Target, read_all, reader_threads};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Elements `start..start + len` of the flattened tensor `name`, whose whole shape must be `shape`,
/// wanted on `device` as `kind`.
pub(crate) struct SliceRequest {
    pub name: String,
    /// Other names the tensor may have in the checkpoint (a tied parameter's).
    pub aliases: Vec<String>,
    pub shape: Vec<i64>,
    pub start: i64,
    pub len: i64,
    pub device: Device,
    pub kind: Kind,
}

/// What [`read_slices`] found.
pub(crate) struct Slices {
    /// Per request, in order: the slice (one-dimensional), or `None` when no shard holds the tensor.
    pub values: Vec<Option<Tensor>>,
    /// Tensors of the checkpoint that no request named.
    pub unexpected: Vec<String>,
}

/// Reads the requested slices of `checkpoint` (a safetensors file, a sharded index or a folder): every
/// header is checked first (each requested tensor's whole shape, no tensor in two shards), then only the
/// requested bytes are read, in parallel, and cast to the requested kinds.
pub(crate) fn read_slices(checkpoint: &Path, requests: &[SliceRequest]) -> Result<Slices> {
    let shards = checkpoint_files(checkpoint)?;
    let wanted: HashMap<&str, usize> = requests
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            std::iter::once(r.name.as_str())
                .chain(r.aliases.iter().map(String::as_str))
                .map(move |n| (n, i))
        })
        .collect();
    let mut found: Vec<Option<(usize, Kind, u64)>> = vec![None; requests.len()];
    let mut found_as: Vec<String> = vec![String::new(); requests.len()];
    let mut unexpected = Vec::new();
    for (s, shard) in shards.iter().enumerate() {
        for e in read_safetensors_entries(shard)? {
            let Some(&i) = wanted.get(e.name.as_str()) else {
                unexpected.push(e.name);
                continue;
            };
            if e.meta.shape != requests[i].shape {
                return Err(shape_mismatch(
                    shard,
                    &e.name,
                    &e.meta.shape,
                    &requests[i].shape,
                ));
            }
            if found[i].is_some() && found_as[i] != e.name {
                // A tied parameter stored under two of its names: the first one read serves.
                continue;
            }
            if found[i].is_some() {
                return Err(Error::Checkpoint {
                    path: shard.clone(),
                    detail: format!("tensor {} is also in an earlier shard", e.name),
                });
            }
            found[i] = Some((s, e.meta.kind, e.start));
            found_as[i] = e.name.clone();
        }
    }
    unexpected.sort();
    let mut jobs = Vec::new();
    let mut read = Vec::with_capacity(requests.len());
    for (r, place) in requests.iter().zip(&found) {
        let Some((shard, kind, start)) = *place else {
            read.push(None);
            continue;
        };
        let size = kind.elt_size_in_bytes() as u64;
        let value = Tensor::f_empty([r.len], (kind, r.device)).map_err(|e| Error::Checkpoint {
            path: shards[shard].clone(),
            detail: format!(
                "making room for {} elements of {} on {:?}: {}",
                r.len,
                r.name,
                r.device,
                Error::torch("empty", e)
            ),
        })?;
        jobs.push(ReadJob {
            shard,
            name: r.name.clone(),
            start: start + r.start as u64 * size,
            len: r.len as u64 * size,
            target: Target::Tensor(value.shallow_clone()),
        });
        read.push(Some((shard, value)));
    }
    read_all(&shards, &jobs, reader_threads(), true)?;
    let mut values = Vec::with_capacity(read.len());
    for (r, got) in requests.iter().zip(read) {
        values.push(match got {
            None => None,
            Some((shard, t)) => Some(t.f_to_kind(r.kind).map_err(|e| Error::Checkpoint {
                path: shards[shard].clone(),
                detail: format!(
                    "casting {} to {:?}: {}",
                    r.name,
                    r.kind,
                    Error::torch("to", e)
                ),
            })?),
        });
    }
    Ok(Slices { values, unexpected })
}
