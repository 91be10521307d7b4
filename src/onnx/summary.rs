//! What `time-onnx inspect` reports about a model: format versions, graph
//! inputs and outputs, and where the weights are stored.

use std::collections::BTreeMap;

use serde::Serialize;

use super::cross_attention::{self, LocateError, Role};
use super::proto::{ValueInfoProto, tensor_shape_proto::dimension, type_proto};
use super::{DataType, Model, Storage};

/// A model's description, printable or serialisable to JSON.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The model file.
    pub path: String,
    /// `ModelProto.ir_version`.
    pub ir_version: i64,
    /// Operator sets imported, `(domain, version)`; "" is the default ONNX domain.
    pub opsets: Vec<(String, i64)>,
    /// Who wrote the file, e.g. "pytorch 2.5".
    pub producer: String,
    /// Graph inputs.
    pub inputs: Vec<Port>,
    /// Graph outputs.
    pub outputs: Vec<Port>,
    /// Number of graph nodes.
    pub nodes: usize,
    /// Where the initializers are stored.
    pub storage: StorageSummary,
    /// `metadata_props` entries, in file order.
    pub metadata: Vec<(String, String)>,
    /// The UNet's cross-attention K/V weights, when the graph has the text input.
    pub cross_attention: Option<Vec<CrossAttentionWeight>>,
}

/// One K/V projection weight, as reported.
#[derive(Debug, Serialize)]
pub struct CrossAttentionWeight {
    /// Initializer name.
    pub initializer: String,
    /// "key", "value" or "packed_key_value".
    pub role: Role,
    /// Element type.
    pub dtype: String,
    /// Stored shape.
    pub shape: Vec<usize>,
    /// Diffusers module path, when known.
    pub module: Option<String>,
}

/// A graph input or output.
#[derive(Debug, Serialize)]
pub struct Port {
    /// Name.
    pub name: String,
    /// Element type, e.g. "float32"; "?" when not a tensor.
    pub dtype: String,
    /// Dimensions: numbers, symbolic names, or "?".
    pub shape: Vec<String>,
}

/// Initializer storage, totalled.
#[derive(Debug, Default, Serialize)]
pub struct StorageSummary {
    /// Number of initializers.
    pub initializers: usize,
    /// Bytes stored inline in the model file.
    pub inline_bytes: u64,
    /// Bytes per external data file, keyed by `location`.
    pub external: BTreeMap<String, ExternalFile>,
    /// Initializers in typed fields (`float_data` etc.).
    pub typed: usize,
}

/// One external data file.
#[derive(Debug, Default, Serialize)]
pub struct ExternalFile {
    /// Tensors stored there.
    pub tensors: usize,
    /// Bytes referenced.
    pub bytes: u64,
}

impl Summary {
    /// Describes `model`. Validates every initializer header on the way.
    pub fn of(model: &Model) -> Result<Self, LocateError> {
        let proto = model.proto();
        let graph = model.graph()?;
        let mut storage = StorageSummary {
            initializers: graph.initializer.len(),
            ..Default::default()
        };
        for t in &graph.initializer {
            let info = model.tensor_info(t)?;
            match info.storage {
                Storage::Inline { .. } => storage.inline_bytes += info.nbytes,
                Storage::External { location, .. } => {
                    let e = storage.external.entry(location).or_default();
                    e.tensors += 1;
                    e.bytes += info.nbytes;
                }
                Storage::Typed => storage.typed += 1,
            }
        }
        let cross_attention = match cross_attention::locate(model) {
            Ok(found) => Some(
                found
                    .into_iter()
                    .map(|p| CrossAttentionWeight {
                        initializer: p.initializer,
                        role: p.role,
                        dtype: p.tensor.dtype.to_string(),
                        shape: p.tensor.shape,
                        module: p.module,
                    })
                    .collect(),
            ),
            Err(LocateError::NoTextInput { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(Self {
            cross_attention,
            path: model.path().display().to_string(),
            ir_version: proto.ir_version,
            opsets: proto
                .opset_import
                .iter()
                .map(|o| (o.domain.clone(), o.version))
                .collect(),
            producer: format!("{} {}", proto.producer_name, proto.producer_version)
                .trim()
                .to_string(),
            inputs: graph.input.iter().map(Port::of).collect(),
            outputs: graph.output.iter().map(Port::of).collect(),
            nodes: graph.node.len(),
            storage,
            metadata: proto
                .metadata_props
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect(),
        })
    }
}

impl Port {
    fn of(v: &ValueInfoProto) -> Self {
        let tensor = v
            .r#type
            .as_ref()
            .and_then(|t| t.value.as_ref().map(|type_proto::Value::TensorType(t)| t));
        let dtype = tensor.map_or("?".into(), |t| DataType::from_i32(t.elem_type).to_string());
        let shape = tensor
            .and_then(|t| t.shape.as_ref())
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(dimension::Value::DimValue(v)) => v.to_string(),
                        Some(dimension::Value::DimParam(p)) => p.clone(),
                        None => "?".into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            name: v.name.clone(),
            dtype,
            shape,
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.path)?;
        let opsets: Vec<String> = self
            .opsets
            .iter()
            .map(|(d, v)| format!("{}:{v}", if d.is_empty() { "ai.onnx" } else { d }))
            .collect();
        writeln!(
            f,
            "  ir version {}, opsets {}",
            self.ir_version,
            opsets.join(" ")
        )?;
        if !self.producer.is_empty() {
            writeln!(f, "  producer {}", self.producer)?;
        }
        writeln!(f, "  {} nodes", self.nodes)?;
        for (label, ports) in [("input ", &self.inputs), ("output", &self.outputs)] {
            for p in ports {
                writeln!(
                    f,
                    "  {label} {} {}[{}]",
                    p.name,
                    p.dtype,
                    p.shape.join(", ")
                )?;
            }
        }
        let s = &self.storage;
        writeln!(
            f,
            "  {} initializers: {} inline",
            s.initializers,
            human_bytes(s.inline_bytes)
        )?;
        for (loc, e) in &s.external {
            writeln!(
                f,
                "    external {loc}: {} tensors, {}",
                e.tensors,
                human_bytes(e.bytes)
            )?;
        }
        if s.typed > 0 {
            writeln!(f, "    {} in typed fields", s.typed)?;
        }
        if let Some(ca) = &self.cross_attention {
            writeln!(f, "  cross-attention: {} K/V weights", ca.len())?;
            for w in ca {
                let role = match w.role {
                    Role::Key => "K".to_string(),
                    Role::Value => "V".to_string(),
                    Role::PackedKeyValue { heads } => format!("KV packed, {heads} heads"),
                };
                let module = w.module.as_deref().unwrap_or("-");
                writeln!(
                    f,
                    "    {role:<3} {} {:?} {} {module}",
                    w.dtype, w.shape, w.initializer
                )?;
            }
        }
        for (k, v) in &self.metadata {
            writeln!(f, "  metadata {k} = {v}")?;
        }
        Ok(())
    }
}

/// "3.4 GB" style sizes (decimal units, as `ls -h --si`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}
