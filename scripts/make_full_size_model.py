#!/usr/bin/env python3
"""Build a full-size Stable Diffusion 1.4-architecture ONNX pipeline with seeded random weights.

    python3 scripts/make_full_size_model.py [--out DIR] [--force]

Default output: third_party/sd14-random/ (git-ignored). The layout is what diffusers'
scripts/convert_stable_diffusion_checkpoint_to_onnx.py writes (the same approach as the
"diffusers-onnx" flavour of scripts/make_fixtures.py, at full size):

    model_index.json            OnnxStableDiffusionPipeline
    scheduler/                  copied from tests/fixtures/sd-tiny/diffusers-onnx/scheduler
    tokenizer/                  copied from tests/fixtures/sd-tiny/tokenizer
    text_encoder/model.onnx     CLIPTextModel, CLIP ViT-L/14 text config, int32 input_ids
    unet/model.onnx + weights.pb  UNet2DConditionModel (SD 1.x: cross_attention_dim 768, sample_size 64),
                                fp32, TorchScript exporter (dynamo=False), opset 14, all tensors in weights.pb
    vae_decoder/model.onnx      AutoencoderKL (SD config) decoder
    vae_encoder/model.onnx      AutoencoderKL (SD config) encoder

Nothing is downloaded from a model hub: every weight is random (seeded). The models are only for
measuring size-dependent costs (edit time, memory); they produce noise, not images.

Each component is built into a staging folder and renamed into place when complete, so an
interrupted run never leaves a half component behind. Components that already exist are skipped
(idempotent) unless --force.

Like scripts/make_fixtures.py, the script creates its own virtual environment
(third_party/venv-fixtures, pinned by scripts/requirements-fixtures.txt) and re-executes itself in it (scripts/_venv.py).
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
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from _models import quiet_fd, seed_all  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

FIXTURES = REPO / "tests" / "fixtures" / "sd-tiny"
DEFAULT_OUT = REPO / "third_party" / "sd14-random"

SEED_UNET = 11234
SEED_TEXT = 12345
SEED_VAE = 13456
OPSET = 14              # diffusers' convert script default
LATENT = 64             # SD 1.x UNet sample_size
VAE_FACTOR = 8
IMAGE = LATENT * VAE_FACTOR
CROSS_DIM = 768
BOS, EOS = 49406, 49407

# UNet2DConditionModel() defaults are SD 1.x except cross_attention_dim (1280) and sample_size (None).
UNET_CONFIG = dict(sample_size=LATENT, cross_attention_dim=CROSS_DIM)
# SD 1.x vae/config.json
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=IMAGE,
)
# CLIP ViT-L/14 text tower (SD 1.x text_encoder/config.json), ids as in the fixtures' tokenizer
TEXT_CONFIG = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=1,
)

COMPONENTS = ["tokenizer", "scheduler", "text_encoder", "unet", "vae_decoder", "vae_encoder", "model_index"]


# --------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------
T0 = time.time()
ROWS: list[tuple[str, float, str]] = []


def say(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@contextlib.contextmanager
def stage(name: str):
    say(f"=== {name}")
    t = time.time()
    yield
    dt = time.time() - t
    ROWS.append((name, dt, f"peak RSS so far {peak_rss_gb():.2f} GB"))
    say(f"=== {name}: done in {dt:.1f}s (process peak RSS so far {peak_rss_gb():.2f} GB)")




def staging(out: Path, name: str) -> Path:
    s = out / f".{name}.staging"
    if s.exists():
        shutil.rmtree(s)
    s.mkdir(parents=True)
    return s


def commit(staged: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    staged.rename(final)


def torchscript_export(model, args, path: Path, inputs, outputs, axes) -> None:
    """What diffusers' convert script calls (onnx_export): TorchScript exporter, constant folding."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      do_constant_folding=True, opset_version=OPSET, dynamo=False)


def tokenizer_ids(out: Path):
    from transformers import CLIPTokenizer

    src = out / "tokenizer" if (out / "tokenizer").exists() else FIXTURES / "tokenizer"
    with quiet_fd():
        tok = CLIPTokenizer.from_pretrained(str(src))
    return tok("A sample prompt", padding="max_length", max_length=77, truncation=True,
               return_tensors="pt").input_ids


