#!/usr/bin/env python3
"""Benchmark `time-onnx generate` against diffusers' OnnxStableDiffusionPipeline; write BENCHMARKS.md "## generate".

    python3 scripts/bench_generate.py [--rev REV] [--model DIR] [--tiny DIR] [--runs 3] [--threads 2]
                                      [--full-steps 2,6] [--tiny-steps 5,25] [--tiny-size 128] [--tmp DIR] [--no-write]

Contenders, side by side on the same ONNX files, CPU execution provider, the same number of threads (--threads,
default 2: diffusers' sessions get that many intra-op threads; time-onnx gets `--threads 2`, with which it runs the
guided UNet batch as two concurrent single-threaded runs, one per half, and its other sessions with 2 intra-op
threads), the same prompt, PNDM, guidance 7.5, empty negative prompt, one image, each run in its own process:
  (G1) <release binary> -v generate --model <M> --prompt "A pack of roses" --steps N --height H --width W --seed 1
           --scheduler pndm --threads 2 --device cpu --output-type npy -o <tmp>/x.npy
       (-v only adds one line on stderr, the in-process generation time)
  (G2) a fresh `python` process (`bench_generate.py --diffusers-run ...`): import onnxruntime and diffusers,
       OnnxStableDiffusionPipeline.from_pretrained(<M>, provider="CPUExecutionProvider", sess_options=<intra-op
       threads 2>, provider_options={}), pipe(prompt, height=H, width=W, num_inference_steps=N, generator=
       np.random.RandomState(1), output_type="np"), np.save(<tmp>/x.npy). (provider_options={}: without it diffusers
       0.39 passes providers=[...] with provider_options=[], onnxruntime rejects the pair, prints "EP Error" and
       retries every session without them.)

Models: --model (default third_party/sd14-random, full-size SD 1.4 architecture, random weights; 256×256) and
--tiny (default tests/fixtures/sd-tiny/diffusers-onnx; --tiny-size, default 128×128, the fixture's native size:
latents 16×16. Neither program finds a default size in that folder, which has no unet/config.json and a UNet with
dynamic dims: both would use 512×512).

Each contender runs at two step counts (--full-steps / --tiny-steps); PNDM makes N + 1 UNet calls, so
(T(high) − T(low)) / (calls(high) − calls(low)) is the time of one denoising step (one UNet call on a batch of 2,
plus the scheduler step) with the fixed costs cancelled.

Method: `cargo build --release` first (working tree; or --rev REV, see scripts/bench_edit.py); every contender ×
step count runs once untimed (page cache warm), then --runs timed rounds run G1(low), G1(high), G2(low), G2(high)
(then G1'(low), G1'(high): time-onnx with --graph-opt all, information only, when its default is another level)
in turn; medians are reported. Before every run the previous output is deleted, `sync` is called and the script
waits for 2 idle seconds on the machine (none of it timed). "Start → image written" is the output file's mtime
minus the wall-clock time just before the process was spawned; "process exit" is the wall time around the
process (adds teardown). Peak RSS from GNU time (/usr/bin/time -f %M); others' CPU from /proc/stat. Then, with
the same initial latents supplied to both (`--latents file.npy` / `latents=`), the images are compared at the low
step count (target max |Δ| ≤ 1e-3 on the full-size model).

Like scripts/make_fixtures.py, the script runs inside third_party/venv-fixtures (created when missing;
scripts/_venv.py).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import _venv  # scripts/_venv.py: own venv (third_party/venv-fixtures), re-exec inside it

REPO = _venv.REPO
VENV = _venv.VENV
PROMPT = "A pack of roses"
SEED = 1


# ======================================================================================
# (G2) diffusers, run as `bench_generate.py --diffusers-run MODEL STEPS HEIGHT WIDTH THREADS OUT [LATENTS]` in a
# fresh process; defined and dispatched before anything else is imported
# ======================================================================================
def diffusers_run(argv: list[str]) -> int:
    t0 = time.perf_counter()
    import statistics
    model, steps, height, width, threads, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), argv[5]
    latents_path = argv[6] if len(argv) > 6 else None
    import numpy as np
    import onnxruntime as ort
    from diffusers import PNDMScheduler
    from diffusers.pipelines.stable_diffusion import OnnxStableDiffusionPipeline
    t1 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    pipe = OnnxStableDiffusionPipeline.from_pretrained(model, provider="CPUExecutionProvider", sess_options=opts,
                                                       provider_options={})
    if not isinstance(pipe.scheduler, PNDMScheduler):
        raise SystemExit(f"{model}: the scheduler is {type(pipe.scheduler).__name__}, not PNDM")
    for name in ("text_encoder", "unet", "vae_decoder"):
        sess = getattr(pipe, name).model
        got = sess.get_session_options().intra_op_num_threads
        if got != threads or sess.get_providers() != ["CPUExecutionProvider"]:
            raise SystemExit(f"{name}: {got} intra-op threads, providers {sess.get_providers()}")
    pipe.set_progress_bar_config(disable=True)
    t2 = time.perf_counter()
    kw = {"latents": np.load(latents_path)} if latents_path else {"generator": np.random.RandomState(SEED)}
    step_ends: list[float] = []  # the instant each loop iteration (UNet call, guidance, scheduler step) ended
    images = pipe(PROMPT, height=height, width=width, num_inference_steps=steps, output_type="np",
                  callback=lambda *_: step_ends.append(time.perf_counter()), callback_steps=1, **kw).images
    np.save(out, images)
    t3 = time.perf_counter()
    print(f"diffusers split: import {t1 - t0:.3f} s, load {t2 - t1:.3f} s, generate {t3 - t2:.3f} s; "
          f"{pipe.unet.model.get_session_options().intra_op_num_threads} intra-op threads", file=sys.stderr)
    # the same summary time-onnx -v prints: steps after the first, as intervals between iteration ends
    ms = sorted((b - a) * 1e3 for a, b in zip(step_ends, step_ends[1:]))
    if ms:
        print(f"denoising steps: median {statistics.median(ms):.2f} ms ({len(ms)} timed, {ms[0]:.2f}–{ms[-1]:.2f} ms)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    _venv.bootstrap(__file__, hf_env=False)  # the children get their environment explicitly
    if len(sys.argv) > 1 and sys.argv[1] == "--diffusers-run":
        sys.exit(diffusers_run(sys.argv[2:]))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402

from _bench import (ANSI_RE, Result, binary_env, build_time_onnx, loadavg, machine_facts,  # noqa: E402
                    quiet_summary, rm, run_measured, say, verdict, wait_quiet, write_section)

TARGET_STEP = 0.97   # time-onnx per-step time ≤ 0.97 × diffusers'
TARGET_START = 0.7   # process start → image written ≤ 0.7 ×
TARGET_RSS = 0.8     # peak RSS ≤ 0.8 ×
TARGET_AGREE = 1e-3  # max |Δ| of the images from the same latents (full-size model)
RAW = REPO / "third_party" / "bench-generate-last.json"  # every run of the last benchmark (git-ignored)
GEN_RE = re.compile(r"image\(s\) in ([0-9.]+) s")
DSPLIT_RE = re.compile(r"diffusers split: import ([0-9.]+) s, load ([0-9.]+) s, generate ([0-9.]+) s")
STEP_RE = re.compile(r"denoising steps: median ([0-9.]+) ms \(([0-9]+) timed")


class Run:
    """One timed run: the measured process plus what its output says."""

    def __init__(self, r: Result, written: float, shape: tuple, split: dict[str, float]):
        self.r, self.written, self.shape, self.split = r, written, shape, split


class Contender:
    def __init__(self, key: str, tool: str, steps: int, cmd: list[str], out: Path, env: dict):
        self.key, self.tool, self.steps, self.cmd, self.out, self.env = key, tool, steps, cmd, out, env
        self.runs: list[Run] = []

    @property
    def calls(self) -> int:
        return self.steps + 1  # PNDM (PLMS, skip_prk_steps): N + 1 UNet calls

    def run(self, timed: bool, extra: list[str] | None = None) -> Run:
        import numpy as np

        rm(self.out)
        os.sync()
        if wait_quiet() >= 120.0:
            say("    (the machine did not go quiet within 120 s; running anyway)")
        t_spawn = time.time()
        r = run_measured(self.cmd + (extra or []), self.env)
        if r.rc != 0:
            raise SystemExit(f"{self.key} failed (exit {r.rc}):\n{r.stdout}\n{r.stderr}")
        written = self.out.stat().st_mtime_ns / 1e9 - t_spawn
        img = np.load(self.out)
        err = ANSI_RE.sub("", r.stderr)
        split: dict[str, float] = {}
        if m := GEN_RE.search(err):
            split["generate"] = float(m.group(1))
        if m := DSPLIT_RE.search(err):
            split.update(imports=float(m.group(1)), load=float(m.group(2)), generate=float(m.group(3)))
        if m := STEP_RE.search(err):
            split["step_ms"] = float(m.group(1))
        if "generate" not in split or "step_ms" not in split:
            raise SystemExit(f"{self.key}: no generation time or step time on stderr:\n{err}")
        run = Run(r, written, tuple(img.shape), split)
        if timed:
            self.runs.append(run)
        say(f"  {self.key:<10s} {'timed ' if timed else 'warmup'} written {written:7.2f} s, exit {r.wall:7.2f} s "
            f"(CPU {r.cpu:6.2f} s, others {r.foreign:5.2f} s)  peak RSS {r.rss_kb / 1024:6.0f} MiB  "
            f"generate {split['generate']:.3f} s  image {list(img.shape)}")
        self.last_image = img
        rm(self.out)
        return run

    def med(self, f) -> float:
        return statistics.median(f(x) for x in self.runs)

    @property
    def written(self) -> float:
        return self.med(lambda x: x.written)

    @property
    def wall(self) -> float:
        return self.med(lambda x: x.r.wall)

    @property
    def gen(self) -> float:
        return self.med(lambda x: x.split["generate"])

    @property
    def rss(self) -> float:
        return self.med(lambda x: x.r.rss_kb) / 1024

    @property
    def cpu(self) -> float:
        return self.med(lambda x: x.r.cpu)

    @property
    def foreign(self) -> float:
        return max(x.r.foreign for x in self.runs)


def graph_opt_default(binary: Path) -> str | None:
    """time-onnx's `generate --graph-opt` default (None: a build without the option)."""
    r = subprocess.run([str(binary), "generate", "--help"], capture_output=True, text=True, env=binary_env(binary))
    block = re.search(r"--graph-opt <[^>]*>(.*?)(?=\n\s*-|\Z)", ANSI_RE.sub("", r.stdout), flags=re.S)
    m = re.search(r"\[default:\s+(\w+)\]", block.group(1)) if block else None
    return m.group(1) if m else None


