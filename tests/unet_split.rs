//! A UNet split at its text K/V projections (`onnx::split`) computes what the
//! file computes: ONNX Runtime running the unmodified file is the reference,
//! on every export flavour of the fixtures.

use std::path::PathBuf;

mod common;

use common::cpu_threads;
use ndarray::{ArrayD, IxDyn};
use time_onnx::onnx::Model;
use time_onnx::onnx::split::split_text_projections;
use time_onnx::runtime::{ElementType, Runtime, Session, Value};

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
fn input(session: &Session, name: &str, a: &ArrayD<f32>) -> Value {
    match session.input(name).unwrap().ty {
        Some(ElementType::I64) => session
            .int_value(name, a.shape(), a.iter().map(|&v| v as i64).collect())
            .unwrap(),
        _ => session.float_value(name, a.view()).unwrap(),
    }
}

/// Fixed dims where the export fixes them, `fallback` elsewhere.
fn dims(session: &Session, name: &str, fallback: &[usize]) -> Vec<usize> {
    let declared = &session.input(name).unwrap().dims;
    declared
        .iter()
        .zip(fallback)
        .map(|(&d, &f)| usize::try_from(d).ok().filter(|&d| d > 0).unwrap_or(f))
        .collect()
}

#[test]
fn split_unets_predict_what_the_file_predicts() {
    let rt = Runtime::load().unwrap();
    let opts = cpu_threads(1);
    for flavour in ["diffusers-onnx", "optimum", "dynamo", "fp16", "fp16-io32"] {
        let path = PathBuf::from(format!("{FIXTURES}/{flavour}/unet/model.onnx"));
        let split = split_text_projections(&Model::open(&path).unwrap()).unwrap();
        let mut whole = rt.open(&path, opts).unwrap();
        let mut projections = rt
            .open_bytes(&path, &split.projections, opts, Vec::new())
            .unwrap();
        let mut rest = rt.open_bytes(&path, &split.unet, opts, Vec::new()).unwrap();

        let sample = wave(&dims(&whole, "sample", &[2, 4, 16, 16]), 0.0);
        let hidden = wave(&dims(&whole, "encoder_hidden_states", &[2, 77, 16]), 1.0);
        let t_dims = &whole.input("timestep").unwrap().dims;
        let timestep = if t_dims.is_empty() {
            ArrayD::from_elem(IxDyn(&[]), 501.0)
        } else {
            ArrayD::from_elem(IxDyn(&[sample.shape()[0]]), 501.0)
        };
        let output = whole.outputs()[0].name.clone();
        let expected = {
            let inputs = [
                ("sample", input(&whole, "sample", &sample)),
                ("timestep", input(&whole, "timestep", &timestep)),
                (
                    "encoder_hidden_states",
                    input(&whole, "encoder_hidden_states", &hidden),
                ),
            ];
            let refs: Vec<(&str, &Value)> = inputs.iter().map(|(n, v)| (*n, v)).collect();
            whole.run(&refs).unwrap().float(&output).unwrap()
        };
        let hidden_value = input(&whole, "encoder_hidden_states", &hidden);
        let products = projections
            .run(&[("encoder_hidden_states", &hidden_value)])
            .unwrap();
        let mut inputs: Vec<(String, Value)> = vec![
            ("sample".into(), input(&rest, "sample", &sample)),
            ("timestep".into(), input(&rest, "timestep", &timestep)),
            (
                "encoder_hidden_states".into(),
                input(&rest, "encoder_hidden_states", &hidden),
            ),
        ];
        for name in &split.products {
            let product = products.float(name).unwrap();
            inputs.push((name.clone(), input(&rest, name, &product)));
        }
        drop(products);
        let refs: Vec<(&str, &Value)> = inputs.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let output = rest.outputs()[0].name.clone();
        let got = rest.run(&refs).unwrap().float(&output).unwrap();

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
