//! The CLIP text encoders, run through ONNX Runtime.

use ndarray::{Array2, Array3, Axis, concatenate};

use crate::runtime::{ElementType, Runtime, Session, SessionError, SessionOptions};

use super::side::{Context, PromptIds, TextSide};

/// A text encoder session and the names of its ports.
///
/// Exports differ: the diffusers script feeds int32 ids, optimum int64; an
/// fp16 export returns fp16 states. Names and types are read from the model.
pub struct TextEncoder {
    session: Session,
    ids_input: String,
    output: String,
    pooled: Option<String>,
}

impl TextEncoder {
    /// Opens `path` and checks it takes token ids and returns the state
    /// `context` names (and the pooled `text_embeds` when `pooled`).
    ///
    /// The penultimate state is the second-to-last of optimum's
    /// `hidden_states.0 … hidden_states.L` (0 is the token embeddings): what
    /// diffusers' SDXL pipeline takes as `hidden_states[-2]`.
    pub fn open(
        rt: &Runtime,
        path: &std::path::Path,
        opts: SessionOptions,
        context: Context,
        pooled: bool,
    ) -> Result<Self, SessionError> {
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
        let output = match context {
            Context::Last => session
                .output_or_first("last_hidden_state", "the text encoder")?
                .name
                .clone(),
            Context::Penultimate => penultimate(&session)?,
        };
        let pooled = if pooled {
            let Some(port) = session.outputs().iter().find(|p| p.name == "text_embeds") else {
                return Err(session.interface(
                    "no output \"text_embeds\": SDXL's second text encoder must give its pooled, \
                     projected embedding (CLIPTextModelWithProjection)",
                ));
            };
            Some(port.name.clone())
        } else {
            None
        };
        Ok(Self {
            session,
            ids_input,
            output,
            pooled,
        })
    }

    /// [`Self::embed`] over runs of at most [`BATCH`] sequences, the results
    /// stacked in order.
    fn embed_in_batches(
        &mut self,
        ids: &[&[u32]],
    ) -> Result<(Array3<f32>, Option<Array2<f32>>), SessionError> {
        if ids.len() <= BATCH {
            return self.embed(ids);
        }
        let (mut states, mut pooled) = (Vec::new(), Vec::new());
        for chunk in ids.chunks(BATCH) {
            let (s, p) = self.embed(chunk)?;
            states.push(s);
            pooled.extend(p);
        }
        let stack = |e: ndarray::ShapeError| {
            self.session
                .interface(format!("the runs' outputs do not line up: {e}"))
        };
        let views: Vec<_> = states.iter().map(|s| s.view()).collect();
        let states = concatenate(Axis(0), &views).map_err(stack)?;
        let pooled = if pooled.is_empty() {
            None
        } else {
            let views: Vec<_> = pooled.iter().map(|p| p.view()).collect();
            Some(concatenate(Axis(0), &views).map_err(stack)?)
        };
        Ok((states, pooled))
    }

    /// Embeds a batch of padded id sequences in one run: `[n, L, d] f32`
    /// (fp16 outputs are widened), and `[n, p]` pooled embeddings when the
    /// encoder was opened for them.
    fn embed(
        &mut self,
        ids: &[&[u32]],
    ) -> Result<(Array3<f32>, Option<Array2<f32>>), SessionError> {
        let n = ids.len();
        let len = ids.first().map_or(0, |s| s.len());
        if n == 0 || ids.iter().any(|s| s.len() != len) {
            return Err(self
                .session
                .interface("token sequences must be non-empty and of equal length"));
        }
        let flat = ids
            .iter()
            .flat_map(|s| s.iter())
            .map(|&t| i64::from(t))
            .collect();
        let input = self.session.int_value(&self.ids_input, &[n, len], flat)?;
        let (out, pooled) = {
            let outputs = self.session.run(&[(self.ids_input.as_str(), &input)])?;
            let pooled = self.pooled.as_ref().map(|n| outputs.float(n)).transpose()?;
            (outputs.float(&self.output)?, pooled)
        };
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
        let states = out
            .into_shape_with_order((b, l, d))
            .map_err(|e| self.session.interface(e.to_string()))?;
        let pooled = match pooled {
            None => None,
            Some(p) => {
                let name = "text_embeds";
                let dims = p.shape().to_vec();
                let [pb, pd] = dims[..] else {
                    return Err(self.session.interface(format!(
                        "output {name:?} has shape {dims:?}, expected [batch, width]"
                    )));
                };
                if pb != n {
                    return Err(self
                        .session
                        .interface(format!("output {name:?} has {pb} rows for {n} prompts")));
                }
                Some(
                    p.into_shape_with_order((pb, pd))
                        .map_err(|e| self.session.interface(e.to_string()))?,
                )
            }
        };
        Ok((states, pooled))
    }
}

