//! Edits as operators on the text embeddings: the same images as the
//! edited UNet, composed in the order the edits were made.

use std::path::{Path, PathBuf};

mod common;

use common::{
    FIXTURES, cpu_threads, edit_request, generate, max_abs_diff, npy, with_base_scheduler_config,
};
use ndarray::ArrayD;
use serde_json::Value;
use time_onnx::edit::Targets;
use time_onnx::edit::operator_file::{self, OperatorMeta};
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::runtime::Runtime;
use time_onnx::workflow::edit::{self, EditJobError, EditRequest};
use time_onnx::workflow::generate::{GenerateError, Generator, Params};

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{FIXTURES}/goldens/time/cases.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["cases"]
        .as_array()
        .unwrap()
        .clone()
}

fn request(
    flavour: &str,
    case: &Value,
    edit: &Value,
    unet: Option<PathBuf>,
    out: Option<PathBuf>,
    op: Option<PathBuf>,
) -> EditRequest {
    EditRequest {
        unet,
        output: out,
        lambda: case["lambda"].as_f64().unwrap(),
        augmentations: case["augmentations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().into())
            .collect(),
        save_operator: op,
        ..edit_request(
            flavour,
            edit["source"].as_str().unwrap(),
            edit["destination"].as_str().unwrap(),
        )
    }
}

/// 3 PNDM steps from the golden latents, as the generation goldens.
fn images(flavour: &str, unet: Option<&Path>, ops: &[PathBuf]) -> ArrayD<f32> {
    let rt = Runtime::load().unwrap();
    let folder = with_base_scheduler_config(flavour);
    let mut g = Generator::open(&rt, folder.path(), unet, cpu_threads(1)).unwrap();
    let loaded: Vec<_> = ops
        .iter()
        .map(|p| operator_file::load(p).unwrap())
        .collect();
    g.set_edit_operators(&loaded, false).unwrap();
    let params = Params {
        steps: 3,
        guidance: 7.5,
        negative_prompt: String::new(),
        num_images: 1,
        height: 128,
        width: 128,
        seed: 0,
        latents: Some(npy(&PathBuf::from(format!(
            "{FIXTURES}/goldens/generations/latents.npy"
        )))),
        scheduler: Some(SchedulerKind::Pndm),
        eta: 0.0,
    };
    generate(&mut g, "A pack of roses", &params)
        .unwrap()
        .pixels
        .into_dyn()
}

/// For every golden case that edits keys and values: operators (one per
/// edit, accumulated cases included) give the edited UNet's images.
fn operators_match_edited_unets(flavour: &str, tol: f32) {
    let original = images(flavour, None, &[]);
    for case in cases().iter().filter(|c| c["with_to_k"].as_bool().unwrap()) {
        let name = case["name"].as_str().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut unet = PathBuf::from(format!("{FIXTURES}/sd-tiny/{flavour}/unet/model.onnx"));
        let mut ops = Vec::new();
        for (i, e) in case["edits"].as_array().unwrap().iter().enumerate() {
            let out = tmp.path().join(format!("unet{i}.onnx"));
            let op = tmp.path().join(format!("op{i}.safetensors"));
            edit::run(&request(
                flavour,
                case,
                e,
                Some(unet.clone()),
                Some(out.clone()),
                Some(op.clone()),
            ))
            .unwrap();
            unet = out;
            ops.push(op);
        }
        let by_file = images(flavour, Some(&unet), &[]);
        let by_operator = images(flavour, None, &ops);
        let err = max_abs_diff(&by_file, &by_operator);
        let effect = max_abs_diff(&by_file, &original);
        eprintln!("{flavour}/{name}: operator vs file {err:.2e} (edit effect {effect:.2e})");
        assert!(
            effect > 1e-2,
            "{flavour}/{name}: the edit changed nothing ({effect})"
        );
        assert!(err <= tol, "{flavour}/{name}: {err} > {tol}");
    }
}

#[test]
fn operators_equal_edited_unets_fp32() {
    operators_match_edited_unets("optimum", 1e-5);
}

/// fp16 weights round W·A to fp16 where the operator path rounds A·c: the
/// two differ by fp16 rounding, like any two fp16 evaluations.
#[test]
fn operators_equal_edited_unets_fp16() {
    operators_match_edited_unets("fp16", 2e-2);
}

#[test]
fn operator_images_equal_the_reference_edited_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let op = tmp.path().join("roses.safetensors");
    let case = &cases()[0];
    assert_eq!(case["name"], "roses_blue");
    edit::run(&request(
        "optimum",
        case,
        &case["edits"][0],
        None,
        None,
        Some(op.clone()),
    ))
    .unwrap();
    let got = images("optimum", None, &[op]);
    let golden = npy(&PathBuf::from(format!(
        "{FIXTURES}/goldens/generations/optimum.pndm.noneg.edited.npy"
    )));
    let err = max_abs_diff(&got, &golden);
    assert!(err <= 1e-4, "{err}");
}

