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

/// The first two of `pairs` that send one source to two destinations (the
/// earlier one first), which one solve cannot both honour. Prompts compare
/// as the CLIP tokenizer reads them: letter case and runs of whitespace do
/// not count.
pub fn conflicting_pairs(pairs: &[PromptPair]) -> Option<(&PromptPair, &PromptPair)> {
    let read = |text: &str| {
        text.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let read: Vec<(String, String)> = pairs
        .iter()
        .map(|p| (read(&p.source), read(&p.destination)))
        .collect();
    (0..pairs.len()).find_map(|k| {
        let (source, destination) = &read[k];
        read[..k]
            .iter()
            .position(|(s, d)| s == source && d != destination)
            .map(|j| (&pairs[j], &pairs[k]))
    })
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

/// What was edited and how, and by which tool: the part an edited UNet's
/// [`EditRecord`] and an operator file's metadata
/// ([`super::operator_file::OperatorMeta`]) share, flattened into each, so
/// both carry the same JSON fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditSpec {
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
    /// The augmentation prefixes used.
    pub augmentations: Vec<String>,
    /// `"time-onnx <version>"`.
    pub tool: String,
}

impl EditSpec {
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
}

/// One edit of a UNet, as recorded in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    /// What was edited.
    #[serde(flatten)]
    pub spec: EditSpec,
    /// Whether keys were edited along with values.
    pub keys: bool,
}

/// `"time-onnx <version>"`, as records and files name their writer.
pub fn tool() -> String {
    format!("time-onnx {}", env!("CARGO_PKG_VERSION"))
}

impl EditRecord {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as time-onnx wrote it before [`EditSpec`] was split out of
    /// [`EditRecord`]: every field at the top level, `keys` after `lambda`.
    const OLDER: &str = r#"{"source":"a circle","destination":"a blue circle",
        "edits":[{"source":"a circle","destination":"a blue circle"},
                 {"source":"a square","destination":"a yellow square"}],
        "preservation":{"prompts":153,"scale":0.1},"erase":true,
        "debias":{"attributes":["a red circle"],"wanted":[1.0],"weights":[0.5]},
        "lambda":0.1,"keys":true,"augmentations":["A photo of "],"tool":"time-onnx 0.1.0"}"#;

    #[test]
    fn records_keep_every_field_at_the_top_level() {
        let record: EditRecord = serde_json::from_str(OLDER).unwrap();
        assert!(record.keys && record.spec.erase);
        assert_eq!(record.spec.pairs().len(), 2);
        assert_eq!(record.spec.preservation.as_ref().unwrap().prompts, 153);
        let written = serde_json::to_value(&record).unwrap();
        let older: serde_json::Value = serde_json::from_str(OLDER).unwrap();
        assert_eq!(written, older, "the same fields, whatever their order");
    }

    fn pair(source: &str, destination: &str) -> PromptPair {
        PromptPair {
            source: source.into(),
            destination: destination.into(),
        }
    }

    #[test]
    fn one_source_with_two_destinations_conflicts() {
        let pairs = [
            pair("a cat", "a black cat"),
            pair("a dog", "a brown dog"),
            pair("A  cat", "a white cat"),
        ];
        let (earlier, later) = conflicting_pairs(&pairs).expect("a conflict");
        assert_eq!((earlier, later), (&pairs[0], &pairs[2]));
        // The same edit twice, written differently, is no conflict.
        let same = [pair("a cat", "a black cat"), pair("A cat ", "a BLACK  cat")];
        assert!(conflicting_pairs(&same).is_none());
        assert!(conflicting_pairs(&pairs[..2]).is_none());
    }

    #[test]
    fn a_single_pair_writes_no_edits_list() {
        let mut record: EditRecord = serde_json::from_str(OLDER).unwrap();
        record.spec.edits.clear();
        record.spec.erase = false;
        let written = serde_json::to_value(&record).unwrap();
        assert!(written.get("edits").is_none() && written.get("erase").is_none());
        assert_eq!(record.spec.pairs()[0].destination, "a blue circle");
    }
}
