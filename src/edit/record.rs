//! The record of an edit, as stored in an edited UNet's `metadata_props`
//! (`time_onnx.edit.N`, numbered from 1) and in the PNG text chunks of the
//! images it draws: what `edit` writes and `generate` reads back.

use serde::{Deserialize, Serialize};

use crate::onnx::Model;

/// Prefix of the `metadata_props` keys that record edits, numbered from 1.
pub const RECORD_KEY: &str = "time_onnx.edit.";

/// One edit, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    /// Source prompt.
    pub source: String,
    /// Destination prompt.
    pub destination: String,
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
