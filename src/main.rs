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
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The chain of causes, outermost first, on one line. Our error messages
/// already quote their source, so a cause the previous message ends with is
/// not repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
