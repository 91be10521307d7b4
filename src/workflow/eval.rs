//! The evaluation journey: for each dataset row, edit from the original
//! model, generate the row's prompts with fixed seeds on the unedited model,
//! the edited one and the oracle, classify every image, and score.
//!
//! Sessions are opened once. An edit is applied as its operator on the text
//! embeddings (W·A on every K/V weight is the same map as the original
//! weights on A·c, see `tests/operators.rs`), so moving to the next row costs
//! one text-encoder run and a 768×768 solve, never a UNet file or a session
//! rebuild.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array3, Array4, ArrayD, Axis, concatenate};

use crate::edit::Operator;
use crate::edit::record::{self, PromptPair};
use crate::eval::report::{
    self, Inputs, Preservation, PromptResult, Report, ReportError, RowResult, Set, Settings, Shard,
    Variant,
};
use crate::eval::{self, Classifier, ClassifierSpec, EvalError, Row, digest};
use crate::pipeline::rng::Rng;
use crate::pipeline::schedulers::SchedulerKind;
use crate::pipeline::{label, png};
use crate::runtime::{LoadError, Runtime, SessionOptions};
use crate::workflow::edit::{self as edit_flow, EditJobError, EditRequest, Preserve};
use crate::workflow::generate::{GenerateError, Generator, Params};
use crate::workflow::prior as prior_flow;

/// What to evaluate and how.
#[derive(Clone, Debug)]
pub struct EvalRequest {
    /// The model folder (diffusers/optimum layout).
    pub model: PathBuf,
    /// The TIMED-format CSV.
    pub dataset: PathBuf,
    /// Which rows (all when `None`).
    pub rows: Option<Range<usize>>,
    /// Only shard `k` of `n` contiguous slices of those rows, `(k, n)`: a
    /// report that `merge` combines with the other shards' into the one the
    /// whole range gives.
    pub shard: Option<(usize, usize)>,
    /// Seeds 0..seeds, one image each, per prompt.
    pub seeds: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// TIME's λ.
    pub lambda: f64,
    /// Prompts every row's edit must leave alone (UCE's preservation term),
    /// and its scale.
    pub preserve: Option<(PathBuf, f64)>,
    /// Every row's edit in one solve, every row scored on that one model
    /// (the many-concept setting of UCE and MACE), instead of one edit per row.
    pub all_at_once: bool,
    /// The scheduler.
    pub scheduler: SchedulerKind,
    /// Images per UNet batch.
    pub batch: usize,
    /// How images are judged.
    pub classifier: ClassifierSpec,
    /// The report folder.
    pub output: PathBuf,
    /// Continue the rows already in `output/results.json`.
    pub resume: bool,
    /// Session settings.
    pub session: SessionOptions,
    /// Bytes a batch may need (the memory available when `None`).
    pub max_memory: Option<u64>,
}

/// Everything that can stop an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalJobError {
    /// Rows to solve together that edit one source two ways.
    #[error(
        "rows conflict: {source_prompt:?} is edited both to {first:?} and to {second:?}; \
         solving every row at once needs one destination per source"
    )]
    ConflictingRows {
        /// The source prompt.
        source_prompt: String,
        /// One destination.
        first: String,
        /// The other.
        second: String,
    },
    /// Scoring side.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// Generation.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The edit.
    #[error(transparent)]
    Edit(#[from] EditJobError),
    /// ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] LoadError),
    /// No seeds, no steps or an empty batch.
    #[error("the seed count, the step count and the batch size must be at least 1")]
    NothingToDo,
    /// A row range that is empty or leaves the dataset.
    #[error("rows {}..{} are outside the dataset's 0..{rows}", .range.start, .range.end)]
    Rows {
        /// The range asked for.
        range: Range<usize>,
        /// The dataset's row count.
        rows: usize,
    },
    /// A shard that does not exist.
    #[error(
        "no shard {index}/{count}: rows {}..{} make at most {} shards, numbered from 0",
        .range.start, .range.end, .range.len()
    )]
    Shard {
        /// The shard asked for.
        index: usize,
        /// Of how many.
        count: usize,
        /// The rows to cut.
        range: Range<usize>,
    },
    /// A report exists where a new one would go.
    #[error("{} exists", .0.display())]
    ReportExists(PathBuf),
    /// The report to continue was made with other settings.
    #[error("{} was made with other settings ({settings:?})", .path.display())]
    OtherSettings {
        /// Its `results.json`.
        path: PathBuf,
        /// The settings it records.
        settings: Box<Settings>,
    },
    /// Reading or writing the report.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// An array operation on the images failed.
    #[error("images of {prompt:?}: {why}")]
    Images {
        /// The prompt.
        prompt: String,
        /// ndarray's report.
        why: String,
    },
    /// Writing the report.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Generations done and to do, for a progress bar.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// Runs the evaluation, writing `results.json`, `report.md` and one grid
