//! A Stable Diffusion ONNX model folder, in the layouts diffusers' convert
//! script and optimum write.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::text::TextSide;
use crate::text::side::TextSideError;

/// Why a model folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    /// A component is missing.
    #[error("{dir} is not a Stable Diffusion ONNX folder: {what} not found at {path}")]
    Missing {
        /// The model folder.
        dir: PathBuf,
        /// The component.
        what: &'static str,
        /// Where it was expected.
        path: PathBuf,
    },
    /// The text encoders and tokenizers do not fit together.
    #[error(transparent)]
    Text(#[from] TextSideError),
    /// Something the folder declares that time-onnx does not implement.
    #[error("{dir}: {what}")]
    Unsupported {
        /// The model folder.
        dir: PathBuf,
        /// What, and why.
        what: String,
    },
    /// A config file that does not parse.
    #[error("cannot read {path}: {why}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
}

/// Paths and settings of one model folder.
#[derive(Clone, Debug)]
pub struct ModelDir {
    /// The folder.
    pub root: PathBuf,
    /// `text_encoder/` and `tokenizer/` (and SDXL's `text_encoder_2/`, `tokenizer_2/`).
    pub text: TextSide,
    /// `unet/model.onnx`.
    pub unet: PathBuf,
    /// `vae_decoder/model.onnx`.
    pub vae_decoder: PathBuf,
    /// `scheduler/scheduler_config.json`.
    pub scheduler_config: PathBuf,
    /// `safety_checker/model.onnx` and `feature_extractor/preprocessor_config.json`,
    /// when the folder has both.
    pub safety_checker: Option<(PathBuf, PathBuf)>,
    /// Latents are multiplied by this before decoding is undone (`vae.config.scaling_factor`).
    pub vae_scaling_factor: f32,
    /// Pixels per latent (2^(number of VAE blocks − 1)).
    pub vae_factor: usize,
    /// Channels of the VAE decoder's widest full-resolution layer
    /// (`block_out_channels[1]`, 256 for SD), for the memory check.
    pub vae_decoder_channels: usize,
    /// The VAE config's `force_upcast` (absent: diffusers' default, true):
    /// SDXL's pipeline then decodes a float16 VAE in float32.
    pub vae_force_upcast: bool,
    /// Latent side the UNet was trained at (`unet/config.json` `sample_size`), when known.
    pub unet_sample_size: Option<usize>,
    /// The guidance embedding's width of an LCM-distilled UNet
    /// (`unet/config.json` `time_cond_proj_dim`), when known.
    pub unet_time_cond_dim: Option<usize>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL pipelines:
    /// without a negative prompt, the unconditional half reads zeros, not
    /// the embedding of "").
    pub force_zeros_for_empty_prompt: bool,
    /// `model_index.json`'s `_class_name`, when the folder has one.
    pub pipeline_class: Option<String>,
}

#[derive(Deserialize)]
struct VaeConfig {
    scaling_factor: Option<f32>,
    block_out_channels: Option<Vec<usize>>,
    /// Decode in float32 whatever the stored precision (diffusers'
    /// `AutoencoderKL` default: true).
    force_upcast: Option<bool>,
    /// Per-channel latent statistics some VAEs declare (decoding then
    /// un-normalises with them); not implemented, so refused when set.
    latents_mean: Option<serde_json::Value>,
    latents_std: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct UnetConfig {
    sample_size: Option<usize>,
    time_cond_proj_dim: Option<usize>,
}

#[derive(Deserialize, Default)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    force_zeros_for_empty_prompt: Option<bool>,
}

/// SD 1.x/2.x's VAE scaling factor, used when the folder has no VAE config.
pub const DEFAULT_VAE_SCALING: f32 = 0.18215;

/// SD's VAE `block_out_channels[1]` (128, 256, 512, 512), used when the folder
/// has no VAE config.
const SD_DECODER_CHANNELS: usize = 256;

impl ModelDir {
    /// Reads the folder layout; every required file must exist.
    pub fn open(root: &Path) -> Result<Self, ModelDirError> {
        let need = |what: &'static str, rel: &str| {
            let path = root.join(rel);
            if path.exists() {
                Ok(path)
            } else {
                Err(ModelDirError::Missing {
                    dir: root.to_path_buf(),
                    what,
                    path,
                })
            }
        };
        let text = TextSide::from_model_dir(root)?;
        for (what, path) in text.parts() {
            if !path.exists() {
                return Err(ModelDirError::Missing {
                    dir: root.to_path_buf(),
                    what,
                    path: path.to_path_buf(),
                });
            }
        }
        let unet = need("the UNet", "unet/model.onnx")?;
        let vae_decoder = need("the VAE decoder", "vae_decoder/model.onnx")?;
        let scheduler_config = need("the scheduler config", "scheduler/scheduler_config.json")?;
        let checker = root.join("safety_checker/model.onnx");
        let safety_checker = if checker.exists() {
            Some((
                checker,
                need(
                    "the safety checker's feature extractor",
                    "feature_extractor/preprocessor_config.json",
                )?,
            ))
        } else {
            None
        };

        // optimum keeps the VAE config beside the decoder; diffusers' script keeps none.
        let vae: Option<VaeConfig> = ["vae_decoder/config.json", "vae/config.json"]
            .iter()
            .map(|rel| root.join(rel))
            .find(|p| p.exists())
            .map(|p| read_json(&p))
            .transpose()?;
        let vae_scaling_factor = vae
            .as_ref()
            .and_then(|v| v.scaling_factor)
            .unwrap_or(DEFAULT_VAE_SCALING);
        let vae_factor = vae
            .as_ref()
            .and_then(|v| v.block_out_channels.as_ref())
            .map_or(8, |b| 1 << b.len().saturating_sub(1));
        let vae_force_upcast = vae.as_ref().and_then(|v| v.force_upcast).unwrap_or(true);
        let vae_decoder_channels = vae
            .as_ref()
            .and_then(|v| v.block_out_channels.as_ref())
            .and_then(|b| b.iter().take(2).max().copied())
            .unwrap_or(SD_DECODER_CHANNELS);
        if let Some(v) = &vae {
            for (key, value) in [
                ("latents_mean", &v.latents_mean),
                ("latents_std", &v.latents_std),
            ] {
                if value.as_ref().is_some_and(|x| !x.is_null()) {
                    return Err(ModelDirError::Unsupported {
                        dir: root.to_path_buf(),
                        what: format!(
                            "the VAE config sets {key}: decoding with latent statistics is not supported"
                        ),
                    });
                }
            }
        }
        let unet_config = root.join("unet/config.json");
        let (unet_sample_size, unet_time_cond_dim) = if unet_config.exists() {
            let c = read_json::<UnetConfig>(&unet_config)?;
            (c.sample_size, c.time_cond_proj_dim)
        } else {
            (None, None)
        };
        let index_file = root.join("model_index.json");
        let index = if index_file.exists() {
            read_json::<ModelIndex>(&index_file)?
        } else {
            ModelIndex::default()
        };
        Ok(Self {
            root: root.to_path_buf(),
            text,
            unet,
            vae_decoder,
            scheduler_config,
            safety_checker,
            vae_scaling_factor,
            vae_factor,
            vae_decoder_channels,
            vae_force_upcast,
            unet_sample_size,
            unet_time_cond_dim,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(false),
            pipeline_class: index.class_name,
        })
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ModelDirError> {
    let err = |why: String| ModelDirError::Config {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(e.to_string()))
}
