//! The `time-onnx` command: parse, dispatch, report.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::blas::use_the_cpus_kernels();
    cli::signals::install();
    let args = match <cli::Cli as clap::Parser>::try_parse() {
        Ok(args) => args,
        // --help and --version print to stdout and exit 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", cli::usage_line(&e));
            return ExitCode::FAILURE;
        }
    };
    cli::init_logging(args.verbosity());
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", cli::one_line(&err));
            ExitCode::FAILURE
        }
    }
}
