//! Collectives within parts of the job: the ranks split into disjoint groups (HYBRID_SHARD's machines,
//! and the ranks holding the same shard on each machine), every rank taking part in each such collective
//! at the same point, each among its own group's members — what a dimension of PyTorch's device mesh
//! gives. On GPUs each group has its own NCCL communicator, created in the background when the split is
//! made (from a unique id its first member makes, handed round over the job's TCP links): the groups'
//! collectives run concurrently on their own links. CPU tensors go over the job's links: every rank's
//! bytes are gathered and each rank combines its own group's, in member order (small tensors, tests and
//! CPU training: the traffic is the world's, not the group's).

use super::cpu::{CpuBackend, on_cpu, reduce_into, tensor_bytes};
use super::lazy::LazyNccl;
use super::{Backend, ProcessGroup, ReduceOp, Trace, leader_nccl_id, own_nccl_id};
use crate::{Error, Result};
use tch::{Device, Tensor};

/// This rank's place in a split of the job into groups (made by [`ProcessGroup::split`]).
pub struct Partition {
    /// Every group's ranks, in order; each rank is in exactly one.
    groups: Vec<Vec<usize>>,
    /// The group holding this rank.
    mine: usize,
    /// This rank's position in its group.
    index: usize,
    /// This group's communicator, on a GPU when the group has more than one member.
    pub(super) nccl: Option<LazyNccl>,
    /// Whether CUDA tensors go through the groups' communicators (made on a GPU rank with NCCL).
    on_nccl: bool,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("members", &self.members())
            .field("index", &self.index)
            .field("nccl", &self.nccl.is_some())
            .finish()
    }
}

impl Partition {
    /// The ranks of this rank's group, in order.
    pub fn members(&self) -> &[usize] {
        &self.groups[self.mine]
    }

    /// This rank's position in its group.
    pub fn index(&self) -> usize {
        self.index
    }

    /// How many ranks this rank's group has.
    pub fn size(&self) -> usize {
        self.members().len()
    }

    /// Every group, in order.
    pub fn groups(&self) -> &[Vec<usize>] {
        &self.groups
    }

    /// Whether a collective on a tensor on `device` needs no exchange at all on this rank: its group is
    /// this rank alone and the others do not need it either — on NCCL each group has its own
    /// communicator, but over the job's links every rank's bytes are gathered, so every rank joins
    /// unless every group is a single rank.
    pub(super) fn alone(&self, device: Device) -> bool {
        self.groups.iter().all(|g| g.len() == 1)
            || (device.is_cuda() && self.on_nccl && self.size() == 1)
    }
}

impl ProcessGroup {
    /// Splits the job into `groups` (collective: every rank passes the same groups, which hold every
    /// rank exactly once). Collectives `*_within` the returned partition then run among each rank's own
    /// group, all groups at once.
    pub fn split(&mut self, groups: Vec<Vec<usize>>) -> Result<Partition> {
        let world = self.world_size();
        let invalid = |detail: String| Error::InvalidValue {
            name: "process group split".into(),
            detail,
        };
        let mut seen = vec![false; world];
        for group in &groups {
            if group.is_empty() {
                return Err(invalid(format!("{groups:?} has an empty group")));
            }
            for &r in group {
                if r >= world || std::mem::replace(&mut seen[r], true) {
                    return Err(invalid(format!(
                        "{groups:?}: rank {r} is {} (a split holds each of the {world} ranks once)",
                        if r >= world {
                            "not in the job"
                        } else {
                            "in two groups"
                        }
                    )));
                }
            }
        }
        if let Some(r) = seen.iter().position(|s| !s) {
            return Err(invalid(format!("{groups:?} leaves out rank {r}")));
        }
        // Every rank must describe the same split, or their collectives would not pair up.
        let described = format!("{groups:?}");
        let all = self.all_gather_bytes(described.as_bytes())?;
        if let Some(r) = all.iter().position(|d| d != described.as_bytes()) {
            return Err(invalid(format!(
                "rank {r} split the job into {}, rank {} into {described}",
                String::from_utf8_lossy(&all[r]),
                self.rank()
            )));
        }
        let rank = self.rank();
        let mine = groups
            .iter()
            .position(|g| g.contains(&rank))
            .unwrap_or_else(|| unreachable!("every rank was checked to be in a group"));
        let index = groups[mine]
            .iter()
            .position(|&r| r == rank)
            .unwrap_or_else(|| unreachable!("the group holds this rank"));
        let mut part = Partition {
            groups,
            mine,
            index,
            nccl: None,
            on_nccl: false,
        };
        if let (Device::Cuda(device), true) = (self.state.device, self.nccl.is_some()) {
            part.nccl = self.start_group_nccl(&part, device)?;
            part.on_nccl = true;
        }
        Ok(part)
    }

