//! The generation journey: prompt → embeddings (edit operators applied) →
//! latents denoised by a scheduler loop with classifier-free guidance
//! ([`crate::pipeline::denoise`]) → VAE → safety checker → images.
//!
//! A [`Generator`] holds one model folder's sessions across prompts. They
//! open on first use, so that a run can embed every prompt and free the text
//! encoder before the UNet is loaded: peak memory is then the larger of the
//! two, not their sum.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, ArrayD, ArrayView4, Axis, IxDyn, concatenate};

use crate::edit::Operator;
use crate::edit::operator_file::OperatorMeta;
use crate::edit::record::{EditRecord, previous_records};
use crate::edit::solve::compose;
use crate::onnx::summary::human_bytes;
use crate::onnx::{Model, OnnxError};
use crate::pipeline::conditioning::{
    self, ConditioningError, TextBatch, UnetInputs, guidance_embedding, repeat_row,
};
use crate::pipeline::denoise::{DenoiseError, Guidance, denoise};
use crate::pipeline::memory;
use crate::pipeline::model::{ModelDir, ModelDirError};
use crate::pipeline::rng::Rng;
use crate::pipeline::safety::SafetyChecker;
use crate::pipeline::schedulers::{self, SchedulerConfig, SchedulerError, SchedulerKind};
use crate::pipeline::unet::{Unet, stores_fp16};
use crate::pipeline::vae::VaeDecoder;
use crate::runtime::{Runtime, SessionError, SessionOptions};
use crate::text::encoder::{Embedded, TextEncoders};
use crate::text::{TextError, Tokenizers};

/// Everything that can stop a generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The model folder is incomplete.
    #[error(transparent)]
    ModelDir(#[from] ModelDirError),
    /// A session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The tokenizer failed.
    #[error(transparent)]
    Text(#[from] TextError),
    /// The scheduler config is unusable.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// The denoising loop failed.
    #[error(transparent)]
    Denoise(#[from] DenoiseError),
    /// The UNet or text encoder file could not be read.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The UNet's extra inputs do not fit the folder.
    #[error("{unet}: {source}")]
    Conditioning {
        /// The UNet file.
        unet: PathBuf,
        /// What does not fit.
        #[source]
        source: ConditioningError,
    },
    /// Edit operators of different widths cannot compose.
    #[error("edit operators of different widths ({other} and {first})")]
    OperatorWidths {
        /// The first operator's width.
        first: usize,
        /// The width of one that differs.
        other: usize,
    },
    /// An operator computed with another text encoder.
    #[error(
        "the operator for {source_prompt:?} → {destination:?} was computed with another text encoder \
         (fingerprint {}…, this model's {}…)",
        .theirs.get(..12).unwrap_or_default(), .ours.get(..12).unwrap_or_default()
    )]
    OtherTextEncoder {
        /// The operator's source prompt.
        source_prompt: String,
        /// Its destination prompt.
        destination: String,
        /// The fingerprint it records.
        theirs: String,
        /// This model's text encoder's.
        ours: String,
    },
    /// The operators and the text encoder have different widths.
    #[error("the edit operator is {operator}-wide, the text encoder gives {encoder}")]
    OperatorWidth {
        /// The operator's width.
        operator: usize,
        /// The text encoder's.
        encoder: usize,
    },
    /// The UNet and the text encoders come from different models.
    #[error(
        "the UNet expects {unet}-wide text embeddings but the text encoders give {encoders}: they \
         come from different models"
    )]
    TextWidth {
        /// What the UNet takes.
        unet: usize,
        /// What the text encoders give, e.g. "64 (32 + 32)".
        encoders: String,
    },
    /// The text encoder gave NaN or infinite embeddings for this prompt.
    #[error(
        "the text encoder returned non-finite embeddings for {0:?} (a broken or overflowing model)"
    )]
    NonFiniteEmbedding(String),
    /// An image size the VAE cannot produce.
    #[error(
        "height and width must be positive multiples of {factor} (the VAE factor), got {height}x{width}"
    )]
    Size {
        /// Pixels asked for.
        height: usize,
        /// Pixels asked for.
        width: usize,
        /// The VAE's pixels per latent.
        factor: usize,
    },
    /// A guidance scale that is NaN or infinite (every image would be NaN).
    #[error("the guidance scale must be a finite number, got {0}")]
    Guidance(f64),
    /// A generation larger than the memory it may use.
    #[error(
        "{images} image(s) of {height}x{width} need at least {} of memory, more than the {} {}",
        human_bytes(*.need), human_bytes(*.limit),
        if *.available { "available" } else { "allowed" }
    )]
    TooLarge {
        /// Images generated together.
        images: usize,
        /// Pixels asked for.
        height: usize,
        /// Pixels asked for.
        width: usize,
        /// The estimate's floor, in bytes (`u64::MAX` when beyond 64 bits).
        need: u64,
        /// The limit, in bytes.
        limit: u64,
        /// Whether the limit is the memory available (not one that was set).
        available: bool,
    },
    /// No steps or no images asked for.
    #[error("the step count and the image count must be at least 1")]
    NothingToDo,
    /// Supplied latents of the wrong shape.
    #[error("latents have shape {got:?}, expected {expected:?} (or batch 1)")]
    LatentsShape {
        /// Their shape.
        got: Vec<usize>,
        /// `[n, 4, h/f, w/f]`.
        expected: [usize; 4],
    },
    /// The decoder's input was not the latents' shape.
    #[error("the final latents: {0}")]
    Shape(String),
}

