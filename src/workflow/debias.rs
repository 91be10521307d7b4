//! The debias journey (`edit --debias`): draw the concept, let a judge say
//! which attribute each image shows, move the concept towards the
//! attributes it shows too little, and again, until the mix is the one
//! asked for; then the edit, one operator like any other
//! ([`crate::edit::debias`]).
//!
//! Every round solves from the unedited model with the weights summed so
//! far and is judged on the same seeds, from [`JUDGE_SEEDS`] on, never the
//! small seeds a user (or a test) scores the result on.

use std::ops::Range;
use std::path::PathBuf;

use ndarray::{Array4, ArrayD, Axis, concatenate};

use crate::edit::Operator;
use crate::edit::debias::{gap, miss, next_step, next_weights};
use crate::edit::record::DebiasRecord;
use crate::eval::{Classifier, ClassifierSpec, EvalError};
use crate::pipeline::rng::Rng;
use crate::pipeline::schedulers::SchedulerKind;
use crate::runtime::{LoadError, Runtime, SessionOptions};
use crate::workflow::edit::{self as edit_flow, EditJobError, EditReport, EditRequest};
use crate::workflow::generate::{GenerateError, Generator, Params};

/// The first seed the judge's images are drawn from (each draw takes the
/// next ones): far from the seeds `generate --seed` is usually given, on
/// which a result is scored.
pub const JUDGE_SEEDS: u64 = 1 << 40;

/// A round within the tolerance is judged again on this many times its
/// images, new ones, before the loop stops on it.
const CONFIRM: u64 = 3;

/// What to debias and how to measure it.
#[derive(Clone, Debug)]
pub struct DebiasRequest {
    /// The edit: its one pair's source is the concept, `debias` holds the
    /// attributes and the wanted shares (its weights are where the search
    /// starts, usually zeros); UNet, output and operator file as for any edit.
    pub edit: EditRequest,
    /// The model folder images are drawn with (with `edit.unet` as its UNet).
    pub model: PathBuf,
    /// Who says which attribute an image shows.
    pub judge: ClassifierSpec,
    /// Images judged per round at the start (the same seeds every round;
    /// more once a confirmation fails).
    pub images: usize,
    /// Stop when every share is within this of the wanted one.
    pub tolerance: f64,
    /// Rounds at most.
    pub max_rounds: usize,
    /// UCE's weight step.
    pub step: f64,
    /// How the judge's images are drawn.
    pub drawing: Drawing,
    /// Sessions.
    pub session: SessionOptions,
}

