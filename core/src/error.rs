//! The error type of `hasten-core`: the process environment, Accelerate's string enums and the launch
//! configuration file. The runtime's own failures (collectives, checkpoints, libtorch) are `hasten::Error`,
//! which wraps this one as `hasten::Error::Setup`; the launcher wraps it as `LaunchError::Setup`.

use std::path::PathBuf;

/// What can go wrong while reading the process environment or a configuration. Variants name the
/// variable, key or file involved so that a message read on one rank of many says where to look.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An environment variable holds a value that does not parse.
    #[error("environment variable {var}={value:?} is not {expected}")]
    EnvParse {
        /// The variable's name.
        var: String,
        /// What it held.
        value: String,
        /// What was expected, in words ("a non-negative integer").
        expected: &'static str,
    },

    /// Two environment variables contradict each other (for example RANK ≥ WORLD_SIZE).
    #[error("inconsistent process environment: {detail}")]
    EnvInconsistent {
        /// What is inconsistent, naming both variables and their values.
        detail: String,
    },

    /// A string is not one of an enum's known forms.
    #[error("unknown {kind} {value:?}: expected one of {expected}")]
    UnknownVariant {
        /// The enum's name, e.g. `PrecisionType`.
        kind: &'static str,
        /// The string given.
        value: String,
        /// The accepted forms, comma-separated.
        expected: String,
    },

    /// `write_basic_config` refuses to replace an existing configuration.
    #[error(
        "configuration already exists at {}, will not override: run `hasten config` or pass another save location",
        path.display()
    )]
    ConfigExists {
        /// The file that already exists.
        path: PathBuf,
    },

    /// A configuration file is malformed or has unknown keys.
    #[error("config file {}: {detail}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, naming the key where there is one.
        detail: String,
    },

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
}

/// The `Result` of `hasten-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path` while doing `op`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
