//! A CLIP judge: of two texts, the one whose embedding is closer (cosine)
//! to the image's, from an ONNX CLIP as `optimum-cli export onnx` writes it
//! for a CLIP model (one `model.onnx` taking `input_ids`, `pixel_values`,
//! `attention_mask`, giving `logits_per_image`, which is the scaled cosine).

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, ArrayView3, Axis};

use super::{EvalError, Pick};
use crate::pipeline::clip_image::ClipImageConfig;
use crate::runtime::{Runtime, Session, SessionOptions};
use crate::text::ClipTokenizer;

/// The CLIP model, its tokenizer and its image preprocessing.
pub struct Clip {
    path: PathBuf,
    session: Session,
    tokenizer: ClipTokenizer,
    preprocess: ClipImageConfig,
}

impl Clip {
    /// Opens `<dir>/model.onnx` with the tokenizer and
    /// `preprocessor_config.json` beside it.
    pub fn open(rt: &Runtime, dir: &Path, opts: SessionOptions) -> Result<Self, EvalError> {
        let path = dir.join("model.onnx");
        let config = dir.join("preprocessor_config.json");
        let preprocess =
            ClipImageConfig::from_file(&config).map_err(|e| EvalError::Classifier {
                path: config.clone(),
                why: e.why,
            })?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let session = rt.open(&path, opts)?;
        for name in ["input_ids", "pixel_values"] {
            if session.input(name).is_none() {
                return Err(EvalError::Classifier {
                    path,
                    why: format!("no input {name:?}: not a CLIP export"),
                });
            }
        }
        Ok(Self {
            path,
            session,
            tokenizer,
            preprocess,
        })
    }

    /// For each image `[h, w, 3] f32` in [0, 1], the text of `a` and `b` it is
    /// closer to (`None` on an exact tie).
    pub fn judge(
        &mut self,
        images: &[ArrayView3<f32>],
        a: &str,
        b: &str,
    ) -> Result<Vec<Option<Pick>>, EvalError> {
        Ok(self
            .closest(images, &[a, b])?
            .into_iter()
            .map(|k| k.map(|k| if k == 0 { Pick::A } else { Pick::B }))
            .collect())
    }

    /// For each image `[h, w, 3] f32` in [0, 1], the index of the text of
    /// `texts` it is closest to (`None` when the best two tie exactly).
    pub fn closest(
        &mut self,
        images: &[ArrayView3<f32>],
        texts: &[&str],
    ) -> Result<Vec<Option<usize>>, EvalError> {
        let path = self.path.clone();
        let n_len = self.tokenizer.max_len();
        let mut ids = Array2::<i64>::zeros((texts.len(), n_len));
        let mut mask = Array2::<i64>::zeros((texts.len(), n_len));
        for (row, text) in texts.iter().enumerate() {
            let unpadded = self.tokenizer.encode_truncated(text)?.len();
            for (j, t) in self.tokenizer.encode_padded(text)?.into_iter().enumerate() {
                ids[[row, j]] = i64::from(t);
                mask[[row, j]] = i64::from(j < unpadded);
            }
        }
        let pixels: Vec<_> = images
            .iter()
            .map(|img| self.preprocess.preprocess(*img).insert_axis(Axis(0)))
            .collect();
        let views: Vec<_> = pixels.iter().map(|p| p.view()).collect();
        let shape_error = |e: ndarray::ShapeError| EvalError::Classifier {
            path: path.clone(),
            why: e.to_string(),
        };
        let pixels: Array4<f32> = ndarray::concatenate(Axis(0), &views)
            .map_err(shape_error)?
            .into_dimensionality()
            .map_err(shape_error)?;
        let ids = self.session.i64_value(ids.into_dyn())?;
        let pixels = self.session.f32_value(pixels.into_dyn())?;
        let mask = self.session.i64_value(mask.into_dyn())?;
        let mut inputs = vec![("input_ids", &ids), ("pixel_values", &pixels)];
        if self.session.input("attention_mask").is_some() {
            inputs.push(("attention_mask", &mask));
        }
        let logits = self.session.run(&inputs)?.float("logits_per_image")?;
        Ok(logits
            .outer_iter()
            .map(|row| argmax(row.iter().copied()))
            .collect())
    }
}

/// The index of the largest value; `None` when it is not unique (or NaN).
fn argmax(values: impl Iterator<Item = f32>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    let mut tied = false;
    for (k, v) in values.enumerate() {
        match best {
            Some((_, b)) if v == b => tied = true,
            Some((_, b)) if v < b || v.is_nan() => {}
            _ => {
                best = Some((k, v));
                tied = false;
            }
        }
    }
    best.filter(|(_, v)| !tied && !v.is_nan()).map(|(k, _)| k)
}
