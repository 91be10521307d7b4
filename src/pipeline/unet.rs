//! The UNet session: one noise prediction per call, inputs fed in the types
//! and ranks the export declares.

use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD, ArrayView3, ArrayView4, IxDyn};
use ort::session::{IoBinding, Session};
use ort::value::{Tensor, TensorElementType};

use crate::runtime::tensors::{float_array, float_value, port};
use crate::runtime::{Runtime, SessionError, SessionOptions};

/// A loaded UNet and the shape of its interface.
pub struct Unet {
    path: PathBuf,
    session: Session,
    sample: TensorElementType,
    sample_dims: Vec<i64>,
    timestep: (TensorElementType, usize),
    hidden: (TensorElementType, Vec<i64>),
    output: String,
    /// Inputs that stay the same across denoising steps (the text
    /// embeddings) and the output buffer, bound once per prompt.
    binding: Option<IoBinding>,
}

impl Unet {
    /// Opens the UNet and checks its inputs are `sample`, `timestep`, `encoder_hidden_states`.
    pub fn open(rt: &Runtime, path: &Path, opts: SessionOptions) -> Result<Self, SessionError> {
        let session = rt
            .session_with(path, opts)
            .map_err(|e| explain_contrib_ops(e, path))?;
        let bad = |why: String| SessionError::Interface {
            path: path.to_path_buf(),
            why,
        };
        let need = |name: &str| {
            port(&session, name, true)
                .ok_or_else(|| bad(format!("the UNet has no tensor input {name:?}")))
        };
        let (sample, sample_dims) = need("sample")?;
        let (t_ty, t_shape) = need("timestep")?;
        let hidden = need("encoder_hidden_states")?;
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == "out_sample")
            .or_else(|| session.outputs().first())
            .ok_or_else(|| bad("the UNet has no outputs".into()))?
            .name()
            .to_string();
        Ok(Self {
            path: path.to_path_buf(),
            session,
            sample,
            sample_dims,
            timestep: (t_ty, t_shape.len()),
            hidden,
            output,
            binding: None,
        })
    }

    /// The latent height and width, when the export fixes them (dynamo exports do).
    pub fn latent_size(&self) -> Option<(usize, usize)> {
        match self.sample_dims[..] {
            [_, _, h, w] if h > 0 && w > 0 => Some((h as usize, w as usize)),
            _ => None,
        }
    }

    /// The text-embedding width the UNet expects, when the export fixes it.
    pub fn text_width(&self) -> Option<usize> {
        self.hidden.1.last().and_then(|&d| usize::try_from(d).ok())
    }

    /// Binds the text embeddings `hidden: [b, 77, d] f32` for the coming
    /// [`Self::predict_bound`] calls: they are converted and handed to ONNX
    /// Runtime once per prompt, not once per step, and the output buffer is
    /// reused across steps.
    pub fn bind_hidden(&mut self, hidden: ArrayView3<f32>) -> Result<(), SessionError> {
        let path = self.path.clone();
        let err = |source: ort::Error| SessionError::Ort {
            path: path.clone(),
            source,
        };
        let mut binding = self.session.create_binding().map_err(err)?;
        let value = float_value(self.hidden.0, hidden.into_dyn()).map_err(err)?;
        binding
            .bind_input("encoder_hidden_states", &value)
            .map_err(err)?;
        let mem = self.session.allocator().memory_info();
        binding
            .bind_output_to_device(self.output.as_str(), mem)
            .map_err(err)?;
        self.binding = Some(binding);
        Ok(())
    }

    /// Predicts the noise for `sample: [b, c, h, w] f32` at timestep `t` with
    /// the embeddings of [`Self::bind_hidden`].
    pub fn predict_bound(
        &mut self,
        sample: ArrayView4<f32>,
        t: f64,
    ) -> Result<Array4<f32>, SessionError> {
        let path = self.path.clone();
        let err = |source: ort::Error| SessionError::Ort {
            path: path.clone(),
            source,
        };
        let timestep = self.timestep_value(t, sample.shape()[0]).map_err(err)?;
        let sample = float_value(self.sample, sample.into_dyn()).map_err(err)?;
        let binding = self
            .binding
            .as_mut()
            .ok_or_else(|| SessionError::Interface {
                path: path.clone(),
                why: "predict_bound before bind_hidden".into(),
            })?;
        binding.bind_input("sample", &sample).map_err(err)?;
        binding.bind_input("timestep", &timestep).map_err(err)?;
        let outputs = self.session.run_binding(binding).map_err(err)?;
        let out = float_array(&outputs[self.output.as_str()]).map_err(err)?;
        out.into_dimensionality()
            .map_err(|e| SessionError::Interface {
                path: self.path.clone(),
                why: e.to_string(),
            })
    }

    /// The timestep in the type and rank the export declares.
    fn timestep_value(&self, t: f64, batch: usize) -> Result<ort::value::DynValue, ort::Error> {
        let shape = if self.timestep.1 == 0 {
            IxDyn(&[])
        } else {
            IxDyn(&[batch])
        };
        Ok(match self.timestep.0 {
            TensorElementType::Int64 => {
                Tensor::from_array(ArrayD::from_elem(shape, t.round() as i64))?.into_dyn()
            }
            ty => float_value(ty, ArrayD::from_elem(shape, t as f32).view())?,
        })
    }
}

/// ORT-optimized UNets use contrib ops (packed K/V attention, NhwcConv,
/// GroupNorm) that only the CUDA provider implements: say so instead of
/// passing on "kernel not found".
fn explain_contrib_ops(e: SessionError, path: &Path) -> SessionError {
    match e {
        SessionError::Ort { source, .. } if source.to_string().contains("com.microsoft") => {
            SessionError::Interface {
                path: path.to_path_buf(),
                why: format!(
                    "this UNet was optimized by ONNX Runtime's transformer optimizer for GPUs and uses operators the CPU \
                 provider lacks ({source}); run it with --device cuda, or use the unoptimized export"
                ),
            }
        }
        other => other,
    }
}
