//! `time-onnx edit`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use std::io::{IsTerminal, Write};
use time_onnx::edit::{DEFAULT_AUGMENTATIONS, Targets};

use time_onnx::edit::record::{DebiasRecord, PromptPair};
use time_onnx::eval::ClassifierSpec;
use time_onnx::eval::dataset::{read_edit_pairs, read_prompts};
use time_onnx::onnx::summary::human_bytes;
use time_onnx::runtime::{Device, SessionOptions};
use time_onnx::workflow::debias::{self as debias_flow, DebiasRequest, Drawing};
use time_onnx::workflow::edit::{self, EditReport, EditRequest, Preserve, Progress};

use super::finite;
use super::text_side::TextSideArgs;

/// Arguments of `edit`.
#[derive(Debug, Args)]
pub struct EditArgs {
    /// The UNet to edit, e.g. my-model/unet/model.onnx. It is only read. Optional with
    /// --save-operator (then --model or --text-encoder and --tokenizer say where the text side is).
    #[arg(required_unless_present = "save_operator")]
    unet: Option<PathBuf>,
    /// The source prompt: what the model assumes, e.g. "A pack of roses".
    #[arg(long, required_unless_present = "edits")]
    src: Option<String>,
    /// The destination prompt: the same words plus what it should assume, e.g. "A pack of blue roses".
    #[arg(long, requires = "src")]
    dst: Option<String>,
    /// Many edits solved together into one: a CSV with src,dst columns (TIMED's old,new accepted).
    #[arg(long, value_name = "FILE.csv", conflicts_with_all = ["src", "dst"])]
    edits: Option<PathBuf>,
    /// UCE's erase/replace instead of TIME's edit: --dst (or each row's dst) is a guide concept
    /// that need not contain the source's words, e.g. --src "Van Gogh" --dst "art"; no --dst
    /// erases towards " ". Edits the positions from each prompt's last word on, as UCE does;
    /// no augmentation prompts unless --aug is given.
    #[arg(long)]
    erase: bool,
    /// Prompts the edit must leave alone, one a line (UCE's preservation term).
    #[arg(long, value_name = "FILE")]
    preserve: Option<PathBuf>,
    /// A preservation prior written by `time-onnx prior` for this text encoder.
    #[arg(long, value_name = "FILE.safetensors", conflicts_with = "preserve")]
    prior: Option<PathBuf>,
    /// Weight of the preservation term (UCE's preserve_scale).
    #[arg(long, default_value_t = time_onnx::edit::DEFAULT_PRESERVE_SCALE, value_parser = finite)]
    preserve_scale: f64,
    /// Where to write the edited UNet (external data, if any, goes beside it as <name>_data).
    #[arg(short, long, required_unless_present_any = ["dry_run", "save_operator"], requires = "unet")]
    output: Option<PathBuf>,
    /// The model folder holding text_encoder/ and tokenizer/ (and SDXL's text_encoder_2/ and
    /// tokenizer_2/; default: the UNet's parent's parent).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    text: TextSideArgs,
    /// Regularisation λ: larger keeps the model closer to the original (the paper uses 0.1).
    #[arg(long, default_value_t = time_onnx::edit::DEFAULT_LAMBDA, value_parser = finite)]
    lambda: f64,
    /// An augmentation prefix (repeatable); replaces the defaults "A photo of ", "An image of ", "A picture of ".
    #[arg(long = "aug", value_name = "TEXT")]
    augs: Vec<String>,
    /// Use no augmentation prompts, only the source/destination pair.
    #[arg(long, conflicts_with = "augs")]
    no_augs: bool,
    /// Edit only the value projections (the reference's with_to_k=False).
    #[arg(long)]
    values_only: bool,
    /// Also write the edited K/V weights as safetensors, torch [out, in] layout, keyed by diffusers module names.
    #[arg(long, value_name = "FILE")]
    save_weights: Option<PathBuf>,
    /// Also write the edit as an operator file (the d×d matrix A, ~2 MB for SD 1.x), which
    /// `time-onnx generate --edit` applies to the text embeddings of an unedited UNet.
    #[arg(long, value_name = "FILE.safetensors")]
    save_operator: Option<PathBuf>,
    /// Do everything but write: print what would change.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    debias: DebiasArgs,
}

