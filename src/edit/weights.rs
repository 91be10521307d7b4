//! Applying an edit operator to one stored K/V weight, in its own dtype and
//! layout.
//!
//! An operator Aᵀ `[d, d] f64` turns a weight stored as Wᵀ `[d, out]` into
//! Aᵀ·Wᵀ, which transforms each column on its own; a weight stored as W
//! `[out, d]` becomes W·A, each row on its own. That independence is what
//! lets a packed K/V weight be edited in its packed layout, and a values-only
//! edit touch only the V columns of it.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use ndarray::{Array2, ArrayViewMut2, Axis};

use std::collections::BTreeMap;

use super::Change;
use crate::onnx::DataType;
use crate::onnx::cross_attention::{Layout, Projection, Role};

/// Which projections an edit changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Keys and values (TIME's default).
    KeysAndValues,
    /// Values only (the reference's `with_to_k=False`).
    ValuesOnly,
}

/// Why a weight could not be edited.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The weight's width is not the operator's.
    #[error("{tensor:?} expects {got}-wide text embeddings, the text encoder gives {expected}")]
    Width {
        /// The weight.
        tensor: String,
        /// Its width.
        got: usize,
        /// The operator's.
        expected: usize,
    },
    /// The result does not fit the storage type.
    #[error("editing {tensor:?} gives {value:e}, beyond what {dtype} can hold")]
    Overflow {
        /// The weight.
        tensor: String,
        /// The first value out of range.
        value: f64,
        /// The storage type.
        dtype: DataType,
    },
    /// Bytes or shape that do not describe a matrix of the stated type.
    #[error("{tensor:?}: {why}")]
    Malformed {
        /// The weight.
        tensor: String,
        /// What is wrong.
        why: String,
    },
    /// A result that is not finite (NaN or infinite input or operator).
    #[error(
        "editing {tensor:?} gives non-finite values; the embeddings or weights contain NaN or infinity"
    )]
    NonFinite {
        /// The weight.
        tensor: String,
    },
}

/// One edited weight: new bytes plus how much it moved.
#[derive(Debug)]
pub struct EditedWeight {
    /// The new bytes, same dtype, shape and length as the old.
    pub bytes: Vec<u8>,
    /// ‖W' − W‖ / ‖W‖ over the edited entries (Frobenius).
    pub relative_change: f64,
}

/// Decodes little-endian `bytes` of `dtype` into f64.
fn decode(bytes: &[u8], dtype: DataType, tensor: &str) -> Result<Vec<f64>, WeightError> {
    let bad = |why: String| WeightError::Malformed {
        tensor: tensor.to_string(),
        why,
    };
    let size = dtype
        .size()
        .filter(|_| dtype.is_float())
        .ok_or_else(|| bad(format!("element type {dtype}")))?;
    if !bytes.len().is_multiple_of(size) {
        return Err(bad(format!(
            "{} bytes is not a whole number of {dtype}",
            bytes.len()
        )));
    }
    let chunks = bytes.chunks_exact(size);
    Ok(match dtype {
        DataType::Float => chunks
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        DataType::Double => chunks
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        DataType::Float16 => chunks
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DataType::BFloat16 => chunks
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        _ => return Err(bad(format!("element type {dtype}"))),
    })
}

/// Encodes f64 values as little-endian `dtype`, refusing values it cannot hold.
fn encode(values: &[f64], dtype: DataType, tensor: &str) -> Result<Vec<u8>, WeightError> {
    let overflow = |value: f64| WeightError::Overflow {
        tensor: tensor.to_string(),
        value,
        dtype,
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err(WeightError::NonFinite {
            tensor: tensor.to_string(),
        });
    }
    let mut out = Vec::with_capacity(values.len() * dtype.size().unwrap_or(4));
    for &v in values {
        match dtype {
            DataType::Float => {
                let x = v as f32;
                if !x.is_finite() {
                    return Err(overflow(v));
                }
                out.extend_from_slice(&x.to_le_bytes());
            }
            DataType::Double => out.extend_from_slice(&v.to_le_bytes()),
            DataType::Float16 => {
                let x = f16::from_f64(v);
                if !x.is_finite() {
                    return Err(overflow(v));
                }
                out.extend_from_slice(&x.to_le_bytes());
            }
            DataType::BFloat16 => {
                let x = bf16::from_f64(v);
                if !x.is_finite() {
                    return Err(overflow(v));
                }
                out.extend_from_slice(&x.to_le_bytes());
            }
            _ => {
                return Err(WeightError::Malformed {
                    tensor: tensor.to_string(),
                    why: format!("element type {dtype}"),
                });
            }
        }
    }
    Ok(out)
}

