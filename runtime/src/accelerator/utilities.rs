//! The Accelerator's process-level utilities: printing, ordering between processes, running on chosen
//! processes, splitting inputs, triggers, saving tensors, and synchronising generators.

use super::Accelerator;
use crate::{Error, Result};
use std::path::Path;
use tch::Tensor;

impl Accelerator {
    /// Prints on the local main process only.
    pub fn print(&self, text: impl std::fmt::Display) {
        if self.is_local_main_process() {
            println!("{text}");
        }
    }

    /// Runs `f` on the main process first, then on the others (downloads, preprocessing caches).
    pub fn main_process_first<R>(&mut self, f: impl FnOnce() -> R) -> Result<R> {
        let main = self.is_main_process();
        self.in_order(main, f)
    }

    /// Runs `f` on each node's local main process first, then on the node's other processes.
    pub fn local_main_process_first<R>(&mut self, f: impl FnOnce() -> R) -> Result<R> {
        let main = self.is_local_main_process();
        self.in_order(main, f)
    }

    fn in_order<R>(&mut self, first: bool, f: impl FnOnce() -> R) -> Result<R> {
        if !first {
            self.group().barrier()?;
        }
        let out = f();
        if first {
            self.group().barrier()?;
        }
        Ok(out)
    }

    /// Runs `f` on the main process only (Accelerate's `on_main_process`).
    pub fn on_main_process<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        self.is_main_process().then(f)
    }

    /// Runs `f` on each node's local main process only.
    pub fn on_local_main_process<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        self.is_local_main_process().then(f)
    }

    /// Runs `f` on the last process only.
    pub fn on_last_process<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        self.is_last_process().then(f)
    }

    /// Runs `f` on global rank `index` only.
    pub fn on_process<R>(&self, index: usize, f: impl FnOnce() -> R) -> Option<R> {
        (self.process_index() == index).then(f)
    }

    /// Runs `f` on local rank `index` only.
    pub fn on_local_process<R>(&self, index: usize, f: impl FnOnce() -> R) -> Option<R> {
        (self.local_process_index() == index).then(f)
    }

    /// This rank's contiguous part of `inputs` (Accelerate's `split_between_processes`): ranks below
    /// `len % P` get one more item; with `apply_padding` every rank gets as many, repeating the last item.
    pub fn split_between_processes<S: Splittable>(
        &self,
        inputs: &S,
        apply_padding: bool,
    ) -> Result<S> {
        inputs.split_for(self.process_index(), self.num_processes(), apply_padding)
    }

    /// Raises this process's trigger (early stopping): [`check_trigger`](Self::check_trigger) then
    /// reports it on every rank.
    pub fn set_trigger(&mut self) {
        self.trigger = true;
    }

    /// True on every rank if any rank raised its trigger since the last check; resets it.
    pub fn check_trigger(&mut self) -> Result<bool> {
        let mut flag = Tensor::from(f32::from(u8::from(self.trigger))).to_device(tch::Device::Cpu);
        self.group().all_reduce(&mut flag, crate::ReduceOp::Sum)?;
        let raised = flag.double_value(&[]) >= 1.0;
        if raised {
            self.trigger = false;
        }
        Ok(raised)
    }

    /// Saves named tensors as safetensors once per job (main process), or once per node with
    /// `ProjectConfiguration::save_on_each_node` (Accelerate's `save`). Returns whether this process wrote.
    pub fn save(&self, tensors: &[(String, Tensor)], path: &Path) -> Result<bool> {
        if !self.writes_files() {
            return Ok(false);
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("creating the folder of", parent, e))?;
        }
        let on_cpu: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous()))
            .collect();
        Tensor::write_safetensors(&on_cpu, path)
            .map_err(|e| Error::torch("save (safetensors)", e))?;
        Ok(true)
    }

    /// Whether this process writes what `save` writes: the main process, or each node's with
    /// `save_on_each_node`.
    pub(crate) fn writes_files(&self) -> bool {
        if self.project.save_on_each_node {
            self.is_local_main_process()
        } else {
            self.is_main_process()
        }
    }

    /// Makes every rank's random generators continue from rank 0's state, as Accelerate does: hasten's
    /// host generator, libtorch's CPU generator and (on GPUs) rank 0's GPU generator copied onto each
    /// rank's own GPU.
    pub fn synchronize_rng_states(&mut self) -> Result<()> {
        crate::random::synchronize_rng_states(&mut self.group.lock())
    }
}

