//! Edited UNets as files: they load and run in ONNX Runtime, compute what
//! the edit means, and differ from their input only where the edit says.

use std::path::{Path, PathBuf};

mod common;

use common::{FIXTURES, edit_request, max_abs_diff};
use ndarray::{Array3, ArrayD, Axis, IxDyn};
use time_onnx::onnx::cross_attention;
use time_onnx::onnx::proto::ModelProto;
use time_onnx::onnx::{Model, Storage};
use time_onnx::runtime::{Device, Runtime, SessionOptions};
use time_onnx::workflow::edit::{EditReport, EditRequest, run};

fn request(flavour: &str, out: &Path, src: &str, dst: &str, lambda: f64) -> EditRequest {
    let dir = PathBuf::from(format!("{FIXTURES}/sd-tiny/{flavour}"));
    EditRequest {
        unet: Some(dir.join("unet/model.onnx")),
        output: Some(out.to_path_buf()),
        lambda,
        ..edit_request(flavour, src, dst)
    }
}

fn unet_inputs() -> (ArrayD<f32>, f32, Array3<f32>) {
    let bytes = std::fs::read(format!("{FIXTURES}/goldens/unet_io.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let get = |k: &str| {
        let t = st.tensor(k).unwrap();
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
    };
    let ehs = get("encoder_hidden_states").into_dimensionality().unwrap();
    (get("sample"), get("timestep")[[0]], ehs)
}

/// One UNet call of the optimum export (rank-0 timestep).
fn unet(path: &Path, sample: &ArrayD<f32>, t: f32, ehs: &Array3<f32>) -> ArrayD<f32> {
    let rt = Runtime::load().unwrap();
    let opts = SessionOptions {
        device: Device::Cpu,
        ..SessionOptions::default()
    };
    let mut s = rt.open(path, opts).unwrap();
    let sample = s.f32_value(sample.clone()).unwrap();
    let timestep = s.f32_value(ndarray::arr0(t).into_dyn()).unwrap();
    let ehs = s.f32_value(ehs.clone().into_dyn()).unwrap();
    s.run(&[
        ("sample", &sample),
        ("timestep", &timestep),
        ("encoder_hidden_states", &ehs),
    ])
    .unwrap()
    .float("out_sample")
    .unwrap()
}

fn edit(flavour: &str, out: &Path) -> EditReport {
    run(&request(
        flavour,
        out,
        "A pack of roses",
        "A pack of blue roses",
        0.1,
    ))
    .unwrap()
}

/// TIME replaces every K/V weight W by W·A, and the text embeddings reach
/// the UNet only through those weights: the edited UNet on embeddings c must
/// compute what the original computes on A·c. Checks that the right tensors
/// were patched, in the right layout, and nothing else.
#[test]
fn edited_unet_on_c_equals_original_unet_on_a_c() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("unet.onnx");
    let report = edit("optimum", &out);
    let original = PathBuf::from(format!("{FIXTURES}/sd-tiny/optimum/unet/model.onnx"));
    let (sample, t, ehs) = unet_inputs();

    let before = unet(&original, &sample, t, &ehs);
    let golden_bytes = std::fs::read(format!("{FIXTURES}/goldens/unet_io.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&golden_bytes).unwrap();
    let golden: Vec<f32> = st
        .tensor("out_sample.optimum")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let golden = ArrayD::from_shape_vec(before.raw_dim(), golden).unwrap();
    assert!(
        max_abs_diff(&before, &golden) < 1e-5,
        "our ORT run differs from onnxruntime-python's"
    );

    let after = unet(&out, &sample, t, &ehs);
    // A·c for every token: rows of [b, 77, d] times Aᵀ.
    let at = report.operator.transposed().mapv(|v| v as f32);
    let mut moved = ehs.clone();
    for mut seq in moved.axis_iter_mut(Axis(0)) {
        let m = seq.dot(&at);
        seq.assign(&m);
    }
    let reference = unet(&original, &sample, t, &moved);
    let effect = max_abs_diff(&after, &before);
    let err = max_abs_diff(&after, &reference);
    assert!(effect > 1e-2, "the edit barely moved the output ({effect})");
    assert!(
        err < 1e-5 * effect.max(1.0),
        "edited(c) vs original(A·c): {err} (edit effect {effect})"
    );
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Inputs are byte-identical afterwards; in the output, every initializer
/// other than the edited ones has the same bytes, and the graph is unchanged.
#[test]
fn only_the_edited_weights_change_and_the_input_is_untouched() {
    for flavour in [
        "diffusers-onnx",
        "optimum",
        "dynamo",
        "fp16",
        "fp16-io32",
        "ort-packed-kv",
    ] {
        let dir = PathBuf::from(format!("{FIXTURES}/sd-tiny/{flavour}/unet"));
        let inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let before: Vec<Vec<u8>> = inputs.iter().map(|p| file_bytes(p)).collect();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("edited.onnx");
        edit(flavour, &out);
        for (p, b) in inputs.iter().zip(&before) {
            assert_eq!(
                &file_bytes(p),
                b,
                "{flavour}: input {} modified",
                p.display()
            );
        }

        let a = Model::open(&dir.join("model.onnx")).unwrap();
        let b = Model::open(&out).unwrap();
        let edited: Vec<String> = cross_attention::locate(&a)
            .unwrap()
            .into_iter()
            .map(|p| p.initializer)
            .collect();
        let (ga, gb) = (a.graph().unwrap(), b.graph().unwrap());
        assert_eq!(ga.initializer.len(), gb.initializer.len());
        let mut changed = 0;
        for (ta, tb) in ga.initializer.iter().zip(&gb.initializer) {
            assert_eq!(ta.name, tb.name);
            let (ia, ib) = (a.tensor_info(ta).unwrap(), b.tensor_info(tb).unwrap());
            if ia.storage == Storage::Typed {
                assert_eq!(ta, tb, "{flavour}: typed tensor {} changed", ta.name);
                continue;
            }
            let same = a.tensor_bytes(&ia).unwrap() == b.tensor_bytes(&ib).unwrap();
            if edited.contains(&ta.name) {
                assert!(!same, "{flavour}: {} was not edited", ta.name);
                changed += 1;
            } else {
                assert!(
                    same,
                    "{flavour}: {} changed but is not a K/V weight",
                    ta.name
                );
            }
        }
        assert_eq!(changed, edited.len());
        // Same nodes, inputs and outputs; one metadata entry more.
        assert_eq!(ga.node, gb.node, "{flavour}: nodes differ");
        assert_eq!((&ga.input, &ga.output), (&gb.input, &gb.output));
        let (ma, mb): (&ModelProto, &ModelProto) = (a.proto(), b.proto());
        assert_eq!(mb.metadata_props.len(), ma.metadata_props.len() + 1);
        assert_eq!(
            (ma.ir_version, &ma.opset_import),
            (mb.ir_version, &mb.opset_import)
        );
    }
}

#[test]
fn same_source_and_destination_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("unet.onnx");
    let r = run(&request(
        "fp16",
        &out,
        "A pack of roses",
        "A pack of roses",
        0.1,
    ))
    .unwrap();
    assert!(r.unchanged);
    let input = PathBuf::from(format!("{FIXTURES}/sd-tiny/fp16/unet/model.onnx"));
    assert_eq!(file_bytes(&out), file_bytes(&input));
}

#[test]
fn huge_lambda_leaves_weights_essentially_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("unet.onnx");
    let r = run(&request(
        "optimum",
        &out,
        "A pack of roses",
        "A pack of blue roses",
        1e12,
    ))
    .unwrap();
    for l in &r.layers {
        assert!(
            l.relative_change < 1e-9,
            "{}: {}",
            l.initializer,
            l.relative_change
        );
    }
}
