//! Preservation priors: Cₚ = Σ cₚcₚᵀ over every position of every prompt an
//! edit must leave alone (UCE's preserved concepts), as a matrix and a file.
//!
//! However many prompts it covers, a prior is one d×d matrix, so it can be
//! built once per text encoder (`time-onnx prior`) and reused by every edit.
//! Layout: safetensors with one tensor `C` `[d, d] f64` and string metadata
//! ([`PriorMeta`]); f64 because Cₚ sums hundreds of thousands of outer
//! products whose rounding would otherwise reach the solve.

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2, ArrayView3};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::matrix_file::{self, Failure};

/// The metadata key holding [`PriorMeta`] as JSON.
const META_KEY: &str = "time_onnx.prior";

/// Cₚ and how many prompts it sums.
#[derive(Clone, Debug, PartialEq)]
pub struct Prior {
    gram: Array2<f64>,
    prompts: usize,
}

impl Prior {
    /// The prior of nothing: Cₚ = 0 `[d, d]`.
    pub fn empty(d: usize) -> Self {
        Self {
            gram: Array2::zeros((d, d)),
            prompts: 0,
        }
    }

    /// Adds every position of every prompt in `emb` `[prompts, seq, d]`
    /// (as the text encoder gives them: UCE preserves all 77 positions,
    /// padding included). Callers check the embeddings are finite.
    pub fn add<T: Copy + Into<f64>>(&mut self, emb: ArrayView3<'_, T>) {
        let (n, seq, d) = emb.dim();
        if n == 0 {
            return;
        }
        // Logical order, whatever the view's strides: row (p, i) is emb[p, i].
        let rows = Array2::from_shape_vec((n * seq, d), emb.iter().map(|&v| v.into()).collect())
            .expect("n·seq·d values");
        ndarray::linalg::general_mat_mul(1.0, &rows.t(), &rows, 1.0, &mut self.gram);
        self.prompts += n;
    }

    /// Cₚ `[d, d] f64`.
    pub fn gram(&self) -> ArrayView2<'_, f64> {
        self.gram.view()
    }

    /// How many prompts it sums.
    pub fn prompts(&self) -> usize {
        self.prompts
    }

    /// d, the text encoder's width.
    pub fn dim(&self) -> usize {
        self.gram.nrows()
    }
}

/// What a prior file records besides Cₚ.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriorMeta {
    /// How many prompts Cₚ sums.
    pub prompts: usize,
    /// d, the text encoder's width.
    pub width: usize,
    /// [`crate::onnx::fingerprint::weights_fingerprint`] of the text encoder
    /// that embedded the prompts: a prior from another encoder is refused.
    pub text_encoder: String,
    /// `"time-onnx <version>"`.
    pub tool: String,
}

/// Why a prior file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PriorFileError {
    /// Filesystem trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a prior file, or a damaged one.
    #[error("{path} is not a time-onnx preservation prior: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl PriorFileError {
    fn from_failure(path: &Path, failure: Failure) -> Self {
        let path = path.to_path_buf();
        match failure {
            Failure::Io(source) => Self::Io { path, source },
            Failure::Invalid(why) => Self::Invalid { path, why },
        }
    }
}

/// Writes `prior` as `C [d, d] f64` with `meta`, atomically.
pub fn save(path: &Path, prior: &Prior, meta: &PriorMeta) -> Result<(), PriorFileError> {
    let data: Vec<u8> = prior.gram.iter().flat_map(|v| v.to_le_bytes()).collect();
    matrix_file::save(path, ("C", Dtype::F64, prior.dim(), &data), META_KEY, meta)
        .map_err(|f| PriorFileError::from_failure(path, f))
}

/// Reads a prior file: Cₚ (checked square, finite, symmetric) and its metadata.
pub fn load(path: &Path) -> Result<(Prior, PriorMeta), PriorFileError> {
    let invalid = |why: String| PriorFileError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let (meta, data) =
        matrix_file::load(path, ("C", Dtype::F64), META_KEY, |m: &PriorMeta| m.width)
            .map_err(|f| PriorFileError::from_failure(path, f))?;
    let d = meta.width;
    let values: Vec<f64> = data
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")))
        .collect();
    let gram = Array2::from_shape_vec((d, d), values).map_err(|e| invalid(e.to_string()))?;
    if gram.iter().any(|v| !v.is_finite()) {
        return Err(invalid("C has non-finite entries".into()));
    }
    let scale = gram.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if (&gram - &gram.t()).iter().any(|v| v.abs() > 1e-9 * scale) {
        return Err(invalid("C is not symmetric".into()));
    }
    if gram.diag().iter().any(|&v| v < 0.0) {
        return Err(invalid(
            "C has a negative diagonal entry (not a sum of c·cᵀ)".into(),
        ));
    }
    let prior = Prior {
        gram,
        prompts: meta.prompts,
    };
    Ok((prior, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Axis};

    fn emb(n: usize) -> Array3<f64> {
        Array3::from_shape_fn((n, 5, 3), |(p, i, k)| {
            ((p * 15 + i * 3 + k) as f64 * 0.37).sin()
        })
    }

    #[test]
    fn sums_every_outer_product() {
        let e = emb(2);
        let mut prior = Prior::empty(3);
        prior.add(e.view());
        let mut naive = Array2::<f64>::zeros((3, 3));
        for row in e.to_shape((10, 3)).unwrap().axis_iter(Axis(0)) {
            for a in 0..3 {
                for b in 0..3 {
                    naive[[a, b]] += row[a] * row[b];
                }
            }
        }
        assert!((&prior.gram - &naive).iter().all(|v| v.abs() < 1e-12));
        assert_eq!(prior.prompts(), 2);
    }

    #[test]
    fn adding_in_batches_is_adding_at_once() {
        let e = emb(4);
        let mut once = Prior::empty(3);
        once.add(e.view());
        let mut twice = Prior::empty(3);
        twice.add(e.slice(ndarray::s![..1, .., ..]));
        twice.add(e.slice(ndarray::s![1.., .., ..]));
        assert_eq!(once.prompts(), twice.prompts());
        assert!((&once.gram - &twice.gram).iter().all(|v| v.abs() < 1e-12));
    }

    #[test]
    fn files_round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prior.safetensors");
        let mut prior = Prior::empty(3);
        prior.add(emb(3).view());
        let meta = PriorMeta {
            prompts: 3,
            width: 3,
            text_encoder: "abc".into(),
            tool: "time-onnx test".into(),
        };
        save(&path, &prior, &meta).unwrap();
        let (back, back_meta) = load(&path).unwrap();
        assert_eq!(back, prior);
        assert_eq!(back_meta, meta);

        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("is not a time-onnx preservation prior"),
            "{err}"
        );
        let mut skew = Prior::empty(3);
        skew.gram[[0, 1]] = 1.0;
        save(&path, &skew, &meta).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("not symmetric"), "{err}");
    }
}
