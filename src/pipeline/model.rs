//! A Stable Diffusion ONNX model folder, in the layouts diffusers' convert
//! script and optimum write.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    /// `text_encoder/model.onnx`.
    pub text_encoder: PathBuf,
    /// `unet/model.onnx`.
    pub unet: PathBuf,
    /// `vae_decoder/model.onnx`.
    pub vae_decoder: PathBuf,
    /// `tokenizer/`.
    pub tokenizer: PathBuf,
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
    /// Latent side the UNet was trained at (`unet/config.json` `sample_size`), when known.
    pub unet_sample_size: Option<usize>,
}

#[derive(Deserialize)]
struct VaeConfig {
    scaling_factor: Option<f32>,
    block_out_channels: Option<Vec<usize>>,
}

#[derive(Deserialize)]
struct UnetConfig {
    sample_size: Option<usize>,
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
        let text_encoder = need("the text encoder", "text_encoder/model.onnx")?;
        let unet = need("the UNet", "unet/model.onnx")?;
        let vae_decoder = need("the VAE decoder", "vae_decoder/model.onnx")?;
        let tokenizer = need("the tokenizer", "tokenizer")?;
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
        let vae_decoder_channels = vae
            .as_ref()
            .and_then(|v| v.block_out_channels.as_ref())
            .and_then(|b| b.iter().take(2).max().copied())
            .unwrap_or(SD_DECODER_CHANNELS);
        let unet_config = root.join("unet/config.json");
        let unet_sample_size = if unet_config.exists() {
            read_json::<UnetConfig>(&unet_config)?.sample_size
        } else {
            None
        };
        Ok(Self {
            root: root.to_path_buf(),
            text_encoder,
            unet,
            vae_decoder,
            tokenizer,
            scheduler_config,
            safety_checker,
            vae_scaling_factor,
            vae_factor,
            vae_decoder_channels,
            unet_sample_size,
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
