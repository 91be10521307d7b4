//! A CLIP judge: of two texts, the one whose embedding is closer (cosine)
//! to the image's, from an ONNX CLIP as `optimum-cli export onnx` writes it
//! for a CLIP model (one `model.onnx` taking `input_ids`, `pixel_values`,
//! `attention_mask`, giving `logits_per_image`, which is the scaled cosine).

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, ArrayView3, Axis};
use ort::session::Session;

use super::{EvalError, Pick};
use crate::pipeline::clip_image::ClipImageConfig;
use crate::runtime::tensors::float_array;
use crate::runtime::{Runtime, SessionError, SessionOptions};
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
        let session = rt.session_with(&path, opts)?;
        for name in ["input_ids", "pixel_values"] {
            if !session.inputs().iter().any(|i| i.name() == name) {
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
        let path = self.path.clone();
        let err = |source: ort::Error| SessionError::Ort {
            path: path.clone(),
            source,
        };
        let n_len = self.tokenizer.max_len();
        let mut ids = Array2::<i64>::zeros((2, n_len));
        let mut mask = Array2::<i64>::zeros((2, n_len));
        for (row, text) in [a, b].iter().enumerate() {
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
        let has_mask = self
            .session
            .inputs()
            .iter()
            .any(|i| i.name() == "attention_mask");
        let mut inputs = ort::inputs![
            "input_ids" => ort::value::Tensor::from_array(ids).map_err(err)?,
            "pixel_values" => ort::value::Tensor::from_array(pixels).map_err(err)?,
        ];
        if has_mask {
            inputs.push((
                "attention_mask".into(),
                ort::value::Tensor::from_array(mask).map_err(err)?.into(),
            ));
        }
        let outputs = self.session.run(inputs).map_err(err)?;
        let logits = float_array(&outputs["logits_per_image"]).map_err(err)?;
        Ok(logits
            .outer_iter()
            .map(|row| match row[0].partial_cmp(&row[1]) {
                Some(std::cmp::Ordering::Greater) => Some(Pick::A),
                Some(std::cmp::Ordering::Less) => Some(Pick::B),
                _ => None,
            })
            .collect())
    }
}
