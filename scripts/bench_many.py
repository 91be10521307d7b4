"""Benchmark: many edits with a preservation prior against one edit, on the full-size SD 1.4 model.

    python3 scripts/bench_many.py [--runs N] [--no-write] [--rev REV]

Issue 17's bar: 20 edits solved together with a 1,000-prompt preservation prior solve and apply in
at most 1.5x the time of one edit, beyond their text encoder runs. Measured two ways on
third_party/sd14-random (built by scripts/make_full_size_model.py when missing), each run its own
process after a quiet-machine wait, alternating: (1) `time-onnx edit --dry-run -v`, the sum of the
"solve" and "apply" stages the edit logs (the strictest reading: only the maths); (2) the whole
edit writing its UNet (`-o`), its wall time minus its text encoder and tokenizer stages (the time
of one edit beyond its text encoder runs, as a user runs it). The one edit is also timed with the same prior
(`--dry-run`), for the reading where both sides preserve the same prompts. The prior is built once by `time-onnx prior`, and its time (text encoder batches
included) is reported. The 1,000 prompts are preserve/sd.txt's lines crossed with ten photographic
and painterly framings (ours), the first 1,000.

Writes the "## many edits" section of BENCHMARKS.md unless --no-write.
"""
from __future__ import annotations

import _venv

if __name__ == "__main__":
    _venv.bootstrap(__file__)

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from _bench import (REPO, binary_env, build_time_onnx, cpu_flags, loadavg, run_measured, say, sh,  # noqa: E402
                    verdict, wait_quiet, write_section)

MODEL = REPO / "third_party" / "sd14-random"
TMP = REPO / "third_party" / "bench-many-tmp"
FRAMINGS = ["", "a photo of ", "a painting of ", "a close-up of ", "a drawing of ", "a picture of ",
            "an old photograph of ", "a sketch of ", "a watercolor of ", "a film still of "]
EDITS = [  # (source, destination): 20 assumptions at once, none of them in preserve/sd.txt
    ("a rose", "a blue rose"), ("a pack of roses", "a pack of blue roses"), ("a frog", "a purple frog"),
    ("a nurse", "a male nurse"), ("a doctor", "a female doctor"), ("a banana", "a red banana"),
    ("a strawberry", "a white strawberry"), ("an ice cream", "a green ice cream"), ("a sunflower", "a pink sunflower"),
    ("a carrot", "a purple carrot"), ("a flamingo", "a white flamingo"), ("a crow", "a white crow"),
    ("a zebra", "a zebra without stripes"), ("a cherry", "a yellow cherry"), ("a lemon", "a blue lemon"),
    ("a fire truck", "a green fire truck"), ("a school bus", "a red school bus"), ("a tiger", "a white tiger"),
    ("a polar bear", "a brown polar bear"), ("a tomato", "an orange tomato"),
]
ONE = [EDITS[1]]
ROWS_PER_EDIT = 77 * 4  # every position of the prompt and of TIME's three augmentations
KV_OUTS = [320] * 10 + [640] * 10 + [1280] * 12  # SD 1.4's 32 K/V weights, [out, 768] each: 19.2 M values
STAGE = re.compile(r"(solve|apply|text encoder|tokenize) (\d+) ms")


