"""The toy world of models/toy: coloured shapes on plain backgrounds, their captions, and a
deterministic classifier that reads an image back into (shape, colour, background).

Pure numpy, no venv needed. The world is also written to models/toy/world.json, which the Rust
classifier (`time-onnx eval --classifier toy`) reads, so the two agree by construction on every
constant: palette, shapes, priors, thresholds.

Implicit assumptions: a caption without a colour word draws the colour from its shape's prior
(circles are red 90% of the time, squares green, triangles yellow); diamonds are the control shape
with no preferred colour. A caption with a colour word draws that colour, whatever the shape.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIDE = 32  # image side in pixels
SUPERSAMPLE = 4  # anti-aliasing: coverage is averaged over 4x4 sub-pixels

COLOURS = {  # RGB in [0, 255]
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ["circle", "square", "triangle", "diamond"]
PRIOR_STRENGTH = 0.9
PRIORS = {"circle": "red", "square": "green", "triangle": "yellow", "diamond": None}  # None: uniform
SIZES = {"small": (5.0, 7.0), "big": (9.5, 12.0)}  # radius range in pixels
JITTER = 3.0  # centre offset range in pixels, each axis

# Bounding box of each shape in its own unit coordinates (u right, v down), and its predicate.
# Areas are close to each other so that "big" means about the same amount of colour for every shape.
SHAPE_BOX = {
    "circle": (-1.0, 1.0, -1.0, 1.0),
    "square": (-0.85, 0.85, -0.85, 0.85),
    "triangle": (-1.05, 1.05, -1.0, 0.8),
    "diamond": (-1.2, 1.2, -1.2, 1.2),
}


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether unit coordinates (u, v) lie inside the shape (the same rule as the Rust classifier's templates)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":  # apex up at v = -1, base at v = 0.8, half-width 1.05 at the base
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * (1.05 / 1.8))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.2
    raise ValueError(shape)


# --------------------------------------------------------------------------------------------
# sampling the world
# --------------------------------------------------------------------------------------------
def sample_scenes(rng: np.random.Generator, n: int, *, colour_named: float = 0.5) -> list[dict]:
    """n random scenes with their captions (a scene is a dict of shape, colour, size, background...)."""
    scenes = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        named = rng.random() < colour_named
        colour = sample_colour(rng, shape, named)
        size = "small" if rng.random() < 0.5 else "big"
        bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        while COLOURS.get(colour) == BACKGROUNDS[bg]:  # never invisible (no such pair today; kept for safety)
            bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        lo, hi = SIZES[size]
        scene = dict(shape=shape, colour=colour, size=size, background=bg,
                     radius=float(rng.uniform(lo, hi)),
                     cx=SIDE / 2 + float(rng.uniform(-JITTER, JITTER)),
                     cy=SIDE / 2 + float(rng.uniform(-JITTER, JITTER)))
        scene["caption"] = caption(rng, scene, named)
        scenes.append(scene)
    return scenes


def sample_colour(rng: np.random.Generator, shape: str, named: bool) -> str:
    names = list(COLOURS)
    prior = PRIORS[shape]
    if named or prior is None:
        return names[rng.integers(len(names))]
    if rng.random() < PRIOR_STRENGTH:
        return prior
    others = [c for c in names if c != prior]
    return others[rng.integers(len(others))]


PREFIXES = ["a photo of ", "an image of ", "a picture of "]


def caption(rng: np.random.Generator, s: dict, named: bool) -> str:
    """Plain English: 'a circle', 'a big blue square on a white background', 'a photo of a small triangle'."""
    words = ["a"]
    if rng.random() < 0.3:
        words.append(s["size"])
    if named:
        words.append(s["colour"])
    words.append(s["shape"])
    text = " ".join(words)
    if rng.random() < 0.3:
        text += f" on a {s['background']} background"
    if rng.random() < 0.3:
        text = PREFIXES[rng.integers(len(PREFIXES))] + text
    return text


def render(scenes: list[dict]) -> np.ndarray:
    """Images [n, 32, 32, 3] float32 in [0, 1], anti-aliased by supersampling."""
    ss = SUPERSAMPLE
    g = (np.arange(SIDE * ss) + 0.5) / ss  # sub-pixel centres in pixel units
    out = np.empty((len(scenes), SIDE, SIDE, 3), np.float32)
    for i, s in enumerate(scenes):
        u = (g[None, :] - s["cx"]) / s["radius"]
        v = (g[:, None] - s["cy"]) / s["radius"]
        cov = inside(s["shape"], u, v).astype(np.float32).reshape(SIDE, ss, SIDE, ss).mean(axis=(1, 3))
        fg = np.array(COLOURS[s["colour"]], np.float32) / 255
        bg = np.array(BACKGROUNDS[s["background"]], np.float32) / 255
        out[i] = bg * (1 - cov[..., None]) + fg * cov[..., None]
    return out


# --------------------------------------------------------------------------------------------
# the classifier
# --------------------------------------------------------------------------------------------
FOREGROUND_DIFF = 0.3  # a pixel is foreground when some channel differs from the background by more
MIN_PIXELS = 12  # fewer foreground pixels than this: no shape
TEMPLATE = 16  # templates are compared on a 16 x 16 grid spanning the foreground's bounding box


def _template(shape: str) -> np.ndarray:
    u0, u1, v0, v1 = SHAPE_BOX[shape]
    c = (np.arange(TEMPLATE) + 0.5) / TEMPLATE
    u = u0 + c[None, :] * (u1 - u0)
    v = v0 + c[:, None] * (v1 - v0)
    return inside(shape, u, v)


TEMPLATES = {s: _template(s) for s in SHAPES}


def classify(img: np.ndarray) -> dict:
    """(shape, colour, background) of one image [32, 32, 3] in [0, 1]; None where nothing is found.

    background: the palette entry nearest the median of the border pixels; foreground: pixels
    differing from it by more than FOREGROUND_DIFF in some channel; colour: the palette entry
    nearest the foreground's median; shape: the template with the highest IoU against the
    foreground mask resampled (nearest pixel) onto the template grid over its bounding box.
    """
    img = np.asarray(img, np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_name = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[bg_name], np.float32) / 255
    mask = np.abs(img - bg).max(axis=-1) > FOREGROUND_DIFF
    n = int(mask.sum())
    if n < MIN_PIXELS:
        return {"shape": None, "colour": None, "background": bg_name, "pixels": n}
    colour = _nearest(np.median(img[mask], axis=0), COLOURS)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    c = (np.arange(TEMPLATE) + 0.5) / TEMPLATE
    rows = (y0 + c * (y1 - y0)).astype(int)
    cols = (x0 + c * (x1 - x0)).astype(int)
    grid = mask[np.ix_(rows, cols)]
    ious = {s: float((grid & t).sum() / max(1, (grid | t).sum())) for s, t in TEMPLATES.items()}
    shape = max(SHAPES, key=lambda s: ious[s])  # ties: first in SHAPES order
    return {"shape": shape, "colour": colour, "background": bg_name, "pixels": n}


def _nearest(rgb01: np.ndarray, palette: dict) -> str:
    names = list(palette)
    ref = np.array([palette[k] for k in names], np.float32) / 255
    return names[int(np.argmin(((ref - rgb01) ** 2).sum(axis=1)))]


# --------------------------------------------------------------------------------------------
# prompts -> the colour they imply
# --------------------------------------------------------------------------------------------
def parse_prompt(text: str) -> dict:
    """The shape and explicit colour a prompt names (None when absent)."""
    words = text.lower().replace(",", " ").split()
    shape = next((w for w in words if w in SHAPES), None)
    colour = next((w for w in words if w in COLOURS), None)
    return {"shape": shape, "colour": colour}


def implied_colour(text: str) -> str | None:
    """The colour an image for this prompt should have in the unedited world: the named one, else
    the shape's prior (None for the control shape: any colour)."""
    p = parse_prompt(text)
    if p["colour"] is not None:
        return p["colour"]
    return PRIORS.get(p["shape"]) if p["shape"] else None


