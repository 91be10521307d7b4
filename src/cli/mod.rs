//! Command-line interface: argument definitions and one function per command.
//! Only this module knows clap; the library sees plain option structs.

mod advice;
pub mod blas;
mod doctor;
mod edit;
mod eval;
mod generate;
mod grid;
mod inspect;
mod prior;
mod serve;
pub mod signals;
mod text_side;

use clap::{Parser, Subcommand, ValueEnum};
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::runtime::{Device, GraphOptimization, Runtime, SessionOptions};

pub use advice::{one_line, usage_line};

/// The help heading of -v/-q, so that every command's help lists them after
/// its own options rather than among them.
const GLOBAL: &str = "Global options";

/// Edit the implicit assumptions of Stable Diffusion models inside their ONNX
/// files (TIME, Orgad et al. 2023), and generate images with the result.
#[derive(Debug, Parser)]
#[command(name = "time-onnx", version, max_term_width = 100)]
pub struct Cli {
    /// More log output (-v: info, -vv: debug, -vvv: trace); ONNX Runtime's own messages from -vv.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = GLOBAL)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = GLOBAL)]
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
    /// Embed prompts to preserve into a reusable prior (Σ c cᵀ) for `edit --prior`.
    Prior(prior::PriorArgs),
    /// Score edits on a TIMED-format dataset: efficacy, generality, specificity (the paper's table).
    Eval(eval::EvalArgs),
    /// Serve one model over HTTP, every request with its own edits (JSON API, Open Inference Protocol v2).
    Serve(serve::ServeArgs),
    /// Tile PNG images into one, e.g. the same seeds before and after an edit.
    Grid(grid::GridArgs),
    /// Check which ONNX Runtime library is used, which execution providers work, and the BLAS kernels.
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
        Command::Prior(args) => prior::run(args),
        Command::Serve(args) => serve::run(args),
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

/// A float flag's value, refused when NaN or infinite: such a value would
/// flow into the maths and give a black or noise image, or an edit of NaNs.
fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{s} is not a finite number"))
    }
}

/// `--max-memory`: bytes, or a number with K, M, G, T (powers of 1000, as
/// error lines print sizes) or Ki, Mi, Gi, Ti (powers of 1024); a trailing B
/// is optional.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.strip_suffix('B').unwrap_or(&unit);
    let (prefix, base) = match unit.strip_suffix('I') {
        Some(p) => (p, 1024_f64),
        None => (unit, 1000_f64),
    };
    let power = match prefix {
        "" if base == 1000.0 => 0,
        "K" => 1,
        "M" => 2,
        "G" => 3,
        "T" => 4,
        _ => {
            return Err(format!(
                "{s:?}: the unit must be K, M, G, T or Ki, Mi, Gi, Ti"
            ));
        }
    };
    let value: f64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 8G or 512M"))?;
    let bytes = value * base.powi(power);
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{s:?} is not a usable memory size"));
    }
    Ok(bytes as u64)
}

/// `--scheduler`: a CLI name or a diffusers class name.
fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse::<SchedulerKind>().map_err(|e| e.to_string())
}

/// Session settings of a command that runs whole pipelines (eval, serve):
/// the device resolved once, the default graph optimisation.
fn pipeline_session(rt: &Runtime, device: DeviceArg, threads: Option<usize>) -> SessionOptions {
    SessionOptions {
        device: resolve_device(rt, device),
        threads,
        optimization: GraphOptimization::Extended,
        ..SessionOptions::default()
    }
}

/// The device every session of the run uses, decided once here so that
/// "CUDA unavailable" is said once, not per session.
fn resolve_device(rt: &Runtime, d: DeviceArg) -> Device {
    match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
        DeviceArg::Auto => {
            let choice = rt.choose_device(Device::Auto);
            match (&choice.cuda_unavailable, choice.device) {
                (None, Device::Cuda) => eprintln!("running on CUDA"),
                (None, _) => tracing::info!(
                    "running on CPU: this ONNX Runtime build has no CUDA provider (see `time-onnx doctor`)"
                ),
                (Some(reason), _) => {
                    let short = reason.lines().next().unwrap_or_default();
                    tracing::warn!("CUDA is not available, running on CPU ({short})");
                }
            }
            choice.device
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("8G"), Ok(8_000_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100mb"), Ok(100_000_000));
        assert_eq!(parse_size("100Ki"), Ok(102_400));
        assert!(parse_size("8X").is_err());
        assert!(parse_size("8i").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999T").is_err());
    }

    #[test]
    fn float_flags_refuse_nan_and_infinities() {
        assert_eq!(finite("7.5"), Ok(7.5));
        for bad in ["nan", "NaN", "inf", "-inf", "1e400"] {
            assert!(finite(bad).is_err(), "{bad}");
        }
    }
}
