#!/usr/bin/env python3
"""Build the reference fixtures of time-onnx (tests/fixtures/ and models/tiny-random/).

Everything is built from seeded random weights; nothing is downloaded from a model hub.

    python3 scripts/make_fixtures.py            # (re)build tests/fixtures and models/tiny-random
    python3 scripts/make_fixtures.py --check    # rebuild into a temp folder, compare by value

The script creates its own virtual environment (third_party/venv-fixtures, pinned by
scripts/requirements-fixtures.txt) and re-executes itself inside it (scripts/_venv.py).
See tests/fixtures/README.md for the description of every file written.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import _venv  # scripts/_venv.py: own venv (third_party/venv-fixtures), re-exec inside it, HF offline env

REPO = _venv.REPO

if __name__ == "__main__":
    _venv.bootstrap(__file__)

# ---- from here on we run inside the venv (HF_HUB_OFFLINE=1 etc. set by _venv.bootstrap) ----

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gzip  # noqa: E402
import importlib.metadata as im  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from _models import quiet_fd, seed_all  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import numpy as np  # noqa: E402

# Heavy imports are done lazily inside the stages (keeps --help fast).

# --------------------------------------------------------------------------------------
# constants of the fixture models
# --------------------------------------------------------------------------------------
SEED_UNET = 1234
SEED_TEXT = 2345
SEED_VAE = 3456
SEED_CLIP = 4567
CROSS_DIM = 16          # text hidden size = UNet cross_attention_dim
LATENT = 16             # UNet sample_size (latent side)
VAE_FACTOR = 8          # 4 VAE blocks -> 3 downsamplings
IMAGE = LATENT * VAE_FACTOR
OPSET_DIFFUSERS = 14    # diffusers' convert script default
BOS, EOS = 49406, 49407

SD1_SCHEDULER = {  # scheduler_config.json of SD 1.x (no timestep_spacing key, as shipped in 2022)
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

UNET_CONFIG = dict(
    sample_size=LATENT,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=(4, 2),   # diffusers' name; = number of heads: 32 ch -> 4 x 8, 64 ch -> 2 x 32
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=CROSS_DIM,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_act="quick_gelu",
    projection_dim=16,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=1,
)

TOKENIZER_PROMPTS = [
    "A pack of roses",
    "A pack of blue roses",
    "an apple",
    "a green apple",
    "A car",
    "A red car",
    "An astronaut riding a horse on the Moon.",
    "Hello, World! It's 3:45pm, isn't it?",
    "don't; won't!!! (test) [brackets] {braces} #hashtag @user 100% $5",
    "1234567890 digits 2024",
    "ALL CAPS PROMPT WITH NUMBERS 42",
    "café crème brûlée à Paris",
    "a photo of a 🐱 cat and a 🚀 rocket",
    "東京の夜景, 北京烤鸭",
    "   lots   of    spaces\tand\ttabs\n newline   ",
    "",
    "a " + ", ".join(f"word{i}" for i in range(40)) + ", the end",
]
TEXT_ENCODER_PROMPTS = ["A pack of roses", "A pack of blue roses", "", "an apple", "a photo of a 🐱 cat and a 🚀 rocket"]

TIME_CASES = [
    # name, [(source, destination), ...] (applied in order, restart_params only before the first),
    # lambda, with_to_k, augmentations (None = diffusers' default AUGS_CONST)
    dict(name="roses_blue", edits=[("A pack of roses", "A pack of blue roses")], lamb=0.1, with_to_k=True, augs=None),
    dict(name="roses_blue_v_only", edits=[("A pack of roses", "A pack of blue roses")], lamb=0.1, with_to_k=False,
         augs=None),
    dict(name="car_red_noaug", edits=[("A car", "A red car")], lamb=0.5, with_to_k=True, augs=[]),
    dict(name="apple_green", edits=[("an apple", "a green apple")], lamb=0.1, with_to_k=True, augs=None),
    dict(name="roses_then_car", edits=[("A pack of roses", "A pack of blue roses"), ("A car", "A red car")],
         lamb=0.1, with_to_k=True, augs=None),
]

GEN_PROMPT = "A pack of roses"
GEN_NEGATIVE = "blurry, low quality"
GEN_STEPS = 3
GEN_GUIDANCE = 7.5
GEN_SEED = 42

SCHED_STEPS = 10
SCHED_SHAPE = (1, 4, 8, 8)
SCHED_SEED = 7


# --------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------
class Log:
    t0 = time.time()
    rows: list[tuple[str, float]] = []

    @staticmethod
    def say(msg: str) -> None:
        print(f"[{time.time() - Log.t0:7.1f}s] {msg}", flush=True)

    @staticmethod
    @contextlib.contextmanager
    def stage(name: str):
        Log.say(f"=== {name}")
        t = time.time()
        yield
        dt = time.time() - t
        Log.rows.append((name, dt))
        Log.say(f"=== {name}: done in {dt:.1f}s")



@contextlib.contextmanager
def default_dtype(dt):
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)



def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def save_npy(path: Path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(arr))


def save_st(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors via numpy; keys sorted (byte-stable for a given content)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, str(path), metadata=metadata)


def symlink(link: Path, target_rel: str) -> None:
    if link.is_symlink() or link.exists():
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target_rel, link)


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def np_type_of(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
            "tensor(int32)": np.int32, "tensor(int64)": np.int64}[ort_type]


def timestep_array(sess, t: float, batch: int) -> np.ndarray:
    """Timestep in the dtype/rank the UNet declares (rank 0, or [batch])."""
    inp = next(i for i in sess.get_inputs() if i.name == "timestep")
    dt = np_type_of(inp.type)
    if len(inp.shape) == 0:
        return np.array(t, dtype=dt)
    return np.full([batch], t, dtype=dt)


def dir_size(p: Path) -> int:
    total = 0
    for f in p.rglob("*"):
        if f.is_file() and not f.is_symlink():
            total += f.stat().st_size
    return total


def versions() -> dict:
    pk = ["torch", "diffusers", "transformers", "tokenizers", "onnx", "onnxruntime", "onnxscript", "onnx-ir",
          "optimum", "optimum-onnx", "open_clip_torch", "onnxconverter-common", "numpy", "safetensors",
          "huggingface-hub", "protobuf", "ftfy", "pillow"]
    out = {"python": platform.python_version()}
    for p in pk:
        try:
            out[p] = im.version(p)
        except im.PackageNotFoundError:
            out[p] = None
    return out


# --------------------------------------------------------------------------------------
# stage: CLIP tokenizer files from open_clip's BPE file
# --------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map, in CLIP's vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    bs, cs, n = list(printable), list(printable), 0
    for b in range(256):
        if b not in printable:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def build_tokenizer_files(out: Path, sd2: bool) -> None:
    spec = importlib.util.find_spec("open_clip")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    assert len(merges) == 48894, len(merges)
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    pad = "!" if sd2 else "<|endoftext|>"
    special = {"bos_token": _added_token("<|startoftext|>"), "eos_token": _added_token("<|endoftext|>"),
               "pad_token": pad if sd2 else "<|endoftext|>", "unk_token": _added_token("<|endoftext|>")}
    write_json(out / "special_tokens_map.json", special)
    cfg = {
        "add_prefix_space": False,
        "bos_token": _added_token("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": _added_token("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "time-onnx/sd-tiny" + ("-sd2" if sd2 else ""),
        "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token("<|endoftext|>"),
    }
    write_json(out / "tokenizer_config.json", cfg)


def stage_tokenizer(root: Path) -> None:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    fx = root / "tests" / "fixtures"
    build_tokenizer_files(fx / "sd-tiny" / "tokenizer", sd2=False)
    build_tokenizer_files(fx / "sd-tiny" / "tokenizer-sd2", sd2=True)
    for f in ("vocab.json", "merges.txt"):  # identical bytes: share them
        assert (fx / "sd-tiny" / "tokenizer" / f).read_bytes() == (fx / "sd-tiny" / "tokenizer-sd2" / f).read_bytes()
        (fx / "sd-tiny" / "tokenizer-sd2" / f).unlink()
        symlink(fx / "sd-tiny" / "tokenizer-sd2" / f, f"../tokenizer/{f}")
    out = {"max_length": 77, "bos": BOS, "eos": EOS, "sd1_pad": EOS, "sd2_pad": 0, "prompts": []}
    toks = {}
    for variant in ("tokenizer", "tokenizer-sd2"):
        d = fx / "sd-tiny" / variant
        with quiet_fd():  # tokenizers prints "Ignored unknown kwarg option __type" for SD-style configs
            toks[variant] = (CLIPTokenizer.from_pretrained(str(d)), CLIPTokenizerFast.from_pretrained(str(d)))
    slow, fast = toks["tokenizer"]
    assert len(slow) == 49408 and slow.pad_token_id == EOS, (len(slow), slow.pad_token_id)
    assert toks["tokenizer-sd2"][0].pad_token_id == 0 and toks["tokenizer-sd2"][1].pad_token_id == 0
    ids = slow("A pack of roses").input_ids
    assert ids == [49406, 320, 3420, 539, 9061, 49407], ids
    # a third, independent implementation: open_clip's SimpleTokenizer
    import open_clip

    oc = open_clip.tokenizer.SimpleTokenizer()
    for p in TOKENIZER_PROMPTS:
        rec = {"prompt": p}
        for variant, key in (("tokenizer", "ids_sd1"), ("tokenizer-sd2", "ids_sd2")):
            s, f = toks[variant]
            a = s(p, padding="max_length", max_length=77, truncation=True).input_ids
            b = f(p, padding="max_length", max_length=77, truncation=True).input_ids
            assert a == b, (variant, p, a, b)
            rec[key] = a
        raw = slow(p).input_ids
        rec["num_tokens_untruncated"] = len(raw)
        rec["truncated"] = len(raw) > 77
        ocids = [BOS] + oc.encode(p) + [EOS]
        if len(ocids) > 77:
            ocids = ocids[:76] + [EOS]
        assert ocids == rec["ids_sd1"][:len(ocids)], (p, ocids)
        n = len(ocids)
        assert all(t == EOS for t in rec["ids_sd1"][n:])
        # SD 2.x: the pad token "!" is a special token, so every "!" inside a prompt is split off as id 0
        # (e.g. "!!!" is one token, 995, with SD 1.x but 0, 0, 0 with SD 2.x); padding is 0 after EOS.
        n2 = rec["ids_sd2"].index(EOS) + 1
        assert all(t == 0 for t in rec["ids_sd2"][n2:])
        if "!" not in p:
            assert rec["ids_sd1"][:n] == rec["ids_sd2"][:n]
        rec["length_sd1"] = n
        rec["length_sd2"] = n2
        out["prompts"].append(rec)
    assert any(r["truncated"] for r in out["prompts"])
    write_json(fx / "goldens" / "tokenizer.json", out)
    Log.say(f"tokenizer: {len(TOKENIZER_PROMPTS)} prompts, slow == fast == open_clip")


# --------------------------------------------------------------------------------------
# stage: the tiny torch pipeline
# --------------------------------------------------------------------------------------
def build_torch_pipeline(tokenizer_dir: Path):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    seed_all(SEED_UNET)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    seed_all(SEED_TEXT)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
    seed_all(SEED_VAE)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    sched = PNDMScheduler.from_config(SD1_SCHEDULER)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    torch.set_grad_enabled(False)
    return pipe


def stage_torch(root: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    fx = root / "tests" / "fixtures" / "sd-tiny"
    pipe = build_torch_pipeline(fx / "tokenizer")
    out = fx / "torch"
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # the tokenizer re-saved by transformers is replaced by a link to the canonical files
    shutil.rmtree(out / "tokenizer")
    symlink(out / "tokenizer", "../tokenizer")
    # reload and verify that every weight really round-trips (transformers 4.x/5.x prefix trap)
    with quiet_fd():
        back = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    n = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "text_encoder", "vae")}
    Log.say(f"torch pipeline saved; parameters {n}; reload is bit-identical")


def load_torch_pipeline(root: Path, dtype=None):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_grad_enabled(False)
    with quiet_fd():
        p = StableDiffusionPipeline.from_pretrained(str(root / "tests" / "fixtures" / "sd-tiny" / "torch"),
                                                    safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    if dtype is not None:
        p.unet.to(dtype)
        p.text_encoder.to(dtype)
        p.vae.to(dtype)
    return p


# --------------------------------------------------------------------------------------
# stage: ONNX exports
# --------------------------------------------------------------------------------------
FLAVOURS = ["diffusers-onnx", "optimum", "dynamo", "fp16", "fp16-io32", "ort-packed-kv"]


def _torchscript_export(model, args, path: Path, inputs, outputs, axes, opset=OPSET_DIFFUSERS):
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      do_constant_folding=True, opset_version=opset, dynamo=False)


def export_diffusers_layout(pipe, out: Path) -> None:
    """Layout (a): what diffusers' scripts/convert_stable_diffusion_checkpoint_to_onnx.py produces
    (TorchScript exporter, opset 14, int32 input_ids, float timestep [batch], unet/weights.pb); sizes of the
    dummy inputs from the models' configs (also used for models/toy by train_toy_model.py)."""
    import onnx
    import torch
    from diffusers import OnnxRuntimeModel, OnnxStableDiffusionPipeline

    stage = out.parent / (out.name + ".staging")
    for d in (stage, out):
        if d.exists():
            shutil.rmtree(d)
    latent, cross, image = (pipe.unet.config.sample_size, pipe.unet.config.cross_attention_dim,
                            pipe.vae.config.sample_size)
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer("A sample prompt", padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(torch.int32)
    _torchscript_export(pipe.text_encoder, (ids,), stage / "text_encoder" / "model.onnx", ["input_ids"],
                        ["last_hidden_state", "pooler_output"], {"input_ids": {0: "batch", 1: "sequence"}})
    unet_path = stage / "unet" / "model.onnx"
    _torchscript_export(
        pipe.unet,
        (torch.randn(2, 4, latent, latent, generator=g), torch.randn(2, generator=g),
         torch.randn(2, 77, cross, generator=g), False),
        unet_path, ["sample", "timestep", "encoder_hidden_states", "return_dict"], ["out_sample"],
        {"sample": {0: "batch", 1: "channels", 2: "height", 3: "width"}, "timestep": {0: "batch"},
         "encoder_hidden_states": {0: "batch", 1: "sequence"}})
    m = onnx.load(str(unet_path))
    shutil.rmtree(unet_path.parent)
    unet_path.parent.mkdir()
    onnx.save_model(m, str(unet_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.pb", convert_attribute=False)
    vae_e = copy.deepcopy(pipe.vae)
    vae_e.forward = lambda sample, return_dict: vae_e.encode(sample, return_dict)[0].sample()
    _torchscript_export(vae_e, (torch.randn(1, 3, image, image, generator=g), False),
                        stage / "vae_encoder" / "model.onnx", ["sample", "return_dict"], ["latent_sample"],
                        {"sample": {0: "batch", 1: "channels", 2: "height", 3: "width"}})
    vae_d = copy.deepcopy(pipe.vae)
    vae_d.forward = vae_d.decode
    _torchscript_export(vae_d, (torch.randn(1, 4, latent, latent, generator=g), False),
                        stage / "vae_decoder" / "model.onnx", ["latent_sample", "return_dict"], ["sample"],
                        {"latent_sample": {0: "batch", 1: "channels", 2: "height", 3: "width"}})

    def load(sub):
        return OnnxRuntimeModel.from_pretrained(str(stage / sub), provider="CPUExecutionProvider",
                                                provider_options={})

    onnx_pipe = OnnxStableDiffusionPipeline(
        vae_encoder=load("vae_encoder"), vae_decoder=load("vae_decoder"), text_encoder=load("text_encoder"),
        tokenizer=pipe.tokenizer, unet=load("unet"), scheduler=pipe.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    onnx_pipe.save_pretrained(str(out))
    shutil.rmtree(stage)


def export_optimum_layout(torch_dir: Path, out: Path) -> None:
    """Layout (b): optimum-onnx's exporter (== `optimum-cli export onnx --model torch_dir out`)."""
    from optimum.exporters.onnx import main_export

    if out.exists():
        shutil.rmtree(out)
    main_export(model_name_or_path=str(torch_dir), output=str(out), task="text-to-image", device="cpu",
                local_files_only=True, library_name="diffusers")
    # optimum writes external data only for models over 2 GB (every real SD UNet). Re-save the UNet
    # exactly as optimum's large-model path does: unet/model.onnx + unet/model.onnx_data.
    import onnx

    unet = out / "unet" / "model.onnx"
    m = onnx.load(str(unet))
    onnx.save(m, str(unet), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data",
              convert_attribute=True, size_threshold=100)
    # optimum records the absolute source path; make it machine independent
    mi = json.loads((out / "model_index.json").read_text())
    mi["_name_or_path"] = "sd-tiny/torch"
    (out / "model_index.json").write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    for cfg in out.glob("*/config.json"):
        c = json.loads(cfg.read_text())
        if "_name_or_path" in c:
            c["_name_or_path"] = "sd-tiny/torch/" + Path(c["_name_or_path"]).name
            cfg.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


def export_dynamo_unet(pipe, out_unet: Path) -> None:
    """Layout (c): torch.onnx.export(..., dynamo=True) of the UNet (default opset, external data)."""
    import torch

    if out_unet.exists():
        shutil.rmtree(out_unet)
    out_unet.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, LATENT, LATENT, generator=g), torch.randn(2, generator=g),
            torch.randn(2, 77, CROSS_DIM, generator=g))
    batch = torch.export.Dim("batch", min=1, max=64)

    prog = torch.onnx.export(pipe.unet, args, kwargs={"return_dict": False}, dynamo=True,
                             input_names=["sample", "timestep", "encoder_hidden_states"],
                             output_names=["out_sample"],
                             dynamic_shapes={"sample": {0: batch}, "timestep": {0: batch},
                                             "encoder_hidden_states": {0: batch}, "return_dict": None},
                             external_data=True, optimize=True)
    prog.save(str(out_unet / "model.onnx"), external_data=True)


def make_fp16_unets(src_unet: Path, fx: Path) -> None:
    import onnx
    from onnxconverter_common import float16 as occ16
    from onnxruntime.transformers import float16 as ort16

    m = onnx.load(str(src_unet))
    # onnxconverter-common's output (occ16) is rejected by onnxruntime 1.31 (a Cast keeps to=FLOAT while its
    # output is declared float16), so both fp16 UNets come from onnxruntime's converter.
    del occ16
    a = ort16.convert_float_to_float16(copy.deepcopy(m), keep_io_types=False)
    (fx / "fp16" / "unet").mkdir(parents=True, exist_ok=True)
    onnx.save_model(a, str(fx / "fp16" / "unet" / "model.onnx"))
    b = ort16.convert_float_to_float16(copy.deepcopy(m), keep_io_types=True)
    (fx / "fp16-io32" / "unet").mkdir(parents=True, exist_ok=True)
    onnx.save_model(b, str(fx / "fp16-io32" / "unet" / "model.onnx"))


def make_packed_kv_unet(src_unet: Path, dst: Path) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("unet")
    m = optimize_model(str(src_unet), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                       optimization_options=opts, use_gpu=True)
    m.convert_float_to_float16(keep_io_types=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    m.save_model_to_file(str(dst), use_external_data_format=False)


def link_flavour(fx: Path, flavour: str, base: str = "optimum") -> None:
    """A flavour dir holds its own unet/; everything else is a relative symlink into ../<base>/."""
    d = fx / flavour
    for sub in ("text_encoder", "tokenizer", "vae_decoder", "vae_encoder", "scheduler"):
        if (fx / base / sub).exists():
            symlink(d / sub, f"../{base}/{sub}")
    shutil.copyfile(fx / base / "model_index.json", d / "model_index.json")


def stage_export(root: Path) -> None:
    fx = root / "tests" / "fixtures" / "sd-tiny"
    pipe = load_torch_pipeline(root)
    with Log.stage("export (a) diffusers convert-script layout"):
        export_diffusers_layout(pipe, fx / "diffusers-onnx")
    with Log.stage("export (b) optimum layout"):
        export_optimum_layout(fx / "torch", fx / "optimum")
    with Log.stage("export (c) dynamo UNet"):
        export_dynamo_unet(pipe, fx / "dynamo" / "unet")
    with Log.stage("export (d) fp16 UNets"):
        make_fp16_unets(fx / "optimum" / "unet" / "model.onnx", fx)
    with Log.stage("export (e) onnxruntime transformers optimizer, packed KV"):
        make_packed_kv_unet(fx / "optimum" / "unet" / "model.onnx", fx / "ort-packed-kv" / "unet" / "model.onnx")
    for fl in ("diffusers-onnx", "optimum"):
        shutil.rmtree(fx / fl / "tokenizer")
        symlink(fx / fl / "tokenizer", "../tokenizer")
    for fl in ("dynamo", "fp16", "fp16-io32", "ort-packed-kv"):
        link_flavour(fx, fl)


# --------------------------------------------------------------------------------------
# stage: facts about the exported UNets (K/V nodes, uniqueness of K/V shapes, packed KV)
# --------------------------------------------------------------------------------------
def kv_module_names(unet) -> list[str]:
    """Cross-attention modules in diffusers' module order."""
    return [n for n, m in unet.named_modules() if n.endswith("attn2")]


def _kv_from_node_name(name: str) -> str | None:
    # "/down_blocks.0/attentions.0/transformer_blocks.0/attn2/to_k/MatMul" -> "...attn2.to_k.weight"
    parts = name.strip("/").split("/")
    if len(parts) >= 3 and parts[-3] == "attn2" and parts[-2] in ("to_k", "to_v"):
        return ".".join(parts[:-1]) + ".weight"
    return None


def _kv_from_dynamo_node(node) -> str | None:
    md = {p.key: p.value for p in node.metadata_props}
    scopes = md.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    # e.g. "['', 'down_blocks.0', ..., '...attn2', '...attn2.to_k', 'linear_8']" (last entry = the op)
    for scope in reversed(json.loads(scopes.replace("'", '"'))):
        if scope.endswith(("attn2.to_k", "attn2.to_v")):
            return scope + ".weight"
    return None


def find_kv_initializers(model) -> dict[str, str]:
    """module weight key -> initializer name, for TorchScript (node names) and dynamo (metadata) exports."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        key = _kv_from_node_name(n.name) or _kv_from_dynamo_node(n)
        if key and n.input[1] in inits:
            out[key] = n.input[1]
    return out


def stage_facts(root: Path) -> None:
    import onnx
    from onnx import numpy_helper

    fx = root / "tests" / "fixtures" / "sd-tiny"
    pipe = load_torch_pipeline(root)
    names = kv_module_names(pipe.unet)
    sd = pipe.unet.state_dict()
    kv_keys = [f"{n}.{w}.weight" for n in names for w in ("to_k", "to_v")]
    kv_shapes = sorted({tuple(sd[k].shape[::-1]) for k in kv_keys})
    facts = {"cross_attention_modules": names, "kv_keys": kv_keys,
             "kv_torch_shapes": {k: list(sd[k].shape) for k in kv_keys}, "flavours": {}}
    for fl in ("diffusers-onnx", "optimum", "dynamo", "fp16", "fp16-io32"):
        path = fx / fl / "unet" / "model.onnx"
        m = onnx.load(str(path))
        kv = find_kv_initializers(m)
        assert sorted(kv) == sorted(kv_keys), (fl, sorted(kv))
        inits = {i.name: i for i in m.graph.initializer}
        same_shape = [i.name for i in m.graph.initializer if tuple(i.dims) in kv_shapes]
        assert sorted(same_shape) == sorted(kv.values()), (fl, "another initializer has a K/V shape")
        for k, iname in kv.items():
            w = numpy_helper.to_array(inits[iname])
            ref = sd[k].numpy().T
            assert w.shape == ref.shape
            np.testing.assert_array_equal(w, ref.astype(w.dtype), err_msg=f"{fl} {k}")
        node_names = {}
        for n in m.graph.node:
            if n.op_type == "MatMul" and n.input[1] in kv.values():
                node_names[[k for k, v in kv.items() if v == n.input[1]][0]] = n.name
        facts["flavours"][fl] = {
            "inputs": {i.name: {"dtype": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type),
                                "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
                       for i in m.graph.input},
            "outputs": [o.name for o in m.graph.output],
            "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "kv_initializers": dict(sorted(kv.items())),
            "kv_matmul_nodes": dict(sorted(node_names.items())),
            "kv_initializer_dtype": onnx.TensorProto.DataType.Name(inits[next(iter(kv.values()))].data_type),
            "external_data": sorted({e.value for i in onnx.load(str(path), load_external_data=False).graph.initializer
                                     for e in i.external_data if e.key == "location"}),
        }
    # the onnxruntime-optimized UNet: packed KV
    m = onnx.load(str(fx / "ort-packed-kv" / "unet" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consumers = {}
    for n in m.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    packed = []
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.name.startswith("MatMul_KV_"):
            w = inits[n.input[1]]
            match = None
            for name in names:
                k = sd[f"{name}.to_k.weight"].numpy().T.astype(np.float16)
                v = sd[f"{name}.to_v.weight"].numpy().T.astype(np.float16)
                if w.shape[1] != 2 * k.shape[1]:
                    continue
                heads = pipe.unet.get_submodule(name).heads
                hd = k.shape[1] // heads
                view = w.reshape(w.shape[0], heads, 2, hd)
                if (np.array_equal(view[:, :, 0, :].reshape(k.shape), k)
                        and np.array_equal(view[:, :, 1, :].reshape(v.shape), v)):
                    assert match is None
                    match = (name, heads, hd)
            assert match, n.name
            reshape = consumers[n.output[0]][0]
            mha = consumers[reshape.output[0]][0]
            assert reshape.op_type == "Reshape" and mha.op_type == "MultiHeadAttention"
            shape = inits[reshape.input[1]].tolist()
            packed.append({"node": n.name, "weight": n.input[1], "weight_shape": list(w.shape),
                           "weight_dtype": "FLOAT16", "module": match[0], "heads": match[1], "head_dim": match[2],
                           "reshape_node": reshape.name, "reshape_shape": shape, "mha_node": mha.name,
                           "mha_input_index": list(mha.input).index(reshape.output[0]),
                           "mha_num_heads": next(a.i for a in mha.attribute if a.name == "num_heads")})
    assert len(packed) == len(names)
    facts["flavours"]["ort-packed-kv"] = {
        "inputs": {i.name: {"dtype": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type),
                            "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
                   for i in m.graph.input},
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "packed_kv": packed,
        "layout": "W[C_in, heads*2*head_dim] viewed as [C_in, heads, 2, head_dim]; [:, :, 0, :] = K^T, "
                  "[:, :, 1, :] = V^T (each reshaped to [C_in, heads*head_dim]); verified bit-exactly in fp16",
    }
    write_json(root / "tests" / "fixtures" / "goldens" / "unet_facts.json", facts)
    Log.say(f"K/V: {len(kv_keys)} matrices, ONNX shapes {kv_shapes}; unique in every flavour; packed KV verified")


# --------------------------------------------------------------------------------------
# stage: text encoder goldens and UNet input/output goldens
# --------------------------------------------------------------------------------------
def te_onnx(sess, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dt = np_type_of(sess.get_inputs()[0].type)
    out = sess.run(None, {"input_ids": ids.astype(dt)})
    return out[0], out[1]


def stage_text_encoder(root: Path) -> None:
    import torch

    fx = root / "tests" / "fixtures"
    pipe = load_torch_pipeline(root)
    ids = np.array([pipe.tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids
                    for p in TEXT_ENCODER_PROMPTS], dtype=np.int64)
    t = {"input_ids": ids}
    for fl in ("diffusers-onnx", "optimum"):
        h, pooled = te_onnx(ort_session(fx / "sd-tiny" / fl / "text_encoder" / "model.onnx"), ids)
        t[f"last_hidden_state.{fl}"], t[f"pooler_output.{fl}"] = h, pooled
    o = pipe.text_encoder(torch.from_numpy(ids))
    t["last_hidden_state.torch_float32"] = o[0].numpy()
    t["pooler_output.torch_float32"] = o[1].numpy()
    te64 = copy.deepcopy(pipe.text_encoder).double()
    with default_dtype(torch.float64):
        o = te64(torch.from_numpy(ids))
    t["last_hidden_state.torch_float64"] = o[0].numpy()
    t["pooler_output.torch_float64"] = o[1].numpy()
    save_st(fx / "goldens" / "text_encoder.safetensors", t)
    diffs = {k: float(np.abs(t[k].astype(np.float64) - t["last_hidden_state.torch_float64"]).max())
             for k in t if k.startswith("last_hidden_state.") and not k.endswith("float64")}
    write_json(fx / "goldens" / "text_encoder.json", {"prompts": TEXT_ENCODER_PROMPTS,
                                                        "max_abs_diff_vs_torch_float64": diffs})
    Log.say(f"text encoder: max |x - torch_f64| {diffs}")


def unet_io_inputs(root: Path):
    import torch

    fx = root / "tests" / "fixtures"
    pipe = load_torch_pipeline(root)
    ids = np.array([pipe.tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids
                    for p in ("", GEN_PROMPT)], dtype=np.int64)
    ehs, _ = te_onnx(ort_session(fx / "sd-tiny" / "optimum" / "text_encoder" / "model.onnx"), ids)
    g = torch.Generator().manual_seed(11)
    sample = torch.randn(2, 4, LATENT, LATENT, generator=g).numpy()
    return pipe, sample, np.float32(500.0), ehs


def run_unet(sess, sample, t, ehs) -> np.ndarray:
    ins = {i.name: i for i in sess.get_inputs()}
    dt = np_type_of(ins["sample"].type)
    feed = {"sample": sample.astype(dt), "timestep": timestep_array(sess, float(t), sample.shape[0]),
            "encoder_hidden_states": ehs.astype(np_type_of(ins["encoder_hidden_states"].type))}
    return sess.run(None, feed)[0]


def stage_unet_io(root: Path) -> None:
    import torch

    fx = root / "tests" / "fixtures"
    pipe, sample, t, ehs = unet_io_inputs(root)
    out = {"sample": sample, "timestep": np.array([t], dtype=np.float32), "encoder_hidden_states": ehs}
    ref = pipe.unet(torch.from_numpy(sample), torch.tensor(float(t)), torch.from_numpy(ehs)).sample.numpy()
    out["out_sample.torch_float32"] = ref
    u64 = copy.deepcopy(pipe.unet).double()
    with default_dtype(torch.float64):
        ref64 = u64(torch.from_numpy(sample).double(), torch.tensor(float(t), dtype=torch.float64),
                    torch.from_numpy(ehs).double()).sample.numpy()
    out["out_sample.torch_float64"] = ref64
    report = {"timestep": float(t), "prompts": ["", GEN_PROMPT], "text_encoder": "optimum", "flavours": {}}
    for fl in ("diffusers-onnx", "optimum", "dynamo", "fp16", "fp16-io32", "ort-packed-kv"):
        try:
            sess = ort_session(fx / "sd-tiny" / fl / "unet" / "model.onnx")
            y = run_unet(sess, sample, t, ehs)
        except Exception as e:  # noqa: BLE001
            report["flavours"][fl] = {"runs_on_cpu": False, "error": str(e).splitlines()[0][:300]}
            continue
        out[f"out_sample.{fl}"] = y
        report["flavours"][fl] = {"runs_on_cpu": True, "dtype": str(y.dtype),
                                  "max_abs_diff_vs_torch_float64": float(np.abs(y.astype(np.float64) - ref64).max())}
    report["out_sample_abs_max"] = float(np.abs(ref64).max())
    report["out_sample_std"] = float(ref64.std())
    save_st(fx / "goldens" / "unet_io.safetensors", out)
    write_json(fx / "goldens" / "unet_io.json", report)
    Log.say(f"unet io: {json.dumps(report['flavours'])}")


# --------------------------------------------------------------------------------------
# stage: TIME edits with diffusers' StableDiffusionModelEditingPipeline.edit_model
# --------------------------------------------------------------------------------------
AN_IDS_NOTE = "token ids that decode to 'an' (514 'an' and 550 'an</w>') are compared as 'a' (320)"


def time_texts(src: str, dst: str, augs: list[str]) -> tuple[list[str], list[str]]:
    """The augmented prompt lists, as the editing pipeline builds them (own code)."""
    def base(t: str) -> str:
        return "a" + t[1:] if t[:1] == "A" else t
    return [src] + [a + base(src) for a in augs], [dst] + [a + base(dst) for a in augs]


def time_token_map(tok, old: str, new: str) -> tuple[list[int], list[int], list[int]]:
    """Destination position of every source position (own implementation of the rule)."""
    a, b = tok(old).input_ids, tok(new).input_ids
    a_id = tok("a").input_ids[1]
    an_ids = {i for i in (514, 550)}

    def norm(ids):
        return [a_id if t in an_ids else t for t in ids]
    na, nb = norm(a), norm(b)
    idx, j = [], 0
    for t in na:
        while nb[j] != t:
            j += 1
        idx.append(j)
        j += 1
    idx += list(range(j, 77))
    idx += [76] * (77 - len(idx))
    return a, b, idx


def run_time_case(root: Path, case: dict, dtype_name: str) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionModelEditingPipeline
    from diffusers.pipelines.deprecated.stable_diffusion_variants import pipeline_stable_diffusion_model_editing as pme

    dtype = {"f64": torch.float64, "f32": torch.float32}[dtype_name]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        base = load_torch_pipeline(root)
        unet, te = base.unet.to(dtype), base.text_encoder.to(dtype)
        augs = pme.AUGS_CONST if case["augs"] is None else case["augs"]
        with quiet_fd():
            pipe = StableDiffusionModelEditingPipeline(
                vae=base.vae, text_encoder=te, tokenizer=base.tokenizer, unet=unet,
                scheduler=DDIMScheduler.from_config(base.scheduler.config), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False, with_to_k=case["with_to_k"], with_augs=augs)
        assert pipe.ca_clip_layers == [], "the shipped pipeline was expected to find no layer"
        # rebuild the layer lists like its __init__ does, with today's class name and this model's width
        ca = []

        def walk(mod):
            if type(mod).__name__ == "Attention":
                ca.append(mod)
            else:
                for ch in mod.children():
                    walk(ch)
        for name, child in unet.named_children():
            if "down" in name or "up" in name or "mid" in name:
                walk(child)
        ca = [m for m in ca if m.to_v.in_features == CROSS_DIM]
        names_of = {id(m): n for n, m in unet.named_modules()}
        ca_names = [names_of[id(m)] for m in ca]
        assert sorted(ca_names) == sorted(kv_module_names(unet))
        pipe.ca_clip_layers = ca
        pipe.projection_matrices = [m.to_v for m in ca]
        pipe.og_matrices = [copy.deepcopy(m.to_v) for m in ca]
        if case["with_to_k"]:
            pipe.projection_matrices += [m.to_k for m in ca]
            pipe.og_matrices += [copy.deepcopy(m.to_k) for m in ca]
        orig = {f"{n}.{w}.weight": getattr(m, w).weight.detach().clone() for n, m in zip(ca_names, ca)
                for w in ("to_k", "to_v")}
        calls = []
        hook = te.register_forward_hook(lambda mod, inp, out: calls.append((inp[0].clone(), out[0].detach().clone())))
        edits = []
        for e, (src, dst) in enumerate(case["edits"]):
            n0 = len(calls)
            pipe.edit_model(src, dst, lamb=case["lamb"], restart_params=(e == 0))
            old_texts, new_texts = time_texts(src, dst, augs)
            rec = {"source": src, "destination": dst, "old_texts": old_texts, "new_texts": new_texts,
                   "old_ids": [], "new_ids": [], "idxs_replace": []}
            olds, news = [], []
            for (ids, emb), ot, nt in zip(calls[n0:], old_texts, new_texts):
                exp = base.tokenizer([ot, nt], padding="max_length", max_length=77, truncation=True).input_ids
                assert ids.tolist() == exp
                a, b, idx = time_token_map(base.tokenizer, ot, nt)
                rec["old_ids"].append(a)
                rec["new_ids"].append(b)
                rec["idxs_replace"].append(idx)
                olds.append(emb[0])
                news.append(emb[1])
            assert len(calls) - n0 == len(old_texts)
            rec["old_emb"] = torch.stack(olds)
            rec["new_emb"] = torch.stack(news)
            edits.append(rec)
        hook.remove()
        edited = {}
        for n, m in zip(ca_names, ca):
            for w in (("to_k", "to_v") if case["with_to_k"] else ("to_v",)):
                edited[f"{n}.{w}.weight"] = getattr(m, w).weight.detach().clone()
        for k, w in edited.items():
            assert (w - orig[k]).abs().max() > 1e-4, f"{k} did not change"
        if not case["with_to_k"]:
            for n, m in zip(ca_names, ca):
                assert torch.equal(m.to_k.weight, orig[f"{n}.to_k.weight"])
        # independent check: W' = W A with A = (lam I + sum c* c^T)(lam I + sum c c^T)^-1, applied per edit
        lam = case["lamb"]
        A_list = []
        for rec in edits:
            C = rec["old_emb"].double().numpy()
            N = rec["new_emb"].double().numpy()
            cstar = np.stack([N[i][rec["idxs_replace"][i]] for i in range(len(N))])
            d = C.shape[-1]
            m1 = lam * np.eye(d) + np.einsum("pti,ptj->ij", cstar, C)
            m2 = lam * np.eye(d) + np.einsum("pti,ptj->ij", C, C)
            A_list.append(m1 @ np.linalg.inv(m2))
        worst = 0.0
        for k, w in edited.items():
            W = orig[k].double().numpy()
            for A in A_list:
                W = W @ A
            rel = float(np.abs(W - w.double().numpy()).max() / np.abs(W).max())
            worst = max(worst, rel)
        assert worst < (1e-9 if dtype_name == "f64" else 5e-2), worst
        return {"edits": edits, "edited": edited, "orig": orig, "A": A_list, "check_rel": worst, "augs": augs}
    finally:
        torch.set_default_dtype(prev)


def stage_time(root: Path) -> None:
    fx = root / "tests" / "fixtures"
    out = fx / "goldens" / "time"
    if out.exists():
        shutil.rmtree(out)
    index = {"cases": [], "an_rule": AN_IDS_NOTE, "weights_layout": "torch Linear weight [out, in] (ONNX holds W^T)"}
    orig_saved = False
    te_sessions = {fl: ort_session(fx / "sd-tiny" / fl / "text_encoder" / "model.onnx")
                   for fl in ("diffusers-onnx", "optimum")}
    for case in TIME_CASES:
        res = {d: run_time_case(root, case, d) for d in ("f64", "f32")}
        if not orig_saved:
            save_st(out / "kv_original.safetensors", {k: v.float().numpy() for k, v in res["f32"]["orig"].items()})
            orig_saved = True
        rel = 0.0
        for k, w64 in res["f64"]["edited"].items():
            w32 = res["f32"]["edited"][k].double()
            rel = max(rel, float((w32 - w64).abs().max() / w64.abs().max()))
        max_change = max(float((w - res["f64"]["orig"][k].double()).abs().max() / res["f64"]["orig"][k].abs().max())
                         for k, w in res["f64"]["edited"].items())
        onnx_diff = {}
        for fl, sess in te_sessions.items():
            dmax = 0.0
            for rec in res["f64"]["edits"]:
                for i in range(len(rec["old_texts"])):
                    for txt, emb in ((rec["old_texts"][i], rec["old_emb"][i]), (rec["new_texts"][i], rec["new_emb"][i])):
                        ids = np.array([load_tok(root)(txt, padding="max_length", max_length=77,
                                                       truncation=True).input_ids], dtype=np.int64)
                        h, _ = te_onnx(sess, ids)
                        dmax = max(dmax, float(np.abs(h[0].astype(np.float64) - emb.numpy()).max()))
            onnx_diff[fl] = dmax
        for d in ("f64", "f32"):
            r = res[d]
            t = {k: v.numpy() for k, v in r["edited"].items()}
            for e, rec in enumerate(r["edits"]):
                t[f"emb.old.{e}"] = rec["old_emb"].numpy()
                t[f"emb.new.{e}"] = rec["new_emb"].numpy()
            if d == "f64":
                for e, A in enumerate(r["A"]):
                    t[f"A.{e}"] = A
            save_st(out / f"{case['name']}.{d}.safetensors", t)
        r = res["f64"]
        index["cases"].append({
            "name": case["name"], "lambda": case["lamb"], "with_to_k": case["with_to_k"],
            "augmentations": r["augs"], "restart_params": [e == 0 for e in range(len(case["edits"]))],
            "edits": [{k: v for k, v in rec.items() if not k.endswith("_emb")} for rec in r["edits"]],
            "edited_keys": sorted(r["edited"]),
            "files": {"f64": f"{case['name']}.f64.safetensors", "f32": f"{case['name']}.f32.safetensors"},
            "max_rel_diff_f32_vs_f64": rel, "max_rel_change_vs_original": max_change,
            "check_W_times_A_rel": {"f64": res["f64"]["check_rel"], "f32": res["f32"]["check_rel"]},
            "max_abs_diff_onnx_text_encoder_vs_torch_f64_embeddings": onnx_diff,
        })
        Log.say(f"TIME {case['name']}: f32 vs f64 rel {rel:.2e}; change {max_change:.3f}; "
                f"W·A check f64 {res['f64']['check_rel']:.1e} f32 {res['f32']['check_rel']:.1e}; onnx TE {onnx_diff}")
    write_json(out / "cases.json", index)


# --------------------------------------------------------------------------------------
# stage: schedulers
# --------------------------------------------------------------------------------------
SCHEDULERS = [
    # name, class, config overrides, step kwargs, where noise comes from
    ("pndm", "PNDMScheduler", {}, {}, None),
    ("ddim_eta0", "DDIMScheduler", {}, {"eta": 0.0}, None),
    ("ddim_eta1", "DDIMScheduler", {}, {"eta": 1.0}, "variance_noise"),
    ("euler", "EulerDiscreteScheduler", {}, {}, None),
    ("euler_leading", "EulerDiscreteScheduler", {"timestep_spacing": "leading"}, {}, None),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}, {}, "randn_tensor"),
    ("lms", "LMSDiscreteScheduler", {}, {}, None),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}, None),
    # few-step models: SDXL-Turbo's Euler ancestral and SD-Turbo's Euler with trailing spacing; LCM (noise at
    # every call but the last), with its defaults and with every key of its own changed
    ("euler_ancestral_trailing", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {},
     "randn_tensor"),
    ("euler_trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, None),
    ("lcm", "LCMScheduler", {}, {}, "randn_tensor"),
    ("lcm_options", "LCMScheduler", {"original_inference_steps": 30, "timestep_scaling": 4.0, "clip_sample": True,
                                     "clip_sample_range": 1.5, "prediction_type": "v_prediction",
                                     "set_alpha_to_one": False, "rescale_betas_zero_snr": True}, {}, "randn_tensor"),
]


def make_scheduler(cls_name: str, overrides: dict):
    import diffusers

    return getattr(diffusers, cls_name).from_config({**SD1_SCHEDULER, **overrides})


@contextlib.contextmanager
def supplied_noise(module_name: str, noises: list):
    """Make the scheduler's randn_tensor return our own noise (recorded in `noises`)."""
    import importlib

    import torch

    mod = importlib.import_module(module_name)
    orig = mod.randn_tensor
    g = torch.Generator().manual_seed(SCHED_SEED + 1000 + len(noises))

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        z = torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dtype or torch.float32)
        noises.append(z.clone())
        return z
    mod.randn_tensor = fake
    try:
        yield
    finally:
        mod.randn_tensor = orig


def stage_schedulers(root: Path) -> None:
    import torch

    out = root / "tests" / "fixtures" / "goldens" / "schedulers"
    if out.exists():
        shutil.rmtree(out)
    index = {"num_inference_steps": SCHED_STEPS, "shape": list(SCHED_SHAPE), "base_config": SD1_SCHEDULER,
             "schedulers": {}}
    for name, cls, over, kw, noise_src in SCHEDULERS:
        sch = make_scheduler(cls, over)
        sch.set_timesteps(SCHED_STEPS)
        g = torch.Generator().manual_seed(SCHED_SEED)
        x0 = torch.randn(SCHED_SHAPE, generator=g)
        x = x0 * sch.init_noise_sigma
        rec = {"initial_noise": x0.numpy(), "timesteps": sch.timesteps.numpy().copy()}
        if getattr(sch, "sigmas", None) is not None:
            rec["sigmas"] = sch.sigmas.numpy().copy()
        samples, inputs, outputs, noises, prevs = [x.clone()], [], [], [], []
        gm = torch.Generator().manual_seed(SCHED_SEED + 1)
        recorded: list = []
        for i, t in enumerate(sch.timesteps):
            mi = sch.scale_model_input(x, t)
            eps = torch.randn(SCHED_SHAPE, generator=gm)  # stands in for the UNet's output
            extra = dict(kw)
            z = torch.zeros(SCHED_SHAPE)
            if noise_src == "variance_noise":
                z = torch.randn(SCHED_SHAPE, generator=torch.Generator().manual_seed(SCHED_SEED + 100 + i))
                extra["variance_noise"] = z
            if noise_src == "randn_tensor":
                n0 = len(recorded)
                with supplied_noise(type(sch).__module__, recorded):
                    x = sch.step(eps, t, x, **extra).prev_sample
                assert len(recorded) in (n0, n0 + 1)  # LCM draws none after its last call
                if len(recorded) > n0:
                    z = recorded[-1]
            else:
                x = sch.step(eps, t, x, **extra).prev_sample
            inputs.append(mi.clone())
            outputs.append(eps)
            noises.append(z)
            prevs.append(x.clone())
            samples.append(x.clone())
        rec.update({"samples": torch.stack(samples[:-1]).numpy(), "model_inputs": torch.stack(inputs).numpy(),
                    "model_outputs": torch.stack(outputs).numpy(), "noise": torch.stack(noises).numpy(),
                    "prev_samples": torch.stack(prevs).numpy()})
        save_st(out / f"{name}.safetensors", rec)
        cfg = {k: v for k, v in dict(sch.config).items() if not k.startswith("_")}
        index["schedulers"][name] = {
            "class": cls, "config": json.loads(json.dumps(cfg)), "config_overrides": over, "step_kwargs": kw,
            "noise": noise_src, "noise_draws": len(recorded) if noise_src == "randn_tensor" else None,
            "init_noise_sigma": float(sch.init_noise_sigma), "order": sch.order,
            "num_calls": len(sch.timesteps), "timesteps": [float(t) for t in sch.timesteps],
            "timesteps_dtype": str(sch.timesteps.dtype).replace("torch.", ""), "file": f"{name}.safetensors"}
        Log.say(f"scheduler {name}: {len(sch.timesteps)} calls, t = {[float(t) for t in sch.timesteps][:4]}..., "
                f"init_noise_sigma {float(sch.init_noise_sigma):.4f}")
    write_json(out / "index.json", index)


# --------------------------------------------------------------------------------------
# stage: generations (3-step runs through ONNX Runtime)
# --------------------------------------------------------------------------------------
def edit_onnx_unet(src_dir: Path, dst_dir: Path, weights: dict) -> None:
    """Copy an fp32 ONNX UNet, replacing the K/V initializers by W'^T (onnx python package)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src_dir / "model.onnx"))
    kv = find_kv_initializers(m)
    inits = {i.name: i for i in m.graph.initializer}
    for key, w in weights.items():
        old = inits[kv[key]]
        new = numpy_helper.from_array(np.ascontiguousarray(w.T.astype(np.float32)), old.name)
        old.CopyFrom(new)
    dst_dir.mkdir(parents=True, exist_ok=True)
    ext = sorted({e.value for i in onnx.load(str(src_dir / "model.onnx"), load_external_data=False).graph.initializer
                  for e in i.external_data if e.key == "location"})
    if ext:
        onnx.save_model(m, str(dst_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=ext[0])
    else:
        onnx.save_model(m, str(dst_dir / "model.onnx"))


def sd_loop(te, unet, vae_dec, tok, sched, prompt: str, negative: str | None, latents0: np.ndarray,
            steps: int, guidance: float) -> tuple[np.ndarray, list]:
    """Our own minimal loop mirroring OnnxStableDiffusionPipeline.__call__ (CFG batch [uncond, cond])."""
    import torch

    def enc(text):
        ids = np.array([tok(text, padding="max_length", max_length=77, truncation=True).input_ids])
        return te_onnx(te, ids)[0]
    ehs = np.concatenate([enc(negative or ""), enc(prompt)])
    sched.set_timesteps(steps)
    latents = latents0 * np.float32(sched.init_noise_sigma)
    trace = []
    for t in sched.timesteps:
        x = np.concatenate([latents] * 2)
        x = sched.scale_model_input(torch.from_numpy(x), t).numpy()
        eps = run_unet(unet, x, float(t), ehs)
        eu, ec = np.split(eps, 2)
        eps = eu + guidance * (ec - eu)
        latents = sched.step(torch.from_numpy(eps), t, torch.from_numpy(latents)).prev_sample.numpy()
        trace.append(float(t))
    lat = latents / np.float32(0.18215)
    img = np.concatenate([vae_dec.run(None, {"latent_sample": lat[i:i + 1]})[0] for i in range(lat.shape[0])])
    img = np.clip(img / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return img.astype(np.float32), trace


def stage_generations(root: Path) -> None:
    import torch
    from safetensors.numpy import load_file

    fx = root / "tests" / "fixtures"
    out = fx / "goldens" / "generations"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = load_tok(root)
    latents0 = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(GEN_SEED)).numpy()
    save_npy(out / "latents.npy", latents0)
    edit = load_file(str(fx / "goldens" / "time" / "roses_blue.f64.safetensors"))
    weights = {k: v for k, v in edit.items() if k.endswith(".weight")}
    work = Path(tempfile.mkdtemp(prefix="edited-unet-", dir=str(root / "third_party") if (root / "third_party").exists()
                                 else None))
    index = {"prompt": GEN_PROMPT, "negative_prompt_used": GEN_NEGATIVE, "guidance_scale": GEN_GUIDANCE,
             "num_inference_steps": GEN_STEPS, "latents": "latents.npy", "latents_seed": GEN_SEED,
             "latents_generator": "torch.randn(1,4,16,16, generator=torch.Generator().manual_seed(42))",
             "vae_scaling_factor": 0.18215, "image_layout": "NHWC float32 in [0,1]",
             "edited_weights": "time/roses_blue.f64.safetensors (cast to float32, written into a copy of the "
                               "ONNX UNet with the onnx package)", "runs": []}
    try:
        for fl in ("diffusers-onnx", "optimum"):
            d = fx / "sd-tiny" / fl
            te = ort_session(d / "text_encoder" / "model.onnx")
            vae = ort_session(d / "vae_decoder" / "model.onnx")
            edited_dir = work / fl / "unet"
            edit_onnx_unet(d / "unet", edited_dir, weights)
            unets = {False: ort_session(d / "unet" / "model.onnx"), True: ort_session(edited_dir / "model.onnx")}
            for sname, cls in (("pndm", "PNDMScheduler"), ("euler", "EulerDiscreteScheduler")):
                for neg in (False, True):
                    for edited in (False, True):
                        if fl == "diffusers-onnx" and neg != edited:
                            continue  # layout (a): a subset (same weights as (b))
                        sch = make_scheduler(cls, {})
                        img, ts = sd_loop(te, unets[edited], vae, tok, sch, GEN_PROMPT, GEN_NEGATIVE if neg else None,
                                          latents0, GEN_STEPS, GEN_GUIDANCE)
                        name = f"{fl}.{sname}.{'neg' if neg else 'noneg'}.{'edited' if edited else 'orig'}"
                        save_npy(out / f"{name}.npy", img)
                        index["runs"].append({"name": name, "file": f"{name}.npy", "layout": fl, "scheduler": sname,
                                              "scheduler_class": cls, "negative_prompt": GEN_NEGATIVE if neg else None,
                                              "edited": edited, "timesteps": ts, "shape": list(img.shape),
                                              "mean": float(img.mean()), "std": float(img.std())})
        # cross-check our loop against diffusers' own OnnxStableDiffusionPipeline on layout (a)
        index["pipeline_crosscheck"] = crosscheck_onnx_pipeline(fx, out, latents0, work, weights)
        # the edit must visibly change the image
        for r in index["runs"]:
            if r["edited"]:
                twin = out / (r["file"].replace(".edited.", ".orig."))
                if twin.exists():
                    r["max_abs_diff_vs_unedited"] = float(np.abs(np.load(out / r["file"]) - np.load(twin)).max())
        pairs = {}
        for r in index["runs"]:
            pairs.setdefault(r["name"].split(".", 1)[1], []).append(r["file"])
        index["max_abs_diff_between_layouts"] = {
            k: float(np.abs(np.load(out / v[0]) - np.load(out / v[1])).max()) for k, v in pairs.items() if len(v) == 2}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(out / "index.json", index)
    Log.say(f"generations: {len(index['runs'])} images; layouts (a) vs (b) {index['max_abs_diff_between_layouts']}; "
            f"pipeline cross-check {index['pipeline_crosscheck']}")


def crosscheck_onnx_pipeline(fx: Path, out: Path, latents0, work: Path, weights) -> dict:
    """Run diffusers' OnnxStableDiffusionPipeline itself on layout (a) and compare with our loop's images."""
    import diffusers
    from diffusers import OnnxStableDiffusionPipeline

    res = {}
    d = fx / "sd-tiny" / "diffusers-onnx"
    with quiet_fd():
        pipe = OnnxStableDiffusionPipeline.from_pretrained(str(d), provider="CPUExecutionProvider",
                                                           provider_options={})
    pipe.set_progress_bar_config(disable=True)
    for sname, cls in (("pndm", "PNDMScheduler"), ("euler", "EulerDiscreteScheduler")):
        for neg in (False, True):
            name = f"diffusers-onnx.{sname}.{'neg' if neg else 'noneg'}.{'edited' if neg else 'orig'}"
            if neg:
                continue  # the pipeline loads the unedited UNet only
            pipe.scheduler = getattr(diffusers, cls).from_config({**SD1_SCHEDULER})
            try:
                img = pipe(GEN_PROMPT, height=IMAGE, width=IMAGE, num_inference_steps=GEN_STEPS,
                           guidance_scale=GEN_GUIDANCE, latents=latents0.copy(), output_type="np").images
                diff = float(np.abs(img - np.load(out / f"{name}.npy")).max())
                res[name] = {"ran": True, "max_abs_diff_vs_our_loop": diff}
            except Exception as e:  # noqa: BLE001
                res[name] = {"ran": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return res


# --------------------------------------------------------------------------------------
# stage: the stand-alone demo model, versions, sizes
# --------------------------------------------------------------------------------------
DEMO_README = """# tiny-random

A complete, stand-alone Stable Diffusion 1.x-style pipeline with seeded **random** weights, in the layout
that `optimum-cli export onnx` writes (unet/model.onnx + unet/model.onnx_data, int64 `input_ids`,
rank-0 float `timestep`). It generates noise-like 128x128 images; it exists to try the tool end to end
without downloading anything. Built by `scripts/make_fixtures.py` (same weights as
`tests/fixtures/sd-tiny/optimum`, see `tests/fixtures/README.md`).

- text_encoder/model.onnx: CLIPTextModel, hidden size 16, vocabulary 49408 (real CLIP BPE), 77 positions
- unet/model.onnx (+ model.onnx_data): UNet2DConditionModel, cross_attention_dim 16, 7 cross-attention layers
- vae_decoder/, vae_encoder/: AutoencoderKL, 4 latent channels, factor 8 (16x16 latents -> 128x128)
- tokenizer/: CLIP tokenizer files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)
- scheduler/scheduler_config.json: PNDM, SD 1.x settings
"""


def stage_demo(root: Path) -> None:
    fx = root / "tests" / "fixtures" / "sd-tiny"
    dst = root / "models" / "tiny-random"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(fx / "optimum", dst, symlinks=False)
    (dst / "README.md").write_text(DEMO_README)
    # it must run on its own: one short generation through onnxruntime
    from transformers import CLIPTokenizer

    with quiet_fd():
        tok = CLIPTokenizer.from_pretrained(str(dst / "tokenizer"))
    import torch

    lat = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)).numpy()
    img, _ = sd_loop(ort_session(dst / "text_encoder" / "model.onnx"), ort_session(dst / "unet" / "model.onnx"),
                     ort_session(dst / "vae_decoder" / "model.onnx"), tok, make_scheduler("PNDMScheduler", {}),
                     "a red car", None, lat, 2, 7.5)
    assert img.shape == (1, IMAGE, IMAGE, 3) and np.isfinite(img).all()
    Log.say(f"demo model: {dir_size(dst) / 1e6:.1f} MB, generation ok")


def stage_versions(root: Path) -> None:
    v = versions()
    v["seeds"] = {"unet": SEED_UNET, "text_encoder": SEED_TEXT, "vae": SEED_VAE, "clip_tiny": SEED_CLIP,
                  "generation_latents": GEN_SEED, "schedulers": SCHED_SEED, "safety_checker": SEED_SAFETY}
    v["configs"] = {"unet": {k: (list(x) if isinstance(x, tuple) else x) for k, x in UNET_CONFIG.items()},
                    "vae": {k: (list(x) if isinstance(x, tuple) else x) for k, x in VAE_CONFIG.items()},
                    "text_encoder": TEXT_CONFIG, "scheduler": SD1_SCHEDULER,
                    "safety_checker": {"vision_config": SAFETY_VISION, "text_config": SAFETY_TEXT,
                                       "projection_dim": SAFETY_PROJECTION}}
    v["onnx_opsets"] = {"diffusers-onnx": OPSET_DIFFUSERS, "optimum": "exporter default (18)",
                        "dynamo": "exporter default (20)", "with-safety/safety_checker": OPSET_DIFFUSERS}
    write_json(root / "tests" / "fixtures" / "versions.json", v)


def size_table(root: Path) -> None:
    rows = []
    for top in ("tests/fixtures", "models/tiny-random"):
        base = root / top
        if not base.exists():
            continue
        for d in sorted(base.iterdir()):
            if d.is_symlink():
                continue
            if d.is_dir():
                for sub in sorted(d.iterdir()):
                    if not sub.is_symlink():
                        rows.append((str(sub.relative_to(root)), dir_size(sub) if sub.is_dir() else sub.stat().st_size))
            else:
                rows.append((str(d.relative_to(root)), d.stat().st_size))
    total = sum(r[1] for r in rows)
    Log.say("sizes (symlinks not counted):")
    for name, n in rows:
        print(f"    {name:<60s} {n / 1e6:8.2f} MB")
    print(f"    {'TOTAL':<60s} {total / 1e6:8.2f} MB")
    fixtures = sum(n for name, n in rows if name.startswith("tests/fixtures"))
    print(f"    {'tests/fixtures':<60s} {fixtures / 1e6:8.2f} MB")
    assert fixtures < 80e6, f"tests/fixtures is {fixtures / 1e6:.1f} MB, over its 80 MB budget"


# --------------------------------------------------------------------------------------
# stage: a tiny random CLIPModel exported with optimum (zero-shot-image-classification)
# --------------------------------------------------------------------------------------
CLIP_TEXTS = ["a photo of a cat", "A red car!", "東京の夜景"]


def stage_clip(root: Path) -> None:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    fx = root / "tests" / "fixtures"
    out = fx / "clip-tiny"
    if out.exists():
        shutil.rmtree(out)
    seed_all(SEED_CLIP)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=8, intermediate_size=17, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=23, num_hidden_layers=1,
                           num_attention_heads=2, num_channels=3),
        projection_dim=12)
    model = CLIPModel(cfg).eval()
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "clip-tiny-torch"
        model.save_pretrained(str(src), safe_serialization=True)
        with quiet_fd():
            CLIPTokenizer.from_pretrained(str(fx / "sd-tiny" / "tokenizer")).save_pretrained(str(src))
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(src))
        main_export(model_name_or_path=str(src), output=str(out), task="zero-shot-image-classification",
                    device="cpu", local_files_only=True, library_name="transformers")
    c = json.loads((out / "config.json").read_text())
    c["_name_or_path"] = "clip-tiny"
    (out / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        if (out / f).exists():
            (out / f).unlink()
    for f in ("vocab.json", "merges.txt"):
        symlink(out / f, f"../sd-tiny/tokenizer/{f}")
    tok = load_tok(root)
    enc = tok(CLIP_TEXTS, padding="max_length", max_length=77, truncation=True)
    ids = np.array(enc.input_ids, dtype=np.int64)
    mask = np.array(enc.attention_mask, dtype=np.int64)
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(SEED_CLIP + 1)).numpy()
    sess = ort_session(out / "model.onnx")
    names = [i.name for i in sess.get_inputs()]
    feed = {"input_ids": ids, "pixel_values": pix, "attention_mask": mask}
    res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: feed[k] for k in names})))
    ref = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pix),
                attention_mask=torch.from_numpy(mask)).logits_per_image.detach().numpy()
    diff = float(np.abs(res["logits_per_image"] - ref).max())
    save_st(fx / "goldens" / "clip_tiny.safetensors", {"input_ids": ids, "attention_mask": mask, "pixel_values": pix,
                                                        "logits_per_image": res["logits_per_image"],
                                                        "logits_per_text": res["logits_per_text"],
                                                        "logits_per_image.torch": ref})
    write_json(fx / "goldens" / "clip_tiny.json", {
        "texts": CLIP_TEXTS, "onnx_inputs": names, "onnx_outputs": [o.name for o in sess.get_outputs()],
        "pixel_values": "torch.randn(2,3,32,32, generator=manual_seed(4568)) (already normalized)",
        "max_abs_diff_onnx_vs_torch": diff, "logit_scale": float(model.logit_scale.exp())})
    Log.say(f"clip-tiny: inputs {names}; logits_per_image {res['logits_per_image'].round(4).tolist()}; "
            f"onnx vs torch {diff:.2e}")


# --------------------------------------------------------------------------------------
# stage: a tiny random safety checker in the diffusers ONNX layout (sd-tiny/with-safety) + goldens
# --------------------------------------------------------------------------------------
SEED_SAFETY = 5678
SAFETY_VISION = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=23, num_hidden_layers=1,
                     num_attention_heads=2, num_channels=3)  # hidden_act: CLIP's default quick_gelu
SAFETY_TEXT = dict(vocab_size=49408, hidden_size=8, intermediate_size=17, num_hidden_layers=1, num_attention_heads=2,
                   max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1)  # unused
SAFETY_PROJECTION = 8
SAFETY_CLIP_SIZE = 32             # CLIPImageProcessor shortest_edge and crop (= vision image_size)
SAFETY_FLAG_CONCEPT = 4           # concept_embeds row designed to fire on the two generation images
SAFETY_SPECIAL_CONCEPT = 1        # special_care_embeds row designed to fire on the test pattern
SAFETY_NEVER_MARGIN = 0.15        # other rows: threshold = max cosine over the golden images + this
SAFETY_MIN_MARGIN = 0.05          # every score of every golden image is at least this far from 0
SAFETY_IMAGES = [  # name, source (relative to goldens/) or None (made here), flagged by design
    ("gen_pndm", "generations/diffusers-onnx.pndm.noneg.orig.npy", True),
    ("gen_euler", "generations/diffusers-onnx.euler.noneg.orig.npy", True),
    ("pattern", None, False),
    ("small", None, False),
]
SAFETY_TIES = {"g": 2.5, "b_even": 127.5, "b_odd": 254.5}  # x*255 values of the pattern's exact .5 ties


def safety_pattern(h: int, w: int) -> np.ndarray:
    """Test pattern [1,h,w,3] float32: R = x/(w-1) ramp; G = 2.5/255 everywhere (x*255 is exactly 2.5 in
    float32: numpy's round-half-to-even gives 2, round-half-away gives 3); B = 16-px checkerboard of
    127.5/255 (-> 128) and 254.5/255 (-> 254)."""
    y, x = np.mgrid[0:h, 0:w]
    r = x.astype(np.float32) / np.float32(w - 1)
    g = np.full((h, w), np.float32(SAFETY_TIES["g"] / 255), np.float32)
    b = np.where(((y // 16) + (x // 16)) % 2 == 0, np.float32(SAFETY_TIES["b_even"] / 255),
                 np.float32(SAFETY_TIES["b_odd"] / 255)).astype(np.float32)
    for v in (g[0, 0], b[0, 0], b[0, 16]):
        assert (v * np.float32(255)) % 1 == 0.5, v  # exact ties in float32
    return np.stack([r, g, b], -1)[None].astype(np.float32)


def safety_small(h: int, w: int) -> np.ndarray:
    """A smooth non-square image [1,h,w,3] (upscaled by the processor, then centre-cropped)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([y / (h - 1), 1 - x / (w - 1), 0.5 + 0.5 * np.sin(x / 5) * np.cos(y / 4)], -1)
    return img[None].astype(np.float32)


def _pil_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's fixed-point bicubic coefficients (libImaging/Resample.c, 8 bpc) as an int64 [n_out, n_in]."""
    def cubic(x):  # a = -0.5
        x = abs(x)
        if x < 1.0:
            return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * -0.5
        return 0.0
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    m = np.zeros((n_out, n_in), np.int64)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in) - xmin
        w = [cubic((x + xmin - center + 0.5) / fscale) for x in range(xmax)]
        ww = 0.0
        for v in w:
            ww += v
        for x, v in enumerate(w):
            v = v / ww if ww != 0.0 else v
            m[xx, xmin + x] = int(-0.5 + v * (1 << 22)) if v < 0 else int(0.5 + v * (1 << 22))
    return m


def pil_bicubic_resize_u8(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Own re-implementation of PIL Image.resize((w, h), BICUBIC) for uint8 RGB [h,w,3]: horizontal pass
    first (rounded and clamped to uint8), then vertical; acc = 2^21 + sum(px * k), out = clip(acc >> 22)."""
    def rnd(acc):
        return np.clip(acc >> 22, 0, 255).astype(np.uint8)
    h, w, _ = img.shape
    out = img
    if out_w != w:
        out = rnd((1 << 21) + np.einsum("ox,yxc->yoc", _pil_bicubic_matrix(w, out_w), out.astype(np.int64)))
    if out_h != h:
        out = rnd((1 << 21) + np.einsum("oy,yxc->oxc", _pil_bicubic_matrix(h, out_h), out.astype(np.int64)))
    return out


def own_clip_preprocess(img: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Own re-implementation of `CLIPImageProcessor(numpy_to_pil(img))` for one [1,H,W,3] float image:
    returns (resized+cropped uint8 [s,s,3], clip_input float32 [1,3,s,s])."""
    u8 = (img[0] * 255).round().astype(np.uint8)  # numpy_to_pil: float32 multiply, round half to even
    h, w = u8.shape[:2]
    size = cfg["size"]["shortest_edge"]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    oh, ow = (new_long, size) if w <= h else (size, new_long)
    r = pil_bicubic_resize_u8(u8, oh, ow)
    ch, cw = cfg["crop_size"]["height"], cfg["crop_size"]["width"]
    top, left = (oh - ch) // 2, (ow - cw) // 2
    c = r[top:top + ch, left:left + cw]
    x = (c.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    x = (x - np.array(cfg["image_mean"], np.float32)) / np.array(cfg["image_std"], np.float32)
    return c, x.transpose(2, 0, 1)[None]


def _safety_scores(checker64, clip: np.ndarray) -> dict:
    """forward_onnx's arithmetic in float64 (scores before `> 0`)."""
    import torch

    with torch.no_grad():
        emb = checker64.visual_projection(checker64.vision_model(torch.from_numpy(clip).double())[1]).numpy()

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    cos_s = unit(emb) @ unit(checker64.special_care_embeds.numpy()).T
    cos_c = unit(emb) @ unit(checker64.concept_embeds.numpy()).T
    special = cos_s - checker64.special_care_embeds_weights.numpy()
    adj = np.any(special > 0, axis=1) * 0.01
    concept = cos_c - checker64.concept_embeds_weights.numpy() + adj[:, None]
    return {"image_embeds": emb, "cos_special": cos_s, "cos_concept": cos_c, "special_scores": special,
            "special_care": np.any(special > 0, axis=1), "concept_scores": concept,
            "has_nsfw_concepts": np.any(concept > 0, axis=1)}


def stage_safety(root: Path) -> None:
    import diffusers
    import PIL
    import torch
    from diffusers import OnnxRuntimeModel, OnnxStableDiffusionPipeline, PNDMScheduler
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTokenizer

    fx = root / "tests" / "fixtures"
    base = fx / "sd-tiny" / "diffusers-onnx"
    out = fx / "sd-tiny" / "with-safety"
    gold = fx / "goldens" / "safety"
    stage = fx / "sd-tiny" / "with-safety.staging"
    for d in (out, gold, stage):
        if d.exists():
            shutil.rmtree(d)
    # ---- the golden images
    images = []
    for name, src, _ in SAFETY_IMAGES:
        if src:
            img = np.load(fx / "goldens" / src)
        elif name == "pattern":
            img = safety_pattern(IMAGE, IMAGE)
        else:
            img = safety_small(24, 40)
        assert img.dtype == np.float32 and img.ndim == 4 and img.shape[0] == 1 and img.shape[3] == 3
        assert 0 <= img.min() and img.max() <= 1
        images.append(img)
    target = np.array([f for _, _, f in SAFETY_IMAGES])
    # ---- the model: seeded random weights (transformers' own init), then designed concepts/thresholds
    seed_all(SEED_SAFETY)
    cfg = CLIPConfig(text_config=SAFETY_TEXT, vision_config=SAFETY_VISION, projection_dim=SAFETY_PROJECTION)
    checker = StableDiffusionSafetyChecker(cfg).eval()
    fe = CLIPImageProcessor(size={"shortest_edge": SAFETY_CLIP_SIZE},
                            crop_size={"height": SAFETY_CLIP_SIZE, "width": SAFETY_CLIP_SIZE})
    clip = np.concatenate([fe(OnnxStableDiffusionPipeline.numpy_to_pil(im), return_tensors="np")
                           .pixel_values.astype(im.dtype) for im in images])
    g = torch.Generator().manual_seed(SEED_SAFETY + 1)
    concept = torch.randn(17, SAFETY_PROJECTION, generator=g, dtype=torch.float64).numpy()
    special = torch.randn(3, SAFETY_PROJECTION, generator=g, dtype=torch.float64).numpy()
    with torch.no_grad():
        c64 = copy.deepcopy(checker).double()
        emb = c64.visual_projection(c64.vision_model(torch.from_numpy(clip).double())[1]).numpy()
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = en[target].mean(0) - en[~target].mean(0)
    concept[SAFETY_FLAG_CONCEPT] = d / np.linalg.norm(d)
    pat = [i for i, (n, _, _) in enumerate(SAFETY_IMAGES) if n == "pattern"][0]
    others = [i for i in range(len(images)) if i != pat]
    d = en[pat] - en[others].mean(0)
    special[SAFETY_SPECIAL_CONCEPT] = d / np.linalg.norm(d)
    cos_c = en @ (concept / np.linalg.norm(concept, axis=1, keepdims=True)).T
    cos_s = en @ (special / np.linalg.norm(special, axis=1, keepdims=True)).T
    w_c = np.round(cos_c.max(0) + SAFETY_NEVER_MARGIN, 3)
    w_c[SAFETY_FLAG_CONCEPT] = round((cos_c[target, SAFETY_FLAG_CONCEPT].min()
                                      + cos_c[~target, SAFETY_FLAG_CONCEPT].max()) / 2, 3)
    w_s = np.round(cos_s.max(0) + SAFETY_NEVER_MARGIN, 3)
    w_s[SAFETY_SPECIAL_CONCEPT] = round((cos_s[pat, SAFETY_SPECIAL_CONCEPT]
                                         + cos_s[others, SAFETY_SPECIAL_CONCEPT].max()) / 2, 3)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.from_numpy(concept))
        checker.special_care_embeds.copy_(torch.from_numpy(special))
        checker.concept_embeds_weights.copy_(torch.from_numpy(w_c))
        checker.special_care_embeds_weights.copy_(torch.from_numpy(w_s))
    c64 = copy.deepcopy(checker).double()
    sc = _safety_scores(c64, clip)
    assert sc["has_nsfw_concepts"].tolist() == target.tolist(), sc["has_nsfw_concepts"]
    assert sc["special_care"].tolist() == [i == pat for i in range(len(images))], sc["special_care"]
    margin = float(min(np.abs(sc["special_scores"]).min(), np.abs(sc["concept_scores"]).min()))
    assert margin >= SAFETY_MIN_MARGIN, margin
    # ---- export exactly like convert_stable_diffusion_checkpoint_to_onnx.py (TorchScript exporter, opset 14)
    torch_ref = {}
    with torch.no_grad():  # the torch reference: forward_onnx and the original forward, float32
        for i, (im, ci) in enumerate(zip(images, clip)):
            o, f = checker.forward_onnx(torch.from_numpy(ci[None].copy()), torch.from_numpy(im.copy()))
            _, f2 = checker(clip_input=torch.from_numpy(ci[None].copy()), images=im.copy())
            torch_ref[i] = (o.numpy(), bool(f[0]), bool(f2[0]))
    checker.forward = checker.forward_onnx
    g = torch.Generator().manual_seed(0)
    _torchscript_export(
        checker,
        (torch.randn(1, SAFETY_VISION["num_channels"], SAFETY_VISION["image_size"], SAFETY_VISION["image_size"],
                     generator=g), torch.randn(1, VAE_CONFIG["sample_size"], VAE_CONFIG["sample_size"],
                                               VAE_CONFIG["out_channels"], generator=g)),
        stage / "safety_checker" / "model.onnx", ["clip_input", "images"], ["out_images", "has_nsfw_concepts"],
        {"clip_input": {0: "batch", 1: "channels", 2: "height", 3: "width"},
         "images": {0: "batch", 1: "height", 2: "width", 3: "channels"}})

    def load(p):
        return OnnxRuntimeModel.from_pretrained(str(p), provider="CPUExecutionProvider", provider_options={})
    with quiet_fd():
        tok = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    pipe = OnnxStableDiffusionPipeline(
        vae_encoder=load(base / "vae_encoder"), vae_decoder=load(base / "vae_decoder"),
        text_encoder=load(base / "text_encoder"), tokenizer=tok, unet=load(base / "unet"),
        scheduler=PNDMScheduler.from_pretrained(str(base / "scheduler")), safety_checker=load(stage / "safety_checker"),
        feature_extractor=fe, requires_safety_checker=True)
    pipe.save_pretrained(str(stage / "saved"))
    del pipe
    saved = stage / "saved"
    mi = json.loads((saved / "model_index.json").read_text())
    mi_base = json.loads((base / "model_index.json").read_text())
    assert mi["safety_checker"] == ["diffusers", "OnnxRuntimeModel"], mi
    assert mi["feature_extractor"] == ["transformers", "CLIPImageProcessor"], mi
    assert mi["requires_safety_checker"] is True
    assert {k: v for k, v in mi.items() if k not in ("safety_checker", "feature_extractor", "requires_safety_checker")} \
        == {k: v for k, v in mi_base.items() if k not in ("safety_checker", "feature_extractor",
                                                           "requires_safety_checker")}
    assert json.loads((saved / "scheduler" / "scheduler_config.json").read_text()) == \
        json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    out.mkdir(parents=True)
    shutil.copyfile(saved / "model_index.json", out / "model_index.json")
    for sub in ("safety_checker", "feature_extractor"):
        shutil.copytree(saved / sub, out / sub)
    for sub in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "tokenizer", "scheduler"):
        symlink(out / sub, f"../diffusers-onnx/{sub}")
    shutil.rmtree(stage)
    assert sorted(p.name for p in (out / "safety_checker").iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in (out / "feature_extractor").iterdir()) == ["preprocessor_config.json"]
    pp = json.loads((out / "feature_extractor" / "preprocessor_config.json").read_text())
    # ---- the reference path, exactly as OnnxStableDiffusionPipeline.__call__ runs it (per image, batch 1)
    with quiet_fd():
        pipe = OnnxStableDiffusionPipeline.from_pretrained(str(out), provider="CPUExecutionProvider",
                                                           provider_options={})
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.feature_extractor, CLIPImageProcessor) and pipe.safety_checker is not None
    sess = ort_session(out / "safety_checker" / "model.onnx")
    t = {}
    recs, flags, clips, u8s = [], [], [], []
    for i, ((name, src, _), img) in enumerate(zip(SAFETY_IMAGES, images)):
        ci = pipe.feature_extractor(pipe.numpy_to_pil(img), return_tensors="np").pixel_values.astype(img.dtype)
        oi, fi = pipe.safety_checker(clip_input=ci, images=img)
        assert ci.shape == (1, 3, SAFETY_CLIP_SIZE, SAFETY_CLIP_SIZE) and ci.dtype == np.float32
        assert oi.dtype == np.float32 and oi.shape == img.shape and fi.dtype == np.bool_ and fi.shape == (1,)
        np.testing.assert_array_equal(ci, clip[i:i + 1])
        o2, f2 = sess.run(None, {"clip_input": ci, "images": img})  # own session, 1 thread: identical
        np.testing.assert_array_equal(o2, oi)
        np.testing.assert_array_equal(f2, fi)
        flag = bool(fi[0])
        flags.append(flag)
        assert flag == bool(target[i]) == torch_ref[i][1] == torch_ref[i][2], (name, flag, torch_ref[i][1:])
        np.testing.assert_array_equal(oi, torch_ref[i][0])
        np.testing.assert_array_equal(oi, np.zeros_like(img) if flag else img)
        # intermediate: the uint8 image after resize + centre crop (before rescale/normalize)
        u8 = pipe.feature_extractor(pipe.numpy_to_pil(img), do_rescale=False, do_normalize=False,
                                    return_tensors="np").pixel_values
        assert u8.dtype == np.uint8, u8.dtype
        u8 = u8[0].transpose(1, 2, 0)
        own_u8, own_ci = own_clip_preprocess(img, pp)
        np.testing.assert_array_equal(own_u8, u8)
        np.testing.assert_array_equal(own_ci, ci)
        h, w = img.shape[1:3]
        short, long = min(h, w), max(h, w)
        nl = int(SAFETY_CLIP_SIZE * long / short)
        rh, rw = (nl, SAFETY_CLIP_SIZE) if w <= h else (SAFETY_CLIP_SIZE, nl)
        t[f"out_images.{i}"] = oi
        if src is None:
            t[f"image.{i}"] = img
        clips.append(ci)
        u8s.append(u8)
        recs.append({
            "index": i, "name": name, "image": f"../{src}" if src else f"safety.safetensors:image.{i}",
            "shape": list(img.shape), "resized_hw": [rh, rw],
            "crop_top_left": [(rh - SAFETY_CLIP_SIZE) // 2, (rw - SAFETY_CLIP_SIZE) // 2],
            "resize_direction": "down" if short > SAFETY_CLIP_SIZE else ("up" if short < SAFETY_CLIP_SIZE else "none"),
            "has_nsfw_concept": flag, "special_care": bool(sc["special_care"][i]),
            "max_concept_score": float(sc["concept_scores"][i].max()),
            "max_special_score": float(sc["special_scores"][i].max()),
            "out_images": f"out_images.{i}", "blacked_out": flag,
        })
    t["clip_input"] = np.concatenate(clips)
    t["resized_uint8"] = np.stack(u8s)
    t["has_nsfw_concepts"] = np.array(flags, dtype=np.bool_)
    for k in ("image_embeds", "special_scores", "concept_scores"):
        t[k] = sc[k]
    assert any(flags) and not all(flags)
    # the exported graph masks with Where(has_nsfw_concepts[b], 0, images[b,h,w,c]): numpy broadcasting lines
    # the flags up with the *channel* axis, so only batch 1 is right (the pipeline runs one image at a time)
    same = [i for i, im in enumerate(images) if im.shape == images[0].shape]
    ob, fb = sess.run(None, {"clip_input": t["clip_input"][same], "images": np.concatenate([images[i] for i in same])})
    batch = {"images": same, "has_nsfw_concepts": fb.tolist(),
             "has_nsfw_concepts_match_batch1": fb.tolist() == [flags[i] for i in same],
             "out_images_match_batch1": bool(all(np.array_equal(ob[j:j + 1], t[f"out_images.{i}"])
                                                 for j, i in enumerate(same))),
             "zeroed_channels": [c for c in range(3) if np.all(ob[..., c] == 0)]}
    assert batch["has_nsfw_concepts_match_batch1"]
    try:
        with quiet_fd():  # onnxruntime logs the failure natively
            sess.run(None, {"clip_input": t["clip_input"][:2], "images": np.concatenate(images[:2])})
        batch["batch2"] = "ran"
    except Exception as e:  # noqa: BLE001
        batch["batch2"] = f"fails: {str(e).splitlines()[0][:200]}"
    # end to end: diffusers' own pipeline on this folder (PNDM, the generation golden's latents)
    pipe.scheduler = PNDMScheduler.from_config({**SD1_SCHEDULER})
    lat = np.load(fx / "goldens" / "generations" / "latents.npy")
    res = pipe(GEN_PROMPT, height=IMAGE, width=IMAGE, num_inference_steps=GEN_STEPS, guidance_scale=GEN_GUIDANCE,
               latents=lat.copy(), output_type="np")
    e2e = {"images": "generations/diffusers-onnx.pndm.noneg.orig.npy (= image 0 before the checker)",
           "nsfw_content_detected": [bool(x) for x in res.nsfw_content_detected],
           "max_abs_diff_vs_out_images.0": float(np.abs(res.images - t["out_images.0"]).max())}
    assert e2e["nsfw_content_detected"] == [flags[0]] and e2e["max_abs_diff_vs_out_images.0"] < 1e-5, e2e
    save_st(gold / "safety.safetensors", t)
    # ---- facts about the ONNX model
    import onnx

    m = onnx.load(str(out / "safety_checker" / "model.onnx"))

    def io(v):
        return {"name": v.name, "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                "shape": [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]}
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    write_json(gold / "index.json", {
        "model": "sd-tiny/with-safety/safety_checker/model.onnx",
        "onnx": {"inputs": [io(v) for v in m.graph.input], "outputs": [io(v) for v in m.graph.output],
                 "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
                 "num_nodes": len(m.graph.node), "last_node": m.graph.node[-1].op_type,
                 "named_initializers": {k: v for k, v in inits.items() if not k.startswith("onnx::")}},
        "export": "StableDiffusionSafetyChecker with forward = forward_onnx, torch.onnx.export(dynamo=False, "
                  "opset_version=14, do_constant_folding=True), example inputs clip_input randn[1,3,32,32], "
                  "images randn[1,128,128,3] (vision image_size; VAE sample_size/out_channels), dynamic_axes "
                  "clip_input {0:batch,1:channels,2:height,3:width}, images {0:batch,1:height,2:width,3:channels}",
        "config": {"vision_config": SAFETY_VISION, "text_config_unused": SAFETY_TEXT,
                   "projection_dim": SAFETY_PROJECTION, "seed": SEED_SAFETY,
                   "parameters": int(sum(p.numel() for p in checker.parameters()))},
        "design": {
            "concept_embeds": f"torch.randn(17, 8, float64, generator seed {SEED_SAFETY + 1}); row "
                              f"{SAFETY_FLAG_CONCEPT} replaced by unit(mean(unit emb of flagged) - mean(unit emb "
                              "of the others)), emb = visual_projection(vision_model(clip_input).pooler_output)",
            "special_care_embeds": f"torch.randn(3, 8, float64) from the same generator; row "
                                   f"{SAFETY_SPECIAL_CONCEPT} replaced by unit(emb(pattern) - mean(emb(others)))",
            "thresholds": f"designed rows: midpoint between the two groups' cosines, rounded to 3 decimals; other "
                          f"rows: max cosine over the {len(images)} images + {SAFETY_NEVER_MARGIN}, rounded",
            "flag_concept": SAFETY_FLAG_CONCEPT, "special_concept": SAFETY_SPECIAL_CONCEPT,
            "concept_embeds_weights": w_c.tolist(), "special_care_embeds_weights": w_s.tolist(),
            "min_abs_score": margin,
        },
        "reference_steps": [
            "u8 = (image * 255).round().astype('uint8')  # diffusers numpy_to_pil; float32 multiply, round half to even",
            "PIL.Image.fromarray(u8[0]) (mode RGB)",
            "CLIPImageProcessor (transformers 4.57.6, slow): convert_rgb; np.array; resize shortest edge to "
            "size.shortest_edge, long edge int(size * long / short) (truncated) with PIL Image.resize((w, h), "
            "resample=3 BICUBIC) on uint8 (Pillow two-pass fixed-point, horizontal first); center crop "
            "top = (h - crop_h) // 2, left = (w - crop_w) // 2; rescale (u8.astype(float64) * (1/255)).astype(float32); "
            "normalize (x - mean) / std in float32; HWC -> CHW; stack",
            ".pixel_values.astype(image.dtype)  # float32 [1,3,32,32]",
            "safety_checker(clip_input=clip_input[i:i+1], images=image[i:i+1]) per image (batch 1) -> "
            "out_images float32 [1,H,W,3], has_nsfw_concepts bool [1]",
        ],
        "preprocessor_config": pp,
        "pillow": PIL.__version__, "diffusers": diffusers.__version__,
        "images": recs,
        "own_reimplementation": "own_clip_preprocess()/pil_bicubic_resize_u8() in scripts/make_fixtures.py "
                                "reproduce resized_uint8 and clip_input bit-exactly for every image",
        "torch_reference": "StableDiffusionSafetyChecker.forward_onnx and .forward (float32) give the same flags "
                           "and images",
        "batched": batch,
        "pipeline_end_to_end": e2e,
        "files": {"safety.safetensors": sorted(t)},
    })
    Log.say(f"safety checker: flags {flags} (designed {target.tolist()}); min |score| {margin:.3f}; "
            f"batch of {len(same)}: {batch}; end to end {e2e}")


# --------------------------------------------------------------------------------------
# --check: compare two trees by value
# --------------------------------------------------------------------------------------
NOT_BUILT = {"tests/fixtures/README.md"}  # hand-written, not produced by this script
EXTERNAL_DATA = ("weights.pb", "model.onnx_data", "model.onnx.data")


def _close(a, b, rtol=1e-5, atol=1e-6) -> tuple[bool, float]:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False, float("inf")
    if a.dtype.kind in "fc":
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if a.dtype == np.float16:
            rtol, atol = 1e-3, 1e-3
        d = np.abs(a64 - b64)
        ok = bool(np.all((d <= atol + rtol * np.abs(b64)) | (np.isnan(a64) & np.isnan(b64))))
        return ok, float(d.max()) if d.size else 0.0
    return bool(np.array_equal(a, b)), 0.0


def _json_eq(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in one")
            else:
                out += _json_eq(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: list length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _json_eq(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if a == b or abs(a - b) <= 1e-6 + 1e-4 * abs(b):
                return []
        return [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _onnx_diff(pa: Path, pb: Path) -> list[str]:
    import onnx
    from onnx import numpy_helper

    a, b = onnx.load(str(pa)), onnx.load(str(pb))
    out = []
    if [(o.domain, o.version) for o in a.opset_import] != [(o.domain, o.version) for o in b.opset_import]:
        out.append("opset_import differs")
    for kind in ("input", "output"):
        if [x.SerializeToString() for x in getattr(a.graph, kind)] != \
                [x.SerializeToString() for x in getattr(b.graph, kind)]:
            out.append(f"graph {kind}s differ")
    if len(a.graph.node) != len(b.graph.node):
        out.append(f"node count {len(a.graph.node)} != {len(b.graph.node)}")
    else:
        for na, nb in zip(a.graph.node, b.graph.node):
            sig_a = (na.op_type, na.domain, na.name, list(na.input), list(na.output))
            sig_b = (nb.op_type, nb.domain, nb.name, list(nb.input), list(nb.output))
            if sig_a != sig_b:
                out.append(f"node {na.name!r} differs: {sig_a} vs {sig_b}")
                break
            for xa, xb in zip(na.attribute, nb.attribute):
                if xa.type == onnx.AttributeProto.TENSOR:
                    ok, _ = _close(numpy_helper.to_array(xa.t), numpy_helper.to_array(xb.t))
                else:
                    ok = xa.SerializeToString() == xb.SerializeToString()
                if not ok or xa.name != xb.name:
                    out.append(f"node {na.name!r} attribute {xa.name} differs")
            if len(na.attribute) != len(nb.attribute):
                out.append(f"node {na.name!r} attribute count differs")
            if out:
                break
    ia = {i.name: i for i in a.graph.initializer}
    ib = {i.name: i for i in b.graph.initializer}
    if sorted(ia) != sorted(ib):
        out.append(f"initializer names differ ({len(ia)} vs {len(ib)})")
    else:
        worst = 0.0
        for k in ia:
            ok, d = _close(numpy_helper.to_array(ia[k]), numpy_helper.to_array(ib[k]))
            worst = max(worst, d)
            if not ok:
                out.append(f"initializer {k} differs (max abs {d:.3g})")
    return out


def check_trees(ref_root: Path, new_root: Path) -> int:
    from safetensors import safe_open

    def listing(root):
        files = {}
        for top in ("tests/fixtures", "models/tiny-random"):
            base = root / top
            if not base.exists():
                continue
            for dirpath, dirnames, filenames in os.walk(base):
                for n in dirnames + filenames:
                    p = Path(dirpath) / n
                    if p.is_symlink() or p.is_file():
                        files[str(p.relative_to(root))] = p
        return files
    ra, rb = listing(ref_root), listing(new_root)
    problems = []
    for rel in sorted(set(ra) | set(rb)):
        if rel in NOT_BUILT:
            continue
        if rel not in ra or rel not in rb:
            problems.append(f"{rel}: only in {'the committed tree' if rel in ra else 'the rebuild'}")
            continue
        a, b = ra[rel], rb[rel]
        if a.is_symlink() or b.is_symlink():
            if not (a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)):
                problems.append(f"{rel}: symlink differs")
            continue
        try:
            if rel.endswith(".npy"):
                ok, d = _close(np.load(a), np.load(b))
                if not ok:
                    problems.append(f"{rel}: arrays differ (max abs {d:.3g})")
            elif rel.endswith(".safetensors"):
                with safe_open(str(a), "np") as fa, safe_open(str(b), "np") as fb:
                    if fa.metadata() != fb.metadata():
                        problems.append(f"{rel}: metadata differs")
                    if sorted(fa.keys()) != sorted(fb.keys()):
                        problems.append(f"{rel}: keys differ")
                    else:
                        for k in fa.keys():
                            ok, d = _close(fa.get_tensor(k), fb.get_tensor(k))
                            if not ok:
                                problems.append(f"{rel}: tensor {k} differs (max abs {d:.3g})")
            elif rel.endswith(".json"):
                problems += [f"{rel}: {d}" for d in _json_eq(json.loads(a.read_text()), json.loads(b.read_text()))]
            elif rel.endswith(".onnx"):
                problems += [f"{rel}: {d}" for d in _onnx_diff(a, b)]
            elif rel.endswith(EXTERNAL_DATA):
                continue  # compared through the .onnx file that references it
            elif a.read_bytes() != b.read_bytes():
                problems.append(f"{rel}: bytes differ")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{rel}: could not compare: {type(e).__name__}: {e}")
    n = len([r for r in set(ra) | set(rb) if r not in NOT_BUILT])
    Log.say(f"check: compared {n} paths; {len(problems)} difference(s)")
    for p in problems:
        print(f"    DIFF {p}")
    return len(problems)


_TOK = {}


def load_tok(root: Path):
    from transformers import CLIPTokenizer

    if "t" not in _TOK:
        with quiet_fd():
            _TOK["t"] = CLIPTokenizer.from_pretrained(str(root / "tests" / "fixtures" / "sd-tiny" / "tokenizer"))
    return _TOK["t"]


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
STAGES = ["tokenizer", "torch", "export", "facts", "text_encoder", "unet_io", "time", "schedulers", "generations",
          "clip", "safety", "sdxl", "turbo_lcm", "demo", "versions"]


def stage_sdxl(root: Path) -> None:
    import _fixtures_sdxl  # scripts/_fixtures_sdxl.py: the tiny SDXL, its flavours and goldens

    _fixtures_sdxl.stage(root, sys.modules[__name__])


def stage_turbo_lcm(root: Path) -> None:
    import _fixtures_sdxl  # few-step flavours (SDXL-Turbo, SD-Turbo, LCM) of the tiny fixtures, their goldens

    _fixtures_sdxl.turbo_lcm_stage(root, sys.modules[__name__])


def build(root: Path, stages: list[str]) -> None:
    import torch

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    for s in stages:
        with Log.stage(s):
            globals()[f"stage_{s.replace('-', '_')}"](root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="rebuild into a temp folder and compare by value")
    ap.add_argument("--root", type=Path, default=REPO, help="output root (default: the repository)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset (for development)")
    ap.add_argument("--keep", action="store_true", help="--check: keep the temp folder")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if args.check:
        tmp = Path(tempfile.mkdtemp(prefix="fixtures-check-", dir=REPO / "third_party"))
        try:
            build(tmp, stages)
            ndiff = check_trees(REPO, tmp)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
        print_timings()
        return 1 if ndiff else 0
    build(args.root, stages)
    print_timings()
    size_table(args.root)
    return 0


def print_timings() -> None:
    Log.say("timings:")
    for name, dt in Log.rows:
        print(f"    {name:<60s} {dt:8.1f}s")


if __name__ == "__main__":
    sys.exit(main())
