//! The VAE decoder: latents → pixels.

use std::path::Path;

use ndarray::{Array4, ArrayView4, Axis};

use crate::onnx::Model;
use crate::onnx::upcast::{takes_fp16, to_float32};
use crate::runtime::{Runtime, Session, SessionError, SessionOptions};

/// A loaded VAE decoder and its port names (`latent_sample` → `sample` in
/// every export we know; the first input and output are taken).
pub struct VaeDecoder {
    session: Session,
    input: String,
    output: String,
}

impl VaeDecoder {
    /// Opens the decoder; a float16 one in float32 when `upcast` (SDXL's
    /// VAE, whose float16 activations overflow: diffusers' SDXL pipeline
    /// decodes in float32 when the VAE config says `force_upcast`).
    pub fn open(
        rt: &Runtime,
        path: &Path,
        opts: SessionOptions,
        upcast: bool,
    ) -> Result<Self, SessionError> {
        let session = match Model::open(path) {
            Ok(model) if upcast && takes_fp16(&model) => {
                let wide = to_float32(&model).map_err(|e| SessionError::Interface {
                    path: path.to_path_buf(),
                    why: format!("the float16 VAE decoder must run in float32: {e}"),
                })?;
                tracing::info!("{}: float16 VAE decoder run in float32", path.display());
                rt.open_bytes(path, &wide, opts, Vec::new())?
            }
            _ => rt.open(path, opts)?,
        };
        let first = |ports: &[crate::runtime::Port], what: &str| {
            ports
                .first()
                .map(|p| p.name.clone())
                .ok_or_else(|| session.interface(format!("the VAE decoder has no {what}")))
        };
        let input = first(session.inputs(), "inputs")?;
        if session.input(&input).and_then(|p| p.ty).is_none() {
            return Err(session.interface("the VAE decoder input is not a tensor"));
        }
        let output = first(session.outputs(), "outputs")?;
        Ok(Self {
            session,
            input,
            output,
        })
    }

    /// Decodes unscaled latents `[b, 4, h, w] f32` (already divided by the
    /// scaling factor) to images `[b, h·f, w·f, 3] f32` in [0, 1].
    ///
    /// One image at a time: some exports fix the batch at 1, and it bounds memory.
    pub fn decode(&mut self, latents: ArrayView4<f32>) -> Result<Array4<f32>, SessionError> {
        let mut images = Vec::new();
        for one in latents.axis_chunks_iter(Axis(0), 1) {
            let input = self.session.float_value(&self.input, one.into_dyn())?;
            let x = self
                .session
                .run(&[(self.input.as_str(), &input)])?
                .float(&self.output)?;
            let x: Array4<f32> = x
                .into_dimensionality()
                .map_err(|e| self.session.interface(e.to_string()))?;
            // NaN would become a black image without a word.
            if x.iter().any(|v| !v.is_finite()) {
                return Err(self.session.interface(
                    "the VAE decoder returned NaN or infinite values (a float16 decoder that \
                     overflows: export the VAE in float32, or set force_upcast in its config)",
                ));
            }
            images.push(
                x.permuted_axes([0, 2, 3, 1])
                    .mapv(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)),
            );
        }
        let views: Vec<_> = images.iter().map(|a| a.view()).collect();
        ndarray::concatenate(Axis(0), &views).map_err(|e| self.session.interface(e.to_string()))
    }
}
