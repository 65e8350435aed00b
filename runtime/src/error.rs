//! The error type of hasten's runtime.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime. Variants name the op, rank, file or key involved so
/// that a message read on one rank of many says where to look.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The process environment, a configuration file or one of Accelerate's string enums is wrong
    /// (`hasten_core`'s errors: a variable that does not parse, RANK ≥ WORLD_SIZE, an unknown key).
    #[error(transparent)]
    Setup(#[from] hasten_core::Error),

    /// A file could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "writing", "creating the folder of").
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A model checkpoint or model description is malformed (bad header, missing shard, unknown dtype).
    #[error("checkpoint {}: {detail}", path.display())]
    Checkpoint {
        /// The file (or folder) at fault.
        path: PathBuf,
        /// What is wrong with it, naming the tensor or key where there is one.
        detail: String,
    },

    /// An argument's value cannot be used (a memory size, a device name).
    #[error("invalid {name}: {detail}")]
    InvalidValue {
        /// The argument, e.g. `max_memory`.
        name: String,
        /// What is wrong with it, quoting the value.
        detail: String,
    },

    /// A version requirement that cannot be understood.
    #[error("invalid version comparison {op:?} {version:?}: {detail}")]
    Version {
        /// The operator given.
        op: String,
        /// The version given.
        version: String,
        /// What is wrong.
        detail: String,
    },

    /// An operation asked for a device this process does not have.
    #[error("device unavailable: {detail}")]
    DeviceUnavailable {
        /// Which device and why.
        detail: String,
    },

    /// The process group could not form (unreachable master, wrong world size, duplicate rank, timeout).
    #[error("rendezvous failed: {detail}")]
    Rendezvous {
        /// What went wrong, naming ranks, addresses and variables.
        detail: String,
    },

    /// A collective failed on this rank or was aborted by another rank.
    #[error("{op} failed: {detail}")]
    Collective {
        /// The collective (`all_reduce`, `broadcast`, …).
        op: &'static str,
        /// Why, naming the ranks involved.
        detail: String,
    },

    /// A collective did not complete within the group's timeout because some rank never took part (stuck,
    /// stopped or too slow); the job cannot go on.
    #[error(
        "{op} (collective #{seq}) timed out after {waited_s:.0} s: {} (stuck, stopped, or slower than \
         the timeout; raise it with InitProcessGroupKwargs::timeout or HASTEN_COLLECTIVE_TIMEOUT)",
        describe_missing(missing)
    )]
    CollectiveTimeout {
        /// The collective.
        op: &'static str,
        /// Its number in the group's sequence of collectives (the same on every rank).
        seq: u64,
        /// How long this rank waited.
        waited_s: f64,
        /// The ranks that never reached it, when known (empty: not known).
        missing: Vec<usize>,
    },

    /// `split_batches` with a batch size the processes cannot share evenly (Accelerate's `ValueError`).
    #[error(
        "To use {what} in `split_batches` mode, the batch size ({}) needs to be a round multiple of the \
         number of processes ({num_processes}).",
        batch_size.map_or_else(|| "of varying batches".to_owned(), |b| b.to_string())
    )]
    SplitBatches {
        /// What was being sharded, as Accelerate names it (e.g. "`BatchSamplerShard`", "a `DataLoader`").
        what: &'static str,
        /// The batch size (None: the sampler's batches vary).
        batch_size: Option<usize>,
        /// The number of processes.
        num_processes: usize,
    },

    /// A shard of data that cannot exist: a process index outside the group, no processes, or an empty
    /// batch.
    #[error(
        "{what}: process {process_index} of {num_processes}{} is not a valid shard",
        batch_size.map_or_else(String::new, |b| format!(" with batch size {b}"))
    )]
    InvalidShard {
        /// The sharding type (`BatchSamplerShard`, `IterableDatasetShard`).
        what: &'static str,
        /// The process index asked for.
        process_index: usize,
        /// The number of processes.
        num_processes: usize,
        /// The batch size, where the shard has one.
        batch_size: Option<usize>,
    },

    /// Tensors that must share their first dimension do not (a `TensorDataset`).
    #[error(
        "TensorDataset: every tensor needs the same first dimension ({first_dim}); tensor {index} has shape \
         {shape:?}"
    )]
    DatasetLengths {
        /// The first tensor's first dimension.
        first_dim: i64,
        /// The tensor that differs.
        index: usize,
        /// Its shape.
        shape: Vec<i64>,
    },

    /// Elements that must share one structure (samples to collate, structures to concatenate) do not.
    #[error(
        "{op}: element 0 holds {expected} tensors but element {index} holds {found}; all elements must \
         share one structure"
    )]
    StructureMismatch {
        /// The operation (`collate`, `concatenate`).
        op: &'static str,
        /// Tensors in the first element.
        expected: usize,
        /// The element that differs.
        index: usize,
        /// Tensors in it.
        found: usize,
    },

    /// An operation over a list got an empty one.
    #[error("{op}: the list is empty")]
    EmptyInput {
        /// The operation.
        op: &'static str,
    },

    /// A parameter received no gradient in a backward that averages gradients, while
    /// `find_unused_parameters` is off (PyTorch's DDP refuses this too).
    #[error(
        "parameter {parameter} received no gradient on rank {rank} in this backward; if some parameters \
         are unused, set DistributedDataParallelKwargs::find_unused_parameters"
    )]
    UnusedParameter {
        /// The parameter's name in its VarStore.
        parameter: String,
        /// This rank.
        rank: usize,
    },

    /// An Accelerator operation was given a model another Accelerator prepared.
    #[error("{op}: this model ({variables} variables) was prepared by another Accelerator")]
    UnknownModel {
        /// The operation.
        op: &'static str,
        /// How many variables the model has, to tell which one it is.
        variables: usize,
    },

    /// A data loader's worker thread ended before producing a batch (it panicked or its dataset failed).
    #[error("data loader: worker {worker} stopped before batch {batch}")]
    DataWorkerStopped {
        /// The worker.
        worker: usize,
        /// The batch it owed.
        batch: usize,
    },

    /// Debug mode found tensors whose shapes differ across ranks (Accelerate's
    /// DistributedOperationException, with its message).
    #[error("{}", shape_mismatch_message(operation, shapes))]
    RankShapeMismatch {
        /// The operation, as Accelerate names it (`hasten::ops::gather`, …).
        operation: String,
        /// Every rank's tensor shapes, by rank.
        shapes: Vec<Vec<Vec<i64>>>,
    },

    /// Debug mode found a tensor on another device type than the one the processes compute on
    /// (Accelerate's DistributedOperationException, with its message).
    #[error(
        "One or more of the tensors passed to {operation} were not on the {expected} while the process is \
         configured for {expected} (process {rank} passed one on {found}). Please move it to the {expected} \
         before calling {operation}."
    )]
    RankDeviceMismatch {
        /// The operation, as Accelerate names it.
        operation: String,
        /// The device type the processes compute on (`cuda`, `cpu`).
        expected: String,
        /// The first rank that passed a tensor elsewhere.
        rank: usize,
        /// Where that tensor was.
        found: String,
    },

    /// An operation failed inside another one (Accelerate's chained_operation, whose message points to
    /// the earlier error in Python's traceback; here the message carries it).
    #[error("Error found while calling `{op}`: {source}")]
    ChainedOperation {
        /// The outer operation.
        op: &'static str,
        /// The error inside it.
        #[source]
        source: Box<Error>,
    },

    /// The connection to another rank broke during a collective: that process most likely died.
    #[error("{op}: lost the connection to rank {rank} (did that process exit or crash?): {source}")]
    PeerLost {
        /// The rank at the other end.
        rank: usize,
        /// The collective in progress.
        op: &'static str,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },

    /// `find_executable_batch_size` ran out of memory with every batch size down to zero.
    #[error("No executable batch size found, reached zero.")]
    NoExecutableBatchSize {
        /// The last out-of-memory error.
        #[source]
        last: Option<Box<Error>>,
    },

    /// An error raised by libtorch.
    #[error("libtorch error in {op}: {source}")]
    Torch {
        /// The operation that failed.
        op: &'static str,
        /// libtorch's message (from a `tch::TchError`, without its C++ stack trace).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Accelerate's shape-mismatch report: the operation, then one line per process with its shapes (one
/// tensor's shape alone, several as a list).
fn shape_mismatch_message(operation: &str, shapes: &[Vec<Vec<i64>>]) -> String {
    let text = |tensors: &Vec<Vec<i64>>| match tensors.as_slice() {
        [one] => format!("{one:?}"),
        many => format!(
            "[{}]",
            many.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let lines: Vec<String> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| format!("Process {i}: {}", text(s)))
        .collect();
    format!(
        "Cannot apply desired operation due to shape mismatches. All shapes across devices must be valid.\
         \n\nOperation: `{operation}`\nInput shapes:\n  - {}",
        lines.join("\n  - ")
    )
}

fn describe_missing(missing: &[usize]) -> String {
    match missing {
        [] => "the ranks that did not arrive are not known".into(),
        [one] => format!("rank {one} did not arrive"),
        many => {
            let list: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("ranks {} did not arrive", list.join(", "))
        }
    }
}

/// libtorch's message without its C++ stack trace.
#[derive(Debug)]
struct TorchMessage(String);

impl std::fmt::Display for TorchMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TorchMessage {}

/// The `Result` of hasten's runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A libtorch error raised while doing `op`. libtorch appends a C++ stack trace of dozens of lines to
    /// its messages; only the message is kept, so a rank's report stays readable.
    pub fn torch(op: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        let text = source.to_string();
        let message = text
            .split("\nException raised from")
            .next()
            .unwrap_or(&text)
            .trim_start_matches("Internal torch error: ")
            .trim()
            .to_owned();
        Error::Torch {
            op,
            source: Box::new(TorchMessage(message)),
        }
    }

    /// An I/O error on `path` while doing `op`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_shape_mismatches_print_like_accelerate() {
        let e = Error::RankShapeMismatch {
            operation: "hasten::ops::gather".into(),
            shapes: vec![vec![vec![1, 5]], vec![vec![1], vec![2, 3]]],
        };
        assert_eq!(
            e.to_string(),
            "Cannot apply desired operation due to shape mismatches. All shapes across devices must be \
             valid.\n\nOperation: `hasten::ops::gather`\nInput shapes:\n  - Process 0: [1, 5]\n  - \
             Process 1: [[1], [2, 3]]"
        );
    }

    #[test]
    fn setup_errors_keep_their_variant_and_text() {
        fn parse() -> Result<()> {
            Err(hasten_core::Error::EnvParse {
                var: "WORLD_SIZE".into(),
                value: "two".into(),
                expected: "a positive integer",
            })?
        }
        let e = parse().unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment variable WORLD_SIZE=\"two\" is not a positive integer"
        );
        assert!(matches!(
            e,
            Error::Setup(hasten_core::Error::EnvParse { ref var, .. }) if var == "WORLD_SIZE"
        ));
    }
}
