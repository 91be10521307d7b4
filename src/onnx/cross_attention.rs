//! Finding the cross-attention K/V projection weights of a UNet by graph
//! structure.
//!
//! Exporters give these weights meaningless names (`onnx::MatMul_123`,
//! `val_227`, `MatMul_KV_3_weight`), so names are never trusted. What every
//! export shares: the text embeddings enter as the graph input
//! `encoder_hidden_states`, possibly through a `Cast` (fp16 models with fp32
//! inputs kept), and are consumed by one `MatMul` per K and V projection whose
//! other operand is an initializer. Whether a projection is K or V is read off
//! where its product flows: K ends up in the second operand of the Q·Kᵀ
//! `MatMul` that feeds the `Softmax`; V in the second operand of the
//! attention·V `MatMul` that the `Softmax` feeds. ONNX Runtime's optimizer packs
//! K and V into one weight that feeds `com.microsoft.MultiHeadAttention`.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Serialize;

use super::proto::{GraphProto, NodeProto};
use super::{Model, OnnxError, TensorInfo};

/// The graph input that carries the text embeddings in SD UNets.
pub const TEXT_INPUT: &str = "encoder_hidden_states";

/// What a projection weight computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `to_k`.
    Key,
    /// `to_v`.
    Value,
    /// K and V packed in one weight `[d, heads·2·head_dim]`, interleaved per
    /// head: viewed as `[d, heads, 2, head_dim]`, `[.., 0, ..]` is K and
    /// `[.., 1, ..]` is V.
    PackedKeyValue {
        /// Number of attention heads.
        heads: usize,
    },
}

/// How the weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `[d, out]`: Wᵀ, the `MatMul` form every exporter writes.
    Transposed,
    /// `[out, d]`: W itself (`Gemm` with `transB = 1`).
    Direct,
}

/// One cross-attention projection weight found in the graph.
#[derive(Clone, Debug, Serialize)]
pub struct Projection {
    /// The initializer holding the weight.
    pub initializer: String,
    /// The node that applies it.
    pub node: String,
    /// That node's position in the graph's node list.
    #[serde(skip)]
    pub node_index: usize,
    /// K, V, or both packed.
    pub role: Role,
    /// Storage orientation.
    pub layout: Layout,
    /// The diffusers module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`)
    /// when the exporter kept it in the node name or metadata.
    pub module: Option<String>,
    /// Element type, shape and storage of the weight.
    #[serde(skip)]
    pub tensor: TensorInfo,
}

impl Projection {
    /// The text-embedding width `d` this weight expects.
    pub fn width(&self) -> usize {
        match self.layout {
            Layout::Transposed => self.tensor.shape[0],
            Layout::Direct => self.tensor.shape[1],
        }
    }
}

/// Why the cross-attention weights could not be found.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// The model could not be read.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// No `encoder_hidden_states` input.
    #[error(
        "the graph has no input named {TEXT_INPUT:?}: not a Stable Diffusion UNet (inputs: {inputs})"
    )]
    NoTextInput {
        /// The inputs it does have.
        inputs: String,
    },
    /// The text input feeds no projection with a weight initializer.
    #[error("{TEXT_INPUT:?} feeds no MatMul with a weight initializer: no cross-attention found")]
    NoCrossAttention,
    /// A projection whose product flows somewhere we do not recognise.
    #[error("cannot tell whether {initializer:?} (node {node:?}) is a key or a value projection")]
    UnknownRole {
        /// The weight.
        initializer: String,
        /// Its node.
        node: String,
    },
    /// A projection weight that is not a float matrix of width `d`.
    #[error("cross-attention weight {initializer:?} has {what}")]
    BadWeight {
        /// The weight.
        initializer: String,
        /// What is wrong with it.
        what: String,
    },
}

/// Ops that move or reshape a tensor without mixing it with another
/// activation; we follow products through them.
const PASS_THROUGH: &[&str] = &[
    "Reshape",
    "Transpose",
    "Cast",
    "Identity",
    "Unsqueeze",
    "Squeeze",
    "Mul",
    "Div",
    "Expand",
    "Flatten",
    "Contiguous",
];

