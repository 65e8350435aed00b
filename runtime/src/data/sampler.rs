//! Samplers: which dataset indices come in which order, grouped into batches.

/// `torch.randperm(len, generator=torch.Generator().manual_seed(seed))`: libtorch's own algorithm on a
/// generator of its own (the global one is untouched), so the order is the one PyTorch draws.
fn randperm(len: usize, seed: u64) -> Vec<usize> {
    let n = i64::try_from(len).unwrap_or(i64::MAX);
    let perm = crate::shim::randperm(n, seed).unwrap_or_else(|| {
        panic!("libtorch could not draw a permutation of {len} indices (see its message above)")
    });
    Vec::<i64>::try_from(&perm)
        .unwrap_or_default()
        .into_iter()
        .map(|i| i as usize)
        .collect()
}

/// The order in which a map-style dataset's indices are visited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sampler {
    /// `0, 1, …, len-1`.
    Sequential {
        /// Number of samples.
        len: usize,
    },
    /// A permutation drawn from `seed + epoch` exactly as Accelerate's `SeedableRandomSampler` draws it
    /// (`torch.randperm` on a CPU generator seeded `initial_seed + epoch`): every rank that shares the
    /// seed and epoch draws the same order, each epoch a different one, and a Python Accelerate loader
    /// with the same seed visits the same samples.
    Random {
        /// Number of samples.
        len: usize,
        /// The initial seed (`data_seed`).
        seed: u64,
        /// The current epoch (see [`Sampler::set_epoch`]).
        epoch: u64,
    },
}

impl Sampler {
    /// Number of indices it yields.
    pub fn len(&self) -> usize {
        match self {
            Sampler::Sequential { len } | Sampler::Random { len, .. } => *len,
        }
    }

    /// True when it yields nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the epoch, which changes a random sampler's order.
    pub fn set_epoch(&mut self, new_epoch: u64) {
        if let Sampler::Random { epoch, .. } = self {
            *epoch = new_epoch;
        }
    }

    /// The indices, in order.
    pub fn indices(&self) -> Vec<usize> {
        match *self {
            Sampler::Sequential { len } => (0..len).collect(),
            Sampler::Random { len, seed, epoch } => randperm(len, seed.wrapping_add(epoch)),
        }
    }
}

/// Anything that yields batches of indices (PyTorch's batch sampler).
pub trait BatchSource: Send {
    /// The fixed batch size, or `None` when batches have varying sizes.
    fn batch_size(&self) -> Option<usize>;
    /// Whether a short last batch is dropped.
    fn drop_last(&self) -> bool;
    /// The batches of one epoch.
    fn batches(&self) -> Vec<Vec<usize>>;
    /// Number of batches in one epoch.
    fn len(&self) -> usize {
        self.batches().len()
    }
    /// True when an epoch has no batch.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Propagates the epoch to a random sampler.
    fn set_epoch(&mut self, _epoch: u64) {}
}

/// Groups a sampler's indices into batches of `batch_size` (PyTorch's `BatchSampler`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSampler {
    /// The index order.
    pub sampler: Sampler,
    /// Indices per batch.
    pub batch_size: usize,
    /// Drop a short last batch.
    pub drop_last: bool,
}

impl BatchSampler {
    /// Batches of `batch_size` over `sampler`.
    pub fn new(sampler: Sampler, batch_size: usize, drop_last: bool) -> Self {
        BatchSampler {
            sampler,
            batch_size: batch_size.max(1),
            drop_last,
        }
    }
}

impl BatchSource for BatchSampler {
    fn batch_size(&self) -> Option<usize> {
        Some(self.batch_size)
    }

    fn drop_last(&self) -> bool {
        self.drop_last
    }

    fn batches(&self) -> Vec<Vec<usize>> {
        self.sampler
            .indices()
            .chunks(self.batch_size)
            .filter(|c| !self.drop_last || c.len() == self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    fn len(&self) -> usize {
        let n = self.sampler.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    fn set_epoch(&mut self, epoch: u64) {
        self.sampler.set_epoch(epoch);
    }
}

/// Batches given explicitly, possibly of different sizes (a "dynamic" batch sampler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedBatches(pub Vec<Vec<usize>>);

impl BatchSource for FixedBatches {
    fn batch_size(&self) -> Option<usize> {
        None
    }
    fn drop_last(&self) -> bool {
        false
    }
    fn batches(&self) -> Vec<Vec<usize>> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_lengths() {
        let b = BatchSampler::new(Sampler::Sequential { len: 7 }, 3, false);
        assert_eq!(b.batches(), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(b.len(), 3);
        let d = BatchSampler::new(Sampler::Sequential { len: 7 }, 3, true);
        assert_eq!(d.batches().len(), 2);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn seeded_random_order_depends_on_seed_plus_epoch() {
        let mut a = Sampler::Random {
            len: 50,
            seed: 42,
            epoch: 0,
        };
        let b = Sampler::Random {
            len: 50,
            seed: 42,
            epoch: 0,
        };
        assert_eq!(
            a.indices(),
            b.indices(),
            "same seed and epoch, same order on every rank"
        );
        let first = a.indices();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "a permutation");
        a.set_epoch(1);
        assert_ne!(a.indices(), first);
        // seed 41 at epoch 1 is seed 42 at epoch 0, as in Accelerate (seed + epoch).
        let c = Sampler::Random {
            len: 50,
            seed: 41,
            epoch: 1,
        };
        assert_eq!(c.indices(), first);
    }

    #[test]
    fn permutations_are_pytorchs() {
        // torch.randperm(n, generator=torch.Generator().manual_seed(s)), as Accelerate 1.15's
        // SeedableRandomSampler draws them (set_seed(42): epochs 0, 1, 2 use seeds 42, 43, 44).
        let order = |len, seed, epoch| Sampler::Random { len, seed, epoch }.indices();
        assert_eq!(order(10, 42, 0), [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]);
        assert_eq!(order(10, 42, 1), [8, 4, 9, 0, 5, 1, 6, 7, 2, 3]);
        assert_eq!(order(10, 42, 2), [2, 6, 3, 8, 7, 9, 1, 4, 5, 0]);
        assert_eq!(order(7, 42, 0), [1, 6, 3, 5, 4, 0, 2]);
        assert_eq!(order(7, 42, 1), [3, 1, 2, 4, 5, 0, 6]);
        assert_eq!(order(10, 123, 0), [2, 0, 8, 1, 3, 7, 4, 9, 5, 6]);
        // The global generator is left alone.
        tch::manual_seed(5);
        let before = tch::Tensor::randint(1000, [4], (tch::Kind::Int64, tch::Device::Cpu));
        tch::manual_seed(5);
        let _ = order(100, 1, 0);
        let after = tch::Tensor::randint(1000, [4], (tch::Kind::Int64, tch::Device::Cpu));
        assert!(before.equal(&after));
    }
}
