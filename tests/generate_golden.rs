//! `generate` against the fixture script's 3-step runs through onnxruntime
//! with diffusers' schedulers (its loop matches diffusers'
//! OnnxStableDiffusionPipeline to 8.3e-7 where that pipeline runs).

use std::path::{Path, PathBuf};

mod common;

use common::{
    FIXTURES, cpu_threads, edit_request, generate, max_abs_diff, npy, read_png_text,
    with_base_scheduler_config,
};
use ndarray::ArrayD;
use serde_json::Value;
use time_onnx::pipeline::png::write_png;
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::runtime::{Runtime, SessionOptions};
use time_onnx::workflow::edit::{self, EditRequest};
use time_onnx::workflow::generate::{Generator, Params};

fn index() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURES}/goldens/generations/index.json")).unwrap(),
    )
    .unwrap()
}

/// The edit the "edited" goldens carry: roses → blue roses, λ 0.1, K+V.
fn edited_unet(layout: &str, dir: &Path) -> PathBuf {
    let root = PathBuf::from(format!("{FIXTURES}/sd-tiny/{layout}"));
    let out = dir.join("unet.onnx");
    edit::run(&EditRequest {
        unet: Some(root.join("unet/model.onnx")),
        output: Some(out.clone()),
        ..edit_request(layout, "A pack of roses", "A pack of blue roses")
    })
    .unwrap();
    out
}

fn params(run: &Value, latents: &ArrayD<f32>, scheduler: SchedulerKind) -> Params {
    Params {
        steps: 3,
        guidance: 7.5,
        negative_prompt: run["negative_prompt"].as_str().unwrap_or("").to_string(),
        num_images: 1,
        height: 128,
        width: 128,
        seed: 0,
        latents: Some(latents.clone()),
        scheduler: Some(scheduler),
        eta: 0.0,
    }
}

fn cpu() -> SessionOptions {
    cpu_threads(1)
}

fn check_runs(layout_filter: &str) {
    let rt = Runtime::load().unwrap();
    let latents = npy(&PathBuf::from(format!(
        "{FIXTURES}/goldens/generations/latents.npy"
    )));
    let tmp = tempfile::tempdir().unwrap();
    for run in index()["runs"].as_array().unwrap() {
        let layout = run["layout"].as_str().unwrap();
        if layout != layout_filter {
            continue;
        }
        let name = run["name"].as_str().unwrap();
        let unet = run["edited"]
            .as_bool()
            .unwrap()
            .then(|| edited_unet(layout, tmp.path()));
        let golden = npy(&PathBuf::from(format!(
            "{FIXTURES}/goldens/generations/{}",
            run["file"].as_str().unwrap()
        )));
        // The goldens' schedulers come from diffusers' SD 1.x base config,
        // which has no `timestep_spacing` (Euler: linspace), not from the
        // saved file (which says "leading").
        let folder = with_base_scheduler_config(layout);
        // With 2 threads a guided batch runs as two concurrent runs, one per
        // half; with 1 as one run.
        for threads in [1, 2] {
            let mut g =
                Generator::open(&rt, folder.path(), unet.as_deref(), cpu_threads(threads)).unwrap();
            let kind: SchedulerKind = run["scheduler"].as_str().unwrap().parse().unwrap();
            let image = generate(&mut g, "A pack of roses", &params(run, &latents, kind))
                .unwrap()
                .pixels
                .into_dyn();
            let err = max_abs_diff(&image, &golden);
            eprintln!("{name}, {threads} thread(s): max abs diff {err:.2e}");
            assert!(
                err <= 1e-4,
                "{name}, {threads} thread(s): max abs diff {err:e} > 1e-4"
            );
        }
    }
}

#[test]
fn optimum_layout_matches_reference_generations() {
    check_runs("optimum");
}

#[test]
fn diffusers_script_layout_matches_reference_generations() {
    check_runs("diffusers-onnx");
}

