//! `time-onnx generate`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use time_onnx::edit::Operator;
use time_onnx::edit::operator_file::{self, OperatorMeta};
use time_onnx::pipeline::png::{read_npy, write_npy, write_png};
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::runtime::{GraphOptimization, Runtime, SessionOptions};
use time_onnx::text::encoder::Embedded;
use time_onnx::workflow::generate::{Generator, ImageText, Images, Params};

use super::{DeviceArg, finite, parse_scheduler, parse_size, resolve_device};

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
    /// Classifier-free guidance scale; 1 or less turns guidance off (default: diffusers' for the
    /// folder's pipeline: 7.5 for Stable Diffusion, 5 for SDXL; SDXL-Turbo and SD-Turbo want 0).
    /// An LCM-distilled UNet reads it as an embedding instead.
    #[arg(long, value_parser = finite)]
    guidance: Option<f64>,
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
    #[arg(long, default_value_t = 0.0, value_parser = finite)]
    eta: f64,
    /// Where to run: CUDA when it starts (auto), or insist on one.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Do not run the model folder's safety checker (when it has one).
    #[arg(long)]
    no_safety_checker: bool,
    /// ONNX Runtime's graph optimization: "extended" loads SD 1.x's UNet in ~1.4 s on 2 cores;
    /// "all" (ORT's and diffusers' default) takes 4–8 s more and is ~1% faster per step. For a
    /// float16 UNet on the CPU, "all" loads SD 1.x's ~12 s later with 1.3–1.8× the memory, for
    /// steps ~12% faster: worth it for long runs (BENCHMARKS.md "## float16 UNet load").
    #[arg(long, value_enum, default_value_t = GraphOptArg::Extended)]
    graph_opt: GraphOptArg,
    /// Refuse sizes (--height, --width, --num-images) whose generation needs more memory than
    /// this, e.g. 8G (default: the memory available when the run starts).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Threads (default: one per core). On the CPU, with an even count, a guided batch
    /// runs as two concurrent runs with half the threads each.
    #[arg(long)]
    threads: Option<usize>,
}

/// Up to this many prompts, the text encoders load without pre-packing
/// their weights (`Generator::with_few_prompts`): the seconds that saves at
/// load outweigh the slower runs.
const FEW_PROMPTS: usize = 8;

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
        max_memory,
        threads,
    } = args;
    let prompts = read_prompts(prompt, prompts)?;
    let latents = latents.as_deref().map(read_latents).transpose()?;

    let rt = Runtime::load()?;
    let optimization = match graph_opt {
        GraphOptArg::Extended => GraphOptimization::Extended,
        GraphOptArg::All => GraphOptimization::All,
    };
    let device = resolve_device(&rt, device);
    let opts = SessionOptions {
        device,
        threads,
        optimization,
        ..SessionOptions::default()
    };
    let mut generator = Generator::open(&rt, &model, unet.as_deref(), opts)
        .with_context(|| format!("loading {}", model.display()))?;
    if no_safety_checker {
        generator = generator.without_safety_checker();
    }
    if prompts.len() <= FEW_PROMPTS {
        generator = generator.with_few_prompts();
    }
    if let Some(bytes) = max_memory {
        generator = generator.with_memory_limit(bytes);
    }
    let operators = read_operators(&edit_files)?;
    generator.set_edit_operators(&operators, force)?;
    let (default_h, default_w) = generator.default_size();
    let params = Params {
        steps,
        guidance: guidance.unwrap_or_else(|| generator.default_guidance()),
        negative_prompt: negative_prompt.clone(),
        num_images,
        height: height.unwrap_or(default_h),
        width: width.unwrap_or(default_w),
        seed,
        latents,
        scheduler,
        eta,
    };
    let metas: Vec<&OperatorMeta> = operators.iter().map(|(_, m)| m).collect();
    let text = ImageText::of(&generator, &model, &params, &metas)?;
    // Every prompt through the text encoder first, then free it: the UNet
    // loads next and peak memory is the larger of the two, not their sum.
    let embeddings = prompts
        .iter()
        .map(|p| generator.embed(p, &negative_prompt))
        .collect::<Result<Vec<_>, _>>()?;
    generator.release_text_encoder();
    for (pi, (prompt, emb)) in prompts.iter().zip(&embeddings).enumerate() {
        let started = Instant::now();
        let (images, step_ends) = timed_generation(&mut generator, emb, &params)?;
        for (i, f) in images.flagged.iter().enumerate() {
            if *f {
                eprintln!(
                    "warning: the safety checker flagged image {i} of {prompt:?}; it was replaced by a black image"
                );
            }
        }
        let tag = (prompts.len() > 1).then_some(pi);
        match output_type {
            OutputType::Npy => write_array(&output, tag, &images)?,
            OutputType::Png => write_pngs(&output, tag, &images, prompt, &params, &text)?,
        }
        tracing::info!(
            "{:?}: {} image(s) in {:.2} s; {}",
            prompt,
            images.pixels.shape()[0],
            started.elapsed().as_secs_f64(),
            step_summary(&step_ends)
        );
    }
    Ok(())
}

