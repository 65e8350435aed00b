//! # hasten_launch
//!
//! Starting hasten jobs: `hasten launch` runs a program once per rank with the environment contract set
//! (the same variables torchrun sets), relays every rank's output live with a rank prefix, and stops the
//! whole group cleanly when one rank fails. Plans are pure functions ([`plan()`]); only the spawners touch
//! processes.
//!
//! [`notebook_launcher`] forks workers from a running program (a notebook kernel, a test) and returns
//! the main rank's result. Each worker finds the environment contract set (`RANK`, `WORLD_SIZE`, …),
//! from which the runtime builds its state (`hasten::Accelerator::new()`, or
//! `hasten::ProcessGroup::init(&hasten::ProcessState::from_env()?)`); the launcher itself depends on
//! neither libtorch nor the runtime:
//!
//! ```no_run
//! use hasten_launch::notebook_launcher;
//! fn training_loop(lr: f64) -> Result<f64, std::num::ParseIntError> {
//!     let rank: usize = std::env::var("RANK").unwrap_or_default().parse()?;
//!     // … build the Accelerator, train, gather metrics …
//!     Ok(lr * (rank + 1) as f64)
//! }
//! let lr = notebook_launcher(training_loop, 1e-3, 2)?;
//! # Ok::<(), hasten_launch::LaunchError>(())
//! ```
//!
//! `notebook_launcher` runs inside the notebook's process, which already links libtorch (the cells use
//! it): it loads libtorch's CUDA half there once (loading initialises no CUDA; the check that CUDA is
//! still uninitialised follows) so that forked workers inherit it. The `hasten` binary never loads
//! libtorch.
//!
//! The launcher never initialises CUDA: it counts GPUs from the driver's `/proc` entries
//! ([`visible_gpu_count`]), so workers forked from it can still use their GPU.
#![deny(missing_docs)]

mod cli;
mod error;
mod exec;
mod host;
mod notebook;
mod parallelism;
mod plan;
mod relay;
mod supervise;

pub use cli::{HostFacts, LaunchArgs, load_config_file, merge, rdzv_secret, resolve_port};
pub use error::{LaunchError, Result};
pub use exec::{RunOptions, run_program};
pub use hasten_core::cuda_initialized_in_this_process;
pub use host::{
    PortReservation, cpu_count, port_is_free, reserve_port, visible_gpu_count, visible_gpus,
};
pub use notebook::{NotebookLauncher, debug_launcher, notebook_launcher};
pub use parallelism::{ParallelismArgs, parallelism_env};
pub use plan::{FOREIGN_CONTRACT_VARS, LaunchConfig, LaunchPlan, RankPlan, plan};
pub use relay::{LinePrefix, OutputSink, StdioSink, Stream};