/// Finds every cross-attention K/V projection of the UNet in `model`.
pub fn locate(model: &Model) -> Result<Vec<Projection>, LocateError> {
    let graph = model.graph()?;
    if !graph.input.iter().any(|i| i.name == TEXT_INPUT) {
        let inputs = graph
            .input
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(LocateError::NoTextInput { inputs });
    }
    let index = GraphIndex::new(graph);
    let initializers: HashMap<&str, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();

    // The text embeddings and their casts.
    let mut sources = vec![TEXT_INPUT.to_string()];
    let mut i = 0;
    while i < sources.len() {
        for &n in index.consumers(&sources[i]) {
            let node = &graph.node[n];
            if matches!(node.op_type.as_str(), "Cast" | "Identity") {
                sources.extend(node.output.iter().cloned());
            }
        }
        i += 1;
    }

    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for src in &sources {
        for &n in index.consumers(src) {
            let node = &graph.node[n];
            let Some((weight, layout)) = projection_weight(node, src, &initializers) else {
                continue;
            };
            if !seen.insert(weight.to_string()) {
                continue;
            }
            let tensor = model.tensor_info(&graph.initializer[initializers[weight]])?;
            let role = role_of(graph, &index, n).ok_or_else(|| LocateError::UnknownRole {
                initializer: weight.to_string(),
                node: node.name.clone(),
            })?;
            check_weight(&tensor)?;
            found.push(Projection {
                initializer: weight.to_string(),
                node: node.name.clone(),
                node_index: n,
                role,
                layout,
                module: module_path(node),
                tensor,
            });
        }
    }
    if found.is_empty() {
        return Err(LocateError::NoCrossAttention);
    }
    Ok(found)
}

/// The initializer operand of a `MatMul`/`Gemm` applied to `src`, if any.
fn projection_weight<'g>(
    node: &'g NodeProto,
    src: &str,
    initializers: &HashMap<&str, usize>,
) -> Option<(&'g str, Layout)> {
    if !node.domain.is_empty() && node.domain != "ai.onnx" {
        return None;
    }
    let [a, b, ..] = node.input.as_slice() else {
        return None;
    };
    if a != src || !initializers.contains_key(b.as_str()) {
        return None;
    }
    match node.op_type.as_str() {
        "MatMul" => Some((b, Layout::Transposed)),
        "Gemm" => {
            let attr = |name: &str| {
                node.attribute
                    .iter()
                    .find(|a| a.name == name)
                    .map_or(0, |a| a.i)
            };
            (attr("transA") == 0).then_some((
                b,
                if attr("transB") == 1 {
                    Layout::Direct
                } else {
                    Layout::Transposed
                },
            ))
        }
        _ => None,
    }
}

/// Follows the projection's product forward to the attention that uses it.
fn role_of(graph: &GraphProto, index: &GraphIndex, start: usize) -> Option<Role> {
    let mut queue: VecDeque<(usize, &str)> = graph.node[start]
        .output
        .iter()
        .map(|o| (start, o.as_str()))
        .collect();
    let mut visited = HashSet::new();
    while let Some((_, value)) = queue.pop_front() {
        if !visited.insert(value) {
            continue;
        }
        for &c in index.consumers(value) {
            let node = &graph.node[c];
            let slot = node.input.iter().position(|i| i == value)?;
            match node.op_type.as_str() {
                "MultiHeadAttention" | "Attention"
                    if node.domain == "com.microsoft" || node.domain.is_empty() =>
                {
                    let value_given = node.input.get(2).is_some_and(|v| !v.is_empty());
                    return match slot {
                        1 if !value_given && node.domain == "com.microsoft" => {
                            let heads = node.attribute.iter().find(|a| a.name == "num_heads")?.i;
                            Some(Role::PackedKeyValue {
                                heads: usize::try_from(heads).ok().filter(|&h| h > 0)?,
                            })
                        }
                        1 => Some(Role::Key),
                        2 => Some(Role::Value),
                        _ => None,
                    };
                }
                "MatMul" if slot == 1 => {
                    if index.reaches(graph, c, "Softmax", Direction::Forward) {
                        return Some(Role::Key);
                    }
                    if index.reaches(graph, c, "Softmax", Direction::Backward) {
                        return Some(Role::Value);
                    }
                }
                op if PASS_THROUGH.contains(&op) && slot == 0 => {
                    queue.extend(node.output.iter().map(|o| (c, o.as_str())));
                }
                _ => {}
            }
        }
    }
    None
}