/// PNG per row into `req.output` after every row.
pub fn run(req: &EvalRequest, progress: Progress) -> Result<Report, EvalJobError> {
    if req.seeds == 0 || req.steps == 0 || req.batch == 0 {
        return Err(EvalJobError::NothingToDo);
    }
    let rows = eval::dataset::read(&req.dataset)?;
    let kept = match &req.preserve {
        Some((path, _)) => Some(eval::dataset::read_prompts(path)?),
        None => None,
    };
    let range = req.rows.clone().unwrap_or(0..rows.len());
    if range.start >= range.end || range.end > rows.len() {
        return Err(EvalJobError::Rows {
            range,
            rows: rows.len(),
        });
    }
    let shard = match req.shard {
        Some((index, count)) => Some(Shard::of(range.clone(), index, count).ok_or(
            EvalJobError::Shard {
                index,
                count,
                range: range.clone(),
            },
        )?),
        None => None,
    };
    let scored = shard.as_ref().map_or(range.clone(), Shard::rows);
    if req.all_at_once {
        refuse_conflicts(&rows[range.clone()])?;
    }
    let settings = settings(req, inputs(req)?);
    let mut report = previous_report(&req.output.join("results.json"), req, settings, shard)?;
    if !req.output.is_dir() {
        std::fs::create_dir_all(&req.output).map_err(|source| EvalJobError::Io {
            path: req.output.clone(),
            source,
        })?;
    }

    let rt = Runtime::load()?;
    let mut generator =
        Generator::open(&rt, &req.model, None, req.session)?.without_safety_checker();
    if let Some(bytes) = req.max_memory {
        generator = generator.with_memory_limit(bytes);
    }
    let mut classifier = Classifier::open(&req.classifier, &rt, &req.model, req.session)?;
    let (height, width) = generator.default_size();
    // Every seed's latents are drawn now and a prompt's images are kept together.
    generator.check_memory(req.seeds, req.guidance, height, width)?;
    let f = generator.model.vae_factor;
    let latents: Vec<ArrayD<f32>> = (0..req.seeds as u64)
        .map(|s| Rng::new(s).randn(&[1, 4, height / f, width / f]))
        .collect();
    let params = Params {
        steps: req.steps,
        guidance: req.guidance,
        negative_prompt: String::new(),
        num_images: 0,
        height,
        width,
        seed: 0,
        latents: None,
        scheduler: Some(req.scheduler),
        eta: 0.0,
    };
    let todo: Vec<usize> = scored
        .filter(|i| !report.rows.iter().any(|r| r.index == *i))
        .collect();
    let per_row = |r: &Row| 3 * (1 + r.positives.len() + r.negatives.len());
    let total: usize = todo.iter().map(|&i| per_row(&rows[i])).sum();
    let mut done = 0;
    // The preservation prior, built once for every row's edit.
    let preserve = match &kept {
        Some(prompts) => {
            let (prior, _) = prior_flow::build(&rt, &generator.model.text, prompts, req.session)?;
            Preserve::Built(prior)
        }
        None => Preserve::Nothing,
    };
    let text_side = generator.model.text.clone();
    let edit = |rows: &[Row]| -> Result<Operator, EvalJobError> {
        let req = EditRequest {
            lambda: req.lambda,
            edits: rows
                .iter()
                .map(|r| PromptPair {
                    source: r.old.clone(),
                    destination: r.new.clone(),
                })
                .collect(),
            preserve: preserve.clone(),
            preserve_scale: req.preserve.as_ref().map_or(0.0, |(_, s)| *s),
            ..EditRequest::new(text_side.clone(), "", "")
        };
        Ok(edit_flow::run(&req)?.operator)
    };
    // All at once: one operator for every row of the range (every shard's
    // rows, not only this shard's), resumed or not.
    let together = if req.all_at_once {
        Some(edit(&rows[range.clone()])?)
    } else {
        None
    };
    let mut scorer = RowScorer {
        generator: &mut generator,
        classifier: &mut classifier,
        params: &params,
        latents: &latents,
        batch: req.batch,
    };
    for i in todo {
        let row = &rows[i];
        let start = Instant::now();
        let operator = match &together {
            Some(op) => op.clone(),
            None => edit(std::slice::from_ref(row))?,
        };
        let (prompts, grid_images) = scorer.score_row(row, &operator, &mut |n| {
            done += n;
            progress(done, total);
        })?;
        let scores = [Variant::Unedited, Variant::Edited, Variant::Oracle]
            .into_iter()
            .map(|v| {
                (
                    report::variant_name(v).to_string(),
                    report::score(&prompts, v),
                )
            })
            .collect();
        let grid = write_grid(&req.output.join(format!("row-{i:02}.png")), &grid_images)?;
        report.push(RowResult {
            index: i,
            old: row.old.clone(),
            new: row.new.clone(),
            scores,
            prompts,
            grid,
            seconds: start.elapsed().as_secs_f64(),
        });
        report::save(&req.output, &report)?;
    }
    generator.set_operator(None);
    // Also when every row was done already: `--resume` then re-renders the report.
    report.seal();
    report::save(&req.output, &report)?;
    Ok(report)
}

