//! ONNX tensor element types (`TensorProto.DataType`).

use std::fmt;

/// An ONNX element type. Values are the specification's enum numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// 1
    Float,
    /// 2
    Uint8,
    /// 3
    Int8,
    /// 4
    Uint16,
    /// 5
    Int16,
    /// 6
    Int32,
    /// 7
    Int64,
    /// 8
    String,
    /// 9
    Bool,
    /// 10
    Float16,
    /// 11
    Double,
    /// 12
    Uint32,
    /// 13
    Uint64,
    /// 16
    BFloat16,
    /// Any other value: complex, float8, 4-bit types, or garbage.
    Other(i32),
}

impl DataType {
    /// Maps the protobuf enum value.
    pub fn from_i32(v: i32) -> Self {
        match v {
            1 => Self::Float,
            2 => Self::Uint8,
            3 => Self::Int8,
            4 => Self::Uint16,
            5 => Self::Int16,
            6 => Self::Int32,
            7 => Self::Int64,
            8 => Self::String,
            9 => Self::Bool,
            10 => Self::Float16,
            11 => Self::Double,
            12 => Self::Uint32,
            13 => Self::Uint64,
            16 => Self::BFloat16,
            other => Self::Other(other),
        }
    }

    /// Bytes per element in `raw_data`, for fixed-size types.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Uint8 | Self::Int8 | Self::Bool => 1,
            Self::Uint16 | Self::Int16 | Self::Float16 | Self::BFloat16 => 2,
            Self::Float | Self::Int32 | Self::Uint32 => 4,
            Self::Double | Self::Int64 | Self::Uint64 => 8,
            Self::String | Self::Other(_) => return None,
        })
    }

    /// True for the float types whose weights we can edit.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            Self::Float | Self::Float16 | Self::BFloat16 | Self::Double
        )
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Float => "float32",
            Self::Uint8 => "uint8",
            Self::Int8 => "int8",
            Self::Uint16 => "uint16",
            Self::Int16 => "int16",
            Self::Int32 => "int32",
            Self::Int64 => "int64",
            Self::String => "string",
            Self::Bool => "bool",
            Self::Float16 => "float16",
            Self::Double => "float64",
            Self::Uint32 => "uint32",
            Self::Uint64 => "uint64",
            Self::BFloat16 => "bfloat16",
            Self::Other(v) => return write!(f, "type#{v}"),
        };
        f.write_str(name)
    }
}

/// Little-endian float16 bytes as f32 values (exact: every f16 is an f32),
/// whole slices through F16C where the CPU has it; a trailing odd byte is
/// ignored. The hot path of widening a float16 UNet's gigabytes.
pub fn f16_to_f32(bytes: &[u8]) -> Vec<f32> {
    use half::f16;
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    match bytemuck::try_cast_slice::<u8, u16>(bytes) {
        Ok(bits) if cfg!(target_endian = "little") => {
            let mut out = vec![0.0f32; bits.len()];
            bits.reinterpret_cast::<f16>()
                .convert_to_f32_slice(&mut out);
            out
        }
        // Unaligned (or big-endian): one value at a time.
        _ => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;

    #[test]
    fn f16_bytes_widen_exactly_aligned_or_not() {
        // 1.0, -2.0, 65504 (largest f16), smallest subnormal 2^-24, -0.0
        let bits: [u16; 5] = [0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000];
        let want: Vec<u32> = [1.0f32, -2.0, 65504.0, 2f32.powi(-24), -0.0]
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let aligned: Vec<u16> = bits.to_vec();
        let aligned: &[u8] = bytemuck::cast_slice(&aligned);
        // The same bytes one byte into a buffer: never 2-aligned with the first.
        let mut shifted = vec![0u8; aligned.len() + 1];
        shifted[1..].copy_from_slice(aligned);
        for bytes in [aligned, &shifted[1..]] {
            let got: Vec<u32> = f16_to_f32(bytes).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want);
        }
    }
}
