//! The edit journey: prompts → tokens → embeddings → operator A → patched
//! K/V bytes in a copy of the UNet file.
//!
//! Read top to bottom in [`run_with_progress`]: the cheap checks first, then
//! the UNet's cross-attention weights located, the prompts tokenized and
//! aligned, the copy of the UNet's bulk started in the background, the text
//! encoder run and the solve, the operator file, every weight edited, the
//! output written.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ndarray::{Array3, Axis, s};
use serde::Serialize;

use crate::edit::operator_file::{self, OperatorFileError, OperatorMeta};
use crate::edit::prior::{self, Prior, PriorFileError, PriorMeta};
use crate::edit::record::{
    self, DebiasRecord, EditRecord, EditSpec, PreservationRecord, PromptPair, previous_records,
};
use crate::edit::weights_file::{self, WeightsFileError};
use crate::edit::{
    self, ArticleRule, EditError, Operator, Preservation, Targets, WeightError, weights,
};
use crate::onnx::cross_attention::{self, LocateError, Projection, Role};
use crate::onnx::module_paths::{UnetLayout, fill_module_paths};
use crate::onnx::patch::{self, TensorPatch, WriteError, Written};
use crate::onnx::{Model, OnnxError};
use crate::pipeline::memory;
use crate::runtime::{Device, LoadError, Runtime, SessionError, SessionOptions};
use crate::text::encoder::{Embedded, TextEncoders};
use crate::text::{PromptIds, TextError, TextSide, Tokenizers};

/// What to edit and how.
#[derive(Clone, Debug)]
pub struct EditRequest {
    /// The UNet model file; `None` computes the operator only.
    pub unet: Option<PathBuf>,
    /// Where to write the edited UNet; `None` computes everything but writes nothing.
    pub output: Option<PathBuf>,
    /// The text encoders and tokenizers (one, or SDXL's two).
    pub text: TextSide,
    /// The (source, destination) pairs, solved together into one operator.
    pub edits: Vec<PromptPair>,
    /// λ > 0.
    pub lambda: f64,
    /// UCE's erase/replace pairs instead of TIME's: the destination (a guide
    /// concept, or empty) need not contain the source's words, and only the
    /// positions from each prompt's last word on are edited
    /// ([`edit::uce_positions`]).
    pub erase: bool,
    /// UCE's debias instead of TIME's edit: the one pair's source (the
    /// concept) moves towards these attributes with these weights
    /// ([`edit::debias`]); the destination is ignored.
    pub debias: Option<DebiasRecord>,
    /// What the edit must leave alone.
    pub preserve: Preserve,
    /// The preservation term's scale s ≥ 0 (UCE's `preserve_scale`).
    pub preserve_scale: f64,
    /// Prefixes prepended to each prompt for extra pairs.
    pub augmentations: Vec<String>,
    /// Keys and values, or values only.
    pub targets: Targets,
    /// Also write the edited weights, torch layout, keyed by module name.
    pub save_weights: Option<PathBuf>,
    /// Also write the edit operator A (see [`crate::edit::operator_file`]).
    pub save_operator: Option<PathBuf>,
}

/// Where an edit's preservation prior comes from.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Preserve {
    /// No preservation term: TIME as published.
    #[default]
    Nothing,
    /// These prompts, embedded with the edit's text encoder.
    Prompts(Vec<String>),
    /// A prior file written by `time-onnx prior` with the same text encoder.
    Prior(PathBuf),
    /// A prior already built with this text encoder: eval builds one for
    /// all its rows instead of embedding the prompts again for each.
    Built(Prior),
}

impl EditRequest {
    /// `source` → `destination` as the reference edits by default (λ 0.1, its
    /// three augmentations, keys and values), computing the operator only:
    /// set `unet`, `output` and the rest with struct update syntax.
    pub fn new(text: TextSide, source: impl Into<String>, destination: impl Into<String>) -> Self {
        Self {
            unet: None,
            output: None,
            text,
            edits: vec![PromptPair {
                source: source.into(),
                destination: destination.into(),
            }],
            lambda: edit::DEFAULT_LAMBDA,
            erase: false,
            debias: None,
            preserve: Preserve::Nothing,
            preserve_scale: edit::DEFAULT_PRESERVE_SCALE,
            augmentations: edit::DEFAULT_AUGMENTATIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            targets: Targets::KeysAndValues,
            save_weights: None,
            save_operator: None,
        }
    }
}

/// One weight's outcome.
#[derive(Debug, Serialize)]
pub struct LayerReport {
    /// Initializer name.
    pub initializer: String,
    /// Module path, when known.
    pub module: Option<String>,
    /// K, V or packed.
    pub role: Role,
    /// ‖W' − W‖ / ‖W‖ over the edited entries.
    pub relative_change: f64,
}

