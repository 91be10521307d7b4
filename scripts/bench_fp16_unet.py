"""Benchmark: a single-file float16 SD 1.x UNet on the CPU, time-onnx against an earlier build of itself.

    python3 scripts/bench_fp16_unet.py --base REV [--model DIR] [--runs 3] [--steps 2] [--size 256]
                                       [--threads 2] [--no-write]

On the CPU a float16 UNet computes in float32. time-onnx widens the weights itself and hands them to ONNX
Runtime from memory; before 2026-12-07 (evening) it did so only for weights stored outside the model file, and a
single-file UNet (SD 1.x's, 1.6 GiB of float16 weights inside model.onnx) took the slower way: ONNX Runtime's
"all" level folding the casts at load on one thread. This measures both builds on the same folder
(third_party/sd14-fp16, made by scripts/make_fp16_unet.py when missing), and the new one again with
`--graph-opt all` (the widened weights then go in as external data, for ONNX Runtime's layout transforms),
alternating, each run its own process after a quiet-machine wait:

    <binary> -v generate --model DIR --prompt "A pack of roses" --steps N --height S --width S --seed 1
             --threads T --device cpu --output-type npy -o <tmp>/<name>.npy

and reports start → image (wall time of the process), the in-process generation time, the median denoising
step and peak RSS, medians over --runs; then the images of the last round, from the same seed, compared.
Writes the "## float16 UNet load" section of BENCHMARKS.md unless --no-write.
"""
from __future__ import annotations

import _venv

if __name__ == "__main__":
    _venv.bootstrap(__file__)

import argparse  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from _bench import (ANSI_RE, REPO, binary_env, build_time_onnx, cpu_flags, loadavg, machine_facts,  # noqa: E402
                    run_measured, say, wait_quiet, write_section)

GEN_RE = re.compile(r"image\(s\) in ([0-9.]+) s; denoising steps: median ([0-9.]+) ms")
SLOWER = "the slower way"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier commit to build and compare against")
    ap.add_argument("--model", type=Path, default=REPO / "third_party" / "sd14-fp16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating BENCHMARKS.md")
    args = ap.parse_args()
    if not (args.model / "unet" / "model.onnx").exists():
        subprocess.check_call([sys.executable, str(REPO / "scripts" / "make_fp16_unet.py"), "--out", str(args.model)])
    tmp = REPO / "third_party" / "bench-fp16-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    base, base_what, _ = build_time_onnx(args.base)
    new, new_what, _ = build_time_onnx(None)
    contenders = {"base": base, "new": new, "new, all": new}

    def run(name: str) -> dict:
        out = tmp / f"{name.replace(', ', '-')}.npy"
        out.unlink(missing_ok=True)
        cmd = [str(contenders[name]), "-v", "generate", "--model", str(args.model), "--prompt", "A pack of roses",
               "--steps", str(args.steps), "--height", str(args.size), "--width", str(args.size), "--seed", "1",
               "--threads", str(args.threads), "--device", "cpu", "--output-type", "npy", "-o", str(out)]
        if name.endswith("all"):
            cmd += ["--graph-opt", "all"]
        wait_quiet()
        r = run_measured(cmd, env=binary_env(contenders[name]))
        err = ANSI_RE.sub("", r.stderr)
        m = GEN_RE.search(err)
        if r.rc != 0 or not m:
            raise SystemExit(f"{name} failed (exit {r.rc}):\n{err[-2000:]}")
        return {"wall": r.wall, "gen": float(m.group(1)), "step": float(m.group(2)), "rss": r.rss_kb / 1024,
                "slower": SLOWER in err, "cmd": cmd}

    for name in contenders:  # untimed: page cache warm
        say(f"warm-up: {name}")
        run(name)
    rounds: dict[str, list[dict]] = {n: [] for n in contenders}
    for i in range(args.runs):
        for name in contenders:
            r = run(name)
            rounds[name].append(r)
            say(f"round {i + 1} {name}: {r['wall']:.2f} s, step {r['step']:.0f} ms, {r['rss']:,.0f} MiB"
                + (" (ONNX Runtime folded the casts)" if r["slower"] else ""))
    import numpy as np
    a, b, c = (np.load(tmp / f"{n}.npy") for n in ("base", "new", "new-all"))
    diff, diff_all = float(np.abs(a - b).max()), float(np.abs(b - c).max())
    off = int((np.abs(a - b) * 255 >= 1).sum())

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    facts = machine_facts(tmp)
    size = (args.model / "unet" / "model.onnx").stat().st_size / 2**30
    command = "python3 scripts/bench_fp16_unet.py " + " ".join(sys.argv[1:])
    route = {n: ("ONNX Runtime folds the casts (\"all\" level)" if rounds[n][0]["slower"]
                 else "widened by time-onnx, weights given from memory"
                 + (" as external data, `--graph-opt all`" if n.endswith("all") else "")) for n in contenders}
    lines = [
        "## float16 UNet load", "",
        f"Measured {datetime.date.today()} with `{command}`; base: {base_what}; new: {new_what}. Machine: "
        f"{facts['nproc']} cores, {facts['cpu']} (flags: {cpu_flags()}), {facts['mem']} RAM; onnxruntime "
        f"{facts['onnxruntime']}; load average {loadavg()} after the runs. Model: `{args.model.relative_to(REPO)}` "
        f"(scripts/make_fp16_unet.py: SD 1.4's architecture, random weights, the UNet float16 in one "
        f"{size:.2f} GiB file). {args.steps} steps at {args.size}×{args.size}, {args.threads} threads, CPU; "
        f"{args.runs} rounds alternating, medians.", "",
        "| build | route | start → image (s) | per round (s) | generation in process (s) | step (ms) | peak RSS (MiB) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for n in contenders:
        per = ", ".join(f"{r['wall']:.2f}" for r in rounds[n])
        lines.append(f"| {n} | {route[n]} | {med(n, 'wall'):.2f} | {per} | {med(n, 'gen'):.2f} | "
                     f"{med(n, 'step'):.0f} | {med(n, 'rss'):,.0f} |")
    per_round = ", ".join(f"{x['wall'] / y['wall']:.2f}" for x, y in zip(rounds["new"], rounds["base"]))
    lines += ["",
              f"new / base, start → image: **{med('new', 'wall') / med('base', 'wall'):.2f} ×** (rounds {per_round}); "
              f"per step {med('new', 'step') / med('base', 'step'):.2f} ×; the last round's images are "
              f"{diff:.1e} apart at most ({off} values off by 1/255 or more).",
              f"new at `--graph-opt all` / new: start → image {med('new, all', 'wall') / med('new', 'wall'):.2f} ×, "
              f"per step {med('new, all', 'step') / med('new', 'step'):.2f} ×, peak RSS "
              f"{med('new, all', 'rss') / med('new', 'rss'):.2f} ×; images {diff_all:.1e} apart at most.", ""]
    section = "\n".join(lines)
    if args.no_write:
        print(section)
    else:
        write_section("float16 UNet load", section)
        say("BENCHMARKS.md: ## float16 UNet load written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
