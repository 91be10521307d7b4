#!/usr/bin/env python3
"""Writes models/toy/preserve.txt: the toy world's preservation prompts for `edit --preserve`.

Every coloured shape (sizes, backgrounds) and the uncoloured diamond, which no row of the toy
datasets edits; minus every prompt that the toy datasets score (any cell of models/toy/toy_timed.csv and of
models/toy/toy_three.csv, the three edits solved together)
and the explicit-colour probes "a <colour> <shape>", so that preservation is never fitted to a
scored prompt (tests/eval.rs checks the two lists are disjoint). Uncoloured circles, squares and
triangles are left out: they are what the rows edit. Standard library only.

    python3 scripts/toy_preserve.py
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

TOY = Path(__file__).resolve().parent.parent / "models" / "toy"


def main() -> int:
    world = json.loads((TOY / "world.json").read_text())
    shapes, colours = world["shapes"], list(world["colours"])
    scored = set()
    for dataset in ("toy_timed.csv", "toy_three.csv"):
        with open(TOY / dataset, newline="") as f:
            scored |= {cell.strip() for row in csv.reader(f) for cell in row}
    probes = {f"a {c} {s}" for s in shapes for c in colours}
    prompts = []
    for shape in shapes:
        for colour in colours + ([None] if world["priors"][shape] is None else []):
            for size in (None, "big", "small"):
                for bg in [None, *world["backgrounds"]]:
                    text = "a " + " ".join(w for w in (size, colour, shape) if w)
                    if bg:
                        text += f" on a {bg} background"
                    if text not in scored and text not in probes:
                        prompts.append(text)
    header = "# The toy world's preservation prompts (scripts/toy_preserve.py): none is scored.\n"
    (TOY / "preserve.txt").write_text(header + "\n".join(prompts) + "\n")
    print(f"{len(prompts)} prompts -> {TOY / 'preserve.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
