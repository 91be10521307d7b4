//! SDXL, SDXL-Turbo, SD-Turbo and LCM against independent references
//! (scripts/_fixtures_sdxl.py): diffusers' `encode_prompt` and TIME in
//! float64 on the torch SDXL pipeline, optimum's ONNX Runtime pipelines for
//! generations, diffusers' guidance embedding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;

use common::{cpu_threads, fixture, folder_of, max_abs_diff, npy, relative_error, sdxl_parts};
use ndarray::{ArrayD, Axis};
use serde_json::Value;
use time_onnx::edit::operator_file;
use time_onnx::pipeline::conditioning::guidance_embedding;
use time_onnx::runtime::{GraphOptimization, Runtime, SessionOptions};
use time_onnx::text::encoder::TextEncoders;
use time_onnx::text::{TextSide, Tokenizers};
use time_onnx::workflow::edit::{self, EditRequest};
use time_onnx::workflow::generate::{Generator, Params};

fn sdxl(flavour: &str) -> PathBuf {
    fixture(&format!("sdxl-tiny/{flavour}"))
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

/// Every tensor of a safetensors golden as f64, by name.
fn tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, t)| {
            let v: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                _ => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
            };
            (k, (t.shape().to_vec(), v))
        })
        .collect()
}

fn max_diff(ours: impl IntoIterator<Item = f32>, want: &[f64]) -> f64 {
    ours.into_iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a as f64 - b).abs()))
}

/// Both encoders' penultimate states, concatenated in order, and the second
/// one's pooled output: diffusers' `encode_prompt` to 1e-5.
#[test]
fn text_encoders_give_encode_prompts_embeddings() {
    let rt = Runtime::load().unwrap();
    let side = TextSide::from_model_dir(&sdxl("optimum")).unwrap();
    assert_eq!(side.encoders.len(), 2);
    let tok = Tokenizers::open(&side).unwrap();
    let mut enc = TextEncoders::open(&rt, &side, cpu_threads(1)).unwrap();
    let index = json("goldens/sdxl/text.json");
    let golden = tensors(&fixture("goldens/sdxl/text.safetensors"));
    for (i, prompt) in index["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = prompt.as_str().unwrap();
        let emb = enc.embed(&[tok.encode_padded(prompt).unwrap()]).unwrap();
        assert_eq!(emb.widths, vec![16, 32], "the first encoder first");
        let (shape, want) = &golden[&format!("embeds.{i}")];
        assert_eq!(&emb.context.shape()[1..], &shape[..]);
        let d = max_diff(emb.context.iter().copied(), want);
        assert!(d <= 1e-5, "{prompt:?}: context off by {d:.2e}");
        let pooled = emb.pooled.as_ref().expect("SDXL gives a pooled embedding");
        let d = max_diff(pooled.iter().copied(), &golden[&format!("pooled.{i}")].1);
        assert!(d <= 1e-5, "{prompt:?}: pooled off by {d:.2e}");
    }
}

