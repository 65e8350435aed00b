//! Collectives between the processes of a job.
//!
//! [`ProcessGroup::init`] performs the rendezvous described by the environment contract and sets up the
//! backends once: the CPU backend (TCP links, libtorch arithmetic) always, for CPU tensors and objects;
//! NCCL as well when this rank computes on a GPU, for CUDA tensors. Each tensor operation goes to the
//! backend of the tensor's device, so call sites carry no backend checks.

mod admission;
mod census;
mod cpu;
mod lazy;
mod nccl;
mod partition;
mod rendezvous;
mod shared;
mod shm;
mod stream;
mod watchdog;
mod wire;

pub(crate) use shm::hostname;
pub(crate) use stream::{CommStream, Mark};

pub use nccl::nccl_version;
pub use partition::Partition;
pub use shared::Group;

pub use rendezvous::{DEFAULT_RDZV_TIMEOUT, rdzv_timeout_from_env};

use crate::{Error, ProcessState, Result};
use census::Census;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a collective may wait for the other ranks by default (PyTorch's NCCL default): longer, and a
/// stuck rank holds the job; `HASTEN_COLLECTIVE_TIMEOUT` (seconds) or `InitProcessGroupKwargs::timeout`
/// changes it.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);

/// The collective timeout from `HASTEN_COLLECTIVE_TIMEOUT` (seconds), else [`DEFAULT_COLLECTIVE_TIMEOUT`].
pub fn collective_timeout_from_env() -> Result<Duration> {
    rendezvous::seconds_from_env("HASTEN_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT)
}

use tch::{Device, Tensor};

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

/// Which ranks a collective runs among: the whole job, or each rank's group of a [`Partition`].
pub(crate) enum Among<'a> {
    World,
    Part(&'a mut Partition),
}

impl Among<'_> {
    /// How many ranks take part (`world` for the whole job).
    fn size(&self, world: usize) -> usize {
        match self {
            Among::World => world,
            Among::Part(p) => p.size(),
        }
    }

    /// Whether this rank exchanges nothing for a collective on `device` (see [`Partition::alone`]).
    fn alone(&self, world: usize, device: Device) -> bool {
        match self {
            Among::World => world == 1,
            Among::Part(p) => p.alone(device),
        }
    }
}

/// The tensor collectives a backend provides.
pub(crate) trait Backend: Send {
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()>;
    fn broadcast(&mut self, t: &mut Tensor, src: usize) -> Result<()>;
    /// Every rank's `t` concatenated along dim 0 (same shape on every rank).
    fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor>;
    /// `t` (dim 0 = world × n) reduced across ranks; this rank's n rows.
    fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor>;
}

/// What this rank contributes to an NCCL id exchange: a new id when it leads a communicator (or why it
/// could not make one, after `ERR`), else nothing.
fn own_nccl_id(leads: bool) -> Vec<u8> {
    if !leads {
        return Vec::new();
    }
    match nccl::unique_id() {
        Ok(id) => id.internal.to_vec(),
        Err(e) => format!("ERR{e}").into_bytes(),
    }
}

/// The id rank `lead` contributed to an exchange (`all`, every rank's bytes), or the error it reported,
/// naming it (`context` says which communicator).
fn leader_nccl_id(all: &[Vec<u8>], lead: usize, context: &str) -> Result<[u8; 128]> {
    let bytes = &all[lead];
    bytes.as_slice().try_into().map_err(|_| Error::Collective {
        op: "nccl init",
        detail: format!(
            "rank {lead} could not start NCCL{context}: {}",
            String::from_utf8_lossy(bytes.strip_prefix(b"ERR").unwrap_or(bytes))
        ),
    })
}

/// How long each step of joining the group took: debug events of target `hasten::init` (shown by
/// hasten's fallback subscriber with `HASTEN_TRACE_INIT=1`).
#[derive(Clone, Copy)]
pub(crate) struct Trace {
    rank: usize,
    start: std::time::Instant,
}

impl Trace {
    fn from_env(rank: usize) -> Self {
        Trace {
            rank,
            start: std::time::Instant::now(),
        }
    }

    pub(crate) fn mark(&self, step: &str) {
        crate::log::event!(
            debug,
            target: "hasten::init",
            "hasten trace: rank {} {step} at {:.1} ms",
            self.rank,
            self.start.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// This process's membership of the job's process group.
pub struct ProcessGroup {
    state: ProcessState,
    cpu: cpu::CpuBackend,
    nccl: Option<lazy::LazyNccl>,
    /// Names the ranks a timed-out collective waited for (shared with the NCCL watchdog).
    census: Arc<Census>,
    /// How long a collective may wait for the others.
    timeout: Duration,
    /// Collectives started so far (the same count on every rank).
    seq: u64,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("nccl", &self.nccl.is_some())
            .finish()
    }
}

impl ProcessGroup {
    /// Joins the group described by `state` (rendezvous at MASTER_ADDR:MASTER_PORT), waiting at most
    /// the `HASTEN_RDZV_TIMEOUT` seconds (default 120) for every rank to arrive; collectives then wait at
    /// most `HASTEN_COLLECTIVE_TIMEOUT` seconds (default 600) for the others.
    pub fn init(state: &ProcessState) -> Result<Self> {
        Self::init_with_timeouts(
            state,
            rdzv_timeout_from_env()?,
            collective_timeout_from_env()?,
        )
    }

    /// [`ProcessGroup::init`] with an explicit rendezvous timeout.
    pub fn init_with_timeout(state: &ProcessState, timeout: Duration) -> Result<Self> {
        Self::init_with_timeouts(state, timeout, collective_timeout_from_env()?)
    }

    /// [`ProcessGroup::init`] with explicit timeouts for the rendezvous and for each collective. A
    /// collective that waits longer than `collective` for the other ranks fails on every rank that
    /// waited with [`Error::CollectiveTimeout`], naming the ranks that never arrived (on GPUs the process
    /// ends with that message, as under PyTorch's default NCCL error handling).
    pub fn init_with_timeouts(
        state: &ProcessState,
        rendezvous: Duration,
        collective: Duration,
    ) -> Result<Self> {
        hasten_core::mark_distributed_state_initialized();
        let trace = Trace::from_env(state.contract.rank);
        let (links, census) = rendezvous::rendezvous(&state.contract, rendezvous, collective)?;
        trace.mark("rendezvous");
        let mut group = ProcessGroup {
            state: state.clone(),
            cpu: cpu::CpuBackend::new(links),
            nccl: None,
            census: Arc::new(census),
            timeout: collective,
            seq: 0,
        };
        if state.use_distributed() {
            group.cpu.setup_shared_memory(state.contract.master_port)?;
            trace.mark("shared memory");
        }
        if let (Device::Cuda(index), true) = (state.device, state.use_distributed()) {
            group.nccl = Some(group.start_nccl(index, trace)?);
            // This thread computes on the rank's GPU too: make it current here, as Accelerate does with
            // torch.cuda.set_device, or libtorch's device guards would also create a context on GPU 0.
            nccl::set_device(index)?;
        }
        Ok(group)
    }

    fn start_nccl(&mut self, device: usize, trace: Trace) -> Result<lazy::LazyNccl> {
        // Rank 0 makes the id (or says why it cannot); everyone learns the outcome, so no rank waits
        // in ncclCommInitRank for a peer that gave up.
        let all = self.cpu.all_gather_bytes(&own_nccl_id(self.rank() == 0))?;
        let internal = leader_nccl_id(&all, 0, "")?;
        trace.mark("nccl unique id exchanged");
        Ok(self.start_communicator(internal, self.rank(), self.world_size(), device, trace))
    }

    /// Starts creating a communicator (this rank `index` of `size`) from the id `internal`, watched by
    /// a watchdog of its own that names missing ranks through this group's census.
    fn start_communicator(
        &self,
        internal: [u8; 128],
        index: usize,
        size: usize,
        device: usize,
        trace: Trace,
    ) -> lazy::LazyNccl {
        lazy::LazyNccl::start(
            nccl::UniqueId { internal },
            index,
            size,
            device,
            trace,
            watchdog::Watchdog::start(device, self.rank(), self.timeout, self.census.clone()),
            self.timeout,
        )
    }

    /// Runs one collective, counting it. A timeout from the TCP links (where every read and write waits
    /// at most the collective timeout) is completed here: the census names the ranks that never
    /// arrived, and the peers still listening are told.
    fn timed<R>(&mut self, op: &'static str, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        self.seq += 1;
        let started = Instant::now();
        let out = f(self);
        self.complete_timeout(op, started, out)
    }

    /// A collective's outcome; a timeout gets the census's missing ranks, and the peers still listening
    /// are told.
    fn complete_timeout<R>(
        &mut self,
        op: &'static str,
        started: Instant,
        out: Result<R>,
    ) -> Result<R> {
        match out {
            Err(Error::CollectiveTimeout { .. }) => {
                let waited_s = started.elapsed().as_secs_f64();
                let missing = self.census.missing_after_timeout();
                let e = Error::CollectiveTimeout {
                    op,
                    seq: self.seq,
                    waited_s,
                    missing,
                };
                self.cpu.tell_peers(&e);
                Err(e)
            }
            other => other,
        }
    }

    /// The collective timeout this group applies.
    pub fn collective_timeout(&self) -> Duration {
        self.timeout
    }

    /// The process state this group was built from.
    pub fn state(&self) -> &ProcessState {
        &self.state
    }

    /// Turns debug mode (cross-rank shape checks before gather, broadcast, reduce and padding) on or
    /// off for this group; it starts as `ACCELERATE_DEBUG_MODE` says. Every rank must set the same.
    pub fn set_debug(&mut self, on: bool) {
        self.state.debug = on;
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.state.contract.rank
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.state.contract.world_size
    }

    /// True when this rank computes on a GPU and CUDA tensors go (or will go, once NCCL is up) through
    /// NCCL.
    pub fn uses_nccl(&self) -> bool {
        self.nccl.is_some()
    }

    /// True once every rank's NCCL communicator is up and small CUDA collectives use it too.
    pub fn nccl_active(&self) -> bool {
        self.nccl.as_ref().is_some_and(|l| l.agreed())
    }

    /// Runs a tensor collective among `among` on the right backend: TCP for CPU tensors; NCCL for CUDA
    /// tensors once all ranks agree it is ready, or at once (waiting for it) for large ones; TCP for
    /// small CUDA tensors before that, followed by a vote on switching (see `lazy`). A partition's
    /// group waits for its own communicator for every CUDA tensor (the same rule on every rank).
    fn on_backend<R>(
        &mut self,
        among: Among<'_>,
        op: &'static str,
        device: Device,
        bytes: usize,
        f: impl FnOnce(&mut dyn Backend) -> Result<R>,
    ) -> Result<R> {
        let seq = self.seq + 1;
        if let Among::Part(part) = among {
            return self.timed(op, |g| {
                if let Some(lazy) = part.nccl.as_mut().filter(|_| device.is_cuda()) {
                    let (nccl, watchdog) = lazy.wait_with_watchdog()?;
                    let out = f(nccl)?;
                    watchdog.watch(std::ptr::null_mut(), op, seq);
                    return Ok(out);
                }
                let index = part.index();
                f(&mut partition::Subset {
                    cpu: &mut g.cpu,
                    members: part.members(),
                    index,
                })
            });
        }
        self.timed(op, |g| {
            let Some(lazy) = g.nccl.as_mut().filter(|_| device.is_cuda()) else {
                return f(&mut g.cpu);
            };
            if lazy.agreed() || bytes >= lazy::TCP_LIMIT_BYTES {
                let (nccl, watchdog) = lazy.wait_with_watchdog()?;
                let out = f(nccl)?;
                // Enqueued on the default stream; the watchdog sees whether it completes in time.
                watchdog.watch(std::ptr::null_mut(), op, seq);
                return Ok(out);
            }
            let out = f(&mut g.cpu)?;
            let ready = lazy.ready_now();
            let votes = g.cpu.all_gather_bytes(&[u8::from(ready)])?;
            if votes.iter().all(|v| v.as_slice() == [1]) {
                if let Some(lazy) = g.nccl.as_mut() {
                    lazy.set_agreed();
                }
            }
            Ok(out)
        })
    }

    /// Combines `t` across ranks in place; every rank ends with the same values.
    pub fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_among(Among::World, t, op)
    }

    pub(crate) fn all_reduce_among(
        &mut self,
        among: Among<'_>,
        t: &mut Tensor,
        op: ReduceOp,
    ) -> Result<()> {
        if among.alone(self.world_size(), t.device()) {
            return if op == ReduceOp::Mean && !crate::ops::is_float(t.kind()) {
                Err(Error::Collective {
                    op: "all_reduce",
                    detail: format!("a mean needs a floating-point tensor, got {:?}", t.kind()),
                })
            } else {
                Ok(())
            };
        }
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        self.on_backend(among, "all_reduce", t.device(), bytes, |b| {
            b.all_reduce(t, op)
        })
    }

    /// Copies rank `src`'s `t` into every rank's `t` (same shape and dtype everywhere).
    pub fn broadcast(&mut self, t: &mut Tensor, src: usize) -> Result<()> {
        if src >= self.world_size() {
            return Err(Error::Collective {
                op: "broadcast",
                detail: format!(
                    "source rank {src} is not in a group of {}",
                    self.world_size()
                ),
            });
        }
        if self.world_size() == 1 {
            return Ok(());
        }
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        self.on_backend(Among::World, "broadcast", t.device(), bytes, |b| {
            b.broadcast(t, src)
        })
    }

    /// Every rank's `t` concatenated along dim 0, on every rank (shapes must match).
    pub fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor> {
        self.all_gather_cat_among(Among::World, t)
    }

    pub(crate) fn all_gather_cat_among(&mut self, among: Among<'_>, t: &Tensor) -> Result<Tensor> {
        if among.alone(self.world_size(), t.device()) {
            return Ok(t.shallow_clone());
        }
        let t = t.contiguous();
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        self.on_backend(among, "all_gather", t.device(), bytes, |b| {
            b.all_gather_cat(&t)
        })
    }

    /// Reduces `t` across ranks and returns this rank's share of the first dimension, which must divide
    /// evenly by the number of processes.
    pub fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.reduce_scatter_among(Among::World, t, op)
    }

    pub(crate) fn reduce_scatter_among(
        &mut self,
        among: Among<'_>,
        t: &Tensor,
        op: ReduceOp,
    ) -> Result<Tensor> {
        let world = among.size(self.world_size()) as i64;
        let rows = t.size().first().copied().unwrap_or(0);
        if t.dim() == 0 || rows % world != 0 {
            return Err(Error::Collective {
                op: "reduce_scatter",
                detail: format!(
                    "the first dimension ({rows}) must divide evenly by {world} processes"
                ),
            });
        }
        if among.alone(self.world_size(), t.device()) {
            return Ok(t.copy());
        }
        let t = t.contiguous();
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        self.on_backend(among, "reduce_scatter", t.device(), bytes, |b| {
            b.reduce_scatter(&t, op)
        })
    }

    /// Starts an in-place all-reduce of a CUDA tensor among `among` on `stream`, after the work queued
    /// so far on the compute stream (bucket `bucket`'s event), without waiting for it: true when it went
    /// to NCCL. False when this tensor would not use NCCL now (a CPU tensor, or a small one before every
    /// rank's communicator is up); the caller then uses the blocking collective.
    pub(crate) fn all_reduce_on_stream(
        &mut self,
        among: Among<'_>,
        t: &mut Tensor,
        op: ReduceOp,
        stream: &CommStream,
        bucket: usize,
    ) -> Result<bool> {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        self.queue_on_stream(
            among,
            "all_reduce",
            t.device(),
            bytes,
            stream,
            bucket,
            |nccl| nccl.all_reduce_on(t, op, stream.raw()),
        )
    }

    /// Starts all-gathers of CUDA tensors among `among` on `stream`, each `(input, output)` pair one
    /// all-gather of `input` into `output`, launched together as one NCCL group, as
    /// [`ProcessGroup::all_reduce_on_stream`] starts its all-reduce (false: the caller uses the blocking
    /// all-gather). Every tensor must stay alive until the stream has run them.
    pub(crate) fn all_gather_into_on_stream(
        &mut self,
        among: Among<'_>,
        pairs: &[(Tensor, Tensor)],
        stream: &CommStream,
    ) -> Result<bool> {
        self.queue_group_on_stream(
            among,
            "all_gather",
            pairs,
            |(_, out)| out,
            stream,
            |n, i, o| n.all_gather_into_on(i, o, stream.raw()),
        )
    }

    /// Starts reduce-scatters of CUDA tensors among `among` on `stream`, each `(input, output)` pair
    /// one reduce-scatter of `input` into this rank's share `output`, launched together as one NCCL
    /// group, as [`ProcessGroup::all_reduce_on_stream`] starts its all-reduce (false: the caller uses
    /// the blocking reduce-scatter). Every tensor must stay alive until the stream has run them.
    pub(crate) fn reduce_scatter_on_stream(
        &mut self,
        among: Among<'_>,
        pairs: &[(Tensor, Tensor)],
        op: ReduceOp,
        stream: &CommStream,
    ) -> Result<bool> {
        self.queue_group_on_stream(
            among,
            "reduce_scatter",
            pairs,
            |(i, _)| i,
            stream,
            |n, i, o| n.reduce_scatter_on(i, o, op, stream.raw()),
        )
    }

    /// Queues `call` on every pair of `pairs` as one NCCL group on `stream` (see
    /// [`queue_on_stream`](Self::queue_on_stream)); `whole` picks each pair's whole tensor, whose bytes
    /// say whether the collective uses NCCL yet. False, queuing nothing, for no pairs.
    #[allow(clippy::too_many_arguments)]
    fn queue_group_on_stream(
        &mut self,
        among: Among<'_>,
        op: &'static str,
        pairs: &[(Tensor, Tensor)],
        whole: impl Fn(&(Tensor, Tensor)) -> &Tensor,
        stream: &CommStream,
        call: impl Fn(&mut nccl::Nccl, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<bool> {
        let Some(device) = pairs.first().map(|(input, _)| input.device()) else {
            return Ok(false);
        };
        let bytes = pairs
            .iter()
            .map(|p| whole(p).numel() * whole(p).kind().elt_size_in_bytes())
            .sum();
        // Groups of at most 256 calls: older NCCL releases cap the operations one group may hold (2048),
        // and a unit of a model with no wrap policy can have more parameters than that.
        self.queue_on_stream(among, op, device, bytes, stream, 0, |nccl| {
            pairs.chunks(256).try_for_each(|batch| {
                nccl.grouped(|nccl| batch.iter().try_for_each(|(i, o)| call(nccl, i, o)))
            })
        })
    }

    /// Queues `queue` (an NCCL call on `stream`) after the work on the compute stream so far (recorded
    /// in `stream`'s ready event `ready`), watched by the NCCL watchdog: false, queuing nothing, when a
    /// collective of `bytes` on `device` would not use NCCL now.
    #[allow(clippy::too_many_arguments)]
    fn queue_on_stream(
        &mut self,
        among: Among<'_>,
        op: &'static str,
        device: Device,
        bytes: usize,
        stream: &CommStream,
        ready: usize,
        queue: impl FnOnce(&mut nccl::Nccl) -> Result<()>,
    ) -> Result<bool> {
        let world = self.state.contract.world_size;
        let lazy = match among {
            Among::World => self
                .nccl
                .as_mut()
                .filter(|lazy| world > 1 && (lazy.agreed() || bytes >= lazy::TCP_LIMIT_BYTES)),
            Among::Part(part) => part.nccl.as_mut(),
        };
        let Some(lazy) = lazy.filter(|_| device.is_cuda()) else {
            return Ok(false);
        };
        self.seq += 1;
        let seq = self.seq;
        let started = Instant::now();
        let queued = (|| {
            let (nccl, watchdog) = lazy.wait_with_watchdog()?;
            stream.wait_for_compute(ready)?;
            queue(nccl)?;
            watchdog.watch(stream.raw(), op, seq);
            Ok(true)
        })();
        self.complete_timeout(op, started, queued)
    }

    /// Every rank's bytes, in rank order, on every rank.
    pub fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.timed("all_gather", |g| g.cpu.all_gather_bytes(bytes))
    }

    /// Waits until every rank has reached this point.
    pub fn barrier(&mut self) -> Result<()> {
        if let Some(_nccl) = &self.nccl {
            // Work queued on the GPU counts: a barrier means "everything before it is done".
            if let Device::Cuda(i) = self.state.device {
                tch::Cuda::synchronize(i as i64);
            }
        }
        self.timed("barrier", |g| g.cpu.all_gather_bytes(&[]).map(drop))
    }
}

impl ProcessGroup {
    /// Tears the group down now (PyTorch's `destroy_process_group`): waits for outstanding GPU work and
    /// frees NCCL's buffers. Only needed by a process that goes on using the GPU afterwards.
    pub fn destroy(mut self) {
        if let Some(lazy) = self.nccl.as_mut() {
            if lazy.wait().is_ok() {
                if let Some(nccl) = lazy.ready_mut() {
                    nccl.destroy();
                }
            }
        }
    }
}

impl Drop for ProcessGroup {
    /// Dropping a group does not destroy its NCCL communicator, as PyTorch does not at exit: destroying
    /// one takes about half a second (measured on 2× H200), which every short job would pay while the
    /// process ends anyway. Use [`ProcessGroup::destroy`] to free it early. After a panic, the
    /// communicator is aborted so no peer waits on it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(nccl) = self.nccl.as_mut().and_then(|l| l.ready_mut()) {
                nccl.abort();
            }
        }
    }
}
