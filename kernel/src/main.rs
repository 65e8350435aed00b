//! `hasten-kernel`: a Jupyter kernel for Rust built on evcxr, with hasten and `notebook_launcher` in scope
//! in every notebook.
//!
//! The same binary plays two parts. Started by Jupyter, it is the kernel: it speaks the messaging
//! protocol over ZeroMQ and drives evcxr. evcxr then starts it again as the *runner*, the process that
//! loads each compiled cell and keeps the notebook's variables; `notebook_launcher` forks the ranks from
//! there. The kernel itself never loads libtorch or touches CUDA.

mod code;
mod connection;
mod diagnose;
mod engine;
mod history;
mod install;
mod iopub;
mod output;
mod router;
mod server;
mod session;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hasten-kernel",
    version,
    about = "A Jupyter kernel for Rust with hasten in scope"
)]
struct Cli {
    /// Serve the kernel described by this connection file (what Jupyter runs).
    #[arg(short = 'f', long = "connection-file", global = false)]
    connection_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write the kernelspec ("Rust (hasten)") so Jupyter lists this kernel.
    Install(Where),
    /// Remove the kernelspec.
    Uninstall(Where),
    /// Compile hasten for notebooks now (into the shared cache), so the first notebook starts quickly.
    Warm,
}

#[derive(Args)]
#[group(multiple = false)]
struct Where {
    /// In the user's Jupyter data directory (the default).
    #[arg(long)]
    user: bool,
    /// In the active Python environment (VIRTUAL_ENV or CONDA_PREFIX).
    #[arg(long)]
    sys_prefix: bool,
    /// Under PREFIX/share/jupyter.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<PathBuf>,
}

impl Where {
    fn target(&self) -> install::Target {
        match (&self.prefix, self.sys_prefix) {
            (Some(p), _) => install::Target::Prefix(p.clone()),
            (None, true) => install::Target::SysPrefix,
            _ => install::Target::User,
        }
    }
}

/// In the runner process, before evcxr takes over: die with the kernel, let SIGINT interrupt (the
/// kernel may run with SIGINT ignored, which exec would pass on), and route output through the relay.
fn prepare_runner() {
    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
    // Without it an orphaned runner would outlive a killed kernel; with it, a kernel already gone (the
    // parent is init) means there is nothing to run for.
    let _ = set_parent_process_death_signal(Some(Signal::TERM));
    if getppid().is_none_or(|p| p.is_init()) {
        std::process::exit(0);
    }
    // SAFETY: the runner is single-threaded here (before evcxr starts); rustix has no signal-disposition
    // wrapper, and setting the environment races with no other thread.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        // evcxr asks for backtraces; in a notebook they are frames of evcxr's own machinery around a
        // one-line message. HASTEN_KERNEL_BACKTRACE=1 keeps them.
        if std::env::var_os("HASTEN_KERNEL_BACKTRACE").is_none() {
            std::env::set_var("RUST_BACKTRACE", "0");
        }
    }
    if std::env::var_os("HASTEN_KERNEL_NO_RELAY").is_some() {
        return;
    }
    if let Err(e) = hasten_kernel_io::capture_runner_output() {
        eprintln!("hasten-kernel runner: output relay unavailable ({e}); output arrives by lines");
    }
}

/// Settings the runner inherits; set while the kernel is still single-threaded.
fn prepare_environment(paths: &session::SessionPaths) {
    // SAFETY: called at the start of main, before any thread exists.
    unsafe {
        std::env::set_var("EVCXR_TMPDIR", &paths.crate_dir);
        // The runner loads cells that need libtorch and Rust's libstd. Cells carry a relative rpath to
        // the toolchain that only resolves when the session directory and the toolchain share no
        // directory but `/`, so name both directories outright.
        let mut dirs: Vec<String> = paths
            .libtorch
            .iter()
            .map(|t| t.join("lib").display().to_string())
            .collect();
        dirs.extend(session::rust_libdir().map(|d| d.display().to_string()));
        if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
            dirs.extend(old.split(':').filter(|d| !d.is_empty()).map(str::to_owned));
        }
        std::env::set_var("LD_LIBRARY_PATH", dirs.join(":"));
        // Interrupts come as messages; a terminal's Ctrl-C must not kill the kernel.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

fn serve(connection_file: PathBuf) -> Result<()> {
    let info = connection::read_connection_file(&connection_file)?;
    let paths = session::SessionPaths::create()?;
    prepare_environment(&paths);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(server::serve(info, paths.clone()));
    paths.remove();
    result
}

fn warm() -> Result<()> {
    // A kernel on a throwaway connection would do, but the engine alone is enough: start it and run
    // one cell that uses tch, so every dependency is compiled into the shared build directory.
    let paths = session::SessionPaths::create()?;
    prepare_environment(&paths);
    let started = std::time::Instant::now();
    let (publisher, mut rx) = iopub::channel();
    let engine = engine::Engine::start(paths.clone(), publisher, output::CellContext::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let parent = jupyter_protocol::JupyterMessage::new(
        jupyter_protocol::ExecuteRequest::new(String::new()),
        None,
    );
    let outcome = runtime.block_on(engine.execute(
        "let t = Tensor::from_slice(&[1.0f32, 2.0]).sum(Kind::Float); t.double_value(&[])".into(),
        &parent,
    ));
    while rx.try_recv().is_ok() {}
    paths.remove();
    match outcome.error {
        None => {
            println!(
                "hasten-kernel: hasten compiled for notebooks in {:.1?} (build cache {})",
                started.elapsed(),
                paths.shared_build.display()
            );
            Ok(())
        }
        // The engine has written why it could not start to stderr already (as it does into a kernel's log).
        Some(e) if e.ename == "KernelError" => {
            anyhow::bail!("warming failed: hasten could not be brought into scope (why: above)")
        }
        Some(e) => anyhow::bail!("{}: {}\n{}", e.ename, e.evalue, e.traceback.join("\n")),
    }
}

fn main() -> ExitCode {
    if let Some(session) = std::env::var_os(session::RUSTC_WRAPPER_VAR) {
        std::process::exit(session::rustc_wrapper(std::path::Path::new(&session)));
    }
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
        prepare_runner();
    }
    // Does not return when this process is evcxr's runner (or its rustc wrapper).
    evcxr::runtime_hook();
    let cli = Cli::parse();
    let result = match (cli.command, cli.connection_file) {
        (Some(Command::Install(w)), _) => install::install(&w.target()).map(|dir| {
            println!(
                "installed kernelspec {} in {}",
                install::KERNEL_NAME,
                dir.display()
            );
        }),
        (Some(Command::Uninstall(w)), _) => install::uninstall(&w.target()).map(|dir| match dir {
            Some(dir) => println!("removed kernelspec {}", dir.display()),
            None => println!("no {} kernelspec there", install::KERNEL_NAME),
        }),
        (Some(Command::Warm), _) => warm(),
        (None, Some(file)) => serve(file),
        (None, None) => Err(anyhow::anyhow!(
            "nothing to do: Jupyter runs `hasten-kernel --connection-file FILE`; see --help"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hasten-kernel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
