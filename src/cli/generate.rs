//! `time-onnx generate`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use time_onnx::edit::operator_file;
use time_onnx::pipeline::png::{read_npy, write_npy, write_png};
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::runtime::{Device, GraphOptimization, Runtime, SessionOptions};
use time_onnx::workflow::generate::{Generator, Params};

/// Arguments of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model folder (diffusers convert-script or optimum ONNX layout).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A file with one prompt per line; the sessions are loaded once for all of them.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// What the images should not show.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// A UNet to use instead of the folder's, e.g. one written by `time-onnx edit`.
    #[arg(long)]
    unet: Option<PathBuf>,
    /// An edit operator from `time-onnx edit --save-operator` (repeatable, in the order the edits
    /// were made), applied to the text embeddings: the same images as the edited UNet.
    #[arg(long = "edit", value_name = "FILE.safetensors")]
    edits: Vec<PathBuf>,
    /// Apply edit operators computed with a different text encoder.
    #[arg(long)]
    force: bool,
    /// Output file; with several images, "-<n>" (and "-<prompt>" for --prompts) is added before the extension.
    #[arg(short, long, default_value = "out.png")]
    output: PathBuf,
    /// png: 8-bit images with the parameters in text chunks; npy: the float images [n, h, w, 3] in [0, 1].
    #[arg(long, value_enum, default_value_t = OutputType::Png)]
    output_type: OutputType,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Seed of time-onnx's RNG (xoshiro256++ and Box–Muller; not torch's).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Initial latents as a float32 .npy [n or 1, 4, h/8, w/8], instead of drawing them from --seed.
    #[arg(long, value_name = "FILE.npy")]
    latents: Option<PathBuf>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Image height in pixels (default: the UNet's sample size × the VAE factor).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels.
    #[arg(long)]
    width: Option<usize>,
    /// Scheduler (default: the one in scheduler/scheduler_config.json).
    #[arg(long, value_parser = parse_scheduler)]
    scheduler: Option<SchedulerKind>,
    /// DDIM's η (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Where to run: CUDA when it starts (auto), or insist on one.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Do not run the model folder's safety checker (when it has one).
    #[arg(long)]
    no_safety_checker: bool,
    /// ONNX Runtime's graph optimization: "extended" loads SD 1.x's UNet in ~1.4 s on 2 cores;
    /// "all" (ORT's and diffusers' default) takes 4–8 s more and is ~1% faster per step.
    #[arg(long, value_enum, default_value_t = GraphOptArg::Extended)]
    graph_opt: GraphOptArg,
    /// Threads (default: one per core). On the CPU, with an even count, a guided batch
    /// runs as two concurrent runs with half the threads each.
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputType {
    Png,
    Npy,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GraphOptArg {
    Extended,
    All,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum DeviceArg {
    Auto,
    Cuda,
    Cpu,
}

pub(super) fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse::<SchedulerKind>().map_err(|e| e.to_string())
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let GenerateArgs {
        model,
        prompt,
        prompts,
        negative_prompt,
        unet,
        edits: edit_files,
        force,
        output,
        output_type,
        steps,
        guidance,
        seed,
        latents,
        num_images,
        height,
        width,
        scheduler,
        eta,
        device,
        no_safety_checker,
        graph_opt,
        threads,
    } = args;
    let prompts: Vec<String> = match (prompt, prompts) {
        (Some(p), _) => vec![p],
        (None, Some(file)) => std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        (None, None) => bail!("give --prompt or --prompts"),
    };
    if prompts.is_empty() {
        bail!("the prompts file has no prompts");
    }
    let latents = match latents {
        Some(path) => {
            let (shape, data) =
                read_npy(&path).with_context(|| format!("reading latents {}", path.display()))?;
            Some(ndarray::ArrayD::from_shape_vec(shape, data).context("latents")?)
        }
        None => None,
    };

    let rt = Runtime::load()?;
    let device = resolve_device(&rt, device)?;
    let optimization = match graph_opt {
        GraphOptArg::Extended => GraphOptimization::Extended,
        GraphOptArg::All => GraphOptimization::All,
    };
    let opts = SessionOptions {
        device,
        threads,
        optimization,
    };
    let mut generator =
        Generator::open_with_safety(&rt, &model, unet.as_deref(), opts, no_safety_checker)
            .with_context(|| format!("loading {}", model.display()))?;
    let operators = edit_files
        .iter()
        .map(|p| {
            operator_file::load(p).with_context(|| format!("reading edit operator {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    generator.set_edit_operators(&operators, force)?;
    let (default_h, default_w) = generator.default_size();
    let params = Params {
        steps,
        guidance,
        negative_prompt: negative_prompt.clone(),
        num_images,
        height: height.unwrap_or(default_h),
        width: width.unwrap_or(default_w),
        seed,
        latents,
        scheduler,
        eta,
    };
    let kind = generator.scheduler_kind(&params)?;
    let edits = serde_json::to_string(&generator.edits).unwrap_or_default();
    let operator_text =
        serde_json::to_string(&operators.iter().map(|(_, m)| m).collect::<Vec<_>>())
            .unwrap_or_default();
    // Every prompt through the text encoder first, then free it: the UNet
    // loads next and peak memory is the larger of the two, not their sum.
    let embeddings = prompts
        .iter()
        .map(|p| generator.embed(p, &negative_prompt))
        .collect::<Result<Vec<_>, _>>()?;
    generator.release_text_encoder();
    for (pi, (prompt, emb)) in prompts.iter().zip(&embeddings).enumerate() {
        let started = Instant::now();
        let mut print = progress_printer();
        let mut step_ends = Vec::with_capacity(steps + 1);
        let (images, flagged) = generator.generate_embedded(emb, &params, &mut |done, total| {
            step_ends.push(Instant::now());
            print(done, total);
        })?;
        for (i, f) in flagged.iter().enumerate() {
            if *f {
                eprintln!(
                    "warning: the safety checker flagged image {i} of {prompt:?}; it was replaced by a black image"
                );
            }
        }
        let n = images.shape()[0];
        let tag = (prompts.len() > 1).then_some(pi);
        if output_type == OutputType::Npy {
            let path = numbered(&output, tag, None);
            write_npy(
                &path,
                images.shape(),
                images
                    .as_slice()
                    .unwrap_or(&images.to_owned().into_raw_vec_and_offset().0),
            )
            .with_context(|| format!("writing {}", path.display()))?;
            println!("{}", path.display());
        } else {
            for (i, img) in images.outer_iter().enumerate() {
                let path = numbered(&output, tag, (n > 1).then_some(i));
                let text = vec![
                    ("prompt".to_string(), prompt.clone()),
                    ("negative_prompt".to_string(), negative_prompt.clone()),
                    ("seed".to_string(), seed.to_string()),
                    ("image_index".to_string(), i.to_string()),
                    ("steps".to_string(), steps.to_string()),
                    ("scheduler".to_string(), kind.to_string()),
                    ("guidance".to_string(), guidance.to_string()),
                    (
                        "safety_checker".to_string(),
                        safety_text(generator.has_safety_checker(), flagged[i]),
                    ),
                    (
                        "size".to_string(),
                        format!("{}x{}", params.width, params.height),
                    ),
                    ("model".to_string(), model.display().to_string()),
                    (
                        "unet".to_string(),
                        generator.unet_path.display().to_string(),
                    ),
                    ("time_onnx.edits".to_string(), edits.clone()),
                    ("time_onnx.operators".to_string(), operator_text.clone()),
                    (
                        "Software".to_string(),
                        format!("time-onnx {}", env!("CARGO_PKG_VERSION")),
                    ),
                ];
                write_png(&path, img, &text)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
        }
        tracing::info!(
            "{:?}: {n} image(s) in {:.2} s; {}",
            prompt,
            started.elapsed().as_secs_f64(),
            step_summary(&step_ends)
        );
    }
    Ok(())
}

/// Decides the device once, so that "CUDA unavailable" is said once, not per session.
pub(super) fn resolve_device(rt: &Runtime, d: DeviceArg) -> anyhow::Result<Device> {
    Ok(match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
        DeviceArg::Auto => match rt.cuda_check() {
            Ok(()) => {
                eprintln!("running on CUDA");
                Device::Cuda
            }
            Err(e) => {
                let reason = e.to_string();
                let short = reason.lines().next().unwrap_or_default();
                tracing::warn!("CUDA is not available, running on CPU ({short})");
                Device::Cpu
            }
        },
    })
}

/// `out.png` → `out-<prompt>-<image>.png` as needed.
fn numbered(base: &Path, prompt: Option<usize>, image: Option<usize>) -> PathBuf {
    if prompt.is_none() && image.is_none() {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = base
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut name = stem;
    for part in [prompt, image].into_iter().flatten() {
        name.push_str(&format!("-{part}"));
    }
    base.with_file_name(format!("{name}{ext}"))
}

/// "denoising steps: median X ms (N timed)" from the instants at which each
/// step (UNet call, guidance, scheduler step) ended. The first step is left
/// out: it also opens the UNet session and warms ONNX Runtime's buffers.
fn step_summary(ends: &[Instant]) -> String {
    let mut ms: Vec<f64> = ends
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .collect();
    if ms.is_empty() {
        return "denoising steps: fewer than 2, none timed".into();
    }
    ms.sort_by(f64::total_cmp);
    let mid = ms.len() / 2;
    let median = if ms.len() % 2 == 1 {
        ms[mid]
    } else {
        (ms[mid - 1] + ms[mid]) / 2.0
    };
    format!(
        "denoising steps: median {median:.2} ms ({} timed, {:.2}–{:.2} ms)",
        ms.len(),
        ms[0],
        ms[ms.len() - 1]
    )
}

/// A progress line with steps/s on a terminal; nothing otherwise.
fn progress_printer() -> impl FnMut(usize, usize) {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    move |done, total| {
        if !tty {
            return;
        }
        let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-9);
        eprint!("\rstep {done}/{total}  {rate:.2} steps/s ");
        if done == total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

fn safety_text(ran: bool, flagged: bool) -> String {
    match (ran, flagged) {
        (false, _) => "not run".into(),
        (true, false) => "passed".into(),
        (true, true) => "flagged (image blacked out)".into(),
    }
}
