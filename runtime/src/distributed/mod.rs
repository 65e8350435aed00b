//! Collectives between the processes of a job.
//!
//! [`ProcessGroup::init`] performs the rendezvous described by the environment contract and picks a
//! backend once. Today that is the CPU backend (TCP, libtorch arithmetic); NCCL joins it behind the same
//! trait for CUDA tensors.

mod cpu;
mod rendezvous;
mod wire;

pub use rendezvous::{DEFAULT_RDZV_TIMEOUT, rdzv_timeout_from_env};

use crate::{ProcessState, Result};
use std::time::Duration;
use tch::Tensor;

/// How `all_reduce` combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise sum divided by the number of processes (floating-point tensors only).
    Mean,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
    /// Element-wise product.
    Product,
}

/// What a collective backend provides; one implementation per transport, chosen once at start-up.
pub(crate) trait Backend: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()>;
    fn broadcast(&mut self, t: &mut Tensor, src: usize) -> Result<()>;
    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    fn barrier(&mut self) -> Result<()>;
}

/// This process's membership of the job's process group.
pub struct ProcessGroup {
    backend: Box<dyn Backend>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

impl ProcessGroup {
    /// Joins the group described by `state` (rendezvous at MASTER_ADDR:MASTER_PORT), waiting at most
    /// the `HASTEN_RDZV_TIMEOUT` seconds (default 120) for every rank to arrive.
    pub fn init(state: &ProcessState) -> Result<Self> {
        Self::init_with_timeout(state, rdzv_timeout_from_env()?)
    }

    /// [`ProcessGroup::init`] with an explicit rendezvous timeout.
    pub fn init_with_timeout(state: &ProcessState, timeout: Duration) -> Result<Self> {
        let links = rendezvous::rendezvous(&state.contract, timeout)?;
        Ok(ProcessGroup {
            backend: Box::new(cpu::CpuBackend::new(links)),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.backend.rank()
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.backend.world_size()
    }

    /// Combines `t` across ranks in place; every rank ends with the same values.
    pub fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.backend.all_reduce(t, op)
    }

    /// Copies rank `src`'s `t` into every rank's `t` (same shape and dtype everywhere).
    pub fn broadcast(&mut self, t: &mut Tensor, src: usize) -> Result<()> {
        self.backend.broadcast(t, src)
    }

    /// Every rank's bytes, in rank order, on every rank.
    pub fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.backend.all_gather_bytes(bytes)
    }

    /// Waits until every rank has reached this point.
    pub fn barrier(&mut self) -> Result<()> {
        self.backend.barrier()
    }
}
