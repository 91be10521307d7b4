//! `time-onnx eval`: the paper's efficacy, generality and specificity on a
//! TIMED-format dataset; `--shard` and `--merge` cut it across machines.

use std::io::{IsTerminal, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use time_onnx::eval::ClassifierSpec;
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::runtime::Runtime;
use time_onnx::workflow::eval::{self, EvalRequest};
use time_onnx::workflow::merge::{self, MergeRequest};

use super::{DeviceArg, finite, parse_scheduler, parse_size, pipeline_session};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model folder (diffusers/optimum ONNX layout).
    #[arg(long, required_unless_present = "merge")]
    model: Option<PathBuf>,
    /// A TIMED-format CSV: old,new,positive1,gt1,…,positive5,gt5,negative1,gn1,…,negative5,gn5.
    #[arg(long, required_unless_present = "merge")]
    dataset: Option<PathBuf>,
    /// Rows to run, e.g. 0..8 (default: all).
    #[arg(long, value_parser = parse_range)]
    rows: Option<Range<usize>>,
    /// Evaluate only shard K (from 0) of N contiguous slices of the rows, e.g. 2/4; `--merge`
    /// combines the shards' reports.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Merge these shards' report folders into --output instead of evaluating: the report one
    /// run over every row writes (each shard checked: digest, grids, settings by content).
    #[arg(long, value_name = "DIR", num_args = 1.., conflicts_with_all = [
        "model", "dataset", "rows", "shard", "seeds", "steps", "guidance", "lambda", "preserve",
        "all_at_once", "scheduler", "classifier", "resume", "batch", "device", "max_memory", "threads",
    ])]
    merge: Vec<PathBuf>,
    /// Images per prompt, seeds 0..N (each seed's latents as `generate --seed k` draws them).
    #[arg(long, default_value_t = 8)]
    seeds: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5, value_parser = finite)]
    guidance: f64,
    /// TIME's λ (the paper uses 0.1).
    #[arg(long, default_value_t = time_onnx::edit::DEFAULT_LAMBDA, value_parser = finite)]
    lambda: f64,
    /// Prompts every row's edit must leave alone, one a line (UCE's preservation term).
    #[arg(long, value_name = "FILE")]
    preserve: Option<PathBuf>,
    /// Weight of the preservation term (UCE's preserve_scale).
    #[arg(long, default_value_t = time_onnx::edit::DEFAULT_PRESERVE_SCALE, value_parser = finite, requires = "preserve")]
    preserve_scale: f64,
    /// Solve every row's edit together and score every row on that one model (rows that edit
    /// one source two ways are refused).
    #[arg(long)]
    all_at_once: bool,
    /// Scheduler.
    #[arg(long, value_parser = parse_scheduler, default_value = "ddim")]
    scheduler: SchedulerKind,
    /// How images are judged: clip:<DIR> (an ONNX CLIP export) or toy (the toy world's rules,
    /// from <model>/world.json).
    #[arg(long, default_value = "toy")]
    classifier: ClassifierSpec,
    /// Report folder: results.json, report.md, row-NN.png.
    #[arg(short, long, default_value = "eval-report")]
    output: PathBuf,
    /// Continue a report in --output made with the same settings.
    #[arg(long)]
    resume: bool,
    /// Images per UNet batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Refuse sizes (--seeds, --batch) whose generation needs more memory than
    /// this, e.g. 8G (default: the memory available when the run starts).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Intra-op threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (k, n) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a shard like 2/4"))?;
    let n_ = |t: &str| t.trim().parse::<usize>().map_err(|e| format!("{t:?}: {e}"));
    let (k, n) = (n_(k)?, n_(n)?);
    if k >= n {
        return Err(format!(
            "shard {k}/{n}: shards are numbered from 0 to {}",
            n.saturating_sub(1)
        ));
    }
    Ok((k, n))
}

fn parse_range(s: &str) -> Result<Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range like 0..8"))?;
    let n = |t: &str| t.trim().parse::<usize>().map_err(|e| format!("{t:?}: {e}"));
    Ok(n(a)?..n(b)?)
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let EvalArgs {
        model,
        dataset,
        rows,
        shard,
        merge,
        seeds,
        steps,
        guidance,
        lambda,
        preserve,
        preserve_scale,
        all_at_once,
        scheduler,
        classifier,
        output,
        resume,
        batch,
        device,
        max_memory,
        threads,
    } = args;
    let (Some(model), Some(dataset)) = (model, dataset) else {
        return merge_shards(merge, output);
    };
    let rt = Runtime::load()?;
    let session = pipeline_session(&rt, device, threads);
    let req = EvalRequest {
        model,
        dataset,
        rows,
        shard,
        seeds,
        steps,
        guidance,
        lambda,
        preserve: preserve.map(|p| (p, preserve_scale)),
        all_at_once,
        scheduler,
        batch,
        classifier,
        output: output.clone(),
        resume,
        session,
        max_memory,
    };
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    // Logs (a cluster's workers, CI) get a line every tenth of the way.
    let mut logged = 0;
    let mut bar = |done: usize, total: usize| {
        if total == 0 {
            return;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let eta = elapsed / done as f64 * (total - done) as f64;
        let line = format!(
            "generations {done}/{total}  {:.0}%  ETA {:.0}:{:02.0}",
            100.0 * done as f64 / total as f64,
            (eta / 60.0).floor(),
            eta % 60.0
        );
        if tty {
            eprint!("\r{line} ");
            if done == total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        } else if done * 10 / total > logged {
            logged = done * 10 / total;
            eprintln!("{line}");
        }
    };
    let report = eval::run(&req, &mut bar).context("evaluating")?;
    print_means(&report.average);
    println!(
        "{} rows in {:.1} s; report in {}",
        report.rows.len(),
        start.elapsed().as_secs_f64(),
        output.join("report.md").display()
    );
    Ok(())
}

fn print_means(average: &std::collections::BTreeMap<String, time_onnx::eval::Scores>) {
    for (variant, s) in average {
        println!(
            "{variant:>9}: efficacy {:5.1}%  generality {:5.1}%  specificity {:5.1}%",
            100.0 * s.efficacy,
            100.0 * s.generality,
            100.0 * s.specificity
        );
    }
}

/// `eval --merge DIR… -o OUT`.
fn merge_shards(shards: Vec<PathBuf>, output: PathBuf) -> anyhow::Result<()> {
    let report = merge::run(&MergeRequest {
        shards,
        output: output.clone(),
    })
    .context("merging")?;
    print_means(&report.average);
    println!(
        "{} rows merged; report in {}",
        report.rows.len(),
        output.join("report.md").display()
    );
    Ok(())
}
