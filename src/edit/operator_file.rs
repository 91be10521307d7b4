//! Edit operators as files: the d×d matrix A of one TIME edit (or of several
//! composed), with what it was computed from.
//!
//! Applied to the text embeddings (c → A·c for every token, conditional and
//! unconditional alike), an operator reproduces the edited UNet exactly,
//! because `encoder_hidden_states` reaches the UNet only through the K/V
//! projections that TIME rewrites as W·A. Layout: safetensors with one tensor
//! `A` `[d, d] f32` (W' = W·A) and string metadata.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::Operator;
use super::matrix_file::{self, Failure};
#[cfg(doc)]
use super::record::EditRecord;
use super::record::EditSpec;

/// The metadata key holding [`OperatorMeta`] as JSON.
const META_KEY: &str = "time_onnx.operator";

/// What an operator file records besides A.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperatorMeta {
    /// What was edited (the same fields as an edited UNet's record).
    #[serde(flatten)]
    pub spec: EditSpec,
    /// d, the text encoder's width.
    pub width: usize,
    /// [`crate::onnx::fingerprint::weights_fingerprint`] of the text encoder used.
    pub text_encoder: String,
}

/// Why an operator file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum OperatorFileError {
    /// Filesystem trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not an operator file, or a damaged one.
    #[error("{path} is not a time-onnx edit operator: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl OperatorFileError {
    fn from_failure(path: &Path, failure: Failure) -> Self {
        let path = path.to_path_buf();
        match failure {
            Failure::Io(source) => Self::Io { path, source },
            Failure::Invalid(why) => Self::Invalid { path, why },
        }
    }
}

/// Writes `op` (holding Aᵀ) as `A [d, d] f32` with `meta`, atomically.
pub fn save(path: &Path, op: &Operator, meta: &OperatorMeta) -> Result<(), OperatorFileError> {
    let a = op.transposed().t().mapv(|v| v as f32);
    let d = a.nrows();
    let data: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    matrix_file::save(path, ("A", Dtype::F32, d, &data), META_KEY, meta)
        .map_err(|f| OperatorFileError::from_failure(path, f))
}

/// Reads an operator file: the operator (holding Aᵀ, f64) and its metadata.
pub fn load(path: &Path) -> Result<(Operator, OperatorMeta), OperatorFileError> {
    let bytes = crate::bounded::read(path, crate::bounded::MATRIX_LIMIT).map_err(|source| {
        OperatorFileError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?;
    parse(&bytes, path)
}

/// [`load`] from a file's bytes (an upload); `path` names it in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<(Operator, OperatorMeta), OperatorFileError> {
    let invalid = |why: String| OperatorFileError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let (meta, data) =
        matrix_file::parse(bytes, ("A", Dtype::F32), META_KEY, |m: &OperatorMeta| {
            m.width
        })
        .map_err(|f| OperatorFileError::from_failure(path, f))?;
    let d = meta.width;
    let values: Vec<f64> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(invalid("A has non-finite entries".into()));
    }
    let a = Array2::from_shape_vec((d, d), values).map_err(|e| invalid(e.to_string()))?;
    let op = Operator::from_transposed(a.reversed_axes().as_standard_layout().into_owned())
        .map_err(|e| invalid(e.to_string()))?;
    Ok((op, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operator metadata as time-onnx wrote it before [`EditSpec`] was
    /// split out: every field at the top level.
    const OLDER: &str = r#"{"source":"a circle","destination":"a blue circle",
        "preservation":{"prompts":153,"scale":0.1},"lambda":0.1,
        "augmentations":["A photo of "],"tool":"time-onnx 0.1.0","width":64,
        "text_encoder":"ab12"}"#;

    #[test]
    fn metadata_keeps_every_field_at_the_top_level() {
        let meta: OperatorMeta = serde_json::from_str(OLDER).unwrap();
        assert_eq!((meta.width, meta.spec.lambda), (64, 0.1));
        assert_eq!(meta.spec.source, "a circle");
        let written = serde_json::to_value(&meta).unwrap();
        let older: serde_json::Value = serde_json::from_str(OLDER).unwrap();
        assert_eq!(written, older, "the same fields, whatever their order");
    }
}
