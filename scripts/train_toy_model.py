#!/usr/bin/env python3
"""Train models/toy: a small Stable-Diffusion-architecture model of the toy world (scripts/toy_world.py).

    python3 scripts/train_toy_model.py train     # VAE, then text encoder + UNet jointly; resumable
    python3 scripts/train_toy_model.py export    # ONNX in the diffusers layout -> models/toy/
    python3 scripts/train_toy_model.py measure   # the issue's bars on the torch model -> models/toy/measured.json
    python3 scripts/train_toy_model.py all

Everything is seeded and step-based: the batch of step k is drawn from a generator seeded with
(SEED, k), so a run resumed from a checkpoint (every CKPT_EVERY steps, third_party/toy-train/)
sees the same data and noise as an uninterrupted one. Training uses the CPU only.
"""
from __future__ import annotations

import sys

import _venv

REPO = _venv.REPO
WORK = REPO / "third_party" / "toy-train"
OUT = REPO / "models" / "toy"

if __name__ == "__main__":
    _venv.bootstrap(__file__)

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import toy_world as world  # noqa: E402
from _models import quiet_fd, seed_all  # noqa: E402

warnings.filterwarnings("ignore")

SEED = 20261126
THREADS = 2
BATCH = 64
VAE_STEPS = 600
VAE_LR = 2e-3
JOINT_STEPS = 5000
LR_MAX, LR_MIN, WARMUP = 1e-3, 1e-4, 100
EMA_DECAY = 0.999
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
CKPT_EVERY = 250
SHAPE_WEIGHT = 10.0  # VAE loss weight of pixels that differ from the background

TEXT_CONFIG = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu", projection_dim=64,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64, 64),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   mid_block_type="UNetMidBlock2DCrossAttn",
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=32)
SCHEDULER_CONFIG = {  # SD 1.x's scheduler_config.json (PNDM, scaled-linear betas); DDIM reads the same keys
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tokenizer():
    from transformers import CLIPTokenizer

    with quiet_fd():
        return CLIPTokenizer.from_pretrained(str(REPO / "tests" / "fixtures" / "sd-tiny" / "tokenizer"))


def batch(step: int, stage: str, n: int = BATCH):
    """Images [n, 3, 32, 32] in [-1, 1] and captions of one training step (a pure function of the step)."""
    import torch

    rng = np.random.default_rng([SEED, {"vae": 1, "joint": 2}[stage], step])
    scenes = world.sample_scenes(rng, n)
    caps = [s["caption"] if rng.random() >= CAPTION_DROPOUT else "" for s in scenes]
    img = torch.from_numpy(world.render(scenes)).permute(0, 3, 1, 2) * 2 - 1
    bgs = torch.tensor([world.BACKGROUNDS[s["background"]] for s in scenes], dtype=torch.float32) / 127.5 - 1
    return img, caps, bgs


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR_MAX * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, JOINT_STEPS - WARMUP)
    return LR_MIN + 0.5 * (LR_MAX - LR_MIN) * (1 + math.cos(math.pi * t))


def save_ckpt(path, state: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_vae() -> None:
    import torch
    from diffusers import AutoencoderKL

    path = WORK / "vae.pt"
    if path.exists():
        log("vae: done already")
        return
    seed_all(SEED)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    losses = []
    t0 = time.time()
    for step in range(VAE_STEPS):
        img, _, bgs = batch(step, "vae")
        # a deterministic autoencoder (the posterior mean), pixels of the shape weighted up: with plain
        # L1 the small coloured area loses to the background and colours wash out on black
        z = vae.encode(img).latent_dist.mode()
        rec = vae.decode(z).sample
        shape_px = ((img - bgs[:, :, None, None]).abs().amax(1, keepdim=True) > 0.1).float()
        w = 1 + (SHAPE_WEIGHT - 1) * shape_px
        loss = (w * (rec - img).abs()).mean() + 1e-4 * z.pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = VAE_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / VAE_STEPS)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % 100 == 0 or step == VAE_STEPS - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():  # latent scale, as SD's 0.18215: 1 / std of the latents of a large batch
        img, _, _ = batch(10**6, "vae", 512)
        z = vae.encode(img).latent_dist.mode()
        scaling = float(1 / z.std())
        dec = vae.decode(z).sample.clamp(-1, 1)
        acc = accuracy_of((dec.permute(0, 2, 3, 1).numpy() + 1) / 2, 10**6, "vae", 512)
    log(f"vae: {time.time() - t0:.0f} s, scaling factor {scaling:.4f}, classifier on reconstructions {acc}")
    vae.register_to_config(scaling_factor=scaling)
    save_ckpt(path, {"state": vae.state_dict(), "scaling": scaling, "losses": losses, "seconds": time.time() - t0,
                     "reconstruction_accuracy": acc})