/// Settings of one generation (shared by every prompt of a run).
#[derive(Clone, Debug)]
pub struct Params {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 turns guidance off.
    pub guidance: f64,
    /// Negative prompt ("" when none, as diffusers does).
    pub negative_prompt: String,
    /// Images per prompt.
    pub num_images: usize,
    /// Image height in pixels (a multiple of the VAE factor).
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Seed of our RNG for latents and scheduler noise.
    pub seed: u64,
    /// Exact initial latents `[n or 1, 4, h/f, w/f] f32`, before `init_noise_sigma`.
    pub latents: Option<ArrayD<f32>>,
    /// Which scheduler (the config's class when `None`).
    pub scheduler: Option<SchedulerKind>,
    /// DDIM's η.
    pub eta: f64,
}

/// Images and the safety checker's verdicts.
#[derive(Debug)]
pub struct Images {
    /// `[n, height, width, 3] f32` in [0, 1].
    pub pixels: Array4<f32>,
    /// Per image: flagged by the safety checker (and then black). All false
    /// when the folder has no checker or it was skipped.
    pub flagged: Vec<bool>,
}

/// The sessions of the denoising half: UNet, VAE decoder, safety checker.
struct Denoiser {
    unet: Unet,
    vae: VaeDecoder,
    safety: Option<SafetyChecker>,
}

/// Loaded sessions for one model folder, reused across prompts.
pub struct Generator {
    /// The folder's layout and settings.
    pub model: ModelDir,
    /// The UNet file in use (the folder's, or an edited one).
    pub unet_path: PathBuf,
    /// Edits recorded in that UNet, oldest first.
    pub edits: Vec<EditRecord>,
    runtime: Runtime,
    opts: SessionOptions,
    skip_safety: bool,
    tokenizers: Tokenizers,
    /// Latent (height, width) when the UNet export fixes them.
    unet_latent_size: Option<(usize, usize)>,
    /// What the UNet reads besides the sample, timestep and text.
    unet_inputs: UnetInputs,
    /// Whether the UNet stores float16 weights (see [`Unet::streams_for`]).
    unet_fp16: bool,
    text_encoder: Option<TextEncoders>,
    denoiser: Option<Denoiser>,
    scheduler_config: SchedulerConfig,
    /// Mᵀ `[d, d] f32` for the composed edit operators, applied to every
    /// token's embedding before the UNet (row form: e' = e·Mᵀ).
    embedding_edit: Option<Array2<f32>>,
    /// Bytes a generation may need; the memory available when `None`.
    memory_limit: Option<u64>,
    /// Only a few prompts will be embedded (see [`Self::with_few_prompts`]).
    few_prompts: bool,
}

