//! The NCCL backend for CUDA tensors.
//!
//! NCCL is the library libtorch's CUDA half already links (`libnccl.so.2`, shipped inside the torch
//! install); loading it ourselves with `dlopen` finds that same copy, where a crate probing for
//! `libnccl.so` would not. The unique id travels over the TCP links from rendezvous. Collectives run on
//! the device's legacy default stream, the stream libtorch issues its kernels on, so they are ordered
//! after the kernels that produced their inputs without a host synchronisation.

use super::{Backend, ReduceOp};
use crate::ops::is_float;
use crate::{Error, Result};
use hasten_core::dynlib::Loaded;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

type NcclResult = c_int;
type Comm = *mut c_void;
type Stream = *mut c_void;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UniqueId {
    pub internal: [u8; 128],
}

struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> NcclResult,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> NcclResult,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> NcclResult,
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    cuda_set_device: unsafe extern "C" fn(c_int) -> c_int,
}

/// The NCCL library and the CUDA runtime calls it needs, loaded once per process.
static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

fn load() -> std::result::Result<Api, String> {
    if !matches!(crate::libtorch().cuda, crate::CudaLoad::Loaded) {
        return Err("libtorch's CUDA backend is not loaded".into());
    }
    // The copy libtorch_cuda already loaded comes first (the NCCL PyTorch itself uses), then the torch
    // install's (pip's layout: torch/lib/../../nvidia/nccl/lib), then the dynamic linker's search.
    if let Some(loaded) = Loaded::already_loaded("libnccl.so.2") {
        return api_of(loaded);
    }
    let mut nccl = None;
    let mut tried = Vec::new();
    let mut names: Vec<String> = Vec::new();
    if let Some(dir) = crate::libtorch().lib_dir.as_ref() {
        if let Some(site) = dir.parent().and_then(|p| p.parent()) {
            names.push(
                site.join("nvidia/nccl/lib/libnccl.so.2")
                    .display()
                    .to_string(),
            );
        }
    }
    names.push("libnccl.so.2".into());
    for name in &names {
        match Loaded::open_global(name) {
            Ok(library) => {
                nccl = Some(library);
                break;
            }
            Err(reason) => tried.push(reason),
        }
    }
    let Some(nccl) = nccl else {
        return Err(format!(
            "libnccl could not be loaded ({})",
            tried.join("; ")
        ));
    };
    api_of(nccl)
}

/// The functions hasten calls, looked up in `nccl`.
fn api_of(nccl: Loaded) -> std::result::Result<Api, String> {
    // SAFETY: every field of Api has its function's signature in nccl.h (cudaSetDevice:
    // cuda_runtime_api.h; libcudart is loaded already, libtorch links it, so the process scope finds it).
    unsafe {
        Ok(Api {
            get_unique_id: nccl.function("ncclGetUniqueId")?,
            comm_init_rank: nccl.function("ncclCommInitRank")?,
            comm_destroy: nccl.function("ncclCommDestroy")?,
            comm_abort: nccl.function("ncclCommAbort")?,
            all_reduce: nccl.function("ncclAllReduce")?,
            broadcast: nccl.function("ncclBroadcast")?,
            all_gather: nccl.function("ncclAllGather")?,
            reduce_scatter: nccl.function("ncclReduceScatter")?,
            group_start: nccl.function("ncclGroupStart")?,
            group_end: nccl.function("ncclGroupEnd")?,
            error_string: nccl.function("ncclGetErrorString")?,
            get_version: nccl.function("ncclGetVersion")?,
            cuda_set_device: Loaded::process().function("cudaSetDevice")?,
        })
    }
}

/// Makes `device` the calling thread's current CUDA device (creating its context), as
/// `torch.cuda.set_device` does.
pub(crate) fn set_device(device: usize) -> Result<()> {
    let api = api()?;
    // SAFETY: selects a GPU for the calling thread.
    let r = unsafe { (api.cuda_set_device)(device as c_int) };
    if r != 0 {
        return Err(Error::DeviceUnavailable {
            detail: format!("cudaSetDevice({device}) failed with CUDA error {r}"),
        });
    }
    Ok(())
}

fn api() -> Result<&'static Api> {
    API.get_or_init(load)
        .as_ref()
        .map_err(|e| Error::DeviceUnavailable {
            detail: format!("NCCL: {e}"),
        })
}

/// NCCL's version as `major.minor.patch`, when it can be loaded.
pub fn nccl_version() -> Option<String> {
    let api = api().ok()?;
    let mut v: c_int = 0;
    // SAFETY: writes one int.
    if unsafe { (api.get_version)(&mut v) } != 0 {
        return None;
    }
    Some(format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100))
}

