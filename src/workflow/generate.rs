//! The generation journey: prompt → embeddings → latents denoised by a
//! scheduler loop with classifier-free guidance → VAE → images.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, ArrayD, Axis, IxDyn, concatenate};

use crate::edit::Operator;
use crate::edit::operator_file::OperatorMeta;
use crate::onnx::fingerprint::weights_fingerprint;
use crate::onnx::{Model, OnnxError};
use crate::pipeline::model::{ModelDir, ModelDirError};
use crate::pipeline::rng::Rng;
use crate::pipeline::safety::SafetyChecker;
use crate::pipeline::schedulers::{self, SchedulerConfig, SchedulerError, SchedulerKind};
use crate::pipeline::unet::Unet;
use crate::pipeline::vae::VaeDecoder;
use crate::runtime::{Device, Runtime, SessionError, SessionOptions};
use crate::text::encoder::TextEncoder;
use crate::text::{ClipTokenizer, TextError};
use crate::workflow::edit::{EditRecord, previous_records};

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
    /// The UNet file could not be read for its edit record.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// Models that do not fit together.
    #[error("{0}")]
    Mismatch(String),
    /// The text encoder gave NaN or infinite embeddings for this prompt.
    #[error(
        "the text encoder returned non-finite embeddings for {0:?} (a broken or overflowing model)"
    )]
    NonFiniteEmbedding(String),
    /// A bad size, step count or latents file.
    #[error("{0}")]
    Invalid(String),
}

/// The sessions of the denoising half: UNet, VAE decoder, safety checker.
struct Denoiser {
    unet: Unet,
    vae: VaeDecoder,
    safety: Option<SafetyChecker>,
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
    tokenizer: ClipTokenizer,
    /// Latent (height, width) when the UNet export fixes them.
    unet_latent_size: Option<(usize, usize)>,
    // Sessions open on first use, so that a run can embed every prompt and
    // free the text encoder before the UNet is loaded: peak memory is then
    // the larger of the two, not their sum.
    text_encoder: Option<TextEncoder>,
    denoiser: Option<Denoiser>,
    scheduler_config: SchedulerConfig,
    /// Mᵀ `[d, d] f32` for the composed edit operators, applied to every
    /// token's embedding before the UNet (row form: e' = e·Mᵀ).
    embedding_edit: Option<ndarray::Array2<f32>>,
    /// Whether the models run on the CPU (`--device auto` asks CUDA once).
    on_cpu: std::sync::OnceLock<bool>,
}

impl Generator {
    /// Opens every session of `model`, with `unet` replacing the folder's UNet.
    /// The folder's safety checker runs on every image unless `skip_safety`.
    pub fn open(
        rt: &Runtime,
        model: &Path,
        unet: Option<&Path>,
        opts: SessionOptions,
    ) -> Result<Self, GenerateError> {
        Self::open_with_safety(rt, model, unet, opts, false)
    }

    /// [`Self::open`], choosing whether the safety checker runs.
    pub fn open_with_safety(
        rt: &Runtime,
        model: &Path,
        unet: Option<&Path>,
        opts: SessionOptions,
        skip_safety: bool,
    ) -> Result<Self, GenerateError> {
        let model = ModelDir::open(model)?;
        let unet_path = unet.map_or_else(|| model.unet.clone(), Path::to_path_buf);
        let unet_model = Model::open(&unet_path)?;
        let edits = previous_records(&unet_model);
        let unet_latent_size = latent_size(&unet_model);
        let scheduler_config = SchedulerConfig::from_file(&model.scheduler_config)?;
        Ok(Self {
            runtime: rt.clone(),
            opts,
            skip_safety,
            tokenizer: ClipTokenizer::from_dir(&model.tokenizer)?,
            unet_latent_size,
            text_encoder: None,
            denoiser: None,
            scheduler_config,
            embedding_edit: None,
            on_cpu: std::sync::OnceLock::new(),
            model,
            unet_path,
            edits,
        })
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
        if ops.is_empty() {
            self.embedding_edit = None;
            return Ok(());
        }
        let fingerprint = weights_fingerprint(&Model::open(&self.model.text_encoder)?)?;
        let d = ops[0].0.dim();
        let mut acc = ndarray::Array2::<f64>::eye(d);
        for (op, meta) in ops {
            if op.dim() != d {
                return Err(GenerateError::Mismatch(format!(
                    "edit operators of different widths ({} and {d})",
                    op.dim()
                )));
            }
            if meta.text_encoder != fingerprint && !force {
                return Err(GenerateError::Mismatch(format!(
                    "the operator for {:?} → {:?} was computed with another text encoder (fingerprint {}…, this model's {}…); \
                     use --force to apply it anyway",
                    meta.source,
                    meta.destination,
                    &meta.text_encoder.get(..12).unwrap_or_default(),
                    &fingerprint[..12]
                )));
            }
            acc = op.transposed().dot(&acc);
        }
        self.embedding_edit = Some(acc.mapv(|v| v as f32));
        Ok(())
    }

