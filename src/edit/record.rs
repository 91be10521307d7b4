//! The record of an edit, as stored in an edited UNet's `metadata_props`
//! (`time_onnx.edit.N`, numbered from 1) and in the PNG text chunks of the
//! images it draws: what `edit` writes and `generate` reads back.

use serde::{Deserialize, Serialize};

use crate::onnx::Model;

/// Prefix of the `metadata_props` keys that record edits, numbered from 1.
pub const RECORD_KEY: &str = "time_onnx.edit.";

/// One (source, destination) pair of an edit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptPair {
    /// Source prompt.
    pub source: String,
    /// Destination prompt.
    pub destination: String,
}

/// What an edit was told to leave alone (UCE's preservation term).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreservationRecord {
    /// How many prompts the preservation prior sums.
    pub prompts: usize,
    /// Its scale s.
    pub scale: f64,
}

/// A debias edit: the concept (the edit's source) moved towards these
/// attributes with these weights, found by measuring the mix (see
/// [`crate::edit::debias`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DebiasRecord {
    /// The attribute prompts.
    pub attributes: Vec<String>,
    /// The mix asked for, one share per attribute.
    pub wanted: Vec<f64>,
    /// The weights wⱼ of c* = c + Σ wⱼ (‖c‖/‖aⱼ‖) aⱼ.
    pub weights: Vec<f64>,
}

/// One edit, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    /// Source prompt (of the first pair, when several were solved together).
    pub source: String,
    /// Destination prompt (of the first pair).
    pub destination: String,
    /// Every pair solved together, when there were several (the first being
    /// `source` → `destination`); empty for one pair, as records were
    /// before edits came in sets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<PromptPair>,
    /// The preservation term, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preservation: Option<PreservationRecord>,
    /// UCE erase/replace pairs (UCE's positions, guides that need not
    /// contain the source's words) rather than TIME's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub erase: bool,
    /// A debias edit's attributes and weights (its destination is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debias: Option<DebiasRecord>,
    /// λ.
    pub lambda: f64,
    /// Whether keys were edited along with values.
    pub keys: bool,
    /// The augmentation prefixes used.
    pub augmentations: Vec<String>,
    /// "time-onnx <version>".
    pub tool: String,
}

/// "time-onnx <version>", as records and files name their writer.
pub fn tool() -> String {
    format!("time-onnx {}", env!("CARGO_PKG_VERSION"))
}

impl EditRecord {
    /// Every (source, destination) pair of the edit, in order.
    pub fn pairs(&self) -> Vec<PromptPair> {
        if self.edits.is_empty() {
            vec![PromptPair {
                source: self.source.clone(),
                destination: self.destination.clone(),
            }]
        } else {
            self.edits.clone()
        }
    }

    /// The `metadata_props` entry for this record as the `n`-th edit (from 1).
    pub fn metadata_entry(&self, n: usize) -> Result<(String, String), serde_json::Error> {
        Ok((format!("{RECORD_KEY}{n}"), serde_json::to_string(self)?))
    }
}

/// Edits already recorded in a model, oldest first. Entries that do not
/// parse (another tool's, a damaged one) are not edits of ours: skipped.
pub fn previous_records(model: &Model) -> Vec<EditRecord> {
    let mut numbered: Vec<(u64, EditRecord)> = model
        .proto()
        .metadata_props
        .iter()
        .filter_map(|e| {
            let n = e.key.strip_prefix(RECORD_KEY)?.parse().ok()?;
            Some((n, serde_json::from_str(&e.value).ok()?))
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    numbered.into_iter().map(|(_, r)| r).collect()
}