# --------------------------------------------------------------------------------------
# components
# --------------------------------------------------------------------------------------
def build_tokenizer(out: Path) -> None:
    s = staging(out, "tokenizer")
    for f in sorted((FIXTURES / "tokenizer").iterdir()):
        shutil.copyfile(f, s / f.name)  # follows links: real files in the output
    commit(s, out / "tokenizer")


def build_scheduler(out: Path) -> None:
    s = staging(out, "scheduler")
    shutil.copyfile(FIXTURES / "diffusers-onnx" / "scheduler" / "scheduler_config.json", s / "scheduler_config.json")
    commit(s, out / "scheduler")


def build_text_encoder(out: Path) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    seed_all(SEED_TEXT)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
    say(f"text encoder: {sum(p.numel() for p in te.parameters()) / 1e6:.1f} M parameters")
    s = staging(out, "text_encoder")
    ids = tokenizer_ids(out).to(torch.int32)
    with torch.no_grad():
        torchscript_export(te, (ids,), s / "model.onnx", ["input_ids"], ["last_hidden_state", "pooler_output"],
                           {"input_ids": {0: "batch", 1: "sequence"}})
    del te
    gc.collect()
    commit(s, out / "text_encoder")


def build_unet(out: Path) -> None:
    import onnx
    import torch
    from diffusers import UNet2DConditionModel

    seed_all(SEED_UNET)
    t = time.time()
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    n = sum(p.numel() for p in unet.parameters())
    say(f"unet: {n / 1e6:.1f} M parameters ({n * 4 / 2**30:.2f} GiB fp32), initialised in {time.time() - t:.1f}s")
    s = staging(out, "unet")
    raw = s / "raw"  # the exporter writes one file per tensor beside the model when it exceeds 2 GB
    g = torch.Generator().manual_seed(0)
    t = time.time()
    with torch.no_grad():
        torchscript_export(
            unet,
            (torch.randn(2, 4, LATENT, LATENT, generator=g), torch.randn(2, generator=g),
             torch.randn(2, 77, CROSS_DIM, generator=g), False),
            raw / "model.onnx", ["sample", "timestep", "encoder_hidden_states", "return_dict"], ["out_sample"],
            {"sample": {0: "batch", 1: "channels", 2: "height", 3: "width"}, "timestep": {0: "batch"},
             "encoder_hidden_states": {0: "batch", 1: "sequence"}})
    say(f"unet: TorchScript export {time.time() - t:.1f}s; {len(list(raw.iterdir()))} files, "
        f"{human(dir_size(raw))}; peak RSS {peak_rss_gb():.2f} GB")
    del unet
    gc.collect()
    # diffusers' convert script: load, drop the exporter's folder, save every tensor into one weights.pb
    t = time.time()
    m = onnx.load(str(raw / "model.onnx"))
    shutil.rmtree(raw)
    onnx.save_model(m, str(s / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.pb", convert_attribute=False)
    del m
    gc.collect()
    say(f"unet: re-saved to model.onnx + weights.pb in {time.time() - t:.1f}s; peak RSS {peak_rss_gb():.2f} GB")
    commit(s, out / "unet")


def _vae():
    from diffusers import AutoencoderKL

    seed_all(SEED_VAE)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    return vae


def build_vae_decoder(out: Path) -> None:
    import torch

    vae = _vae()
    vae.forward = vae.decode
    s = staging(out, "vae_decoder")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        torchscript_export(vae, (torch.randn(1, 4, LATENT, LATENT, generator=g), False), s / "model.onnx",
                           ["latent_sample", "return_dict"], ["sample"],
                           {"latent_sample": {0: "batch", 1: "channels", 2: "height", 3: "width"}})
    del vae
    gc.collect()
    commit(s, out / "vae_decoder")


def build_vae_encoder(out: Path) -> None:
    import torch

    vae = _vae()
    vae.forward = lambda sample, return_dict: vae.encode(sample, return_dict)[0].sample()
    s = staging(out, "vae_encoder")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        torchscript_export(vae, (torch.randn(1, 3, IMAGE, IMAGE, generator=g), False), s / "model.onnx",
                           ["sample", "return_dict"], ["latent_sample"],
                           {"sample": {0: "batch", 1: "channels", 2: "height", 3: "width"}})
    del vae
    gc.collect()
    commit(s, out / "vae_encoder")


def build_model_index(out: Path) -> None:
    import diffusers

    mi = json.loads((FIXTURES / "diffusers-onnx" / "model_index.json").read_text())
    mi["_diffusers_version"] = diffusers.__version__
    for sub in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        mi[sub] = ["diffusers", "OnnxRuntimeModel"] if (out / sub).exists() else [None, None]
    tmp = out / ".model_index.json.tmp"
    tmp.write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    tmp.rename(out / "model_index.json")


def component_done(out: Path, name: str) -> bool:
    want = {
        "tokenizer": ["tokenizer/vocab.json", "tokenizer/merges.txt"],
        "scheduler": ["scheduler/scheduler_config.json"],
        "text_encoder": ["text_encoder/model.onnx"],
        "unet": ["unet/model.onnx", "unet/weights.pb"],
        "vae_decoder": ["vae_decoder/model.onnx"],
        "vae_encoder": ["vae_encoder/model.onnx"],
        "model_index": ["model_index.json"],
    }[name]
    return all((out / w).is_file() for w in want)


# --------------------------------------------------------------------------------------
# light verification (no UNet inference: that would need another ~4 GB and minutes)
# --------------------------------------------------------------------------------------
def verify(out: Path) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    kv = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[0] == "encoder_hidden_states"
          and n.input[1] in inits]
    shapes = sorted({tuple(inits[n.input[1]].dims) for n in kv})
    locs = sorted({e.value for i in inits.values() for e in i.external_data if e.key == "location"})
    ext = sum(1 for i in inits.values() if i.data_location == onnx.TensorProto.EXTERNAL)
    say(f"verify unet: opset {[o.version for o in m.opset_import]}, inputs "
        f"{[(i.name, onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)) for i in m.graph.input]}, "
        f"{len(m.graph.node)} nodes, {len(inits)} initializers ({ext} external in {locs}), "
        f"{len(kv)} K/V MatMuls fed by encoder_hidden_states, shapes {shapes}")
    assert len(kv) == 32, len(kv)
    assert locs == ["weights.pb"], locs
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out / "text_encoder" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ids = tokenizer_ids(out).numpy().astype(np.int32)
    assert sess.get_inputs()[0].type == "tensor(int32)", sess.get_inputs()[0].type
    h = sess.run(None, {"input_ids": np.concatenate([ids, ids])})[0]
    assert h.shape == (2, 77, 768) and np.isfinite(h).all(), h.shape
    say(f"verify text encoder: int32 input_ids, last_hidden_state {h.shape}, finite")


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="rebuild components that already exist")
    ap.add_argument("--no-verify", action="store_true", help="skip the light checks at the end")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    say(f"output {out}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    built = []
    for name in COMPONENTS:
        if not args.force and component_done(out, name) and name != "model_index":
            say(f"--- {name}: exists, skipped (--force rebuilds)")
            continue
        if name == "model_index" and not args.force and component_done(out, name) and not built:
            say(f"--- {name}: exists, skipped (--force rebuilds)")
            continue
        with stage(name):
            globals()[f"build_{name}"](out)
        built.append(name)
    if not args.no_verify:
        with stage("verify"):
            verify(out)

    say("timings:")
    for name, dt, note in ROWS:
        print(f"    {name:<14s} {dt:8.1f}s   {note}")
    print(f"    {'total':<14s} {time.time() - T0:8.1f}s")
    say("sizes:")
    for sub in ("model_index.json", "scheduler", "tokenizer", "text_encoder", "unet/model.onnx", "unet/weights.pb",
                "vae_decoder", "vae_encoder"):
        p = out / sub
        if p.exists():
            print(f"    {sub:<20s} {human(dir_size(p)):>10s}  ({dir_size(p):,} bytes)")
    print(f"    {'total':<20s} {human(dir_size(out)):>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
