#!/usr/bin/env python3
"""Build a full-size SDXL-base-architecture ONNX pipeline with seeded random weights.

    python3 scripts/make_full_size_sdxl.py [--out DIR] [--force] [--unet-dtype fp16|fp32]
                                           [--no-verify] [--max-rss-gb GB]

Default output: third_party/sdxl-random/ (git-ignored). The layout is what `optimum-cli export onnx`
writes for SDXL (the same as tests/fixtures/sdxl-tiny/optimum/, made by scripts/_fixtures_sdxl.py,
at full size), so that both time-onnx and optimum's ORTStableDiffusionXLPipeline load it:

    model_index.json                 StableDiffusionXLPipeline, force_zeros_for_empty_prompt, diffusers'
                                     component names (copied from the tiny fixture)
    scheduler/                       SDXL base's EulerDiscreteScheduler config as shipped (from the fixture)
    tokenizer/, tokenizer_2/         copies (real files) of tests/fixtures/sd-tiny/tokenizer and
                                     tokenizer-sd2 (pads with "!"), the full CLIP BPE vocabulary
    text_encoder/model.onnx          CLIPTextModel, CLIP ViT-L/14 text config, fp32 (~0.5 GB)
    text_encoder_2/model.onnx (+ model.onnx_data)
                                     CLIPTextModelWithProjection, OpenCLIP bigG text config, fp32 (~2.8 GB)
    unet/model.onnx + model.onnx_data
                                     UNet2DConditionModel with SDXL base's config (2.6 G parameters), fp16
                                     (~5.1 GB) by default: every float input and output float16, as
                                     `optimum-cli export onnx --dtype fp16` makes it
    vae_decoder/model.onnx           AutoencoderKL with SDXL's VAE config, decoder only, fp32
    */config.json                    each torch model's config, as optimum writes it
    (no vae_encoder: time-onnx never reads it)

Every ONNX file is written by optimum's own exporter (optimum.exporters.onnx.export with the
OnnxConfig that `get_diffusion_models_for_export` picks for the part; TorchScript exporter, opset 18),
so the ports are optimum's: text_encoder `input_ids` -> last_hidden_state, pooler_output,
hidden_states.0..12; text_encoder_2 -> text_embeds, last_hidden_state, hidden_states.0..32; unet
sample, timestep (a scalar), encoder_hidden_states, text_embeds, time_ids -> out_sample; vae_decoder
latent_sample -> sample. Parts above 2 GB keep their tensors in one `model.onnx_data` beside the model
(optimum's own re-save). The cross-attention K/V projections stay plain MatMul(encoder_hidden_states,
W^T) nodes named after their module (…/attn2/to_k/MatMul), which is how time-onnx finds them.

The fp16 UNet is built in fp32 from the seed, cast with .half() and traced in fp16 on the CPU (what
optimum does for --dtype fp16; torch's CPU kernels run the fp16 forward). It is traced at latent 32x32,
batch 2: the axes are dynamic, so it runs at any size. `--unet-dtype fp32` exports the fp32 UNet
(~10.3 GB on disk) instead.

Measured on 2 cores (torch 2.14, optimum-onnx 0.1, onnx 1.23): the whole build takes ~3 min; peak RSS
per part: text_encoder 2.7 GB, text_encoder_2 4.9 GB, UNet 10.4 GB (fp16; its fp32 construction is the
peak) or 14.0 GB (fp32), vae_decoder 1.8 GB. The output is byte-identical from run to run.

Nothing is downloaded from a model hub: every weight is random (seeded). The models are only for
measuring size-dependent costs (edit time, memory, load time); they produce noise, not images.

Memory: each component is built in its own forked child process, so that all its memory is returned
to the system before the next one starts (Python and glibc keep freed memory otherwise) and its peak
RSS can be measured alone (os.wait4). The parent watches the child's RSS and kills it above
--max-rss-gb (default 18), so that a run never pushes the machine (24 GB, no swap) into the OOM killer.

Each component is built into a staging folder and renamed into place when complete, so an
interrupted run never leaves a half component behind. Components that already exist are skipped
(idempotent) unless --force (also needed to switch --unet-dtype on an existing folder).

Like scripts/make_full_size_model.py, the script runs in its own virtual environment
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
# The parent process imports nothing heavy (no torch, no onnx): it only forks the builders, so the
# children start from a small, thread-free process (forking after torch has started threads is unsafe).

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
TINY_SDXL = FIXTURES / "sdxl-tiny" / "optimum"      # the layout and ports we reproduce
DEFAULT_OUT = REPO / "third_party" / "sdxl-random"

SEED_UNET = 21234
SEED_TEXT = 22345
SEED_TEXT_2 = 23456
SEED_VAE = 24567
TRACE_BATCH = 2       # example inputs of the export; every axis that varies is dynamic
TRACE_LATENT = 32     # latent side the UNet and VAE decoder are traced at (cheap; 128 is SDXL's own)
BOS, EOS = 49406, 49407
POOLED = 1280         # text_encoder_2's projection_dim: the UNet's text_embeds width
TIME_EMBED = 256      # addition_time_embed_dim; time_ids are 6 wide

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from
# UNet2DConditionModel's defaults, plus the block layout spelled out)
UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_EMBED,   # 2816
    cross_attention_dim=2048,                                         # 768 + 1280: both encoders
    norm_num_groups=32,
    upcast_attention=False,
)
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
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
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)


def text_config(width: int, layers: int, heads: int, ffn: int, act: str, projection: int) -> dict:
    return dict(vocab_size=49408, max_position_embeddings=77, hidden_size=width, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act, projection_dim=projection,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1)


TEXT_1 = text_config(768, 12, 12, 3072, "quick_gelu", 768)     # CLIP ViT-L/14 (SDXL text_encoder)
TEXT_2 = text_config(1280, 32, 20, 5120, "gelu", POOLED)       # OpenCLIP ViT-bigG/14 (text_encoder_2)

# in build order: the cheap copies first, the UNet (the big one) after the text encoders
COMPONENTS = ["tokenizer", "tokenizer_2", "scheduler", "text_encoder", "text_encoder_2", "unet", "vae_decoder",
              "model_index"]
HEAVY = {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}   # built in a forked child
FILES = {  # what a finished component holds (the check of `skip unless --force`)
    "tokenizer": ["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json"],
    "tokenizer_2": ["tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json"],
    "scheduler": ["scheduler/scheduler_config.json"],
    "text_encoder": ["text_encoder/model.onnx", "text_encoder/config.json"],
    "text_encoder_2": ["text_encoder_2/model.onnx", "text_encoder_2/config.json"],
    "unet": ["unet/model.onnx", "unet/config.json"],
    "vae_decoder": ["vae_decoder/model.onnx", "vae_decoder/config.json"],
    "model_index": ["model_index.json"],
}


# --------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------
T0 = time.time()
ROWS: list[tuple[str, float, float | None]] = []   # (step, seconds, child's peak RSS in GB)


def say(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def rss_gb_of(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def staging(out: Path, name: str) -> Path:
    s = out / f".{name}.staging"
    if s.exists():
        shutil.rmtree(s)
    s.mkdir(parents=True)
    return s


def commit(staged: Path, final: Path) -> None:
    for f in staged.iterdir():  # onnx writes model.onnx_data private (0600); readable like the other files
        f.chmod(0o644)
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    staged.rename(final)


def run_forked(name: str, fn, *args, max_rss_gb: float) -> float:
    """Runs fn(*args) in a forked child; returns the child's peak RSS in GB. The parent polls the
    child's RSS and kills it (SIGKILL, by its pid) above max_rss_gb: a Python watchdog thread inside
    the child could not run while the exporter's C++ holds the GIL."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - reported, then the child's exit code says it
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    seen = 0.0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        try:
            seen = max(seen, rss_gb_of(pid))
        except (FileNotFoundError, ProcessLookupError):
            pass
        if seen > max_rss_gb:
            os.kill(pid, signal.SIGKILL)
            os.wait4(pid, 0)
            raise SystemExit(f"{name}: RSS {seen:.1f} GB passed --max-rss-gb {max_rss_gb}; killed")
        time.sleep(0.2)
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: failed (exit {os.waitstatus_to_exitcode(status)}), peak RSS {peak:.2f} GB")
    return peak


