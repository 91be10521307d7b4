//! The text side of a model: the tokenizers and text encoders whose states
//! reach the UNet, in the order they are concatenated.
//!
//! SD 1.x and 2.x have one encoder and the UNet reads its final state. SDXL
//! has two (CLIP ViT-L, 768 wide, then OpenCLIP bigG, 1280 wide); the UNet
//! reads the penultimate hidden state of each, concatenated in that order
//! (2048 wide), and the second one's pooled, projected output enters the
//! UNet elsewhere (`text_embeds`), untouched by an edit. Either way TIME
//! edits the K/V projections of one context vector c, so an edit is one
//! operator A over the full width.

use std::path::{Path, PathBuf};

use crate::onnx::fingerprint::weights_fingerprint;
use crate::onnx::{Model, OnnxError};

use super::{ClipTokenizer, TextError};

/// One text encoder's model file and its tokenizer folder.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderFiles {
    /// The ONNX model.
    pub model: PathBuf,
    /// The tokenizer folder.
    pub tokenizer: PathBuf,
}

/// Which state of the encoders is the UNet's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// SD 1.x/2.x: the one encoder's final, layer-normed state
    /// (`last_hidden_state`).
    Last,
    /// SDXL: each encoder's penultimate hidden state (`hidden_states[-2]`,
    /// before the final layer norm), concatenated; the pooled embedding is
    /// the last encoder's `text_embeds`.
    Penultimate,
}

/// The files of a model's text side and how their states are combined.
#[derive(Clone, Debug, PartialEq)]
pub struct TextSide {
    /// In concatenation order; one or two.
    pub encoders: Vec<EncoderFiles>,
    /// Which state each contributes.
    pub context: Context,
}

/// Why a model folder's text side cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TextSideError {
    /// A second text encoder without the second tokenizer, or the reverse.
    #[error("{dir} has {has} but not {missing}: an SDXL folder needs both")]
    HalfPair {
        /// The model folder.
        dir: PathBuf,
        /// What is there.
        has: &'static str,
        /// What is missing.
        missing: &'static str,
    },
    /// Only the second encoder: an SDXL refiner, which edits and generates
    /// from images.
    #[error(
        "{dir} has text_encoder_2/ but no text_encoder/: an SDXL refiner (image to image), which \
         time-onnx does not support"
    )]
    Refiner {
        /// The model folder.
        dir: PathBuf,
    },
}

impl TextSide {
    /// One encoder whose final state is the context (SD 1.x/2.x).
    pub fn single(model: PathBuf, tokenizer: PathBuf) -> Self {
        Self {
            encoders: vec![EncoderFiles { model, tokenizer }],
            context: Context::Last,
        }
    }

    /// Two encoders in SDXL's order, penultimate states concatenated.
    pub fn pair(first: EncoderFiles, second: EncoderFiles) -> Self {
        Self {
            encoders: vec![first, second],
            context: Context::Penultimate,
        }
    }

    /// The text side of a diffusers/optimum folder: `text_encoder/` and
    /// `tokenizer/`, plus `text_encoder_2/` and `tokenizer_2/` in an SDXL
    /// folder. Paths need not exist (the caller reports a missing file
    /// with the component's name); a half-present second pair is an error.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TextSideError> {
        let files = |encoder: &str, tokenizer: &str| EncoderFiles {
            model: dir.join(encoder).join("model.onnx"),
            tokenizer: dir.join(tokenizer),
        };
        let first = files("text_encoder", "tokenizer");
        let second = files("text_encoder_2", "tokenizer_2");
        match (second.model.exists(), second.tokenizer.exists()) {
            (false, false) => Ok(Self::single(first.model, first.tokenizer)),
            (true, false) => Err(TextSideError::HalfPair {
                dir: dir.to_path_buf(),
                has: "text_encoder_2/",
                missing: "tokenizer_2/",
            }),
            (false, true) => Err(TextSideError::HalfPair {
                dir: dir.to_path_buf(),
                has: "tokenizer_2/",
                missing: "text_encoder_2/model.onnx",
            }),
            (true, true) if !first.model.exists() => Err(TextSideError::Refiner {
                dir: dir.to_path_buf(),
            }),
            (true, true) => Ok(Self::pair(first, second)),
        }
    }

    /// Every file and folder, with what it is, for messages about missing ones.
    pub fn parts(&self) -> Vec<(&'static str, &Path)> {
        let names: [(&str, &str); 2] = match self.encoders.len() {
            1 => [("text encoder", "tokenizer"), ("", "")],
            _ => [
                ("first text encoder", "first tokenizer"),
                ("second text encoder", "second tokenizer"),
            ],
        };
        self.encoders
            .iter()
            .zip(names)
            .flat_map(|(e, (model, tok))| {
                [(model, e.model.as_path()), (tok, e.tokenizer.as_path())]
            })
            .collect()
    }

    /// The fingerprint an operator or prior records: one encoder's weights
    /// fingerprint, or the two joined by `+` (so that SD 1.x files keep
    /// theirs, and an SDXL operator names both encoders it depends on).
    pub fn fingerprint(&self) -> Result<String, OnnxError> {
        let parts = self
            .encoders
            .iter()
            .map(|e| weights_fingerprint(&Model::open(&e.model)?))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(parts.join("+"))
    }
}