/// Rows solved together must not ask one source for two destinations.
fn refuse_conflicts(rows: &[Row]) -> Result<(), EvalJobError> {
    let pairs: Vec<PromptPair> = rows
        .iter()
        .map(|r| PromptPair {
            source: r.old.clone(),
            destination: r.new.clone(),
        })
        .collect();
    match record::conflicting_pairs(&pairs) {
        Some((first, second)) => Err(EvalJobError::ConflictingRows {
            source_prompt: second.source.clone(),
            first: first.destination.clone(),
            second: second.destination.clone(),
        }),
        None => Ok(()),
    }
}

/// The sessions and settings that generate and judge one row's images.
struct RowScorer<'a> {
    generator: &'a mut Generator,
    classifier: &'a mut Classifier,
    params: &'a Params,
    latents: &'a [ArrayD<f32>],
    batch: usize,
}

/// The first images of each prompt (named by the prompt the unedited model
/// was given), per variant, for a row's grid.
type GridImages = Vec<(Variant, String, Vec<Array3<f32>>)>;

impl RowScorer<'_> {
    /// Every prompt of `row` on the unedited model, the model edited by
    /// `operator`, and the oracle, judged; `progress(1)` after each prompt.
    fn score_row(
        &mut self,
        row: &Row,
        operator: &Operator,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(Vec<PromptResult>, GridImages), EvalJobError> {
        let mut prompts = Vec::new();
        let mut grid_images = Vec::new();
        let cases = row_cases(row);
        for variant in [Variant::Unedited, Variant::Edited, Variant::Oracle] {
            self.generator
                .set_operator((variant == Variant::Edited).then_some(operator));
            for (set, original, destination) in &cases {
                let prompt = match (variant, set) {
                    (Variant::Oracle, Set::Source | Set::Positive) => destination,
                    _ => original,
                };
                let images = self.generate(prompt)?;
                let picks = self
                    .classifier
                    .judge(images.view(), original, destination)?;
                if variant != Variant::Oracle {
                    let keep = images.shape()[0].min(4);
                    grid_images.push((
                        variant,
                        original.clone(),
                        images
                            .axis_iter(Axis(0))
                            .take(keep)
                            .map(|v| v.to_owned())
                            .collect(),
                    ));
                }
                prompts.push(PromptResult {
                    variant,
                    set: *set,
                    prompt: prompt.clone(),
                    candidates: [original.clone(), destination.clone()],
                    picks,
                });
                progress(1);
            }
        }
        Ok((prompts, grid_images))
    }

    /// Images `[seeds, h, w, 3]` for one prompt, seed k starting from the
    /// latents `Rng::new(k)` draws for one image, so that they equal
    /// `time-onnx generate --seed k`'s, and a script can draw the same.
    fn generate(&mut self, prompt: &str) -> Result<Array4<f32>, EvalJobError> {
        let shape_error = |e: ndarray::ShapeError| EvalJobError::Images {
            prompt: prompt.to_string(),
            why: e.to_string(),
        };
        let emb = self.generator.embed(prompt, &self.params.negative_prompt)?;
        let mut parts = Vec::new();
        for chunk in self.latents.chunks(self.batch) {
            let views: Vec<_> = chunk.iter().map(|l| l.view()).collect();
            let l = concatenate(Axis(0), &views).map_err(shape_error)?;
            let p = Params {
                num_images: chunk.len(),
                latents: Some(l),
                ..self.params.clone()
            };
            parts.push(self.generator.generate(&emb, &p, &mut |_, _| {})?.pixels);
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        concatenate(Axis(0), &views).map_err(shape_error)
    }
}

/// The row's prompts: (set, original-style prompt, destination-style prompt).
/// For negatives the oracle keeps the negative itself: an ideal edit leaves it alone.
fn row_cases(row: &Row) -> Vec<(Set, String, String)> {
    let mut cases = vec![(Set::Source, row.old.clone(), row.new.clone())];
    cases.extend(
        row.positives
            .iter()
            .map(|(p, g)| (Set::Positive, p.clone(), g.clone())),
    );
    cases.extend(
        row.negatives
            .iter()
            .map(|(n, g)| (Set::Negative, n.clone(), g.clone())),
    );
    cases
}

/// The model folder's files an evaluation reads (generation and the toy
/// judge), which its report names by content.
const MODEL_READS: [&str; 7] = [
    "text_encoder",
    "tokenizer",
    "unet",
    "vae_decoder",
    "vae/config.json",
    "scheduler",
    "world.json",
];

/// The digests of what `req` reads.
fn inputs(req: &EvalRequest) -> Result<Inputs, EvalJobError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EvalJobError::Io { path, source }
    };
    Ok(Inputs {
        model: digest::tree(&req.model, &MODEL_READS).map_err(io(&req.model))?,
        dataset: digest::file(&req.dataset).map_err(io(&req.dataset))?,
        preservation: match &req.preserve {
            Some((path, _)) => Some(digest::file(path).map_err(io(path))?),
            None => None,
        },
        classifier: match &req.classifier {
            ClassifierSpec::Clip(dir) => Some(digest::tree(dir, &[""]).map_err(io(dir))?),
            ClassifierSpec::Toy => None,
        },
    })
}

