//! Data-parallel models: parameters start equal on every rank (broadcast from rank 0), and after each
//! synchronising backward the gradients are averaged across ranks in buckets of `bucket_cap_mb`, as
//! PyTorch's DistributedDataParallel does. tch has no autograd hooks, so the buckets are reduced after
//! the backward rather than during it.

use crate::{Error, ProcessGroup, ReduceOp, Result};
use tch::Tensor;

/// A model prepared by an [`Accelerator`](crate::Accelerator): pass it to `no_sync`,
/// `prepare_optimizer`, `clip_grad_norm_`, `unwrap_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelHandle(pub(crate) usize);

/// What the Accelerator keeps of a prepared model.
pub(crate) struct ModelEntry {
    /// Every variable by name (shallow handles on the VarStore's tensors), for saving and unwrapping.
    pub named: Vec<(String, Tensor)>,
    /// The trainable parameters, in the VarStore's order, and their names.
    pub params: Vec<Tensor>,
    pub names: Vec<String>,
    pub buckets: Vec<Vec<usize>>,
    /// One flat buffer per bucket, made on the first synchronisation; gradients become views into it so
    /// the all-reduce runs in place and the optimizer reads the averaged values without a copy back.
    pub flats: Vec<Tensor>,
    pub no_sync: bool,
}

impl ModelEntry {
    /// Registers a VarStore's variables.
    pub(crate) fn new(vs: &tch::nn::VarStore, bucket_cap_bytes: usize) -> Self {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vs.trainable_variables();
        let by_ptr: std::collections::HashMap<usize, String> = named
            .iter()
            .map(|(n, t)| (t.data_ptr() as usize, n.clone()))
            .collect();
        let names = params
            .iter()
            .map(|p| {
                by_ptr
                    .get(&(p.data_ptr() as usize))
                    .cloned()
                    .unwrap_or_else(|| "?".into())
            })
            .collect();
        let buckets = make_buckets(&params, bucket_cap_bytes);
        ModelEntry {
            named,
            params,
            names,
            buckets,
            flats: Vec::new(),
            no_sync: false,
        }
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
            if buffers || trainable.contains(&(t.data_ptr() as usize)) {
                group.broadcast(&mut t, 0)?;
            }
        }
        Ok(())
    })
}

/// Averages the gradients of `entry` across ranks, bucket by bucket, in place: each parameter's
/// gradient is (or is copied into, and then becomes) a view of its bucket's flat buffer.
pub(crate) fn average_gradients(
    group: &mut ProcessGroup,
    entry: &mut ModelEntry,
    find_unused: bool,
) -> Result<()> {
    if group.world_size() == 1 {
        return Ok(());
    }
    let torch = |e| Error::torch("gradient all-reduce", e);
    tch::no_grad(|| {
        if entry.flats.len() != entry.buckets.len() {
            entry.flats = entry
                .buckets
                .iter()
                .map(|b| {
                    let first = &entry.params[b[0]];
                    let numel: usize = b.iter().map(|&i| entry.params[i].numel()).sum();
                    Tensor::f_zeros([numel as i64], (first.kind(), first.device())).map_err(torch)
                })
                .collect::<Result<_>>()?;
        }
        for (bucket, flat) in entry.buckets.iter().zip(entry.flats.iter_mut()) {
            let mut offset = 0i64;
            for &i in bucket {
                let p = &entry.params[i];
                let n = p.numel() as i64;
                let mut view = flat
                    .f_narrow(0, offset, n)
                    .and_then(|v| v.f_view(p.size().as_slice()))
                    .map_err(torch)?;
                offset += n;
                let g = p.grad();
                if g.defined() && g.data_ptr() == view.data_ptr() {
                    continue; // already the bucket's view (accumulated in place)
                }
                if g.defined() {
                    view.f_copy_(&g).map_err(torch)?;
                } else if find_unused {
                    view.f_zero_().map(drop).map_err(torch)?;
                } else {
                    return Err(Error::Collective {
                        op: "gradient all-reduce",
                        detail: format!(
                            "parameter {} received no gradient on rank {} in this backward; if some parameters \
                             are unused, set DistributedDataParallelKwargs::find_unused_parameters",
                            entry.names[i],
                            group.rank()
                        ),
                    });
                }
                crate::optim::set_grad(p, &view)?;
            }
            group.all_reduce(flat, ReduceOp::Mean)?;
        }
        Ok(())
    })
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