/// `--debias` and its measuring flags.
#[derive(Debug, Args)]
#[command(next_help_heading = "Debiasing (UCE's debias loop)")]
struct DebiasArgs {
    /// Debias --src (a concept, e.g. "a doctor") towards a mix of --attribute prompts, measured by
    /// --judge on images drawn after each round, until every share is within --tolerance.
    #[arg(long, requires_all = ["src", "attributes", "judge"], conflicts_with_all = ["dst", "edits", "erase"])]
    debias: bool,
    /// An attribute prompt (repeatable), e.g. "a male doctor", "a female doctor".
    #[arg(long = "attribute", value_name = "TEXT", requires = "debias")]
    attributes: Vec<String>,
    /// The wanted share of each attribute, in order (repeatable; default: equal shares).
    #[arg(long = "share", value_name = "X", requires = "debias", value_parser = finite)]
    shares: Vec<f64>,
    /// Who says which attribute an image shows: "toy" (the toy world's rules) or clip:<DIR> (an
    /// ONNX CLIP export).
    #[arg(long, requires = "debias")]
    judge: Option<ClassifierSpec>,
    /// Images judged per round: the same seeds every round (from 2^40 on, never the small ones),
    /// four times as many once a round is within --tolerance and new seeds do not confirm it.
    #[arg(long, default_value_t = 64, requires = "debias")]
    judge_images: usize,
    /// Denoising steps of the judged images.
    #[arg(long, default_value_t = 25, requires = "debias")]
    judge_steps: usize,
    /// Stop when every share is within this of the wanted one (UCE's 0.05).
    #[arg(long, default_value_t = 0.05, requires = "debias", value_parser = finite)]
    tolerance: f64,
    /// Rounds at most (UCE's 30).
    #[arg(long, default_value_t = 30, requires = "debias")]
    max_rounds: usize,
    /// How far the first round moves the weights per unit of share missed (UCE's 0.1); doubled
    /// while the mix misses on one side (up to 16 times this), halved once past it.
    #[arg(long, default_value_t = 0.1, requires = "debias", value_parser = finite)]
    debias_step: f64,
}

pub fn run(args: EditArgs) -> anyhow::Result<()> {
    let EditArgs {
        unet,
        src,
        dst,
        edits,
        erase,
        preserve,
        prior,
        preserve_scale,
        output,
        model,
        text,
        lambda,
        augs,
        no_augs,
        values_only,
        save_weights,
        save_operator,
        dry_run,
        debias,
    } = args;
    let model_dir = match (&model, &unet) {
        (Some(m), _) => m.clone(),
        (None, Some(u)) => default_model_dir(u),
        (None, None) => PathBuf::from("."),
    };
    let text = text.resolve(&model_dir)?;
    // UCE adds no augmentation prompts unless asked; TIME adds its three.
    let augmentations = if no_augs || (erase && augs.is_empty()) {
        Vec::new()
    } else if augs.is_empty() {
        DEFAULT_AUGMENTATIONS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        augs
    };
    let req = EditRequest {
        unet: unet.clone(),
        output: if dry_run { None } else { output },
        save_operator: if dry_run { None } else { save_operator },
        text,
        edits: edit_pairs(src, dst, edits.as_deref(), erase, debias.debias)?,
        erase,
        debias: None,
        preserve: match (preserve, prior) {
            (Some(path), _) => Preserve::Prompts(
                read_prompts(&path).with_context(|| format!("--preserve {}", path.display()))?,
            ),
            (None, Some(path)) => Preserve::Prior(path),
            (None, None) => Preserve::Nothing,
        },
        preserve_scale,
        lambda,
        augmentations,
        targets: if values_only {
            Targets::ValuesOnly
        } else {
            Targets::KeysAndValues
        },
        save_weights,
    };
    if debias.debias {
        return run_debias(req, debias, &model_dir, dry_run);
    }
    let what = unet.as_ref().map_or_else(
        || "the edit operator".to_string(),
        |u| u.display().to_string(),
    );
    let tty = std::io::stderr().is_terminal();
    let mut status = |p: Progress| {
        if !tty {
            return;
        }
        match p {
            Progress::TextEncoder => eprint!("\rrunning the text encoder…\x1b[K"),
            Progress::Copy(done, total) => {
                eprint!(
                    "\rcopying the UNet: {} of {}\x1b[K",
                    human_bytes(done),
                    human_bytes(total)
                )
            }
        }
        let _ = std::io::stderr().flush();
    };
    let result = edit::run_with_progress(&req, &mut status);
    if tty {
        eprint!("\r\x1b[K");
    }
    let report = result.with_context(|| format!("editing {what}"))?;

    print_report(&report, dry_run, req.save_operator.as_deref());
    Ok(())
}

