//! `edit` against diffusers' reference `edit_model` (run in float64 by
//! scripts/make_fixtures.py), on every export flavour of the tiny pipeline.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;

use common::{FIXTURES, edit_request, relative_error};
use serde_json::Value;
use time_onnx::edit::Targets;
use time_onnx::edit::record::PromptPair;
use time_onnx::onnx::Model;
use time_onnx::onnx::cross_attention::{self, Role};
use time_onnx::onnx::module_paths::UnetLayout;
use time_onnx::text::TextSide;
use time_onnx::workflow::edit::{EditRequest, Preserve, run};
use time_onnx::workflow::prior::{self as prior_flow, PriorRequest};

/// Tolerance relative to each weight's largest magnitude. fp32 flavours: our
/// f32 embeddings (ONNX text encoder, within 1.3e-6 of torch's f64 ones) and
/// an f64 solve. fp16 flavours: the weights we start from are the fp16
/// roundings of the reference's (relative error up to 2⁻¹¹ ≈ 4.9e-4), and
/// the result is rounded to fp16 again, so two fp16 half-ulps: 1e-3.
fn tolerance(flavour: &str) -> f64 {
    if flavour.starts_with("fp16") || flavour == "ort-packed-kv" {
        1e-3
    } else {
        1e-5
    }
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{FIXTURES}/goldens/time/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn golden(file: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    f64_tensors(&format!("{FIXTURES}/goldens/time/{file}"))
}

/// Every float64 tensor of a golden file whose key ends in `.weight`.
fn f64_tensors(path: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(k, _)| k.ends_with(".weight"))
        .map(|(k, t)| {
            let vals = t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, (t.shape().to_vec(), vals))
        })
        .collect()
}

fn saved(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, t)| {
            let vals = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect();
            (k, (t.shape().to_vec(), vals))
        })
        .collect()
}

/// Packed weights carry no module path; they follow the graph order of the
/// unpacked export (down, mid, up), which the optimum flavour names.
fn packed_names() -> Vec<String> {
    let m = Model::open(&PathBuf::from(format!(
        "{FIXTURES}/sd-tiny/optimum/unet/model.onnx"
    )))
    .unwrap();
    cross_attention::locate(&m)
        .unwrap()
        .into_iter()
        .filter(|p| p.role == Role::Key)
        .map(|p| p.module.unwrap().trim_end_matches(".to_k").to_string())
        .collect()
}

fn request(
    flavour: &str,
    unet: PathBuf,
    out: PathBuf,
    case: &Value,
    edit: &Value,
    weights: PathBuf,
) -> EditRequest {
    EditRequest {
        unet: Some(unet),
        output: Some(out),
        lambda: case["lambda"].as_f64().unwrap(),
        augmentations: case["augmentations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().into())
            .collect(),
        targets: if case["with_to_k"].as_bool().unwrap() {
            Targets::KeysAndValues
        } else {
            Targets::ValuesOnly
        },
        save_weights: Some(weights),
        ..edit_request(
            flavour,
            edit["source"].as_str().unwrap(),
            edit["destination"].as_str().unwrap(),
        )
    }
}

fn check_flavour(flavour: &str) {
    let packed = packed_names();
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut unet = PathBuf::from(format!("{FIXTURES}/sd-tiny/{flavour}/unet/model.onnx"));
        let weights = tmp.path().join("weights.safetensors");
        // Accumulated cases edit the previous output (restart_params=False).
        for (i, edit) in case["edits"].as_array().unwrap().iter().enumerate() {
            let out = tmp.path().join(format!("unet{i}.onnx"));
            let report = run(&request(
                flavour,
                unet.clone(),
                out.clone(),
                &case,
                edit,
                weights.clone(),
            ))
            .unwrap_or_else(|e| panic!("{flavour}/{name}: {e}"));
            assert_eq!(report.previous.len(), i, "{flavour}/{name}: edit history");
            unet = out;
        }
        let expected = golden(case["files"]["f64"].as_str().unwrap());
        compare(flavour, name, &saved(&weights), &expected, &packed);
    }
}

