//! Data-parallel models: parameters start equal on every rank (broadcast from rank 0), and in each
//! synchronising backward the gradients are averaged across ranks in buckets of `bucket_cap_mb`, as
//! PyTorch's DistributedDataParallel does — during the backward, through gradient hooks (see
//! `reducer`).

use super::reducer::{self, Round, Slot};
use crate::distributed::CommStream;
use crate::{Error, ProcessGroup, Result};
use std::sync::Arc;
use tch::Tensor;

/// What the Accelerator keeps of a prepared model.
pub(crate) struct ModelEntry {
    /// Every variable by name (shallow handles on the VarStore's tensors), for saving and unwrapping.
    pub named: Vec<(String, Tensor)>,
    /// The trainable parameters, in the VarStore's order, and their names.
    pub params: Vec<Tensor>,
    pub names: Vec<String>,
    /// Other names of tied parameters: (alias, the name in `names`).
    pub aliases: Vec<(String, String)>,
    pub buckets: Vec<Vec<usize>>,
    /// One flat buffer per bucket, made on the first synchronisation; gradients become views into it so
    /// the all-reduce runs in place and the optimizer reads the averaged values without a copy back.
    pub flats: Vec<Tensor>,
    /// Each parameter's view of its bucket's flat buffer, shaped as the parameter.
    pub views: Vec<Tensor>,
    /// What the parameters' gradient hooks report to; `None` when the model runs alone or libtorch
    /// refused a hook (then the averaging happens after the backward).
    pub hooks: Option<Arc<Slot>>,
    /// The stream the buckets' NCCL all-reduces run on, for CUDA models.
    pub comm: Option<CommStream>,
    pub no_sync: bool,
    /// The model's sharding, under FSDP (then the fields above for averaging stay unused).
    pub fsdp: Option<super::fsdp::ShardedModel>,
}

impl ModelEntry {
    /// Registers a VarStore's variables.
    pub(crate) fn new(vs: &tch::nn::VarStore, bucket_cap_bytes: usize) -> Self {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        // A tied parameter counts once, under its first name; its other names are aliases.
        let params = crate::optim::distinct(vs.trainable_variables());
        let mut by_ptr: std::collections::HashMap<usize, String> = std::collections::HashMap::new();
        for (n, t) in &named {
            by_ptr
                .entry(t.data_ptr() as usize)
                .or_insert_with(|| n.clone());
        }
        let names: Vec<String> = params
            .iter()
            .map(|p| {
                by_ptr
                    .get(&(p.data_ptr() as usize))
                    .cloned()
                    .unwrap_or_else(|| "?".into())
            })
            .collect();
        let aliases = named
            .iter()
            .filter(|(_, t)| t.numel() > 0 && t.requires_grad())
            .filter_map(|(n, t)| {
                let first = by_ptr.get(&(t.data_ptr() as usize))?;
                (first != n && names.contains(first)).then(|| (n.clone(), first.clone()))
            })
            .collect();
        let buckets = make_buckets(&params, bucket_cap_bytes);
        ModelEntry {
            named,
            params,
            names,
            aliases,
            buckets,
            flats: Vec::new(),
            views: Vec::new(),
            hooks: None,
            comm: None,
            no_sync: false,
            fsdp: None,
        }
    }

    /// Registers the gradient hooks (in a group of more than one process).
    pub(crate) fn hook(&mut self, group: &ProcessGroup) {
        if group.world_size() > 1 && !self.params.is_empty() {
            let slot = Arc::new(Slot::default());
            if reducer::register_hooks(&self.params, &slot) {
                self.hooks = Some(slot);
            }
        }
    }

    /// Makes the flat bucket buffers, the parameters' views of them and (on a GPU) the communication
    /// stream, once.
    fn ensure_buffers(&mut self) -> Result<()> {
        if self.flats.len() == self.buckets.len() {
            return Ok(());
        }
        let torch = |e| Error::torch("gradient all-reduce", e);
        let mut views: Vec<Option<Tensor>> = (0..self.params.len()).map(|_| None).collect();
        let mut flats = Vec::with_capacity(self.buckets.len());
        for bucket in &self.buckets {
            let first = &self.params[bucket[0]];
            let numel: usize = bucket.iter().map(|&i| self.params[i].numel()).sum();
            let flat =
                Tensor::f_zeros([numel as i64], (first.kind(), first.device())).map_err(torch)?;
            let mut offset = 0i64;
            for &i in bucket {
                let p = &self.params[i];
                let n = p.numel() as i64;
                views[i] = Some(
                    flat.f_narrow(0, offset, n)
                        .and_then(|v| v.f_view(p.size().as_slice()))
                        .map_err(torch)?,
                );
                offset += n;
            }
            flats.push(flat);
        }
        let cuda = self.params.first().is_some_and(|p| p.device().is_cuda());
        if cuda && self.hooks.is_some() {
            self.comm = Some(CommStream::new(self.buckets.len())?);
        }
        self.views = views
            .into_iter()
            .map(|v| v.unwrap_or_else(|| Tensor::zeros([0], tch::kind::FLOAT_CPU)))
            .collect();
        self.flats = flats;
        Ok(())
    }
}