/// One prompt's images, with a progress line on a terminal and the instant
/// each denoising step ended.
fn timed_generation(
    generator: &mut Generator,
    emb: &Embedded,
    params: &Params,
) -> anyhow::Result<(Images, Vec<Instant>)> {
    let mut print = progress_printer();
    let mut step_ends = Vec::with_capacity(params.steps + 1);
    let images = generator.generate(emb, params, &mut |done, total| {
        step_ends.push(Instant::now());
        print(done, total);
    })?;
    Ok((images, step_ends))
}

/// `--prompt`, or the non-empty lines of `--prompts`.
fn read_prompts(prompt: Option<String>, file: Option<PathBuf>) -> anyhow::Result<Vec<String>> {
    let prompts: Vec<String> = match (prompt, file) {
        (Some(p), _) => vec![p],
        (None, Some(file)) => {
            time_onnx::bounded::read_to_string(&file, time_onnx::bounded::TEXT_LIMIT)
                .with_context(|| format!("reading {}", file.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        }
        (None, None) => bail!("give --prompt or --prompts"),
    };
    if prompts.is_empty() {
        bail!("the prompts file has no prompts");
    }
    Ok(prompts)
}

/// The `--edit` files, in order.
fn read_operators(files: &[PathBuf]) -> anyhow::Result<Vec<(Operator, OperatorMeta)>> {
    files
        .iter()
        .map(|p| {
            operator_file::load(p).with_context(|| format!("reading edit operator {}", p.display()))
        })
        .collect()
}

/// `--latents FILE.npy`.
fn read_latents(path: &Path) -> anyhow::Result<ndarray::ArrayD<f32>> {
    let (shape, data) =
        read_npy(path).with_context(|| format!("reading latents {}", path.display()))?;
    ndarray::ArrayD::from_shape_vec(shape, data).context("latents")
}

/// The float images of one prompt as one .npy.
fn write_array(output: &Path, tag: Option<usize>, images: &Images) -> anyhow::Result<()> {
    let path = numbered(output, tag, None);
    let pixels = images.pixels.as_standard_layout();
    let data = pixels.as_slice().context("images in standard layout")?;
    write_npy(&path, pixels.shape(), data)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

/// One PNG per image, the parameters in its text chunks.
fn write_pngs(
    output: &Path,
    tag: Option<usize>,
    images: &Images,
    prompt: &str,
    params: &Params,
    text: &ImageText,
) -> anyhow::Result<()> {
    let n = images.pixels.shape()[0];
    for (i, img) in images.pixels.outer_iter().enumerate() {
        let path = numbered(output, tag, (n > 1).then_some(i));
        let chunks = text.chunks(prompt, params, i, images.flagged[i]);
        write_png(&path, img, &chunks).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
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
