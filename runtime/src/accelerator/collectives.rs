//! The Accelerator's collectives on nested data: gathering (for metrics, dropping the samples the last
//! batch repeated), reducing, padding, and waiting for every process.

use super::Accelerator;
use crate::{Nested, Reduction, Result, slice_tensors};
use serde::{Serialize, de::DeserializeOwned};

impl Accelerator {
    /// Gathers `data` from every rank, concatenated on the first dimension.
    pub fn gather<T: Nested>(&mut self, data: T) -> Result<T> {
        self.group().gather(data)
    }

    /// Gathers `data` for computing metrics: like [`gather`](Self::gather), but on the last batch of
    /// a data loader the samples duplicated to even out the ranks are dropped, so the result covers the
    /// dataset exactly.
    pub fn gather_for_metrics<T: Nested>(&mut self, data: T) -> Result<T> {
        let gathered = self.group().gather(data)?;
        let g = self.gradient.get();
        if g.at_end_of_dataloader() && g.active_remainder() > 0 {
            return slice_tensors(gathered, 0..g.active_remainder());
        }
        Ok(gathered)
    }

    /// [`gather_for_metrics`](Self::gather_for_metrics) for objects (every rank's list, flattened).
    pub fn gather_objects_for_metrics<T: Serialize + DeserializeOwned + Clone>(
        &mut self,
        items: &[T],
    ) -> Result<Vec<T>> {
        let mut all = self.group().gather_object(items)?;
        let g = self.gradient.get();
        if g.at_end_of_dataloader() && g.active_remainder() > 0 {
            all.truncate(g.active_remainder() as usize);
        }
        Ok(all)
    }

    /// Reduces `data` across ranks (the Accelerator's default is `Reduction::Sum`).
    pub fn reduce<T: Nested>(&mut self, data: T, reduction: Reduction, scale: f64) -> Result<T> {
        self.group().reduce(data, reduction, scale)
    }

    /// Pads `data` along `dim` to the largest size on any rank.
    pub fn pad_across_processes<T: Nested>(
        &mut self,
        data: T,
        dim: i64,
        pad_index: f64,
        pad_first: bool,
    ) -> Result<T> {
        self.group()
            .pad_across_processes(data, dim, pad_index, pad_first)
    }

    /// Waits for every process.
    pub fn wait_for_everyone(&mut self) -> Result<()> {
        self.group().barrier()
    }
}
