"""Export stage of train_toy_model.py: the trained toy model to ONNX in the diffusers layout
(models/toy/), with its world, dataset, loss curves, and a check that ONNX Runtime reproduces torch.

Imported by train_toy_model.py inside the venv; not a script of its own.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

import toy_world as world

# The TIMED-format dataset of the toy world: (shape, destination colour). Negatives are the other
# prior shapes whose prior colour is not the destination colour (otherwise "a square" and "a green
# square" would name the same picture and specificity could not be told from efficacy).
TOY_ROWS = [("circle", "blue"), ("square", "blue"), ("triangle", "blue"), ("circle", "green"),
            ("square", "yellow"), ("triangle", "red")]


def toy_rows() -> list[dict]:
    rows = []
    for shape, colour in TOY_ROWS:
        row = {"old": f"a {shape}", "new": f"a {colour} {shape}"}
        pos = [("a big {c}{s}"), ("a small {c}{s}"), ("a {c}{s} on a black background"),
               ("a {c}{s} on a white background"), ("a picture of a big {c}{s} on a gray background")]
        for k, p in enumerate(pos, 1):
            row[f"positive{k}"] = p.format(c="", s=shape)
            row[f"gt{k}"] = p.format(c=colour + " ", s=shape)
        others = [s for s in world.SHAPES if world.PRIORS[s] not in (None, colour) and s != shape]
        neg = ["a {c}{s}", "a big {c}{s}", "a small {c}{s}", "a {c}{s} on a gray background",
               "an image of a {c}{s}"]
        for k, p in enumerate(neg, 1):
            o = others[(k - 1) % len(others)]
            row[f"negative{k}"] = p.format(c="", s=o)
            row[f"gn{k}"] = p.format(c=colour + " ", s=o)
        rows.append(row)
    return rows


TIMED_COLUMNS = (["old", "new"] + [f"{a}{k}" for k in range(1, 6) for a in ("positive", "gt")]
                 + [f"{a}{k}" for k in range(1, 6) for a in ("negative", "gn")])


def write_csv(path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TIMED_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in toy_rows():
            w.writerow(r)


def loss_png(path: Path, curves: dict[str, list[float]]) -> None:
    """Loss curves (moving average of 50 steps, log scale), one panel per curve, drawn with PIL."""
    from PIL import Image, ImageDraw

    W, H, pad = 520, 260, 44
    img = Image.new("RGB", (W * len(curves), H), "white")
    d = ImageDraw.Draw(img)
    for i, (name, ys) in enumerate(curves.items()):
        y = np.convolve(np.asarray(ys, float), np.ones(50) / 50, mode="valid") if len(ys) >= 50 else np.asarray(ys)
        ly = np.log10(np.maximum(y, 1e-6))
        lo, hi = np.floor(ly.min() * 2) / 2, np.ceil(ly.max() * 2) / 2
        x0 = i * W
        box = (x0 + pad, 20, x0 + W - 12, H - pad)
        d.rectangle(box, outline="black")
        for e in np.arange(lo, hi + 1e-9, 0.5):
            yy = box[3] - (e - lo) / max(hi - lo, 1e-9) * (box[3] - box[1])
            d.line([(box[0], yy), (box[2], yy)], fill=(225, 225, 225))
            d.text((x0 + 2, yy - 6), f"{10 ** e:.3g}", fill="black")
        pts = [(box[0] + k / max(1, len(ly) - 1) * (box[2] - box[0]),
                box[3] - (v - lo) / max(hi - lo, 1e-9) * (box[3] - box[1])) for k, v in enumerate(ly)]
        d.line(pts, fill=(30, 90, 200), width=2)
        d.text((box[0] + 6, 4), f"{name} loss (mean of 50 steps, log scale)", fill="black")
        d.text((box[0], H - pad + 6), "0", fill="black")
        d.text((box[2] - 40, H - pad + 6), f"{len(ys)} steps", fill="black")
    img.save(path)


def write_world_samples(out: Path, n: int = 96, cols: int = 12) -> dict:
    """World images as one lossless PNG (tiles of 32 x 32, row-major), with their true labels and what
    toy_world.classify reads off each 8-bit tile: the reference for the Rust classifier, and the
    classifier's accuracy on real world images."""
    from PIL import Image

    rng = np.random.default_rng(20261126)
    scenes = world.sample_scenes(rng, n)
    imgs = (world.render(scenes) * 255 + 0.5).astype(np.uint8)
    side = world.SIDE
    grid = imgs.reshape(n // cols, cols, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(n // cols * side, cols * side, 3)
    Image.fromarray(grid).save(out / "world_samples.png")
    records, ok = [], {"shape": 0, "colour": 0, "background": 0}
    for sc, im in zip(scenes, imgs):
        c = world.classify(im.astype(np.float32) / 255)
        records.append({"truth": {k: sc[k] for k in ok}, "classified": {k: c[k] for k in ok}})
        for k in ok:
            ok[k] += c[k] == sc[k]
    acc = {k: v / n for k, v in ok.items()}
    (out / "world_samples.json").write_text(json.dumps({"tile": side, "cols": cols, "accuracy": acc,
                                                        "images": records}, indent=1) + "\n")
    return acc


def export(load_trained, out: Path) -> None:
    import onnxruntime as ort
    import torch

    import make_fixtures as mf
    from train_toy_model import WORK, log

    pipe, st = load_trained()
    mf.export_diffusers_layout(pipe, out.with_name(out.name + ".new"))
    new = out.with_name(out.name + ".new")
    # keep what is not generated here (the model card is written by hand from measured.json)
    for keep in ("MODEL_CARD.md", "measured.json", "samples.png"):
        if (out / keep).exists():
            shutil.copy2(out / keep, new / keep)
    # diffusers' convert-script layout keeps no model configs, so every ONNX pipeline (diffusers' own
    # included) would assume SD's 64-latent sample size and 0.18215 latent scale: ship both configs.
    pipe.unet.save_config(str(new / "unet"))
    pipe.vae.save_config(str(new / "vae_decoder"))
    world.write_world(new / "world.json")
    acc = write_world_samples(new)
    log(f"export: classifier accuracy on the world_samples.png images: {acc}")
    write_csv(new / "toy_timed.csv")
    vae_ck = torch.load(WORK / "vae.pt")
    loss_png(new / "loss_curves.png", {"VAE": vae_ck["losses"], "UNet + text encoder": st["losses"]})
    training = {"vae_steps": len(vae_ck["losses"]), "vae_seconds": round(vae_ck["seconds"], 1),
                "vae_reconstruction_accuracy": vae_ck["reconstruction_accuracy"],
                "joint_steps": st["step"], "joint_seconds": round(st["seconds"], 1),
                "final_loss_mean_last_200": round(float(np.mean(st["losses"][-200:])), 5),
                "parameters": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                               for k in ("unet", "text_encoder", "vae")}}
    (new / "training.json").write_text(json.dumps(training, indent=2) + "\n")

    # ONNX Runtime vs torch on the same inputs
    so = ort.SessionOptions()
    so.log_severity_level = 3
    te = ort.InferenceSession(str(new / "text_encoder" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    un = ort.InferenceSession(str(new / "unet" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ids = pipe.tokenizer(["a circle", "a big blue square on a white background"], padding="max_length",
                         max_length=77, truncation=True, return_tensors="np").input_ids
    e_onnx = te.run(None, {"input_ids": ids.astype(np.int32)})[0]
    e_torch = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    g = np.random.default_rng(0)
    x = g.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([500.0, 20.0], np.float32)
    u_onnx = un.run(None, {"sample": x, "timestep": t, "encoder_hidden_states": e_onnx})[0]
    u_torch = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e_torch)).sample.numpy()
    dt, du = float(np.abs(e_onnx - e_torch).max()), float(np.abs(u_onnx - u_torch).max())
    assert dt < 1e-4 and du < 1e-3, (dt, du)
    log(f"export: ONNX vs torch max abs: text encoder {dt:.2e}, UNet {du:.2e}")
    if out.exists():
        shutil.rmtree(out)
    new.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"export: {out} ({size / 2**20:.1f} MiB)")
    assert size <= 30 * 2**20, size
