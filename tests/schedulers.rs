//! Schedulers against diffusers 0.39's own scheduler classes
//! (`tests/fixtures/goldens/schedulers/`, made by scripts/make_fixtures.py).
//!
//! Each golden case is `Class.from_config({**base_config, **overrides})`
//! with `set_timesteps(10)`, run on recorded model outputs and noise. Every
//! step is fed the golden sample before it (so one step's error does not leak
//! into the next), then the whole chain is also run on our own samples.
//!
//! Tolerances: timesteps exact when diffusers' are integers, 1e-6 when float32;
//! σ, init_noise_sigma 1e-6 relative; tensors 1e-5 relative (max |diff| / max
//! |expected|). diffusers computes in float32 torch with float64 numpy set-up;
//! we keep its float32 schedule values and do scalar maths in f64, which
//! leaves differences of a few float32 ulps (≈ 1e-7), well inside 1e-5.

use std::collections::BTreeMap;

use ndarray::{ArrayD, Axis, IxDyn};
use serde_json::Value;
use time_onnx::pipeline::schedulers::{
    SchedulerConfig, SchedulerKind, TimestepSpacing, build, python_json,
};

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/goldens/schedulers"
);
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const TENSOR_TOL: f64 = 1e-5;

fn index() -> Value {
    let text = std::fs::read_to_string(format!("{DIR}/index.json")).unwrap();
    python_json(&text).unwrap()
}

/// `{**base_config, **overrides}` as diffusers' `from_config` received it.
fn case_config(index: &Value, case: &Value) -> SchedulerConfig {
    let mut cfg = index["base_config"].as_object().unwrap().clone();
    for (k, v) in case["config_overrides"].as_object().unwrap() {
        cfg.insert(k.clone(), v.clone());
    }
    SchedulerConfig::from_value(Value::Object(cfg)).unwrap()
}

/// All tensors of a golden file as f64 with their shapes.
fn golden(file: &str) -> BTreeMap<String, ArrayD<f64>> {
    let bytes = std::fs::read(format!("{DIR}/{file}")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let values: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                    .collect(),
                safetensors::Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{file}:{name}: unexpected dtype {other:?}"),
            };
            let a = ArrayD::from_shape_vec(IxDyn(t.shape()), values).unwrap();
            (name, a)
        })
        .collect()
}

fn f32_array(a: ndarray::ArrayViewD<'_, f64>) -> ArrayD<f32> {
    a.mapv(|x| x as f32)
}

