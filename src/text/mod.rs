//! Text side of Stable Diffusion: the CLIP tokenizer (prompt → token ids).
//!
//! The token ids feed two consumers: the text encoder (padded to the
//! encoder's fixed length) and TIME's source/destination alignment
//! (unpadded, see [`crate::edit`]).

pub mod encoder;
pub mod side;
pub mod tokenizer;

pub use side::{PromptIds, TextSide, Tokenizers};
pub use tokenizer::ClipTokenizer;

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The folder has neither `tokenizer.json` nor `vocab.json` + `merges.txt`.
    #[error("{dir}: no tokenizer files (expected tokenizer.json, or vocab.json and merges.txt)")]
    NoTokenizerFiles {
        /// The folder searched.
        dir: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed or has the wrong structure.
    #[error("{path} is not valid: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What serde_json saw.
        #[source]
        source: serde_json::Error,
    },
    /// A text file that is not UTF-8.
    #[error("{path} is not UTF-8: {source}")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Where decoding stopped.
        #[source]
        source: std::string::FromUtf8Error,
    },
    /// A line of `merges.txt` that is not two symbols separated by a space.
    #[error("{path}:{line}: expected two symbols, found {content:?}")]
    BadMerge {
        /// The merges file.
        path: PathBuf,
        /// 1-based line number in the file.
        line: usize,
        /// The offending line.
        content: String,
    },
    /// A configuration value of the wrong type or out of range.
    #[error("{path}: {key} = {value} is not usable: {why}")]
    BadConfig {
        /// The configuration file.
        path: PathBuf,
        /// The JSON key.
        key: &'static str,
        /// The value as written (JSON).
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No configuration file gives the encoder's sequence length.
    #[error(
        "{dir}: no model_max_length in tokenizer_config.json (the text encoder's sequence length)"
    )]
    MissingMaxLength {
        /// The tokenizer folder.
        dir: PathBuf,
    },
    /// A special token (BOS, EOS, pad, unk) that is not in the vocabulary.
    #[error("{dir}: the {role} token {token:?} is not in the vocabulary")]
    UnknownSpecialToken {
        /// The tokenizer folder.
        dir: PathBuf,
        /// Which special token ("bos", "eos", "pad", "unk").
        role: &'static str,
        /// Its text.
        token: String,
    },
    /// The `tokenizers` crate refused the vocabulary, merges or `tokenizer.json`.
    #[error("{path}: cannot build the tokenizer: {source}")]
    Build {
        /// The file (or folder) the tokenizer was built from.
        path: PathBuf,
        /// The tokenizers error.
        #[source]
        source: tokenizers::Error,
    },
    /// Tokenizing a prompt failed.
    #[error("cannot tokenize {text:?}: {source}")]
    Encode {
        /// The prompt.
        text: String,
        /// The tokenizers error.
        #[source]
        source: tokenizers::Error,
    },
}
