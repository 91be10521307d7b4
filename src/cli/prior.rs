//! `time-onnx prior`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use time_onnx::eval::dataset::read_prompts;
use time_onnx::text::encoder::BATCH;
use time_onnx::workflow::prior::{self, PriorRequest};

use super::text_side::TextSideArgs;

/// Arguments of `prior`.
#[derive(Debug, Args)]
pub struct PriorArgs {
    /// The prompts to preserve, one a line (blank lines and #-comments skipped).
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    /// Where to write the prior (safetensors).
    #[arg(short, long, value_name = "FILE.safetensors")]
    output: PathBuf,
    /// The model folder holding text_encoder/ and tokenizer/ (and SDXL's second pair).
    #[arg(long, default_value = ".")]
    model: PathBuf,
    #[command(flatten)]
    text: TextSideArgs,
}

pub fn run(args: PriorArgs) -> anyhow::Result<()> {
    let PriorArgs {
        prompts,
        output,
        model,
        text,
    } = args;
    let text = text.resolve(&model)?;
    let req = PriorRequest {
        prompts: read_prompts(&prompts)
            .with_context(|| format!("--prompts {}", prompts.display()))?,
        text,
        output,
    };
    let report = prior::run(&req).with_context(|| format!("building {}", req.output.display()))?;
    println!(
        "prior of {} prompts ({}×{} f64) written to {}; text encoder {:.2} s ({} runs of up to {}), {:.2} s in all",
        report.meta.prompts,
        report.meta.width,
        report.meta.width,
        req.output.display(),
        report.encoder_time.as_secs_f64(),
        report.meta.prompts.div_ceil(BATCH),
        BATCH,
        report.total_time.as_secs_f64(),
    );
    Ok(())
}