/// What an edit did.
#[derive(Debug)]
pub struct EditReport {
    /// Per weight.
    pub layers: Vec<LayerReport>,
    /// The metadata record (also appended to the model).
    pub record: EditRecord,
    /// Edits already recorded in the input model.
    pub previous: Vec<EditRecord>,
    /// Files written, when an output was given.
    pub written: Option<Written>,
    /// The operator Aᵀ that was applied.
    pub operator: Operator,
    /// True when source and destination are the same prompt: nothing changes.
    pub unchanged: bool,
    /// Time per stage, in order.
    pub timings: Vec<(&'static str, Duration)>,
}

/// Everything that can stop an edit.
#[derive(Debug, thiserror::Error)]
pub enum EditJobError {
    /// ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] LoadError),
    /// The UNet could not be read.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// No usable cross-attention in the UNet.
    #[error(transparent)]
    Locate(#[from] LocateError),
    /// The tokenizer failed.
    #[error(transparent)]
    Text(#[from] TextError),
    /// The text encoder failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Alignment or solve failed.
    #[error(transparent)]
    Edit(#[from] EditError),
    /// A weight could not take the edit.
    #[error(transparent)]
    Weight(#[from] WeightError),
    /// Writing the output failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The text encoder gave NaN or infinite embeddings.
    #[error(
        "the text encoder returned non-finite embeddings for {prompt:?} (a broken or overflowing model)"
    )]
    NonFiniteEmbedding {
        /// The prompt.
        prompt: String,
    },
    /// The text encoders' embeddings are not as wide as the UNet reads.
    #[error(
        "the UNet's cross-attention reads {unet}-wide text embeddings but the text encoders give \
         {encoders}: they do not belong to this UNet"
    )]
    TextWidth {
        /// What the K/V weights take.
        unet: usize,
        /// What the encoders give, e.g. "64 (32 + 32)".
        encoders: String,
    },
    /// More prompts than their embeddings can be held for.
    #[error(
        "the {prompts} prompts of this edit need {need_mib} MiB for their embeddings, more than \
         the {available_mib} MiB available: solve fewer edits at once"
    )]
    TooManyPrompts {
        /// Prompts to embed (every pair's augmented source and destination).
        prompts: usize,
        /// MiB their embeddings take.
        need_mib: u64,
        /// MiB the system says are available.
        available_mib: u64,
    },
    /// A debias request that does not add up.
    #[error("a debias edit takes {why}")]
    BadDebias {
        /// What is wrong.
        why: String,
    },
    /// Values-only edits change V but not K: no map of the embeddings does that.
    #[error(
        "an operator cannot represent a values-only edit: it changes the text embeddings, which \
         reach keys and values alike"
    )]
    ValuesOnlyOperator,
    /// The operator file could not be written.
    #[error(transparent)]
    OperatorFile(#[from] OperatorFileError),
    /// A preservation prior needs at least one prompt.
    #[error("no prompts to preserve: the prompt list is empty")]
    NoPriorPrompts,
    /// The preservation prior file could not be read.
    #[error(transparent)]
    PriorFile(#[from] PriorFileError),
    /// A prior file from another text encoder.
    #[error(
        "the preservation prior {path} was built with another text encoder (fingerprint {theirs}, \
         this one is {ours}): rebuild it with `time-onnx prior`"
    )]
    OtherPriorEncoder {
        /// The prior file.
        path: PathBuf,
        /// Its text encoder's fingerprint.
        theirs: String,
        /// This text encoder's.
        ours: String,
    },
    /// `--save-weights` could not be written.
    #[error(transparent)]
    WeightsFile(#[from] WeightsFileError),
    /// The edit record could not be serialised.
    #[error("cannot serialise the edit record: {0}")]
    Record(#[source] serde_json::Error),
}

/// What [`run_with_progress`] reports as it goes.
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// The text encoder is running (one batch for every prompt).
    TextEncoder,
    /// Copying the UNet's files: bytes done, bytes in all.
    Copy(u64, u64),
}

/// Runs an edit.
pub fn run(req: &EditRequest) -> Result<EditReport, EditJobError> {
    run_with_progress(req, &mut |_| {})
}