fn check(api: &Api, r: NcclResult, op: &'static str) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static C string.
    let msg = unsafe { CStr::from_ptr((api.error_string)(r)) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Collective {
        op,
        detail: format!("NCCL error {r}: {msg}"),
    })
}

/// NCCL's `ncclRedOp_t` for `op` on tensors of `kind` (a mean needs a floating-point type).
fn nccl_op(op: ReduceOp, kind: Kind, name: &'static str) -> Result<c_int> {
    Ok(match op {
        ReduceOp::Sum => 0,
        ReduceOp::Product => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
        ReduceOp::Mean if is_float(kind) => 4,
        ReduceOp::Mean => {
            return Err(Error::Collective {
                op: name,
                detail: format!("a mean needs a floating-point tensor, got {kind:?}"),
            });
        }
    })
}

fn nccl_type(kind: Kind) -> Option<c_int> {
    Some(match kind {
        Kind::Int8 => 0,
        Kind::Uint8 | Kind::Bool => 1,
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        _ => return None,
    })
}

/// A new unique id (rank 0 makes one and sends it to the others).
pub(crate) fn unique_id() -> Result<UniqueId> {
    let api = api()?;
    let mut id = UniqueId { internal: [0; 128] };
    check(
        api,
        // SAFETY: writes one ncclUniqueId.
        unsafe { (api.get_unique_id)(&mut id) },
        "ncclGetUniqueId",
    )?;
    Ok(id)
}

/// One NCCL communicator, bound to this rank's GPU.
pub(crate) struct Nccl {
    comm: Comm,
    device: usize,
    world: usize,
}

// SAFETY: the communicator is only used through &mut self, one call at a time.
unsafe impl Send for Nccl {}

impl Nccl {
    pub(crate) fn new(
        id: UniqueId,
        rank: usize,
        world: usize,
        device: usize,
        trace: &super::Trace,
    ) -> Result<Self> {
        let api = api()?;
        set_device(device)?;
        trace.mark("cudaSetDevice (context ready)");
        let mut comm: Comm = std::ptr::null_mut();
        check(
            api,
            // SAFETY: initialises one communicator; every rank calls it with the same id.
            unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) },
            "ncclCommInitRank",
        )?;
        trace.mark("ncclCommInitRank");
        Ok(Nccl {
            comm,
            device,
            world,
        })
    }

    fn prepare(&self, t: &Tensor, op: &'static str) -> Result<(&'static Api, c_int)> {
        if t.device() != Device::Cuda(self.device) {
            return Err(Error::Collective {
                op,
                detail: format!(
                    "NCCL on cuda:{} got a tensor on {:?}",
                    self.device,
                    t.device()
                ),
            });
        }
        let dtype = nccl_type(t.kind()).ok_or_else(|| Error::Collective {
            op,
            detail: format!("NCCL cannot carry {:?} tensors", t.kind()),
        })?;
        if !t.is_contiguous() {
            return Err(Error::Collective {
                op,
                detail: "NCCL needs a contiguous tensor".into(),
            });
        }
        Ok((api()?, dtype))
    }

    /// Tears the communicator down without waiting for peers (after a failure elsewhere).
    pub(crate) fn abort(&mut self) {
        if let Ok(api) = api() {
            if !self.comm.is_null() {
                // SAFETY: aborting our own communicator once.
                unsafe { (api.comm_abort)(self.comm) };
                self.comm = std::ptr::null_mut();
            }
        }
    }
}

impl Nccl {
    /// In-place all-reduce queued on `stream` (null: the legacy default stream).
    pub(crate) fn all_reduce_on(
        &mut self,
        t: &mut Tensor,
        op: ReduceOp,
        stream: Stream,
    ) -> Result<()> {
        const OP: &str = "all_reduce";
        let (api, dtype) = self.prepare(t, OP)?;
        let red = nccl_op(op, t.kind(), OP)?;
        let ptr = t.data_ptr();
        // SAFETY: in-place all-reduce of numel elements on the tensor's own device memory.
        check(
            api,
            unsafe { (api.all_reduce)(ptr, ptr, t.numel(), dtype, red, self.comm, stream) },
            "ncclAllReduce",
        )
    }
}