/// Our saved weights against the golden ones, within the flavour's tolerance.
fn compare(
    flavour: &str,
    name: &str,
    ours: &HashMap<String, (Vec<usize>, Vec<f64>)>,
    expected: &HashMap<String, (Vec<usize>, Vec<f64>)>,
    packed: &[String],
) {
    let tol = tolerance(flavour);
    let mut worst = 0.0f64;
    for (key, (shape, want)) in expected {
        let ours_key = if flavour == "ort-packed-kv" {
            // "MatMul_KV_i_weight.to_k.weight" ↔ the i-th module in graph order.
            let module = key.rsplitn(3, '.').nth(2).unwrap();
            let i = packed.iter().position(|m| m == module).unwrap();
            let suffix = &key[module.len()..];
            format!("MatMul_KV_{i}_weight{suffix}")
        } else {
            key.clone()
        };
        let (got_shape, got) = ours
            .get(&ours_key)
            .unwrap_or_else(|| panic!("{flavour}/{name}: no {ours_key}"));
        assert_eq!(got_shape, shape, "{flavour}/{name}: {key}");
        let err = relative_error(got, want);
        worst = worst.max(err);
        assert!(
            err <= tol,
            "{flavour}/{name}: {key} off by {err:.2e} of its max (tolerance {tol:e})"
        );
    }
    eprintln!("{flavour}/{name}: worst relative error {worst:.2e}");
}

/// Edits solved together, with and without UCE's preservation term, and
/// UCE's erase/replace, against the published formula in numpy float64
/// (scripts/golden_uce.py).
fn check_uce(flavour: &str) {
    let text = std::fs::read_to_string(format!("{FIXTURES}/goldens/uce/cases.json")).unwrap();
    let index: Value = serde_json::from_str(&text).unwrap();
    let all = f64_tensors(&format!("{FIXTURES}/goldens/uce/uce.f64.safetensors"));
    let packed = packed_names();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    for case in index["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("weights.safetensors");
        let edits: Vec<PromptPair> = case["edits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| PromptPair {
                source: e["source"].as_str().unwrap().into(),
                destination: e["destination"].as_str().unwrap().into(),
            })
            .collect();
        let (preserve, preserve_scale) = match case["preserve_scale"].as_f64() {
            Some(s) => (Preserve::Prompts(strings(&case["preserved"])), s),
            None => (Preserve::Nothing, 0.0),
        };
        let req = EditRequest {
            unet: Some(PathBuf::from(format!(
                "{FIXTURES}/sd-tiny/{flavour}/unet/model.onnx"
            ))),
            output: Some(tmp.path().join("unet.onnx")),
            lambda: case["lambda"].as_f64().unwrap(),
            augmentations: strings(&case["augmentations"]),
            save_weights: Some(weights.clone()),
            edits,
            erase: case["erase"].as_bool().unwrap_or(false),
            preserve,
            preserve_scale,
            ..edit_request(flavour, "unused", "unused")
        };
        let report = run(&req).unwrap_or_else(|e| panic!("{flavour}/{name}: {e}"));
        assert_eq!(
            report.record.spec.pairs().len(),
            req.edits.len(),
            "{flavour}/{name}: the record lists every pair"
        );
        let prefix = format!("{name}.");
        let expected = all
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_owned(), v.clone())))
            .collect();
        compare(flavour, name, &saved(&weights), &expected, &packed);
    }
}

#[test]
fn edits_together_and_preserved_match_the_formula_optimum() {
    check_uce("optimum");
}

#[test]
fn edits_together_and_preserved_match_the_formula_fp16() {
    check_uce("fp16");
}

#[test]
fn edits_together_and_preserved_match_the_formula_packed_kv() {
    check_uce("ort-packed-kv");
}

