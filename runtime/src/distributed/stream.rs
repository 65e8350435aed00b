//! A second CUDA stream for collectives that run while the GPU keeps computing (gradient buckets
//! averaged during the backward). libtorch computes on the legacy default stream; this stream is
//! created non-blocking so it does not serialise with it, and events order the two explicitly: a
//! bucket's all-reduce waits for the event recorded after its gradients were written, and the compute
//! stream waits for the last all-reduce before anything reads the averaged gradients.

use crate::{Error, Result};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

type Stream = *mut c_void;
type Event = *mut c_void;

struct Api {
    stream_create: unsafe extern "C" fn(*mut Stream, c_uint) -> c_int,
    stream_destroy: unsafe extern "C" fn(Stream) -> c_int,
    event_create: unsafe extern "C" fn(*mut Event, c_uint) -> c_int,
    event_destroy: unsafe extern "C" fn(Event) -> c_int,
    event_record: unsafe extern "C" fn(Event, Stream) -> c_int,
    event_query: unsafe extern "C" fn(Event) -> c_int,
    stream_wait_event: unsafe extern "C" fn(Stream, Event, c_uint) -> c_int,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
}

const STREAM_NON_BLOCKING: c_uint = 0x1;
const EVENT_DISABLE_TIMING: c_uint = 0x2;
/// The legacy default stream, where libtorch's kernels run.
const COMPUTE: Stream = std::ptr::null_mut();

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

fn load() -> std::result::Result<Api, String> {
    if !matches!(crate::libtorch().cuda, crate::CudaLoad::Loaded) {
        return Err("libtorch's CUDA backend is not loaded".into());
    }
    // libcudart is loaded already (libtorch_cuda links it): the process's default scope finds it.
    fn symbol<F: Copy>(name: &str) -> std::result::Result<F, String> {
        // SAFETY: every field of Api has its function's signature in cuda_runtime_api.h.
        unsafe { hasten_core::dynlib::Loaded::process().function(name) }
    }
    Ok(Api {
        stream_create: symbol("cudaStreamCreateWithFlags")?,
        stream_destroy: symbol("cudaStreamDestroy")?,
        event_create: symbol("cudaEventCreateWithFlags")?,
        event_destroy: symbol("cudaEventDestroy")?,
        event_record: symbol("cudaEventRecord")?,
        event_query: symbol("cudaEventQuery")?,
        stream_wait_event: symbol("cudaStreamWaitEvent")?,
        set_device: symbol("cudaSetDevice")?,
    })
}

fn api() -> Result<&'static Api> {
    API.get_or_init(load)
        .as_ref()
        .map_err(|e| Error::DeviceUnavailable {
            detail: format!("CUDA streams: {e}"),
        })
}

fn check(r: c_int, call: &str) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    Err(Error::Collective {
        op: "gradient all-reduce",
        detail: format!("{call} failed with CUDA error {r}"),
    })
}

/// A CUDA event, recorded on a stream and asked whether the work before it is done (the NCCL watchdog's
/// marks). Destroyed when dropped; CUDA defers that until its work completes.
pub(crate) struct Mark(Event);

// SAFETY: a CUDA event is a plain handle, usable from any thread of the process.
unsafe impl Send for Mark {}

impl Mark {
    /// A new event on the calling thread's current device.
    pub(crate) fn new() -> Result<Self> {
        let api = api()?;
        let mut e = std::ptr::null_mut();
        check(
            // SAFETY: writes one handle.
            unsafe { (api.event_create)(&mut e, EVENT_DISABLE_TIMING) },
            "cudaEventCreateWithFlags",
        )?;
        Ok(Mark(e))
    }

    /// Records the event after the work queued so far on `stream` (null: the legacy default stream).
    pub(crate) fn record(&self, stream: Stream) -> Result<()> {
        let api = api()?;
        // SAFETY: a valid event; the stream handle comes from the caller's live stream (or null).
        check(
            unsafe { (api.event_record)(self.0, stream) },
            "cudaEventRecord",
        )
    }