def accuracy_of(imgs: np.ndarray, step: int, stage: str, n: int) -> dict:
    rng = np.random.default_rng([SEED, {"vae": 1, "joint": 2}[stage], step])
    scenes = world.sample_scenes(rng, n)
    ok = {"shape": 0, "colour": 0, "background": 0}
    for s, im in zip(scenes, imgs):
        c = world.classify(im)
        for k in ok:
            ok[k] += c[k] == s[k]
    return {k: round(v / n, 4) for k, v in ok.items()}


def load_vae():
    import torch
    from diffusers import AutoencoderKL

    ck = torch.load(WORK / "vae.pt")
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=ck["scaling"])
    vae.load_state_dict(ck["state"])
    return vae.eval(), ck


def new_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    seed_all(SEED + 1)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    seed_all(SEED + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return te, unet


def train_joint() -> None:
    import torch
    from diffusers import DDPMScheduler

    vae, _ = load_vae()
    vae.requires_grad_(False)
    tok = tokenizer()
    te, unet = new_models()
    ema_te, ema_unet = copy.deepcopy(te).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = list(te.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=LR_MAX, weight_decay=1e-2)
    sched = DDPMScheduler.from_config({**SCHEDULER_CONFIG, "_class_name": "DDPMScheduler"})
    acp = sched.alphas_cumprod
    snr_all = acp / (1 - acp)
    ckpt = WORK / "joint.pt"
    start, losses, seconds = 0, [], 0.0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        te.load_state_dict(st["te"])
        unet.load_state_dict(st["unet"])
        ema_te.load_state_dict(st["ema_te"])
        ema_unet.load_state_dict(st["ema_unet"])
        opt.load_state_dict(st["opt"])
        start, losses, seconds = st["step"], st["losses"], st["seconds"]
        log(f"joint: resumed at step {start}")
    if start >= JOINT_STEPS:
        log("joint: done already")
        return
    te.train()
    unet.train()
    t_last = time.time()
    for step in range(start, JOINT_STEPS):
        img, caps, _ = batch(step, "joint")
        g = torch.Generator().manual_seed(SEED * 7 + step)
        with torch.no_grad():
            z = vae.encode(img).latent_dist.mode() * vae.config.scaling_factor
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t = torch.randint(0, 1000, (len(caps),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        zt = sched.add_noise(z, noise, t)
        ehs = te(ids)[0]
        pred = unet(zt, t, ehs).sample
        snr = snr_all[t]
        w = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # Min-SNR-gamma for the epsilon objective
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(EMA_DECAY, (1 + step) / (10 + step))
            for m, e in ((te, ema_te), (unet, ema_unet)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - d)
        losses.append(float(loss))
        if (step + 1) % 50 == 0:
            now = time.time()
            seconds += now - t_last
            t_last = now
            log(f"joint step {step + 1}/{JOINT_STEPS} loss(avg50) {np.mean(losses[-50:]):.4f} "
                f"lr {lr_at(step):.2e} {seconds / (step + 1 - start if start else step + 1):.2f} s/step")
        if (step + 1) % CKPT_EVERY == 0 or step + 1 == JOINT_STEPS:
            seconds += time.time() - t_last
            t_last = time.time()
            save_ckpt(ckpt, {"te": te.state_dict(), "unet": unet.state_dict(), "ema_te": ema_te.state_dict(),
                             "ema_unet": ema_unet.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                             "losses": losses, "seconds": seconds})
    log(f"joint: finished, {seconds / 60:.1f} min of training time")


def load_trained():
    """The EMA text encoder and UNet, the VAE, the tokenizer: a diffusers StableDiffusionPipeline."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    vae, _ = load_vae()
    te, unet = new_models()
    st = torch.load(WORK / "joint.pt", weights_only=False)
    te.load_state_dict(st["ema_te"])
    unet.load_state_dict(st["ema_unet"])
    torch.set_grad_enabled(False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te.eval(), tokenizer=tokenizer(), unet=unet.eval(),
                                   scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, st


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["train", "export", "measure", "all"])
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.stage in ("train", "all"):
        train_vae()
        train_joint()
    if args.stage in ("export", "all"):
        import toy_export

        toy_export.export(load_trained, OUT)
    if args.stage in ("measure", "all"):
        import toy_measure

        toy_measure.measure(load_trained, OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