/// Applies the edit whose Aᵀ − I is `change` to the weight `p` whose stored
/// bytes are `bytes`: W'ᵀ = Wᵀ + (Aᵀ − I)·Wᵀ.
///
/// `change32` is `change` rounded to f32. Weights stored in f32 or narrower
/// are multiplied in f32 (BLAS sgemm: the 32 weights of an SD 1.x UNet are
/// 22–29 GFLOP, twice as fast as f64, and f32 accumulation over d = 768
/// terms keeps ~1e-6 relative accuracy, far below fp16 rounding and below
/// our 1e-5 bar); f64 weights in f64. Adding the change to the stored
/// values, rather than multiplying by Aᵀ, keeps the untouched part exact.
/// An f32 weight is edited in place in the buffer that becomes its new bytes:
/// fresh memory is paid for in page faults, and with four fresh buffers per
/// weight the full-size apply took ~180 ms, of which ~100 ms multiplying.
pub fn apply(
    change: &Change<f64>,
    change32: &Change<f32>,
    p: &Projection,
    bytes: &[u8],
    targets: Targets,
) -> Result<EditedWeight, WeightError> {
    let name = &p.initializer;
    let d = change.dim();
    if p.width() != d {
        return Err(WeightError::Width {
            tensor: name.clone(),
            got: p.width(),
            expected: d,
        });
    }
    let [rows, cols] = p.tensor.shape[..] else {
        return Err(WeightError::Malformed {
            tensor: name.clone(),
            why: format!("shape {:?}", p.tensor.shape),
        });
    };
    let shape = (rows, cols);
    match p.tensor.dtype {
        DataType::Double => {
            let mut values = decode(bytes, p.tensor.dtype, name)?;
            let sizes = edit_in_place(change, &mut values, shape, p, targets)?;
            Ok(EditedWeight {
                bytes: encode(&values, p.tensor.dtype, name)?,
                relative_change: sizes.relative(),
            })
        }
        DataType::Float if cfg!(target_endian = "little") => {
            let mut out = bytes.to_vec();
            let Ok(values) = bytemuck::try_cast_slice_mut::<u8, f32>(&mut out) else {
                return apply_f32_copy(change32, p, bytes, shape, targets);
            };
            let sizes = edit_in_place(change32, values, shape, p, targets)?;
            // |w'| ≤ ‖W‖ + ‖Z‖ entry by entry (P has orthonormal columns), so
            // only a weight near f32's range needs the pass that looks.
            if sizes.before + sizes.change >= 1e38 && values.iter().any(|v| !v.is_finite()) {
                return Err(WeightError::NonFinite {
                    tensor: name.clone(),
                });
            }
            Ok(EditedWeight {
                bytes: out,
                relative_change: sizes.relative(),
            })
        }
        _ => apply_f32_copy(change32, p, bytes, shape, targets),
    }
}

/// [`apply`] for f32, f16 and bf16 storage through a decoded f32 copy.
fn apply_f32_copy(
    change32: &Change<f32>,
    p: &Projection,
    bytes: &[u8],
    shape: (usize, usize),
    targets: Targets,
) -> Result<EditedWeight, WeightError> {
    let name = &p.initializer;
    let mut values = decode_f32(bytes, p.tensor.dtype, name)?;
    let sizes = edit_in_place(change32, &mut values, shape, p, targets)?;
    Ok(EditedWeight {
        bytes: encode_f32(&values, p.tensor.dtype, name)?,
        relative_change: sizes.relative(),
    })
}

/// Edits the stored matrix `values` (`shape`, row-major) in place: Wᵀ `[d,
/// out]` storage gains (Aᵀ − I)·Wᵀ, W `[out, d]` storage W·(A − I), on the
/// selected columns of Wᵀ only.
fn edit_in_place<T>(
    change: &Change<T>,
    values: &mut [T],
    shape: (usize, usize),
    p: &Projection,
    targets: Targets,
) -> Result<Sizes, WeightError>
where
    T: ndarray::LinalgScalar + Into<f64>,
{
    let non_finite = || WeightError::NonFinite {
        tensor: p.initializer.clone(),
    };
    let norm = sum_of_squares(values);
    if !norm.is_finite() {
        return Err(non_finite());
    }
    let stored = ArrayViewMut2::from_shape(shape, values).map_err(|e| WeightError::Malformed {
        tensor: p.initializer.clone(),
        why: e.to_string(),
    })?;
    // Work on Wᵀ `[d, out]`: the stored matrix, or its transposed view.
    let mut wt = match p.layout {
        Layout::Transposed => stored,
        Layout::Direct => stored.reversed_axes(),
    };
    let selected = selected_columns(p.role, wt.ncols(), targets);
    let z = if selected.len() == wt.ncols() {
        change.add_to(wt)
    } else {
        let mut part = wt.select(Axis(1), &selected);
        let z = change.add_to(part.view_mut());
        for (k, &c) in selected.iter().enumerate() {
            wt.column_mut(c).assign(&part.column(k));
        }
        z
    };
    let moved = match z.as_slice_memory_order() {
        Some(z) => sum_of_squares(z),
        None => sum_of_squares(&z.iter().copied().collect::<Vec<_>>()),
    };
    if !moved.is_finite() {
        return Err(non_finite());
    }
    Ok(Sizes {
        before: norm.sqrt(),
        change: moved.sqrt(),
    })
}

