//! Just enough of the protobuf wire format to re-emit ONNX messages without
//! decoding them: fields are copied as bytes, so whatever our schema
//! ([`super::proto`]) leaves out survives a rewrite.

use std::collections::HashMap;

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

/// One field: its number, wire type, whole byte range and (for
/// length-delimited fields) its payload range.
pub(super) struct Field {
    pub number: u64,
    pub wire: u64,
    pub whole: std::ops::Range<usize>,
    pub payload: std::ops::Range<usize>,
}

pub(super) fn fields(buf: &[u8]) -> Result<Vec<Field>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = varint(buf, &mut pos)?;
        let (number, wire) = (key >> 3, key & 7);
        let payload_start;
        match wire {
            0 => {
                varint(buf, &mut pos)?;
                payload_start = pos;
            }
            1 | 5 => {
                payload_start = pos;
                pos += if wire == 1 { 8 } else { 4 };
            }
            2 => {
                let len =
                    usize::try_from(varint(buf, &mut pos)?).map_err(|_| "length overflows")?;
                payload_start = pos;
                pos = pos.checked_add(len).ok_or("length overflows")?;
            }
            w => return Err(format!("wire type {w} in field {number}")),
        }
        if pos > buf.len() {
            return Err(format!("field {number} runs past its message"));
        }
        out.push(Field {
            number,
            wire,
            whole: start..pos,
            payload: payload_start..pos,
        });
    }
    Ok(out)
}

pub(super) fn put_len(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, (number << 3) | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// Re-emits a message, passing the payload of each length-delimited field
/// numbered `number` through `f` (which returns `None` to keep it as is).
pub(super) fn map_field(
    buf: &[u8],
    number: u64,
    mut f: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, String>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(buf.len());
    for field in fields(buf)? {
        if field.number == number
            && field.wire == 2
            && let Some(new) = f(&buf[field.payload.clone()])?
        {
            put_len(&mut out, number, &new);
            continue;
        }
        out.extend_from_slice(&buf[field.whole]);
    }
    Ok(out)
}

/// ModelProto.graph (7) → GraphProto.initializer (5) → TensorProto:
/// `external_data` (13) locations renamed, `raw_data` (9) replaced.
pub(super) fn rewrite_model(
    model: &[u8],
    rename: &HashMap<&str, &str>,
    raw: &HashMap<&str, &[u8]>,
) -> Result<Vec<u8>, String> {
    map_field(model, 7, |graph| {
        map_field(graph, 5, |tensor| {
            rewrite_tensor(tensor, rename, raw).map(Some)
        })
        .map(Some)
    })
}

fn rewrite_tensor(
    tensor: &[u8],
    rename: &HashMap<&str, &str>,
    raw: &HashMap<&str, &[u8]>,
) -> Result<Vec<u8>, String> {
    let name = tensor_name(tensor)?;
    let with_raw = match raw.get(name.as_str()) {
        Some(data) => map_field(tensor, 9, |old| {
            if old.len() != data.len() {
                return Err(format!("raw_data of {name:?} changed length"));
            }
            Ok(Some(data.to_vec()))
        })?,
        None => tensor.to_vec(),
    };
    map_field(&with_raw, 13, |entry| {
        let parts = fields(entry)?;
        let text = |n| {
            parts
                .iter()
                .find(|f| f.number == n && f.wire == 2)
                .map(|f| &entry[f.payload.clone()])
        };
        if text(1) != Some(b"location".as_slice()) {
            return Ok(None);
        }
        let old = String::from_utf8_lossy(text(2).unwrap_or_default()).into_owned();
        let new = rename
            .get(old.as_str())
            .ok_or_else(|| format!("no new name for location {old:?}"))?;
        let mut out = Vec::new();
        put_len(&mut out, 1, b"location");
        put_len(&mut out, 2, new.as_bytes());
        Ok(Some(out))
    })
}

/// A `TensorProto`'s name (field 8), read without decoding its data.
pub(super) fn tensor_name(tensor: &[u8]) -> Result<String, String> {
    Ok(fields(tensor)?
        .into_iter()
        .find(|f| f.number == 8 && f.wire == 2)
        .map(|f| String::from_utf8_lossy(&tensor[f.payload]).into_owned())
        .unwrap_or_default())
}
