//! The `time-onnx` command: parse, dispatch, report.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::signals::install();
    let args = <cli::Cli as clap::Parser>::parse();
    cli::init_logging(args.verbosity());
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", cli::one_line(&err));
            ExitCode::FAILURE
        }
    }
}