/// Frobenius norms of a weight and of the change made to it.
struct Sizes {
    /// ‖W‖.
    before: f64,
    /// ‖W' − W‖.
    change: f64,
}

impl Sizes {
    /// ‖W' − W‖ / ‖W‖ (0 for an all-zero weight).
    fn relative(&self) -> f64 {
        if self.before > 0.0 {
            self.change / self.before
        } else {
            0.0
        }
    }
}

/// Σ x² in f64 (infinite or NaN when an element is).
fn sum_of_squares<T: Copy + Into<f64>>(values: &[T]) -> f64 {
    // Eight running sums instead of one: the additions no longer wait for
    // each other (an SDXL UNet's 140 weights are 0.5 G values).
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(lanes.len());
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            let x: f64 = x.into();
            *lane += x * x;
        }
    }
    let tail: f64 = rest
        .iter()
        .map(|&x| {
            let x: f64 = x.into();
            x * x
        })
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// [`decode`] straight to f32, for f32/f16/bf16 storage (the hot path).
fn decode_f32(bytes: &[u8], dtype: DataType, tensor: &str) -> Result<Vec<f32>, WeightError> {
    Ok(match dtype {
        DataType::Float => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DataType::Float16 => crate::onnx::f16_to_f32(bytes),
        DataType::BFloat16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => decode(bytes, dtype, tensor)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
    })
}

/// [`encode`] from f32, refusing what the storage type cannot hold.
fn encode_f32(values: &[f32], dtype: DataType, tensor: &str) -> Result<Vec<u8>, WeightError> {
    // No early exit: the whole pass vectorizes.
    if values.iter().fold(false, |bad, v| bad | !v.is_finite()) {
        return Err(WeightError::NonFinite {
            tensor: tensor.to_string(),
        });
    }
    let overflow = |value: f32| WeightError::Overflow {
        tensor: tensor.to_string(),
        value: value.into(),
        dtype,
    };
    let mut out = Vec::with_capacity(values.len() * dtype.size().unwrap_or(4));
    match dtype {
        DataType::Float => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DataType::Float16 => push_f16(values, &mut out).map_err(overflow)?,
        DataType::BFloat16 => push_halves(values, &mut out, |v| {
            let x = bf16::from_f32(v);
            x.is_finite().then(|| x.to_le_bytes())
        })
        .map_err(overflow)?,
        _ => {
            return encode(
                &values.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                dtype,
                tensor,
            );
        }
    }
    Ok(out)
}

/// Appends each value as f16 bytes, the whole slice through F16C where the
/// CPU has it; the error is the first value that does not fit.
fn push_f16(values: &[f32], out: &mut Vec<u8>) -> Result<(), f32> {
    let start = out.len();
    out.resize(start + 2 * values.len(), 0);
    let fast = cfg!(target_endian = "little");
    if let (true, Ok(bits)) = (
        fast,
        bytemuck::try_cast_slice_mut::<u8, u16>(&mut out[start..]),
    ) {
        bits.reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(values);
        // Infinite or NaN in f16 (the f32 values are finite): no early exit,
        // so that the pass vectorizes.
        let exponent = 0x7c00;
        if !bits
            .iter()
            .fold(false, |bad, b| bad | (b & exponent == exponent))
        {
            return Ok(());
        }
    }
    out.truncate(start);
    push_halves(values, out, |v| {
        let x = f16::from_f32(v);
        x.is_finite().then(|| x.to_le_bytes())
    })
}

/// Appends each value as 2 bytes of a 16-bit float (`convert` gives `None`
/// past its range); the error is the first value that does not fit.
fn push_halves(
    values: &[f32],
    out: &mut Vec<u8>,
    convert: impl Fn(f32) -> Option<[u8; 2]>,
) -> Result<(), f32> {
    for &v in values {
        out.extend_from_slice(&convert(v).ok_or(v)?);
    }
    Ok(())
}

