//! Splitting a UNet at its cross-attention K/V projections.
//!
//! The text embeddings are the same at every denoising step, so their K and V
//! projections are too: 32 matrix products per UNet call in SD 1.x, recomputed
//! for nothing. Split off into a model of their own, they run once per prompt
//! and their products are handed to the rest of the UNet as inputs, bound
//! once. Same operations, same order: the predictions are bit-identical.
//!
//! Both halves are written from the original file's bytes (see `onnx::wire`):
//! nodes, initializers and everything our schema does not decode are copied,
//! not re-encoded, and external-data references keep pointing at the UNet's
//! weight file.

use std::collections::HashSet;

use prost::Message;

use super::cross_attention::{self, LocateError, TEXT_INPUT};
use super::proto::{TypeProto, ValueInfoProto, type_proto};
use super::{Model, OnnxError, wire};

/// Models bigger than this keep their weights inline (fp16 single-file
/// exports); rewriting them would put a second copy in memory for a saving of
/// ~1 % of a step, so they are not split.
pub const MAX_SPLIT_FILE: usize = 256 << 20;

/// The two halves of a split UNet, as ONNX model bytes.
pub struct Split {
    /// `encoder_hidden_states` → the K/V projection products.
    pub projections: Vec<u8>,
    /// The UNet with those products as extra graph inputs.
    pub unet: Vec<u8>,
    /// The products' names: the outputs of one, the extra inputs of the other.
    pub products: Vec<String>,
}

/// Why a UNet was not split (it then runs whole, as exported).
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The projections could not be found.
    #[error(transparent)]
    Locate(#[from] LocateError),
    /// The model could not be read.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The graph is not one this rewrite is sure about.
    #[error("not split: {0}")]
    Unsupported(String),
}

/// Splits `model` (a UNet) at its cross-attention K/V projections.
pub fn split_text_projections(model: &Model) -> Result<Split, SplitError> {
    let bytes = model.file_bytes();
    if bytes.len() > MAX_SPLIT_FILE {
        return Err(SplitError::Unsupported(format!(
            "the model file holds its weights ({} MiB)",
            bytes.len() >> 20
        )));
    }
    let cut = Cut::of(model)?;
    let (model_fields, graph_bytes) = model_and_graph(bytes).map_err(malformed)?;
    let graph_fields = wire::fields(graph_bytes).map_err(malformed)?;
    let rest = cut.rest_of_unet(graph_bytes, &graph_fields, model.graph()?.node.len())?;
    let projections = cut.projections_graph(graph_bytes, &graph_fields, &rest);

    // Both models keep the original's header fields (IR version, opsets,
    // producer, metadata); only the graph differs.
    let with_graph = |g: &[u8], keep_metadata: bool| {
        let mut out = Vec::with_capacity(g.len() + 1024);
        for f in &model_fields {
            match f.number {
                7 => wire::put_len(&mut out, 7, g),
                14 | 25 | 20 if !keep_metadata => {}
                _ => out.extend_from_slice(&bytes[f.whole.clone()]),
            }
        }
        out
    };
    Ok(Split {
        projections: with_graph(&projections, false),
        unet: with_graph(&rest.graph, true),
        products: cut.products,
    })
}

fn malformed(why: String) -> SplitError {
    SplitError::Unsupported(format!("malformed model: {why}"))
}

/// Where the graph is cut, found on the decoded graph.
struct Cut {
    /// Indices of the K/V projection nodes, which move.
    moved: Vec<usize>,
    /// The `Cast`/`Identity` nodes between the text input and the
    /// projections: copied into the projections model, kept in the UNet.
    chain: Vec<usize>,
    /// The products' names.
    products: Vec<String>,
    /// Each product as a graph input/output declaration (`ValueInfoProto`
    /// bytes), with its weight's element type and no shape.
    declared: Vec<Vec<u8>>,
    /// The weights the moved nodes read.
    weights: HashSet<String>,
    /// Names the nodes that stay read: their weights stay in the UNet too.
    still_read: HashSet<String>,
}

/// The UNet's half as written, and what the projections model takes from it.
struct Rest<'g> {
    graph: Vec<u8>,
    /// The text input's declaration.
    text_input: &'g [u8],
    /// The moved weights' initializers.
    initializers: Vec<&'g [u8]>,
}