/// More prompts than one text encoder run takes: every row, context and
/// pooled, is still diffusers' embedding of its own prompt, in order.
#[test]
fn prompts_beyond_one_batch_keep_their_embeddings_in_order() {
    let rt = Runtime::load().unwrap();
    let side = TextSide::from_model_dir(&sdxl("optimum")).unwrap();
    let tok = Tokenizers::open(&side).unwrap();
    let mut enc = TextEncoders::open(&rt, &side, cpu_threads(1)).unwrap();
    let index = json("goldens/sdxl/text.json");
    let golden = tensors(&fixture("goldens/sdxl/text.safetensors"));
    let prompts: Vec<&str> = index["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let n = 2 * time_onnx::text::encoder::BATCH + 3;
    let ids: Vec<_> = (0..n)
        .map(|r| tok.encode_padded(prompts[r % prompts.len()]).unwrap())
        .collect();
    let emb = enc.embed(&ids).unwrap();
    let pooled = emb.pooled.as_ref().expect("SDXL gives a pooled embedding");
    assert_eq!((emb.context.shape()[0], pooled.nrows()), (n, n));
    for r in 0..n {
        let i = r % prompts.len();
        let d = max_diff(
            emb.context.index_axis(ndarray::Axis(0), r).iter().copied(),
            &golden[&format!("embeds.{i}")].1,
        );
        assert!(d <= 1e-5, "row {r}: context off by {d:.2e}");
        let d = max_diff(
            pooled.row(r).iter().copied(),
            &golden[&format!("pooled.{i}")].1,
        );
        assert!(d <= 1e-5, "row {r}: pooled off by {d:.2e}");
    }
}

/// `force_zeros_for_empty_prompt`: no negative prompt gives zeros for the
/// unconditional row (context and pooled); a negative prompt gives its
/// embeddings, as diffusers' SDXL pipeline does.
#[test]
fn no_negative_prompt_is_zeros_and_a_negative_prompt_is_embedded() {
    let rt = Runtime::load().unwrap();
    let mut g = Generator::open(&rt, &sdxl("optimum"), None, cpu_threads(1)).unwrap();
    let index = json("goldens/sdxl/text.json");
    let prompt = index["negative"]["prompt"].as_str().unwrap();
    let negative = index["negative"]["negative_prompt"].as_str().unwrap();
    let none = g.embed(prompt, "").unwrap();
    assert!(
        none.context
            .index_axis(Axis(0), 0)
            .iter()
            .all(|&v| v == 0.0)
    );
    assert!(
        none.pooled
            .as_ref()
            .unwrap()
            .row(0)
            .iter()
            .all(|&v| v == 0.0)
    );
    let golden = tensors(&fixture("goldens/sdxl/text.safetensors"));
    let with = g.embed(prompt, negative).unwrap();
    let d = max_diff(
        with.context.index_axis(Axis(0), 0).iter().copied(),
        &golden["negative.embeds"].1,
    );
    assert!(d <= 1e-5, "negative context off by {d:.2e}");
    let d = max_diff(
        with.pooled.as_ref().unwrap().row(0).iter().copied(),
        &golden["negative.pooled"].1,
    );
    assert!(d <= 1e-5, "negative pooled off by {d:.2e}");
}

/// TIME on the SDXL UNet (every attn2 K/V, the 48-wide context of both
/// encoders) against the closed form in float64 on the torch pipeline.
fn check_edit(flavour: &str, tolerance: f64) {
    let index = json("goldens/sdxl/time/cases.json");
    for case in index["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let [source, destination] =
            [0, 1].map(|k| case["edits"][0][k].as_str().unwrap().to_string());
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("w.safetensors");
        let unet = sdxl(flavour).join("unet/model.onnx");
        let report = edit::run(&EditRequest {
            unet: Some(unet),
            output: Some(tmp.path().join("unet/model.onnx")),
            lambda: case["lambda"].as_f64().unwrap(),
            augmentations: case["augmentations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect(),
            save_weights: Some(weights.clone()),
            ..EditRequest::new(
                TextSide::from_model_dir(&sdxl(flavour)).unwrap(),
                source,
                destination,
            )
        })
        .unwrap_or_else(|e| panic!("{flavour}/{name}: {e}"));
        let expected = tensors(&fixture(&format!(
            "goldens/sdxl/time/{}",
            case["file"].as_str().unwrap()
        )));
        let ours = tensors(&weights);
        let modules = index["kv_modules"].as_array().unwrap();
        assert_eq!(report.layers.len(), modules.len(), "{flavour}: every K/V");
        let mut worst = 0.0f64;
        for m in modules {
            let key = format!("{}.weight", m.as_str().unwrap());
            let (shape, want) = &expected[&key];
            let (got_shape, got) = ours.get(&key).unwrap_or_else(|| panic!("no {key}"));
            assert_eq!(got_shape, shape, "{key}");
            let err = relative_error(got, want);
            worst = worst.max(err);
            assert!(
                err <= tolerance,
                "{flavour}/{name}: {key} off by {err:.2e} of its max (tolerance {tolerance:e})"
            );
        }
        eprintln!("{flavour}/{name}: worst relative error {worst:.2e}");
    }
}

#[test]
fn edit_matches_time_in_float64_fp32_external_data() {
    check_edit("optimum", 1e-5);
}

/// fp16: the weights we start from are fp16 roundings of the reference's
/// and the result is rounded again (two half-ulps, see edit_golden.rs).
#[test]
fn edit_matches_time_in_float64_fp16() {
    check_edit("fp16", 1e-3);
}

#[test]
fn edit_matches_time_in_float64_fp16_with_float32_inputs() {
    check_edit("fp16-io32", 1e-3);
}

/// 3 Euler steps of diffusers' SDXL `__call__` (optimum's
/// ORTStableDiffusionXLPipeline) from fixed latents, with and without a
/// negative prompt: fp32 to 1e-4, the fp16 UNets to 2e-2 of the fp32
/// reference.
#[test]
fn generations_match_the_ort_sdxl_pipeline() {
    let rt = Runtime::load().unwrap();
    let index = json("goldens/sdxl/generations/index.json");
    let latents = npy(&fixture("goldens/sdxl/generations/latents.npy"));
    for (flavour, tolerance) in [("optimum", 1e-4), ("fp16", 2e-2), ("fp16-io32", 2e-2)] {
        let mut g = Generator::open(&rt, &sdxl(flavour), None, cpu_threads(2)).unwrap();
        assert_eq!(g.default_guidance(), 5.0, "diffusers' SDXL default");
        for run in index["runs"].as_array().unwrap() {
            let p = params(&index, run, &latents);
            let emb = g
                .embed(index["prompt"].as_str().unwrap(), &p.negative_prompt)
                .unwrap();
            let img = g
                .generate(&emb, &p, &mut |_, _| {})
                .unwrap()
                .pixels
                .into_dyn();
            let golden = npy(&fixture(&format!(
                "goldens/sdxl/generations/{}",
                run["file"].as_str().unwrap()
            )));
            let d = max_abs_diff(&img, &golden);
            eprintln!("{flavour} {}: {d:.2e}", run["name"]);
            assert!(d <= tolerance, "{flavour} {}: {d:.2e}", run["name"]);
        }
    }
}

fn params(index: &Value, run: &Value, latents: &ArrayD<f32>) -> Params {
    Params {
        steps: run["steps"].as_u64().or(index["steps"].as_u64()).unwrap() as usize,
        guidance: run["guidance_scale"]
            .as_f64()
            .or(index["guidance_scale"].as_f64())
            .unwrap(),
        negative_prompt: run["negative_prompt"].as_str().unwrap_or("").to_string(),
        num_images: 1,
        height: 128,
        width: 128,
        seed: index["seed"].as_u64().unwrap_or(0),
        latents: Some(latents.clone()),
        scheduler: None,
        eta: 0.0,
    }
}

/// SDXL-Turbo (Euler ancestral, trailing, guidance off), SD-Turbo (Euler,
/// trailing), LCM (LCMScheduler and the guidance embedding, no CFG) from
/// each folder's scheduler config: every noise draw replayed from our RNG
/// by the reference.
#[test]
fn few_step_generations_match_the_ort_pipelines() {
    let rt = Runtime::load().unwrap();
    let index = json("goldens/sdxl/fast/index.json");
    let latents = npy(&fixture("goldens/sdxl/generations/latents.npy"));
    for run in index["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let folder = fixture(run["folder"].as_str().unwrap());
        let mut g = Generator::open(&rt, &folder, None, cpu_threads(2)).unwrap();
        let p = params(&index, run, &latents);
        assert_eq!(
            g.scheduler_kind(&p).unwrap().class_name(),
            run["scheduler"].as_str().unwrap(),
            "{name}: the folder's scheduler"
        );
        let emb = g
            .embed(index["prompt"].as_str().unwrap(), &p.negative_prompt)
            .unwrap();
        let mut calls = 0;
        let img = g
            .generate(&emb, &p, &mut |done, _| calls = done)
            .unwrap()
            .pixels
            .into_dyn();
        assert_eq!(calls, run["timesteps"].as_array().unwrap().len(), "{name}");
        let golden = npy(&fixture(&format!(
            "goldens/sdxl/fast/{}",
            run["file"].as_str().unwrap()
        )));
        let d = max_abs_diff(&img, &golden);
        eprintln!("{name}: {d:.2e}");
        assert!(d <= 1e-4, "{name}: {d:.2e}");
    }
}

#[test]
fn guidance_embedding_matches_diffusers() {
    let index = json("goldens/sdxl/fast/guidance_embedding.json");
    let golden = tensors(&fixture("goldens/sdxl/fast/guidance_embedding.safetensors"));
    for case in index["cases"].as_array().unwrap() {
        let g = case["guidance_scale"].as_f64().unwrap();
        let dim = case["embedding_dim"].as_u64().unwrap() as usize;
        let ours = guidance_embedding(g, dim);
        let (shape, want) = &golden[case["key"].as_str().unwrap()];
        assert_eq!(shape, &vec![dim]);
        let d = max_diff(ours, want);
        assert!(d <= 1e-5, "w = {g}, dim {dim}: {d:.2e}");
    }
}

/// The 48×48 operator (`--save-operator`) applied to the embeddings of the
/// unedited SDXL UNet draws what the edited UNet draws, and records both
/// text encoders' fingerprints.
#[test]
fn an_sdxl_operator_draws_what_the_edited_unet_draws() {
    let rt = Runtime::load().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let folder = sdxl("optimum");
    let side = TextSide::from_model_dir(&folder).unwrap();
    let (unet, op) = (tmp.path().join("unet/model.onnx"), tmp.path().join("op.st"));
    edit::run(&EditRequest {
        unet: Some(folder.join("unet/model.onnx")),
        output: Some(unet.clone()),
        save_operator: Some(op.clone()),
        ..EditRequest::new(side.clone(), "A pack of roses", "A pack of blue roses")
    })
    .unwrap();
    let (operator, meta) = operator_file::load(&op).unwrap();
    assert_eq!(operator.dim(), 48);
    assert_eq!(meta.text_encoder, side.fingerprint().unwrap());
    assert_eq!(meta.text_encoder.split('+').count(), 2, "both encoders");

    let index = json("goldens/sdxl/generations/index.json");
    let latents = npy(&fixture("goldens/sdxl/generations/latents.npy"));
    let p = params(&index, &index["runs"][1], &latents);
    let prompt = "A pack of roses";
    let mut edited = Generator::open(&rt, &folder, Some(&unet), cpu_threads(2)).unwrap();
    let emb = edited.embed(prompt, &p.negative_prompt).unwrap();
    let a = edited.generate(&emb, &p, &mut |_, _| {}).unwrap().pixels;
    let mut with_op = Generator::open(&rt, &folder, None, cpu_threads(2)).unwrap();
    with_op
        .set_edit_operators(&[(operator, meta)], false)
        .unwrap();
    let emb = with_op.embed(prompt, &p.negative_prompt).unwrap();
    let b = with_op
        .generate(&emb, &p, &mut |_, _| {})
        .unwrap()
        .pixels
        .into_dyn();
    let d = max_abs_diff(&a.into_dyn(), &b);
    assert!(d <= 1e-5, "operator vs edited UNet: {d:.2e}");
    let mut plain = Generator::open(&rt, &folder, None, cpu_threads(2)).unwrap();
    let emb = plain.embed(prompt, &p.negative_prompt).unwrap();
    let c = plain.generate(&emb, &p, &mut |_, _| {}).unwrap().pixels;
    assert!(
        max_abs_diff(&b, &c.into_dyn()) > 1e-3,
        "the edit changes the image"
    );
}

/// SDXL-shaped folders that do not fit together get one line naming what
/// is missing or wrong, from both `generate` and `edit`.
#[test]
fn inconsistent_sdxl_folders_are_named() {
    let rt = Runtime::load().unwrap();
    let open_error = |dir: &Path| {
        Generator::open(&rt, dir, None, cpu_threads(1))
            .err()
            .map(|e| e.to_string())
    };
    let embed_error = |dir: &Path| {
        let mut g = Generator::open(&rt, dir, None, cpu_threads(1)).unwrap();
        g.embed("a car", "").unwrap_err().to_string()
    };
    let edit_error = |dir: &Path| {
        edit::run(&EditRequest {
            unet: Some(dir.join("unet/model.onnx")),
            ..EditRequest::new(TextSide::from_model_dir(dir).unwrap(), "a car", "a red car")
        })
        .unwrap_err()
        .to_string()
    };

    let no_tokenizer_2 = folder_of(&sdxl_parts(&["tokenizer_2"]));
    let e = open_error(no_tokenizer_2.path()).unwrap();
    assert!(
        e.contains("has text_encoder_2/ but not tokenizer_2/"),
        "{e}"
    );

    // the second encoder twice: 32 + 32 = 64, the UNet reads 48
    let mut parts = sdxl_parts(&["text_encoder"]);
    parts.push(("text_encoder", sdxl("optimum").join("text_encoder_2")));
    let widths = folder_of(&parts);
    for e in [embed_error(widths.path()), edit_error(widths.path())] {
        assert!(e.contains("48-wide") && e.contains("64 (32 + 32)"), "{e}");
    }

    // an SD 1.x UNet in an SDXL folder: no pooled input
    let mut parts = sdxl_parts(&["unet"]);
    parts.push(("unet", fixture("sd-tiny/optimum/unet")));
    let sd_unet = folder_of(&parts);
    let e = open_error(sd_unet.path()).unwrap();
    assert!(e.contains("no input \"text_embeds\""), "{e}");

    // an SDXL UNet with one text encoder
    let one = folder_of(&sdxl_parts(&["text_encoder_2", "tokenizer_2"]));
    let e = open_error(one.path()).unwrap();
    assert!(
        e.contains("takes \"text_embeds\"") && e.contains("tokenizer_2/"),
        "{e}"
    );
}

/// SDXL's VAE overflows in float16. A float16 decoder whose activations pass
/// 65504 (onnxruntime gives NaN/inf on it, recorded by the script) is run
/// in float32, as diffusers' SDXL pipeline does with `force_upcast`: the
/// image equals diffusers' float32 decode of the same weights. Not upcast,
/// it is refused by name instead of drawing a black image.
#[test]
fn a_float16_sdxl_vae_decodes_in_float32() {
    use time_onnx::pipeline::vae::VaeDecoder;
    let rt = Runtime::load().unwrap();
    let index = json("goldens/sdxl/fast/vae_trap.json");
    assert_eq!(index["onnxruntime_fp16_decoder_output_finite"], false);
    let scale = index["scaling_factor"].as_f64().unwrap() as f32;
    let latents = npy(&fixture("goldens/sdxl/fast/vae_trap.latents.npy"))
        .mapv(|v| v / scale)
        .into_dimensionality()
        .unwrap();
    let golden = npy(&fixture("goldens/sdxl/fast/vae_trap.image.npy"));
    let path = sdxl("fp16-vae").join("vae_decoder/model.onnx");
    let mut upcast = VaeDecoder::open(&rt, &path, cpu_threads(2), true).unwrap();
    let img = upcast.decode(latents.view()).unwrap().into_dyn();
    let d = max_abs_diff(&img, &golden);
    assert!(d <= 1e-4, "float32 decode off by {d:.2e}");
    let mut as_is = VaeDecoder::open(&rt, &path, cpu_threads(2), false).unwrap();
    let e = as_is.decode(latents.view()).unwrap_err().to_string();
    assert!(e.contains("NaN or infinite"), "{e}");

    // the whole folder (float16 UNet and VAE) through the generator
    let mut g = Generator::open(&rt, &sdxl("fp16-vae"), None, cpu_threads(2)).unwrap();
    let p = Params {
        steps: 2,
        guidance: 5.0,
        negative_prompt: String::new(),
        num_images: 1,
        height: 128,
        width: 128,
        seed: 1,
        latents: None,
        scheduler: None,
        eta: 0.0,
    };
    let emb = g.embed("A pack of roses", "").unwrap();
    let img = g.generate(&emb, &p, &mut |_, _| {}).unwrap().pixels;
    assert!(img.iter().all(|v| v.is_finite()));
}

/// optimum writes SDXL's float16 UNet with its weights in `model.onnx_data`.
/// On the CPU they are widened into memory and handed to ONNX Runtime
/// (`pipeline::unet`), where the inline fixture's are widened in the model
/// bytes: the same float32 computation, so the same images, and within the
/// float16 bar of the reference.
#[test]
fn an_fp16_unet_with_external_weights_draws_what_the_inline_one_draws() {
    let rt = Runtime::load().unwrap();
    let dir = folder_of(&sdxl_parts(&["unet"]));
    let unet = dir.path().join("unet");
    common::with_external_data(&sdxl("fp16").join("unet/model.onnx"), &unet);
    std::fs::copy(
        sdxl("fp16").join("unet/config.json"),
        unet.join("config.json"),
    )
    .unwrap();
    let index = json("goldens/sdxl/generations/index.json");
    let latents = npy(&fixture("goldens/sdxl/generations/latents.npy"));
    let mut inline = Generator::open(&rt, &sdxl("fp16"), None, cpu_threads(2)).unwrap();
    let mut external = Generator::open(&rt, dir.path(), None, cpu_threads(2)).unwrap();
    for run in index["runs"].as_array().unwrap() {
        let p = params(&index, run, &latents);
        let draw = |g: &mut Generator| {
            let emb = g
                .embed(index["prompt"].as_str().unwrap(), &p.negative_prompt)
                .unwrap();
            g.generate(&emb, &p, &mut |_, _| {})
                .unwrap()
                .pixels
                .into_dyn()
        };
        let (a, b) = (draw(&mut inline), draw(&mut external));
        let golden = npy(&fixture(&format!(
            "goldens/sdxl/generations/{}",
            run["file"].as_str().unwrap()
        )));
        let (same, off) = (max_abs_diff(&a, &b), max_abs_diff(&b, &golden));
        eprintln!(
            "{}: external vs inline {same:.2e}, vs reference {off:.2e}",
            run["name"]
        );
        assert!(same <= 1e-5, "{}: {same:.2e}", run["name"]);
        assert!(off <= 2e-2, "{}: {off:.2e}", run["name"]);
    }
}

/// The widened model keeps each given weight's float16 location under a
/// float32 type (for a weight stored inside the model file, a location in
/// that file with the float16 length): if ONNX Runtime read the file instead
/// of taking the value from memory, the lengths disagree and the session
/// fails to open, rather than computing on the wrong bytes.
#[test]
fn a_widened_unet_opens_only_with_its_weights_given() {
    use prost::Message;
    use time_onnx::onnx::Model;
    use time_onnx::onnx::proto::ModelProto;
    use time_onnx::onnx::upcast::to_float32_given;
    let rt = Runtime::load().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inline = sdxl("fp16").join("unet/model.onnx");
    common::with_external_data(&inline, dir.path());
    let external = dir.path().join("model.onnx");
    // Weights inside the file; outside it with each weight's "length"
    // written (optimum's exports) and without (the ONNX format lets it be
    // left out).
    for (path, lengths) in [(&inline, true), (&external, true), (&external, false)] {
        if !lengths {
            let mut proto = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
            for t in &mut proto.graph.as_mut().unwrap().initializer {
                t.external_data.retain(|e| e.key != "length");
            }
            std::fs::write(path, proto.encode_to_vec()).unwrap();
        }
        let widen = || to_float32_given(&Model::open(path).unwrap(), 2).unwrap();
        let wide = widen();
        assert!(wide.given.len() > 100, "{} given", wide.given.len());
        // Smaller than the float16 model: the given weights are not in it.
        let narrow = std::fs::metadata(&inline).unwrap().len() as usize;
        assert!(wide.bytes.len() < narrow, "{} bytes", wide.bytes.len());
        // Handed over after optimizing ("extended") and before it ("all").
        for level in [GraphOptimization::Extended, GraphOptimization::All] {
            let opts = SessionOptions {
                optimization: level,
                ..cpu_threads(2)
            };
            let opened = |given| rt.open_bytes(path, &wide.bytes, opts, given);
            let err = opened(Vec::new())
                .err()
                .expect("opened on float16 bytes typed float32");
            assert!(
                err.to_string().contains("size mismatch"),
                "{level:?}: {err}"
            );
            opened(widen().given).unwrap();
        }
    }
}
