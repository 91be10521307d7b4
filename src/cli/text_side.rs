//! The text-side flags `edit` and `prior` share: where the text encoders
//! and tokenizers are, when not in the model folder.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;
use time_onnx::text::TextSide;
use time_onnx::text::side::EncoderFiles;

/// `--text-encoder`, `--tokenizer` and SDXL's second pair.
#[derive(Debug, Args)]
pub struct TextSideArgs {
    /// The text encoder ONNX file (default: <model>/text_encoder/model.onnx).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// The tokenizer folder (default: <model>/tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// SDXL's second text encoder (default: <model>/text_encoder_2/model.onnx, when present).
    #[arg(long)]
    text_encoder_2: Option<PathBuf>,
    /// SDXL's second tokenizer (default: <model>/tokenizer_2, when present).
    #[arg(long)]
    tokenizer_2: Option<PathBuf>,
}

impl TextSideArgs {
    /// The text side of `model`, each flag given replacing its file; every
    /// file must exist.
    pub fn resolve(self, model: &Path) -> anyhow::Result<TextSide> {
        let TextSideArgs {
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
        } = self;
        let mut side = TextSide::from_model_dir(model);
        if text_encoder_2.is_some() || tokenizer_2.is_some() {
            // Both second files named: the folder's own pair need not exist.
            let second = EncoderFiles {
                model: text_encoder_2
                    .unwrap_or_else(|| model.join("text_encoder_2").join("model.onnx")),
                tokenizer: tokenizer_2.unwrap_or_else(|| model.join("tokenizer_2")),
            };
            let first = EncoderFiles {
                model: model.join("text_encoder").join("model.onnx"),
                tokenizer: model.join("tokenizer"),
            };
            side = Ok(TextSide::pair(first, second));
        }
        let mut side = side?;
        if let Some(path) = text_encoder {
            side.encoders[0].model = path;
        }
        if let Some(path) = tokenizer {
            side.encoders[0].tokenizer = path;
        }
        for (what, path) in side.parts() {
            // `exists()` folds "cannot look" into "absent"; a folder the user
            // cannot read deserves its own words.
            match path.try_exists() {
                Ok(true) => {}
                Ok(false) => bail!(
                    "{what} not found at {} (give --model, --text-encoder or --tokenizer{})",
                    path.display(),
                    if side.encoders.len() > 1 {
                        ", --text-encoder-2 or --tokenizer-2"
                    } else {
                        ""
                    }
                ),
                Err(e) => bail!("cannot look for the {what} at {}: {e}", path.display()),
            }
        }
        Ok(side)
    }
}
