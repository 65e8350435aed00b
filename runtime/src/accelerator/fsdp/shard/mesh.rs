//! Which ranks a sharded model's collectives run among. FULL_SHARD and SHARD_GRAD_OP shard over the
//! whole job. HYBRID_SHARD (and HYBRID_SHARD_ZERO2) shard over the processes of one machine and
//! replicate across machines, FSDP's 2-D mesh (replicate × shard): gathers and reduce-scatters stay on
//! the machine's fast links, and each reduce-scattered gradient chunk is then averaged with the ranks
//! holding the same chunk on the other machines — one all-reduce of 1/L of the gradients per rank
//! across machines, where FULL_SHARD over the whole job would send every gather across them.

use crate::distributed::{Among, CommStream, Group, Partition};
use crate::{Error, ReduceOp, Result};
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// The two splits of a hybrid mesh, shared by every model an Accelerator prepares (each split holds
/// its own NCCL communicators).
pub(crate) struct Hybrid {
    /// The ranks of this machine: parameters are sharded among them.
    shard: Partition,
    /// The ranks at this rank's place on every machine: they hold the same chunks.
    replicate: Partition,
}

impl Hybrid {
    /// Splits the job into groups of `per_machine` consecutive ranks sharing shards, and the replica
    /// groups across them (collective).
    pub(crate) fn split(group: &Group, per_machine: usize) -> Result<Arc<Mutex<Hybrid>>> {
        let world = group.world_size();
        // Every rank's own figure (its machine's LOCAL_WORLD_SIZE) is compared first, so a job whose
        // machines run different numbers of processes fails on every rank rather than in a split some
        // ranks never join.
        let all = group.all_gather_bytes(&(per_machine as u64).to_le_bytes())?;
        let sizes: Vec<u64> = all
            .iter()
            .map(|b| b.as_slice().try_into().map(u64::from_le_bytes).unwrap_or(0))
            .collect();
        if let Some(r) = sizes.iter().position(|&n| n != per_machine as u64) {
            return Err(Error::InvalidValue {
                name: "sharding_strategy HYBRID_SHARD".into(),
                detail: format!(
                    "rank {r} shards among {} processes, rank {} among {per_machine} (LOCAL_WORLD_SIZE): \
                     every machine must run the same number",
                    sizes[r],
                    group.rank()
                ),
            });
        }
        if per_machine == 0 || world % per_machine != 0 {
            return Err(Error::InvalidValue {
                name: "sharding_strategy HYBRID_SHARD".into(),
                detail: format!(
                    "{world} processes do not split into machines of {per_machine} \
                     (LOCAL_WORLD_SIZE): every machine must run the same number"
                ),
            });
        }
        let machines = world / per_machine;
        let shard: Vec<Vec<usize>> = (0..machines)
            .map(|m| (m * per_machine..(m + 1) * per_machine).collect())
            .collect();
        let replicate: Vec<Vec<usize>> = (0..per_machine)
            .map(|i| (0..machines).map(|m| m * per_machine + i).collect())
            .collect();
        group.with(|g| {
            Ok(Arc::new(Mutex::new(Hybrid {
                shard: g.split(shard)?,
                replicate: g.split(replicate)?,
            })))
        })
    }
}

/// A sharded model's view of the job: the ranks it shards over, and (hybrid) its replicas.
pub(crate) struct Mesh {
    group: Group,
    hybrid: Option<Arc<Mutex<Hybrid>>>,
    /// This rank's position among the ranks sharing the parameters, and how many there are.
    rank: i64,
    size: i64,
}

impl Mesh {
    /// Sharded over the whole job.
    pub(crate) fn flat(group: Group) -> Self {
        let (rank, size) = (group.rank() as i64, group.world_size() as i64);
        Mesh {
            group,
            hybrid: None,
            rank,
            size,
        }
    }