/// The settings `req` records in its report.
fn settings(req: &EvalRequest, inputs: Inputs) -> Settings {
    Settings {
        model: req.model.display().to_string(),
        dataset: req.dataset.display().to_string(),
        inputs,
        seeds: req.seeds,
        steps: req.steps,
        guidance: req.guidance,
        lambda: req.lambda,
        preservation: req.preserve.as_ref().map(|(path, scale)| Preservation {
            prompts: path.display().to_string(),
            scale: *scale,
        }),
        all_at_once: req.all_at_once,
        scheduler: req.scheduler.to_string(),
        classifier: req.classifier.to_string(),
        tool: record::tool(),
    }
}

/// The report to continue: the existing one with `--resume` (the same
/// settings, by content, and the same shard required), a fresh one otherwise
/// (refusing to overwrite results).
fn previous_report(
    path: &Path,
    req: &EvalRequest,
    settings: Settings,
    shard: Option<Shard>,
) -> Result<Report, EvalJobError> {
    if !path.exists() {
        return Ok(Report::new(settings, shard));
    }
    if !req.resume {
        return Err(EvalJobError::ReportExists(path.to_path_buf()));
    }
    let old = report::read(path)?;
    // The tool may have been rebuilt between runs; everything else must match.
    let comparable = |s: &Settings| Settings {
        tool: String::new(),
        ..s.identity()
    };
    if comparable(&old.settings) != comparable(&settings) || old.shard != shard {
        return Err(EvalJobError::OtherSettings {
            path: path.to_path_buf(),
            settings: Box::new(old.settings),
        });
    }
    Ok(old)
}

/// One line per prompt, captioned with it: its first images unedited, then
/// edited, under those two headings.
/// Returns the PNG's SHA-256, for the report.
fn write_grid(path: &Path, images: &GridImages) -> Result<Option<String>, EvalJobError> {
    let of = |variant| images.iter().filter(move |(v, _, _)| *v == variant);
    let cols = of(Variant::Unedited).next().map_or(0, |(_, _, i)| i.len());
    let mut tiles = Vec::new();
    let mut rows = Vec::new();
    for ((_, prompt, u), (_, _, e)) in of(Variant::Unedited).zip(of(Variant::Edited)) {
        tiles.extend(u.iter().cloned());
        tiles.extend(e.iter().cloned());
        rows.push(shortened(prompt, 40));
    }
    // Small models draw small images: enlarge tiles to at least 96 pixels (nearest neighbour).
    let side = tiles.first().map_or(1, |t| t.shape()[0].max(1));
    let k = 96usize.div_ceil(side).max(1);
    let tiles: Vec<Array3<f32>> = tiles.iter().map(|t| png::upscale(t.view(), k)).collect();
    let Some(grid) = png::grid(&tiles, 2 * cols, 2) else {
        return Ok(None);
    };
    let (h, w, _) = tiles[0].dim();
    let captions = label::Captions {
        rows,
        headings: vec!["unedited".into(), "edited".into()],
    };
    let grid = label::caption(&grid, (h, w), 2 * cols, 2, &captions);
    let io = |source| EvalJobError::Io {
        path: path.to_path_buf(),
        source,
    };
    png::write_png(path, grid.view(), &[]).map_err(io)?;
    Ok(Some(digest::file(path).map_err(io)?))
}

/// `text` cut to `max` characters, ending in "..." when cut.
fn shortened(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}
