//! A float16 model rewritten to compute in float32, for ONNX Runtime to
//! load from memory.
//!
//! SDXL's VAE overflows in float16: activations inside the decoder pass
//! 65504 and the image comes out black or NaN. diffusers decodes such a VAE
//! in float32 whatever its stored precision (`force_upcast` in its config);
//! an ONNX export converted to fp16 has lost that choice. Widening every
//! fp16 weight (exactly: each fp16 value is an f32 value), every fp16 type
//! and every cast to fp16 gives back the float32 computation on the same
//! weights, which is what diffusers runs.
//!
//! This decodes the model with our schema and encodes it again, which
//! drops what the schema does not know; models with such parts at the
//! model or graph level (functions, training info, sparse initializers,
//! quantization annotations) are refused rather than silently changed.

use bytes::Bytes;
use prost::Message;

use std::sync::atomic::{AtomicUsize, Ordering};

use super::proto::{
    AttributeProto, DATA_LOCATION_EXTERNAL, GraphProto, StringStringEntryProto, TensorProto,
    ValueInfoProto, type_proto,
};
use super::{Model, OnnxError, Storage, TensorInfo, f16_to_f32, wire};

/// `TensorProto.DataType` FLOAT16 and FLOAT.
const FP16: i32 = 10;
const FP32: i32 = 1;

/// `ModelProto` fields our schema decodes (ir_version … metadata_props).
const MODEL_FIELDS: [u64; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 14];
/// `GraphProto` fields our schema decodes.
const GRAPH_FIELDS: [u64; 8] = [1, 2, 5, 10, 11, 12, 13, 16];

/// Why a model could not be widened.
#[derive(Debug, thiserror::Error)]
pub enum UpcastError {
    /// Reading the model or a tensor failed.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The model has parts a decode-and-encode would drop.
    #[error("{path}: cannot rewrite it in float32: {why}")]
    Unsupported {
        /// The model file.
        path: std::path::PathBuf,
        /// What it has.
        why: String,
    },
}

/// Whether the model's first graph input is float16.
pub fn takes_fp16(model: &Model) -> bool {
    model
        .graph()
        .ok()
        .and_then(|g| g.input.first())
        .is_some_and(|i| elem_type(i) == Some(FP16))
}

/// The bytes of `model` with every float16 tensor, type and cast widened to
/// float32 (external weights read and inlined).
pub fn to_float32(model: &Model) -> Result<Vec<u8>, UpcastError> {
    check_rewritable(model)?;
    let mut proto = model.proto().clone();
    let graph = proto.graph.as_mut().ok_or_else(|| OnnxError::NoGraph {
        path: model.path().to_path_buf(),
    })?;
    widen_graph(model, graph)?;
    Ok(proto.encode_to_vec())
}

/// A float32 weight for ONNX Runtime to take from our memory
/// (`AddInitializer`) instead of reading it from the model.
pub struct Given {
    /// The initializer it stands for.
    pub name: String,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Its values, widened.
    pub values: Vec<f32>,
}

/// A float16 model widened to float32, its big weights kept out of the bytes.
pub struct Widened {
    /// The model: types, casts and small weights widened; each big float16
    /// weight retyped float32 but left pointing at float16 bytes in a file
    /// (its own external ones, or the model file for one stored inside it),
    /// whose length then disagrees with the type, so that ONNX Runtime fails
    /// loudly if it ever reads the file instead of taking the [`Given`] value
    /// (its "all" level would, for its NCHWc layouts, if the values came
    /// after optimizing: see `Runtime::open_bytes`).
    pub bytes: Vec<u8>,
    /// The big float16 weights, widened.
    pub given: Vec<Given>,
}

/// Smallest float16 weight stored inside the model that is handed over
/// rather than widened in its bytes: ONNX's own threshold for moving a
/// tensor to external data, so inline and external exports give the same
/// weights.
const GIVEN_INLINE_MIN: u64 = 1024;

/// [`to_float32`] for models whose weights would not fit in one protobuf
/// once widened (SDXL's float16 UNet holds 2.6 B weights, SD 1.5's
/// single-file one 0.9 B): every float16 weight of 1 KiB or more is widened
/// into memory on `threads` threads and handed over as a [`Given`] value, so
/// ONNX Runtime neither copies it nor folds casts of it at load.
pub fn to_float32_given(model: &Model, threads: usize) -> Result<Widened, UpcastError> {
    check_rewritable(model)?;
    let mut proto = model.proto().clone();
    let graph = proto.graph.as_mut().ok_or_else(|| OnnxError::NoGraph {
        path: model.path().to_path_buf(),
    })?;
    let own_file = model
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut handed = Vec::new();
    for t in &mut graph.initializer {
        if t.data_type != FP16 {
            continue;
        }
        let info = model.tensor_info(t)?;
        let length = StringStringEntryProto {
            key: "length".into(),
            value: info.nbytes.to_string(),
        };
        match info.storage {
            Storage::External { .. } => {
                // A location without a length would be read at the float32
                // size, silently: write the float16 one down.
                if !t.external_data.iter().any(|e| e.key == "length") {
                    t.external_data.push(length);
                }
            }
            Storage::Inline { .. } if info.nbytes >= GIVEN_INLINE_MIN => {
                let entry = |key: &str, value: String| StringStringEntryProto {
                    key: key.into(),
                    value,
                };
                t.raw_data = Bytes::new();
                t.data_location = DATA_LOCATION_EXTERNAL;
                t.external_data = vec![
                    entry("location", own_file.clone()),
                    entry("offset", "0".into()),
                    length,
                ];
            }
            // Small or typed: widened in the bytes below.
            _ => continue,
        }
        t.data_type = FP32;
        handed.push(info);
    }
    widen_graph(model, graph)?;
    let given = widen_in_memory(model, handed, threads)?;
    Ok(Widened {
        bytes: proto.encode_to_vec(),
        given,
    })
}

