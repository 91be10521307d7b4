//! The generation journey: prompt → embeddings → latents denoised by a
//! scheduler loop with classifier-free guidance → VAE → images.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, ArrayD, Axis, IxDyn, concatenate};

use crate::onnx::{Model, OnnxError};
use crate::pipeline::model::{ModelDir, ModelDirError};
use crate::pipeline::rng::Rng;
use crate::pipeline::schedulers::{self, SchedulerConfig, SchedulerError, SchedulerKind};
use crate::pipeline::unet::Unet;
use crate::pipeline::vae::VaeDecoder;
use crate::runtime::{Runtime, SessionError, SessionOptions};
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
    /// A bad size, step count or latents file.
    #[error("{0}")]
    Invalid(String),
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
    tokenizer: ClipTokenizer,
    text_encoder: TextEncoder,
    unet: Unet,
    vae: VaeDecoder,
    scheduler_config: SchedulerConfig,
}

impl Generator {
    /// Opens every session of `model`, with `unet` replacing the folder's UNet.
    pub fn open(
        rt: &Runtime,
        model: &Path,
        unet: Option<&Path>,
        opts: SessionOptions,
    ) -> Result<Self, GenerateError> {
        let model = ModelDir::open(model)?;
        let unet_path = unet.map_or_else(|| model.unet.clone(), Path::to_path_buf);
        let edits = previous_records(&Model::open(&unet_path)?);
        let scheduler_config = SchedulerConfig::from_file(&model.scheduler_config)?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&model.tokenizer)?,
            text_encoder: TextEncoder::open_with(rt, &model.text_encoder, opts)?,
            unet: Unet::open(rt, &unet_path, opts)?,
            vae: VaeDecoder::open(rt, &model.vae_decoder, opts)?,
            scheduler_config,
            model,
            unet_path,
            edits,
        })
    }

    /// Replaces the folder's `scheduler/scheduler_config.json`.
    pub fn set_scheduler_config(&mut self, config: SchedulerConfig) {
        self.scheduler_config = config;
    }

    /// The default image side: the UNet's sample size times the VAE factor.
    pub fn default_size(&self) -> usize {
        self.model.unet_sample_size.unwrap_or(64) * self.model.vae_factor
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

        // Text: one encoder run for [uncond, cond].
        let ids = vec![
            self.tokenizer.encode_padded(&p.negative_prompt)?,
            self.tokenizer.encode_padded(prompt)?,
        ];
        let emb = self.text_encoder.embed(&ids)?;
        let d = emb.shape()[2];
        if let Some(w) = self.unet.text_width()
            && w != d
        {
            return Err(GenerateError::Mismatch(format!(
                "the UNet expects {w}-wide text embeddings but the text encoder gives {d}: they come from different models"
            )));
        }
        let repeat = |row: usize| -> Array3<f32> {
            let one = emb.index_axis(Axis(0), row);
            let views: Vec<_> = (0..n).map(|_| one.insert_axis(Axis(0))).collect();
            concatenate(Axis(0), &views).unwrap_or_else(|_| Array3::zeros((0, 0, 0)))
        };
        let hidden = if guided {
            concatenate(Axis(0), &[repeat(0).view(), repeat(1).view()])
                .map_err(|e| GenerateError::Invalid(e.to_string()))?
        } else {
            repeat(1)
        };

        // Latents.
        let shape = [n, 4, p.height / f, p.width / f];
        let mut rng = Rng::new(p.seed);
        let latents = match &p.latents {
            Some(l) => broadcast_latents(l, shape)?,
            None => rng.randn(&shape),
        };
        let kind = self.scheduler_kind(p)?;
        let mut sched = schedulers::build(&self.scheduler_config, kind, p.steps, p.eta)?;
        let mut x: ArrayD<f32> = latents.mapv(|v| v * sched.init_noise_sigma() as f32);
        let timesteps = sched.timesteps().to_vec();
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
            let eps = self
                .unet
                .predict(batch.view(), t, hidden.view())?
                .into_dyn();
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
        Ok(self
            .vae
            .decode(x.mapv(|v| v / self.model.vae_scaling_factor).view())?)
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
