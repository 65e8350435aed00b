//! `hasten`: launch jobs, write configs, report the environment.

use anyhow::Context;
use clap::{Parser, Subcommand};
use hasten_launch::{HostFacts, LaunchArgs, LinePrefix, RunOptions, StdioSink};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser)]
#[command(
    name = "hasten",
    version,
    about = "Accelerate's launcher and tools, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run PROGRAM once per rank with the environment contract set, relaying every rank's output.
    Launch(Box<LaunchArgs>),
    /// Print versions, libtorch, devices and the default config (for bug reports).
    Env {
        /// Also run a bf16 matmul on the CPU and on every GPU.
        #[arg(long)]
        check: bool,
    },
    /// Print the memory needed to load and train a model, from a local checkpoint's headers.
    #[command(name = "estimate-memory", disable_help_flag = true)]
    EstimateMemory {
        /// MODEL (safetensors file, folder, *.index.json or JSON description) [--dtypes D...].
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write or inspect the launch configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Write a basic config for this machine (Accelerate's `accelerate config default`).
    Default {
        /// no, fp16, bf16 or fp8.
        #[arg(
            long = "mixed_precision",
            visible_alias = "mixed-precision",
            default_value = "no"
        )]
        mixed_precision: hasten_core::PrecisionType,
        /// Where to write it. Default: Accelerate's default_config.yaml.
        #[arg(long = "config_file", visible_alias = "config-file")]
        config_file: Option<PathBuf>,
    },
}

/// Set by SIGINT/SIGTERM; the supervisor then stops every rank.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn launch(args: &LaunchArgs) -> anyhow::Result<i32> {
    let file = hasten_launch::load_config_file(args.config_file.as_ref())?;
    let mut cfg = hasten_launch::merge(args, file.as_ref(), HostFacts::probe());
    cfg.extra_env
        .extend(hasten_launch::parallelism_env(args, file.as_ref())?);
    let reserved = hasten_launch::resolve_port(&mut cfg, &|w| eprintln!("{w}"))?;
    cfg.rdzv_secret = hasten_launch::rdzv_secret(cfg.num_machines, &|w| eprintln!("{w}"))?;
    let plan = hasten_launch::plan(&cfg)?;
    install_stop_handlers();
    let opts = RunOptions {
        max_restarts: args.max_restarts.unwrap_or(0),
        prefix: LinePrefix::new(args.log_line_prefix_template.clone()),
        sink: &StdioSink,
        stop: &STOP,
    };
    match hasten_launch::run_program(&plan, &args.program, &args.args, &opts, reserved) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("hasten launch: {e}");
            Ok(e.exit_code())
        }
    }
}

/// `hasten env` and `hasten estimate-memory` run helpers installed next to `hasten` (`hasten-env`,
/// `hasten-estimate-memory`): they need libtorch, and keeping libtorch out of `hasten` makes every
/// launch start in milliseconds instead of a fifth of a second.
fn run_helper(name: &str, args: &[String]) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("locating the hasten binary")?;
    let helper = exe.with_file_name(name);
    let mut cmd = std::process::Command::new(if helper.exists() {
        helper.as_os_str()
    } else {
        name.as_ref()
    });
    cmd.args(args);
    let status = cmd.status().with_context(|| {
        format!(
            "running {} (it is installed next to hasten)",
            helper.display()
        )
    })?;
    Ok(status.code().unwrap_or(1))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Launch(args) => launch(&args)?,
        Command::Env { check } => {
            let args = if check {
                vec!["--check".to_owned()]
            } else {
                Vec::new()
            };
            run_helper("hasten-env", &args)?
        }
        Command::EstimateMemory { args } => run_helper("hasten-estimate-memory", &args)?,
        Command::Config {
            action:
                ConfigAction::Default {
                    mixed_precision,
                    config_file,
                },
        } => {
            let gpus = hasten_launch::visible_gpu_count();
            let path =
                hasten_core::write_basic_config_for(mixed_precision, config_file.as_deref(), gpus)
                    .context("hasten config default")?;
            println!("hasten config saved at {}", path.display());
            0
        }
    };
    std::process::exit(code);
}