/// fp16 UNets compute in half precision: their images stay within 2e-2 of
/// the fp32 reference.
#[test]
fn fp16_unets_are_within_fp16_tolerance() {
    let rt = Runtime::load().unwrap();
    let latents = npy(&PathBuf::from(format!(
        "{FIXTURES}/goldens/generations/latents.npy"
    )));
    let golden = npy(&PathBuf::from(format!(
        "{FIXTURES}/goldens/generations/optimum.pndm.noneg.orig.npy"
    )));
    let run = serde_json::json!({ "negative_prompt": null });
    for (flavour, threads) in [("fp16", 1), ("fp16-io32", 1), ("fp16", 2)] {
        let mut g = Generator::open(
            &rt,
            &PathBuf::from(format!("{FIXTURES}/sd-tiny/{flavour}")),
            None,
            cpu_threads(threads),
        )
        .unwrap();
        let image = generate(
            &mut g,
            "A pack of roses",
            &params(&run, &latents, SchedulerKind::Pndm),
        )
        .unwrap()
        .pixels
        .into_dyn();
        let err = max_abs_diff(&image, &golden);
        eprintln!("{flavour}, {threads} thread(s): max abs diff {err:.2e}");
        assert!(err <= 2e-2, "{flavour}: {err}");
    }
}

/// A generator that ran a guided batch (two concurrent runs) and is then
/// asked for one unguided image (a batch that does not split) reopens its
/// UNet as one run, and gives what a fresh generator gives.
#[test]
fn a_batch_that_does_not_split_reopens_the_unet() {
    let rt = Runtime::load().unwrap();
    let latents = npy(&PathBuf::from(format!(
        "{FIXTURES}/goldens/generations/latents.npy"
    )));
    let dir = PathBuf::from(format!("{FIXTURES}/sd-tiny/optimum"));
    let run = serde_json::json!({ "negative_prompt": null });
    let guided = params(&run, &latents, SchedulerKind::Pndm);
    let unguided = Params {
        guidance: 1.0,
        ..guided.clone()
    };
    let mut reused = Generator::open(&rt, &dir, None, cpu_threads(2)).unwrap();
    generate(&mut reused, "A pack of roses", &guided).unwrap();
    let after = generate(&mut reused, "A pack of roses", &unguided).unwrap();
    let mut fresh = Generator::open(&rt, &dir, None, cpu_threads(2)).unwrap();
    let fresh = generate(&mut fresh, "A pack of roses", &unguided).unwrap();
    let err = max_abs_diff(&after.pixels.into_dyn(), &fresh.pixels.into_dyn());
    assert!(err <= 1e-6, "max abs diff {err:e}");
}

#[test]
fn png_text_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.png");
    let img = ndarray::Array3::from_shape_fn((4, 6, 3), |(y, x, c)| ((y + x + c) % 5) as f32 / 4.0);
    let text = vec![
        ("prompt".to_string(), "A pack of roses".to_string()),
        (
            "negative_prompt".to_string(),
            "東京の夜景 — not Latin-1".to_string(),
        ),
        ("seed".to_string(), "42".to_string()),
    ];
    write_png(&path, img.view(), &text).unwrap();
    let mut back = read_png_text(&path);
    back.sort();
    let mut want = text.clone();
    want.sort();
    assert_eq!(back, want);
    let decoded = image::open(&path).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (6, 4));
    assert_eq!(decoded.get_pixel(1, 0).0, [64, 128, 191]);
}

/// With a safety checker in the folder, the flagged image comes back black
/// (diffusers' pipeline reports nsfw_content_detected [True] for this run);
/// `--no-safety-checker` gives the unchecked image.
#[test]
fn safety_checker_runs_when_the_folder_has_one() {
    let rt = Runtime::load().unwrap();
    let latents = npy(&PathBuf::from(format!(
        "{FIXTURES}/goldens/generations/latents.npy"
    )));
    let golden = npy(&PathBuf::from(format!(
        "{FIXTURES}/goldens/generations/diffusers-onnx.pndm.noneg.orig.npy"
    )));
    let dir = with_base_scheduler_config("with-safety");
    let run = serde_json::json!({ "negative_prompt": null });
    for skip in [false, true] {
        let mut g = Generator::open(&rt, dir.path(), None, cpu()).unwrap();
        if skip {
            g = g.without_safety_checker();
        }
        assert_eq!(g.has_safety_checker(), !skip);
        let images = generate(
            &mut g,
            "A pack of roses",
            &params(&run, &latents, SchedulerKind::Pndm),
        )
        .unwrap();
        let (image, flags) = (images.pixels, images.flagged);
        if skip {
            assert_eq!(flags, vec![false]);
            assert!(max_abs_diff(&image.into_dyn(), &golden) <= 1e-4);
        } else {
            assert_eq!(flags, vec![true]);
            assert!(
                image.iter().all(|&v| v == 0.0),
                "the flagged image was not blacked out"
            );
        }
    }
}