ALL = "time-onnx --graph-opt all"


def bench_model(key: str, name: str, model: Path, size: int, steps: tuple[int, int], tmp: Path, runs: int,
                threads: int, binary: Path, graph_all: bool) -> dict:
    work = tmp / key
    rm(work)
    work.mkdir(parents=True)
    vpy = str(VENV / "bin" / "python")
    py_env = dict(os.environ, **_venv.HF_ENV, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    t_env = binary_env(binary)

    def g1(n: int) -> Contender:
        out = work / "g1.npy"
        cmd = [str(binary), "-v", "generate", "--model", str(model), "--prompt", PROMPT, "--steps", str(n),
               "--height", str(size), "--width", str(size), "--seed", str(SEED), "--scheduler", "pndm",
               "--threads", str(threads), "--device", "cpu", "--output-type", "npy", "-o", str(out)]
        return Contender(f"G1 {n:>2d} st", "time-onnx", n, cmd, out, t_env)

    def g2(n: int) -> Contender:
        out = work / "g2.npy"
        cmd = [vpy, str(Path(__file__).resolve()), "--diffusers-run", str(model), str(n), str(size), str(size),
               str(threads), str(out)]
        return Contender(f"G2 {n:>2d} st", "diffusers", n, cmd, out, py_env)

    def g1_all(n: int) -> Contender:  # information: ORT's full graph optimization, as diffusers loads its sessions
        c = g1(n)
        return Contender(f"G1' {n:>2d} st", ALL, n, c.cmd + ["--graph-opt", "all"], c.out, t_env)

    lo, hi = steps
    cs = [g1(lo), g1(hi), g2(lo), g2(hi)] + ([g1_all(lo), g1_all(hi)] if graph_all else [])
    say(f"== {name}: {model}, {size}×{size}, steps {lo} and {hi}")
    for c in cs:
        c.run(timed=False)
    for r in range(runs):
        say(f" round {r + 1}/{runs}")
        for c in cs:
            c.run(timed=True)

    # the same initial latents on both sides, at the low step count
    import numpy as np

    lat = work / "latents.npy"
    np.save(lat, np.random.RandomState(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32))
    say(f" same latents ({lat.name}, {lo} steps)")
    cs[0].run(timed=False, extra=["--latents", str(lat)])
    a = cs[0].last_image
    cs[2].run(timed=False, extra=[str(lat)])
    b = cs[2].last_image
    agree = float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else float("nan")
    say(f"  max |Δ| = {agree:.3g} (shapes {list(a.shape)}, {list(b.shape)})")
    return {"key": key, "name": name, "model": model, "size": size, "steps": steps,
            "c": {(c.tool, c.steps): c for c in cs}, "agree": agree, "agree_shapes": (a.shape, b.shape)}


# ======================================================================================
# report
# ======================================================================================
def ratio_row(target: str, a: float, b: float, limit: float, unit: str, fmt: str, per_round: list[float] | None,
              note: str = "") -> str:
    q = a / b
    rounds = f" (per round {min(per_round):.2f}–{max(per_round):.2f} ×)" if per_round else ""
    ok = q <= limit
    miss = "" if ok else f" (needs time-onnx ≤ {limit * b:{fmt}} {unit})"
    return (f"| {target} | {a:{fmt}} / {b:{fmt}} {unit} = **{q:.2f} ×**{rounds}{note} | {verdict(ok)}{miss} |")


def render(results: list[dict], facts: dict, command: str, runs: int, threads: int, build_s: float, tmp: Path,
           build_what: str) -> str:
    today = datetime.date.today().isoformat()
    extra_rounds = ", G1'(low), G1'(high)" if facts.get("graph_opt") not in (None, "all") else ""
    out = ["## generate", ""]
    out.append(f"Measured {today} with `{command}`; time-onnx built from {build_what}.")
    out.append("")
    out.append(f"Machine: {facts['nproc']} cores (`nproc`), {facts['cpu']} (flags: {facts['flags']}), {facts['mem']} RAM, "
               f"output folder `{tmp.relative_to(REPO) if tmp.is_relative_to(REPO) else tmp}` on {facts['fs']}, "
               f"Linux {facts['kernel']}; {facts['rustc']}; Python {facts['python']}, diffusers {facts['diffusers']}, "
               f"onnxruntime {facts['onnxruntime']} (time-onnx loads the same version's library), torch "
               f"{facts['torch']}, numpy {facts['numpy']}. The release build took {build_s:.1f} s before the runs. "
               f"Load average (1/5/15 min) {facts['load'][0]} before the runs, {facts['load'][1]} after; "
               f"{facts['quiet']} (other processes on the shared machine are not controlled, see the \"others' "
               f"CPU\" column).")
    out.append("")
    out.append(f"Method: both contenders use the same ONNX files, ONNX Runtime's CPU execution provider and "
               f"{threads} threads: diffusers gives every session {threads} intra-op threads; time-onnx "
               f"`--threads {threads}` runs the guided UNet batch as 2 concurrent runs of one session, one "
               f"per half (unconditional, text), each with {threads // 2} intra-op thread(s), and its other sessions "
               f"with {threads}; prompt \"{PROMPT}\", PNDM, guidance 7.5, empty "
               f"negative prompt, one image. Each contender runs at two step counts; PNDM makes N + 1 UNet calls "
               f"(batch 2: unconditional + text), so (T(high) − T(low)) / (calls(high) − calls(low)) is the time "
               f"of one denoising step with the fixed costs (process start, imports, loading the sessions, text "
               f"encoder, VAE decoder, writing) cancelled. Every contender × step count runs once untimed (page "
               f"cache warm), then {runs} timed rounds run G1(low), G1(high), G2(low), G2(high)"
               f"{extra_rounds} in turn; medians "
               f"are reported. Every run is its own process; before each, the previous output is deleted, `sync` "
               f"is called, and the script waits until the machine has been idle for 2 s (not timed). "
               f"\"Start → image written\" is the output file's mtime minus the wall-clock time just before the "
               f"process was spawned; \"exit\" is the wall time around the process (adds the teardown). Peak RSS "
               f"is GNU time's maximum resident set size (`/usr/bin/time -f %M`). \"Others' CPU\" is the machine's "
               f"busy CPU time during the run minus the contender's own. \"In-process generation\" is time-onnx's "
               f"own timer, printed with `-v` (\"N image(s) in X s\", 10 ms resolution; since ec579f0 it starts once "
               f"the prompt is embedded, the text encoder loaded, run and freed, and covers opening the UNet and VAE "
               f"sessions, denoising, decoding and writing the .npy; before, all sessions opened before it and it "
               f"covered the text encoder run) and, for diffusers, the time of `pipe(...)` + `np.save` measured "
               f"inside the child.")
    out.append("")
    if facts.get("graph_opt"):
        out.append(f"Graph optimization: diffusers' sessions use ONNX Runtime's default level (\"all\"); time-onnx "
                   f"uses its own default, `--graph-opt {facts['graph_opt']}` (G1). Where that differs from \"all\", "
                   f"G1' runs time-onnx with `--graph-opt all` in the same rounds, for information: the targets are "
                   f"judged on G1, time-onnx as it runs by default.")
        out.append("")
    out.append(f"- **G1** `time-onnx -v generate --model <M> --prompt \"{PROMPT}\" --steps N --height H --width W "
               f"--seed {SEED} --scheduler pndm --threads {threads} --device cpu --output-type npy -o <tmp>/x.npy` "
               "(the release binary built above; `-v` adds one line on stderr).")
    out.append("- **G2** a fresh `python` process: `import onnxruntime`, `from diffusers.pipelines.stable_diffusion "
               "import OnnxStableDiffusionPipeline`, `OnnxStableDiffusionPipeline.from_pretrained(<M>, "
               f"provider=\"CPUExecutionProvider\", sess_options=<intra_op_num_threads={threads}>, "
               "provider_options={})` (it also loads `vae_encoder/`, which generating does not use), "
               f"`pipe(prompt, height=H, width=W, num_inference_steps=N, generator=np.random.RandomState({SEED}), "
               "output_type=\"np\")`, `np.save`. Code: `diffusers_run()` in `scripts/bench_generate.py`. "
               "`provider_options={}` is needed: without it diffusers 0.39 passes `provider_options=[]`, "
               "onnxruntime rejects the pair (\"EP Error ... should be the same length\") and retries every "
               "session without them.")
    out.append("")
    for res in results:
        c = res["c"]
        lo, hi = res["steps"]
        size = res["size"]
        model = res["model"]
        dlo, dhi = (lo + 1, hi + 1)
        out.append(f"### {res['name']}: `{model.relative_to(REPO) if model.is_relative_to(REPO) else model}`, "
                   f"{size}×{size} (latents {size // 8}×{size // 8})")
        out.append("")
        out.append("| contender | steps (UNet calls) | start → image written, median (s) | runs (s) | exit, median "
                   "(s) | in-process generation, median (s) | CPU user+sys, median (s) | others' CPU, max (s) | "
                   "peak RSS, median (MiB) | image |")
        out.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
        tools = [("time-onnx", "G1: time-onnx"), ("diffusers", "G2: diffusers")]
        if (ALL, lo) in c:
            tools.append((ALL, "G1': time-onnx `--graph-opt all` (information)"))
        for tool, label in tools:
            for n in (lo, hi):
                x = c[(tool, n)]
                shapes = sorted({r.shape for r in x.runs})
                out.append(f"| {label} | {n} ({n + 1}) | {x.written:.3f} | "
                           f"{', '.join(f'{r.written:.3f}' for r in x.runs)} | {x.wall:.3f} | {x.gen:.3f} | "
                           f"{x.cpu:.2f} | {x.foreign:.2f} | {x.rss:,.0f} | "
                           f"{', '.join(str(list(s)) for s in shapes)} |")
        out.append("")
        g1l, g1h, g2l, g2h = c[("time-onnx", lo)], c[("time-onnx", hi)], c[("diffusers", lo)], c[("diffusers", hi)]
        dcalls = dhi - dlo
        # where the fixed time goes
        def fixed(x: Contender) -> float:  # start → image written minus the in-process generation, median of runs
            return x.med(lambda r: r.written - r.split["generate"])

        dsplit = {k: g2l.med(lambda r, k=k: r.split[k]) for k in ("imports", "load", "generate")}
        startup = g2l.med(lambda r: r.written - r.split["imports"] - r.split["load"] - r.split["generate"])
        out.append(f"Where the time goes at {lo} steps (medians over the runs, each part separately): time-onnx "
                   f"start → image written {g1l.written:.2f} s = {fixed(g1l):.2f} s before its timer starts "
                   f"+ {g1l.gen:.2f} s in it (see above for what the timer covers); diffusers {g2l.written:.2f} s "
                   f"= python start {startup:.2f} s + imports {dsplit['imports']:.2f} s + `from_pretrained` "
                   f"{dsplit['load']:.2f} s + generating {dsplit['generate']:.2f} s. Exit comes "
                   f"{g1l.wall - g1l.written:.2f} s (time-onnx) and {g2l.wall - g2l.written:.2f} s (diffusers) after "
                   f"the image is written.")
        out.append("")
        notes: list[str] = []
        out.append("| target | measured | verdict |")
        out.append("|---|---|---|")
        # per denoising step, measured inside the loop on both sides
        s1 = statistics.median(r.split["step_ms"] for x in (g1l, g1h) for r in x.runs)
        s2 = statistics.median(r.split["step_ms"] for x in (g2l, g2h) for r in x.runs)
        rounds_s = [a.split["step_ms"] / b.split["step_ms"] for a, b in zip(g1h.runs, g2h.runs)]
        out.append(ratio_row(f"per denoising step: time-onnx ≤ {TARGET_STEP} × diffusers; the median step inside "
                             f"the denoising loop (UNet call, guidance, scheduler step), over every run at both step "
                             f"counts", s1, s2, TARGET_STEP, "ms", ".1f", rounds_s, " (per round: the " f"{hi}-step runs)"))
        p1 = (g1h.written - g1l.written) / dcalls
        p2 = (g2h.written - g2l.written) / dcalls
        q1 = (g1h.gen - g1l.gen) / dcalls
        q2 = (g2h.gen - g2l.gen) / dcalls
        out.append(f"| (information) the same from whole runs, (T({hi}) − T({lo})) / {dcalls} calls | T = start → "
                   f"image written: {p1 * 1e3:.1f} / {p2 * 1e3:.1f} ms = {p1 / p2:.2f} ×; T = in-process generation: "
                   f"{q1 * 1e3:.1f} / {q2 * 1e3:.1f} ms = {q1 / q2:.2f} × | — |")
        notes.append(f"Per step: the primary figure is timed inside the denoising loop on both sides (time-onnx's "
                     f"`-v` line \"denoising steps: median … ms\", diffusers' pipeline `callback` at the end of every "
                     f"iteration, the same point), as the interval between the ends of consecutive steps; the first "
                     f"step is left out on both sides (time-onnx opens its UNet session on first use). The "
                     f"whole-run estimates assume the fixed costs of the {lo}- and {hi}-step runs are equal; measured "
                     f"(start → image written minus in-process generation, medians) they were time-onnx "
                     f"{fixed(g1l):.2f} s and {fixed(g1h):.2f} s, diffusers {fixed(g2l):.2f} s and {fixed(g2h):.2f} s, "
                     f"and their drift divided by {dcalls} calls is of the order of the difference being measured.")
        for n, a, b in ((lo, g1l, g2l), (hi, g1h, g2h)):
            rr = [x.written / y.written for x, y in zip(a.runs, b.runs)]
            out.append(ratio_row(f"start → image written, {n} steps: ≤ {TARGET_START} ×", a.written, b.written,
                                 TARGET_START, "s", ".2f", rr))
        for n, a, b in ((lo, g1l, g2l), (hi, g1h, g2h)):
            out.append(ratio_row(f"peak RSS, {n} steps: ≤ {TARGET_RSS} ×", a.rss, b.rss, TARGET_RSS, "MiB", ",.0f",
                                 None, f" (time-onnx max {max(r.r.rss_kb for r in a.runs) / 1024:,.0f} MiB)"))
        if (ALL, lo) in c:
            xl, xh = c[(ALL, lo)], c[(ALL, hi)]
            sa = statistics.median(r.split["step_ms"] for x in (xl, xh) for r in x.runs)
            out.append(f"| (information) G1' `--graph-opt all` vs G2: per step (inside the loop) | "
                       f"{sa:.1f} / {s2:.1f} ms = {sa / s2:.2f} × | — |")
            out.append(f"| (information) G1' vs G2: start → image written | {lo} steps {xl.written:.2f} / "
                       f"{g2l.written:.2f} s = {xl.written / g2l.written:.2f} ×; {hi} steps {xh.written:.2f} / "
                       f"{g2h.written:.2f} s = {xh.written / g2h.written:.2f} × | — |")
            out.append(f"| (information) G1' vs G2: peak RSS | {lo} steps {xl.rss:,.0f} / {g2l.rss:,.0f} MiB = "
                       f"{xl.rss / g2l.rss:.2f} ×; {hi} steps {xh.rss:,.0f} / {g2h.rss:,.0f} MiB = "
                       f"{xh.rss / g2h.rss:.2f} × | — |")
        shapes = {r.shape for x in (g1l, g1h, g2l, g2h) for r in x.runs}
        out.append(f"| same image shape | {', '.join(str(list(s)) for s in sorted(shapes))} | "
                   f"{verdict(len(shapes) == 1)} |")
        agree = res["agree"]
        if res["key"] == "full":
            ok = agree <= TARGET_AGREE
            out.append(f"| same supplied latents, {lo} steps: max abs difference ≤ {TARGET_AGREE:g} | "
                       f"{agree:.2e} | {verdict(ok)} |")
        else:
            out.append(f"| (information) same supplied latents, {lo} steps: max abs difference | {agree:.2e} | — |")
        out.append("")
        for n in notes:
            out.append(n)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


# ======================================================================================
# main
# ======================================================================================
def steps_pair(s: str) -> tuple[int, int]:
    a, b = (int(x) for x in s.split(","))
    if not 0 < a < b:
        raise argparse.ArgumentTypeError("want LOW,HIGH with 0 < LOW < HIGH")
    return a, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "third_party" / "sd14-random")
    ap.add_argument("--tiny", type=Path, default=REPO / "tests" / "fixtures" / "sd-tiny" / "diffusers-onnx")
    ap.add_argument("--full-size", type=int, default=256, help="image side for --model (default 256)")
    ap.add_argument("--tiny-size", type=int, default=128, help="image side for --tiny (default 128)")
    ap.add_argument("--full-steps", type=steps_pair, default=(2, 6), help="LOW,HIGH (default 2,6)")
    ap.add_argument("--tiny-steps", type=steps_pair, default=(5, 25), help="LOW,HIGH (default 5,25)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per contender and step count (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads on both sides (default 2)")
    ap.add_argument("--tmp", type=Path, default=REPO / "third_party" / "bench-generate-tmp",
                    help="scratch folder for the outputs (default third_party/bench-generate-tmp)")
    ap.add_argument("--rev", help="build time-onnx from this commit (git archive) instead of the working tree")
    ap.add_argument("--skip-tiny", action="store_true", help="only the full-size model")
    ap.add_argument("--skip-full", action="store_true", help="only the tiny model")
    ap.add_argument("--no-graph-opt-all", action="store_true",
                    help="do not add the information-only runs of time-onnx with --graph-opt all")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating BENCHMARKS.md")
    args = ap.parse_args()
    command = "python3 scripts/bench_generate.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    model, tiny, tmp = args.model.resolve(), args.tiny.resolve(), args.tmp.resolve()

    if not args.skip_full and not (model / "unet" / "weights.pb").exists():
        say(f"{model} missing: building it with scripts/make_full_size_model.py")
        subprocess.check_call([sys.executable, str(REPO / "scripts" / "make_full_size_model.py"), "--out", str(model)])
    binary, build_what, build_s = build_time_onnx(args.rev)
    graph_default = graph_opt_default(binary)
    graph_all = graph_default is not None and graph_default != "all" and not args.no_graph_opt_all
    say(f"time-onnx --graph-opt default: {graph_default or '(no such option)'}"
        f"{'; also measuring --graph-opt all (information)' if graph_all else ''}")

    tmp.mkdir(parents=True, exist_ok=True)
    load_before = loadavg()
    results = []
    try:
        if not args.skip_full:
            results.append(bench_model("full", "full size (SD 1.4 architecture, random weights, fp32)", model,
                                       args.full_size, args.full_steps, tmp, args.runs, args.threads, binary,
                                       graph_all))
        if not args.skip_tiny:
            results.append(bench_model("tiny", "tiny (sd-tiny fixture)", tiny, args.tiny_size, args.tiny_steps, tmp,
                                       args.runs, args.threads, binary, graph_all))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    facts = machine_facts(tmp.parent, ("onnxruntime", "numpy", "diffusers", "torch"))
    facts["quiet"] = quiet_summary()
    facts["load"] = (load_before, loadavg())
    raw = [{"model": str(r["model"]), "size": r["size"], "steps": r["steps"], "agree": r["agree"],
            "runs": {f"{t} {n}": [{"written": x.written, "exit": x.r.wall, "cpu": x.r.cpu, "others": x.r.foreign,
                                   "rss_kb": x.r.rss_kb, "split": x.split, "shape": x.shape} for x in c.runs]
                     for (t, n), c in r["c"].items()}} for r in results]
    raw_path = RAW.with_name(RAW.stem + "-no-write.json") if args.no_write else RAW
    raw_path.write_text(json.dumps({"command": command, "build": build_what, "facts": facts, "results": raw},
                                   indent=1))
    say(f"raw measurements in {raw_path}")
    facts["graph_opt"] = graph_default
    section = render(results, facts, command, args.runs, args.threads, build_s, tmp, build_what)
    print()
    print(section)
    if not args.no_write:
        write_section("generate", section)
        say(f"wrote the 'generate' section of {_venv.REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