impl Generator {
    /// Reads `model`'s layout, with `unet` replacing the folder's UNet. The
    /// folder's safety checker runs on every image (see
    /// [`Self::without_safety_checker`]).
    pub fn open(
        rt: &Runtime,
        model: &Path,
        unet: Option<&Path>,
        opts: SessionOptions,
    ) -> Result<Self, GenerateError> {
        let model = ModelDir::open(model)?;
        let unet_path = unet.map_or_else(|| model.unet.clone(), Path::to_path_buf);
        let unet_model = Model::open(&unet_path)?;
        let unet_latent_size = unet_model
            .input_dims("sample")
            .and_then(|d| Some((d.get(2).copied()??, d.get(3).copied()??)));
        let unet_inputs = UnetInputs::of(&unet_model);
        let unet_fp16 = stores_fp16(&unet_model);
        let conditioning = |source| GenerateError::Conditioning {
            unet: unet_path.clone(),
            source,
        };
        unet_inputs
            .check(model.text.encoders.len() > 1)
            .map_err(conditioning)?;
        if unet_inputs.timestep_cond.is_some() && Self::cond_width(&unet_inputs, &model).is_none() {
            return Err(conditioning(ConditioningError::GuidanceWidth));
        }
        Ok(Self {
            edits: previous_records(&unet_model),
            runtime: rt.clone(),
            opts,
            skip_safety: false,
            tokenizers: Tokenizers::open(&model.text)?,
            unet_latent_size,
            unet_inputs,
            unet_fp16,
            text_encoder: None,
            denoiser: None,
            scheduler_config: SchedulerConfig::from_file(&model.scheduler_config)?,
            embedding_edit: None,
            memory_limit: None,
            few_prompts: false,
            model,
            unet_path,
        })
    }

    /// The same, never running the folder's safety checker.
    pub fn without_safety_checker(mut self) -> Self {
        self.skip_safety = true;
        self
    }

    /// The same, for a run that embeds a few prompts only: the text encoders
    /// load without pre-packing their weights, seconds sooner for SDXL's.
    pub fn with_few_prompts(mut self) -> Self {
        self.few_prompts = true;
        self
    }

    /// The same, refusing generations that need more than `bytes` instead
    /// of more than the memory available when they start.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Refuses `images` images of `height`×`width` generated together with
    /// guidance scale `guidance` when their floor (see [`memory`]) is above
    /// the limit, before anything of their size is allocated.
    pub fn check_memory(
        &self,
        images: usize,
        guidance: f64,
        height: usize,
        width: usize,
    ) -> Result<(), GenerateError> {
        let (limit, available) = match self.memory_limit {
            Some(bytes) => (bytes, false),
            None => match memory::available() {
                Some(bytes) => (bytes, true),
                None => return Ok(()),
            },
        };
        let need = memory::Footprint {
            images,
            unet_rows: self.cfg(guidance).rows(images),
            height,
            width,
            factor: self.model.vae_factor,
            decoder_channels: self.model.vae_decoder_channels,
        }
        .bytes()
        .unwrap_or(u64::MAX);
        if need > limit {
            return Err(GenerateError::TooLarge {
                images,
                height,
                width,
                need,
                limit,
                available,
            });
        }
        Ok(())
    }

    /// The classifier-free guidance a scale runs as: none for an
    /// LCM-distilled UNet, which reads the scale as an embedding instead
    /// (diffusers turns CFG off for a UNet with `time_cond_proj_dim`).
    pub fn cfg(&self, guidance: f64) -> Guidance {
        if self.unet_inputs.timestep_cond.is_some() {
            Guidance(0.0)
        } else {
            Guidance(guidance)
        }
    }

    /// The guidance scale diffusers' pipeline for this folder defaults to:
    /// 5 for SDXL (two text encoders), 8.5 for a latent consistency
    /// pipeline, 7.5 for Stable Diffusion.
    pub fn default_guidance(&self) -> f64 {
        let class = self.model.pipeline_class.as_deref().unwrap_or_default();
        if self.model.text.encoders.len() > 1 {
            5.0
        } else if class.contains("LatentConsistencyModel") {
            8.5
        } else {
            7.5
        }
    }

    /// The width of an LCM UNet's guidance embedding: its export's, else
    /// its config's.
    fn cond_width(inputs: &UnetInputs, model: &ModelDir) -> Option<usize> {
        inputs.timestep_cond.flatten().or(model.unet_time_cond_dim)
    }

    /// Whether a safety checker runs on the images.
    pub fn has_safety_checker(&self) -> bool {
        self.model.safety_checker.is_some() && !self.skip_safety
    }