# --------------------------------------------------------------------------------------
# the copied parts
# --------------------------------------------------------------------------------------
def copy_folder(src: Path, out: Path, name: str) -> None:
    s = staging(out, name)
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, s / f.name)  # follows links: real files in the output
    commit(s, out / name)


def build_tokenizer(out: Path) -> None:
    copy_folder(FIXTURES / "sd-tiny" / "tokenizer", out, "tokenizer")


def build_tokenizer_2(out: Path) -> None:
    # SDXL's tokenizer_2 is SD 2.x's: the same vocabulary, pad token "!" instead of <|endoftext|>
    copy_folder(FIXTURES / "sd-tiny" / "tokenizer-sd2", out, "tokenizer_2")


def build_scheduler(out: Path) -> None:
    copy_folder(TINY_SDXL / "scheduler", out, "scheduler")


def build_model_index(out: Path) -> None:
    """The tiny fixture's model_index.json (what optimum writes for an SDXL pipeline: diffusers' class
    names of the torch parts, force_zeros_for_empty_prompt), without its source path."""
    mi = json.loads((TINY_SDXL / "model_index.json").read_text())
    mi.pop("_name_or_path", None)
    mi["_diffusers_version"] = importlib.metadata.version("diffusers")
    tmp = out / ".model_index.json.tmp"
    tmp.write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    tmp.rename(out / "model_index.json")