/// The name of the penultimate of the `hidden_states.K` outputs.
fn penultimate(session: &Session) -> Result<String, SessionError> {
    let last = session
        .outputs()
        .iter()
        .filter_map(|p| p.name.strip_prefix("hidden_states.")?.parse::<usize>().ok())
        .max();
    match last {
        Some(l) if l >= 1 => Ok(format!("hidden_states.{}", l - 1)),
        _ => Err(session.interface(
            "no outputs \"hidden_states.0\" … \"hidden_states.L\": an SDXL text encoder must be \
             exported with its hidden states (optimum does), as the UNet reads the penultimate one",
        )),
    }
}

/// Prompts per text encoder run: the activations of one run grow with the
/// batch (SD's encoder holds 64·77·768 f32, 15 MB, of output alone per 64
/// prompts, and ~10× that inside), and larger batches were no faster on
/// two cores; a thousand edits at once then need no more working memory
/// than one batch.
pub const BATCH: usize = 64;

/// Every text encoder of a model, run in turn on the same prompts, their
/// states concatenated in order into the UNet's context.
pub struct TextEncoders {
    parts: Vec<TextEncoder>,
}

/// The encoders' output for a batch of prompts.
#[derive(Clone, Debug)]
pub struct Embedded {
    /// The UNet's context, `[n, L, Σ widths]`.
    pub context: Array3<f32>,
    /// The last encoder's pooled embedding `[n, p]` (SDXL), else `None`.
    pub pooled: Option<Array2<f32>>,
    /// Each encoder's width, in concatenation order (they add up to d).
    pub widths: Vec<usize>,
}

impl Embedded {
    /// "48 (16 + 32)" for two encoders, "768" for one: for messages about
    /// widths that do not match.
    pub fn describe_width(&self) -> String {
        let d = self.context.shape()[2];
        match self.widths.len() {
            0 | 1 => d.to_string(),
            _ => {
                let parts: Vec<String> = self.widths.iter().map(usize::to_string).collect();
                format!("{d} ({})", parts.join(" + "))
            }
        }
    }
}

impl TextEncoders {
    /// Opens every encoder of `side`; the last one of a pair also for its
    /// pooled embedding.
    pub fn open(rt: &Runtime, side: &TextSide, opts: SessionOptions) -> Result<Self, SessionError> {
        let last = side.encoders.len() - 1;
        let parts = side
            .encoders
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let pooled = side.context == Context::Penultimate && i == last;
                TextEncoder::open(rt, &e.model, opts, side.context, pooled)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { parts })
    }

    /// The context of each prompt, `[n, L, Σ widths] f32`, in runs of at
    /// most [`BATCH`] prompts per encoder, and the pooled embeddings when the
    /// encoders give them.
    pub fn embed(&mut self, ids: &[PromptIds]) -> Result<Embedded, SessionError> {
        let mut states = Vec::with_capacity(self.parts.len());
        let mut widths = Vec::with_capacity(self.parts.len());
        let mut pooled = None;
        for (k, part) in self.parts.iter_mut().enumerate() {
            let own: Vec<&[u32]> = ids
                .iter()
                .map(|p| p.get(k).map_or(&[][..], Vec::as_slice))
                .collect();
            let (s, p) = part.embed_in_batches(&own)?;
            widths.push(s.shape()[2]);
            states.push(s);
            pooled = p.or(pooled);
        }
        let context = if states.len() == 1 {
            states.pop().expect("one encoder")
        } else {
            let views: Vec<_> = states.iter().map(|s| s.view()).collect();
            concatenate(Axis(2), &views).map_err(|e| {
                self.parts[0]
                    .session
                    .interface(format!("the text encoders' states do not line up: {e}"))
            })?
        };
        Ok(Embedded {
            context,
            pooled,
            widths,
        })
    }
}