/// Inputs [`Accelerator::split_between_processes`] can split: lists and tensors (by their first
/// dimension).
pub trait Splittable: Sized {
    /// Rank `rank`'s part of `self` among `world` ranks.
    fn split_for(&self, rank: usize, world: usize, apply_padding: bool) -> Result<Self>;
}

/// `[start, end)` of rank `rank` and the padded length, per Accelerate's rule.
fn bounds(len: usize, rank: usize, world: usize) -> (usize, usize, usize) {
    let (per, extra) = (len / world.max(1), len % world.max(1));
    let start = rank * per + rank.min(extra);
    let end = start + per + usize::from(rank < extra);
    (start, end, per + usize::from(extra > 0))
}

impl<T: Clone> Splittable for Vec<T> {
    fn split_for(&self, rank: usize, world: usize, apply_padding: bool) -> Result<Self> {
        let (start, end, padded) = bounds(self.len(), rank, world);
        let mut part = self[start.min(self.len())..end.min(self.len())].to_vec();
        if apply_padding {
            if let Some(last) = self.last() {
                while part.len() < padded {
                    part.push(last.clone());
                }
            }
        }
        Ok(part)
    }
}

impl Splittable for Tensor {
    fn split_for(&self, rank: usize, world: usize, apply_padding: bool) -> Result<Self> {
        let len = self.size().first().copied().unwrap_or(0) as usize;
        let (start, end, padded) = bounds(len, rank, world);
        let torch = |e| Error::torch("split_between_processes", e);
        let mut part = self
            .f_narrow(0, start as i64, (end - start) as i64)
            .map_err(torch)?;
        if apply_padding && part.size()[0] < padded as i64 && len > 0 {
            let last = self.f_narrow(0, len as i64 - 1, 1).map_err(torch)?;
            let missing = padded as i64 - part.size()[0];
            let reps: Vec<i64> = std::iter::once(missing)
                .chain(std::iter::repeat_n(1, self.dim() - 1))
                .collect();
            part =
                Tensor::f_cat(&[part, last.f_repeat(&reps).map_err(torch)?], 0).map_err(torch)?;
        }
        Ok(part)
    }
}

impl<T: Splittable> Splittable for std::collections::BTreeMap<String, T> {
    fn split_for(&self, rank: usize, world: usize, apply_padding: bool) -> Result<Self> {
        self.iter()
            .map(|(k, v)| {
                v.split_for(rank, world, apply_padding)
                    .map(|p| (k.clone(), p))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn splitting_follows_accelerate() {
        let abc = vec!["A", "B", "C"];
        assert_eq!(abc.split_for(0, 2, false).unwrap(), vec!["A", "B"]);
        assert_eq!(abc.split_for(1, 2, false).unwrap(), vec!["C"]);
        assert_eq!(abc.split_for(1, 2, true).unwrap(), vec!["C", "C"]);
        let r: Vec<usize> = (0..17).collect();
        for p in [2, 4, 8] {
            for rank in 0..p {
                let want = 17 / p + usize::from(rank < 17 % p);
                assert_eq!(
                    r.split_for(rank, p, false).unwrap().len(),
                    want,
                    "P={p} rank {rank}"
                );
            }
        }
        let t = Tensor::arange(8, (Kind::Int64, Device::Cpu)).view([2, 4]);
        assert_eq!(
            Vec::<i64>::try_from(t.split_for(1, 2, false).unwrap().flatten(0, -1)).unwrap(),
            vec![4, 5, 6, 7]
        );
        let mut m = std::collections::BTreeMap::new();
        m.insert("a".to_owned(), (1..=8).collect::<Vec<i32>>());
        assert_eq!(m.split_for(3, 4, false).unwrap()["a"], vec![7, 8]);
        let three = Tensor::arange(3, (Kind::Int64, Device::Cpu));
        let padded = three.split_for(1, 2, true).unwrap();
        assert_eq!(Vec::<i64>::try_from(&padded).unwrap(), vec![2, 2]);
    }
}
