//! Finding a batch size that fits in memory (Accelerate's `find_executable_batch_size` and
//! `should_reduce_batch_size`), and freeing the device's cached memory between tries.

use crate::Error;
use std::fmt;

/// The texts of Accelerate's `should_reduce_batch_size`, verbatim: out of memory on CUDA, HIP and XPU
/// (" out of memory.", with its period), MPS, the CPU and HPU, and cuDNN's "not supported".
const OUT_OF_MEMORY_TEXTS: [&str; 5] = [
    " out of memory.",
    "MPS backend out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "DefaultCPUAllocator: can't allocate memory",
    "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed",
];

/// True when a libtorch error message is one of those Accelerate retries with a smaller batch
/// (`should_reduce_batch_size`'s list, matched as it matches: case-sensitive, anywhere in the message).
pub fn should_reduce_batch_size(message: &str) -> bool {
    OUT_OF_MEMORY_TEXTS.iter().any(|t| message.contains(t))
}

/// Errors that can say whether they are libtorch's running out of memory: what Accelerate retries is a
/// `RuntimeError` (libtorch's own errors) whose message is on its list. A libtorch error anywhere in an
/// error's chain of sources counts, so a user's error type that keeps the libtorch error as its source
/// works as it is; any other error (even one whose text mentions memory) is not retried.
pub trait OutOfMemory {
    /// True when this error is libtorch's out-of-memory (or cuDNN "not supported") error.
    fn is_out_of_memory(&self) -> bool;
}

/// Walks `error` and its sources for a libtorch error on Accelerate's list.
pub fn is_out_of_memory(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tch::TchError::Torch(message)) = e.downcast_ref::<tch::TchError>() {
            return should_reduce_batch_size(message);
        }
        // hasten's own error, also where a chain holds it boxed (a boxed error is its own link in the
        // chain, and its source skips the inner error's level).
        let ours = e
            .downcast_ref::<Error>()
            .or_else(|| e.downcast_ref::<Box<Error>>().map(AsRef::as_ref));
        if let Some(Error::Torch { source, .. }) = ours {
            return should_reduce_batch_size(&source.to_string());
        }
        next = e.source();
    }
    false
}

impl OutOfMemory for tch::TchError {
    fn is_out_of_memory(&self) -> bool {
        is_out_of_memory(self)
    }
}

impl OutOfMemory for Error {
    fn is_out_of_memory(&self) -> bool {
        is_out_of_memory(self)
    }
}

impl OutOfMemory for Box<dyn std::error::Error + Send + Sync> {
    fn is_out_of_memory(&self) -> bool {
        is_out_of_memory(self.as_ref())
    }
}

impl OutOfMemory for Box<dyn std::error::Error> {
    fn is_out_of_memory(&self) -> bool {
        is_out_of_memory(self.as_ref())
    }
}

/// Why [`find_executable_batch_size`] gave up.
#[derive(Debug)]
pub enum BatchSizeError<E> {
    /// The function failed for another reason than memory: its own error, unchanged.
    Failed(E),
    /// Every batch size ran out of memory down to zero; `last` is the last out-of-memory error.
    ReachedZero {
        /// The error of the last try, if there was one.
        last: Option<E>,
    },
}

impl<E: fmt::Display> fmt::Display for BatchSizeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSizeError::Failed(e) => e.fmt(f),
            // Accelerate's message.
            BatchSizeError::ReachedZero { .. } => {
                f.write_str("No executable batch size found, reached zero.")
            }
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for BatchSizeError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BatchSizeError::Failed(e) => e.source(),
            BatchSizeError::ReachedZero { last } => last
                .as_ref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
        }
    }
}

impl From<BatchSizeError<Error>> for Error {
    /// The function's own error as it is; reaching zero as [`Error::NoExecutableBatchSize`].
    fn from(e: BatchSizeError<Error>) -> Self {
        match e {
            BatchSizeError::Failed(e) => e,
            BatchSizeError::ReachedZero { last } => Error::NoExecutableBatchSize {
                last: last.map(Box::new),
            },
        }
    }
}

