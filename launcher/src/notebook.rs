//! `notebook_launcher` and `debug_launcher`: run a closure on N forked workers from inside a running
//! program (a notebook kernel, a test, a REPL), relay their output live, and return the main rank's
//! result.

use crate::host::{PortReservation, visible_gpus};
use crate::plan::{FOREIGN_CONTRACT_VARS, LaunchConfig, LaunchPlan, RankPlan, plan};
use crate::relay::{LinePrefix, OutputSink, StdioSink};
use crate::supervise::{STATUS_OK, Worker, kill_and_reap, supervise};
use crate::{LaunchError, Result};
use hasten_core::PrecisionType;
use hasten_core::cuda_initialized_in_this_process;
use serde::{Serialize, de::DeserializeOwned};
use std::fmt::Display;
use std::fs::File;
use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Accelerate's `notebook_launcher` options, as a builder. Every setter names Accelerate's default.
#[derive(Debug, Clone)]
pub struct NotebookLauncher {
    num_processes: usize,
    mixed_precision: PrecisionType,
    use_port: u16,
    master_addr: String,
    node_rank: usize,
    num_nodes: usize,
    max_restarts: u32,
    prefix: LinePrefix,
    use_cpu: bool,
    debug: Option<bool>,
    gpu_binding: Option<bool>,
}

impl NotebookLauncher {
    /// A launcher for `num_processes` processes on this machine.
    pub fn new(num_processes: usize) -> Self {
        NotebookLauncher {
            num_processes,
            mixed_precision: PrecisionType::No,
            use_port: hasten_core::DEFAULT_MASTER_PORT,
            master_addr: hasten_core::DEFAULT_MASTER_ADDR.to_owned(),
            node_rank: 0,
            num_nodes: 1,
            max_restarts: 0,
            prefix: LinePrefix::default(),
            use_cpu: false,
            debug: None,
            gpu_binding: None,
        }
    }

    /// Mixed precision for the workers, exported as ACCELERATE_MIXED_PRECISION (default `no`). Unlike
    /// Accelerate's, this setting reaches the workers.
    pub fn mixed_precision(mut self, mode: PrecisionType) -> Self {
        self.mixed_precision = mode;
        self
    }

    /// Rendezvous port (default 29500; 0 picks a free one; a busy port on one machine is replaced).
    pub fn use_port(mut self, port: u16) -> Self {
        self.use_port = port;
        self
    }

    /// Rendezvous address (default 127.0.0.1).
    pub fn master_addr(mut self, addr: impl Into<String>) -> Self {
        self.master_addr = addr.into();
        self
    }

    /// This machine's index among `num_nodes` (default 0).
    pub fn node_rank(mut self, rank: usize) -> Self {
        self.node_rank = rank;
        self
    }

    /// Number of machines (default 1); each runs `num_processes` workers.
    pub fn num_nodes(mut self, n: usize) -> Self {
        self.num_nodes = n;
        self
    }