/// `edit --debias`: the loop, a line per round, then the edit.
fn run_debias(
    edit: EditRequest,
    args: DebiasArgs,
    model: &Path,
    dry_run: bool,
) -> anyhow::Result<()> {
    let DebiasArgs {
        debias: _,
        attributes,
        shares,
        judge,
        judge_images,
        judge_steps,
        tolerance,
        max_rounds,
        debias_step,
    } = args;
    let n = attributes.len();
    let wanted = if shares.is_empty() {
        vec![1.0 / n as f64; n]
    } else if shares.len() == n {
        shares
    } else {
        bail!(
            "give one --share per --attribute ({n} attributes, {} shares)",
            shares.len()
        );
    };
    let req = DebiasRequest {
        edit: EditRequest {
            debias: Some(DebiasRecord {
                attributes: attributes.clone(),
                wanted,
                weights: vec![0.0; n],
            }),
            ..edit
        },
        model: model.to_path_buf(),
        judge: judge.context("--debias needs --judge")?,
        images: judge_images,
        tolerance,
        max_rounds,
        step: debias_step,
        drawing: Drawing {
            steps: judge_steps,
            guidance: None,
            scheduler: None,
        },
        session: SessionOptions {
            device: Device::Auto,
            ..SessionOptions::default()
        },
    };
    let mut round = 0;
    let report = debias_flow::run(&req, &mut |r| {
        round += 1;
        let mix: Vec<String> = attributes
            .iter()
            .zip(&r.shares)
            .map(|(a, s)| format!("{a:?} {:.0}%", s * 100.0))
            .collect();
        let weights: Vec<String> = r.weights.iter().map(|w| format!("{w:+.3}")).collect();
        eprintln!(
            "round {round}: {} ({} images; weights {})",
            mix.join(", "),
            r.seeds.end - r.seeds.start,
            weights.join(" ")
        );
    })
    .with_context(|| format!("debiasing {:?}", req.edit.edits[0].source))?;
    if !report.converged {
        eprintln!(
            "warning: not within {tolerance} of the wanted shares after {max_rounds} rounds; the \
             edit uses the last round's weights"
        );
    }
    print_report(&report.edit, dry_run, req.edit.save_operator.as_deref());
    Ok(())
}

/// The pairs to solve: `--src`/`--dst`, or every row of `--edits`.
fn edit_pairs(
    src: Option<String>,
    dst: Option<String>,
    edits: Option<&Path>,
    erase: bool,
    debias: bool,
) -> anyhow::Result<Vec<PromptPair>> {
    match (src, dst, edits) {
        (_, _, Some(path)) => {
            read_edit_pairs(path).with_context(|| format!("--edits {}", path.display()))
        }
        (Some(source), Some(destination), None) => Ok(vec![PromptPair {
            source,
            destination,
        }]),
        (Some(source), None, None) if erase || debias => Ok(vec![PromptPair {
            source,
            destination: String::new(),
        }]),
        _ => bail!("give --src and --dst (only --src with --erase), or --edits"),
    }
}

/// `<model>/unet/model.onnx` → `<model>`.
fn default_model_dir(unet: &Path) -> PathBuf {
    unet.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn print_report(r: &EditReport, dry_run: bool, operator: Option<&Path>) {
    if r.unchanged {
        println!(
            "source and destination are the same prompt: nothing to edit, weights left unchanged"
        );
    }
    if dry_run {
        println!("would edit {} K/V weights:", r.layers.len());
        for l in &r.layers {
            let name = l.module.as_deref().unwrap_or(&l.initializer);
            println!(
                "  {:<18} {name}: relative change {:.3e}",
                format!("{:?}", l.role),
                l.relative_change
            );
        }
    }
    let edited: Vec<f64> = r
        .layers
        .iter()
        .map(|l| l.relative_change)
        .filter(|&c| c > 0.0)
        .collect();
    let mean = if edited.is_empty() {
        0.0
    } else {
        edited.iter().sum::<f64>() / edited.len() as f64
    };
    let total: f64 = r.timings.iter().map(|(_, d)| d.as_secs_f64()).sum();
    let history = if r.previous.is_empty() {
        String::new()
    } else {
        format!(" (edit #{} of this UNet)", r.previous.len() + 1)
    };
    let target = match &r.written {
        Some(w) => format!("; wrote {}", w.model.display()),
        None => String::new(),
    };
    if let Some(op) = operator {
        let d = r.operator.dim();
        let change = (&r.operator.transposed() - &ndarray::Array2::<f64>::eye(d))
            .mapv(|v| v * v)
            .sum()
            .sqrt();
        println!(
            "operator A ({d}×{d}, ‖A − I‖ = {change:.3e}) written to {}",
            op.display()
        );
    }
    if !r.layers.is_empty() {
        println!(
            "{} {} of {} K/V weights, mean relative change {mean:.3e}, in {total:.2} s{history}{target}",
            if dry_run { "would edit" } else { "edited" },
            edited.len(),
            r.layers.len(),
        );
    }
    let split: Vec<String> = r
        .timings
        .iter()
        .map(|(n, d)| format!("{n} {:.0} ms", d.as_secs_f64() * 1e3))
        .collect();
    tracing::info!("timings: {}", split.join(", "));
}