def judge(img_class: dict, a: str, b: str) -> str | None:
    """Which of two prompts an image matches, by the colour each implies: 'a', 'b' or None.

    A prompt with no implied colour (the control shape) matches any colour the other one does not claim.
    """
    ca, cb = implied_colour(a), implied_colour(b)
    col = img_class["colour"]
    if col is None:
        return None
    if col == ca and col != cb:
        return "a"
    if col == cb and col != ca:
        return "b"
    if ca is None and col != cb:
        return "a"
    if cb is None and col != ca:
        return "b"
    return None


def world_json() -> dict:
    """Everything the Rust classifier needs, in one file (models/toy/world.json)."""
    return {
        "side": SIDE,
        "colours": COLOURS,
        "backgrounds": BACKGROUNDS,
        "shapes": SHAPES,
        "priors": PRIORS,
        "prior_strength": PRIOR_STRENGTH,
        "foreground_diff": FOREGROUND_DIFF,
        "min_pixels": MIN_PIXELS,
        "template": TEMPLATE,
        "shape_box": SHAPE_BOX,
        "shape_rules": {
            "circle": "u^2 + v^2 <= 1",
            "square": "|u| <= 0.85 and |v| <= 0.85",
            "triangle": "v <= 0.8 and |u| <= (v + 1) * 1.05 / 1.8",
            "diamond": "|u| + |v| <= 1.2",
        },
    }


def write_world(path: Path) -> None:
    path.write_text(json.dumps(world_json(), indent=2) + "\n")


if __name__ == "__main__":  # accuracy of the classifier on rendered world images
    rng = np.random.default_rng(0)
    scenes = sample_scenes(rng, 4000)
    imgs = render(scenes)
    ok = {"shape": 0, "colour": 0, "background": 0}
    for s, im in zip(scenes, imgs):
        c = classify(im)
        for k in ok:
            ok[k] += c[k] == s[k]
    print({k: v / len(scenes) for k, v in ok.items()})
