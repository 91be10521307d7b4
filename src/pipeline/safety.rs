//! The safety checker, run as diffusers' ONNX pipeline runs it: CLIP
//! preprocessing of each image, then the checker model, which also blacks out
//! the images it flags.

use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayView4, Axis};
use ort::session::Session;

use super::clip_image::ClipImageConfig;
use crate::runtime::tensors::float_array;
use crate::runtime::{Runtime, SessionError, SessionOptions};

/// A loaded safety checker and its image preprocessing.
pub struct SafetyChecker {
    path: PathBuf,
    session: Session,
    preprocess: ClipImageConfig,
}

impl SafetyChecker {
    /// Opens `safety_checker/model.onnx` with `feature_extractor/preprocessor_config.json`.
    pub fn open(
        rt: &Runtime,
        model: &Path,
        config: &Path,
        opts: SessionOptions,
    ) -> Result<Self, SessionError> {
        let preprocess =
            ClipImageConfig::from_file(config).map_err(|e| SessionError::Interface {
                path: config.to_path_buf(),
                why: e.why,
            })?;
        let session = rt.session_with(model, opts)?;
        for name in ["clip_input", "images"] {
            if !session.inputs().iter().any(|i| i.name() == name) {
                return Err(SessionError::Interface {
                    path: model.to_path_buf(),
                    why: format!("the safety checker has no input {name:?}"),
                });
            }
        }
        Ok(Self {
            path: model.to_path_buf(),
            session,
            preprocess,
        })
    }

    /// Checks `images: [n, h, w, 3] f32` in [0, 1], one at a time as diffusers
    /// does. Returns the images (flagged ones as the checker returns them:
    /// black) and a flag per image.
    pub fn check(
        &mut self,
        images: ArrayView4<f32>,
    ) -> Result<(Array4<f32>, Vec<bool>), SessionError> {
        let path = self.path.clone();
        let err = |source: ort::Error| SessionError::Ort {
            path: path.clone(),
            source,
        };
        let bad = |why: String| SessionError::Interface {
            path: path.clone(),
            why,
        };
        let mut out = images.to_owned();
        let mut flags = Vec::with_capacity(images.shape()[0]);
        for (i, image) in images.axis_iter(Axis(0)).enumerate() {
            let clip = self.preprocess.preprocess(image).insert_axis(Axis(0));
            let inputs = ort::inputs![
                "clip_input" => ort::value::Tensor::from_array(clip).map_err(err)?,
                "images" => ort::value::Tensor::from_array(image.insert_axis(Axis(0)).to_owned()).map_err(err)?,
            ];
            let outputs = self.session.run(inputs).map_err(err)?;
            let checked = float_array(&outputs["out_images"]).map_err(err)?;
            let flag = outputs["has_nsfw_concepts"]
                .try_extract_array::<bool>()
                .map_err(err)?;
            let flagged = *flag
                .iter()
                .next()
                .ok_or_else(|| bad("empty has_nsfw_concepts".into()))?;
            let checked = checked
                .into_shape_with_order(image.raw_dim())
                .map_err(|e| bad(format!("out_images: {e}")))?;
            out.index_axis_mut(Axis(0), i).assign(&checked);
            flags.push(flagged);
        }
        Ok((out, flags))
    }
}