fn check_weight(t: &TensorInfo) -> Result<(), LocateError> {
    let bad = |what: String| LocateError::BadWeight {
        initializer: t.name.clone(),
        what,
    };
    if !t.dtype.is_float() {
        return Err(bad(format!("element type {}", t.dtype)));
    }
    if t.shape.len() != 2 {
        return Err(bad(format!("shape {:?}, not a matrix", t.shape)));
    }
    Ok(())
}

/// The diffusers module path, from a TorchScript node name
/// (`/down_blocks.0/attentions.0/transformer_blocks.0/attn2/to_k/MatMul`) or
/// the dynamo exporter's node metadata.
fn module_path(node: &NodeProto) -> Option<String> {
    let from_name = |s: &str| {
        let parts: Vec<&str> = s.trim_start_matches('/').split('/').collect();
        let (_, modules) = parts.split_last()?;
        let joined = modules.join(".");
        (joined.contains("attn2") && (joined.ends_with("to_k") || joined.ends_with("to_v")))
            .then_some(joined)
    };
    if let Some(p) = from_name(&node.name) {
        return Some(p);
    }
    node.metadata_props
        .iter()
        .find_map(|e| match e.key.as_str() {
            "pkg.torch.onnx.name_scopes" => {
                // A list of scopes, e.g. ['', 'down_blocks.0', 'down_blocks.0.attentions.0', ..., '...attn2.to_k'].
                let scopes: Vec<String> =
                    serde_json::from_str(&e.value.replace('\'', "\"")).ok()?;
                scopes
                    .into_iter()
                    .rev()
                    .find(|s| s.contains("attn2") && (s.ends_with("to_k") || s.ends_with("to_v")))
            }
            _ => None,
        })
}

/// Who produces and who consumes each value.
struct GraphIndex<'g> {
    consumers: HashMap<&'g str, Vec<usize>>,
    producer: HashMap<&'g str, usize>,
}

#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Backward,
}

impl<'g> GraphIndex<'g> {
    fn new(graph: &'g GraphProto) -> Self {
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut producer = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for input in &n.input {
                consumers.entry(input.as_str()).or_default().push(i);
            }
            for output in &n.output {
                producer.insert(output.as_str(), i);
            }
        }
        Self {
            consumers,
            producer,
        }
    }

    fn consumers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map_or(&[], Vec::as_slice)
    }

    /// Whether an `op` lies within a few elementwise steps of node `from`
    /// (forward: downstream of its output; backward: upstream of its first input).
    fn reaches(&self, graph: &GraphProto, from: usize, op: &str, dir: Direction) -> bool {
        const HOPS: usize = 6;
        let mut frontier = vec![from];
        for _ in 0..HOPS {
            let mut next = Vec::new();
            for n in frontier {
                let node = &graph.node[n];
                let neighbours: Vec<usize> = match dir {
                    Direction::Forward => node
                        .output
                        .iter()
                        .flat_map(|o| self.consumers(o).iter().copied())
                        .collect(),
                    Direction::Backward => node
                        .input
                        .first()
                        .and_then(|i| self.producer.get(i.as_str()))
                        .copied()
                        .into_iter()
                        .collect(),
                };
                for m in neighbours {
                    let t = graph.node[m].op_type.as_str();
                    if t == op {
                        return true;
                    }
                    if matches!(
                        t,
                        "Mul" | "Div" | "Add" | "Cast" | "Where" | "Reshape" | "Transpose"
                    ) {
                        next.push(m);
                    }
                }
            }
            frontier = next;
        }
        false
    }
}