    /// Restart the whole group up to `n` times after a failure (default 0).
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }

    /// Prefix of relayed lines, with `${rank}`, `${local_rank}`, `${role_name}` (default `[rank${rank}]: `).
    pub fn log_line_prefix_template(mut self, template: impl Into<String>) -> Self {
        self.prefix = LinePrefix::new(template);
        self
    }

    /// Forces the CPU (ACCELERATE_USE_CPU) even where GPUs exist (default: GPUs when present).
    pub fn cpu(mut self, on: bool) -> Self {
        self.use_cpu = on;
        self
    }

    /// Debug mode for the workers (default: whatever ACCELERATE_DEBUG_MODE says in this process).
    pub fn debug(mut self, on: bool) -> Self {
        self.debug = Some(on);
        self
    }

    /// Each worker sees only its own GPU (`CUDA_VISIBLE_DEVICES` = that GPU, so it computes on `cuda:0`),
    /// which starts CUDA faster; `false` shows every worker all the GPUs (rank i on `cuda:i`), as Python
    /// Accelerate does. Default: `HASTEN_GPU_BINDING`, else true.
    pub fn gpu_binding(mut self, on: bool) -> Self {
        self.gpu_binding = Some(on);
        self
    }

    /// Runs `function(args)` on every worker and returns the main rank's result (`None` on a machine
    /// without global rank 0). Fails with the first failing rank, its cause and its last lines, after
    /// stopping and reaping every worker.
    pub fn launch<A, T, E, F>(&self, function: F, args: A) -> Result<Option<T>>
    where
        F: Fn(A) -> std::result::Result<T, E>,
        A: Clone,
        T: Serialize + DeserializeOwned,
        E: Display,
    {
        self.launch_with(function, args, &StdioSink)
    }

    /// [`launch`](Self::launch) with the workers' lines sent to `sink`.
    pub fn launch_with<A, T, E, F>(
        &self,
        function: F,
        args: A,
        sink: &dyn OutputSink,
    ) -> Result<Option<T>>
    where
        F: Fn(A) -> std::result::Result<T, E>,
        A: Clone,
        T: Serialize + DeserializeOwned,
        E: Display,
    {
        if self.num_processes == 0 {
            return Err(LaunchError::Invalid(
                "num_processes must be at least 1: say how many processes to launch".into(),
            ));
        }
        let world = self
            .num_processes
            .checked_mul(self.num_nodes)
            .filter(|w| *w <= hasten_core::MAX_WORLD_SIZE);
        let Some(world) = world else {
            return Err(LaunchError::Invalid(format!(
                "num_processes {} × num_nodes {} is more processes than a job can have ({})",
                self.num_processes,
                self.num_nodes,
                hasten_core::MAX_WORLD_SIZE
            )));
        };
        if self.node_rank >= self.num_nodes {
            return Err(LaunchError::Invalid(format!(
                "node_rank {} must be less than num_nodes {}",
                self.node_rank, self.num_nodes
            )));
        }
        let gpu_list = if self.use_cpu {
            Vec::new()
        } else {
            visible_gpus()
        };
        let gpus = gpu_list.len();
        if self.num_processes == 1 && self.num_nodes == 1 {
            sink.note(if gpus > 0 {
                "Launching training on one GPU."
            } else {
                "Launching training on CPU."
            });
            return function(args)
                .map(Some)
                .map_err(|e| LaunchError::RankFailed {
                    rank: 0,
                    cause: format!("returned an error: {e}"),
                    last_lines: Vec::new(),
                    exit_code: 1,
                });
        }
        if hasten_core::distributed_state_initialized() {
            return Err(LaunchError::Invalid(
                "a process group (or Accelerator) already exists in this process: it must be created inside \
                 the training function. Restart the kernel and make sure no cell creates one before \
                 notebook_launcher."
                    .into(),
            ));
        }
        // Load libtorch's CUDA half here, once, so the workers inherit it instead of each loading it.
        // Loading initialises nothing: the check below still sees an uninitialised driver.
        let _ = hasten_core::libtorch();
        if cuda_initialized_in_this_process() {
            return Err(LaunchError::Invalid(
                "CUDA has been initialized in this process before notebook_launcher could fork its workers, \
                 and forked workers cannot use a CUDA context inherited from their parent. Keep every CUDA \
                 call (tensors on a GPU, hasten::utils::is_cuda_available, cuda_devices, …) inside the training \
                 function, then restart the kernel."
                    .into(),
            ));
        }
        if gpus > 0 && self.num_processes > gpus {
            return Err(LaunchError::Invalid(format!(
                "num_processes={} but only {gpus} GPU(s) are visible: use at most {gpus}, or .cpu(true)",
                self.num_processes
            )));
        }
        let mut cfg = LaunchConfig {
            num_processes: world,
            num_machines: self.num_nodes,
            machine_rank: self.node_rank,
            main_process_ip: self.master_addr.clone(),
            main_process_port: self.use_port,
            mixed_precision: self.mixed_precision,
            use_cpu: self.use_cpu || gpus == 0,
            gpu_ids: None,
            visible_gpus: gpu_list,
            gpu_binding: match self.gpu_binding {
                Some(on) => on,
                None => hasten_core::parse_flag_from_env(hasten_core::GPU_BINDING_VAR, true)?,
            },
            debug: match self.debug {
                Some(d) => d,
                None => hasten_core::debug_mode_from_env()?,
            },
            num_cpu_threads_per_process: None,
            cpu_count: crate::cpu_count(),
            rdzv_secret: crate::rdzv_secret(self.num_nodes, &|w| sink.note(w))?,
            // The forked ranks inherit this process's environment, FSDP settings included.
            extra_env: Vec::new(),
        };
        let mut reserved = crate::resolve_port(&mut cfg, &|w| sink.note(w))?;
        let launch_plan = plan(&cfg)?;
        sink.note(&format!(
            "Launching training on {} {}.",
            self.num_processes,
            if cfg.use_cpu { "CPUs" } else { "GPUs" }
        ));

        let stop = StopOnSignal::install();
        let mut restarts = 0;
        loop {
            let listen_fd = reserved.as_ref().map(PortReservation::fd);
            let forked = fork_all(&launch_plan, &function, &args, listen_fd);
            // Rank 0 owns the listener now; a restart binds the port by number.
            drop(reserved.take());
            let workers = forked?;
            let main_index = launch_plan.ranks.iter().position(|r| r.rank == 0);
            let outcome = supervise(workers, sink, &self.prefix, stop.flag);
            // A rank 0 killed while setting up shared memory leaves its segment: remove what died with it.
            hasten_core::sweep_stale_shm_segments();
            match outcome {
                Ok(statuses) => {
                    let Some(i) = main_index else {
                        return Ok(None);
                    };
                    let bytes = statuses[i]
                        .as_deref()
                        .and_then(|b| b.get(1..))
                        .unwrap_or_default();
                    return serde_json::from_slice(bytes).map(Some).map_err(|e| {
                        LaunchError::Invalid(format!(
                            "the main rank's return value does not read back: {e}"
                        ))
                    });
                }
                Err(LaunchError::RankFailed { rank, cause, .. })
                    if restarts < self.max_restarts && !stop.flag.load(Ordering::SeqCst) =>
                {
                    restarts += 1;
                    sink.note(&format!(
                        "hasten: rank {rank} failed ({cause}); restarting the group ({restarts}/{})",
                        self.max_restarts
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Accelerate's `notebook_launcher(function, args, num_processes)` on one machine: forks
/// `num_processes` workers (rank i on GPU i, or the CPU where there is none), relays their output and
/// returns the main rank's result. With one process, calls `function` here. See [`NotebookLauncher`]
/// for the other options.
pub fn notebook_launcher<A, T, E, F>(function: F, args: A, num_processes: usize) -> Result<T>
where
    F: Fn(A) -> std::result::Result<T, E>,
    A: Clone,
    T: Serialize + DeserializeOwned,
    E: Display,
{
    NotebookLauncher::new(num_processes)
        .launch(function, args)?
        .ok_or_else(|| LaunchError::Invalid("the main rank returned no value".into()))
}

/// Accelerate's `debug_launcher`: `num_processes` CPU workers on this machine, for testing distributed
/// code without GPUs.
pub fn debug_launcher<A, T, E, F>(function: F, args: A, num_processes: usize) -> Result<T>
where
    F: Fn(A) -> std::result::Result<T, E>,
    A: Clone,
    T: Serialize + DeserializeOwned,
    E: Display,
{
    NotebookLauncher::new(num_processes)
        .cpu(true)
        .use_port(0)
        .launch(function, args)?
        .ok_or_else(|| LaunchError::Invalid("the main rank returned no value".into()))
}

/// A pipe's (read, write) ends; close-on-exec keeps them out of any program a worker executes.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| LaunchError::Os {
        op: "creating a pipe",
        source: e.into(),
    })
}

/// Closes a descriptor this process owns but holds only by number (the inherited rendezvous listener,
/// stdout, stderr).
fn close(fd: RawFd) {
    // SAFETY: the caller owns `fd` and nothing uses it afterwards.
    unsafe { rustix::io::close(fd) }
}

/// Forks one worker per rank of the plan, each with pipes for its stdout, its stderr and its status
/// (success, and rank 0's return value).
fn fork_all<A, T, E, F>(
    launch_plan: &LaunchPlan,
    function: &F,
    args: &A,
    listen_fd: Option<RawFd>,
) -> Result<Vec<Worker>>
where
    F: Fn(A) -> std::result::Result<T, E>,
    A: Clone,
    T: Serialize,
    E: Display,
{
    let mut workers: Vec<Worker> = Vec::new();
    let parent = rustix::process::getpid();
    for rank_plan in &launch_plan.ranks {
        let out = pipe()?;
        let err = pipe()?;
        let status = pipe()?;
        // Anything buffered now would be written twice, once by each process.
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: fork of a process that may have other threads (a notebook's runner: hasten_kernel_io's
        // relay thread, libtorch's idle intra-op pool, whatever earlier cells started). Only this thread
        // exists in the child, so a lock another thread held at this instant would stay held there; what
        // makes the child safe anyway: CUDA is not initialised (checked before any fork: a forked CUDA
        // context is unusable); glibc's fork resets malloc's arena locks in the child, so it can
        // allocate; libtorch registers pthread_atfork handlers that drop its thread pool in the child,
        // which rebuilds it on first use; stdout and stderr were flushed just above and the relay thread
        // writes with raw write(2), never through their locks. The child runs only the worker body
        // below and leaves through _exit, never returning into the parent's code or destructors. Threads
        // a user's own cell left running while holding a lock are the one case this cannot cover, as
        // with Python's fork-based notebook_launcher.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let source = std::io::Error::last_os_error();
            kill_and_reap(&workers.iter().map(|w| w.pid).collect::<Vec<_>>());
            return Err(LaunchError::Spawn {
                rank: rank_plan.rank,
                program: "forked worker".into(),
                source,
            });
        }
        if pid == 0 {
            child(
                rank_plan,
                [out.1, err.1, status.1],
                listen_fd,
                parent,
                function,
                args.clone(),
            );
        }
        // The write ends are the child's now (dropping them closes the parent's copies); the read ends
        // are the supervisor's.
        drop((out.1, err.1, status.1));
        workers.push(Worker {
            rank: rank_plan.rank,
            local_rank: rank_plan.local_rank,
            pid,
            stdout: File::from(out.0),
            stderr: File::from(err.0),
            status: Some(File::from(status.0)),
        });
    }
    Ok(workers)
}

/// The worker side of a fork: become rank `plan.rank`, run the function, report, and `_exit` (never
/// return into the parent's code, never run its destructors).
fn child<A, T, E, F>(
    rank_plan: &RankPlan,
    [out, err, status]: [OwnedFd; 3],
    listen_fd: Option<RawFd>,
    parent: rustix::process::Pid,
    function: &F,
    args: A,
) -> !
where
    F: Fn(A) -> std::result::Result<T, E>,
    T: Serialize,
    E: Display,
{
    // In the freshly forked, single-threaded child: its own process group (so the supervisor can stop
    // everything this rank starts), death with the launching process (e.g. a kernel killed with -9) as
    // exec'd ranks have, and the pipes as stdout/stderr. A failure here would leave a rank the
    // supervisor cannot stop or hear: end at once instead (the supervisor reports the exit).
    let set_up = rustix::process::setpgid(None, None)
        .and_then(|()| rustix::stdio::dup2_stdout(&out))
        .and_then(|()| rustix::stdio::dup2_stderr(&err))
        .map_err(std::io::Error::from)
        .and_then(|()| crate::exec::die_with_parent(parent));
    if set_up.is_err() {
        // SAFETY: leaves the child at once, running nothing of the parent's state.
        unsafe { libc::_exit(1) }
    }
    drop((out, err));
    // SAFETY: single-threaded child: resetting dispositions (rustix has no sigaction wrapper) and the
    // environment races with no other thread.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_DFL);
        }
        for var in FOREIGN_CONTRACT_VARS {
            std::env::remove_var(var);
        }
        for (k, v) in &rank_plan.env {
            std::env::set_var(k, v);
        }
        // Rank 0 adopts the reserved listener; every other rank closes its copy, or its connection
        // attempts would queue on a socket nobody accepts if rank 0 died.
        if let Some(fd) = listen_fd {
            if rank_plan.rank == 0 {
                std::env::set_var(hasten_core::RDZV_LISTEN_FD_VAR, fd.to_string());
            } else {
                close(fd);
            }
        }
    }
    let mut status = File::from(status);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| function(args)));
    let code = match outcome {
        Ok(Ok(value)) => {
            let mut report = vec![STATUS_OK];
            let encoded = if rank_plan.rank == 0 {
                serde_json::to_vec(&value).map_err(|e| e.to_string())
            } else {
                Ok(Vec::new())
            };
            match encoded {
                Ok(bytes) => {
                    report.extend_from_slice(&bytes);
                    match status.write_all(&report) {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("rank {} could not report its result: {e}", rank_plan.rank);
                            1
                        }
                    }
                }
                Err(e) => {
                    eprintln!(
                        "rank {} could not send its return value: {e}",
                        rank_plan.rank
                    );
                    1
                }
            }
        }
        Ok(Err(e)) => {
            eprintln!("rank {} returned an error: {e}", rank_plan.rank);
            1
        }
        // The panic hook has already printed the message and location to stderr.
        Err(_) => 101,
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // Closing our output now tells the parent we are done, before the process (and its CUDA context)
    // has finished tearing down.
    close(1);
    close(2);
    drop(status);
    // SAFETY: leave without unwinding into the parent's stack or running its atexit handlers.
    unsafe { libc::_exit(code) }
}

/// While a launch runs, SIGINT/SIGTERM stop every worker instead of killing only this process; the
/// previous handlers come back afterwards.
struct StopOnSignal {
    flag: &'static AtomicBool,
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

impl StopOnSignal {
    fn install() -> Self {
        STOP_REQUESTED.store(false, Ordering::SeqCst);
        let mut previous = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: sigaction with a handler that only stores to an atomic.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = request_stop as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &action, &mut old) == 0 {
                    previous.push((sig, old));
                }
            }
        }
        StopOnSignal {
            flag: &STOP_REQUESTED,
            previous,
        }
    }
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: restoring the handler saved in install().
            unsafe {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }
}