    /// Makes the compute stream wait for the work before the event, without blocking the host.
    pub(crate) fn wait_on_compute(&self) -> Result<()> {
        let api = api()?;
        // SAFETY: a valid event; the legacy default stream always exists.
        check(
            unsafe { (api.stream_wait_event)(COMPUTE, self.0, 0) },
            "cudaStreamWaitEvent",
        )
    }

    /// True once the work before the event is done (or failed: it will never be done).
    pub(crate) fn done(&self) -> bool {
        const NOT_READY: c_int = 600;
        // SAFETY: a valid event.
        api().is_ok_and(|api| unsafe { (api.event_query)(self.0) } != NOT_READY)
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: destroying the event this value created, once.
            unsafe { (api.event_destroy)(self.0) };
        }
    }
}

/// Makes `device` current on the calling thread (a watchdog thread asking about events).
pub(crate) fn use_device(device: usize) -> Result<()> {
    let api = api()?;
    // SAFETY: selects a GPU for the calling thread.
    check(
        unsafe { (api.set_device)(device as c_int) },
        "cudaSetDevice",
    )
}

/// A non-blocking stream on the current GPU with one "ready" event per bucket and one "done" event.
pub(crate) struct CommStream {
    stream: Stream,
    ready: Vec<Event>,
    done: Event,
}

// SAFETY: CUDA streams and events are plain handles, usable from any thread of the process.
unsafe impl Send for CommStream {}

impl CommStream {
    /// Creates the stream on the calling thread's current device, with `buckets` ready events.
    pub(crate) fn new(buckets: usize) -> Result<Self> {
        let api = api()?;
        let mut me = CommStream {
            stream: std::ptr::null_mut(),
            ready: Vec::with_capacity(buckets),
            done: std::ptr::null_mut(),
        };
        // SAFETY: each call writes one handle; failures leave nulls that Drop skips.
        unsafe {
            check(
                (api.stream_create)(&mut me.stream, STREAM_NON_BLOCKING),
                "cudaStreamCreateWithFlags",
            )?;
            check(
                (api.event_create)(&mut me.done, EVENT_DISABLE_TIMING),
                "cudaEventCreateWithFlags",
            )?;
            for _ in 0..buckets {
                let mut e = std::ptr::null_mut();
                check(
                    (api.event_create)(&mut e, EVENT_DISABLE_TIMING),
                    "cudaEventCreateWithFlags",
                )?;
                me.ready.push(e);
            }
        }
        Ok(me)
    }

    /// The raw stream, for NCCL.
    pub(crate) fn raw(&self) -> *mut c_void {
        self.stream
    }

    /// Makes this stream wait for everything queued so far on the compute stream (bucket `b`'s gradients
    /// included) without blocking the host.
    pub(crate) fn wait_for_compute(&self, b: usize) -> Result<()> {
        let api = api()?;
        let event = self.ready[b];
        // SAFETY: valid event and stream handles owned by self.
        unsafe {
            check((api.event_record)(event, COMPUTE), "cudaEventRecord")?;
            check(
                (api.stream_wait_event)(self.stream, event, 0),
                "cudaStreamWaitEvent",
            )
        }
    }

    /// Makes the compute stream wait for everything queued on this stream.
    pub(crate) fn join_compute(&self) -> Result<()> {
        let api = api()?;
        // SAFETY: valid event and stream handles owned by self.
        unsafe {
            check(
                (api.event_record)(self.done, self.stream),
                "cudaEventRecord",
            )?;
            check(
                (api.stream_wait_event)(COMPUTE, self.done, 0),
                "cudaStreamWaitEvent",
            )
        }
    }
}

impl Drop for CommStream {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: destroying handles this struct created, once. CUDA defers the release of a stream or
        // event with pending work until that work completes.
        unsafe {
            for e in self.ready.drain(..).chain([self.done]) {
                if !e.is_null() {
                    (api.event_destroy)(e);
                }
            }
            if !self.stream.is_null() {
                (api.stream_destroy)(self.stream);
            }
        }
    }
}