/// The float16 tensors `infos` widened, split across `threads` threads.
fn widen_in_memory(
    model: &Model,
    infos: Vec<TensorInfo>,
    threads: usize,
) -> Result<Vec<Given>, OnnxError> {
    let sources = infos
        .iter()
        .map(|i| model.tensor_bytes(i))
        .collect::<Result<Vec<_>, _>>()?;
    let next = AtomicUsize::new(0);
    // Each worker takes the next tensor until none is left.
    let mut values: Vec<(usize, Vec<f32>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(src) = sources.get(i) else {
                            return mine;
                        };
                        mine.push((i, f16_to_f32(src)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    values.sort_unstable_by_key(|&(i, _)| i);
    Ok(infos
        .into_iter()
        .zip(values)
        .map(|(info, (_, values))| Given {
            name: info.name,
            shape: info.shape,
            values,
        })
        .collect())
}

/// Refuses models with parts that a decode-and-encode with our schema
/// would drop.
fn check_rewritable(model: &Model) -> Result<(), UpcastError> {
    let unsupported = |why: String| UpcastError::Unsupported {
        path: model.path().to_path_buf(),
        why,
    };
    let bytes = model.file_bytes();
    let fields = wire::fields(bytes).map_err(&unsupported)?;
    if let Some(f) = fields.iter().find(|f| !MODEL_FIELDS.contains(&f.number)) {
        return Err(unsupported(format!(
            "model field {} (functions or training info)",
            f.number
        )));
    }
    for graph in fields.iter().filter(|f| f.number == 7) {
        let inner = wire::fields(&bytes[graph.payload.clone()]).map_err(&unsupported)?;
        if let Some(f) = inner.iter().find(|f| !GRAPH_FIELDS.contains(&f.number)) {
            return Err(unsupported(format!(
                "graph field {} (sparse initializers or quantization annotations)",
                f.number
            )));
        }
    }
    Ok(())
}

fn widen_graph(model: &Model, graph: &mut GraphProto) -> Result<(), OnnxError> {
    for t in &mut graph.initializer {
        widen_tensor(model, t)?;
    }
    for v in graph
        .input
        .iter_mut()
        .chain(&mut graph.output)
        .chain(&mut graph.value_info)
    {
        widen_value(v);
    }
    for node in &mut graph.node {
        for a in &mut node.attribute {
            widen_attribute(model, node.op_type.as_str(), a)?;
        }
    }
    Ok(())
}

fn widen_attribute(model: &Model, op: &str, a: &mut AttributeProto) -> Result<(), OnnxError> {
    let fp16 = i64::from(FP16);
    // Cast's target and the output type of generators (RandomNormal, EyeLike, …)
    if (op == "Cast" && a.name == "to" || a.name == "dtype") && a.i == fp16 {
        a.i = i64::from(FP32);
    }
    if let Some(t) = &mut a.t {
        widen_tensor(model, t)?;
    }
    for t in &mut a.tensors {
        widen_tensor(model, t)?;
    }
    if let Some(g) = &mut a.g {
        widen_graph(model, g)?;
    }
    for g in &mut a.graphs {
        widen_graph(model, g)?;
    }
    Ok(())
}

fn widen_value(v: &mut ValueInfoProto) {
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut())
        && t.elem_type == FP16
    {
        t.elem_type = FP32;
    }
}

fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => Some(t.elem_type),
    }
}

/// An fp16 tensor as the same values in f32 `raw_data`, wherever they were
/// stored (raw, external, or one per `int32_data` entry).
fn widen_tensor(model: &Model, t: &mut TensorProto) -> Result<(), OnnxError> {
    if t.data_type != FP16 {
        return Ok(());
    }
    let values: Vec<f32> = if !t.int32_data.is_empty() {
        t.int32_data
            .iter()
            .map(|&v| half::f16::from_bits(v as u16).to_f32())
            .collect()
    } else {
        f16_to_f32(&model.tensor_bytes(&model.tensor_info(t)?)?)
    };
    let wide: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    t.data_type = FP32;
    t.int32_data.clear();
    t.external_data.clear();
    t.data_location = 0;
    t.raw_data = Bytes::from(wide);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fp16_unet_widens_to_a_model_with_no_fp16_left() {
        let path = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sd-tiny/fp16/unet/model.onnx"
        ));
        let model = Model::open(path).unwrap();
        assert!(takes_fp16(&model));
        let wide = Model::from_bytes(path, Bytes::from(to_float32(&model).unwrap())).unwrap();
        assert!(!takes_fp16(&wide));
        let g = wide.graph().unwrap();
        assert!(g.initializer.iter().all(|t| t.data_type != FP16));
        assert_eq!(
            g.initializer.len(),
            model.graph().unwrap().initializer.len()
        );
        // every value kept exactly
        let (a, b) = (&model.graph().unwrap().initializer, &g.initializer);
        for (x, y) in a.iter().zip(b).filter(|(x, _)| x.data_type == FP16) {
            let xs = model.tensor_bytes(&model.tensor_info(x).unwrap()).unwrap();
            let ys = wide.tensor_bytes(&wide.tensor_info(y).unwrap()).unwrap();
            for (h, f) in xs.chunks_exact(2).zip(ys.chunks_exact(4)) {
                let h = half::f16::from_bits(u16::from_le_bytes([h[0], h[1]])).to_f32();
                assert_eq!(
                    h.to_bits(),
                    f32::from_le_bytes(f.try_into().unwrap()).to_bits()
                );
            }
        }
    }
}
