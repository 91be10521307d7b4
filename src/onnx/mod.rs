//! ONNX files: the protobuf schema we read ([`proto`], `wire` for writing
//! at the wire level), opening models without copying their weights and
//! locating tensor bytes, inline or in external data ([`Model`]); the UNet's
//! cross-attention K/V weights found by graph structure
//! ([`cross_attention`], named from `config.json` by [`module_paths`]);
//! patched copies ([`patch`]), the split of the text projections
//! ([`split`]), weights fingerprints ([`fingerprint`]), float16 models
//! widened to float32 ([`upcast`]) and what `inspect` prints ([`summary`]).
//! Nothing here runs a model.

pub mod cross_attention;
mod dtype;
pub mod fingerprint;
mod model;
pub mod module_paths;
pub mod patch;
pub mod proto;
pub mod split;
pub mod summary;
pub mod upcast;
mod wire;

pub use dtype::{DataType, f16_to_f32};
pub use model::{Model, Storage, TensorInfo};
pub use summary::Summary;

use std::path::PathBuf;

/// Everything that can be wrong with an ONNX file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A zero-byte file.
    #[error("{path} is empty, not an ONNX model")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The protobuf is malformed (truncated, random bytes, bad lengths).
    #[error("{path} is not a valid ONNX model: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What prost saw.
        #[source]
        source: prost::DecodeError,
    },
    /// The model has no graph.
    #[error("{path} has no graph")]
    NoGraph {
        /// The file.
        path: PathBuf,
    },
    /// A tensor whose header is inconsistent or whose data is missing.
    #[error("{path}: tensor {tensor:?}: {why}")]
    BadTensor {
        /// The model file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        why: String,
    },
    /// An external-data location that is refused.
    #[error("{path}: external data location {location:?} {why}")]
    BadLocation {
        /// The model file.
        path: PathBuf,
        /// The location as written.
        location: String,
        /// Why it is refused.
        why: String,
    },
}
