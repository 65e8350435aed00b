//! # hasten_launch
//!
//! Starting hasten jobs: `hasten launch` runs a program once per rank with the environment contract set
//! (the same variables torchrun sets), relays every rank's output live with a rank prefix, and stops the
//! whole group cleanly when one rank fails. Plans are pure functions ([`plan()`]); only the spawners touch
//! processes.
//!
//! The launcher never initialises CUDA: it counts GPUs from the driver's `/proc` entries
//! ([`visible_gpu_count`]), so workers forked from it can still use their GPU.
#![deny(missing_docs)]

mod cli;
mod error;
mod exec;
mod host;
mod plan;
mod relay;
mod report;
mod supervise;

pub use cli::{HostFacts, LaunchArgs, load_config_file, merge, resolve_port};
pub use error::{LaunchError, Result};
pub use exec::{RunOptions, run_program};
pub use host::{cpu_count, free_port, port_is_free, visible_gpu_count};
pub use plan::{FOREIGN_CONTRACT_VARS, LaunchConfig, LaunchPlan, RankPlan, plan};
pub use relay::{LinePrefix, OutputSink, StdioSink, Stream};
pub use report::env_report;
