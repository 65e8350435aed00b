//! Accelerate's operations across processes, over nested data: gather, gather_object, broadcast,
//! broadcast_object_list, reduce, pad_across_processes, wait_for_everyone. With debug mode on, the
//! shapes and devices of every rank are compared first and a mismatch is an error on every rank.

use super::local::torch;
use super::nested::{Nested, map_tensors, tensors_of};
use crate::{Error, ProcessGroup, ReduceOp, Result};
use serde::{Serialize, de::DeserializeOwned};
use tch::{Device, Kind, Tensor};

/// How [`ProcessGroup::reduce`] combines values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Sum over ranks divided by the number of ranks (`utils.reduce`'s default).
    Mean,
    /// Sum over ranks (`Accelerator.reduce`'s default).
    Sum,
    /// Element-wise maximum.
    Max,
    /// No communication: every rank keeps its own values (Accelerate sums here, against its docs).
    None,
}

impl std::str::FromStr for Reduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            "max" => Ok(Reduction::Max),
            "none" => Ok(Reduction::None),
            _ => Err(hasten_core::Error::UnknownVariant {
                kind: "Reduction",
                value: s.to_owned(),
                expected: "mean, sum, max, none".into(),
            }
            .into()),
        }
    }
}

fn device_type(d: Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Mps => "mps",
        Device::Vulkan => "vulkan",
    }
}

impl ProcessGroup {
    /// Debug mode's check before a collective: gathers every rank's tensor shapes and device types and
    /// fails on every rank, listing each process, when they disagree. Does nothing unless debug mode is
    /// on and more than one process runs.
    fn verify<T: Nested>(&mut self, op: &str, data: &T) -> Result<()> {
        if !self.state().debug || self.world_size() == 1 {
            return Ok(());
        }
        let tensors = tensors_of(data);
        let shapes: Vec<Vec<i64>> = tensors.iter().map(|t| t.size()).collect();
        let devices: Vec<&str> = tensors.iter().map(|t| device_type(t.device())).collect();
        let all: Vec<(Vec<Vec<i64>>, Vec<String>)> = self.all_gather_object(&(
            shapes,
            devices.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ))?;
        let operation = format!("hasten::ops::{op}");
        let expected = device_type(self.state().device);
        for (rank, (_, devs)) in all.iter().enumerate() {
            if let Some(found) = devs.iter().find(|d| d.as_str() != expected) {
                return Err(Error::RankDeviceMismatch {
                    operation,
                    expected: expected.to_owned(),
                    rank,
                    found: found.clone(),
                });
            }
        }
        if all.iter().any(|(s, _)| *s != all[0].0) {
            return Err(Error::RankShapeMismatch {
                operation,
                shapes: all.into_iter().map(|(s, _)| s).collect(),
            });
        }
        Ok(())
    }

    /// Gathers every tensor of `data` from all ranks and concatenates along the first dimension (0-d
    /// tensors become 1-d), on every rank. Shapes must match across ranks (see
    /// [`pad_across_processes`](Self::pad_across_processes)).
    pub fn gather<T: Nested>(&mut self, data: T) -> Result<T> {
        self.verify("gather", &data)?;
        map_tensors(data, |t| {
            let t = if t.dim() == 0 {
                t.f_unsqueeze(0).map_err(torch("gather"))?
            } else {
                t
            };
            self.all_gather_cat(&t)
        })
    }

    /// Every rank's `obj`, in rank order, on every rank.
    pub fn all_gather_object<T: Serialize + DeserializeOwned>(
        &mut self,
        obj: &T,
    ) -> Result<Vec<T>> {
        let bytes = serde_json::to_vec(obj).map_err(|e| Error::Collective {
            op: "gather_object",
            detail: format!("cannot serialise the object: {e}"),
        })?;
        self.all_gather_bytes(&bytes)?
            .iter()
            .enumerate()
            .map(|(rank, b)| {
                serde_json::from_slice(b).map_err(|e| Error::Collective {
                    op: "gather_object",
                    detail: format!("process {rank}'s object does not read back: {e}"),
                })
            })
            .collect()
    }

