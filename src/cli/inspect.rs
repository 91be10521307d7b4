//! `time-onnx inspect`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use time_onnx::onnx::{Model, Summary};

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An ONNX model file.
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let InspectArgs { model, json } = args;
    let m = Model::open(&model)?;
    let summary = Summary::of(&m)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).context("serialising the summary")?
        );
    } else {
        print!("{summary}");
    }
    Ok(())
}
