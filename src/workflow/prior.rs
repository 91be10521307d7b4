//! The prior journey: preserved prompts → tokens → embeddings, in batches →
//! Cₚ = Σ cₚcₚᵀ → a prior file that every later edit with this text encoder
//! can reuse (`edit --prior`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::edit::prior::{self, Prior, PriorMeta};
use crate::edit::record;
use crate::runtime::{Device, Runtime, SessionOptions};
use crate::text::encoder::{BATCH, TextEncoders};
use crate::text::{PromptIds, TextSide, Tokenizers};

use super::edit::EditJobError;

/// What to build.
#[derive(Clone, Debug)]
pub struct PriorRequest {
    /// The text encoders and tokenizers.
    pub text: TextSide,
    /// The prompts to preserve.
    pub prompts: Vec<String>,
    /// Where to write the prior file.
    pub output: PathBuf,
}

/// What was built.
#[derive(Debug)]
pub struct PriorReport {
    /// The prior written.
    pub prior: Prior,
    /// Its metadata.
    pub meta: PriorMeta,
    /// Time in the text encoder runs.
    pub encoder_time: Duration,
    /// Time in all.
    pub total_time: Duration,
}

/// Builds the prior of `req.prompts` and writes it.
pub fn run(req: &PriorRequest) -> Result<PriorReport, EditJobError> {
    let start = Instant::now();
    if req.prompts.is_empty() {
        return Err(EditJobError::NoPriorPrompts);
    }
    let fingerprint = req.text.fingerprint()?;
    let rt = Runtime::load()?;
    let opts = SessionOptions {
        device: Device::Cpu,
        ..SessionOptions::default()
    };
    let (prior, encoder_time) = build(&rt, &req.text, &req.prompts, opts)?;
    let meta = PriorMeta {
        prompts: prior.prompts(),
        width: prior.dim(),
        text_encoder: fingerprint,
        tool: record::tool(),
    };
    prior::save(&req.output, &prior, &meta)?;
    Ok(PriorReport {
        prior,
        meta,
        encoder_time,
        total_time: start.elapsed(),
    })
}

/// Cₚ of `prompts` with these text encoders and tokenizers, and the time
/// spent in the text encoders' runs.
pub fn build(
    rt: &Runtime,
    text: &TextSide,
    prompts: &[String],
    opts: SessionOptions,
) -> Result<(Prior, Duration), EditJobError> {
    let tok = Tokenizers::open(text)?;
    let ids = prompts
        .iter()
        .map(|p| tok.encode_padded(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut encoder = TextEncoders::open(rt, text, opts)?;
    let encoding = Instant::now();
    let prior = embed_prior(&mut encoder, prompts, &ids)?;
    Ok((prior, encoding.elapsed()))
}

/// Cₚ of `prompts` (tokenized as `ids`), through the text encoder
/// [`BATCH`] prompts at a time, every embedding checked finite.
pub fn embed_prior(
    encoder: &mut TextEncoders,
    prompts: &[String],
    ids: &[PromptIds],
) -> Result<Prior, EditJobError> {
    let mut prior: Option<Prior> = None;
    for (chunk, texts) in ids.chunks(BATCH).zip(prompts.chunks(BATCH)) {
        let emb = encoder.embed(chunk)?.context;
        for (row, text) in emb.outer_iter().zip(texts) {
            if row.iter().any(|v| !v.is_finite()) {
                return Err(EditJobError::NonFiniteEmbedding {
                    prompt: text.clone(),
                });
            }
        }
        prior
            .get_or_insert_with(|| Prior::empty(emb.dim().2))
            .add(emb.view());
    }
    prior.ok_or(EditJobError::NoPriorPrompts)
}