/// Editing W → W·A₁ → W·A₁·A₂ equals embeddings c → A₁·(A₂·c): the order of
/// `--edit` is the order of the edits, and the reverse order differs.
#[test]
fn operator_order_is_the_edit_order() {
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "roses_then_car")
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut unet = PathBuf::from(format!("{FIXTURES}/sd-tiny/optimum/unet/model.onnx"));
    let mut ops = Vec::new();
    for (i, e) in case["edits"].as_array().unwrap().iter().enumerate() {
        let out = tmp.path().join(format!("u{i}.onnx"));
        let op = tmp.path().join(format!("o{i}.safetensors"));
        edit::run(&request(
            "optimum",
            &case,
            e,
            Some(unet),
            Some(out.clone()),
            Some(op.clone()),
        ))
        .unwrap();
        unet = out;
        ops.push(op);
    }
    let by_file = images("optimum", Some(&unet), &[]);
    let reversed: Vec<_> = ops.iter().rev().cloned().collect();
    assert!(max_abs_diff(&by_file, &images("optimum", None, &ops)) <= 1e-5);
    assert!(max_abs_diff(&by_file, &images("optimum", None, &reversed)) > 1e-3);
}

#[test]
fn values_only_edits_are_refused_as_operators() {
    let tmp = tempfile::tempdir().unwrap();
    let case = &cases()[0];
    let mut req = request(
        "optimum",
        case,
        &case["edits"][0],
        None,
        None,
        Some(tmp.path().join("op.safetensors")),
    );
    req.targets = Targets::ValuesOnly;
    assert!(matches!(
        edit::run(&req),
        Err(EditJobError::ValuesOnlyOperator)
    ));
    assert!(!tmp.path().join("op.safetensors").exists());
}

#[test]
fn operator_from_another_text_encoder_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let op = tmp.path().join("op.safetensors");
    let case = &cases()[0];
    edit::run(&request(
        "optimum",
        case,
        &case["edits"][0],
        None,
        None,
        Some(op.clone()),
    ))
    .unwrap();
    let (operator, meta) = operator_file::load(&op).unwrap();
    // Pretend it came from another text encoder.
    let foreign = OperatorMeta {
        text_encoder: "0".repeat(64),
        ..meta.clone()
    };
    operator_file::save(&op, &operator, &foreign).unwrap();

    let rt = Runtime::load().unwrap();
    let opts = cpu_threads(1);
    let mut g = Generator::open(
        &rt,
        &PathBuf::from(format!("{FIXTURES}/sd-tiny/optimum")),
        None,
        opts,
    )
    .unwrap();
    let loaded = vec![operator_file::load(&op).unwrap()];
    let err = g.set_edit_operators(&loaded, false).unwrap_err();
    assert!(
        matches!(err, GenerateError::OtherTextEncoder { .. }),
        "{err}"
    );
    g.set_edit_operators(&loaded, true).unwrap();
    // The same weights exported by diffusers' script are recognised as the same encoder.
    let mut g2 = Generator::open(
        &rt,
        &PathBuf::from(format!("{FIXTURES}/sd-tiny/diffusers-onnx")),
        None,
        opts,
    )
    .unwrap();
    g2.set_edit_operators(&[(operator, meta)], false).unwrap();
}

/// The same edit on a machine with more or fewer BLAS threads is the same
/// operator to the bit (OpenBLAS's thread count would otherwise change the
/// factorisations by a few ulps, and the images of an evaluation with them).
#[test]
fn an_operator_does_not_depend_on_the_blas_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/toy");
    let made: Vec<Vec<u8>> = ["1", "2"]
        .iter()
        .map(|threads| {
            let out = dir.path().join(format!("op-{threads}.safetensors"));
            let done = std::process::Command::new(env!("CARGO_BIN_EXE_time-onnx"))
                .env("OMP_NUM_THREADS", threads)
                .env("OPENBLAS_NUM_THREADS", threads)
                .args(["edit", "--src", "a square", "--dst", "a yellow square"])
                .arg("--model")
                .arg(&toy)
                .arg("--save-operator")
                .arg(&out)
                .output()
                .unwrap();
            assert!(
                done.status.success(),
                "{}",
                String::from_utf8_lossy(&done.stderr)
            );
            std::fs::read(out).unwrap()
        })
        .collect();
    assert!(made[0] == made[1], "the operators differ");
}