    /// Accelerate's `gather_object`: every rank's list, flattened one level (`[rank]` on each of two
    /// ranks gives `[0, 1]`).
    pub fn gather_object<T: Serialize + DeserializeOwned + Clone>(
        &mut self,
        items: &[T],
    ) -> Result<Vec<T>> {
        Ok(self
            .all_gather_object(&items.to_vec())?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Copies rank `from_process`'s tensors into every rank's (returned as new tensors).
    pub fn broadcast_data<T: Nested>(&mut self, data: T, from_process: usize) -> Result<T> {
        self.verify("broadcast", &data)?;
        map_tensors(data, |t| {
            let mut out = t.f_contiguous().map_err(torch("broadcast"))?.copy();
            self.broadcast(&mut out, from_process)?;
            Ok(out)
        })
    }

    /// Replaces every rank's objects with those of `from_process`, in place (Accelerate's
    /// `broadcast_object_list`).
    pub fn broadcast_object_list<T: Serialize + DeserializeOwned>(
        &mut self,
        objects: &mut Vec<T>,
        from_process: usize,
    ) -> Result<()> {
        if from_process >= self.world_size() {
            return Err(Error::Collective {
                op: "broadcast_object_list",
                detail: format!(
                    "source process {from_process} is not in a group of {}",
                    self.world_size()
                ),
            });
        }
        let mine = if self.rank() == from_process {
            serde_json::to_vec(&*objects).map_err(|e| Error::Collective {
                op: "broadcast_object_list",
                detail: format!("cannot serialise the objects: {e}"),
            })?
        } else {
            Vec::new()
        };
        let all = self.all_gather_bytes(&mine)?;
        *objects = serde_json::from_slice(&all[from_process]).map_err(|e| Error::Collective {
            op: "broadcast_object_list",
            detail: format!("the objects do not read back: {e}"),
        })?;
        Ok(())
    }

    /// Reduces every tensor across ranks (Accelerate's `reduce`) and multiplies by `scale`. The inputs are
    /// left untouched; integer tensors cannot take a mean.
    pub fn reduce<T: Nested>(&mut self, data: T, reduction: Reduction, scale: f64) -> Result<T> {
        self.verify("reduce", &data)?;
        map_tensors(data, |t| {
            let mut out = t.f_contiguous().map_err(torch("reduce"))?.copy();
            match reduction {
                Reduction::None => {}
                Reduction::Sum => self.all_reduce(&mut out, ReduceOp::Sum)?,
                Reduction::Mean => self.all_reduce(&mut out, ReduceOp::Mean)?,
                Reduction::Max => self.all_reduce(&mut out, ReduceOp::Max)?,
            }
            if scale != 1.0 {
                out = out.f_mul_scalar(scale).map_err(torch("reduce"))?;
            }
            Ok(out)
        })
    }

    /// Pads every tensor along `dim` to the largest size any rank has, with `pad_index`, at the end (or
    /// the start with `pad_first`). A `dim` outside the tensor's dimensions leaves it unchanged.
    pub fn pad_across_processes<T: Nested>(
        &mut self,
        data: T,
        dim: i64,
        pad_index: f64,
        pad_first: bool,
    ) -> Result<T> {
        map_tensors(data, |t| self.pad_one(t, dim, pad_index, pad_first)).map_err(|e| match e {
            Error::RankShapeMismatch { .. } | Error::RankDeviceMismatch { .. } => {
                Error::ChainedOperation {
                    op: "pad_across_processes",
                    source: Box::new(e),
                }
            }
            other => other,
        })
    }

    fn pad_one(&mut self, t: Tensor, dim: i64, pad_index: f64, pad_first: bool) -> Result<Tensor> {
        let ndim = t.dim() as i64;
        if dim >= ndim || dim < -ndim {
            return Ok(t);
        }
        let dim = if dim < 0 { dim + ndim } else { dim };
        // Every rank's sizes, gathered as a [1, ndim] tensor like Accelerate does, so a rank whose tensor
        // has a different number of dimensions shows up in debug mode instead of hanging.
        let size = Tensor::from_slice(&t.size())
            .unsqueeze(0)
            .to_device(self.state().device);
        let sizes = self.gather(size)?.to_device(Device::Cpu);
        let max = sizes
            .f_select(1, dim)
            .and_then(|c| c.f_max())
            .map_err(torch("pad_across_processes"))?
            .int64_value(&[]);
        let own = t.size()[dim as usize];
        if max == own {
            return Ok(t);
        }
        let mut shape = t.size();
        shape[dim as usize] = max;
        let padded = Tensor::f_full(&shape, pad_index, (t.kind(), t.device()))
            .map_err(torch("pad_across_processes"))?;
        let start = if pad_first { max - own } else { 0 };
        padded
            .f_narrow(dim, start, own)
            .and_then(|mut region| region.f_copy_(&t))
            .map_err(torch("pad_across_processes"))?;
        Ok(padded)
    }

    /// Waits until every process reaches this point (Accelerate's `wait_for_everyone`).
    pub fn wait_for_everyone(&mut self) -> Result<()> {
        self.barrier()
    }
}

/// Kinds a mean can be taken of.
pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_parse() {
        assert_eq!("MEAN".parse::<Reduction>().unwrap(), Reduction::Mean);
        assert_eq!("none".parse::<Reduction>().unwrap(), Reduction::None);
        assert!("avg".parse::<Reduction>().is_err());
    }
}
