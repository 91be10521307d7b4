//! Scoring edits as the TIME paper does, on TIMED-format datasets:
//! efficacy (source prompts now drawn as the destination), generality
//! (positives follow), specificity (negatives do not). [`dataset`] reads the
//! rows; a [`Classifier`] decides, for each image, which of two prompts it
//! shows: CLIP ([`clip`]) or the toy world's rules ([`toy`]).

pub mod clip;
pub mod dataset;
pub mod digest;
pub mod report;
pub mod toy;

use std::path::{Path, PathBuf};

use ndarray::{ArrayView3, ArrayView4, Axis};
use serde::{Deserialize, Serialize};

pub use dataset::Row;

use crate::runtime::{Runtime, SessionError, SessionOptions};
use crate::text::TextError;

/// Everything that can stop an evaluation's scoring side.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The dataset is not TIMED-shaped.
    #[error("{path}, line {line}: {why}")]
    Dataset {
        /// The CSV file.
        path: PathBuf,
        /// Its line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The classifier could not be set up or run.
    #[error("{path}: {why}")]
    Classifier {
        /// Its file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `--classifier` names nothing we know.
    #[error("unknown classifier {0:?}: use clip:<DIR> or toy")]
    UnknownClassifier(String),
    /// A session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The tokenizer failed.
    #[error(transparent)]
    Text(#[from] TextError),
}

/// Which of the two candidate prompts an image shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pick {
    /// The first.
    A,
    /// The second.
    B,
}

/// How images are judged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClassifierSpec {
    /// An ONNX CLIP export in this folder.
    Clip(PathBuf),
    /// The toy world's rules, from `<model>/world.json`.
    Toy,
}

impl std::str::FromStr for ClassifierSpec {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, EvalError> {
        match s.split_once(':') {
            Some(("clip", dir)) if !dir.is_empty() => Ok(Self::Clip(dir.into())),
            None if s == "toy" => Ok(Self::Toy),
            _ => Err(EvalError::UnknownClassifier(s.into())),
        }
    }
}

impl std::fmt::Display for ClassifierSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Clip(dir) => write!(f, "clip:{}", dir.display()),
            Self::Toy => write!(f, "toy"),
        }
    }
}

/// A loaded classifier.
pub enum Classifier {
    /// CLIP image–text similarity.
    Clip(Box<clip::Clip>),
    /// The toy world's deterministic rules.
    Toy(toy::World),
}

impl Classifier {
    /// Loads what `spec` names; the toy world's rules come from `model_dir`.
    pub fn open(
        spec: &ClassifierSpec,
        rt: &Runtime,
        model_dir: &Path,
        opts: SessionOptions,
    ) -> Result<Self, EvalError> {
        Ok(match spec {
            ClassifierSpec::Clip(dir) => Self::Clip(Box::new(clip::Clip::open(rt, dir, opts)?)),
            ClassifierSpec::Toy => Self::Toy(toy::World::load(&model_dir.join("world.json"))?),
        })
    }

    /// For each image of `images: [n, h, w, 3]`, which of `a` and `b` it shows.
    pub fn judge(
        &mut self,
        images: ArrayView4<f32>,
        a: &str,
        b: &str,
    ) -> Result<Vec<Option<Pick>>, EvalError> {
        let views: Vec<ArrayView3<f32>> = images.axis_iter(Axis(0)).collect();
        match self {
            Self::Clip(c) => c.judge(&views, a, b),
            Self::Toy(w) => Ok(views
                .iter()
                .map(|img| w.judge(&w.classify(*img), a, b))
                .collect()),
        }
    }

    /// For each image of `images: [n, h, w, 3]`, which of `prompts` it shows
    /// (`None`: none, or no single one). CLIP takes the closest text; the toy
    /// world the one prompt whose implied colour is the image's.
    pub fn closest(
        &mut self,
        images: ArrayView4<f32>,
        prompts: &[&str],
    ) -> Result<Vec<Option<usize>>, EvalError> {
        let views: Vec<ArrayView3<f32>> = images.axis_iter(Axis(0)).collect();
        match self {
            Self::Clip(c) => c.closest(&views, prompts),
            Self::Toy(w) => Ok(views
                .iter()
                .map(|img| w.closest(&w.classify(*img), prompts))
                .collect()),
        }
    }
}

/// The paper's three numbers, as shares in [0, 1].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Source-prompt images classified as `new` rather than `old`.
    pub efficacy: f64,
    /// Positive-prompt images classified as `gtK` rather than `positiveK`.
    pub generality: f64,
    /// Negative-prompt images classified as `negativeK` rather than `gnK`.
    pub specificity: f64,
}

impl Scores {
    /// The mean of several rows' scores.
    pub fn mean<'a>(all: impl IntoIterator<Item = &'a Scores>) -> Scores {
        let (mut sum, mut n) = (Scores::default(), 0.0);
        for s in all {
            sum.efficacy += s.efficacy;
            sum.generality += s.generality;
            sum.specificity += s.specificity;
            n += 1.0;
        }
        if n > 0.0 {
            sum.efficacy /= n;
            sum.generality /= n;
            sum.specificity /= n;
        }
        sum
    }
}
