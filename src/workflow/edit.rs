//! The edit journey: prompts → tokens → embeddings → operator A → patched
//! K/V bytes in a copy of the UNet file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ndarray::{Array3, Axis, s};
use serde::{Deserialize, Serialize};

use crate::edit::operator_file::{self, OperatorFileError, OperatorMeta};
use crate::edit::{self, ArticleRule, EditError, Operator};
use crate::onnx::cross_attention::{self, LocateError, Projection, Role};
use crate::onnx::fingerprint::weights_fingerprint;
use crate::onnx::patch::{self, TensorPatch, WriteError, Written};
use crate::onnx::{Model, OnnxError};
use crate::runtime::{Device, LoadError, Runtime, SessionError, SessionOptions};
use crate::text::encoder::TextEncoder;
use crate::text::{ClipTokenizer, TextError};
use crate::unet::names::{UnetLayout, fill_module_paths};
use crate::unet::weights::{self, Targets, WeightError};

/// Prefix of the `metadata_props` keys that record edits, numbered from 1.
pub const RECORD_KEY: &str = "time_onnx.edit.";

/// What to edit and how.
#[derive(Clone, Debug)]
pub struct EditRequest {
    /// The UNet model file; `None` computes the operator only.
    pub unet: Option<PathBuf>,
    /// Where to write the edited UNet; `None` computes everything but writes nothing.
    pub output: Option<PathBuf>,
    /// The text encoder model file.
    pub text_encoder: PathBuf,
    /// The tokenizer folder.
    pub tokenizer: PathBuf,
    /// The source prompt.
    pub source: String,
    /// The destination prompt.
    pub destination: String,
    /// λ > 0.
    pub lambda: f64,
    /// Prefixes prepended to each prompt for extra pairs.
    pub augmentations: Vec<String>,
    /// Keys and values, or values only.
    pub targets: Targets,
    /// Also write the edited weights, torch layout, keyed by module name.
    pub save_weights: Option<PathBuf>,
    /// Also write the edit operator A (see [`crate::edit::operator_file`]).
    pub save_operator: Option<PathBuf>,
}