/// How images are drawn for the judge.
#[derive(Clone, Debug)]
pub struct Drawing {
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale (`None`: the folder pipeline's default).
    pub guidance: Option<f64>,
    /// Scheduler (`None`: the folder's).
    pub scheduler: Option<SchedulerKind>,
}

/// One round: the weights used and the mix judged with them.
#[derive(Clone, Debug)]
pub struct Round {
    /// The weights of the edit measured.
    pub weights: Vec<f64>,
    /// Each attribute's share of the images the judge gave to one of them.
    pub shares: Vec<f64>,
    /// The seeds drawn.
    pub seeds: Range<u64>,
}

/// What a debias did.
#[derive(Debug)]
pub struct DebiasReport {
    /// Every round, in order (the first with the starting weights).
    pub rounds: Vec<Round>,
    /// Whether the last round was within the tolerance.
    pub converged: bool,
    /// The edit made with the last weights.
    pub edit: EditReport,
}

/// Everything that can stop a debias.
#[derive(Debug, thiserror::Error)]
pub enum DebiasError {
    /// ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] LoadError),
    /// An edit failed.
    #[error(transparent)]
    Edit(#[from] EditJobError),
    /// Drawing failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The judge failed.
    #[error(transparent)]
    Judge(#[from] EvalError),
    /// The request is not a debias.
    #[error("a debias needs attributes (edit.debias) and at least one image and one round")]
    NotADebias,
    /// Images that do not stack.
    #[error("the judge's images: {0}")]
    Images(String),
}

/// Runs the loop, then the edit with the weights it ends with.
pub fn run(
    req: &DebiasRequest,
    progress: &mut dyn FnMut(&Round),
) -> Result<DebiasReport, DebiasError> {
    let Some(start) = req.edit.debias.clone() else {
        return Err(DebiasError::NotADebias);
    };
    if req.images == 0 || req.max_rounds == 0 {
        return Err(DebiasError::NotADebias);
    }
    let rt = Runtime::load()?;
    let mut generator = Generator::open(&rt, &req.model, req.edit.unet.as_deref(), req.session)?
        .without_safety_checker();
    let mut judge = Classifier::open(&req.judge, &rt, &req.model, req.session)?;
    let concept = req.edit.edits[0].source.clone();
    let attributes: Vec<&str> = start.attributes.iter().map(String::as_str).collect();
    let mut weights = start.weights.clone();
    let mut rounds = Vec::new();
    let mut converged = false;
    // Every round is judged on the same seeds, so that its mix depends on
    // its weights alone; a round within the tolerance is then judged on
    // new seeds too, and when the mix does not hold there, those seeds
    // join the judged ones for the rounds that follow.
    let mut judged = JUDGE_SEEDS..JUDGE_SEEDS + req.images as u64;
    let mut step = req.step;
    let mut previous_miss: Option<Vec<f64>> = None;
    for _ in 0..req.max_rounds {
        let operator = solve(req, &start, &weights)?;
        let mut draw = |seeds: Range<u64>| {
            picks(
                &mut generator,
                &mut judge,
                operator.as_ref(),
                &concept,
                &attributes,
                seeds,
                &req.drawing,
            )
        };
        let mut seen = draw(judged.clone())?;
        let mut round = Round {
            weights: weights.clone(),
            shares: shares(&seen, attributes.len()),
            seeds: judged.clone(),
        };
        if gap(&start.wanted, &round.shares) <= req.tolerance {
            // Confirmed on CONFIRM times as many new seeds, all of them
            // counted together (a mix that only these seeds show is not
            // the model's).
            let fresh = judged.end..judged.end + CONFIRM * (judged.end - judged.start);
            seen.extend(draw(fresh.clone())?);
            round.shares = shares(&seen, attributes.len());
            round.seeds = judged.start..fresh.end;
            converged = gap(&start.wanted, &round.shares) <= req.tolerance;
            judged = round.seeds.clone();
        }
        progress(&round);
        let missed = miss(&start.wanted, &round.shares);
        step = next_step(step, req.step, previous_miss.as_deref(), &missed);
        let next = next_weights(&weights, &start.wanted, &round.shares, step);
        previous_miss = Some(missed);
        rounds.push(round);
        if converged {
            break;
        }
        weights = next;
    }
    // The weights of the last round measured, converged or not.
    let last = rounds.last().map_or(weights, |r| r.weights.clone());
    drop(generator);
    let edit = edit_flow::run(&EditRequest {
        debias: Some(DebiasRecord {
            weights: last,
            ..start
        }),
        ..req.edit.clone()
    })?;
    Ok(DebiasReport {
        rounds,
        converged,
        edit,
    })
}

/// The operator of the debias edit with `weights`, computed only (no UNet
/// read or written); `None` while every weight is 0 (no edit).
fn solve(
    req: &DebiasRequest,
    start: &DebiasRecord,
    weights: &[f64],
) -> Result<Option<Operator>, DebiasError> {
    if weights.iter().all(|&w| w == 0.0) {
        return Ok(None);
    }
    let edit = EditRequest {
        unet: None,
        output: None,
        save_operator: None,
        save_weights: None,
        debias: Some(DebiasRecord {
            weights: weights.to_vec(),
            ..start.clone()
        }),
        ..req.edit.clone()
    };
    Ok(Some(edit_flow::run(&edit)?.operator))
}

/// The picks of `judge` among `attributes` for images of `concept` (one per
/// seed of `seeds`, each drawn from the latents `generate --seed` draws),
/// drawn with `operator` applied to the embeddings; [`shares`] of them.
pub fn picks(
    generator: &mut Generator,
    judge: &mut Classifier,
    operator: Option<&Operator>,
    concept: &str,
    attributes: &[&str],
    seeds: Range<u64>,
    drawing: &Drawing,
) -> Result<Vec<Option<usize>>, DebiasError> {
    let (height, width) = generator.default_size();
    let f = generator.model.vae_factor;
    let latents: Vec<ArrayD<f32>> = seeds
        .clone()
        .map(|s| Rng::new(s).randn(&[1, 4, height / f, width / f]))
        .collect();
    let views: Vec<_> = latents.iter().map(|l| l.view()).collect();
    let latents = concatenate(Axis(0), &views).map_err(|e| DebiasError::Images(e.to_string()))?;
    let params = Params {
        steps: drawing.steps,
        guidance: drawing
            .guidance
            .unwrap_or_else(|| generator.default_guidance()),
        negative_prompt: String::new(),
        num_images: latents.shape()[0],
        height,
        width,
        seed: seeds.start,
        latents: Some(latents),
        scheduler: drawing.scheduler,
        eta: 0.0,
    };
    generator.set_operator(operator);
    let emb = generator.embed(concept, "");
    generator.set_operator(None);
    let images: Array4<f32> = generator.generate(&emb?, &params, &mut |_, _| {})?.pixels;
    Ok(judge.closest(images.view(), attributes)?)
}

/// Each attribute's share of the images the judge gave to one of them
/// (an image it gives to none, e.g. a toy circle of a third colour, counts
/// for no attribute, as a CLIP judge, which always picks one, would not
/// see it); all zeros when it gave none.
pub fn shares(picks: &[Option<usize>], attributes: usize) -> Vec<f64> {
    let judged = picks.iter().filter(|p| p.is_some()).count();
    (0..attributes)
        .map(|j| {
            let n = picks.iter().filter(|p| **p == Some(j)).count();
            if judged == 0 {
                0.0
            } else {
                n as f64 / judged as f64
            }
        })
        .collect()
}