/// A stored weight in torch's `[out, d]` layout, as f32.
fn torch_layout(p: &Projection, bytes: &[u8]) -> Result<Array2<f32>, WeightError> {
    let [rows, cols] = p.tensor.shape[..] else {
        return Err(WeightError::Malformed {
            tensor: p.initializer.clone(),
            why: format!("shape {:?}", p.tensor.shape),
        });
    };
    let values: Vec<f32> = decode(bytes, p.tensor.dtype, &p.initializer)?
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let stored =
        Array2::from_shape_vec((rows, cols), values).map_err(|e| WeightError::Malformed {
            tensor: p.initializer.clone(),
            why: e.to_string(),
        })?;
    Ok(match p.layout {
        Layout::Transposed => stored.reversed_axes().as_standard_layout().into_owned(),
        Layout::Direct => stored,
    })
}

/// The columns of Wᵀ an edit touches.
fn selected_columns(role: Role, cols: usize, targets: Targets) -> Vec<usize> {
    match (role, targets) {
        (Role::Key, Targets::ValuesOnly) => Vec::new(),
        (Role::Key | Role::Value, _) => (0..cols).collect(),
        (Role::PackedKeyValue { heads }, t) => {
            let head_dim = cols / (2 * heads.max(1));
            (0..cols)
                .filter(|c| t == Targets::KeysAndValues || (c % (2 * head_dim)) >= head_dim)
                .collect()
        }
    }
}

/// Splits a packed weight in torch layout `[heads·2·head_dim, d]` into K and V,
/// each `[heads·head_dim, d]`.
fn split_packed(torch_layout: &Array2<f32>, heads: usize) -> (Array2<f32>, Array2<f32>) {
    let rows = torch_layout.nrows();
    let head_dim = rows / (2 * heads.max(1));
    let pick = |half: usize| -> Vec<usize> {
        (0..rows)
            .filter(|r| (r % (2 * head_dim)) / head_dim == half)
            .collect()
    };
    (
        torch_layout.select(Axis(0), &pick(0)),
        torch_layout.select(Axis(0), &pick(1)),
    )
}

/// Adds the edited weight `bytes` of `p` to `out` in torch's `[out, d]`
/// layout, keyed for `unet.load_state_dict(.., strict=False)`: the diffusers
/// parameter name where the module path is known, the initializer name
/// otherwise; a packed weight becomes its `to_k` and `to_v`.
pub fn add_torch_entries(
    p: &Projection,
    bytes: &[u8],
    out: &mut BTreeMap<String, Array2<f32>>,
) -> Result<(), WeightError> {
    let w = torch_layout(p, bytes)?;
    let base = p.module.clone().unwrap_or_else(|| p.initializer.clone());
    match p.role {
        Role::PackedKeyValue { heads } => {
            let (k, v) = split_packed(&w, heads);
            out.insert(format!("{base}.to_k.weight"), k);
            out.insert(format!("{base}.to_v.weight"), v);
        }
        Role::Key | Role::Value => {
            out.insert(format!("{base}.weight"), w);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_columns_alternate_per_head() {
        // 2 heads, head_dim 3: [k k k v v v k k k v v v]
        let v = selected_columns(Role::PackedKeyValue { heads: 2 }, 12, Targets::ValuesOnly);
        assert_eq!(v, vec![3, 4, 5, 9, 10, 11]);
        assert_eq!(
            selected_columns(
                Role::PackedKeyValue { heads: 2 },
                12,
                Targets::KeysAndValues
            )
            .len(),
            12
        );
        assert!(selected_columns(Role::Key, 5, Targets::ValuesOnly).is_empty());
    }

    #[test]
    fn fp16_overflow_is_an_error_not_infinity() {
        assert!(matches!(
            encode(&[70000.0], DataType::Float16, "w"),
            Err(WeightError::Overflow { .. })
        ));
        assert!(encode(&[65504.0], DataType::Float16, "w").is_ok());
        assert!(matches!(
            encode(&[f64::NAN], DataType::Float, "w"),
            Err(WeightError::NonFinite { .. })
        ));
    }

    #[test]
    fn decode_encode_round_trips_each_float_type() {
        let vals = [0.5, -1.25, 3.0, 0.0];
        for dt in [
            DataType::Float,
            DataType::Double,
            DataType::Float16,
            DataType::BFloat16,
        ] {
            let b = encode(&vals, dt, "w").unwrap();
            assert_eq!(decode(&b, dt, "w").unwrap(), vals.to_vec(), "{dt}");
        }
    }

    #[test]
    fn split_packed_takes_alternate_head_blocks() {
        let w = Array2::from_shape_fn((8, 1), |(r, _)| r as f32); // 2 heads, head_dim 2
        let (k, v) = split_packed(&w, 2);
        assert_eq!(k.column(0).to_vec(), vec![0.0, 1.0, 4.0, 5.0]);
        assert_eq!(v.column(0).to_vec(), vec![2.0, 3.0, 6.0, 7.0]);
    }
}
