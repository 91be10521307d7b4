//! `time-onnx inspect`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use time_onnx::edit::operator_file;
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
    if model.extension().is_some_and(|e| e == "safetensors") {
        return inspect_operator(&model, json);
    }
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

/// An edit operator file: its record and how far A is from the identity.
fn inspect_operator(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let (op, meta) = operator_file::load(path)?;
    let d = op.dim();
    let change = (&op.transposed() - &ndarray::Array2::<f64>::eye(d))
        .mapv(|v| v * v)
        .sum()
        .sqrt();
    if json {
        let v = serde_json::json!({ "path": path.display().to_string(), "operator": meta, "norm_a_minus_i": change });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).context("serialising")?
        );
    } else {
        println!("{}", path.display());
        println!("  edit operator A: {d}×{d} f32, ‖A − I‖ = {change:.3e}");
        let spec = &meta.spec;
        if spec.edits.is_empty() {
            println!("  source      {:?}", spec.source);
            println!("  destination {:?}", spec.destination);
        } else {
            println!("  {} edits solved together:", spec.edits.len());
            for e in &spec.edits {
                println!("    {:?} → {:?}", e.source, e.destination);
            }
        }
        if spec.erase {
            println!("  UCE erase/replace (positions from the last word on)");
        }
        if let Some(p) = &spec.preservation {
            println!("  preserving  {} prompts at scale {}", p.prompts, p.scale);
        }
        println!("  lambda      {}", spec.lambda);
        println!("  augmentations {:?}", spec.augmentations);
        println!("  text encoder fingerprint {}", meta.text_encoder);
        println!("  written by {}", spec.tool);
    }
    Ok(())
}
