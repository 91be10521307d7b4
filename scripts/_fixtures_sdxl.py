"""The tiny SDXL fixtures and their goldens: the `sdxl` stage of scripts/make_fixtures.py.

A seeded random StableDiffusionXLPipeline whose two text encoders have different widths (16 and 32, so
that a concatenation-order bug cannot hide), exported with optimum-onnx exactly as
`optimum-cli export onnx` does, its UNet re-saved with `model.onnx_data` as optimum does above 2 GB,
plus fp16 UNets (onnxruntime's converter, with and without float32 inputs kept) and an LCM-style UNet
(`time_cond_proj_dim`, so the export takes `timestep_cond`).

Goldens, all from independent references:
- text: diffusers' `StableDiffusionXLPipeline.encode_prompt` on the torch models, in float64;
- TIME: the closed form in float64 on the torch UNet, over every `attn2.to_k`/`to_v` found the way UCE's
  script finds them (module names), keys and values from `encode_prompt` with TIME's augmentations and
  its token alignment (make_fixtures.time_token_map);
- generations: optimum's ORTStableDiffusionXLPipeline (diffusers' SDXL `__call__` over the ONNX parts)
  from fixed latents.

Called by make_fixtures.py with that module as `mf` (its helpers: Log, save_st, write_json, symlink, ...).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

SEED_UNET = 6789
SEED_TEXT = 7890
SEED_TEXT_2 = 8901
SEED_VAE = 9012
SEED_LATENTS = 43
WIDTH_1, WIDTH_2 = 16, 32   # the two text encoders' hidden sizes: context = 48 wide
POOLED = 24                 # text_encoder_2's projection_dim: the UNet's text_embeds width
TIME_EMBED = 8              # addition_time_embed_dim; time_ids are 6 wide
LATENT = 16

UNET_CONFIG = dict(
    sample_size=LATENT,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_EMBED,
    cross_attention_dim=WIDTH_1 + WIDTH_2,
    norm_num_groups=8,
)
LCM_TIME_COND = 16          # time_cond_proj_dim of the LCM-style UNet (its guidance embedding width)


def text_config(width: int, layers: int, heads: int, act: str, projection: int) -> dict:
    return dict(vocab_size=49408, max_position_embeddings=77, hidden_size=width, intermediate_size=2 * width + 5,
                num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act, projection_dim=projection,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


TEXT_1 = text_config(WIDTH_1, 2, 2, "quick_gelu", WIDTH_1)   # CLIP ViT-L's activation
TEXT_2 = text_config(WIDTH_2, 3, 4, "gelu", POOLED)          # OpenCLIP bigG's
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=LATENT * 8, scaling_factor=0.13025, force_upcast=True)
# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 as shipped
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TEXT_PROMPTS = ["A pack of roses", "A pack of blue roses", "", "an apple", "a photo of a 🐱 cat and a 🚀 rocket"]
TIME_CASES = [
    dict(name="roses_blue", edits=[("A pack of roses", "A pack of blue roses")], lamb=0.1, augs=None),
    dict(name="car_red_noaug", edits=[("A car", "A red car")], lamb=0.5, augs=[]),
]
GEN_PROMPT = "A pack of roses"
GEN_NEGATIVE = "blurry, low quality"
GEN_STEPS = 3
GEN_GUIDANCE = 5.0          # diffusers' SDXL default


def build_pipeline(mf, tmp: Path, time_cond: int | None = None):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer)

    fx = tmp
    mf.seed_all(SEED_UNET)
    unet = UNet2DConditionModel(**UNET_CONFIG, time_cond_proj_dim=time_cond).eval()
    mf.seed_all(SEED_TEXT)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_1)).eval()
    mf.seed_all(SEED_TEXT_2)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)).eval()
    mf.seed_all(SEED_VAE)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    with mf.quiet_fd():
        tok = CLIPTokenizer.from_pretrained(str(fx / "tokenizer"))
        tok2 = CLIPTokenizer.from_pretrained(str(fx / "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True)
    torch.set_grad_enabled(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(mf, torch_dir: Path, out: Path) -> None:
    """optimum-onnx's exporter (== `optimum-cli export onnx --model torch_dir out`), the UNet re-saved with
    external data as optimum's large-model path writes it, source paths made machine independent."""
    import onnx
    from optimum.exporters.onnx import main_export

    if out.exists():
        shutil.rmtree(out)
    with mf.quiet_fd():
        main_export(model_name_or_path=str(torch_dir), output=str(out), task="text-to-image", device="cpu",
                    local_files_only=True, library_name="diffusers")
    unet = out / "unet" / "model.onnx"
    m = onnx.load(str(unet))
    onnx.save(m, str(unet), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data",
              convert_attribute=True, size_threshold=100)
    mi = json.loads((out / "model_index.json").read_text())
    mi["_name_or_path"] = "sdxl-tiny/torch"
    (out / "model_index.json").write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    for cfg in out.glob("*/config.json"):
        c = json.loads(cfg.read_text())
        if "_name_or_path" in c:
            c["_name_or_path"] = "sdxl-tiny/torch/" + Path(c["_name_or_path"]).name
            cfg.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    # the two tokenizers are the SD 1.x and SD 2.x fixture tokenizers (SDXL's are the same files)
    for sub, target in (("tokenizer", "../tokenizer"), ("tokenizer_2", "../tokenizer_2")):
        shutil.rmtree(out / sub)
        mf.symlink(out / sub, target)
    # never read by time-onnx
    shutil.rmtree(out / "vae_encoder")