impl EditRequest {
    /// `source` → `destination` as the reference edits by default (λ 0.1, its
    /// three augmentations, keys and values), computing the operator only:
    /// set `unet`, `output` and the rest with struct update syntax.
    pub fn new(
        text_encoder: PathBuf,
        tokenizer: PathBuf,
        source: impl Into<String>,
        destination: impl Into<String>,
    ) -> Self {
        Self {
            unet: None,
            output: None,
            text_encoder,
            tokenizer,
            source: source.into(),
            destination: destination.into(),
            lambda: edit::DEFAULT_LAMBDA,
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

/// The record appended to the model's metadata, one per edit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    /// Source prompt.
    pub source: String,
    /// Destination prompt.
    pub destination: String,
    /// λ.
    pub lambda: f64,
    /// Whether keys were edited along with values.
    pub keys: bool,
    /// The augmentation prefixes used.
    pub augmentations: Vec<String>,
    /// "time-onnx <version>".
    pub tool: String,
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
    /// Values-only edits change V but not K: no map of the embeddings does that.
    #[error(
        "--save-operator cannot represent a values-only edit: an operator changes the text embeddings, which \
         reach keys and values alike; drop --values-only or write an edited UNet instead"
    )]
    ValuesOnlyOperator,
    /// The operator file could not be written.
    #[error(transparent)]
    OperatorFile(#[from] OperatorFileError),
    /// `--save-weights` could not be written.
    #[error("cannot write the weights file {path}: {why}")]
    SaveWeights {
        /// The file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// Runs an edit.
pub fn run(req: &EditRequest) -> Result<EditReport, EditJobError> {
    run_with_progress(req, &mut |_| {})
}

/// What [`run_with_progress`] reports as it goes.
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// The text encoder is running (one batch for every prompt).
    TextEncoder,
    /// Copying the UNet's files: bytes done, bytes in all.
    Copy(u64, u64),
}

/// [`run`], telling `progress` about the slow stages.
pub fn run_with_progress(
    req: &EditRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<EditReport, EditJobError> {
    let mut timings = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |name: &'static str, timings: &mut Vec<(&'static str, Duration)>| {
        timings.push((name, clock.elapsed()));
        clock = Instant::now();
    };
    // Validate cheap things first: prompts, λ, the operator request, the UNet and its cross-attention.
    for (which, text) in [("source", &req.source), ("destination", &req.destination)] {
        if text.trim().is_empty() {
            return Err(EditError::EmptyPrompt { which }.into());
        }
    }
    if !(req.lambda.is_finite() && req.lambda > 0.0) {
        return Err(EditError::BadLambda { lambda: req.lambda }.into());
    }
    if req.save_operator.is_some() && req.targets == Targets::ValuesOnly {
        return Err(EditJobError::ValuesOnlyOperator);
    }
    let unet = match &req.unet {
        Some(path) => {
            let model = Model::open(path)?;
            if let Some(out) = &req.output {
                patch::check_output(&model, out)?;
            }
            let mut projections = cross_attention::locate(&model)?;
            name_from_config(path, &mut projections);
            Some((model, projections))
        }
        None => None,
    };
    let previous = unet
        .as_ref()
        .map(|(m, _)| previous_records(m))
        .unwrap_or_default();
    lap("read UNet", &mut timings);

    let text = prepare_text(req)?;
    lap("tokenize", &mut timings);
    // The prompts align: the edit will happen, so start copying the UNet's
    // bulk now, behind the text encoder and the solve.
    let copying = match (&unet, &req.output) {
        (Some((model, _)), Some(out)) => Some(patch::Copying::start(model, out)?),
        _ => None,
    };
    let (operator, unchanged) = embed_and_solve(
        req,
        &text,
        copying.is_some(),
        &mut |name| lap(name, &mut timings),
        progress,
    )?;
    let record = EditRecord {
        source: req.source.clone(),
        destination: req.destination.clone(),
        lambda: req.lambda,
        keys: req.targets == Targets::KeysAndValues,
        augmentations: req.augmentations.clone(),
        tool: format!("time-onnx {}", env!("CARGO_PKG_VERSION")),
    };
    if let Some(path) = &req.save_operator {
        let te = Model::open(&req.text_encoder)?;
        let meta = OperatorMeta {
            source: req.source.clone(),
            destination: req.destination.clone(),
            lambda: req.lambda,
            augmentations: req.augmentations.clone(),
            tool: record.tool.clone(),
            width: operator.dim(),
            text_encoder: weights_fingerprint(&te)?,
        };
        operator_file::save(path, &operator, &meta)?;
        lap("save operator", &mut timings);
    }

    let mut layers = Vec::new();
    let mut written = None;
    if let Some((model, projections)) = &unet {
        let mut patches = Vec::new();
        let mut torch = BTreeMap::new();
        let change = operator.change();
        let change32 = change.map(|v| v as f32);
        for p in projections {
            let old = model.tensor_bytes(&p.tensor)?;
            let edited = weights::apply(&change, &change32, p, &old, req.targets)?;
            layers.push(LayerReport {
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
                torch_entries(p, &weights::torch_layout(p, &edited.bytes)?, &mut torch);
            }
            if !unchanged {
                patches.push(TensorPatch {
                    tensor: p.tensor.clone(),
                    data: edited.bytes,
                });
            }
        }
        lap("apply", &mut timings);
        if let Some(copying) = copying {
            let meta = if unchanged {
                Vec::new()
            } else {
                let value = serde_json::to_string(&record).unwrap_or_default();
                vec![(format!("{RECORD_KEY}{}", previous.len() + 1), value)]
            };
            written = Some(copying.finish(model, &patches, &meta, &mut |done, total| {
                progress(Progress::Copy(done, total))
            })?);
            lap("write", &mut timings);
        }
        if let Some(path) = &req.save_weights {
            save_weights(path, &torch, &record)?;
        }
    }
    Ok(EditReport {
        layers,
        record,
        previous,
        written,
        operator,
        unchanged,
        timings,
    })
}

/// The prompts as token ids (every source, then every destination) and the
/// alignment of each pair.
struct Tokens {
    pairs: Vec<(String, String)>,
    maps: Vec<Vec<usize>>,
    ids: Vec<Vec<u32>>,
}

/// Tokenize and align: everything about the prompts that can fail before the
/// text encoder runs.
fn prepare_text(req: &EditRequest) -> Result<Tokens, EditJobError> {
    let tok = ClipTokenizer::from_dir(&req.tokenizer)?;
    let pairs = edit::prompt_pairs(&req.source, &req.destination, &req.augmentations);
    let rule = ArticleRule::from_tokenizer(&tok)?;
    let maps = pairs
        .iter()
        .map(|(s, d)| edit::align_prompts(&tok, &rule, s, d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ids = Vec::with_capacity(2 * pairs.len());
    for (s, _) in &pairs {
        ids.push(tok.encode_padded(s)?);
    }
    for (_, d) in &pairs {
        ids.push(tok.encode_padded(d)?);
    }
    Ok(Tokens { pairs, maps, ids })
}

/// Embed every prompt in one text-encoder run and solve. Returns the
/// operator and whether source and destination are the same.
///
/// `beside_copy`: a copy is running in the background and keeps one core
/// busy. The text encoder then runs on one thread: with two, ONNX Runtime's
/// worker spins against the copy for the one free core, which slowed both
/// (measured on the full-size model: the edit took 1.5–1.6 s this way, up to
/// 2.4 s with two threads).
fn embed_and_solve(
    req: &EditRequest,
    text: &Tokens,
    beside_copy: bool,
    lap: &mut dyn FnMut(&'static str),
    progress: &mut dyn FnMut(Progress),
) -> Result<(Operator, bool), EditJobError> {
    let Tokens { pairs, maps, ids } = text;
    progress(Progress::TextEncoder);
    let rt = Runtime::load()?;
    let opts = SessionOptions {
        device: Device::Cpu,
        threads: beside_copy.then_some(1),
        ..SessionOptions::default()
    };
    let mut encoder = TextEncoder::open_with(&rt, &req.text_encoder, opts)?;
    let emb: Array3<f32> = encoder.embed(ids)?;
    // Free the session (and its spinning thread pool) before the BLAS work.
    drop(encoder);
    let n = pairs.len();
    for (k, row) in emb.axis_iter(Axis(0)).enumerate() {
        if row.iter().any(|v| !v.is_finite()) {
            let prompt = if k < n { &pairs[k].0 } else { &pairs[k - n].1 };
            return Err(EditJobError::NonFiniteEmbedding {
                prompt: prompt.clone(),
            });
        }
    }
    lap("text encoder");
    let operator = edit::solve(
        emb.slice(s![..n, .., ..]),
        emb.slice(s![n.., .., ..]),
        maps,
        req.lambda,
    )?;
    lap("solve");
    Ok((operator, pairs.iter().all(|(s, d)| s == d)))
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

/// Edits already recorded in a model, oldest first.
pub fn previous_records(model: &Model) -> Vec<EditRecord> {
    let mut numbered: Vec<(u64, EditRecord)> = model
        .proto()
        .metadata_props
        .iter()
        .filter_map(|e| {
            let n = e.key.strip_prefix(RECORD_KEY)?.parse().ok()?;
            Some((n, serde_json::from_str(&e.value).ok()?))
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    numbered.into_iter().map(|(_, r)| r).collect()
}

/// Keys for `--save-weights`: the diffusers parameter name where the module
/// path is known, the initializer name otherwise.
fn torch_entries(
    p: &Projection,
    w: &ndarray::Array2<f32>,
    out: &mut BTreeMap<String, ndarray::Array2<f32>>,
) {
    match p.role {
        Role::PackedKeyValue { heads } => {
            let (k, v) = weights::split_packed(w, heads);
            let base = p.module.clone().unwrap_or_else(|| p.initializer.clone());
            out.insert(format!("{base}.to_k.weight"), k);
            out.insert(format!("{base}.to_v.weight"), v);
        }
        _ => {
            let base = p.module.clone().unwrap_or_else(|| p.initializer.clone());
            out.insert(format!("{base}.weight"), w.clone());
        }
    }
}

fn save_weights(
    path: &Path,
    tensors: &BTreeMap<String, ndarray::Array2<f32>>,
    record: &EditRecord,
) -> Result<(), EditJobError> {
    let err = |why: String| EditJobError::SaveWeights {
        path: path.to_path_buf(),
        why,
    };
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, v)| {
            let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), v.shape().to_vec(), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = std::collections::HashMap::from([(
        "time_onnx.edit".to_string(),
        serde_json::to_string(record).unwrap_or_default(),
    )]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| err(e.to_string()))
}