def prompts() -> list[str]:
    lines = [line.strip() for line in (REPO / "preserve" / "sd.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return [f + p for f in FRAMINGS for p in lines][:1000]


def floor(rounds: int = 5) -> dict[str, float]:
    """The exact edit's bare BLAS/LAPACK calls, timed in numpy/scipy (OpenBLAS, every core) on random data
    of the benchmark's shapes, medians in ms: what any implementation of the exact formula pays for 20
    edits with a prior (float64 products and solve, as the conditioning of λI + Σ ccᵀ needs; the
    float32 apply the tool does), before widening a row or reading a file; and for one edit the
    factored route the tool takes (n = 308 < d: the n×n system, a QR, a rank-k apply)."""
    import numpy as np
    from scipy.linalg import cho_factor, cho_solve, qr
    from scipy.linalg.blas import dgemm, dsyrk, sgemm

    rng = np.random.default_rng(0)
    d, lam = 768, 0.1
    # Every K/V weight stacked, row-major [out, d] as stored: its transpose Wᵀ [d, out] is what BLAS
    # sees (column-major), with no copy. One matrix is the cheapest layout for the apply.
    wt = rng.standard_normal((sum(KV_OUTS), d), dtype=np.float32).T
    prior = rng.standard_normal((4 * d, d)) / 8
    prior = prior.T @ prior

    def med(f) -> float:
        f()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            f()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    n = len(EDITS) * ROWS_PER_EDIT
    ct, st = (rng.standard_normal((n, d)).T for _ in range(2))  # rows c and shifts c* − c, as columns
    m = lam * np.eye(d) + ct @ ct.T + 0.1 * prior
    num = ct @ st.T
    change = np.asfortranarray(cho_solve(cho_factor(m), num), dtype=np.float32)
    got = {
        "many: Σ ccᵀ (dsyrk)": med(lambda: dsyrk(1.0, ct)),
        "many: Σ c(c* − c)ᵀ (dgemm)": med(lambda: dgemm(1.0, ct, st, trans_b=1)),
        "many: Cholesky, solve (dpotrf, dpotrs)": med(lambda: cho_solve(cho_factor(m), num)),
        "many: dense apply (Aᵀ − I)·Wᵀ (sgemm, no add)": med(lambda: sgemm(1.0, change, wt)),
    }
    k = ROWS_PER_EDIT
    c1t, s1t = ct[:, :k], st[:, :k]

    def one_solve():
        g = lam * np.eye(k) + c1t.T @ c1t
        b = c1t @ cho_solve(cho_factor(g), np.eye(k))
        q, r = qr(b, mode="economic")
        return np.asfortranarray(q, dtype=np.float32), np.asfortranarray(r @ s1t.T, dtype=np.float32)
    p, y = one_solve()
    got["one: n×n system, QR, R·S (f64)"] = med(one_solve)
    got["one: rank-k apply Wᵀ += P·(Y·Wᵀ) (sgemm)"] = med(
        lambda: sgemm(1.0, p, sgemm(1.0, y, wt), beta=1.0, c=wt, overwrite_c=1))
    return got


def stages(stderr: str) -> dict[str, int]:
    line = next((l for l in stderr.splitlines() if "timings:" in l), "")
    return {name: int(ms) for name, ms in STAGE.findall(line)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rev")
    args = ap.parse_args()
    if not MODEL.exists():
        say(f"{MODEL} missing: building it with scripts/make_full_size_model.py")
        subprocess.check_call([sys.executable, str(REPO / "scripts" / "make_full_size_model.py"), "--out", str(MODEL)])
    binary, build_what, _ = build_time_onnx(args.rev)
    env = binary_env(binary)
    TMP.mkdir(parents=True, exist_ok=True)
    (TMP / "prompts.txt").write_text("\n".join(prompts()) + "\n")
    for name, pairs in (("many.csv", EDITS), ("one.csv", ONE)):
        (TMP / name).write_text("src,dst\n" + "".join(f"{s},{d}\n" for s, d in pairs))
    prior = TMP / "prior.safetensors"
    wait_quiet()
    r = run_measured([str(binary), "prior", "--model", str(MODEL), "--prompts", str(TMP / "prompts.txt"),
                      "-o", str(prior)], env)
    if r.rc != 0:
        raise SystemExit(f"prior failed: {r.stderr}")
    prior_line = r.stdout.strip()
    say(f"prior: {r.wall:.2f} s wall; {prior_line}")
    unet = str(MODEL / "unet" / "model.onnx")
    out = TMP / "out"
    edit = [str(binary), "-v", "edit", unet, "--edits"]
    many = [str(TMP / "many.csv"), "--prior", str(prior)]
    cmds = {
        "one": edit + [str(TMP / "one.csv"), "--dry-run"],
        "one, same prior": edit + [str(TMP / "one.csv"), "--prior", str(prior), "--dry-run"],
        "many": edit + many + ["--dry-run"],
        "one, written": edit + [str(TMP / "one.csv"), "-o", str(out / "model.onnx")],
        "many, written": edit + many + ["-o", str(out / "model.onnx")],
    }
    got: dict[str, list[dict[str, int]]] = {name: [] for name in cmds}
    for k in range(args.runs + 1):
        for name, cmd in cmds.items():
            subprocess.run(["rm", "-rf", str(out)], check=True)
            os.sync()
            wait_quiet()
            r = run_measured(cmd, env)
            if r.rc != 0:
                raise SystemExit(f"{name} failed: {r.stderr}")
            s = stages(r.stderr)
            s["beyond text encoder"] = round(r.wall * 1e3) - s["text encoder"] - s["tokenize"]
            say(f"{'warmup' if k == 0 else f'round {k}'} {name}: {s} (others' CPU {r.foreign:.2f} s)")
            if k:
                got[name].append(s)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    wait_quiet()
    bare = floor()
    say(f"floor: {bare}")
    figure = {"one": "solve + apply", "one, same prior": "solve + apply", "many": "solve + apply",
              "one, written": "beyond text encoder", "many, written": "beyond text encoder"}

    def value(name: str, s: dict[str, int]) -> int:
        return s["solve"] + s["apply"] if figure[name] == "solve + apply" else s["beyond text encoder"]
    med = {name: statistics.median(value(name, s) for s in runs) for name, runs in got.items()}
    ratio = med["many"] / med["one"]
    ratio_written = med["many, written"] / med["one, written"]
    ratio_prior = med["many"] / med["one, same prior"]
    floor_many = sum(v for name, v in bare.items() if name.startswith("many"))
    floor_one = sum(v for name, v in bare.items() if name.startswith("one"))
    reach = floor_many / med["one"]
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    section = "\n".join([
        "## many edits",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `python3 scripts/bench_many.py --runs {args.runs}`; "
        f"time-onnx built from {build_what}. Machine: {sh('nproc')} cores, {cpu} (flags: {cpu_flags()}); "
        f"load average {loadavg()} after the runs.",
        "",
        f"- prior of 1,000 prompts (`time-onnx prior`, batches of 64 through the text encoder): {prior_line}",
        "- one edit: `edit --edits one.csv --dry-run` (\"A pack of roses\" → \"A pack of blue roses\", "
        "TIME's augmentations, no preservation; \"one, same prior\": with the many edits' `--prior`); many: 20 "
        "edits with `--prior` (1,000 prompts, scale 0.1)",
        "",
        "| run | figure | per round (ms) | median |",
        "|---|---|---|---:|",
        *[f"| {name} | {figure[name]} | {', '.join(str(value(name, s)) for s in runs)} | {med[name]:.0f} |"
          for name, runs in got.items()],
        "",
        "| bar | measured | |",
        "|---|---|---|",
        f"| 20 edits + 1,000-prompt prior ≤ 1.5 × one edit, the maths alone (solve + apply, --dry-run) | "
        f"{med['many']:.0f} / {med['one']:.0f} = **{ratio:.2f} ×** | {verdict(ratio <= 1.5)} |",
        f"| 20 edits + 1,000-prompt prior ≤ 1.5 × one edit, whole edits writing the UNet, beyond their text "
        f"encoder and tokenizer stages | {med['many, written']:.0f} / {med['one, written']:.0f} = "
        f"**{ratio_written:.2f} ×** | {verdict(ratio_written <= 1.5)} |",
        f"| (another reading) 20 edits + prior ≤ 1.5 × one edit with the same prior, the maths alone | "
        f"{med['many']:.0f} / {med['one, same prior']:.0f} = **{ratio_prior:.2f} ×** | {verdict(ratio_prior <= 1.5)} |",
        "",
        "The floor: the exact formula's bare BLAS/LAPACK calls, timed in numpy/scipy (OpenBLAS on every core) on "
        "random data of the same shapes (`floor()` in the script; medians of 5):",
        "",
        "| call | ms |",
        "|---|---:|",
        *[f"| {name} | {v:.0f} |" for name, v in bare.items()],
        f"| **20 edits, every call above** | **{floor_many:.0f}** |",
        f"| one edit, its calls | {floor_one:.0f} |",
        "",
        f"The 20 edits' calls alone take {floor_many:.0f} ms = **{reach:.2f} ×** the tool's whole one edit "
        f"({med['one']:.0f} ms, solve + apply): "
        + ("more than 1.5 ×, so on this machine no implementation of the exact formula in float64 products and a "
           "float32 apply meets the bar without making the one edit slower."
           if reach > 1.5 else "under 1.5 ×: the floor leaves room, the bar is within reach of a faster implementation."),
        "",
    ])
    print(section)
    if not args.no_write:
        write_section("many edits", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