/// Groups parameters into buckets of at most `cap_bytes`, last parameters first (the order their
/// gradients become ready in a backward), never mixing dtypes or devices.
pub(crate) fn make_buckets(params: &[Tensor], cap_bytes: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0usize;
    let mut key = None;
    for i in (0..params.len()).rev() {
        let p = &params[i];
        let bytes = p.numel() * p.kind().elt_size_in_bytes();
        let this_key = (p.kind(), p.device());
        if !current.is_empty() && (size + bytes > cap_bytes || key != Some(this_key)) {
            buckets.push(std::mem::take(&mut current));
            size = 0;
        }
        key = Some(this_key);
        current.push(i);
        size += bytes;
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

/// Makes every rank's variables equal to rank 0's (parameters, and buffers when `buffers`).
pub(crate) fn broadcast_variables(
    group: &mut ProcessGroup,
    vs: &tch::nn::VarStore,
    buffers: bool,
) -> Result<()> {
    if group.world_size() == 1 {
        return Ok(());
    }
    let trainable: std::collections::HashSet<usize> = vs
        .trainable_variables()
        .iter()
        .map(|t| t.data_ptr() as usize)
        .collect();
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (_, mut t) in named {
            // A placeholder (FSDP materialises it later, the same on every rank) holds no values.
            if crate::layers::is_empty_placeholder(&t) {
                continue;
            }
            if buffers || trainable.contains(&(t.data_ptr() as usize)) {
                group.broadcast(&mut t, 0)?;
            }
        }
        Ok(())
    })
}

/// Runs `backward` with `entries`' gradients averaged across ranks: during it (hooks armed) when
/// `overlap`, and otherwise, or for whatever the hooks did not cover, right after it.
pub(crate) fn backward_with_averaging(
    group: &mut ProcessGroup,
    entries: &mut [&mut ModelEntry],
    find_unused: bool,
    overlap: bool,
    backward: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if group.world_size() == 1 {
        return backward();
    }
    for entry in entries.iter_mut() {
        entry.ensure_buffers()?;
    }
    // Each round is either installed in its model's hook slot (overlapped) or kept here (after).
    let mut rounds: Vec<(Option<Round>, Option<Arc<Slot>>)> = Vec::with_capacity(entries.len());
    for entry in entries.iter() {
        let round = Round::arm(group, entry);
        match entry.hooks.as_ref().filter(|_| overlap) {
            Some(slot) => {
                round.install(slot);
                rounds.push((None, Some(slot.clone())));
            }
            None => rounds.push((Some(round), None)),
        }
    }
    let outcome = backward();
    // Every hook has run once the backward returns: take the rounds back (disarming the hooks).
    for (round, slot) in rounds.iter_mut() {
        if let Some(slot) = slot {
            *round = Round::take(slot);
        }
    }
    outcome?;
    let mut result = Ok(());
    for ((round, _), entry) in rounds.into_iter().zip(entries.iter()) {
        if let Some(round) = round {
            match tch::no_grad(|| round.finish(find_unused, &entry.names)) {
                Ok(during) => crate::log::event!(
                    debug,
                    target: "hasten::ddp",
                    "hasten trace: rank {} backward: {during} of {} buckets all-reduced during the backward",
                    group.rank(),
                    entry.buckets.len()
                ),
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn buckets_run_backwards_and_respect_the_cap_and_dtype() {
        let p = |n: i64, k: Kind| Tensor::zeros([n], (k, Device::Cpu));
        // 4-byte floats: 100 + 100 + 300 elements; a 1000-byte cap fits two of the small ones.
        let params = vec![
            p(300, Kind::Float),
            p(100, Kind::Float),
            p(100, Kind::Float),
            p(10, Kind::Half),
        ];
        assert_eq!(
            make_buckets(&params, 1000),
            vec![vec![3], vec![2, 1], vec![0]]
        );
        assert_eq!(make_buckets(&params, 1 << 20), vec![vec![3], vec![2, 1, 0]]);
        assert!(make_buckets(&[], 10).is_empty());
    }
}