/// The token ids of one prompt for each encoder, each padded by its own
/// tokenizer (SDXL's second pads with `!`, id 0).
pub type PromptIds = Vec<Vec<u32>>;

/// The tokenizers of a text side. Each encoder reads its own tokenizer's
/// ids, as diffusers' `encode_prompt` gives them; the first tokenizer is the
/// one prompts are aligned and measured with (SDXL's two share a vocabulary
/// and split ordinary prompts alike).
#[derive(Debug)]
pub struct Tokenizers {
    all: Vec<ClipTokenizer>,
}

impl Tokenizers {
    /// Loads every tokenizer of `side`.
    pub fn open(side: &TextSide) -> Result<Self, TextError> {
        let all = side
            .encoders
            .iter()
            .map(|e| ClipTokenizer::from_dir(&e.tokenizer))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { all })
    }

    /// The tokenizer prompts are aligned with, and whose length limit applies.
    pub fn primary(&self) -> &ClipTokenizer {
        &self.all[0]
    }

    /// Each encoder's padded ids for `text`.
    pub fn encode_padded(&self, text: &str) -> Result<PromptIds, TextError> {
        self.all.iter().map(|t| t.encode_padded(text)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(parts: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for p in parts {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            if p.ends_with(".onnx") {
                std::fs::write(&path, b"").unwrap();
            } else {
                std::fs::create_dir_all(&path).unwrap();
            }
        }
        dir
    }

    #[test]
    fn a_folder_without_a_second_encoder_is_one_final_state() {
        let d = folder(&["text_encoder/model.onnx", "tokenizer"]);
        let side = TextSide::from_model_dir(d.path()).unwrap();
        assert_eq!(side.context, Context::Last);
        assert_eq!(side.encoders.len(), 1);
    }

    #[test]
    fn an_sdxl_folder_is_two_penultimate_states_in_order() {
        let d = folder(&[
            "text_encoder/model.onnx",
            "tokenizer",
            "text_encoder_2/model.onnx",
            "tokenizer_2",
        ]);
        let side = TextSide::from_model_dir(d.path()).unwrap();
        assert_eq!(side.context, Context::Penultimate);
        assert!(side.encoders[0].model.ends_with("text_encoder/model.onnx"));
        assert!(side.encoders[1].tokenizer.ends_with("tokenizer_2"));
    }

    #[test]
    fn half_a_second_pair_or_a_refiner_is_named() {
        let d = folder(&[
            "text_encoder/model.onnx",
            "tokenizer",
            "text_encoder_2/model.onnx",
        ]);
        let e = TextSide::from_model_dir(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("has text_encoder_2/ but not tokenizer_2/"),
            "{e}"
        );
        let d = folder(&["text_encoder/model.onnx", "tokenizer", "tokenizer_2"]);
        let e = TextSide::from_model_dir(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("has tokenizer_2/ but not text_encoder_2/model.onnx"),
            "{e}"
        );
        let d = folder(&["text_encoder_2/model.onnx", "tokenizer_2"]);
        let e = TextSide::from_model_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("SDXL refiner"), "{e}");
    }
}