/// Accelerate's `find_executable_batch_size` decorator as a value: it keeps the batch size between
/// calls, as the decorated Python function does, so after one call found a size that fits the next
/// call starts there.
pub struct ExecutableBatchSize {
    batch_size: usize,
    reduce: Box<dyn FnMut(usize) -> usize + Send>,
}

impl ExecutableBatchSize {
    /// Starts at `starting_batch_size` (Accelerate's default is 128) and multiplies the size by 0.9,
    /// rounding down, after each out-of-memory error.
    pub fn new(starting_batch_size: usize) -> Self {
        ExecutableBatchSize {
            batch_size: starting_batch_size,
            reduce: Box::new(|b| b * 9 / 10),
        }
    }

    /// Computes the next size after an out-of-memory error instead (Accelerate's
    /// `reduce_batch_size_fn`; here it is given the size that failed).
    pub fn reduce_batch_size_fn(mut self, f: impl FnMut(usize) -> usize + Send + 'static) -> Self {
        self.reduce = Box::new(f);
        self
    }

    /// The size the next call starts with.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Calls `f` with the current batch size until it succeeds, trying a smaller size each time it fails
    /// because memory ran out ([`OutOfMemory`]); the device's cached memory is freed before each try. Any
    /// other error is returned at once, as the function returned it; a size of 0 ends the search.
    pub fn run<T, E: OutOfMemory>(
        &mut self,
        mut f: impl FnMut(usize) -> Result<T, E>,
    ) -> Result<T, BatchSizeError<E>> {
        empty_device_cache();
        let mut last = None;
        loop {
            if self.batch_size == 0 {
                return Err(BatchSizeError::ReachedZero { last });
            }
            match f(self.batch_size) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_out_of_memory() => {
                    empty_device_cache();
                    self.batch_size = (self.reduce)(self.batch_size);
                    last = Some(e);
                }
                Err(e) => return Err(BatchSizeError::Failed(e)),
            }
        }
    }
}

/// Calls `f(batch_size)` starting at `starting_batch_size`, and again with 90% of the size (rounded down)
/// each time it fails because memory ran out, until it succeeds (Accelerate's
/// `find_executable_batch_size`). Any other error comes back unchanged as [`BatchSizeError::Failed`];
/// reaching 0 is [`BatchSizeError::ReachedZero`]. With `hasten::Result` functions, `?` turns both into
/// [`Error`]. To keep the size between calls or reduce it another way, use [`ExecutableBatchSize`].
pub fn find_executable_batch_size<T, E: OutOfMemory>(
    starting_batch_size: usize,
    f: impl FnMut(usize) -> Result<T, E>,
) -> Result<T, BatchSizeError<E>> {
    ExecutableBatchSize::new(starting_batch_size).run(f)
}

/// Returns the memory libtorch's caching allocator holds but does not use to the device (Accelerate's
/// `clear_device_cache`; Rust needs no garbage collection: the failed try's tensors are already freed).
/// Does nothing where CUDA is not in use.
pub fn empty_device_cache() {
    if matches!(crate::libtorch().cuda, crate::CudaLoad::Loaded)
        && hasten_core::cuda_initialized_in_this_process()
    {
        crate::shim::empty_device_cache();
    }
}

/// Bytes of `device`'s memory held by tensors now, as `torch.cuda.memory_allocated` counts them (the
/// caching allocator's allocated bytes, not what it keeps cached). `None` for the CPU or without CUDA.
pub fn memory_allocated(device: tch::Device) -> Option<u64> {
    cuda_stat(device, 0)
}

/// The most bytes `device`'s tensors held at once since the start or the last
/// [`reset_peak_memory_stats`] (`torch.cuda.max_memory_allocated`).
pub fn max_memory_allocated(device: tch::Device) -> Option<u64> {
    cuda_stat(device, 1)
}

/// Starts [`max_memory_allocated`]'s count again from now (`torch.cuda.reset_peak_memory_stats`).
pub fn reset_peak_memory_stats(device: tch::Device) {
    let _ = cuda_stat(device, 2);
}

