//! Diffusers module paths of the cross-attention layers, derived from the
//! UNet's `config.json`, for exports that kept no names (ONNX Runtime's
//! optimizer renames everything `MatMul_KV_i`).
//!
//! The order is the UNet's forward order, which is also the exported graph's
//! order: down blocks, the mid block, up blocks; within a block, attention j
//! after resnet j; within an attention, its transformer blocks.

use serde::Deserialize;

use crate::onnx::cross_attention::{Projection, Role};
use serde_json::Value;

/// The fields of a `UNet2DConditionModel` config that fix the layer layout.
#[derive(Debug, Deserialize)]
pub struct UnetLayout {
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default = "mid_default")]
    mid_block_type: Option<String>,
    #[serde(default = "two")]
    layers_per_block: Value,
    #[serde(default = "one")]
    transformer_layers_per_block: Value,
    #[serde(default)]
    reverse_transformer_layers_per_block: Option<Vec<Value>>,
}

fn mid_default() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn two() -> Value {
    Value::from(2)
}
fn one() -> Value {
    Value::from(1)
}

/// `n` or `[n0, n1, ...]` per block.
fn per_block(v: &Value, blocks: usize) -> Option<Vec<usize>> {
    match v {
        Value::Number(n) => Some(vec![usize::try_from(n.as_u64()?).ok()?; blocks]),
        Value::Array(a) if a.len() == blocks => a
            .iter()
            .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
            .collect(),
        _ => None,
    }
}

impl UnetLayout {
    /// Parses `config.json`; `None` when it is not a UNet config we understand.
    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// The `attn2` module paths in forward order, e.g.
    /// `down_blocks.0.attentions.1.transformer_blocks.0.attn2`.
    pub fn cross_attention_modules(&self) -> Option<Vec<String>> {
        let cross = |t: &str| t.contains("CrossAttn");
        let nd = self.down_block_types.len();
        let layers = per_block(&self.layers_per_block, nd)?;
        let depth = per_block(&self.transformer_layers_per_block, nd)?;
        let mut out = Vec::new();
        let mut attn = |block: String, attentions: usize, depth: usize| {
            for j in 0..attentions {
                for k in 0..depth {
                    out.push(format!(
                        "{block}.attentions.{j}.transformer_blocks.{k}.attn2"
                    ));
                }
            }
        };
        for (i, t) in self.down_block_types.iter().enumerate() {
            if cross(t) {
                attn(format!("down_blocks.{i}"), layers[i], depth[i]);
            }
        }
        if self.mid_block_type.as_deref().is_some_and(cross) {
            attn("mid_block".into(), 1, *depth.last()?);
        }
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let rev_depth: Vec<usize> = match &self.reverse_transformer_layers_per_block {
            Some(r) => r
                .iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<_>>()?,
            None => depth.iter().rev().copied().collect(),
        };
        for (i, t) in self.up_block_types.iter().enumerate() {
            if cross(t) {
                attn(
                    format!("up_blocks.{i}"),
                    *rev_layers.get(i)? + 1,
                    *rev_depth.get(i)?,
                );
            }
        }
        Some(out)
    }
}

/// Gives every projection without a module path the one `modules` (forward
/// order, from [`UnetLayout::cross_attention_modules`]) implies: the i-th key,
/// value or packed weight belongs to the i-th layer. Does nothing unless the
/// counts agree, so a config that does not describe this graph names nothing.
pub fn fill_module_paths(projections: &mut [Projection], modules: &[String]) {
    let count = |r: fn(&Role) -> bool| projections.iter().filter(|p| r(&p.role)).count();
    let keys = count(|r| matches!(r, Role::Key));
    let values = count(|r| matches!(r, Role::Value));
    let packed = count(|r| matches!(r, Role::PackedKeyValue { .. }));
    let n = modules.len();
    if !((keys == n && values == n && packed == 0) || (packed == n && keys == 0 && values == 0)) {
        return;
    }
    let (mut k, mut v, mut kv) = (0, 0, 0);
    for p in projections.iter_mut() {
        let (index, suffix) = match p.role {
            Role::Key => (&mut k, ".to_k"),
            Role::Value => (&mut v, ".to_v"),
            Role::PackedKeyValue { .. } => (&mut kv, ""),
        };
        if p.module.is_none() {
            p.module = Some(format!("{}{suffix}", modules[*index]));
        }
        *index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd14_layout_has_sixteen_cross_attentions_in_forward_order() {
        let cfg = r#"{"down_block_types": ["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
                      "up_block_types": ["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
                      "layers_per_block": 2}"#;
        let names = UnetLayout::from_json(cfg)
            .unwrap()
            .cross_attention_modules()
            .unwrap();
        assert_eq!(names.len(), 16);
        assert_eq!(
            names[0],
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
        );
        assert_eq!(
            names[6],
            "mid_block.attentions.0.transformer_blocks.0.attn2"
        );
        assert_eq!(
            names[7],
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
        );
        assert_eq!(
            names[15],
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
        );
    }
}
