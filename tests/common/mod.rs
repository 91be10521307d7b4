//! Helpers shared by the integration tests. Each test file is its own crate
//! and uses a part of these, hence `allow(dead_code)`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use time_onnx::eval::ClassifierSpec;
use time_onnx::onnx::Model;
use time_onnx::onnx::patch::{Copying, TensorPatch, WriteError, Written};
use time_onnx::pipeline::png::read_npy;
use time_onnx::pipeline::schedulers::SchedulerKind;
use time_onnx::pipeline::schedulers::python_json;
use time_onnx::runtime::GraphOptimization;
use time_onnx::runtime::{Device, SessionOptions};
use time_onnx::text::TextSide;
use time_onnx::workflow::edit::EditRequest;
use time_onnx::workflow::eval::EvalRequest;
use time_onnx::workflow::generate::{GenerateError, Generator, Images, Params};

/// `tests/fixtures`.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A path under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

/// A float32 .npy file as an array.
pub fn npy(path: &Path) -> ArrayD<f32> {
    let (shape, data) = read_npy(path).unwrap();
    ArrayD::from_shape_vec(shape, data).unwrap()
}

/// max |a − b| over arrays of one shape.
pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// max |got − want| / max |want|: an edited weight's error relative to its
/// largest magnitude, as the edit goldens are held to.
pub fn relative_error<'a>(got: impl IntoIterator<Item = &'a f64>, want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.into_iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// CPU sessions with `threads` intra-op threads.
pub fn cpu_threads(threads: usize) -> SessionOptions {
    SessionOptions {
        device: Device::Cpu,
        threads: Some(threads),
        ..SessionOptions::default()
    }
}

/// `source` → `destination` with the reference's defaults and the text
/// side of fixture flavour `flavour` (operator only; set the rest with
/// struct update syntax).
pub fn edit_request(flavour: &str, source: &str, destination: &str) -> EditRequest {
    let dir = fixture(&format!("sd-tiny/{flavour}"));
    let text = TextSide::single(dir.join("text_encoder/model.onnx"), dir.join("tokenizer"));
    EditRequest::new(text, source, destination)
}

/// A model folder that is fixture flavour `flavour` with the scheduler
/// config the goldens were made with (diffusers' SD 1.x base config, which
/// has no `timestep_spacing`) instead of the saved one: every other entry is
/// a link to the fixture's.
pub fn with_base_scheduler_config(flavour: &str) -> tempfile::TempDir {
    let src = fixture(&format!("sd-tiny/{flavour}"));
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "scheduler" {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let index = std::fs::read_to_string(fixture("goldens/schedulers/index.json")).unwrap();
    let config = python_json(&index).unwrap()["base_config"].clone();
    std::fs::create_dir(dir.path().join("scheduler")).unwrap();
    std::fs::write(
        dir.path().join("scheduler/scheduler_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    dir
}

/// Embeds `prompt` (and the negative prompt of `p`) and generates.
pub fn generate(g: &mut Generator, prompt: &str, p: &Params) -> Result<Images, GenerateError> {
    let emb = g.embed(prompt, &p.negative_prompt)?;
    g.generate(&emb, p, &mut |_, _| {})
}

/// Writes `model` with `patches` and `metadata` to `output` in one go.
pub fn write_patched(
    model: &Model,
    patches: &[TensorPatch],
    metadata: &[(String, String)],
    output: &Path,
) -> Result<Written, WriteError> {
    Copying::start(model, output)?.finish(model, patches, metadata, &mut |_, _| {})
}

/// The text chunks of a PNG: Latin-1 ones, then UTF-8 ones.
pub fn read_png_text(path: &Path) -> Vec<(String, String)> {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let reader = png::Decoder::new(file).read_info().unwrap();
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), t.get_text().unwrap()));
    }
    out
}

/// A small toy-world evaluation of `dataset` on `model` into `out`: 2 seeds,
/// 3 DDIM steps, λ = 10, the toy judge, on the CPU.
pub fn eval_request(model: &Path, dataset: &Path, out: &Path) -> EvalRequest {
    EvalRequest {
        max_memory: None,
        model: model.to_path_buf(),
        dataset: dataset.to_path_buf(),
        rows: None,
        shard: None,
        seeds: 2,
        steps: 3,
        guidance: 7.5,
        lambda: 10.0,
        preserve: None,
        all_at_once: false,
        scheduler: SchedulerKind::Ddim,
        batch: 16,
        classifier: ClassifierSpec::Toy,
        output: out.to_path_buf(),
        resume: false,
        session: SessionOptions {
            device: Device::Cpu,
            threads: None,
            optimization: GraphOptimization::Extended,
            few_runs: false,
        },
    }
}

/// A folder of symbolic links, each name to its target: a model folder
/// assembled from fixture parts.
pub fn folder_of(parts: &[(&str, PathBuf)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, target) in parts {
        std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap();
    }
    dir
}

/// The parts of the tiny SDXL fixture (`sdxl-tiny/optimum`) but `except`,
/// named as in the folder, for [`folder_of`].
pub fn sdxl_parts(except: &[&str]) -> Vec<(&'static str, PathBuf)> {
    [
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "unet",
        "vae_decoder",
        "scheduler",
        "model_index.json",
    ]
    .into_iter()
    .filter(|p| !except.contains(p))
    .map(|p| (p, fixture("sdxl-tiny/optimum").join(p)))
    .collect()
}

/// A copy of the model at `src` in the folder `dst`, every initializer
/// stored in `dst/model.onnx_data` (64-byte aligned, as ONNX's saver does
/// not promise but optimum's large exports have), the layout of optimum's
/// SDXL exports, which the fixtures are too small to have.
pub fn with_external_data(src: &Path, dst: &Path) {
    use prost::Message;
    use time_onnx::onnx::proto::{DATA_LOCATION_EXTERNAL, ModelProto, StringStringEntryProto};
    let mut proto = ModelProto::decode(std::fs::read(src).unwrap().as_slice()).unwrap();
    let mut data = Vec::new();
    for t in &mut proto.graph.as_mut().unwrap().initializer {
        if t.raw_data.is_empty() {
            continue;
        }
        data.resize(data.len().next_multiple_of(64), 0);
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: key.into(),
            value,
        };
        t.external_data = vec![
            entry("location", "model.onnx_data".into()),
            entry("offset", data.len().to_string()),
            entry("length", t.raw_data.len().to_string()),
        ];
        data.extend_from_slice(&t.raw_data);
        t.raw_data = Default::default();
        t.data_location = DATA_LOCATION_EXTERNAL;
    }
    std::fs::create_dir_all(dst).unwrap();
    std::fs::write(dst.join("model.onnx"), proto.encode_to_vec()).unwrap();
    std::fs::write(dst.join("model.onnx_data"), data).unwrap();
}