impl Nccl {
    /// Runs `queue`'s NCCL calls as one group: NCCL launches them together, so several collectives
    /// (one per parameter of an FSDP unit) cost about what one of their total size does. The group is
    /// closed whether or not `queue` succeeded.
    pub(crate) fn grouped(&mut self, queue: impl FnOnce(&mut Nccl) -> Result<()>) -> Result<()> {
        let api = api()?;
        // SAFETY: opens a group on this thread; closed below on every path.
        check(api, unsafe { (api.group_start)() }, "ncclGroupStart")?;
        let queued = queue(self);
        // SAFETY: closes the group opened above.
        let ended = check(api, unsafe { (api.group_end)() }, "ncclGroupEnd");
        queued.and(ended)
    }

    /// Every rank's `input` into `output` (world × its elements), queued on `stream` (null: the legacy
    /// default stream).
    pub(crate) fn all_gather_into_on(
        &mut self,
        input: &Tensor,
        output: &Tensor,
        stream: Stream,
    ) -> Result<()> {
        let (api, dtype) = self.prepare(input, "all_gather")?;
        if output.numel() != input.numel() * self.world || output.kind() != input.kind() {
            return Err(Error::Collective {
                op: "all_gather",
                detail: format!(
                    "the output holds {} {:?} elements, not {} × {} {:?}",
                    output.numel(),
                    output.kind(),
                    self.world,
                    input.numel(),
                    input.kind()
                ),
            });
        }
        check(
            api,
            // SAFETY: the output, checked above, holds world × numel elements of the input's dtype on
            // the same device; both stay alive until the stream has run the operation (the caller's
            // duty).
            unsafe {
                (api.all_gather)(
                    input.data_ptr(),
                    output.data_ptr(),
                    input.numel(),
                    dtype,
                    self.comm,
                    stream,
                )
            },
            "ncclAllGather",
        )
    }

    /// Reduces `input` across ranks into this rank's share `output` (numel / world elements), queued on
    /// `stream` (null: the legacy default stream).
    pub(crate) fn reduce_scatter_on(
        &mut self,
        input: &Tensor,
        output: &Tensor,
        op: ReduceOp,
        stream: Stream,
    ) -> Result<()> {
        let (api, dtype) = self.prepare(input, "reduce_scatter")?;
        let red = nccl_op(op, input.kind(), "reduce_scatter")?;
        if output.numel() * self.world != input.numel() || output.kind() != input.kind() {
            return Err(Error::Collective {
                op: "reduce_scatter",
                detail: format!(
                    "the output holds {} elements, not {} / {}",
                    output.numel(),
                    input.numel(),
                    self.world
                ),
            });
        }
        check(
            api,
            // SAFETY: recvcount = numel / world elements into a matching output, checked above; both
            // stay alive until the stream has run the operation (the caller's duty).
            unsafe {
                (api.reduce_scatter)(
                    input.data_ptr(),
                    output.data_ptr(),
                    output.numel(),
                    dtype,
                    red,
                    self.comm,
                    stream,
                )
            },
            "ncclReduceScatter",
        )
    }
}

impl Backend for Nccl {
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_on(t, op, std::ptr::null_mut())
    }

    fn broadcast(&mut self, t: &mut Tensor, src: usize) -> Result<()> {
        let (api, dtype) = self.prepare(t, "broadcast")?;
        let ptr = t.data_ptr();
        // SAFETY: in-place broadcast of numel elements.
        check(
            api,
            unsafe {
                (api.broadcast)(
                    ptr,
                    ptr,
                    t.numel(),
                    dtype,
                    src as c_int,
                    self.comm,
                    std::ptr::null_mut(),
                )
            },
            "ncclBroadcast",
        )
    }

    fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor> {
        let mut shape = t.size();
        shape[0] *= self.world as i64;
        let out = Tensor::f_empty(&shape, (t.kind(), t.device()))
            .map_err(|source| Error::torch("all_gather", source))?;
        self.all_gather_into_on(t, &out, std::ptr::null_mut())?;
        Ok(out)
    }

    fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mut shape = t.size();
        shape[0] /= self.world as i64;
        let out = Tensor::f_empty(&shape, (t.kind(), t.device()))
            .map_err(|source| Error::torch("reduce_scatter", source))?;
        self.reduce_scatter_on(t, &out, op, std::ptr::null_mut())?;
        Ok(out)
    }
}

impl Nccl {
    /// Destroys the communicator now, waiting for its work to finish and freeing its GPU buffers.
    pub(crate) fn destroy(&mut self) {
        if let Ok(api) = api() {
            if !self.comm.is_null() {
                // SAFETY: destroying our own communicator once.
                unsafe { (api.comm_destroy)(self.comm) };
                self.comm = std::ptr::null_mut();
            }
        }
    }
}
