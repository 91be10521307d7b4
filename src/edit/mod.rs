//! TIME's closed-form edit (Orgad, Kawar, Belinkov 2023), from text
//! embeddings to the bytes of every cross-attention K/V weight: no runtime.
//!
//! The steps, in the order the edit journey ([`crate::workflow::edit`])
//! takes them: [`prompt_pairs`] builds the augmented (source, destination)
//! prompts; the caller encodes each prompt with the text encoder
//! (`[77, d] f32` per prompt); [`align_prompts`] maps every source position
//! to its destination position; [`solve()`] turns the embeddings and maps into
//! one [`Operator`] shared by every cross-attention K/V projection:
//! W' = W·A, with A = (λI + Σ c* cᵀ)(λI + Σ c cᵀ)⁻¹ (W' = (λW + Σ W c* cᵀ)·
//! (λI + Σ c cᵀ)⁻¹ as the paper writes it, since v* = W c*);
//! [`weights::apply`] rewrites one stored weight with it.
//!
//! ONNX stores those weights transposed, Wᵀ `[d, out]`, so the operator
//! keeps Aᵀ and a weight edits to W'ᵀ = Aᵀ·Wᵀ. Whether keys are edited along
//! with values is the caller's choice ([`Targets`]); successive edits compose
//! by applying one operator after the other (or [`Operator::then`]).
//!
//! What an edit leaves behind: a [`record::EditRecord`] in the UNet's
//! metadata, an operator file ([`operator_file`]), a torch weights file
//! ([`weights_file`]); a preservation prior ([`prior`]). Only the file
//! modules (those three and their shared `matrix_file`) do I/O.

pub mod align;
pub mod debias;
mod matrix_file;
pub mod operator_file;
pub mod prior;
pub mod record;
pub mod solve;
pub mod weights;
pub mod weights_file;

pub use align::{
    ArticleRule, DEFAULT_AUGMENTATIONS, DEFAULT_LAMBDA, align, align_prompts, augmentation_base,
    prompt_pairs, uce_positions,
};
pub use solve::{Change, DEFAULT_PRESERVE_SCALE, Operator, Preservation, solve, solve_preserving};
pub use weights::{Targets, WeightError};

use crate::text::TextError;

