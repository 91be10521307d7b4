//! The layout operator files and prior files share: one d×d tensor in a
//! safetensors file, and JSON metadata under one key that says what it is.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::Dtype;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest width a file may claim (SDXL's 2048, with room): checked
/// before the matrix is read.
const MAX_WIDTH: usize = 8192;

/// Why a matrix file cannot be written or read; each file kind names it.
pub(crate) enum Failure {
    /// Filesystem trouble.
    Io(std::io::Error),
    /// Not this kind of file, or a damaged one.
    Invalid(String),
}

/// Writes `data` (`[d, d]` of `dtype`, little endian) as tensor `name`, with
/// `meta` as JSON under `key`, atomically.
pub(crate) fn save(
    path: &Path,
    (name, dtype, d, data): (&str, Dtype, usize, &[u8]),
    key: &str,
    meta: &impl Serialize,
) -> Result<(), Failure> {
    let invalid = |e: &dyn std::fmt::Display| Failure::Invalid(e.to_string());
    let view =
        safetensors::tensor::TensorView::new(dtype, vec![d, d], data).map_err(|e| invalid(&e))?;
    let json = serde_json::to_string(meta).map_err(|e| invalid(&e))?;
    let bytes = safetensors::serialize(
        [(name, view)],
        Some(HashMap::from([(key.to_string(), json)])),
    )
    .map_err(|e| invalid(&e))?;
    crate::staged::write_file(path, |w| w.write_all(&bytes)).map_err(Failure::Io)
}

/// Reads the metadata under `key` and tensor `name`, which must be
/// `[d, d]` of `dtype` with d = `width(&meta)`: the metadata and the
/// tensor's bytes.
pub(crate) fn load<M: DeserializeOwned>(
    path: &Path,
    (name, dtype): (&str, Dtype),
    key: &str,
    width: impl Fn(&M) -> usize,
) -> Result<(M, Vec<u8>), Failure> {
    let bytes = crate::bounded::read(path, crate::bounded::MATRIX_LIMIT).map_err(Failure::Io)?;
    parse(&bytes, (name, dtype), key, width)
}

/// [`load`] from the file's bytes (an upload).
pub(crate) fn parse<M: DeserializeOwned>(
    bytes: &[u8],
    (name, dtype): (&str, Dtype),
    key: &str,
    width: impl Fn(&M) -> usize,
) -> Result<(M, Vec<u8>), Failure> {
    let invalid = |why: String| Failure::Invalid(why);
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| invalid(e.to_string()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .ok_or_else(|| invalid(format!("no {key:?} metadata")))?;
    let meta: M = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
    let d = width(&meta);
    if d == 0 || d > MAX_WIDTH {
        return Err(invalid(format!("width {d} is not in 1..={MAX_WIDTH}")));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| invalid(e.to_string()))?;
    let t = st.tensor(name).map_err(|e| invalid(e.to_string()))?;
    if t.dtype() != dtype || t.shape() != [d, d] {
        return Err(invalid(format!(
            "{name} is {:?} {:?}, expected {dtype:?} [{d}, {d}]",
            t.dtype(),
            t.shape()
        )));
    }
    Ok((meta, t.data().to_vec()))
}
