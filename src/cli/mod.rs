//! Command-line interface: argument definitions and one function per command.
//! Only this module knows clap; the library sees plain option structs.

mod advice;
mod doctor;
mod edit;
mod eval;
mod generate;
mod grid;
mod inspect;
pub mod signals;

use clap::{Parser, Subcommand, ValueEnum};
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::runtime::{Device, Runtime};

pub use advice::one_line;

/// Edit the implicit assumptions of Stable Diffusion models inside their ONNX
/// files (TIME, Orgad et al. 2023), and generate images with the result.
#[derive(Debug, Parser)]
#[command(name = "time-onnx", version, max_term_width = 100)]
pub struct Cli {
    /// More log output (-v: info, -vv: debug, -vvv: trace); ONNX Runtime's own messages from -vv.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply a TIME edit to a UNet's cross-attention weights, writing a new ONNX file.
    Edit(edit::EditArgs),
    /// Generate images from a Stable Diffusion ONNX model folder.
    Generate(generate::GenerateArgs),
    /// Show what an ONNX model contains: inputs, outputs, weight storage.
    Inspect(inspect::InspectArgs),
    /// Score edits on a TIMED-format dataset: efficacy, generality, specificity (the paper's table).
    Eval(eval::EvalArgs),
    /// Tile PNG images into one, e.g. the same seeds before and after an edit.
    Grid(grid::GridArgs),
    /// Check which ONNX Runtime library is used and which execution providers work.
    Doctor,
}

/// How much to log.
#[derive(Clone, Copy, Debug)]
pub enum Verbosity {
    /// Errors only.
    Quiet,
    /// Warnings and errors (the default).
    Normal,
    /// -v, -vv, -vvv.
    Verbose(u8),
}

impl Cli {
    /// The log level the flags ask for.
    pub fn verbosity(&self) -> Verbosity {
        match (self.quiet, self.verbose) {
            (true, _) => Verbosity::Quiet,
            (false, 0) => Verbosity::Normal,
            (false, n) => Verbosity::Verbose(n),
        }
    }
}

/// Routes `tracing` (ours and ort's, which reports e.g. an execution provider
/// that failed to register) to stderr at the requested level.
pub fn init_logging(v: Verbosity) {
    // ONNX Runtime logs every graph transformation at info level: keep its
    // messages one step quieter than ours.
    let level = match v {
        Verbosity::Quiet => "error",
        Verbosity::Normal => "warn",
        Verbosity::Verbose(1) => "info,ort=warn",
        Verbosity::Verbose(2) => "debug,ort=info",
        Verbosity::Verbose(_) => "trace",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_target(matches!(v, Verbosity::Verbose(_)))
        .without_time()
        .init();
}

/// Runs the chosen command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        verbose: _,
        quiet: _,
        command,
    } = cli;
    match command {
        Command::Edit(args) => edit::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Grid(args) => grid::run(args),
        Command::Doctor => doctor::run(),
    }
}

/// `--device`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    Auto,
    Cuda,
    Cpu,
}

/// `--scheduler`: a CLI name or a diffusers class name.
fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse::<SchedulerKind>().map_err(|e| e.to_string())
}

/// The device every session of the run uses, decided once here so that
/// "CUDA unavailable" is said once, not per session.
fn resolve_device(rt: &Runtime, d: DeviceArg) -> Device {
    match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
        DeviceArg::Auto => {
            let choice = rt.choose_device(Device::Auto);
            match &choice.cuda_unavailable {
                None => eprintln!("running on CUDA"),
                Some(reason) => {
                    let short = reason.lines().next().unwrap_or_default();
                    tracing::warn!("CUDA is not available, running on CPU ({short})");
                }
            }
            choice.device
        }
    }
}