def link_flavour(mf, fx: Path, flavour: str) -> None:
    d = fx / flavour
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae_decoder", "scheduler"):
        if not (d / sub).exists():
            mf.symlink(d / sub, f"../optimum/{sub}")
    if not (d / "model_index.json").exists():
        shutil.copyfile(fx / "optimum" / "model_index.json", d / "model_index.json")


def encode(pipe, prompt: str, negative: str | None = None):
    """encode_prompt as the SDXL pipeline calls it (one image, CFG only when a negative is given)."""
    import torch

    out = pipe.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                             do_classifier_free_guidance=negative is not None, negative_prompt=negative)
    return out


def stage(root: Path, mf) -> None:
    import torch

    fx = root / "tests" / "fixtures" / "sdxl-tiny"
    if fx.exists():
        shutil.rmtree(fx)
    fx.mkdir(parents=True)
    mf.symlink(fx / "tokenizer", "../sd-tiny/tokenizer")
    mf.symlink(fx / "tokenizer_2", "../sd-tiny/tokenizer-sd2")
    work = Path(tempfile.mkdtemp(prefix="sdxl-torch-", dir=str(root / "third_party")
                                 if (root / "third_party").exists() else None))
    try:
        with mf.Log.stage("sdxl: torch pipelines, optimum exports"):
            pipe = build_pipeline(mf, fx)
            pipe.save_pretrained(str(work / "base"), safe_serialization=True)
            export(mf, work / "base", fx / "optimum")
            lcm = build_pipeline(mf, fx, time_cond=LCM_TIME_COND)
            lcm.save_pretrained(str(work / "lcm"), safe_serialization=True)
            export(mf, work / "lcm", work / "lcm-onnx")
            (fx / "lcm").mkdir()
            shutil.copytree(work / "lcm-onnx" / "unet", fx / "lcm" / "unet")
            link_flavour(mf, fx, "lcm")
        with mf.Log.stage("sdxl: fp16 UNets"):
            import onnx
            from onnxruntime.transformers import float16 as ort16

            m = onnx.load(str(fx / "optimum" / "unet" / "model.onnx"))
            for flavour, keep in (("fp16", False), ("fp16-io32", True)):
                half = ort16.convert_float_to_float16(onnx.load(str(fx / "optimum" / "unet" / "model.onnx")),
                                                      keep_io_types=keep)
                (fx / flavour / "unet").mkdir(parents=True)
                onnx.save_model(half, str(fx / flavour / "unet" / "model.onnx"))
                shutil.copyfile(fx / "optimum" / "unet" / "config.json", fx / flavour / "unet" / "config.json")
                link_flavour(mf, fx, flavour)
            del m
        goldens = root / "tests" / "fixtures" / "goldens" / "sdxl"
        if goldens.exists():
            shutil.rmtree(goldens)
        with mf.Log.stage("sdxl: text goldens (encode_prompt, float64)"), mf.default_dtype(torch.float64):
            text_goldens(mf, pipe, fx, goldens)
        with mf.Log.stage("sdxl: TIME goldens (float64)"), mf.default_dtype(torch.float64):
            time_goldens(mf, pipe, goldens)
        with mf.Log.stage("sdxl: generations (ORTStableDiffusionXLPipeline)"):
            generation_goldens(mf, fx, goldens)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        torch.set_default_dtype(torch.float32)


