//! `--save-weights`: the edited K/V weights as a safetensors file in torch's
//! layout, keyed by diffusers parameter names, for
//! `unet.load_state_dict(weights, strict=False)` on the torch side.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::Array2;

use super::record::EditRecord;

/// The metadata key holding the [`EditRecord`] as JSON.
const META_KEY: &str = "time_onnx.edit";

/// Why the weights file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the weights file {path}: {why}")]
pub struct WeightsFileError {
    /// The file.
    pub path: PathBuf,
    /// What failed.
    pub why: String,
}

/// Writes `tensors` (f32, torch layout) with `record`, whole or not at all.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Array2<f32>>,
    record: &EditRecord,
) -> Result<(), WeightsFileError> {
    let err = |why: String| WeightsFileError {
        path: path.to_path_buf(),
        why,
    };
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, v)| {
            let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), v.shape().to_vec(), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let json = serde_json::to_string(record).map_err(|e| err(e.to_string()))?;
    let meta = HashMap::from([(META_KEY.to_string(), json)]);
    let file = safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))?;
    crate::staged::write_file(path, |w| w.write_all(&file)).map_err(|e| err(e.to_string()))
}