/// Everything that can stop an edit.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// A source token has no counterpart, in order, in the destination: the
    /// destination must contain every source word (it only adds words).
    #[error(
        "the destination prompt {} lacks the word {word:?} of the source prompt {} \
         (every source word must appear in the destination, in the same order)",
        quoted(.dst), quoted(.src)
    )]
    MissingWord {
        /// The source token, decoded.
        word: String,
        /// The source prompt.
        src: String,
        /// The destination prompt.
        dst: String,
    },
    /// The destination has the word, but only past the text encoder's
    /// length, where it has no embedding.
    #[error(
        "the destination prompt {} has the word {word:?} of the source prompt {} only \
         after its first {max_len} tokens, which is all the text encoder sees",
        quoted(.dst), quoted(.src)
    )]
    TruncatedWord {
        /// The source token, decoded.
        word: String,
        /// The source prompt.
        src: String,
        /// The destination prompt.
        dst: String,
        /// The text encoder's sequence length.
        max_len: usize,
    },
    /// [`align()`] found no destination token for a source token (token ids
    /// only; [`align_prompts`] reports [`EditError::MissingWord`] instead).
    #[error("source token {token} at position {position} has no match in the destination")]
    UnmatchedToken {
        /// Its position in the source ids.
        position: usize,
        /// The token id.
        token: u32,
    },
    /// More token ids than the embeddings have positions.
    #[error("{len} token ids do not fit in a sequence of {seq_len} positions")]
    TooManyTokens {
        /// Number of ids given.
        len: usize,
        /// Positions available.
        seq_len: usize,
    },
    /// The tokenizer gives no id for "a" (needed to compare "an" as "a").
    #[error("the tokenizer encodes \"a \" as {ids:?}, expected BOS, one token, EOS")]
    NoArticle {
        /// What `encode("a ")` gave.
        ids: Vec<u32>,
    },
    /// The tokenizer failed.
    #[error(transparent)]
    Text(#[from] TextError),
    /// A prompt that is empty or only whitespace: editing it would rewrite
    /// what the model draws for no prompt at all (the unconditional half of
    /// classifier-free guidance), which no edit means to do.
    #[error("the {which} prompt is empty")]
    EmptyPrompt {
        /// "source" or "destination".
        which: &'static str,
    },
    /// λ must be a finite positive number: it keeps λI + Σ c cᵀ invertible
    /// and weighs how much the original weights are kept.
    #[error("lambda must be finite and > 0, got {lambda}")]
    BadLambda {
        /// The value given.
        lambda: f64,
    },
    /// An edit needs at least one (source, destination) pair.
    #[error("no edits given: at least one (source, destination) pair is needed")]
    NoEdits,
    /// Edits solved together that send one source to two destinations (see
    /// [`record::conflicting_pairs`]): the solve would average them.
    #[error(
        "edits conflict: {source_prompt:?} is edited both to {first:?} and to {second:?}; \
         edits solved together need one destination per source"
    )]
    ConflictingEdits {
        /// The source prompt.
        source_prompt: String,
        /// One destination.
        first: String,
        /// The other.
        second: String,
    },
    /// The preservation scale must be finite and ≥ 0 (0 preserves nothing).
    #[error("the preservation scale must be finite and >= 0, got {scale}")]
    BadPreserveScale {
        /// The value given.
        scale: f64,
    },
    /// A preservation prior with NaN or infinite entries.
    #[error("the preservation prior has non-finite entries")]
    NonFinitePrior,
    /// Arrays whose shapes do not fit together.
    #[error("{what}: expected shape {expected:?}, got {actual:?}")]
    Shape {
        /// Which array.
        what: &'static str,
        /// The shape required (by the other inputs).
        expected: Vec<usize>,
        /// The shape given.
        actual: Vec<usize>,
    },
    /// An index map pointing past the destination sequence.
    #[error("index map of pair {pair}: position {position} points to {index}, past {seq_len}")]
    IndexOutOfRange {
        /// The (source, destination) pair.
        pair: usize,
        /// The source position.
        position: usize,
        /// The destination position it maps to.
        index: usize,
        /// The destination sequence length.
        seq_len: usize,
    },
    /// A NaN or infinite embedding value (a broken text encoder or file).
    #[error("{what} embedding of pair {pair} at position {position} is not finite")]
    NonFinite {
        /// "source" or "destination".
        what: &'static str,
        /// The pair.
        pair: usize,
        /// The sequence position.
        position: usize,
    },
    /// The Cholesky factorization of λI + Σ c cᵀ failed (not positive
    /// definite in floating point: λ far too small for the embeddings).
    #[error("lambda I + sum c c^T is not positive definite in float64 (lambda = {lambda})")]
    NotPositiveDefinite {
        /// The λ used.
        lambda: f64,
        /// LAPACK's report.
        #[source]
        source: ndarray_linalg::error::LinalgError,
    },
    /// A LAPACK routine refused its arguments (a bug, not an input).
    #[error("LAPACK's {routine} failed (info = {info})")]
    Lapack {
        /// The routine.
        routine: &'static str,
        /// Its `info`.
        info: std::ffi::c_int,
    },
    /// LAPACK failed to factor M⁻¹·C, the basis of the change A − I (QR).
    #[error("the QR factorization of the edit's change (M^-1 C) failed: {source}")]
    Factorization {
        /// LAPACK's report.
        #[source]
        source: ndarray_linalg::error::LinalgError,
    },
}

/// A prompt for an error message: quoted and escaped like `{:?}`, its middle
/// elided past 60 characters so that the message stays one readable line.
fn quoted(text: &str) -> String {
    const KEEP: usize = 28;
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= 2 * KEEP + 4 {
        return format!("{text:?}");
    }
    let head: String = chars[..KEEP].iter().collect();
    let tail: String = chars[chars.len() - KEEP..].iter().collect();
    let (head, tail) = (format!("{head:?}"), format!("{tail:?}"));
    format!(
        "{}…{} ({} characters)",
        &head[..head.len() - 1],
        &tail[1..],
        chars.len()
    )
}