def text_goldens(mf, pipe, fx: Path, out: Path) -> None:
    import copy

    import torch

    p64 = copy.deepcopy(pipe)
    p64.text_encoder.to(torch.float64)
    p64.text_encoder_2.to(torch.float64)
    tensors, index = {}, {"prompts": TEXT_PROMPTS, "reference": "StableDiffusionXLPipeline.encode_prompt, "
                          "text encoders in float64, do_classifier_free_guidance=False",
                          "layout": "embeds [77, 48] = [text_encoder hidden_states[-2] (16) | text_encoder_2 "
                                    "hidden_states[-2] (32)]; pooled [24] = text_encoder_2 text_embeds"}
    sessions = {name: mf.ort_session(fx / "optimum" / name / "model.onnx") for name in ("text_encoder", "text_encoder_2")}
    worst = 0.0
    for i, prompt in enumerate(TEXT_PROMPTS):
        embeds, _, pooled, _ = encode(p64, prompt)
        tensors[f"embeds.{i}"] = embeds[0].numpy()
        tensors[f"pooled.{i}"] = pooled[0].numpy()
        # the ONNX exports against it: penultimate hidden state of each, in this order
        parts = []
        for name, tok in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
            ids = np.array([tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids], np.int64)
            sess = sessions[name]
            outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": ids})))
            layers = len([k for k in outs if k.startswith("hidden_states.")]) - 1
            parts.append(outs[f"hidden_states.{layers - 1}"][0])
            if name == "text_encoder_2":
                worst = max(worst, float(np.abs(outs["text_embeds"][0] - tensors[f"pooled.{i}"]).max()))
        worst = max(worst, float(np.abs(np.concatenate(parts, -1) - tensors[f"embeds.{i}"]).max()))
    negative = encode(p64, GEN_PROMPT, GEN_NEGATIVE)
    tensors["negative.embeds"] = negative[1][0].numpy()
    tensors["negative.pooled"] = negative[3][0].numpy()
    empty = encode(p64, GEN_PROMPT, "")
    index["force_zeros_for_empty_prompt"] = {
        "negative_prompt": "", "negative_embeds_all_zero": bool((empty[1] == 0).all()),
        "negative_pooled_all_zero": bool((empty[3] == 0).all())}
    index["negative"] = {"prompt": GEN_PROMPT, "negative_prompt": GEN_NEGATIVE}
    index["max_abs_diff_onnx_fp32_vs_reference"] = worst
    index["outputs"] = {name: [o.name for o in s.get_outputs()] for name, s in sessions.items()}
    mf.save_st(out / "text.safetensors", tensors)
    mf.write_json(out / "text.json", index)
    mf.Log.say(f"sdxl text: {len(TEXT_PROMPTS)} prompts; onnx fp32 vs float64 reference {worst:.2e}")


def kv_modules(unet) -> list[str]:
    """Every cross-attention K/V weight, found as UCE's script finds them: attn2's to_k and to_v."""
    return sorted(n for n, _ in unet.named_modules() if "attn2" in n and n.endswith(("to_k", "to_v")))


