//! `edit --debias` on the toy model: "a circle" (red in the toy world)
//! debiased to half red, half blue, measured on seeds the loop never drew.

use std::path::{Path, PathBuf};

mod common;

use common::cpu_threads;
use time_onnx::edit::record::DebiasRecord;
use time_onnx::eval::{Classifier, ClassifierSpec};
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::runtime::Runtime;
use time_onnx::text::TextSide;
use time_onnx::workflow::debias::{DebiasRequest, Drawing, JUDGE_SEEDS, picks, run};
use time_onnx::workflow::edit::EditRequest;
use time_onnx::workflow::generate::Generator;

fn toy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/toy")
}

const ATTRIBUTES: [&str; 2] = ["a red circle", "a blue circle"];

fn drawing() -> Drawing {
    // eval's protocol on the toy model
    Drawing {
        steps: 25,
        guidance: Some(7.5),
        scheduler: Some(SchedulerKind::Ddim),
    }
}

#[test]
fn a_circle_debiased_to_half_red_half_blue_lands_within_ten_points_over_64_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let op = tmp.path().join("debias.safetensors");
    let req = DebiasRequest {
        edit: EditRequest {
            save_operator: Some(op.clone()),
            debias: Some(DebiasRecord {
                attributes: ATTRIBUTES.map(String::from).to_vec(),
                wanted: vec![0.5, 0.5],
                weights: vec![0.0, 0.0],
            }),
            ..EditRequest::new(TextSide::from_model_dir(&toy()).unwrap(), "a circle", "")
        },
        model: toy(),
        judge: ClassifierSpec::Toy,
        images: 64,
        tolerance: 0.05,
        max_rounds: 30,
        step: 0.1,
        drawing: drawing(),
        session: cpu_threads(2),
    };
    let report = run(&req, &mut |r| eprintln!("{:?} → {:?}", r.weights, r.shares)).unwrap();
    let first = &report.rounds[0];
    assert!(
        first.shares[0] > 0.9,
        "the toy draws circles red: {first:?}"
    );
    // measured on seeds of its own, far from 0..64
    assert!(report.rounds.iter().all(|r| r.seeds.start >= JUDGE_SEEDS));

    let rt = Runtime::load().unwrap();
    let mut g = Generator::open(&rt, &toy(), None, cpu_threads(2)).unwrap();
    let mut judge = Classifier::open(&ClassifierSpec::Toy, &rt, &toy(), cpu_threads(2)).unwrap();
    let (operator, meta) = time_onnx::edit::operator_file::load(&op).unwrap();
    assert_eq!(
        meta.spec.debias.as_ref().unwrap().attributes,
        ATTRIBUTES.to_vec()
    );
    // Each attribute's share of all images (a circle of a third colour
    // counts for neither), on seeds the loop never drew.
    let mut measure = |seeds: std::ops::Range<u64>| {
        let n = (seeds.end - seeds.start) as f64;
        let p = picks(
            &mut g,
            &mut judge,
            Some(&operator),
            "a circle",
            &ATTRIBUTES,
            seeds,
            &drawing(),
        )
        .unwrap();
        (0..2)
            .map(|j| p.iter().filter(|p| **p == Some(j)).count() as f64 / n)
            .collect::<Vec<f64>>()
    };
    // The 64 scoring seeds, 0..64 (a share near one half spreads by
    // ±6 points over 64 images), and 256 more the loop never drew either.
    let scored = measure(0..64);
    let held_out = measure(HELD_OUT..HELD_OUT + 256);
    eprintln!(
        "{} rounds, converged {}; shares (red, blue) over seeds 0..64: {scored:?}; over 256 \
         held-out seeds: {held_out:?}",
        report.rounds.len(),
        report.converged
    );
    assert!(report.converged);
    for (seeds, mix) in [("0..64", &scored), ("256 held-out seeds", &held_out)] {
        assert!(
            mix.iter().all(|s| (s - 0.5).abs() <= 0.1),
            "shares over {seeds}: {mix:?}"
        );
    }
}

/// Seeds neither the loop ([`JUDGE_SEEDS`] on) nor a user's small seeds touch.
const HELD_OUT: u64 = 1 << 41;
