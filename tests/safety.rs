//! The safety checker against diffusers' ONNX pipeline: CLIP preprocessing
//! (PIL's bicubic resize included) and the checker's flags and outputs.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, ArrayD, Axis, IxDyn};
use time_onnx::pipeline::clip_image::ClipImageConfig;
use time_onnx::pipeline::png::read_npy;
use time_onnx::pipeline::safety::SafetyChecker;
use time_onnx::runtime::{Device, Runtime, SessionOptions};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn golden_bytes() -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/goldens/safety/safety.safetensors")).unwrap()
}

fn tensor_f32(st: &safetensors::SafeTensors, key: &str) -> ArrayD<f32> {
    let t = st.tensor(key).unwrap();
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

/// The four golden images `[h, w, 3] f32`.
fn images(st: &safetensors::SafeTensors) -> Vec<Array3<f32>> {
    let npy = |name: &str| {
        let (shape, data) =
            read_npy(Path::new(&format!("{FIXTURES}/goldens/generations/{name}"))).unwrap();
        ArrayD::from_shape_vec(shape, data).unwrap()
    };
    [
        npy("diffusers-onnx.pndm.noneg.orig.npy"),
        npy("diffusers-onnx.euler.noneg.orig.npy"),
        tensor_f32(st, "image.2"),
        tensor_f32(st, "image.3"),
    ]
    .into_iter()
    .map(|a| a.index_axis_move(Axis(0), 0).into_dimensionality().unwrap())
    .collect()
}

fn config() -> ClipImageConfig {
    ClipImageConfig::from_file(&PathBuf::from(format!(
        "{FIXTURES}/sd-tiny/with-safety/feature_extractor/preprocessor_config.json"
    )))
    .unwrap()
}

#[test]
fn clip_preprocessing_matches_transformers_and_pil() {
    let bytes = golden_bytes();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want = tensor_f32(&st, "clip_input");
    let cfg = config();
    for (i, img) in images(&st).iter().enumerate() {
        let got = cfg.preprocess(img.view());
        let expected = want.index_axis(Axis(0), i);
        let err = got
            .iter()
            .zip(expected.iter())
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        // Same uint8 pixels give the same floats up to float32 rounding of (x - mean) / std.
        assert!(err <= 1e-6, "image {i}: clip_input off by {err}");
    }
}

#[test]
fn checker_flags_and_blacks_out_as_the_reference() {
    let bytes = golden_bytes();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let flags: Vec<bool> = st
        .tensor("has_nsfw_concepts")
        .unwrap()
        .data()
        .iter()
        .map(|&b| b != 0)
        .collect();
    assert_eq!(
        flags,
        vec![true, true, false, false],
        "the fixture should flag some and pass others"
    );
    let rt = Runtime::load().unwrap();
    let dir = PathBuf::from(format!("{FIXTURES}/sd-tiny/with-safety"));
    let mut checker = SafetyChecker::open(
        &rt,
        &dir.join("safety_checker/model.onnx"),
        &dir.join("feature_extractor/preprocessor_config.json"),
        SessionOptions {
            device: Device::Cpu,
            threads: Some(1),
            ..SessionOptions::default()
        },
    )
    .unwrap();
    for (i, img) in images(&st).into_iter().enumerate() {
        let batch: Array4<f32> = img.insert_axis(Axis(0));
        let (out, flagged) = checker.check(batch.view()).unwrap();
        assert_eq!(flagged, vec![flags[i]], "image {i}");
        let want = tensor_f32(&st, &format!("out_images.{i}"));
        let err = out
            .iter()
            .zip(want.iter())
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-6, "image {i}: out_images off by {err}");
    }
}