def time_goldens(mf, pipe, out: Path) -> None:
    import copy

    import torch

    p64 = copy.deepcopy(pipe)
    for part in (p64.text_encoder, p64.text_encoder_2, p64.unet):
        part.to(torch.float64)
    from diffusers.pipelines.deprecated.stable_diffusion_variants import pipeline_stable_diffusion_model_editing as pme

    names = kv_modules(p64.unet)
    modules = dict(p64.unet.named_modules())
    index = {"cases": [], "kv_modules": names, "weights_layout": "torch Linear weight [out, in] (ONNX holds W^T)"}
    original = {f"{n}.weight": modules[n].weight.detach().numpy().copy() for n in names}
    mf.save_st(out / "time" / "kv_original.safetensors", {k: v.astype(np.float32) for k, v in original.items()})
    for case in TIME_CASES:
        augs = pme.AUGS_CONST if case["augs"] is None else case["augs"]
        d = UNET_CONFIG["cross_attention_dim"]
        lam = case["lamb"]
        m1, m2 = lam * np.eye(d), lam * np.eye(d)
        rec = []
        for src, dst in case["edits"]:
            olds, news = mf.time_texts(src, dst, augs)
            for o, n in zip(olds, news):
                c = encode(p64, o)[0][0].numpy()
                cn = encode(p64, n)[0][0].numpy()
                _, _, idx = mf.time_token_map(pipe.tokenizer, o, n)
                cstar = cn[idx]
                m1 += cstar.T @ c
                m2 += c.T @ c
                rec.append({"source": o, "destination": n, "idxs_replace": idx})
        a = m1 @ np.linalg.inv(m2)
        tensors = {"A": a}
        for k, w in original.items():
            tensors[k] = w @ a
        mf.save_st(out / "time" / f"{case['name']}.f64.safetensors", tensors)
        change = max(float(np.abs(tensors[k] - w).max() / np.abs(w).max()) for k, w in original.items())
        index["cases"].append({"name": case["name"], "lambda": lam, "augmentations": augs,
                               "edits": [list(e) for e in case["edits"]], "pairs": rec,
                               "file": f"{case['name']}.f64.safetensors", "max_rel_change_vs_original": change})
        mf.Log.say(f"sdxl TIME {case['name']}: {len(names)} K/V weights, {len(rec)} pairs, change {change:.3f}")
    mf.write_json(out / "time" / "cases.json", index)


def generation_goldens(mf, fx: Path, out: Path) -> None:
    import torch
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    latents = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(SEED_LATENTS)).numpy()
    mf.save_npy(out / "generations" / "latents.npy", latents)
    index = {"prompt": GEN_PROMPT, "steps": GEN_STEPS, "guidance_scale": GEN_GUIDANCE, "latents": "latents.npy",
             "latents_generator": f"torch.randn(1,4,{LATENT},{LATENT}, generator=torch.Generator()"
                                  f".manual_seed({SEED_LATENTS}))",
             "reference": "optimum.onnxruntime.ORTStableDiffusionXLPipeline, output_type='np' (NHWC float32 "
                          "in [0,1])", "runs": []}
    with mf.quiet_fd():
        pipe = ORTStableDiffusionXLPipeline.from_pretrained(str(fx / "optimum"), provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)
    for negative in (None, GEN_NEGATIVE):
        img = pipe(GEN_PROMPT, negative_prompt=negative, height=LATENT * 8, width=LATENT * 8,
                   num_inference_steps=GEN_STEPS, guidance_scale=GEN_GUIDANCE, latents=torch.from_numpy(latents.copy()),
                   output_type="np").images
        name = f"euler.{'neg' if negative else 'noneg'}"
        mf.save_npy(out / "generations" / f"{name}.npy", img.astype(np.float32))
        index["runs"].append({"name": name, "file": f"{name}.npy", "scheduler": dict(pipe.scheduler.config),
                              "negative_prompt": negative, "timesteps": [float(t) for t in pipe.scheduler.timesteps],
                              "shape": list(img.shape), "mean": float(img.mean())})
    mf.write_json(out / "generations" / "index.json", index)
    mf.Log.say(f"sdxl generations: {len(index['runs'])} images")


