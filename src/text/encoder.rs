//! The CLIP text encoder, run through ONNX Runtime.

use std::path::{Path, PathBuf};

use ndarray::Array3;
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};

use crate::runtime::tensors::float_array;
use crate::runtime::{Device, Runtime, SessionError, SessionOptions};

/// A text encoder session and what its interface looks like.
///
/// Exports differ: the diffusers script feeds int32 ids, optimum int64; an
/// fp16 export returns fp16 states. Names and types are read from the model.
pub struct TextEncoder {
    path: PathBuf,
    session: Session,
    ids_input: String,
    ids_type: TensorElementType,
    output: String,
}

impl TextEncoder {
    /// Opens `path` on the CPU and checks it takes token ids and returns hidden states.
    pub fn open(rt: &Runtime, path: &Path) -> Result<Self, SessionError> {
        Self::open_with(
            rt,
            path,
            SessionOptions {
                device: Device::Cpu,
                ..SessionOptions::default()
            },
        )
    }

    /// [`Self::open`] with session options.
    pub fn open_with(
        rt: &Runtime,
        path: &Path,
        opts: SessionOptions,
    ) -> Result<Self, SessionError> {
        let session = rt.session_with(path, opts)?;
        let bad = |why: String| SessionError::Interface {
            path: path.to_path_buf(),
            why,
        };
        let input = session
            .inputs()
            .iter()
            .find(|i| i.name() == "input_ids")
            .or_else(|| session.inputs().first())
            .ok_or_else(|| bad("the text encoder has no inputs".into()))?;
        let ids_type = match input.dtype() {
            ValueType::Tensor {
                ty: ty @ (TensorElementType::Int32 | TensorElementType::Int64),
                ..
            } => *ty,
            other => {
                return Err(bad(format!(
                    "input {:?} is {other:?}, expected int32 or int64 token ids",
                    input.name()
                )));
            }
        };
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == "last_hidden_state")
            .or_else(|| session.outputs().first())
            .ok_or_else(|| bad("the text encoder has no outputs".into()))?
            .name()
            .to_string();
        let ids_input = input.name().to_string();
        Ok(Self {
            path: path.to_path_buf(),
            session,
            ids_input,
            ids_type,
            output,
        })
    }

    /// Embeds a batch of padded id sequences in one run.
    ///
    /// `ids`: n sequences of equal length L. Returns `[n, L, d] f32` (fp16
    /// outputs are widened).
    pub fn embed(&mut self, ids: &[Vec<u32>]) -> Result<Array3<f32>, SessionError> {
        let path = self.path.clone();
        let err = |source: ort::Error| SessionError::Ort {
            path: path.clone(),
            source,
        };
        let bad = |why: String| SessionError::Interface {
            path: path.clone(),
            why,
        };
        let n = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        if n == 0 || ids.iter().any(|s| s.len() != len) {
            return Err(bad(
                "token sequences must be non-empty and of equal length".into()
            ));
        }
        let flat = ids.iter().flatten().copied();
        let shape = [n, len];
        let input: ort::value::DynValue = match self.ids_type {
            TensorElementType::Int32 => {
                let v: Vec<i32> = flat.map(|t| t as i32).collect();
                Tensor::from_array((shape, v)).map_err(err)?.into_dyn()
            }
            _ => {
                let v: Vec<i64> = flat.map(i64::from).collect();
                Tensor::from_array((shape, v)).map_err(err)?.into_dyn()
            }
        };
        let outputs = self
            .session
            .run(ort::inputs![self.ids_input.as_str() => input])
            .map_err(err)?;
        let out = float_array(&outputs[self.output.as_str()]).map_err(err)?;
        let dims: Vec<usize> = out.shape().to_vec();
        let [b, l, d] = dims[..] else {
            return Err(bad(format!(
                "output {:?} has shape {dims:?}, expected [batch, tokens, width]",
                self.output
            )));
        };
        if b != n || l != len {
            return Err(bad(format!(
                "output shape {dims:?} does not match the input [{n}, {len}]"
            )));
        }
        out.into_shape_with_order((b, l, d))
            .map_err(|e| bad(e.to_string()))
    }
}