    /// Applies edit operators to the text embeddings, in the order the edits
    /// were made: [A₁, A₂] acts as the UNet edited by A₁ then by A₂
    /// (W·A₁·A₂), i.e. embeddings c → A₁·(A₂·c).
    ///
    /// Each operator must come from this model's text encoder (same weights
    /// fingerprint) unless `force`.
    pub fn set_edit_operators(
        &mut self,
        ops: &[(Operator, OperatorMeta)],
        force: bool,
    ) -> Result<(), GenerateError> {
        let Some(((first, _), _)) = ops.split_first() else {
            self.embedding_edit = None;
            return Ok(());
        };
        let fingerprint = self.model.text.fingerprint()?;
        for (op, meta) in ops {
            if op.dim() != first.dim() {
                return Err(GenerateError::OperatorWidths {
                    first: first.dim(),
                    other: op.dim(),
                });
            }
            if meta.text_encoder != fingerprint && !force {
                return Err(GenerateError::OtherTextEncoder {
                    source_prompt: meta.spec.source.clone(),
                    destination: meta.spec.destination.clone(),
                    theirs: meta.text_encoder.clone(),
                    ours: fingerprint,
                });
            }
        }
        // Every width was checked equal above: composing cannot fail on shape.
        let composed =
            compose(ops.iter().map(|(op, _)| op)).map_err(|_| GenerateError::OperatorWidths {
                first: first.dim(),
                other: first.dim(),
            })?;
        self.set_operator(composed.as_ref());
        Ok(())
    }

    /// Applies one edit operator computed from this model's text encoder
    /// (no fingerprint check), or none: what an evaluation does between rows.
    pub fn set_operator(&mut self, op: Option<&Operator>) {
        self.embedding_edit = op.map(|o| o.transposed().mapv(|v| v as f32));
    }

    /// Embeds `[negative_prompt, prompt]`: the context `[2, 77, d] f32`,
    /// edit operators applied, and for SDXL the pooled embeddings `[2, p]`
    /// (which no edit touches). An empty negative prompt is "no negative
    /// prompt": with the folder's `force_zeros_for_empty_prompt` (SDXL) the
    /// unconditional row is then zeros, as in diffusers' SDXL pipeline.
    pub fn embed(
        &mut self,
        prompt: &str,
        negative_prompt: &str,
    ) -> Result<Embedded, GenerateError> {
        let primary = self.tokenizers.primary();
        for (what, text) in [("prompt", prompt), ("negative prompt", negative_prompt)] {
            if let Some(dropped) = primary.dropped_text(text)? {
                tracing::warn!(
                    "the {what} is longer than the text encoder's {} tokens; dropped: {dropped:?}",
                    primary.max_len()
                );
            }
        }
        let ids = vec![
            self.tokenizers.encode_padded(negative_prompt)?,
            self.tokenizers.encode_padded(prompt)?,
        ];
        let encoder = match &mut self.text_encoder {
            Some(e) => e,
            None => self.text_encoder.insert(TextEncoders::open(
                &self.runtime,
                &self.model.text,
                SessionOptions {
                    few_runs: self.few_prompts,
                    ..self.opts
                },
            )?),
        };
        let mut emb = encoder.embed(&ids)?;
        // NaN here would silently turn every image black.
        for (k, text) in [negative_prompt, prompt].into_iter().enumerate() {
            let finite = emb
                .context
                .index_axis(Axis(0), k)
                .iter()
                .all(|v| v.is_finite())
                && emb
                    .pooled
                    .as_ref()
                    .is_none_or(|p| p.row(k).iter().all(|v| v.is_finite()));
            if !finite {
                return Err(GenerateError::NonFiniteEmbedding(text.to_owned()));
            }
        }
        if let Some(w) = self.unet_inputs.context_width
            && w != emb.context.shape()[2]
        {
            return Err(GenerateError::TextWidth {
                unet: w,
                encoders: emb.describe_width(),
            });
        }
        if negative_prompt.is_empty() && self.model.force_zeros_for_empty_prompt {
            emb.context.index_axis_mut(Axis(0), 0).fill(0.0);
            if let Some(p) = &mut emb.pooled {
                p.row_mut(0).fill(0.0);
            }
        }
        if let Some(mt) = &self.embedding_edit {
            let d = emb.context.shape()[2];
            if mt.nrows() != d {
                return Err(GenerateError::OperatorWidth {
                    operator: mt.nrows(),
                    encoder: d,
                });
            }
            for mut seq in emb.context.axis_iter_mut(Axis(0)) {
                let edited = seq.dot(mt);
                seq.assign(&edited);
            }
        }
        Ok(emb)
    }

