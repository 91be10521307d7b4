"""Goldens for edits solved together and for UCE's preservation term, in numpy float64.

Independent of time-onnx: the published closed form (UCE, Gandikota et al. 2024, eq. for
`edit_model` in rohitgandikota/unified-concept-editing train-scripts/train_erase.py, with TIME's
v* = W c* as its `technique="replace"`), computed literally for every K/V weight from the
reference embeddings that scripts/make_fixtures.py recorded with the torch pipeline in float64:

    W' = (λ W + Σₑ W c*ₑ cₑᵀ + s Σₚ W cₚ cₚᵀ) (λ I + Σₑ cₑ cₑᵀ + s Σₚ cₚ cₚᵀ)⁻¹

- edit positions (c, c*): every position of every augmented pair of every edit, c* at the
  position TIME's alignment maps to (the `idxs_replace` the torch golden recorded; TIME's
  convention, not UCE's, whose replace mode edits only from the last word token on);
- preserved positions cₚ: all 77 positions of each preserved prompt, padding included (UCE's
  convention for its retain prompts);
- the preservation prior Cₚ = Σ cₚ cₚᵀ on its own, for `time-onnx prior`.

Inputs (already in tests/fixtures/goldens): time/roses_then_car.f64.safetensors (embeddings of
both edits with diffusers' augmentations), time/cases.json (their alignment), text_encoder.safetensors
(torch float64 embeddings of five prompts), time/kv_original.safetensors (the weights edited).
Writes tests/fixtures/goldens/uce/{cases.json, uce.f64.safetensors}.

    python3 scripts/golden_uce.py
"""
from __future__ import annotations

import _venv

if __name__ == "__main__":
    _venv.bootstrap(__file__)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOLDENS = REPO / "tests" / "fixtures" / "goldens"

# The preserved prompts: indices into goldens/text_encoder.json's prompts. Not the roses prompts,
# which the edit itself covers.
PRESERVED = ["", "an apple", "a photo of a 🐱 cat and a 🚀 rocket"]

CASES = [
    # name, which edits of roses_then_car, λ, preservation scale (None: no preservation term)
    dict(name="two_edits", edits=[0, 1], lamb=0.1, scale=None),
    dict(name="two_edits_preserved", edits=[0, 1], lamb=0.1, scale=0.1),
    dict(name="roses_preserved_s1", edits=[0], lamb=0.1, scale=1.0),
]


def edit_rows(emb: dict, index: dict, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(c, c*) rows `[pairs·77, d]` of edit `e`: every position, c* at its aligned position."""
    old, new = emb[f"emb.old.{e}"], emb[f"emb.new.{e}"]
    idxs = index["edits"][e]["idxs_replace"]
    c = np.concatenate([old[p] for p in range(old.shape[0])])
    cstar = np.concatenate([new[p][idxs[p]] for p in range(new.shape[0])])
    return c, cstar


def main() -> int:
    cases_json = json.loads((GOLDENS / "time" / "cases.json").read_text())
    index = next(c for c in cases_json["cases"] if c["name"] == "roses_then_car")
    emb = load_file(str(GOLDENS / "time" / "roses_then_car.f64.safetensors"))
    te = load_file(str(GOLDENS / "text_encoder.safetensors"))
    te_prompts = json.loads((GOLDENS / "text_encoder.json").read_text())["prompts"]
    kept = np.concatenate([te["last_hidden_state.torch_float64"][te_prompts.index(p)] for p in PRESERVED])
    assert kept.dtype == np.float64 and kept.shape[0] == 77 * len(PRESERVED)
    prior = kept.T @ kept
    weights = {k: v.astype(np.float64) for k, v in load_file(str(GOLDENS / "time" / "kv_original.safetensors")).items()}
    out = {"prior": prior}
    listing = []
    for case in CASES:
        rows = [edit_rows(emb, index, e) for e in case["edits"]]
        c = np.concatenate([r[0] for r in rows])
        cstar = np.concatenate([r[1] for r in rows])
        d = c.shape[1]
        lam, s = case["lamb"], case["scale"] or 0.0
        for key, w in weights.items():
            mat1 = lam * w + (w @ cstar.T) @ c
            mat2 = lam * np.eye(d) + c.T @ c
            if case["scale"] is not None:
                mat1 += s * (w @ kept.T) @ kept
                mat2 += s * prior
            out[f"{case['name']}.{key}"] = mat1 @ np.linalg.inv(mat2)
        listing.append({
            "name": case["name"], "lambda": lam, "preserve_scale": case["scale"],
            "edits": [{"source": index["edits"][e]["source"], "destination": index["edits"][e]["destination"]}
                      for e in case["edits"]],
            "augmentations": index["augmentations"],
            "preserved": PRESERVED if case["scale"] is not None else [],
            "max_rel_change": max(float(np.abs(out[f"{case['name']}.{k}"] - w).max() / np.abs(w).max())
                                  for k, w in weights.items()),
        })
    dst = GOLDENS / "uce"
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(out.items())}, str(dst / "uce.f64.safetensors"))
    (dst / "cases.json").write_text(json.dumps({
        "about": "numpy float64, the published closed form; see scripts/golden_uce.py",
        "weights_layout": "torch Linear weight [out, in] (ONNX holds W^T); keys '<case>.<module>.weight'",
        "prior": {"key": "prior", "prompts": PRESERVED, "positions": "all 77 of each prompt"},
        "cases": listing,
    }, indent=1, ensure_ascii=False) + "\n")
    for c in listing:
        print(f"{c['name']}: max relative change {c['max_rel_change']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