# --------------------------------------------------------------------------------------
# the exported parts (each runs in a forked child: imports torch there)
# --------------------------------------------------------------------------------------
def child_setup() -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_grad_enabled(False)


@contextlib.contextmanager
def weights_dropped_after_trace(model):
    """optimum's export_pytorch, once torch.onnx.export has written a model above 2 GB (one file per
    tensor), loads it whole and re-saves it into one model.onnx_data, while the torch model is still
    referenced (by us and by optimum's frames): the peak would be both copies (~2x the weights: 21 GB for
    the fp32 UNet). The torch weights are not read after torch.onnx.export returns (no validation, and
    fix_dynamic_axes runs onnxruntime), so they are dropped right there, inside optimum's call."""
    import torch

    real = torch.onnx.export  # export_pytorch imports it at call time: `from torch.onnx import export`

    def export_then_drop(*args, **kwargs):
        result = real(*args, **kwargs)
        for p in [*model.parameters(), *model.buffers()]:
            p.data = torch.empty(0, dtype=p.dtype)
        gc.collect()
        return result

    torch.onnx.export = export_then_drop
    try:
        yield
    finally:
        torch.onnx.export = real


def optimum_export(model, folder: Path, *, task: str, float_dtype: str, model_type: str | None = None,
                   config=None, fix_dynamic_axes: bool = True) -> None:
    """optimum.exporters.onnx.export with the OnnxConfig main_export would pick for this part of an SDXL
    pipeline (get_diffusion_models_for_export: task, model type, dtype). `config` replaces the model's
    config for the dummy inputs only (the UNet's sets a small trace size)."""
    from optimum.exporters.onnx import export
    from optimum.exporters.tasks import TasksManager

    ctor = TasksManager.get_exporter_config_constructor(model=model, exporter="onnx", library_name="diffusers",
                                                        task=task, model_type=model_type)
    onnx_config = ctor(config if config is not None else model.config, int_dtype="int64", float_dtype=float_dtype)
    t = time.time()
    with weights_dropped_after_trace(model):
        export(model=model, config=onnx_config, output=folder / "model.onnx", opset=None, device="cpu",
               input_shapes={"batch_size": TRACE_BATCH, "height": TRACE_LATENT, "width": TRACE_LATENT},
               dtype=float_dtype, disable_dynamic_axes_fix=not fix_dynamic_axes)
    files = sorted(p.name for p in folder.iterdir())
    say(f"  exported ({type(onnx_config).__name__}, opset {onnx_config.DEFAULT_ONNX_OPSET}) in "
        f"{time.time() - t:.1f}s: {files}, {human(dir_size(folder))}")