/// [`run`], telling `progress` about the slow stages.
pub fn run_with_progress(
    req: &EditRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<EditReport, EditJobError> {
    let mut clock = Clock::start();
    check(req)?;
    // The operator file records the text encoder's fingerprint: hash its
    // weights (one core, ~0.3 s for SD's) while the tokenizer loads and ONNX
    // Runtime builds the text encoder's session, both mostly on one core.
    let needs_fingerprint =
        req.save_operator.is_some() || matches!(req.preserve, Preserve::Prior(_));
    let fingerprint = needs_fingerprint.then(|| {
        let side = req.text.clone();
        std::thread::spawn(move || side.fingerprint())
    });
    let mut fingerprint = Fingerprint(fingerprint, None);
    // A prior file is read now, before any slow work: its fingerprint is
    // checked once the text encoder's is known.
    let prior_file = match &req.preserve {
        Preserve::Prior(path) => Some((path, prior::load(path)?)),
        _ => None,
    };
    let unet = match &req.unet {
        Some(path) => Some(open_unet(path, req.output.as_deref())?),
        None => None,
    };
    let encoder = OpeningEncoder::start(req);
    let previous = unet
        .as_ref()
        .map(|(m, _)| previous_records(m))
        .unwrap_or_default();
    clock.lap("read UNet");

    let text = prepare_text(req)?;
    if let Some(width) = unet
        .as_ref()
        .and_then(|(_, p)| p.first())
        .map(Projection::width)
    {
        check_embeddings_fit(&text, width, memory::available())?;
    }
    clock.lap("tokenize");
    // The prompts align: the edit will happen, so start copying the UNet's
    // bulk now, behind the text encoder and the solve.
    let copying = match (&unet, &req.output) {
        (Some((model, _)), Some(out)) => Some(patch::Copying::start(model, out)?),
        _ => None,
    };
    progress(Progress::TextEncoder);
    let (embedded, prior) = embed(encoder, &text, req)?;
    clock.lap("text encoder");
    if let Some(want) = unet
        .as_ref()
        .and_then(|(_, p)| p.first())
        .map(Projection::width)
        && want != embedded.context.dim().2
    {
        return Err(EditJobError::TextWidth {
            unet: want,
            encoders: embedded.describe_width(),
        });
    }
    let emb = embedded.context;
    let prior = match (prior_file, &req.preserve) {
        (Some((path, file)), _) => Some(check_prior(path, file, emb.dim().2, &mut fingerprint)?),
        (None, Preserve::Built(built)) => Some(built.clone()),
        (None, _) => prior,
    };
    let n = text.pairs.len();
    let preservation = prior.as_ref().map(|p| Preservation {
        gram: p.gram(),
        scale: req.preserve_scale,
    });
    let operator = match (&text.uce, &text.debias, &req.debias) {
        (_, Some(positions), Some(debias)) => {
            let (src, dst) = debias_rows(&emb, positions, &debias.weights);
            let (src, dst) = (src.view(), dst.view());
            edit::solve_preserving(src, dst, &text.maps, req.lambda, preservation)?
        }
        (Some(positions), _, _) => {
            let (src, dst) = uce_rows(&emb, positions);
            let (src, dst) = (src.view(), dst.view());
            edit::solve_preserving(src, dst, &text.maps, req.lambda, preservation)?
        }
        _ => {
            let (src, dst) = (emb.slice(s![..n, .., ..]), emb.slice(s![n.., .., ..]));
            edit::solve_preserving(src, dst, &text.maps, req.lambda, preservation)?
        }
    };
    let unchanged = text.pairs.iter().all(|(s, d)| s == d)
        && req
            .debias
            .as_ref()
            .is_none_or(|d| d.weights.iter().all(|&w| w == 0.0));
    clock.lap("solve");
    let first = &req.edits[0];
    let record = EditRecord {
        spec: EditSpec {
            source: first.source.clone(),
            destination: first.destination.clone(),
            erase: req.erase,
            debias: req.debias.clone(),
            edits: if req.edits.len() > 1 {
                req.edits.clone()
            } else {
                Vec::new()
            },
            preservation: prior.as_ref().map(|p| PreservationRecord {
                prompts: p.prompts(),
                scale: req.preserve_scale,
            }),
            lambda: req.lambda,
            augmentations: req.augmentations.clone(),
            tool: record::tool(),
        },
        keys: req.targets == Targets::KeysAndValues,
    };
    if let Some(path) = &req.save_operator {
        let fingerprint = fingerprint.get()?.to_owned();
        save_operator(&operator, &record, fingerprint, path)?;
        clock.lap("save operator");
    }

    let mut layers = Vec::new();
    let mut written = None;
    if let Some((model, projections)) = &unet {
        let edited = edit_weights(model, projections, &operator, req, unchanged)?;
        layers = edited.layers;
        clock.lap("apply");
        if let Some(copying) = copying {
            let meta = if unchanged {
                Vec::new()
            } else {
                vec![
                    record
                        .metadata_entry(previous.len() + 1)
                        .map_err(EditJobError::Record)?,
                ]
            };
            written = Some(
                copying.finish(model, &edited.patches, &meta, &mut |done, total| {
                    progress(Progress::Copy(done, total))
                })?,
            );
            clock.lap("write");
        }
        if let Some(path) = &req.save_weights {
            weights_file::save(path, &edited.torch, &record)?;
        }
    }
    Ok(EditReport {
        layers,
        record,
        previous,
        written,
        operator,
        unchanged,
        timings: clock.laps,
    })
}

/// The text encoder's fingerprint, hashed on another thread and waited for
/// once, when first needed.
struct Fingerprint(
    Option<JoinHandle<Result<String, OnnxError>>>,
    Option<String>,
);

impl Fingerprint {
    fn get(&mut self) -> Result<&str, EditJobError> {
        if let Some(thread) = self.0.take() {
            // A panic in the hashing thread is a bug: passed on as it is.
            let hash = thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            self.1 = Some(hash);
        }
        Ok(self
            .1
            .as_deref()
            .expect("started when the request needs it"))
    }
}

/// A prior file's contents, checked against this text encoder (width and
/// fingerprint).
fn check_prior(
    path: &Path,
    (prior, meta): (Prior, PriorMeta),
    width: usize,
    fingerprint: &mut Fingerprint,
) -> Result<Prior, EditJobError> {
    if meta.width != width {
        return Err(EditError::Shape {
            what: "preservation prior",
            expected: vec![width, width],
            actual: vec![meta.width, meta.width],
        }
        .into());
    }
    let ours = fingerprint.get()?;
    if meta.text_encoder != ours {
        return Err(EditJobError::OtherPriorEncoder {
            path: path.to_path_buf(),
            theirs: meta.text_encoder,
            ours: ours.to_owned(),
        });
    }
    Ok(prior)
}

/// The checks that need no file: prompts, λ, what the outputs can hold.
fn check(req: &EditRequest) -> Result<(), EditJobError> {
    if req.edits.is_empty() {
        return Err(EditError::NoEdits.into());
    }
    for pair in &req.edits {
        for (which, text) in [("source", &pair.source), ("destination", &pair.destination)] {
            // An erase may name no guide (UCE then uses " "), and a debias
            // has attributes instead of a destination.
            let free = which == "destination" && (req.erase || req.debias.is_some());
            if text.trim().is_empty() && !free {
                return Err(EditError::EmptyPrompt { which }.into());
            }
        }
    }
    if let Some((first, second)) = record::conflicting_pairs(&req.edits) {
        return Err(EditError::ConflictingEdits {
            source_prompt: second.source.clone(),
            first: first.destination.clone(),
            second: second.destination.clone(),
        }
        .into());
    }
    if !(req.lambda.is_finite() && req.lambda > 0.0) {
        return Err(EditError::BadLambda { lambda: req.lambda }.into());
    }
    if !(req.preserve_scale.is_finite() && req.preserve_scale >= 0.0) {
        return Err(EditError::BadPreserveScale {
            scale: req.preserve_scale,
        }
        .into());
    }
    if let Some(d) = &req.debias {
        let n = d.attributes.len();
        if req.edits.len() != 1
            || req.erase
            || n == 0
            || d.weights.len() != n
            || d.wanted.len() != n
        {
            return Err(EditJobError::BadDebias {
                why: format!(
                    "one concept, at least one attribute and a weight and a share per attribute \
                     ({} concepts, {n} attributes, {} weights, {} shares{})",
                    req.edits.len(),
                    d.weights.len(),
                    d.wanted.len(),
                    if req.erase { ", erase" } else { "" }
                ),
            });
        }
        if d.weights.iter().chain(&d.wanted).any(|v| !v.is_finite()) {
            return Err(EditJobError::BadDebias {
                why: "weights and shares must be finite numbers".into(),
            });
        }
    }
    if req.save_operator.is_some() && req.targets == Targets::ValuesOnly {
        return Err(EditJobError::ValuesOnlyOperator);
    }
    Ok(())
}

/// The UNet and its cross-attention K/V weights, with the output checked
/// against it (never over the input, into a folder we can write).
fn open_unet(path: &Path, output: Option<&Path>) -> Result<(Model, Vec<Projection>), EditJobError> {
    let model = Model::open(path)?;
    if let Some(out) = output {
        patch::check_output(&model, out)?;
    }
    let mut projections = cross_attention::locate(&model)?;
    name_from_config(path, &mut projections);
    Ok((model, projections))
}

/// Names projections the export left anonymous (packed K/V) from the
/// `config.json` beside the UNet, when there is one that fits.
fn name_from_config(unet: &Path, projections: &mut [Projection]) {
    let Some(config) = unet.parent().map(|d| d.join("config.json")) else {
        return;
    };
    let modules = std::fs::read_to_string(config)
        .ok()
        .and_then(|text| UnetLayout::from_json(&text))
        .and_then(|layout| layout.cross_attention_modules());
    if let Some(modules) = modules {
        fill_module_paths(projections, &modules);
    }
}

/// The prompts as token ids (every source, then every destination) and the
/// alignment of each pair.
struct Tokens {
    pairs: Vec<(String, String)>,
    maps: Vec<Vec<usize>>,
    ids: Vec<PromptIds>,
    /// The text of each row of `ids`.
    prompts: Vec<String>,
    /// The preserved prompts' ids, when the request lists prompts.
    kept: Vec<PromptIds>,
    /// Erase pairs: per pair, the source and destination positions edited.
    uce: Option<Vec<(Range<usize>, Range<usize>)>>,
    /// Debias: per augmented concept prompt, the rows of the concept, then
    /// of each attribute (whose ids follow the concept's, attribute-major).
    debias: Option<Vec<Vec<Range<usize>>>>,
}

/// Refuses, before the text encoder runs, prompts whose embeddings
/// (`[prompts, L, width] f32`, all held for the solve) do not fit in the
/// memory `available` (not checked when unknown).
fn check_embeddings_fit(
    text: &Tokens,
    width: usize,
    available: Option<u64>,
) -> Result<(), EditJobError> {
    let length = text.ids.first().and_then(|p| p.first()).map_or(0, Vec::len);
    let need = [text.prompts.len(), length, width, 4]
        .into_iter()
        .try_fold(1u64, |n, k| n.checked_mul(u64::try_from(k).ok()?))
        .unwrap_or(u64::MAX);
    match available {
        Some(available) if need > available => Err(EditJobError::TooManyPrompts {
            prompts: text.prompts.len(),
            need_mib: need.div_ceil(1 << 20),
            available_mib: available >> 20,
        }),
        _ => Ok(()),
    }
}

/// Tokenize and align: everything about the prompts that can fail before the
/// text encoder runs.
fn prepare_text(req: &EditRequest) -> Result<Tokens, EditJobError> {
    let tokenizers = Tokenizers::open(&req.text)?;
    if let Some(debias) = &req.debias {
        return prepare_debias(req, debias, &tokenizers);
    }
    let tok = tokenizers.primary();
    let guide = |d: &str| match (req.erase, d.trim().is_empty()) {
        (true, true) => " ".to_owned(),
        _ => d.to_owned(),
    };
    let pairs: Vec<(String, String)> = req
        .edits
        .iter()
        .flat_map(|e| edit::prompt_pairs(&e.source, &guide(&e.destination), &req.augmentations))
        .collect();
    let (maps, uce) = if req.erase {
        let seq = tok.max_len();
        let positions = pairs
            .iter()
            .map(|(s, d)| {
                let (s, d) = (tok.encode_truncated(s)?, tok.encode_truncated(d)?);
                Ok(edit::uce_positions(s.len(), d.len(), seq))
            })
            .collect::<Result<Vec<_>, TextError>>()?;
        let identity = vec![(0..seq).collect(); pairs.len()];
        (identity, Some(positions))
    } else {
        let rule = ArticleRule::from_tokenizer(tok)?;
        let maps = pairs
            .iter()
            .map(|(s, d)| edit::align_prompts(tok, &rule, s, d))
            .collect::<Result<Vec<_>, _>>()?;
        (maps, None)
    };
    let prompts: Vec<String> = pairs
        .iter()
        .map(|(s, _)| s)
        .chain(pairs.iter().map(|(_, d)| d))
        .cloned()
        .collect();
    let (ids, kept) = encode_all(&tokenizers, &prompts, &req.preserve)?;
    Ok(Tokens {
        pairs,
        maps,
        ids,
        prompts,
        kept,
        uce,
        debias: None,
    })
}

/// The ids of `prompts`, and of the preserved prompts when `preserve` lists them.
fn encode_all(
    tokenizers: &Tokenizers,
    prompts: &[String],
    preserve: &Preserve,
) -> Result<(Vec<PromptIds>, Vec<PromptIds>), TextError> {
    let encode = |list: &[String]| -> Result<Vec<PromptIds>, TextError> {
        list.iter().map(|p| tokenizers.encode_padded(p)).collect()
    };
    let kept = match preserve {
        Preserve::Prompts(kept) => encode(kept)?,
        _ => Vec::new(),
    };
    Ok((encode(prompts)?, kept))
}

/// A debias edit's prompts: the concept with each augmentation, then each
/// attribute with the same ones (as UCE's script writes each template for
/// the concept and for every attribute); each augmented concept's rows and
/// its attributes' rows, UCE's positions.
fn prepare_debias(
    req: &EditRequest,
    debias: &DebiasRecord,
    tokenizers: &Tokenizers,
) -> Result<Tokens, EditJobError> {
    let variants = |p: &str| -> Vec<String> {
        edit::prompt_pairs(p, p, &req.augmentations)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    };
    let concept = variants(&req.edits[0].source);
    let attributes: Vec<Vec<String>> = debias.attributes.iter().map(|a| variants(a)).collect();
    let tok = tokenizers.primary();
    let seq = tok.max_len();
    let mut positions = Vec::with_capacity(concept.len());
    for (k, c) in concept.iter().enumerate() {
        let mut lens = vec![tok.encode_truncated(c)?.len()];
        for a in &attributes {
            lens.push(tok.encode_truncated(&a[k])?.len());
        }
        positions.push(edit::debias::positions(&lens, seq));
    }
    let prompts: Vec<String> = concept
        .iter()
        .chain(attributes.iter().flatten())
        .cloned()
        .collect();
    let (ids, kept) = encode_all(tokenizers, &prompts, &req.preserve)?;
    Ok(Tokens {
        maps: vec![(0..seq).collect(); concept.len()],
        pairs: concept.iter().map(|c| (c.clone(), c.clone())).collect(),
        ids,
        prompts,
        kept,
        uce: None,
        debias: Some(positions),
    })
}

/// A debias edit's rows as `[variants, seq, d] f64` source and destination
/// arrays: each augmented concept's rows c first, their targets
/// c + Σ wⱼ (‖c‖/‖aⱼ‖) aⱼ in the destination, zeros after (a zero row adds
/// nothing to the sums). `emb` holds the concept variants, then each
/// attribute's.
fn debias_rows(
    emb: &Array3<f32>,
    positions: &[Vec<Range<usize>>],
    weights: &[f64],
) -> (Array3<f64>, Array3<f64>) {
    let (n, (_, seq, d)) = (positions.len(), emb.dim());
    let mut src = Array3::zeros((n, seq, d));
    let mut dst = Array3::zeros((n, seq, d));
    for (k, rows) in positions.iter().enumerate() {
        let len = rows[0].len();
        let concept = emb.slice(s![k, rows[0].clone(), ..]);
        let attributes: Vec<_> = rows[1..]
            .iter()
            .enumerate()
            .map(|(j, r)| emb.slice(s![(j + 1) * n + k, r.clone(), ..]))
            .collect();
        src.slice_mut(s![k, ..len, ..])
            .assign(&concept.mapv(f64::from));
        dst.slice_mut(s![k, ..len, ..])
            .assign(&edit::debias::targets(concept, &attributes, weights));
    }
    (src, dst)
}

/// The rows an erase solves over, as `[pairs, seq, d]` source and
/// destination arrays to take position by position: pair p's edited
/// positions first, zeros after (a zero row adds nothing to Σ ccᵀ nor to
/// Σ c*cᵀ).
fn uce_rows(
    emb: &Array3<f32>,
    positions: &[(Range<usize>, Range<usize>)],
) -> (Array3<f32>, Array3<f32>) {
    let (n, (_, seq, d)) = (positions.len(), emb.dim());
    let mut src = Array3::zeros((n, seq, d));
    let mut dst = Array3::zeros((n, seq, d));
    for (p, (from, to)) in positions.iter().enumerate() {
        let len = from.len();
        src.slice_mut(s![p, ..len, ..])
            .assign(&emb.slice(s![p, from.clone(), ..]));
        dst.slice_mut(s![p, ..len, ..])
            .assign(&emb.slice(s![n + p, to.clone(), ..]));
    }
    (src, dst)
}

/// The text encoder's session, being built on another thread while the
/// tokenizer loads and the prompts align (ONNX Runtime spends over a second
/// on it, mostly on one core).
///
/// Dropped unused, because an earlier step failed, it waits for the thread:
/// a process must not exit while ONNX Runtime is still building a session
/// (its library's teardown would run under it).
struct OpeningEncoder(Option<JoinHandle<Result<(Runtime, TextEncoders), EditJobError>>>);

impl OpeningEncoder {
    /// When the UNet's bulk will be copied in the background (an output is
    /// written) and the text encoders' work is small beside it, they run on
    /// one thread: with two, ONNX Runtime's worker spins against the copy
    /// for the one free core, which slowed both (measured on the full-size
    /// SD 1.x model, one edit: 1.5–1.6 s this way, up to 2.4 s with two
    /// threads). Their work grows with the prompts embedded, the copy's
    /// with the UNet's bytes: SDXL's encoders are the longer part already
    /// for one edit (fp16 UNet: 14–17 s on one thread, 10.6–11 s on two), and
    /// so are SD 1.x's for 20 edits at once (160 prompts: the edit took
    /// 32–37 s on one thread, 18 s on two, on a Zen 4 VM). One thread while
    /// the encoders' bytes times the prompts stay under twice the UNet's
    /// bytes, which for one edit with TIME's augmentations (8 prompts) is
    /// the encoders under a quarter of the UNet.
    fn start(req: &EditRequest) -> Self {
        let side = req.text.clone();
        let beside_copy = match (&req.unet, &req.output) {
            (Some(unet), Some(_)) => {
                let text: u64 = side.encoders.iter().map(|e| folder_bytes(&e.model)).sum();
                let prompts = u64::try_from(prompts_to_embed(req)).unwrap_or(u64::MAX);
                text.saturating_mul(prompts) < folder_bytes(unet).saturating_mul(2)
            }
            _ => false,
        };
        Self(Some(std::thread::spawn(move || {
            let rt = Runtime::load()?;
            // One batch: no weight pre-packing (see SessionOptions::few_runs).
            let opts = SessionOptions {
                device: Device::Cpu,
                threads: beside_copy.then_some(1),
                few_runs: true,
                ..SessionOptions::default()
            };
            let encoder = TextEncoders::open(&rt, &side, opts)?;
            Ok((rt, encoder))
        })))
    }

    /// The session, once built. A panic in the thread is a bug: passed on.
    fn wait(mut self) -> Result<(Runtime, TextEncoders), EditJobError> {
        let thread = self.0.take().expect("waited for once");
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// How many prompts the edit runs through the text encoders: each pair's
/// source and destination with every augmentation (a debias: the concept
/// and each attribute with every augmentation), and the preserved prompts.
fn prompts_to_embed(req: &EditRequest) -> usize {
    let variants = 1 + req.augmentations.len();
    let edited = match &req.debias {
        Some(d) => (1 + d.attributes.len()) * variants,
        None => 2 * req.edits.len() * variants,
    };
    let preserved = match &req.preserve {
        Preserve::Prompts(p) => p.len(),
        _ => 0,
    };
    edited + preserved
}

/// The bytes of the files in the folder of the model file `model` (the
/// model with its external data), 0 when it cannot be read.
fn folder_bytes(model: &Path) -> u64 {
    let Some(Ok(entries)) = model.parent().map(std::fs::read_dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

impl Drop for OpeningEncoder {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

/// Every edit prompt through the text encoder in one run: `[2·pairs, 77, d]
/// f32`, sources first, checked finite; and the prior of the preserved
/// prompts, when the request lists them. The session (and its spinning
/// thread pool) is freed before the BLAS work.
fn embed(
    encoder: OpeningEncoder,
    text: &Tokens,
    req: &EditRequest,
) -> Result<(Embedded, Option<Prior>), EditJobError> {
    let (_rt, mut encoder) = encoder.wait()?;
    let emb = encoder.embed(&text.ids)?;
    let prior = match &req.preserve {
        Preserve::Prompts(prompts) => Some(super::prior::embed_prior(
            &mut encoder,
            prompts,
            &text.kept,
        )?),
        _ => None,
    };
    drop(encoder);
    for (row, prompt) in emb.context.axis_iter(Axis(0)).zip(&text.prompts) {
        if row.iter().any(|v| !v.is_finite()) {
            return Err(EditJobError::NonFiniteEmbedding {
                prompt: prompt.clone(),
            });
        }
    }
    Ok((emb, prior))
}

/// Writes the operator file, with the text encoder's fingerprint.
fn save_operator(
    operator: &Operator,
    record: &EditRecord,
    fingerprint: String,
    path: &Path,
) -> Result<(), EditJobError> {
    let meta = OperatorMeta {
        spec: record.spec.clone(),
        width: operator.dim(),
        text_encoder: fingerprint,
    };
    Ok(operator_file::save(path, operator, &meta)?)
}

/// Every K/V weight edited: the patches for the output, a report per
/// weight, and the torch-layout weights when `--save-weights` asks for them.
struct EditedWeights {
    patches: Vec<TensorPatch>,
    layers: Vec<LayerReport>,
    torch: BTreeMap<String, ndarray::Array2<f32>>,
}

fn edit_weights(
    model: &Model,
    projections: &[Projection],
    operator: &Operator,
    req: &EditRequest,
    unchanged: bool,
) -> Result<EditedWeights, EditJobError> {
    let change = operator.change();
    let change32 = change.map(|v| v as f32);
    let mut out = EditedWeights {
        patches: Vec::new(),
        layers: Vec::new(),
        torch: BTreeMap::new(),
    };
    // Each weight is edited on its own (the same result on any number of
    // threads); one thread per core, weights dealt out in turn so that the
    // large and small layers are shared evenly.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, projections.len().max(1));
    let edit_one = |p: &Projection| -> Result<weights::EditedWeight, EditJobError> {
        let old = model.tensor_bytes(&p.tensor)?;
        Ok(weights::apply(&change, &change32, p, &old, req.targets)?)
    };
    let mut edited: Vec<Option<Result<weights::EditedWeight, EditJobError>>> =
        (0..projections.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let edit_one = &edit_one;
                s.spawn(move || {
                    (t..projections.len())
                        .step_by(threads)
                        .map(|i| (i, edit_one(&projections[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for w in workers {
            // A panic while editing is a bug: passed on as it is.
            let done = w
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for (i, r) in done {
                edited[i] = Some(r);
            }
        }
    });
    for (p, edited) in projections.iter().zip(edited) {
        let edited = edited.expect("every weight was dealt to a thread")?;
        out.layers.push(LayerReport {
            initializer: p.initializer.clone(),
            module: p.module.clone(),
            role: p.role,
            relative_change: if unchanged {
                0.0
            } else {
                edited.relative_change
            },
        });
        if req.save_weights.is_some() {
            weights::add_torch_entries(p, &edited.bytes, &mut out.torch)?;
        }
        if !unchanged {
            out.patches.push(TensorPatch {
                tensor: p.tensor.clone(),
                data: edited.bytes,
            });
        }
    }
    Ok(out)
}

/// Stage timings: the time since the previous lap, by name.
struct Clock {
    since: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Clock {
    fn start() -> Self {
        Self {
            since: Instant::now(),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, name: &'static str) {
        self.laps.push((name, self.since.elapsed()));
        self.since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sd-tiny fixture's text encoder and tokenizer.
    fn tiny_text_side() -> TextSide {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sd-tiny/optimum"
        );
        TextSide::single(
            format!("{fixture}/text_encoder/model.onnx").into(),
            format!("{fixture}/tokenizer").into(),
        )
    }

    #[test]
    fn prompts_to_embed_counts_what_the_text_side_prepares() {
        // The estimate is made before tokenizing; it must match the prompts
        // `prepare_text` then lists for the text encoder.
        let text = tiny_text_side();
        let prepared = |req: &EditRequest| {
            let tokens = prepare_text(req).unwrap();
            tokens.prompts.len() + tokens.kept.len()
        };
        let mut req = EditRequest::new(text, "a rose", "a blue rose");
        // One pair with TIME's three augmentations: 4 sources, 4 destinations.
        assert_eq!(prompts_to_embed(&req), 8);
        assert_eq!(prompts_to_embed(&req), prepared(&req));
        req.edits = vec![req.edits[0].clone(); 20];
        req.preserve = Preserve::Prompts(vec!["an apple".into(); 5]);
        assert_eq!(prompts_to_embed(&req), prepared(&req));
        req.debias = Some(DebiasRecord {
            attributes: vec!["a man".into(), "a woman".into()],
            wanted: vec![0.5, 0.5],
            weights: vec![0.0, 0.0],
        });
        req.edits.truncate(1);
        assert_eq!(prompts_to_embed(&req), prepared(&req));
        req.augmentations.clear();
        assert_eq!(prompts_to_embed(&req), prepared(&req));
    }

    #[test]
    fn embeddings_that_do_not_fit_are_refused_before_the_encoder_runs() {
        let text = tiny_text_side();
        let mut req = EditRequest::new(text, "a rose", "a blue rose");
        req.edits = vec![req.edits[0].clone(); 1000];
        let tokens = prepare_text(&req).unwrap();
        // 1,000 pairs × 8 prompts × 77 positions × 768 × 4 bytes.
        let need = 8000 * 77 * 768 * 4;
        assert!(check_embeddings_fit(&tokens, 768, Some(need)).is_ok());
        assert!(check_embeddings_fit(&tokens, 768, None).is_ok());
        let err = check_embeddings_fit(&tokens, 768, Some(need - 1)).unwrap_err();
        assert!(
            matches!(
                err,
                EditJobError::TooManyPrompts {
                    prompts: 8000,
                    need_mib: 1805,
                    ..
                }
            ),
            "{err}"
        );
    }
}