# ---- the `turbo_lcm` stage: few-step flavours and their goldens ------------------------------------------
# scheduler/scheduler_config.json of stabilityai/sdxl-turbo as shipped: Euler ancestral, trailing spacing
SDXL_TURBO_SCHEDULER = {**SDXL_SCHEDULER, "_class_name": "EulerAncestralDiscreteScheduler",
                        "timestep_spacing": "trailing"}
# stabilityai/sd-turbo (SD 2.1 distilled): Euler, trailing spacing
SD_TURBO_SCHEDULER = {**SDXL_SCHEDULER, "timestep_spacing": "trailing"}
NOISE_SEED = 5      # `time-onnx generate --seed` of the runs whose scheduler draws noise at every step
GUIDANCE_EMBEDDING_CASES = [(8.0, 16), (1.0, 16), (4.5, 256), (2.0, 7)]
TURBO_RUNS = [  # name, folder, steps, guidance, negative prompt
    ("sdxl_turbo.euler_a_trailing.1step", "sdxl-tiny/turbo", 1, 0.0, None),
    ("sdxl_turbo.euler_a_trailing.4steps", "sdxl-tiny/turbo", 4, 0.0, None),
    ("sdxl_turbo.euler_a_trailing.cfg.neg", "sdxl-tiny/turbo", 2, 5.0, GEN_NEGATIVE),
    ("lcm.4steps", "sdxl-tiny/lcm", 4, 8.0, None),
    ("lcm.2steps.neg_ignored", "sdxl-tiny/lcm", 2, 3.0, GEN_NEGATIVE),
    ("sd_turbo.euler_trailing.1step", "sd-turbo-tiny", 1, 0.0, None),
    ("sd_turbo.euler_trailing.2steps.cfg.neg", "sd-turbo-tiny", 2, 7.5, GEN_NEGATIVE),
]


def own_scheduler(mf, folder: Path, config: dict, index_from: Path) -> None:
    """`folder`'s own scheduler config, named in its own model_index.json too (diffusers loads the class
    model_index.json names)."""
    sched = folder / "scheduler"
    if sched.is_symlink() or sched.exists():
        sched.unlink() if sched.is_symlink() else shutil.rmtree(sched)
    mf.write_json(sched / "scheduler_config.json", config)
    index = json.loads(index_from.read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]
    target = folder / "model_index.json"
    if target.is_symlink() or target.exists():
        target.unlink()
    target.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def turbo_lcm_stage(root: Path, mf) -> None:
    """Flavour folders with the schedulers few-step models ship (SDXL-Turbo, SD-Turbo, LCM) and goldens of
    generations through optimum's ORT pipelines, every scheduler noise draw replayed from time-onnx's own RNG
    (scripts/_rng.py) so that `time-onnx generate --seed` draws the same noise."""
    import diffusers

    fx = root / "tests" / "fixtures"
    turbo = fx / "sdxl-tiny" / "turbo"
    if turbo.exists():
        shutil.rmtree(turbo)
    turbo.mkdir()
    link_flavour(mf, fx / "sdxl-tiny", "turbo")
    mf.symlink(turbo / "unet", "../optimum/unet")
    sdxl_index = fx / "sdxl-tiny" / "optimum" / "model_index.json"
    own_scheduler(mf, turbo, SDXL_TURBO_SCHEDULER, sdxl_index)
    lcm_config = {"_class_name": "LCMScheduler",
                  **{k: v for k, v in diffusers.LCMScheduler.from_config(SDXL_SCHEDULER).config.items()
                     if not k.startswith("_")}}
    own_scheduler(mf, fx / "sdxl-tiny" / "lcm", lcm_config, sdxl_index)
    sd_turbo = fx / "sd-turbo-tiny"
    if sd_turbo.exists():
        shutil.rmtree(sd_turbo)
    for sub in ("text_encoder", "tokenizer", "unet", "vae_decoder"):
        mf.symlink(sd_turbo / sub, f"../sd-tiny/optimum/{sub}")
    own_scheduler(mf, sd_turbo, SD_TURBO_SCHEDULER, fx / "sd-tiny" / "optimum" / "model_index.json")
    out = root / "tests" / "fixtures" / "goldens" / "sdxl" / "fast"
    if out.exists():
        shutil.rmtree(out)
    guidance_embedding_golden(mf, out)
    few_step_goldens(mf, fx, out)
    vae_trap(mf, fx, out)