impl Cut {
    fn of(model: &Model) -> Result<Self, SplitError> {
        let graph = model.graph()?;
        if graph
            .node
            .iter()
            .flat_map(|n| &n.attribute)
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            return Err(SplitError::Unsupported("the graph has subgraphs".into()));
        }
        let moved: Vec<usize> = cross_attention::locate(model)?
            .iter()
            .map(|p| p.node_index)
            .collect();
        let mut sources = vec![TEXT_INPUT.to_string()];
        let mut chain = Vec::new();
        for (i, node) in graph.node.iter().enumerate() {
            if matches!(node.op_type.as_str(), "Cast" | "Identity")
                && node.input.first().is_some_and(|x| sources.contains(x))
            {
                sources.extend(node.output.iter().cloned());
                chain.push(i);
            }
        }
        let mut cut = Self {
            chain,
            products: Vec::new(),
            declared: Vec::new(),
            weights: HashSet::new(),
            still_read: graph
                .node
                .iter()
                .enumerate()
                .filter(|(i, _)| !moved.contains(i))
                .flat_map(|(_, n)| n.input.iter().cloned())
                .collect(),
            moved,
        };
        for &i in &cut.moved {
            let node = &graph.node[i];
            let [product] = node.output.as_slice() else {
                return Err(SplitError::Unsupported(format!(
                    "projection node {:?} has {} outputs",
                    node.name,
                    node.output.len()
                )));
            };
            let elem_type = node
                .input
                .get(1)
                .and_then(|w| graph.initializer.iter().find(|t| &t.name == w))
                .map(|t| t.data_type)
                .ok_or_else(|| SplitError::Unsupported(format!("no weight for {product:?}")))?;
            cut.declared.push(declaration(product, elem_type));
            cut.products.push(product.clone());
            cut.weights.extend(node.input.iter().skip(1).cloned());
        }
        Ok(cut)
    }

    /// The UNet: every graph field as it was, minus the moved nodes and the
    /// weights nobody else reads, plus the products as inputs.
    fn rest_of_unet<'g>(
        &self,
        graph_bytes: &'g [u8],
        graph_fields: &[wire::Field],
        node_count: usize,
    ) -> Result<Rest<'g>, SplitError> {
        let field = |f: &wire::Field| &graph_bytes[f.payload.clone()];
        let mut graph = Vec::with_capacity(graph_bytes.len());
        let mut node_index = 0;
        let mut text_input = None;
        let mut initializers = Vec::new();
        for f in graph_fields {
            let keep = match (f.number, f.wire) {
                (1, 2) => {
                    node_index += 1;
                    !self.moved.contains(&(node_index - 1))
                }
                (5, 2) => {
                    let name = wire::tensor_name(field(f)).map_err(malformed)?;
                    let moves = self.weights.contains(&name);
                    if moves {
                        initializers.push(field(f));
                    }
                    !moves || self.still_read.contains(&name)
                }
                (11, 2) => {
                    let input =
                        ValueInfoProto::decode(field(f)).map_err(|e| malformed(e.to_string()))?;
                    if input.name == TEXT_INPUT {
                        text_input = Some(field(f));
                    }
                    true
                }
                _ => true,
            };
            if keep {
                graph.extend_from_slice(&graph_bytes[f.whole.clone()]);
            }
        }
        if node_index != node_count {
            return Err(malformed(
                "node count differs from the decoded graph".into(),
            ));
        }
        for input in &self.declared {
            wire::put_len(&mut graph, 11, input);
        }
        Ok(Rest {
            graph,
            text_input: text_input.ok_or_else(|| malformed("no text input".into()))?,
            initializers,
        })
    }

    /// The projections model's graph: the text input, its casts, the moved
    /// nodes and their weights; the products are its outputs.
    fn projections_graph(
        &self,
        graph_bytes: &[u8],
        graph_fields: &[wire::Field],
        rest: &Rest<'_>,
    ) -> Vec<u8> {
        let nodes: Vec<&[u8]> = graph_fields
            .iter()
            .filter(|f| f.number == 1 && f.wire == 2)
            .map(|f| &graph_bytes[f.payload.clone()])
            .collect();
        let mut graph = Vec::new();
        for &i in self.chain.iter().chain(&self.moved) {
            wire::put_len(&mut graph, 1, nodes[i]);
        }
        wire::put_len(&mut graph, 2, b"text_projections");
        for t in &rest.initializers {
            wire::put_len(&mut graph, 5, t);
        }
        wire::put_len(&mut graph, 11, rest.text_input);
        for output in &self.declared {
            wire::put_len(&mut graph, 12, output);
        }
        graph
    }
}

/// A tensor `name` of element type `elem_type`, shape unknown, as
/// `ValueInfoProto` bytes.
fn declaration(name: &str, elem_type: i32) -> Vec<u8> {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: None,
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
    .encode_to_vec()
}

/// The model's top-level fields and the payload of its (single) graph field.
fn model_and_graph(bytes: &[u8]) -> Result<(Vec<wire::Field>, &[u8]), String> {
    let fields = wire::fields(bytes)?;
    let mut graphs = fields.iter().filter(|f| f.number == 7 && f.wire == 2);
    let graph = graphs.next().ok_or("no graph")?;
    if graphs.next().is_some() {
        return Err("the graph field is split in parts".into());
    }
    let payload = graph.payload.clone();
    Ok((fields, &bytes[payload]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_halves_partition_the_projections() {
        let path = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sd-tiny/diffusers-onnx/unet/model.onnx"
        ));
        let model = Model::open(path).unwrap();
        let original = model.graph().unwrap().clone();
        let split = split_text_projections(&model).unwrap();
        let graph_of = |b: &[u8]| -> super::super::proto::GraphProto {
            super::super::proto::ModelProto::decode(b)
                .unwrap()
                .graph
                .unwrap()
        };
        let pre = graph_of(&split.projections);
        let unet = graph_of(&split.unet);
        let moved = pre
            .node
            .iter()
            .filter(|n| n.op_type != "Cast" && n.op_type != "Identity")
            .count();
        assert_eq!(moved, split.products.len());
        assert_eq!(unet.node.len() + moved, original.node.len());
        let outputs: Vec<&str> = pre.output.iter().map(|o| o.name.as_str()).collect();
        let inputs: Vec<&str> = unet.input.iter().map(|i| i.name.as_str()).collect();
        for p in &split.products {
            assert!(outputs.contains(&p.as_str()) && inputs.contains(&p.as_str()));
            assert!(!unet.node.iter().any(|n| n.output.contains(p)));
        }
    }
}
