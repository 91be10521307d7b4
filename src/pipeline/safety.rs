//! The safety checker, run as diffusers' ONNX pipeline runs it: CLIP
//! preprocessing of each image, then the checker model, which also blacks out
//! the images it flags.

use std::path::Path;

use ndarray::{Array4, ArrayView4, Axis};

use super::clip_image::ClipImageConfig;
use crate::runtime::{Runtime, Session, SessionError, SessionOptions};

/// A loaded safety checker and its image preprocessing.
pub struct SafetyChecker {
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
        let session = rt.open(model, opts)?;
        for name in ["clip_input", "images"] {
            if session.input(name).is_none() {
                return Err(session.interface(format!("the safety checker has no input {name:?}")));
            }
        }
        Ok(Self {
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
        let mut out = images.to_owned();
        let mut flags = Vec::with_capacity(images.shape()[0]);
        for (i, image) in images.axis_iter(Axis(0)).enumerate() {
            let clip = self.preprocess.preprocess(image).insert_axis(Axis(0));
            let clip = self.session.f32_value(clip.into_dyn())?;
            let pixels = self
                .session
                .f32_value(image.insert_axis(Axis(0)).to_owned().into_dyn())?;
            let outputs = self
                .session
                .run(&[("clip_input", &clip), ("images", &pixels)])?;
            let checked = outputs.float("out_images")?;
            let flagged = *outputs
                .bools("has_nsfw_concepts")?
                .iter()
                .next()
                .ok_or_else(|| outputs.interface("empty has_nsfw_concepts"))?;
            drop(outputs);
            let checked = checked
                .into_shape_with_order(image.raw_dim())
                .map_err(|e| self.session.interface(format!("out_images: {e}")))?;
            out.index_axis_mut(Axis(0), i).assign(&checked);
            flags.push(flagged);
        }
        Ok((out, flags))
    }
}