def guidance_embedding_golden(mf, out: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    tensors, cases = {}, []
    for i, (g, dim) in enumerate(GUIDANCE_EMBEDDING_CASES):
        w = torch.tensor([g - 1.0])  # as the SDXL pipeline makes it: guidance_scale - 1
        e = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        tensors[f"case.{i}"] = e[0].numpy()
        cases.append({"guidance_scale": g, "embedding_dim": dim, "key": f"case.{i}"})
    mf.save_st(out / "guidance_embedding.safetensors", tensors)
    mf.write_json(out / "guidance_embedding.json", {
        "reference": "diffusers StableDiffusionXLPipeline.get_guidance_scale_embedding(guidance_scale - 1, dim), "
                     "float32", "cases": cases})


class ReplayedNoise:
    """The schedulers' randn_tensor replaced by time-onnx's RNG (scripts/_rng.py) seeded like `--seed`."""

    def __init__(self, module: str, seed: int):
        import importlib

        import _rng

        self.mod = importlib.import_module(module)
        self.rng = _rng.Rng(seed)
        self.draws = 0

    def __enter__(self):
        import torch

        self.orig = self.mod.randn_tensor

        def fake(shape, generator=None, device=None, dtype=None, layout=None):
            self.draws += 1
            return torch.from_numpy(self.rng.randn(tuple(shape))).to(dtype or torch.float32)
        self.mod.randn_tensor = fake
        return self

    def __exit__(self, *exc):
        self.mod.randn_tensor = self.orig


def few_step_goldens(mf, fx: Path, out: Path) -> None:
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    latents = np.load(fx / "goldens" / "sdxl" / "generations" / "latents.npy")
    index = {"prompt": GEN_PROMPT, "latents": "../generations/latents.npy", "seed": NOISE_SEED,
             "noise": "every scheduler draw (randn_tensor) replaced by scripts/_rng.py's Rng(seed).randn, in order",
             "reference": "optimum.onnxruntime ORTStableDiffusionXLPipeline / ORTStableDiffusionPipeline, "
                          "output_type='np' (NHWC float32 in [0,1]), the folder's scheduler_config.json",
             "runs": []}
    pipes = {}
    for name, folder, steps, guidance, negative in TURBO_RUNS:
        if folder not in pipes:
            cls = ORTStableDiffusionPipeline if folder.startswith("sd-") else ORTStableDiffusionXLPipeline
            with mf.quiet_fd():
                pipes[folder] = cls.from_pretrained(str(fx / folder), provider="CPUExecutionProvider")
            pipes[folder].set_progress_bar_config(disable=True)
        pipe = pipes[folder]
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        with ReplayedNoise(type(pipe.scheduler).__module__, NOISE_SEED) as noise:
            img = pipe(GEN_PROMPT, negative_prompt=negative, height=side, width=side, num_inference_steps=steps,
                       guidance_scale=guidance, latents=torch.from_numpy(latents.copy()), output_type="np").images
        mf.save_npy(out / f"{name}.npy", img.astype(np.float32))
        index["runs"].append({
            "name": name, "folder": folder, "file": f"{name}.npy", "steps": steps, "guidance_scale": guidance,
            "negative_prompt": negative, "scheduler": type(pipe.scheduler).__name__,
            "timesteps": [float(t) for t in pipe.scheduler.timesteps], "noise_draws": noise.draws,
            "timestep_cond": getattr(pipe.unet.config, "time_cond_proj_dim", None),
            "shape": list(img.shape), "mean": float(img.mean())})
        mf.Log.say(f"few-step {name}: {type(pipe.scheduler).__name__} t={index['runs'][-1]['timesteps']}, "
                   f"{noise.draws} noise draws")
    mf.write_json(out / "index.json", index)


# ---- the float16 VAE trap ---------------------------------------------------------------------------------
VAE_TRAP_GAIN = 3.0e4   # conv_in scaled so that the decoder's activations pass float16's 65504


def vae_trap(mf, fx: Path, out: Path) -> None:
    """`sdxl-tiny/fp16-vae/`: every part float16 as `optimum-cli export onnx --dtype fp16` writes an SDXL
    folder, with a VAE decoder whose activations overflow in float16 (SDXL's VAE does; this tiny one has its
    conv_in scaled so that it does too; a GroupNorm after it brings the values back, so float32 decodes
    fine). Golden: diffusers' AutoencoderKL.decode in float32 on the float16-rounded weights (what the SDXL
    pipeline does with `force_upcast`); the fp16 ONNX decoder in onnxruntime is recorded to give NaN/inf."""
    import onnx
    import torch
    from onnxruntime.transformers import float16 as ort16

    folder = fx / "sdxl-tiny" / "fp16-vae"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        mf.symlink(folder / sub, f"../optimum/{sub}")
    mf.symlink(folder / "unet", "../fp16/unet")
    shutil.copyfile(fx / "sdxl-tiny" / "optimum" / "model_index.json", folder / "model_index.json")
    pipe = build_pipeline(mf, fx / "sdxl-tiny")
    vae = pipe.vae
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(VAE_TRAP_GAIN)
        vae.decoder.conv_in.bias.mul_(VAE_TRAP_GAIN)
        for p in vae.parameters():  # the weights a float16 file holds
            p.copy_(p.half().float())

    class Decode(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    dec = folder / "vae_decoder"
    dec.mkdir()
    fp32_path = out / "vae_fp32.tmp.onnx"
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Decode(vae).eval(), (torch.randn(1, 4, LATENT, LATENT),), str(fp32_path),
                      input_names=["latent_sample"], output_names=["sample"], opset_version=18, dynamo=False,
                      dynamic_axes={"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                                    "sample": {0: "batch_size", 2: "height", 3: "width"}})
    half = ort16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=False)
    fp32_path.unlink()
    onnx.save_model(half, str(dec / "model.onnx"))
    vae.save_config(str(dec))  # config.json: scaling_factor, force_upcast true
    latents = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(SEED_LATENTS + 1))
    with torch.no_grad():
        img = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)
    sess = mf.ort_session(dec / "model.onnx")
    raw16 = sess.run(None, {"latent_sample": (latents / vae.config.scaling_factor).numpy().astype(np.float16)})[0]
    finite16 = bool(np.isfinite(raw16.astype(np.float32)).all())
    assert not finite16, "the float16 decoder was meant to overflow"
    assert np.isfinite(img).all()
    mf.save_npy(out / "vae_trap.latents.npy", latents.numpy())
    mf.save_npy(out / "vae_trap.image.npy", img)
    mf.write_json(out / "vae_trap.json", {
        "latents": "vae_trap.latents.npy (before dividing by scaling_factor)", "image": "vae_trap.image.npy",
        "reference": "diffusers AutoencoderKL.decode in float32 on the float16-rounded weights, image = "
                     "clamp(x/2 + 0.5, 0, 1), NHWC", "conv_in_gain": VAE_TRAP_GAIN,
        "scaling_factor": vae.config.scaling_factor, "force_upcast": vae.config.force_upcast,
        "onnxruntime_fp16_decoder_output_finite": finite16})
    mf.Log.say(f"vae trap: fp16 decoder finite={finite16}; fp32 reference mean {img.mean():.4f}")