    /// Frees the text encoder's session; [`Self::embed`] would load it again.
    pub fn release_text_encoder(&mut self) {
        self.text_encoder = None;
    }

    /// The default image size `(height, width)`: the UNet's sample size
    /// (its config, else its fixed input dims, else SD's 64) times the VAE factor.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.model.vae_factor;
        let (h, w) = match (self.model.unet_sample_size, self.unet_latent_size) {
            (Some(s), _) => (s, s),
            (None, Some(hw)) => hw,
            (None, None) => (64, 64),
        };
        (h * f, w * f)
    }

    /// The scheduler a run will use.
    pub fn scheduler_kind(&self, p: &Params) -> Result<SchedulerKind, GenerateError> {
        Ok(match p.scheduler {
            Some(k) => k,
            None => self.scheduler_config.kind()?,
        })
    }

    /// Generates `p.num_images` images from the embeddings of one prompt
    /// (negative, prompt) made by [`Self::embed`]. `progress(call, calls)`
    /// is told after every UNet call.
    pub fn generate(
        &mut self,
        emb: &Embedded,
        p: &Params,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Images, GenerateError> {
        self.check_params(p)?;
        let f = self.model.vae_factor;
        let shape = [p.num_images, 4, p.height / f, p.width / f];
        let mut rng = Rng::new(p.seed);
        let latents = match &p.latents {
            Some(l) => broadcast_latents(l, shape)?,
            None => rng.randn(&shape),
        };
        let rows: Vec<(&Embedded, usize)> = self
            .cfg(p.guidance)
            .text_rows(p.num_images)
            .into_iter()
            .map(|r| (emb, r))
            .collect();
        let batch = self.text_batch(&rows, p)?;
        self.denoise_and_decode(batch, latents, p, &mut rng, progress)
    }

    /// One image per `(embeddings, latents [1, 4, h/f, w/f])`, every one
    /// with `p`'s size, steps, guidance and scheduler, denoised in one
    /// batch: what a server does for requests that carry different prompts
    /// and edits. With a deterministic scheduler each image is the one
    /// [`Self::generate`] draws from that embedding and those latents (the
    /// rows of a UNet batch do not mix); stochastic schedulers would draw
    /// every image's noise from `p.seed`.
    pub fn generate_each(
        &mut self,
        items: &[(&Embedded, ArrayView4<f32>)],
        p: &Params,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Images, GenerateError> {
        let p = Params {
            num_images: items.len(),
            ..p.clone()
        };
        self.check_params(&p)?;
        let f = self.model.vae_factor;
        let want = [1, 4, p.height / f, p.width / f];
        let mut latents = Vec::new();
        for (_, l) in items {
            if l.shape() != want {
                return Err(GenerateError::LatentsShape {
                    got: l.shape().to_vec(),
                    expected: [p.num_images, want[1], want[2], want[3]],
                });
            }
            latents.push(l.view());
        }
        let latents =
            concatenate(Axis(0), &latents).map_err(|e| GenerateError::Shape(e.to_string()))?;
        // Every item's unconditional row, then every item's prompt row.
        let guided = self.cfg(p.guidance).is_on();
        let halves: &[usize] = if guided { &[0, 1] } else { &[1] };
        let rows: Vec<(&Embedded, usize)> = halves
            .iter()
            .flat_map(|&r| items.iter().map(move |(e, _)| (*e, r)))
            .collect();
        let batch = self.text_batch(&rows, &p)?;
        let mut rng = Rng::new(p.seed);
        self.denoise_and_decode(batch, latents.into_dyn(), &p, &mut rng, progress)
    }

    /// The UNet's batch: row k is row `rows[k].1` (0 negative, 1 prompt) of
    /// embeddings `rows[k].0`, with SDXL's pooled embedding and size
    /// conditioning and LCM's guidance embedding where the UNet reads them.
    fn text_batch(
        &self,
        rows: &[(&Embedded, usize)],
        p: &Params,
    ) -> Result<TextBatch, GenerateError> {
        let shape_error = |e: ndarray::ShapeError| GenerateError::Shape(e.to_string());
        let context: Vec<_> = rows
            .iter()
            .map(|(e, r)| e.context.slice(ndarray::s![*r..*r + 1, .., ..]))
            .collect();
        let hidden = concatenate(Axis(0), &context).map_err(shape_error)?;
        let text_embeds = match self.unet_inputs.text_embeds {
            None => None,
            Some(width) => {
                let pooled: Vec<_> = rows
                    .iter()
                    .filter_map(|(e, r)| {
                        Some(e.pooled.as_ref()?.slice(ndarray::s![*r..*r + 1, ..]))
                    })
                    .collect();
                if pooled.len() != rows.len() {
                    return Err(self.conditioning(ConditioningError::NoPooledOutput));
                }
                let pooled = concatenate(Axis(0), &pooled).map_err(shape_error)?;
                if let Some(w) = width
                    && w != pooled.ncols()
                {
                    return Err(self.conditioning(ConditioningError::PooledWidth {
                        unet: w,
                        encoder: pooled.ncols(),
                    }));
                }
                Some(pooled)
            }
        };
        let time_ids = self
            .unet_inputs
            .time_ids
            .map(|_| repeat_row(&conditioning::time_ids(p.height, p.width), rows.len()));
        let timestep_cond = match Self::cond_width(&self.unet_inputs, &self.model) {
            Some(dim) if self.unet_inputs.timestep_cond.is_some() => {
                Some(repeat_row(&guidance_embedding(p.guidance, dim), rows.len()))
            }
            _ => None,
        };
        Ok(TextBatch {
            hidden,
            text_embeds,
            time_ids,
            timestep_cond,
        })
    }

    fn conditioning(&self, source: ConditioningError) -> GenerateError {
        GenerateError::Conditioning {
            unet: self.unet_path.clone(),
            source,
        }
    }

    /// Refuses a size the VAE cannot make, nothing to do, a non-finite
    /// guidance, or more memory than allowed, before anything is allocated.
    fn check_params(&self, p: &Params) -> Result<(), GenerateError> {
        let f = self.model.vae_factor;
        if p.height == 0
            || p.width == 0
            || !p.height.is_multiple_of(f)
            || !p.width.is_multiple_of(f)
        {
            return Err(GenerateError::Size {
                height: p.height,
                width: p.width,
                factor: f,
            });
        }
        if p.steps == 0 || p.num_images == 0 {
            return Err(GenerateError::NothingToDo);
        }
        if !p.guidance.is_finite() {
            return Err(GenerateError::Guidance(p.guidance));
        }
        self.check_memory(p.num_images, p.guidance, p.height, p.width)
    }

    /// Denoises `latents` with the UNet bound to `batch` and decodes them,
    /// the safety checker after.
    fn denoise_and_decode(
        &mut self,
        batch: TextBatch,
        latents: ArrayD<f32>,
        p: &Params,
        rng: &mut Rng,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Images, GenerateError> {
        let n = p.num_images;
        let guidance = self.cfg(p.guidance);
        let kind = self.scheduler_kind(p)?;
        let mut scheduler = schedulers::build(&self.scheduler_config, kind, p.steps, p.eta)?;
        let vae_scale = self.model.vae_scaling_factor;
        let den = self.denoiser(guidance.rows(n))?;
        let x = denoise(
            &mut den.unet,
            &mut scheduler,
            &batch,
            latents,
            guidance,
            rng,
            progress,
        )?;
        let x: Array4<f32> = x
            .into_dimensionality()
            .map_err(|e| GenerateError::Shape(e.to_string()))?;
        let pixels = den.vae.decode(x.mapv(|v| v / vae_scale).view())?;
        Ok(match &mut den.safety {
            Some(checker) => {
                let (pixels, flagged) = checker.check(pixels.view())?;
                Images { pixels, flagged }
            }
            None => Images {
                pixels,
                flagged: vec![false; n],
            },
        })
    }

    /// The sessions that turn embeddings into images, for batches of `rows`.
    fn denoiser(&mut self, rows: usize) -> Result<&mut Denoiser, GenerateError> {
        let on_cpu = self.runtime.on_cpu(self.opts);
        let streams = Unet::streams_for(self.opts.threads, on_cpu, rows, self.unet_fp16);
        if self
            .denoiser
            .as_ref()
            .is_some_and(|d| d.unet.streams() != streams)
        {
            // A batch that splits differently from the last (guidance turned
            // off, an odd number of images): reopen for it, dropping the old
            // sessions first so that two UNets are never loaded at once.
            self.denoiser = None;
        }
        let den = match self.denoiser.take() {
            Some(den) => den,
            None => {
                let (rt, opts) = (&self.runtime, self.opts);
                // diffusers' SDXL pipeline upcasts a float16 VAE with
                // `force_upcast`; its SD pipeline never does.
                let upcast = self.model.text.encoders.len() > 1 && self.model.vae_force_upcast;
                let safety = match (&self.model.safety_checker, self.skip_safety) {
                    (Some((checker, config)), false) => {
                        Some(SafetyChecker::open(rt, checker, config, opts)?)
                    }
                    _ => None,
                };
                Denoiser {
                    unet: Unet::open(rt, &self.unet_path, opts, streams)?,
                    vae: VaeDecoder::open(rt, &self.model.vae_decoder, opts, upcast)?,
                    safety,
                }
            }
        };
        Ok(self.denoiser.insert(den))
    }
}

/// What a PNG records beside its own prompt and index: the model, the
/// UNet, the scheduler, the edits in the UNet and the operators applied, and
/// whether a safety checker ran. `generate` and `serve` write the same.
pub struct ImageText {
    model: String,
    unet: String,
    scheduler: String,
    edits: String,
    operators: String,
    safety_checker: bool,
}

impl ImageText {
    /// The text for images `generator` makes from `model` with `params` and
    /// the operators `operators` describe.
    pub fn of(
        generator: &Generator,
        model: &Path,
        params: &Params,
        operators: &[&OperatorMeta],
    ) -> Result<Self, GenerateError> {
        // Plain records always serialise.
        Ok(Self {
            model: model.display().to_string(),
            unet: generator.unet_path.display().to_string(),
            scheduler: generator.scheduler_kind(params)?.to_string(),
            edits: serde_json::to_string(&generator.edits).unwrap_or_default(),
            operators: serde_json::to_string(operators).unwrap_or_default(),
            safety_checker: generator.has_safety_checker(),
        })
    }

    /// The text chunks of image `index` of `prompt` (flagged or not by the
    /// safety checker).
    pub fn chunks(
        &self,
        prompt: &str,
        params: &Params,
        index: usize,
        flagged: bool,
    ) -> Vec<(String, String)> {
        let safety = match (self.safety_checker, flagged) {
            (false, _) => "not run",
            (true, false) => "passed",
            (true, true) => "flagged (image blacked out)",
        };
        [
            ("prompt", prompt.to_string()),
            ("negative_prompt", params.negative_prompt.clone()),
            ("seed", params.seed.to_string()),
            ("image_index", index.to_string()),
            ("steps", params.steps.to_string()),
            ("scheduler", self.scheduler.clone()),
            ("guidance", params.guidance.to_string()),
            ("safety_checker", safety.to_string()),
            ("size", format!("{}x{}", params.width, params.height)),
            ("model", self.model.clone()),
            ("unet", self.unet.clone()),
            ("time_onnx.edits", self.edits.clone()),
            ("time_onnx.operators", self.operators.clone()),
            (
                "Software",
                format!("time-onnx {}", env!("CARGO_PKG_VERSION")),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Supplied latents: `[n, 4, h, w]` as is, or `[1, 4, h, w]` repeated for n images.
fn broadcast_latents(l: &ArrayD<f32>, shape: [usize; 4]) -> Result<ArrayD<f32>, GenerateError> {
    let s = l.shape();
    let fits = s.len() == 4 && s[1..] == shape[1..] && (s[0] == shape[0] || s[0] == 1);
    match l.broadcast(IxDyn(&shape)) {
        Some(v) if fits => Ok(v.to_owned()),
        _ => Err(GenerateError::LatentsShape {
            got: s.to_vec(),
            expected: shape,
        }),
    }
}