/// max |ours − expected| / max |expected|.
fn rel_err(ours: &ArrayD<f32>, expected: ndarray::ArrayViewD<'_, f64>) -> f64 {
    assert_eq!(ours.shape(), expected.shape());
    let scale = expected.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(expected.iter())
        .fold(0.0f64, |m, (&a, &b)| m.max((f64::from(a) - b).abs()));
    diff / scale.max(f64::MIN_POSITIVE)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

/// Per-case worst errors, printed for the record (`--nocapture`).
#[derive(Debug, Default)]
struct Worst {
    scale_input: f64,
    step_teacher_forced: f64,
    chain: f64,
}

fn run_case(index: &Value, name: &str) -> Worst {
    let case = &index["schedulers"][name];
    let kind: SchedulerKind = case["class"].as_str().unwrap().parse().unwrap();
    let config = case_config(index, case);
    let eta = case["step_kwargs"]["eta"].as_f64().unwrap_or(0.0);
    let steps = index["num_inference_steps"].as_u64().unwrap() as usize;
    let mut s = build(&config, kind, steps, eta).unwrap();
    let g = golden(case["file"].as_str().unwrap());

    // timesteps: exact for int64, 1e-6 for float32
    let expected_t = &g["timesteps"];
    assert_eq!(s.timesteps().len(), expected_t.len(), "{name}: call count");
    assert_eq!(
        s.timesteps().len() as u64,
        case["num_calls"].as_u64().unwrap()
    );
    let exact = case["timesteps_dtype"] == "int64";
    for (i, (&ours, &exp)) in s.timesteps().iter().zip(expected_t.iter()).enumerate() {
        if exact {
            assert_eq!(ours, exp, "{name}: timestep {i}");
        } else {
            assert!(
                close(ours, exp, 1e-6),
                "{name}: timestep {i}: {ours} vs {exp}"
            );
        }
    }
    // σ where diffusers has them
    match (s.sigmas(), g.get("sigmas")) {
        (Some(ours), Some(exp)) => {
            assert_eq!(ours.len(), exp.len(), "{name}: sigma count");
            for (i, (&a, &b)) in ours.iter().zip(exp.iter()).enumerate() {
                assert!(close(a, b, 1e-6), "{name}: sigma {i}: {a} vs {b}");
            }
        }
        (None, None) => {}
        (ours, exp) => panic!("{name}: sigmas {ours:?} vs golden {:?}", exp.is_some()),
    }
    let init = case["init_noise_sigma"].as_f64().unwrap();
    assert!(
        close(s.init_noise_sigma(), init, 1e-6),
        "{name}: init_noise_sigma {} vs {init}",
        s.init_noise_sigma()
    );
    let x0 = f32_array(g["initial_noise"].view());
    let start = x0.mapv(|v| v * s.init_noise_sigma() as f32);
    let e = rel_err(&start, g["samples"].index_axis(Axis(0), 0));
    assert!(e < 1e-6, "{name}: initial sample {e}");

    let mut worst = Worst::default();
    let calls = s.timesteps().len();
    let noise_used = !case["noise"].is_null();
    let mut draws = 0;
    // teacher-forced: every call starts from the golden sample
    for call in 0..calls {
        let x = f32_array(g["samples"].index_axis(Axis(0), call));
        let eps = f32_array(g["model_outputs"].index_axis(Axis(0), call));
        let z = f32_array(g["noise"].index_axis(Axis(0), call));
        let input = s.scale_model_input(x.view(), call).unwrap();
        let e = rel_err(&input, g["model_inputs"].index_axis(Axis(0), call));
        worst.scale_input = worst.scale_input.max(e);
        assert!(e < TENSOR_TOL, "{name}: scale_model_input call {call}: {e}");
        let mut noise = |shape: &[usize]| {
            assert_eq!(shape, z.shape());
            draws += 1;
            z.clone()
        };
        let prev = s.step(eps.view(), call, x.view(), &mut noise).unwrap();
        let e = rel_err(&prev, g["prev_samples"].index_axis(Axis(0), call));
        worst.step_teacher_forced = worst.step_teacher_forced.max(e);
        assert!(e < TENSOR_TOL, "{name}: step call {call}: {e}");
    }
    // diffusers' own count where recorded (LCM draws none after its last call)
    let expected_draws = match case["noise_draws"].as_u64() {
        Some(n) => n as usize,
        None if noise_used => calls,
        None => 0,
    };
    assert_eq!(draws, expected_draws, "{name}: noise draws");

    // free-running chain from the initial noise
    let mut s = build(&config, kind, steps, eta).unwrap();
    let mut x = start;
    for call in 0..calls {
        let eps = f32_array(g["model_outputs"].index_axis(Axis(0), call));
        let z = f32_array(g["noise"].index_axis(Axis(0), call));
        x = s
            .step(eps.view(), call, x.view(), &mut |_| z.clone())
            .unwrap();
        let e = rel_err(&x, g["prev_samples"].index_axis(Axis(0), call));
        worst.chain = worst.chain.max(e);
        assert!(e < TENSOR_TOL, "{name}: chained call {call}: {e}");
    }
    println!("{name:16} {worst:?}");
    worst
}

macro_rules! golden_case {
    ($test:ident, $name:literal) => {
        #[test]
        fn $test() {
            run_case(&index(), $name);
        }
    };
}

golden_case!(pndm_matches_diffusers, "pndm");
golden_case!(ddim_eta0_matches_diffusers, "ddim_eta0");
golden_case!(ddim_eta1_matches_diffusers_with_supplied_noise, "ddim_eta1");
golden_case!(euler_matches_diffusers, "euler");
golden_case!(euler_leading_matches_diffusers, "euler_leading");
golden_case!(
    euler_ancestral_matches_diffusers_with_supplied_noise,
    "euler_ancestral"
);
golden_case!(lms_matches_diffusers, "lms");
golden_case!(dpmpp_2m_matches_diffusers, "dpmpp_2m");
golden_case!(
    euler_ancestral_trailing_matches_diffusers_with_supplied_noise,
    "euler_ancestral_trailing"
);
golden_case!(euler_trailing_matches_diffusers, "euler_trailing");
golden_case!(lcm_matches_diffusers_with_supplied_noise, "lcm");
golden_case!(
    lcm_with_every_own_key_changed_matches_diffusers,
    "lcm_options"
);

#[test]
fn every_golden_case_has_a_test() {
    let index = index();
    let names: Vec<&String> = index["schedulers"].as_object().unwrap().keys().collect();
    let tested = [
        "pndm",
        "ddim_eta0",
        "ddim_eta1",
        "euler",
        "euler_leading",
        "euler_ancestral",
        "lms",
        "dpmpp_2m",
        "euler_ancestral_trailing",
        "euler_trailing",
        "lcm",
        "lcm_options",
    ];
    for n in names {
        assert!(
            tested.contains(&n.as_str()),
            "golden case {n} is not tested"
        );
    }
}

/// Each case's full config as diffusers holds it after `from_config` (every
/// default filled in, plus the keys kept for compatible classes, and
/// DPM-Solver's `-Infinity`) resolves to the same schedule as the partial
/// config it was built from.
#[test]
fn full_saved_configs_give_the_same_schedule() {
    let index = index();
    let steps = index["num_inference_steps"].as_u64().unwrap() as usize;
    for (name, case) in index["schedulers"].as_object().unwrap() {
        let kind: SchedulerKind = case["class"].as_str().unwrap().parse().unwrap();
        let mut full = case["config"].as_object().unwrap().clone();
        full.insert("_class_name".into(), case["class"].clone());
        let full = SchedulerConfig::from_value(Value::Object(full)).unwrap();
        assert_eq!(full.kind().unwrap(), kind);
        let eta = case["step_kwargs"]["eta"].as_f64().unwrap_or(0.0);
        let a = build(&full, kind, steps, eta).unwrap();
        let b = build(&case_config(&index, case), kind, steps, eta).unwrap();
        assert_eq!(a.timesteps(), b.timesteps(), "{name}");
        assert_eq!(a.sigmas(), b.sigmas(), "{name}");
        assert_eq!(a.init_noise_sigma(), b.init_noise_sigma(), "{name}");
        // and the settings agree with the keys diffusers reports
        let settings = full.resolve(kind).unwrap();
        let spacing = match case["config"]["timestep_spacing"].as_str().unwrap() {
            "leading" => TimestepSpacing::Leading,
            "linspace" => TimestepSpacing::Linspace,
            _ => TimestepSpacing::Trailing,
        };
        assert_eq!(settings.timestep_spacing, spacing, "{name}");
        assert_eq!(
            settings.steps_offset,
            case["config"]["steps_offset"].as_i64().unwrap()
        );
    }
}

/// The per-class defaults that decide the schedule when a config is switched
/// to another class: index.json's `base_config` has no `timestep_spacing`,
/// so PNDM and DDIM fall back to "leading" and the others to "linspace".
#[test]
fn switching_class_uses_the_new_class_defaults() {
    let index = index();
    let base = SchedulerConfig::from_value(index["base_config"].clone()).unwrap();
    assert_eq!(base.kind().unwrap(), SchedulerKind::Pndm);
    for (name, case) in index["schedulers"].as_object().unwrap() {
        if !case["config_overrides"].as_object().unwrap().is_empty() {
            continue;
        }
        let kind: SchedulerKind = case["class"].as_str().unwrap().parse().unwrap();
        let eta = case["step_kwargs"]["eta"].as_f64().unwrap_or(0.0);
        let s = build(&base, kind, 10, eta).unwrap();
        let expected: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(s.timesteps(), expected.as_slice(), "{name}");
    }
}

/// `--scheduler euler` on a config saved by diffusers (which writes PNDM's
/// `"timestep_spacing": "leading"` explicitly) carries "leading" over — the
/// golden `euler_leading` case — while the 2022 SD 1.x config (no key) gives
/// "linspace", the golden `euler` case. The DPM override case does the same
/// with explicit `algorithm_type`/`solver_order`.
#[test]
fn saved_timestep_spacing_carries_over_to_euler() {
    let index = index();
    let saved = SchedulerConfig::from_file(std::path::Path::new(&format!(
        "{FIXTURES}/sd-tiny/torch/scheduler/scheduler_config.json"
    )))
    .unwrap();
    assert_eq!(saved.timestep_spacing.as_deref(), Some("leading"));
    let from_saved = build(&saved, SchedulerKind::Euler, 10, 0.0).unwrap();
    let leading = &index["schedulers"]["euler_leading"];
    let expected: Vec<f64> = leading["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(from_saved.timesteps(), expected.as_slice());
    assert!(close(
        from_saved.init_noise_sigma(),
        leading["init_noise_sigma"].as_f64().unwrap(),
        1e-6
    ));
    // the override in index.json is exactly that key
    assert_eq!(
        leading["config_overrides"],
        serde_json::json!({"timestep_spacing": "leading"})
    );

    let base = SchedulerConfig::from_value(index["base_config"].clone()).unwrap();
    let from_base = build(&base, SchedulerKind::Euler, 10, 0.0).unwrap();
    assert_eq!(from_base.timesteps()[0], 999.0);
    assert!(close(
        from_base.init_noise_sigma(),
        index["schedulers"]["euler"]["init_noise_sigma"]
            .as_f64()
            .unwrap(),
        1e-6
    ));

    let dpm = &index["schedulers"]["dpmpp_2m"];
    let with_overrides = build(
        &case_config(&index, dpm),
        SchedulerKind::DpmSolverMultistep,
        10,
        0.0,
    )
    .unwrap();
    let without = build(&base, SchedulerKind::DpmSolverMultistep, 10, 0.0).unwrap();
    // the overrides equal DPMSolverMultistepScheduler's defaults
    assert_eq!(with_overrides.timesteps(), without.timesteps());
    assert_eq!(with_overrides.sigmas(), without.sigmas());
}

/// The 3-step schedules of the generation goldens (PNDM: 4 UNet calls at
/// 667, 334, 334, 1; Euler: 999, 499.5, 0), both `from_config` of the SD 1.x
/// base dict.
#[test]
fn generation_goldens_schedules() {
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/goldens/generations/index.json")).unwrap();
    let gen_index = python_json(&text).unwrap();
    let base = SchedulerConfig::from_value(index()["base_config"].clone()).unwrap();
    let steps = gen_index["num_inference_steps"].as_u64().unwrap() as usize;
    for run in gen_index["runs"].as_array().unwrap() {
        let kind: SchedulerKind = run["scheduler_class"].as_str().unwrap().parse().unwrap();
        let s = build(&base, kind, steps, 0.0).unwrap();
        let expected: Vec<f64> = run["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(s.timesteps(), expected.as_slice(), "{}", run["name"]);
    }
}

/// Every key of `scheduler_config.json` that `SchedulerConfig` reads either
/// changes the numbers (timesteps, σ, initial noise scale or a step's
/// output, from fixed model outputs and noise) or is refused by name.
#[test]
fn every_config_key_changes_the_numbers_or_is_refused_by_name() {
    use SchedulerKind::*;
    let linear_betas: Vec<f64> = (0..1000).map(|i| 1e-4 + i as f64 * 2e-5).collect();
    let linear_betas = serde_json::to_string(&linear_betas).unwrap();
    // (class, a context both runs share, the key's value, refused by name)
    let cases: Vec<(SchedulerKind, &str, String, Option<&str>)> = vec![
        (Euler, "", r#""num_train_timesteps": 500"#.into(), None),
        (Euler, "", r#""beta_start": 0.001"#.into(), None),
        (Euler, "", r#""beta_end": 0.02"#.into(), None),
        (
            Euler,
            "",
            r#""beta_schedule": "squaredcos_cap_v2""#.into(),
            None,
        ),
        (
            Euler,
            "",
            format!(r#""trained_betas": {linear_betas}"#),
            None,
        ),
        (
            Euler,
            "",
            r#""prediction_type": "v_prediction""#.into(),
            None,
        ),
        (Euler, "", r#""timestep_spacing": "trailing""#.into(), None),
        (Ddim, "", r#""steps_offset": 5"#.into(), None),
        (Ddim, "", r#""rescale_betas_zero_snr": true"#.into(), None),
        (Ddim, "", r#""set_alpha_to_one": true"#.into(), None),
        (
            Pndm,
            "",
            r#""skip_prk_steps": false"#.into(),
            Some("skip_prk_steps"),
        ),
        (Ddim, "", r#""clip_sample": true"#.into(), None),
        (
            Ddim,
            "",
            r#""clip_sample": true, "clip_sample_range": 0.5"#.into(),
            None,
        ),
        (
            Ddim,
            "",
            r#""thresholding": true"#.into(),
            Some("thresholding"),
        ),
        (
            Euler,
            "",
            r#""interpolation_type": "log_linear""#.into(),
            None,
        ),
        (
            Euler,
            "",
            r#""timestep_type": "continuous", "prediction_type": "v_prediction""#.into(),
            None,
        ),
        (
            Euler,
            "",
            r#""use_karras_sigmas": true"#.into(),
            Some("use_karras_sigmas"),
        ),
        (
            Euler,
            "",
            r#""use_exponential_sigmas": true"#.into(),
            Some("use_exponential_sigmas"),
        ),
        (
            Euler,
            "",
            r#""use_beta_sigmas": true"#.into(),
            Some("use_beta_sigmas"),
        ),
        (
            Euler,
            "",
            r#""final_sigmas_type": "sigma_min""#.into(),
            None,
        ),
        (DpmSolverMultistep, "", r#""solver_order": 1"#.into(), None),
        (
            DpmSolverMultistep,
            "",
            r#""algorithm_type": "dpmsolver""#.into(),
            Some("algorithm_type"),
        ),
        (
            DpmSolverMultistep,
            "",
            r#""solver_type": "heun""#.into(),
            None,
        ),
        (
            DpmSolverMultistep,
            r#""solver_order": 3"#,
            r#""lower_order_final": false"#.into(),
            None,
        ),
        (
            DpmSolverMultistep,
            r#""final_sigmas_type": "sigma_min", "lower_order_final": false"#,
            r#""euler_at_final": true"#.into(),
            None,
        ),
        (
            DpmSolverMultistep,
            "",
            r#""lambda_min_clipped": -2.0"#.into(),
            None,
        ),
        (
            DpmSolverMultistep,
            "",
            r#""variance_type": "learned_range""#.into(),
            Some("variance_type"),
        ),
        (
            DpmSolverMultistep,
            "",
            r#""use_lu_lambdas": true"#.into(),
            Some("use_lu_lambdas"),
        ),
        (
            DpmSolverMultistep,
            "",
            r#""use_flow_sigmas": true"#.into(),
            Some("use_flow_sigmas"),
        ),
        (
            DpmSolverMultistep,
            "",
            r#""use_dynamic_shifting": true"#.into(),
            Some("use_dynamic_shifting"),
        ),
        (Lcm, "", r#""original_inference_steps": 20"#.into(), None),
        (Lcm, "", r#""timestep_scaling": 0.01"#.into(), None),
        (
            Lcm,
            "",
            r#""thresholding": true"#.into(),
            Some("thresholding"),
        ),
    ];
    let base = r#""beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "skip_prk_steps": true, "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false"#;
    let numbers = |kind: SchedulerKind, extra: &str| -> Result<Vec<f64>, String> {
        let text = format!(
            "{{{base}{}{extra}}}",
            if extra.is_empty() { "" } else { ", " }
        );
        // later keys win in serde_json: the case's value replaces the base's
        let config = SchedulerConfig::from_json_str(&text).map_err(|e| e.to_string())?;
        let steps = 4;
        let mut s = build(&config, kind, steps, 0.0).map_err(|e| e.to_string())?;
        let mut out: Vec<f64> = s.timesteps().to_vec();
        out.extend(s.sigmas().unwrap_or_default());
        out.push(s.init_noise_sigma());
        let shape = [1usize, 1, 2, 2];
        let mut x = ArrayD::from_shape_vec(shape.to_vec(), vec![3.0f32, -2.0, 0.5, 1.5]).unwrap();
        let eps = ArrayD::from_shape_vec(shape.to_vec(), vec![0.3f32, -0.7, 1.1, 0.2]).unwrap();
        let z = ArrayD::from_shape_vec(shape.to_vec(), vec![-0.4f32, 0.9, 0.1, -1.2]).unwrap();
        for call in 0..s.timesteps().len() {
            let input = s
                .scale_model_input(x.view(), call)
                .map_err(|e| e.to_string())?;
            out.extend(input.iter().map(|&v| f64::from(v)));
            // a different model output at every call, as a UNet gives:
            // multistep schedulers' corrections vanish on constant outputs
            let eps = eps.mapv(|v| v * (1.0 + 0.3 * call as f32));
            x = s
                .step(eps.view(), call, x.view(), &mut |_| z.clone())
                .map_err(|e| e.to_string())?;
            out.extend(x.iter().map(|&v| f64::from(v)));
        }
        Ok(out)
    };
    for (kind, context, extra, refused) in &cases {
        let plain = numbers(*kind, context).unwrap();
        let with = if context.is_empty() {
            extra.clone()
        } else {
            format!("{context}, {extra}")
        };
        match (numbers(*kind, &with), refused) {
            (Err(e), Some(key)) => assert!(e.contains(key), "{kind} {extra}: {e}"),
            (Ok(_), Some(key)) => panic!("{kind} {extra}: accepted, expected {key} refused"),
            (Err(e), None) => panic!("{kind} {extra}: {e}"),
            (Ok(changed), None) => assert_ne!(changed, plain, "{kind} {extra}: nothing changed"),
        }
    }
    // every key SchedulerConfig reads appears in a case (or is the class name)
    let read = [
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
        "set_alpha_to_one",
        "skip_prk_steps",
        "clip_sample",
        "clip_sample_range",
        "thresholding",
        "interpolation_type",
        "timestep_type",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "final_sigmas_type",
        "solver_order",
        "algorithm_type",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "lambda_min_clipped",
        "variance_type",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "use_dynamic_shifting",
        "original_inference_steps",
        "timestep_scaling",
    ];
    for key in read {
        assert!(
            cases
                .iter()
                .any(|(_, _, e, _)| e.contains(&format!("\"{key}\""))),
            "{key} has no case"
        );
    }
    let declared = SchedulerConfig::from_json_str("{}").unwrap();
    let fields = format!("{declared:?}").matches(": None").count();
    assert_eq!(
        fields,
        read.len() + 1,
        "a field of SchedulerConfig has no case (class_name aside)"
    );
}