    /// Starts the communicator of this rank's group (none for a group of one): each group's first
    /// member makes an id (or says why it cannot), and every rank learns every id, so no rank waits
    /// in ncclCommInitRank for a peer that gave up.
    fn start_group_nccl(&mut self, part: &Partition, device: usize) -> Result<Option<LazyNccl>> {
        let leads = part.members()[0] == self.rank() && part.size() > 1;
        let all = self.all_gather_bytes(&own_nccl_id(leads))?;
        // Every group's leader is checked on every rank: one that could not make an id fails the whole
        // job here, not only its own group (the others would wait for it in their next collective).
        let mut internal = None;
        for group in part.groups().iter().filter(|g| g.len() > 1) {
            let id = leader_nccl_id(&all, group[0], &format!(" for the group {group:?}"))?;
            if group[0] == part.members()[0] {
                internal = Some(id);
            }
        }
        let Some(internal) = internal else {
            return Ok(None);
        };
        let trace = Trace::from_env(self.rank());
        Ok(Some(self.start_communicator(
            internal,
            part.index(),
            part.size(),
            device,
            trace,
        )))
    }

    /// [`ProcessGroup::all_reduce`] among this rank's group of `part`.
    pub fn all_reduce_within(
        &mut self,
        part: &mut Partition,
        t: &mut Tensor,
        op: ReduceOp,
    ) -> Result<()> {
        self.all_reduce_among(super::Among::Part(part), t, op)
    }

    /// [`ProcessGroup::all_gather_cat`] among this rank's group of `part`.
    pub fn all_gather_cat_within(&mut self, part: &mut Partition, t: &Tensor) -> Result<Tensor> {
        self.all_gather_cat_among(super::Among::Part(part), t)
    }

    /// [`ProcessGroup::reduce_scatter`] among this rank's group of `part`: this rank's share by its
    /// position in the group.
    pub fn reduce_scatter_within(
        &mut self,
        part: &mut Partition,
        t: &Tensor,
        op: ReduceOp,
    ) -> Result<Tensor> {
        self.reduce_scatter_among(super::Among::Part(part), t, op)
    }
}

/// A group's collectives on CPU tensors, over the job's links.
pub(super) struct Subset<'a> {
    pub(super) cpu: &'a mut CpuBackend,
    pub(super) members: &'a [usize],
    pub(super) index: usize,
}

impl Subset<'_> {
    /// Every member's tensor of `t`'s shape and dtype, in member order (every rank's bytes are
    /// gathered, so every member of a group sees the same mismatch and they fail together; other
    /// groups may pass other sizes).
    fn members_values(&mut self, t: &Tensor, op: &'static str) -> Result<Vec<Tensor>> {
        let all = self.cpu.all_gather_bytes(&tensor_bytes(t))?;
        let own = all[self.cpu.rank()].len();
        if let Some(&r) = self.members.iter().find(|&&r| all[r].len() != own) {
            return Err(Error::Collective {
                op,
                detail: format!(
                    "rank {r} passed {} bytes but rank {} passed {own}; the ranks of a group must \
                     pass the same shape and dtype",
                    all[r].len(),
                    self.cpu.rank()
                ),
            });
        }
        let (size, kind) = (t.size(), t.kind());
        self.members
            .iter()
            .map(|&r| {
                Tensor::f_from_data_size(&all[r], &size, kind).map_err(|e| Error::torch(op, e))
            })
            .collect()
    }
}

impl Backend for Subset<'_> {
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        if op == ReduceOp::Mean && !crate::ops::is_float(t.kind()) {
            return Err(Error::Collective {
                op: OP,
                detail: format!("a mean needs a floating-point tensor, got {:?}", t.kind()),
            });
        }
        let n = self.members.len() as f64;
        on_cpu(t, OP, |t| {
            let values = self.members_values(t, OP)?;
            let mut acc = values[0].copy();
            for other in &values[1..] {
                reduce_into(&mut acc, other, op)?;
            }
            if op == ReduceOp::Mean {
                acc.f_div_scalar_(n)
                    .map(drop)
                    .map_err(|e| Error::torch(OP, e))?;
            }
            t.f_copy_(&acc).map(drop).map_err(|e| Error::torch(OP, e))
        })
    }

    fn broadcast(&mut self, t: &mut Tensor, src: usize) -> Result<()> {
        const OP: &str = "broadcast";
        on_cpu(t, OP, |t| {
            let values = self.members_values(t, OP)?;
            t.f_copy_(&values[src])
                .map(drop)
                .map_err(|e| Error::torch(OP, e))
        })
    }

    fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        let cpu = t.to_device(Device::Cpu);
        let values = self.members_values(&cpu, OP)?;
        Tensor::f_cat(&values, 0)
            .and_then(|c| c.f_to_device(t.device()))
            .map_err(|e| Error::torch(OP, e))
    }

    fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mut full = t.copy();
        self.all_reduce(&mut full, op)?;
        let rows = t.size()[0] / self.members.len() as i64;
        full.f_narrow(0, self.index as i64 * rows, rows)
            .map(|s| s.copy())
            .map_err(|e| Error::torch("reduce_scatter", e))
    }
}
