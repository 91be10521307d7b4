//! The VAE decoder: latents → pixels.

use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayView4, Axis};
use ort::session::Session;
use ort::value::TensorElementType;

use crate::runtime::tensors::{float_array, float_value, port};
use crate::runtime::{Runtime, SessionError, SessionOptions};

/// A loaded VAE decoder.
pub struct VaeDecoder {
    path: PathBuf,
    session: Session,
    input: (String, TensorElementType),
    output: String,
}

impl VaeDecoder {
    /// Opens the decoder (input `latent_sample`, output `sample`).
    pub fn open(rt: &Runtime, path: &Path, opts: SessionOptions) -> Result<Self, SessionError> {
        let session = rt.session_with(path, opts)?;
        let bad = |why: &str| SessionError::Interface {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let name = session
            .inputs()
            .first()
            .ok_or_else(|| bad("the VAE decoder has no inputs"))?
            .name()
            .to_string();
        let (ty, _) = port(&session, &name, true)
            .ok_or_else(|| bad("the VAE decoder input is not a tensor"))?;
        let output = session
            .outputs()
            .first()
            .ok_or_else(|| bad("the VAE decoder has no outputs"))?
            .name()
            .to_string();
        Ok(Self {
            path: path.to_path_buf(),
            session,
            input: (name, ty),
            output,
        })
    }

    /// Decodes unscaled latents `[b, 4, h, w] f32` (already divided by the
    /// scaling factor) to images `[b, h·f, w·f, 3] f32` in [0, 1].
    ///
    /// One image at a time: some exports fix the batch at 1, and it bounds memory.
    pub fn decode(&mut self, latents: ArrayView4<f32>) -> Result<Array4<f32>, SessionError> {
        let path = self.path.clone();
        let err = |source: ort::Error| SessionError::Ort {
            path: path.clone(),
            source,
        };
        let mut images = Vec::new();
        for one in latents.axis_chunks_iter(Axis(0), 1) {
            let input = float_value(self.input.1, one.into_dyn()).map_err(err)?;
            let outputs = self
                .session
                .run(ort::inputs![self.input.0.as_str() => input])
                .map_err(err)?;
            let x = float_array(&outputs[self.output.as_str()]).map_err(err)?;
            let x: Array4<f32> = x
                .into_dimensionality()
                .map_err(|e| SessionError::Interface {
                    path: self.path.clone(),
                    why: e.to_string(),
                })?;
            images.push(
                x.permuted_axes([0, 2, 3, 1])
                    .mapv(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)),
            );
        }
        let views: Vec<_> = images.iter().map(|a| a.view()).collect();
        ndarray::concatenate(Axis(0), &views).map_err(|e| SessionError::Interface {
            path: self.path.clone(),
            why: e.to_string(),
        })
    }
}