/// `time-onnx prior`'s Cₚ against numpy's Σ cₚcₚᵀ from torch float64
/// embeddings.
#[test]
fn prior_matches_the_formula() {
    let text = std::fs::read_to_string(format!("{FIXTURES}/goldens/uce/cases.json")).unwrap();
    let index: Value = serde_json::from_str(&text).unwrap();
    let prompts: Vec<String> = index["prior"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let bytes = std::fs::read(format!("{FIXTURES}/goldens/uce/uce.f64.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: Vec<f64> = st
        .tensor("prior")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = PathBuf::from(format!("{FIXTURES}/sd-tiny/optimum"));
    let req = PriorRequest {
        text: TextSide::single(dir.join("text_encoder/model.onnx"), dir.join("tokenizer")),
        prompts: prompts.clone(),
        output: tmp.path().join("prior.safetensors"),
    };
    prior_flow::run(&req).unwrap();
    let (prior, meta) = time_onnx::edit::prior::load(&req.output).unwrap();
    assert_eq!(meta.prompts, prompts.len());
    let err = relative_error(prior.gram().iter(), &want);
    assert!(err <= 1e-5, "prior off by {err:.2e} of its max");
}

#[test]
fn diffusers_script_layout_matches_reference() {
    check_flavour("diffusers-onnx");
}

#[test]
fn optimum_layout_matches_reference() {
    check_flavour("optimum");
}

#[test]
fn dynamo_export_matches_reference() {
    check_flavour("dynamo");
}

#[test]
fn fp16_single_file_matches_reference() {
    check_flavour("fp16");
}

#[test]
fn fp16_with_fp32_inputs_matches_reference() {
    check_flavour("fp16-io32");
}

#[test]
fn ort_packed_kv_matches_reference() {
    check_flavour("ort-packed-kv");
}

/// The module paths derived from `config.json` are the ones the TorchScript
/// exporter wrote into node names, in graph order.
#[test]
fn config_derived_module_paths_match_the_exporters() {
    let dir = PathBuf::from(format!("{FIXTURES}/sd-tiny/optimum/unet"));
    let layout =
        UnetLayout::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let modules = layout.cross_attention_modules().unwrap();
    let m = Model::open(&dir.join("model.onnx")).unwrap();
    let exported: Vec<String> = cross_attention::locate(&m)
        .unwrap()
        .into_iter()
        .filter(|p| p.role == Role::Key)
        .map(|p| p.module.unwrap().trim_end_matches(".to_k").to_string())
        .collect();
    assert_eq!(modules, exported);
}

/// A packed-KV UNet with its config beside it: `--save-weights` keys are
/// diffusers parameter names, and the weights are the reference's.
#[test]
fn packed_kv_weights_are_named_from_the_unet_config() {
    let tmp = tempfile::tempdir().unwrap();
    let unet_dir = tmp.path().join("unet");
    std::fs::create_dir(&unet_dir).unwrap();
    std::fs::copy(
        format!("{FIXTURES}/sd-tiny/ort-packed-kv/unet/model.onnx"),
        unet_dir.join("model.onnx"),
    )
    .unwrap();
    std::fs::copy(
        format!("{FIXTURES}/sd-tiny/optimum/unet/config.json"),
        unet_dir.join("config.json"),
    )
    .unwrap();
    let case = cases().into_iter().next().unwrap();
    let weights = tmp.path().join("w.safetensors");
    let req = request(
        "ort-packed-kv",
        unet_dir.join("model.onnx"),
        tmp.path().join("out.onnx"),
        &case,
        &case["edits"][0],
        weights.clone(),
    );
    run(&req).unwrap();
    let ours = saved(&weights);
    let expected = golden(case["files"]["f64"].as_str().unwrap());
    let mut keys: Vec<_> = ours.keys().cloned().collect();
    let mut want: Vec<_> = expected.keys().cloned().collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want);
    for (key, (_, w)) in &expected {
        let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = ours[key]
            .1
            .iter()
            .zip(w)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err <= tolerance("ort-packed-kv"), "{key}: {err}");
    }
}