fn cuda_stat(device: tch::Device, which: i32) -> Option<u64> {
    match device {
        tch::Device::Cuda(i) => {
            u64::try_from(crate::shim::device_memory_stat(i as i32, which)).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn torch_error(message: &str) -> tch::TchError {
        tch::TchError::Torch(message.to_owned())
    }

    #[test]
    fn accelerates_list_decides_what_is_retried() {
        for retried in [
            "CUDA out of memory. Tried to allocate 20.00 MiB",
            "HIP out of memory. Tried to allocate",
            "XPU out of memory.",
            "MPS backend out of memory (MPS allocated: 1 GB)",
            "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear",
            "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried",
            "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed",
        ] {
            assert!(torch_error(retried).is_out_of_memory(), "{retried}");
        }
        for kept in [
            "CUDA out of memory",
            "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
            "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
            "CUDA Out Of Memory.",
        ] {
            assert!(!torch_error(kept).is_out_of_memory(), "{kept}");
        }
        // Not a libtorch error, whatever its text (Accelerate: not a RuntimeError).
        let io: Box<dyn std::error::Error + Send + Sync> =
            Box::new(std::io::Error::other("CUDA out of memory. Tried"));
        assert!(!io.is_out_of_memory());
        // A libtorch error kept as the source of the user's own error is found.
        let wrapped = Error::ChainedOperation {
            op: "step",
            source: Box::new(Error::torch("mm", torch_error("CUDA out of memory. Tried"))),
        };
        assert!(wrapped.is_out_of_memory());
    }

    #[test]
    fn sizes_shrink_by_a_tenth_and_other_errors_come_back_unchanged() {
        let mut tried = Vec::new();
        let got = find_executable_batch_size(128, |bs| {
            tried.push(bs);
            if bs > 100 {
                Err(torch_error("CUDA out of memory. Tried to allocate"))
            } else {
                Ok(bs)
            }
        })
        .unwrap();
        assert_eq!((got, tried), (92, vec![128, 115, 103, 92]));

        #[derive(Debug, PartialEq)]
        struct Mine(u32);
        impl OutOfMemory for Mine {
            fn is_out_of_memory(&self) -> bool {
                false
            }
        }
        match find_executable_batch_size(8, |_| -> Result<(), Mine> { Err(Mine(7)) }) {
            Err(BatchSizeError::Failed(e)) => assert_eq!(e, Mine(7)),
            other => panic!("{other:?}"),
        }

        let zero = find_executable_batch_size(3, |_| -> Result<(), _> {
            Err(torch_error("CUDA out of memory. Tried"))
        })
        .unwrap_err();
        assert_eq!(
            zero.to_string(),
            "No executable batch size found, reached zero."
        );
        assert!(matches!(
            zero,
            BatchSizeError::ReachedZero { last: Some(_) }
        ));
        let never = find_executable_batch_size(0, |_| -> Result<(), tch::TchError> {
            panic!("not called with 0")
        });
        assert!(matches!(
            never,
            Err(BatchSizeError::ReachedZero { last: None })
        ));
    }

    #[test]
    fn the_size_carries_over_and_can_be_reduced_another_way() {
        let mut finder = ExecutableBatchSize::new(64).reduce_batch_size_fn(|b| b / 2);
        let fits = |bs: usize| {
            if bs > 20 {
                Err(torch_error("CUDA out of memory. Tried"))
            } else {
                Ok(bs)
            }
        };
        assert_eq!(finder.run(fits).unwrap(), 16);
        assert_eq!(finder.batch_size(), 16);
        let mut first = None;
        finder
            .run(|bs| -> Result<(), tch::TchError> {
                first.get_or_insert(bs);
                Ok(())
            })
            .unwrap();
        assert_eq!(
            first,
            Some(16),
            "the next call starts where the last one ended"
        );
        // hasten::Result functions: `?` gives hasten's error, the function's own unchanged.
        let e: Error = find_executable_batch_size(2, |_| -> crate::Result<()> {
            Err(Error::InvalidValue {
                name: "x".into(),
                detail: "mine".into(),
            })
        })
        .unwrap_err()
        .into();
        assert!(matches!(e, Error::InvalidValue { .. }));
    }
}
