//! The one error type of `hasten_launch`.

/// How a launch can fail. Variants name the rank, flag or program concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The arguments do not describe a valid launch.
    #[error("invalid launch: {0}")]
    Invalid(String),

    /// A worker could not be started.
    #[error("could not start rank {rank} ({program}): {source}")]
    Spawn {
        /// The rank being started.
        rank: usize,
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A worker failed; the others were stopped.
    #[error("rank {rank} failed: {cause}{}", format_tail(.last_lines))]
    RankFailed {
        /// The first rank that failed.
        rank: usize,
        /// How it failed ("exited with code 3", "killed by signal 9 (SIGKILL)", "panicked: …").
        cause: String,
        /// Its last lines of output, for the report.
        last_lines: Vec<String>,
        /// Its exit code, or 128 + the signal number.
        exit_code: i32,
    },

    /// The launch was interrupted (Ctrl-C, SIGTERM); every worker was stopped.
    #[error("interrupted: every rank was stopped")]
    Interrupted,

    /// The configuration file or the process environment is wrong (`hasten_core`'s errors).
    #[error(transparent)]
    Setup(#[from] hasten_core::Error),

    /// An operating-system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn format_tail(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("\nlast lines of its output:\n  {}", lines.join("\n  "))
    }
}

impl LaunchError {
    /// The exit code a command-line launcher should return for this error: the failing rank's own code,
    /// else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::RankFailed { exit_code, .. } => *exit_code,
            LaunchError::Interrupted => 130,
            _ => 1,
        }
    }
}

/// The `Result` of `hasten_launch`.
pub type Result<T, E = LaunchError> = std::result::Result<T, E>;