def count_params(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    b = sum(p.numel() * p.element_size() for p in model.parameters())
    return f"{n / 1e6:.1f} M parameters ({human(b)})"


def build_text(out: Path, name: str, seed: int, cfg: dict, with_projection: bool) -> None:
    child_setup()
    import torch
    from _models import seed_all
    from optimum.exporters.utils import _get_diffusers_submodel_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    seed_all(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    t = time.time()
    te = cls(CLIPTextConfig(**cfg)).eval()
    say(f"  {name}: {count_params(te)}, initialised in {time.time() - t:.1f}s")
    # what optimum's _get_submodels_for_export_diffusion sets for an SDXL pipeline: every hidden state
    # is an output (the pipeline reads the penultimate), and the part's export type
    te.config.output_hidden_states = True
    te.text_model.config.output_hidden_states = True
    te.config.export_model_type = _get_diffusers_submodel_type(te)
    te.config.architectures = [cls.__name__]   # as the torch pipeline's save_pretrained records them
    te.config.dtype = torch.float32
    s = staging(out, name)
    te.config.save_pretrained(s)               # config.json, as optimum writes it for a transformers part
    optimum_export(te, s, task="feature-extraction", float_dtype="fp32")
    commit(s, out / name)


def build_text_encoder(out: Path) -> None:
    build_text(out, "text_encoder", SEED_TEXT, TEXT_1, with_projection=False)


def build_text_encoder_2(out: Path) -> None:
    build_text(out, "text_encoder_2", SEED_TEXT_2, TEXT_2, with_projection=True)


def build_unet(out: Path, dtype: str) -> None:
    child_setup()
    from _models import seed_all
    from diffusers import UNet2DConditionModel
    from diffusers.configuration_utils import FrozenDict
    from optimum.exporters.utils import _get_diffusers_submodel_type

    seed_all(SEED_UNET)
    t = time.time()
    # built in fp32 (torch's default initialisers), then cast: the fp16 weights are the fp32 ones rounded,
    # and .half() replaces parameter by parameter, so the peak is the fp32 model (~10.3 GB), not both
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    say(f"  unet: {count_params(unet)} in fp32, initialised in {time.time() - t:.1f}s")
    if dtype == "fp16":
        unet.half()
        gc.collect()
        say(f"  unet: cast to fp16: {count_params(unet)}")
    # what optimum's _get_submodels_for_export_diffusion sets on an SDXL UNet (attributes, not config keys:
    # config.json does not get them)
    unet.config.requires_aesthetics_score = False          # SDXL base: time_ids are 6 wide
    unet.config.time_cond_proj_dim = None
    unet.config.text_encoder_projection_dim = POOLED
    unet.config.export_model_type = _get_diffusers_submodel_type(unet)
    s = staging(out, "unet")
    unet.save_config(s)                                    # config.json with sample_size 128
    # the dummy inputs are sized from the config's sample_size: a copy at TRACE_LATENT traces a 32x32
    # latent (seconds) instead of 128x128 (SDXL's own size: minutes in fp16 on a CPU, for the same graph)
    small = FrozenDict({**unet.config, "sample_size": TRACE_LATENT})
    for k in ("requires_aesthetics_score", "time_cond_proj_dim", "text_encoder_projection_dim", "export_model_type"):
        setattr(small, k, getattr(unet.config, k))
    # fix_dynamic_axes is skipped: it only opens an ORT session on the model to look for output axes named
    # outside the config, and out_sample has none; that session would hold another copy of the weights
    optimum_export(unet, s, task="semantic-segmentation", float_dtype=dtype, config=small, fix_dynamic_axes=False)
    commit(s, out / "unet")


def build_vae_decoder(out: Path) -> None:
    child_setup()
    from _models import seed_all
    from diffusers import AutoencoderKL

    seed_all(SEED_VAE)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    say(f"  vae: {count_params(vae)} (encoder included; only the decoder is exported)")
    # optimum's vae_decoder part: the VAE with forward = decode (returns {"sample": ...})
    vae.forward = lambda latent_sample: vae.decode(z=latent_sample)
    s = staging(out, "vae_decoder")
    vae.save_config(s)
    optimum_export(vae, s, task="semantic-segmentation", float_dtype="fp32", model_type="vae-decoder")
    commit(s, out / "vae_decoder")


# --------------------------------------------------------------------------------------
# light verification: the ports against the tiny optimum export, the K/V MatMuls, external data
# (no inference here: loading the models in onnxruntime needs ~9 GB and minutes)
# --------------------------------------------------------------------------------------
def expected_kv_blocks() -> int:
    """attn2 blocks of the UNet config: its K/V weights are 2 per block."""
    c = UNET_CONFIG
    depth = c["transformer_layers_per_block"]
    layers = c["layers_per_block"]
    down = sum(layers * d for t, d in zip(c["down_block_types"], depth) if t.startswith("CrossAttn"))
    up = sum((layers + 1) * d for t, d in zip(c["up_block_types"], reversed(depth)) if t.startswith("CrossAttn"))
    return down + depth[-1] + up   # + the mid block, at the deepest level's depth


def verify(out: Path, unet_dtype: str) -> None:
    import onnx

    def ports(values):
        res = []
        for v in values:
            t = v.type.tensor_type
            res.append((v.name, onnx.TensorProto.DataType.Name(t.elem_type),
                        tuple(d.dim_param or "static" for d in t.shape.dim)))
        return res

    for part in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        m = onnx.load(str(out / part / "model.onnx"), load_external_data=False)
        ref = onnx.load(str(TINY_SDXL / part / "model.onnx"), load_external_data=False)
        got = (ports(m.graph.input), ports(m.graph.output))
        if part == "unet":
            held = "fp16" if got[0][0][1] == "FLOAT16" else "fp32"
            assert held == unet_dtype, f"the UNet there is {held}, not --unet-dtype {unet_dtype}: rebuild with --force"
        want = (ports(ref.graph.input), ports(ref.graph.output))
        if part == "unet" and unet_dtype == "fp16":   # the fixture is fp32: every float port becomes float16
            want = tuple([(n, "FLOAT16" if e == "FLOAT" else e, d) for n, e, d in side] for side in want)
        if part.startswith("text_encoder"):          # hidden_states.N: N up to the layer count, which differs
            got = tuple([p for p in side if not p[0].startswith("hidden_states.")] for side in got)
            want = tuple([p for p in side if not p[0].startswith("hidden_states.")] for side in want)
            hidden = [o.name for o in m.graph.output if o.name.startswith("hidden_states.")]
            layers = (TEXT_1 if part == "text_encoder" else TEXT_2)["num_hidden_layers"]
            assert hidden == [f"hidden_states.{i}" for i in range(layers + 1)], hidden
        assert got == want, f"{part}: ports {got} != the tiny optimum export's {want}"
        locations = sorted({e.value for i in m.graph.initializer for e in i.external_data if e.key == "location"})
        assert locations in ([], ["model.onnx_data"]), locations
        data = out / part / "model.onnx_data"
        assert (data.exists() and locations) or (not data.exists() and not locations), (part, locations)
        say(f"verify {part}: opset {[o.version for o in m.opset_import]}, ports as optimum's "
            f"({len(m.graph.input)} in, {len(m.graph.output)} out, {got[0][0][1]}), {len(m.graph.node)} nodes, "
            f"external data {locations or 'none'}")
        if part == "unet":
            inits = {i.name: i for i in m.graph.initializer}
            kv = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[0] == "encoder_hidden_states"
                  and n.input[1] in inits]
            named = [n.name for n in kv if "/attn2/to_k/MatMul" in n.name or "/attn2/to_v/MatMul" in n.name]
            dtypes = sorted({onnx.TensorProto.DataType.Name(inits[n.input[1]].data_type) for n in kv})
            shapes = sorted({tuple(inits[n.input[1]].dims) for n in kv})
            say(f"verify unet: {len(kv)} K/V MatMuls fed by encoder_hidden_states ({len(named)} named "
                f".../attn2/to_k|to_v/MatMul, e.g. {named[0]}), weights {dtypes} {shapes}")
            assert len(kv) == len(named) == 2 * expected_kv_blocks(), (len(kv), len(named))
            assert dtypes == ["FLOAT16" if unet_dtype == "fp16" else "FLOAT"], dtypes


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="rebuild components that already exist")
    ap.add_argument("--unet-dtype", choices=("fp16", "fp32"), default="fp16",
                    help="the UNet's weights and float ports (default fp16, ~5.1 GB; fp32 is ~10.3 GB)")
    ap.add_argument("--no-verify", action="store_true", help="skip the light checks at the end")
    ap.add_argument("--max-rss-gb", type=float, default=18.0,
                    help="kill a component's build when its RSS passes this (default 18)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    say(f"output {out}; UNet {args.unet_dtype}; {os.cpu_count()} cores; {human(free)} free on its disk")
    if free < 12 * 2**30:  # UNet fp16 5.1 GB (twice while optimum re-saves it) + text encoders 3.3 GB
        say("warning: less than 12 GiB free; the UNet export writes its weights twice")

    built = []
    for name in COMPONENTS:
        exists = all((out / f).is_file() for f in FILES[name])
        if exists and not args.force and (name != "model_index" or not built):
            say(f"--- {name}: exists, skipped (--force rebuilds)")
            continue
        say(f"=== {name}")
        t = time.time()
        fn = globals()[f"build_{name}"]
        if name in HEAVY:
            fargs = (out, args.unet_dtype) if name == "unet" else (out,)
            peak = run_forked(name, fn, *fargs, max_rss_gb=args.max_rss_gb)
        else:
            fn(out)
            peak = None
        dt = time.time() - t
        ROWS.append((name, dt, peak))
        say(f"=== {name}: done in {dt:.1f}s" + (f", peak RSS {peak:.2f} GB" if peak is not None else ""))
        built.append(name)
    if not args.no_verify:
        t = time.time()
        peak = run_forked("verify", verify, out, args.unet_dtype, max_rss_gb=args.max_rss_gb)
        ROWS.append(("verify", time.time() - t, peak))

    say("steps:")
    for name, dt, peak in ROWS:
        print(f"    {name:<16s} {dt:8.1f}s" + (f"   peak RSS {peak:6.2f} GB" if peak is not None else ""))
    print(f"    {'total':<16s} {time.time() - T0:8.1f}s")
    say("sizes:")
    for sub in ("model_index.json", "scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                "unet", "vae_decoder"):
        p = out / sub
        if p.exists():
            print(f"    {sub:<20s} {human(dir_size(p)):>10s}  ({dir_size(p):,} bytes)")
    print(f"    {'total':<20s} {human(dir_size(out)):>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
