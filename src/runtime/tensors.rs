//! Moving f32 arrays in and out of sessions whatever float type the model
//! declares: fp16 exports take and return fp16, everything else f32.

use ndarray::{ArrayD, ArrayViewD};
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

/// An input or output's element type and declared dims (-1 where dynamic).
pub fn port(session: &Session, name: &str, input: bool) -> Option<(TensorElementType, Vec<i64>)> {
    let ports = if input {
        session.inputs()
    } else {
        session.outputs()
    };
    let p = ports.iter().find(|p| p.name() == name)?;
    match p.dtype() {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.to_vec())),
        _ => None,
    }
}

/// An f32 array as a tensor of element type `ty` (f32, f16 or f64).
pub fn float_value(ty: TensorElementType, a: ArrayViewD<f32>) -> Result<DynValue, ort::Error> {
    Ok(match ty {
        TensorElementType::Float16 => Tensor::from_array(a.mapv(half::f16::from_f32))?.into_dyn(),
        TensorElementType::Float64 => Tensor::from_array(a.mapv(f64::from))?.into_dyn(),
        _ => Tensor::from_array(a.to_owned())?.into_dyn(),
    })
}

/// A float output (f32, f16 or f64) as f32.
pub fn float_array(v: &ort::value::DynValue) -> Result<ArrayD<f32>, ort::Error> {
    if let Ok(a) = v.try_extract_array::<f32>() {
        return Ok(a.to_owned());
    }
    if let Ok(a) = v.try_extract_array::<half::f16>() {
        return Ok(a.mapv(half::f16::to_f32));
    }
    Ok(v.try_extract_array::<f64>()?.mapv(|x| x as f32))
}
