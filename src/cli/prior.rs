//! `time-onnx prior`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use time_onnx::eval::dataset::read_prompts;
use time_onnx::workflow::prior::{self, PriorRequest};

/// Arguments of `prior`.
#[derive(Debug, Args)]
pub struct PriorArgs {
    /// The prompts to preserve, one a line (blank lines and #-comments skipped).
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    /// Where to write the prior (safetensors).
    #[arg(short, long, value_name = "FILE.safetensors")]
    output: PathBuf,
    /// The model folder holding text_encoder/ and tokenizer/.
    #[arg(long, default_value = ".")]
    model: PathBuf,
    /// The text encoder ONNX file (default: <model>/text_encoder/model.onnx).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// The tokenizer folder (default: <model>/tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

pub fn run(args: PriorArgs) -> anyhow::Result<()> {
    let PriorArgs {
        prompts,
        output,
        model,
        text_encoder,
        tokenizer,
    } = args;
    let text_encoder =
        text_encoder.unwrap_or_else(|| model.join("text_encoder").join("model.onnx"));
    let tokenizer = tokenizer.unwrap_or_else(|| model.join("tokenizer"));
    super::edit::require_text_side(&text_encoder, &tokenizer)?;
    let req = PriorRequest {
        prompts: read_prompts(&prompts)
            .with_context(|| format!("--prompts {}", prompts.display()))?,
        text_encoder,
        tokenizer,
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
        report.meta.prompts.div_ceil(prior::BATCH),
        prior::BATCH,
        report.total_time.as_secs_f64(),
    );
    Ok(())
}