    /// Sharded within each machine of `hybrid`, replicated across them.
    pub(crate) fn hybrid(group: Group, hybrid: Arc<Mutex<Hybrid>>) -> Self {
        let (rank, size) = {
            let h = hybrid.lock().unwrap_or_else(|e| e.into_inner());
            (h.shard.index() as i64, h.shard.size() as i64)
        };
        Mesh {
            group,
            hybrid: Some(hybrid),
            rank,
            size,
        }
    }

    /// This rank's position among the ranks the parameters are sharded over.
    pub(crate) fn rank(&self) -> i64 {
        self.rank
    }

    /// How many ranks the parameters are sharded over.
    pub(crate) fn size(&self) -> i64 {
        self.size
    }

    /// The whole job.
    pub(crate) fn group(&self) -> &Group {
        &self.group
    }

    /// Runs `f` among the shard's ranks (the job, or this machine's ranks).
    fn on_shard<R>(&self, f: impl FnOnce(&mut crate::ProcessGroup, Among<'_>) -> R) -> R {
        let mut g = self.group.lock();
        match &self.hybrid {
            None => f(&mut g, Among::World),
            Some(h) => {
                let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
                f(&mut g, Among::Part(&mut h.shard))
            }
        }
    }

    /// Queues the all-gathers of `pairs` (each this rank's piece into the whole, see
    /// [`crate::ProcessGroup::all_gather_into_on_stream`]) on `comm`; false when they would not use NCCL
    /// (see [`Mesh::all_gather_cat`]).
    pub(crate) fn all_gather_into_on_stream(
        &self,
        pairs: &[(Tensor, Tensor)],
        comm: &CommStream,
    ) -> Result<bool> {
        self.on_shard(|g, among| g.all_gather_into_on_stream(among, pairs, comm))
    }

    /// Every shard rank's `t`, concatenated.
    pub(crate) fn all_gather_cat(&self, t: &Tensor) -> Result<Tensor> {
        self.on_shard(|g, among| g.all_gather_cat_among(among, t))
    }

    /// Queues the reduce-scatters of `pairs` (each a whole gradient into this rank's share of it, a
    /// view of `output`) on `comm`, then (hybrid) the average of `output` over the replicas; false,
    /// queuing nothing, when they would not use NCCL.
    pub(crate) fn reduce_scatter_on_stream(
        &self,
        pairs: &[(Tensor, Tensor)],
        output: &Tensor,
        op: ReduceOp,
        comm: &CommStream,
    ) -> Result<bool> {
        let mut g = self.group.lock();
        let Some(h) = &self.hybrid else {
            return g.reduce_scatter_on_stream(Among::World, pairs, op, comm);
        };
        let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
        let Hybrid { shard, replicate } = &mut *h;
        if !g.reduce_scatter_on_stream(Among::Part(shard), pairs, op, comm)? {
            return Ok(false);
        }
        if replicate.size() > 1 {
            let mut out = output.shallow_clone();
            // Queued after the reduce-scatters on the same stream: it reads the finished chunk. The
            // mean of the machines' means is the job's mean (every machine has as many ranks).
            if !g.all_reduce_on_stream(Among::Part(replicate), &mut out, op, comm, 0)? {
                return Err(Error::Collective {
                    op: "all_reduce",
                    detail: format!(
                        "rank {} has no NCCL communicator for its replicas {:?}",
                        g.rank(),
                        replicate.members()
                    ),
                });
            }
        }
        Ok(true)
    }

    /// Reduces `t` among the shard's ranks and returns this rank's share, averaged (hybrid) over the
    /// replicas.
    pub(crate) fn reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mut g = self.group.lock();
        let Some(h) = &self.hybrid else {
            return g.reduce_scatter(t, op);
        };
        let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
        let Hybrid { shard, replicate } = &mut *h;
        let mut out = g.reduce_scatter_within(shard, t, op)?;
        g.all_reduce_within(replicate, &mut out, op)?;
        Ok(out)
    }

    /// Combines `t` among the shard's ranks (each holds different pieces; replicas hold the same).
    pub(crate) fn all_reduce_shards(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.on_shard(|g, among| g.all_reduce_among(among, t, op))
    }
}