    /// Applies one edit operator computed from this model's text encoder
    /// (no fingerprint check), or none: what an evaluation does between rows.
    pub fn set_operator(&mut self, op: Option<&Operator>) {
        self.embedding_edit = op.map(|o| o.transposed().mapv(|v| v as f32));
    }

    /// Whether a safety checker runs on the images.
    pub fn has_safety_checker(&self) -> bool {
        self.model.safety_checker.is_some() && !self.skip_safety
    }

    /// Embeds `[negative_prompt, prompt]`: `[2, 77, d] f32`, edit operators applied.
    pub fn embed(
        &mut self,
        prompt: &str,
        negative_prompt: &str,
    ) -> Result<Array3<f32>, GenerateError> {
        let ids = vec![
            self.tokenizer.encode_padded(negative_prompt)?,
            self.tokenizer.encode_padded(prompt)?,
        ];
        let encoder = match &mut self.text_encoder {
            Some(e) => e,
            None => self.text_encoder.insert(TextEncoder::open_with(
                &self.runtime,
                &self.model.text_encoder,
                self.opts,
            )?),
        };
        let mut emb = encoder.embed(&ids)?;
        // NaN here would silently turn every image black.
        for (row, text) in emb.axis_iter(Axis(0)).zip([negative_prompt, prompt]) {
            if row.iter().any(|v| !v.is_finite()) {
                return Err(GenerateError::NonFiniteEmbedding(text.to_owned()));
            }
        }
        let d = emb.shape()[2];
        if let Some(mt) = &self.embedding_edit {
            if mt.nrows() != d {
                return Err(GenerateError::Mismatch(format!(
                    "the edit operator is {}-wide, the text encoder gives {d}",
                    mt.nrows()
                )));
            }
            for mut seq in emb.axis_iter_mut(Axis(0)) {
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

    /// The sessions that turn embeddings into images, for batches of `rows`.
    fn denoiser(&mut self, rows: usize) -> Result<&mut Denoiser, GenerateError> {
        let on_cpu = *self.on_cpu.get_or_init(|| match self.opts.device {
            Device::Cpu => true,
            Device::Auto => self.runtime.cuda_check().is_err(),
            Device::Cuda => false,
        });
        let streams = Unet::streams_for(self.opts.threads, on_cpu, rows);
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
        if self.denoiser.is_none() {
            let (rt, opts) = (&self.runtime, self.opts);
            let safety = match (&self.model.safety_checker, self.skip_safety) {
                (Some((checker, config)), false) => {
                    Some(SafetyChecker::open(rt, checker, config, opts)?)
                }
                _ => None,
            };
            self.denoiser = Some(Denoiser {
                unet: Unet::open(rt, &self.unet_path, opts, streams)?,
                vae: VaeDecoder::open(rt, &self.model.vae_decoder, opts)?,
                safety,
            });
        }
        self.denoiser
            .as_mut()
            .ok_or_else(|| GenerateError::Invalid("no denoiser".into()))
    }

    /// Replaces the folder's `scheduler/scheduler_config.json`.
    pub fn set_scheduler_config(&mut self, config: SchedulerConfig) {
        self.scheduler_config = config;
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

    /// Generates `p.num_images` images of `prompt`: `[n, height, width, 3] f32` in [0, 1].
    ///
    /// `progress(call, calls)` is told after every UNet call.
    pub fn generate(
        &mut self,
        prompt: &str,
        p: &Params,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Array4<f32>, GenerateError> {
        Ok(self.generate_checked(prompt, p, progress)?.0)
    }

    /// [`Self::generate`], also returning the safety checker's flag per image
    /// (all false when the folder has no checker or it was skipped). Flagged
    /// images come back black, as the checker returns them.
    pub fn generate_checked(
        &mut self,
        prompt: &str,
        p: &Params,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Array4<f32>, Vec<bool>), GenerateError> {
        let emb = self.embed(prompt, &p.negative_prompt)?;
        self.generate_embedded(&emb, p, progress)
    }

    /// [`Self::generate_checked`] from embeddings `[2, 77, d] f32` (negative,
    /// prompt) made by [`Self::embed`].
    pub fn generate_embedded(
        &mut self,
        emb: &Array3<f32>,
        p: &Params,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Array4<f32>, Vec<bool>), GenerateError> {
        let f = self.model.vae_factor;
        if p.height == 0
            || p.width == 0
            || !p.height.is_multiple_of(f)
            || !p.width.is_multiple_of(f)
        {
            return Err(GenerateError::Invalid(format!(
                "height and width must be positive multiples of {f} (the VAE factor), got {}x{}",
                p.height, p.width
            )));
        }
        if p.steps == 0 || p.num_images == 0 {
            return Err(GenerateError::Invalid(
                "--steps and --num-images must be at least 1".into(),
            ));
        }
        let n = p.num_images;
        let guided = p.guidance > 1.0;

        let d = emb.shape()[2];
        let vae_scale = self.model.vae_scaling_factor;
        let scheduler_config = self.scheduler_config.clone();
        let den = self.denoiser(if guided { 2 * n } else { n })?;
        if let Some(w) = den.unet.text_width()
            && w != d
        {
            return Err(GenerateError::Mismatch(format!(
                "the UNet expects {w}-wide text embeddings but the text encoder gives {d}: they come from different models"
            )));
        }
        // [uncond × n, cond × n] with guidance, [cond × n] without: `[b, 77, d] f32`.
        let rows: Vec<usize> = if guided {
            vec![0; n].into_iter().chain(vec![1; n]).collect()
        } else {
            vec![1; n]
        };
        let hidden: Array3<f32> = emb.select(Axis(0), &rows);

        // Latents.
        let shape = [n, 4, p.height / f, p.width / f];
        let mut rng = Rng::new(p.seed);
        let latents = match &p.latents {
            Some(l) => broadcast_latents(l, shape)?,
            None => rng.randn(&shape),
        };
        let kind = match p.scheduler {
            Some(k) => k,
            None => scheduler_config.kind()?,
        };
        let mut sched = schedulers::build(&scheduler_config, kind, p.steps, p.eta)?;
        let mut x: ArrayD<f32> = latents.mapv(|v| v * sched.init_noise_sigma() as f32);
        let timesteps = sched.timesteps().to_vec();
        den.unet.bind_hidden(hidden.view())?;
        for (call, &t) in timesteps.iter().enumerate() {
            let input = sched.scale_model_input(x.view(), call)?;
            let batch = if guided {
                concatenate(Axis(0), &[input.view(), input.view()])
                    .map_err(|e| GenerateError::Invalid(e.to_string()))?
            } else {
                input
            };
            let batch = batch
                .into_dimensionality()
                .map_err(|e| GenerateError::Invalid(e.to_string()))?;
            let eps = den.unet.predict_bound(batch.view(), t)?.into_dyn();
            let eps = if guided {
                let (u, c) = eps.view().split_at(Axis(0), n);
                &u + &((&c - &u) * p.guidance as f32)
            } else {
                eps
            };
            x = sched.step(eps.view(), call, x.view(), &mut |s: &[usize]| rng.randn(s))?;
            progress(call + 1, timesteps.len());
        }
        let x: Array4<f32> = x
            .into_dimensionality()
            .map_err(|e| GenerateError::Invalid(e.to_string()))?;
        let images = den.vae.decode(x.mapv(|v| v / vae_scale).view())?;
        match &mut den.safety {
            Some(checker) => Ok(checker.check(images.view())?),
            None => Ok((images, vec![false; n])),
        }
    }
}

/// Supplied latents: `[n, 4, h, w]` as is, or `[1, 4, h, w]` repeated for n images.
fn broadcast_latents(l: &ArrayD<f32>, shape: [usize; 4]) -> Result<ArrayD<f32>, GenerateError> {
    let s = l.shape();
    if s.len() == 4 && s[1..] == shape[1..] && (s[0] == shape[0] || s[0] == 1) {
        return l
            .broadcast(IxDyn(&shape))
            .map(|v| v.to_owned())
            .ok_or_else(|| GenerateError::Invalid("latents do not broadcast".into()));
    }
    Err(GenerateError::Invalid(format!(
        "latents have shape {s:?}, expected {shape:?} (or batch 1)"
    )))
}

/// The UNet's fixed latent (height, width), read from its `sample` input.
fn latent_size(unet: &Model) -> Option<(usize, usize)> {
    use crate::onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value};
    let input = unet
        .graph()
        .ok()?
        .input
        .iter()
        .find(|i| i.name == "sample")?;
    let Some(Value::TensorType(t)) = input.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims = &t.shape.as_ref()?.dim;
    let fixed = |i: usize| match dims.get(i)?.value.as_ref()? {
        Dim::DimValue(v) if *v > 0 => usize::try_from(*v).ok(),
        _ => None,
    };
    Some((fixed(2)?, fixed(3)?))
}
