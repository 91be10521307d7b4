//! The CLIP text encoder, run through ONNX Runtime.

use std::path::Path;

use ndarray::Array3;

use crate::runtime::{ElementType, Runtime, Session, SessionError, SessionOptions};

/// A text encoder session and the names of its ports.
///
/// Exports differ: the diffusers script feeds int32 ids, optimum int64; an
/// fp16 export returns fp16 states. Names and types are read from the model.
pub struct TextEncoder {
    session: Session,
    ids_input: String,
    output: String,
}

impl TextEncoder {
    /// Opens `path` and checks it takes token ids and returns hidden states.
    pub fn open(rt: &Runtime, path: &Path, opts: SessionOptions) -> Result<Self, SessionError> {
        let session = rt.open(path, opts)?;
        let input = session.input_or_first("input_ids", "the text encoder")?;
        if !matches!(input.ty, Some(ElementType::I32 | ElementType::I64)) {
            let is = input
                .ty
                .map_or("not a tensor".to_string(), |t| t.to_string());
            return Err(session.interface(format!(
                "input {:?} is {is}, expected int32 or int64 token ids",
                input.name
            )));
        }
        let ids_input = input.name.clone();
        let output = session
            .output_or_first("last_hidden_state", "the text encoder")?
            .name
            .clone();
        Ok(Self {
            session,
            ids_input,
            output,
        })
    }

    /// Embeds a batch of padded id sequences in one run.
    ///
    /// `ids`: n sequences of equal length L. Returns `[n, L, d] f32` (fp16
    /// outputs are widened).
    pub fn embed(&mut self, ids: &[Vec<u32>]) -> Result<Array3<f32>, SessionError> {
        let n = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        if n == 0 || ids.iter().any(|s| s.len() != len) {
            return Err(self
                .session
                .interface("token sequences must be non-empty and of equal length"));
        }
        let flat = ids.iter().flatten().map(|&t| i64::from(t)).collect();
        let input = self.session.int_value(&self.ids_input, &[n, len], flat)?;
        let out = self
            .session
            .run(&[(self.ids_input.as_str(), &input)])?
            .float(&self.output)?;
        let dims: Vec<usize> = out.shape().to_vec();
        let [b, l, d] = dims[..] else {
            return Err(self.session.interface(format!(
                "output {:?} has shape {dims:?}, expected [batch, tokens, width]",
                self.output
            )));
        };
        if b != n || l != len {
            return Err(self.session.interface(format!(
                "output shape {dims:?} does not match the input [{n}, {len}]"
            )));
        }
        out.into_shape_with_order((b, l, d))
            .map_err(|e| self.session.interface(e.to_string()))
    }
}
