//! A UNet split at its text K/V projections (`onnx::split`) computes what the
//! file computes: ONNX Runtime running the unmodified file is the reference,
//! on every export flavour of the fixtures.

use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType};
use time_onnx::onnx::Model;
use time_onnx::onnx::split::split_text_projections;
use time_onnx::runtime::tensors::{float_array, float_value, port};
use time_onnx::runtime::{Device, Runtime, SessionOptions};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd-tiny");

/// Deterministic values in [-1, 1) (no RNG crate needed).
fn wave(shape: &[usize], phase: f32) -> ArrayD<f32> {
    let mut i = 0.0f32;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        i += 1.0;
        (i * 0.7548 + phase).sin()
    })
}

/// The value of input `name` of `session`, from `a`, in the declared type.
fn input(session: &Session, name: &str, a: &ArrayD<f32>) -> DynValue {
    let (ty, _) = port(session, name, true).unwrap();
    match ty {
        TensorElementType::Int64 => Tensor::from_array(a.mapv(|v| v as i64)).unwrap().into_dyn(),
        ty => float_value(ty, a.view()).unwrap(),
    }
}

/// Fixed dims where the export fixes them, `fallback` elsewhere.
fn dims(session: &Session, name: &str, fallback: &[usize]) -> Vec<usize> {
    let (_, declared) = port(session, name, true).unwrap();
    declared
        .iter()
        .zip(fallback)
        .map(|(&d, &f)| usize::try_from(d).ok().filter(|&d| d > 0).unwrap_or(f))
        .collect()
}

#[test]
fn split_unets_predict_what_the_file_predicts() {
    let rt = Runtime::load().unwrap();
    let opts = SessionOptions {
        device: Device::Cpu,
        threads: Some(1),
        ..SessionOptions::default()
    };
    for flavour in ["diffusers-onnx", "optimum", "dynamo", "fp16", "fp16-io32"] {
        let path = PathBuf::from(format!("{FIXTURES}/{flavour}/unet/model.onnx"));
        let split = split_text_projections(&Model::open(&path).unwrap()).unwrap();
        let mut whole = rt.session_with(&path, opts).unwrap();
        let mut projections = rt
            .session_from_bytes(&path, &split.projections, opts)
            .unwrap();
        let mut rest = rt.session_from_bytes(&path, &split.unet, opts).unwrap();

        let sample = wave(&dims(&whole, "sample", &[2, 4, 16, 16]), 0.0);
        let hidden = wave(&dims(&whole, "encoder_hidden_states", &[2, 77, 16]), 1.0);
        let (_, t_dims) = port(&whole, "timestep", true).unwrap();
        let timestep = if t_dims.is_empty() {
            ArrayD::from_elem(IxDyn(&[]), 501.0)
        } else {
            ArrayD::from_elem(IxDyn(&[sample.shape()[0]]), 501.0)
        };
        let expected = {
            let inputs = ort::inputs![
                "sample" => input(&whole, "sample", &sample),
                "timestep" => input(&whole, "timestep", &timestep),
                "encoder_hidden_states" => input(&whole, "encoder_hidden_states", &hidden),
            ];
            float_array(&whole.run(inputs).unwrap()[0]).unwrap()
        };
        let hidden_value = input(&whole, "encoder_hidden_states", &hidden);
        let products = projections
            .run(ort::inputs!["encoder_hidden_states" => &hidden_value])
            .unwrap();
        let mut inputs: Vec<(String, DynValue)> = vec![
            ("sample".into(), input(&rest, "sample", &sample)),
            ("timestep".into(), input(&rest, "timestep", &timestep)),
            (
                "encoder_hidden_states".into(),
                input(&rest, "encoder_hidden_states", &hidden),
            ),
        ];
        for name in &split.products {
            let product = float_array(&products[name.as_str()]).unwrap();
            inputs.push((name.clone(), input(&rest, name, &product)));
        }
        let got = float_array(&rest.run(inputs).unwrap()[0]).unwrap();

        assert_eq!(got.shape(), expected.shape(), "{flavour}");
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&expected)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!(
            "{flavour}: {} products split off; max abs diff {err:.2e} (output max {scale:.2e})",
            split.products.len()
        );
        assert!(err <= 1e-6 * scale.max(1.0), "{flavour}: {err:e}");
    }
}
