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
- the preservation prior Cₚ = Σ cₚ cₚᵀ on its own, for `time-onnx prior`;
- erase/replace pairs (`edit --erase`), UCE's own positions: from the last word token of each
  prompt (attention-mask sum − 2) to the end, the longer tail trimmed so both have 77 − max of
  the two starts; an empty guide is " "; no augmentations (UCE's default). Their embeddings come
  from the torch text encoder of tests/fixtures/sd-tiny/torch in float64 (transformers), run here.

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

# UCE erase/replace: (concept, guide) pairs, λ as UCE's script's main passes it (0.5), its default
# preserve_scale 0.1 over PRESERVED.
ERASE = dict(name="erase_preserved", pairs=[("Van Gogh", "art"), ("a rose", "")], lamb=0.5, scale=0.1)

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


def torch_embed(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """Last hidden states `[n, 77, d]` float64 and attention-mask sums, from the torch fixture."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    fx = REPO / "tests" / "fixtures" / "sd-tiny"
    tok = CLIPTokenizer.from_pretrained(str(fx / "tokenizer"))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the causal mask is built in the default dtype
    try:
        te = CLIPTextModel.from_pretrained(str(fx / "torch" / "text_encoder")).to(torch.float64).eval()
        enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = te(enc.input_ids)[0].numpy()
    finally:
        torch.set_default_dtype(prev)
    assert out.dtype == np.float64
    return out, [int(m.sum()) for m in enc.attention_mask]


def erase_rows(pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(c, c*) rows of UCE's replace technique for (concept, guide) pairs."""
    cs, cstars = [], []
    for concept, guide in pairs:
        emb, mask = torch_embed([concept, guide if guide else " "])
        fo, fn = mask[0] - 2, mask[1] - 2
        far = max(fo, fn)
        cs.append(emb[0][fo:77 - max(0, far - fo)])
        cstars.append(emb[1][fn:77 - max(0, far - fn)])
    return np.concatenate(cs), np.concatenate(cstars)


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
    c, cstar = erase_rows(ERASE["pairs"])
    d, lam, s = c.shape[1], ERASE["lamb"], ERASE["scale"]
    for key, w in weights.items():
        mat1 = lam * w + (w @ cstar.T) @ c + s * (w @ kept.T) @ kept
        mat2 = lam * np.eye(d) + c.T @ c + s * prior
        out[f"{ERASE['name']}.{key}"] = mat1 @ np.linalg.inv(mat2)
    listing.append({
        "name": ERASE["name"], "lambda": lam, "preserve_scale": s, "erase": True,
        "edits": [{"source": a, "destination": b} for a, b in ERASE["pairs"]],
        "augmentations": [], "preserved": PRESERVED, "edited_positions": int(c.shape[0]),
        "max_rel_change": max(float(np.abs(out[f"{ERASE['name']}.{k}"] - w).max() / np.abs(w).max())
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
