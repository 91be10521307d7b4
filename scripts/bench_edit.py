#!/usr/bin/env python3
"""Benchmark `time-onnx edit` against a plain copy and against the Python route; write BENCHMARKS.md "## edit".

    python3 scripts/bench_edit.py [--rev REV] [--model DIR] [--tiny DIR] [--runs 3] [--tmp DIR] [--no-write]

Contenders, side by side on the same input files, each in its own process:
  (A)  cp -r <model>/unet <tmp>/unet_copy                       the floor for a standalone output
  (A') cp -r <model>/unet <tmp>/unet_copy && sync <copied files>  (information only: the same copy, flushed
                                                                 to disk; time-onnx up to bf62d7a fsynced its output)
  (B)  <release binary> time-onnx edit <model>/unet/model.onnx --src "A pack of roses" --dst "A pack of blue roses"
           -o <tmp>/out/model.onnx
  (C)  the Python route: a fresh python process doing transformers' CLIPTokenizer + the text encoder through
       onnxruntime (4 augmented pairs, one batch), the TIME solve in numpy, onnx.load (external data),
       32 K/V initializers replaced through numpy_helper, onnx.save_model into one weights.pb.
  (D)  <release binary> time-onnx edit --model <model> --src ... --dst ... --save-operator <tmp>/op.safetensors
           the edit as an operator only: no UNet read or written (text encoder, solve, fingerprint, file)
  (F)  ONNX Runtime in a fresh python process: create the text encoder session (the graph optimization level
       and intra-op threads time-onnx's D uses: "extended", one thread per core) and run one batch of 8 prompts,
       timed inside the process around those two calls only (the floor of D's text encoder stage)
  (G)  numpy's bare sgemm of the apply's shapes (Aᵀ [d, d] @ Wᵀ [d, C] in float32 for every K/V initializer of
       the UNet), timed inside a fresh python process with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (they
       slow a current numpy), the OpenBLAS kernel it used recorded through threadpoolctl
  (E)  (B) with --dry-run: everything but the write. Since time-onnx copies the UNet's bulk in a background
       thread while the text encoder and the solve run, B's own stage times are those of stages sharing the
       two cores with the copy; E gives them alone: the text encoder's time subtracted from B, and
       "solve + apply".

Method: `cargo build --release` first (of the working tree; with --rev REV, of that commit exported by
`git archive` into third_party/bench-edit-build/, with its own target folder, so work in progress in the
shared tree is neither measured nor disturbed); then every contender runs once untimed (warms the page cache),
then `--runs` timed rounds, each round running A, A', B, C, D, E, F, G in turn; the median is reported. Before
every run the previous output is deleted, `sync` is called, and the script waits for 2 idle seconds on
the machine (none of it timed), so no run pays for another's write-back. Wall time is measured around the
process; peak RSS comes from GNU time (/usr/bin/time -f %M; wait4()'s ru_maxrss as a fallback); the
CPU time other processes used during each run is recorded (the machine is shared). B, D and E run with
-v, which prints their stage split (one line on stderr); the medians of each stage over the rounds are
reported.

Models: --model (default third_party/sd14-random, built by scripts/make_full_size_model.py when missing)
and --tiny (default tests/fixtures/sd-tiny/diffusers-onnx), both in diffusers' convert-script layout.

Like scripts/make_fixtures.py, the script runs inside third_party/venv-fixtures (created when missing;
scripts/_venv.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _venv  # scripts/_venv.py: own venv (third_party/venv-fixtures), re-exec inside it

REPO = _venv.REPO
VENV = _venv.VENV

if __name__ == "__main__":
    _venv.bootstrap(__file__, hf_env=False)  # the children get their environment explicitly

import argparse  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from _bench import (ANSI_RE, BENCH_MD, Result, build_time_onnx, binary_env, loadavg,  # noqa: E402
                    machine_facts, quiet_summary, rm, run_measured, say, verdict, wait_quiet, write_section)

SRC = "A pack of roses"
DST = "A pack of blue roses"
LAMBDA = 0.1
AUGS = ["A photo of ", "An image of ", "A picture of "]  # diffusers' AUGS_CONST


def augmented_prompts() -> tuple[list[str], list[str]]:
    """SRC's and DST's prompts with TIME's augmentations, as diffusers'
    StableDiffusionModelEditingPipeline.edit_model builds them."""
    def base(t: str) -> str:
        return "a" + t[1:] if t[:1] == "A" else t
    return [SRC] + [a + base(SRC) for a in AUGS], [DST] + [a + base(DST) for a in AUGS]


def time_alignment(tok, old_texts: list[str], new_texts: list[str]) -> list[list[int]]:
    """diffusers' edit_model alignment: for each pair, the destination position of every source position (77)."""
    a_id = tok.encode("a ")[1]
    maps = []
    for old_text, new_text in zip(old_texts, new_texts):
        tokens_a = [a_id if tok.decode(t) == "an" else t for t in tok(old_text).input_ids]
        tokens_b = [a_id if tok.decode(t) == "an" else t for t in tok(new_text).input_ids]
        idxs, j = [], 0
        for t in tokens_a:
            while tokens_b[j] != t:
                j += 1
            idxs.append(j)
            j += 1
        while j < 77:
            idxs.append(j)
            j += 1
        while len(idxs) < 77:
            idxs.append(76)
        maps.append(idxs)
    return maps


def time_operator_t(old_embs, new_embs, maps):
    """TIME in float64: Aᵀ for A = (λI + Σ c* cᵀ)(λI + Σ c cᵀ)⁻¹ over all 77 positions of every pair
    (W' = W A, i.e. W'ᵀ = Aᵀ Wᵀ); old_embs and new_embs [pairs, 77, d]."""
    import numpy as np
    c = old_embs.reshape(-1, old_embs.shape[-1])
    c_star = np.concatenate([new_embs[p][maps[p]] for p in range(len(maps))])
    d = c.shape[1]
    m2 = LAMBDA * np.eye(d) + c.T @ c
    m1 = LAMBDA * np.eye(d) + c_star.T @ c
    return (m1 @ np.linalg.inv(m2)).T


# ======================================================================================
# (C) the Python route, run as `bench_edit.py --python-route UNET OUTDIR` in a fresh process
# ======================================================================================
def python_route(unet_path: str, out_dir: str) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from transformers import CLIPTokenizer

    unet_path = Path(unet_path)
    model_dir = unet_path.parent.parent
    tok = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))

    old_texts, new_texts = augmented_prompts()

    # text encoder, one batch of all 8 prompts
    ids = tok(old_texts + new_texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="np").input_ids
    sess = ort.InferenceSession(str(model_dir / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dt = np.int32 if inp.type == "tensor(int32)" else np.int64
    emb = sess.run(None, {inp.name: ids.astype(dt)})[0].astype(np.float64)
    n = len(old_texts)
    old_embs, new_embs = emb[:n], emb[n:]

    at = time_operator_t(old_embs, new_embs, time_alignment(tok, old_texts, new_texts))

    # the UNet: load everything, replace the K/V initializers, save as diffusers' layout
    model = onnx.load(str(unet_path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    kv = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[0] == "encoder_hidden_states" and node.input[1] in inits:
            kv.append(node.input[1])
    for name in kv:
        t = inits[name]
        w = numpy_helper.to_array(t)                       # Wᵀ [d, C]
        new = (at @ w.astype(np.float64)).astype(w.dtype)
        t.CopyFrom(numpy_helper.from_array(new, name))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.pb")
    print(f"python route: replaced {len(kv)} K/V initializers; wrote {out / 'model.onnx'}")


# ======================================================================================
# (F) ONNX Runtime alone, run as `bench_edit.py --ort-text-encoder MODEL_DIR`
# (G) numpy's sgemm of the apply, run as `bench_edit.py --numpy-sgemm UNET`
# ======================================================================================
def ort_text_encoder(model_dir: str) -> None:
    import numpy as np
    import onnxruntime as ort

    path = Path(model_dir) / "text_encoder" / "model.onnx"
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1  # ONNX Runtime's own default, as time-onnx leaves it
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    inp = sess.get_inputs()[0]
    dt = np.int32 if inp.type == "tensor(int32)" else np.int64
    ids = np.full((8, 77), 49407, dtype=dt)  # CLIP's end-of-text padding; the values do not change the cost
    ids[:, 0] = 49406
    ids[:, 1:6] = 320
    sess.run(None, {inp.name: ids})
    t2 = time.perf_counter()
    print(f"ort: create_s={t1 - t0:.4f} run_s={t2 - t1:.4f} threads={so.intra_op_num_threads} level=extended")


def kv_shapes(unet: Path) -> list[tuple[int, int]]:
    """Shapes of the K/V initializers (Wᵀ, [d, C]) of an SD UNet: MatMuls fed by encoder_hidden_states."""
    import onnx

    model = onnx.load(str(unet), load_external_data=False)
    dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [dims[n.input[1]] for n in model.graph.node
            if n.op_type == "MatMul" and n.input[0] == "encoder_hidden_states" and n.input[1] in dims]


def numpy_sgemm(unet: str) -> None:
    import numpy as np
    from threadpoolctl import threadpool_info

    shapes = kv_shapes(Path(unet))
    d = shapes[0][0]
    rng = np.random.default_rng(0)
    at = rng.standard_normal((d, d), dtype=np.float32)
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    outs = [np.empty_like(w) for w in ws]
    times = []
    for _ in range(7):  # the first is a warm-up
        t = time.perf_counter()
        for w, o in zip(ws, outs):
            np.matmul(at, w, out=o)
        times.append(time.perf_counter() - t)
    blas = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    kernel = f"{blas[0].get('architecture')}, {blas[0].get('num_threads')} threads" if blas else "not OpenBLAS"
    med = statistics.median(times[1:])
    print(f"sgemm: ms={med * 1e3:.2f} matrices={len(shapes)} d={d} kernel={kernel}")


# ======================================================================================
# measurement
# ======================================================================================
class Contender:
    def __init__(self, key: str, label: str, cmd: list[str], out: Path, mkdir: Path | None = None,
                 env: dict | None = None):
        self.key, self.label, self.cmd, self.out, self.mkdir, self.env = key, label, cmd, out, mkdir, env
        self.runs: list[Result] = []
        self.splits: list[dict[str, float]] = []

    def median_stage(self, *names: str) -> float:
        """Median over the timed runs of the sum of these stages (ms)."""
        return statistics.median(sum(sp.get(n, 0.0) for n in names) for sp in self.splits)

    def prepare(self) -> None:
        rm(self.out)
        if self.mkdir is not None:
            self.mkdir.mkdir(parents=True, exist_ok=True)
        os.sync()
        if wait_quiet() >= 120.0:
            say("    (the machine did not go quiet within 120 s; running anyway)")

    def run(self, timed: bool) -> Result:
        self.prepare()
        r = run_measured(self.cmd, self.env)
        if r.rc != 0:
            raise SystemExit(f"{self.label} failed (exit {r.rc}):\n{r.stdout}\n{r.stderr}")
        produced = sum(f.stat().st_size for f in self.out.rglob("*") if f.is_file()) if self.out.is_dir() \
            else self.out.stat().st_size if self.out.exists() else 0
        if timed:
            self.runs.append(r)
            if "-v" in self.cmd:
                self.splits.append(parse_split(r.stderr)[1])
        say(f"  {self.key:<3s} {'timed ' if timed else 'warmup'} {r.wall:7.2f} s  (CPU {r.cpu:6.2f} s, others "
            f"{r.foreign:5.2f} s)  peak RSS {r.rss_kb / 1024:7.0f} MiB  (output {produced / 2**20:.0f} MiB)")
        rm(self.out)
        return r

    @property
    def median_wall(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    @property
    def min_wall(self) -> float:
        return min(r.wall for r in self.runs)

    @property
    def max_foreign(self) -> float:
        return max(r.foreign for r in self.runs)

    @property
    def median_cpu(self) -> float:
        return statistics.median(r.cpu for r in self.runs)

    @property
    def median_rss(self) -> float:
        return statistics.median(r.rss_kb for r in self.runs) / 1024

    @property
    def max_rss(self) -> float:
        return max(r.rss_kb for r in self.runs) / 1024


TIMINGS_RE = re.compile(r"timings: (.*)")


def inproc_s(stdout: str, tag: str) -> float:
    """The in-process time a child printed: F's create + run in seconds, G's sgemm in milliseconds."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith(tag + ":"))
    kv = dict(item.split("=", 1) for item in line.split(": ", 1)[1].split(" ") if "=" in item)
    return float(kv["create_s"]) + float(kv["run_s"]) if tag == "ort" else float(kv["ms"])


def last_line(x) -> str:
    return x.runs[-1].stdout.strip().splitlines()[-1]


def parse_split(stderr: str) -> tuple[str, dict[str, float]]:
    text = ANSI_RE.sub("", stderr)
    m = TIMINGS_RE.search(text)
    if not m:
        raise SystemExit(f"no 'timings:' line in time-onnx -v stderr:\n{text}")
    line = m.group(0).strip()
    parts = {}
    for item in m.group(1).split(", "):
        name, ms, unit = item.rsplit(" ", 2)
        assert unit == "ms", item
        parts[name] = float(ms)
    return line, parts


def bench_model(key: str, name: str, model: Path, tmp: Path, runs: int, binary: Path) -> dict:
    unet = model / "unet" / "model.onnx"
    work = tmp / key
    rm(work)
    work.mkdir(parents=True)
    vpy = str(VENV / "bin" / "python")
    py_env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
                  TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    b_cmd = [str(binary), "-v", "edit", str(unet), "--src", SRC, "--dst", DST, "-o", str(work / "out" / "model.onnx")]
    b_env = binary_env(binary)
    d_cmd = [str(binary), "-v", "edit", "--model", str(model), "--src", SRC, "--dst", DST, "--save-operator",
             str(work / "op.safetensors")]
    e_cmd = [str(binary), "-v", "edit", str(unet), "--src", SRC, "--dst", DST, "--dry-run"]
    me = str(Path(__file__).resolve())
    sgemm_env = {k: v for k, v in py_env.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    unet_files = sorted(p.name for p in (model / "unet").iterdir())
    contenders = [
        Contender("A", "cp -r", ["cp", "-r", str(model / "unet"), str(work / "unet_copy")], work / "unet_copy"),
        Contender("A'", "cp -r + sync", ["sh", "-c", 'cp -r "$1" "$2" && cd "$2" && shift 2 && sync "$@"', "sh",
                                         str(model / "unet"), str(work / "unet_copy"), *unet_files],
                  work / "unet_copy"),
        Contender("B", "time-onnx edit", b_cmd, work / "out", mkdir=work / "out", env=b_env),
        Contender("C", "Python route", [vpy, str(Path(__file__).resolve()), "--python-route", str(unet),
                                        str(work / "py_out")], work / "py_out", env=py_env),
        Contender("D", "time-onnx edit --save-operator", d_cmd, work / "op.safetensors", env=b_env),
        Contender("E", "time-onnx edit --dry-run", e_cmd, work / "nothing", env=b_env),
        Contender("F", "ONNX Runtime (Python): text encoder session + one run", [vpy, me, "--ort-text-encoder",
                                                                                 str(model)], work / "nothing",
                  env=py_env),
        Contender("G", "numpy sgemm of the apply's shapes", [vpy, me, "--numpy-sgemm", str(unet)], work / "nothing",
                  env=sgemm_env),
    ]
    say(f"== {name}: {model} (UNet folder {sum(f.stat().st_size for f in (model / 'unet').iterdir()) / 2**20:.0f} MiB)")
    for c in contenders:
        c.run(timed=False)
    for r in range(runs):
        say(f" round {r + 1}/{runs}")
        for c in contenders:
            c.run(timed=True)
    b, d = contenders[2], contenders[4]
    stdout_b = re.sub(r"; wrote .*", "", ANSI_RE.sub("", b.runs[-1].stdout).strip())
    stdout_d = re.sub(r" written to .*", "", ANSI_RE.sub("", d.runs[-1].stdout).strip())
    return {"key": key, "name": name, "model": model, "contenders": {c.key: c for c in contenders},
            "b_stdout": stdout_b, "d_stdout": stdout_d, "c_stdout": contenders[3].runs[-1].stdout.strip()}


# ======================================================================================
# report
# ======================================================================================
def render(results: list[dict], facts: dict, command: str, runs: int, build_s: float, tmp: Path,
           build_what: str) -> str:
    today = datetime.date.today().isoformat()
    out = ["## edit", ""]
    out.append(f"Measured {today} with `{command}`; time-onnx built from {build_what}.")
    out.append("")
    out.append(f"Machine: {facts['nproc']} cores (`nproc`), {facts['cpu']} (flags: {facts['flags']}), {facts['mem']} RAM, "
               f"output folder `{tmp.relative_to(REPO) if tmp.is_relative_to(REPO) else tmp}` on {facts['fs']}, "
               f"Linux {facts['kernel']}; {facts['rustc']}; Python {facts['python']}, onnx {facts['onnx']}, "
               f"onnxruntime {facts['onnxruntime']}, numpy {facts['numpy']}. The release build took "
               f"{build_s:.1f} s before the runs. Load average (1/5/15 min) {facts['load'][0]} before the runs, "
               f"{facts['load'][1]} after; {facts['quiet']} (other processes on the shared machine are not "
               f"controlled, see the \"others' CPU\" column).")
    out.append("")
    out.append(f"Method: each contender runs once untimed (page cache warm), then {runs} timed rounds run A, A', B, C, D, E, F, G "
               "in turn; medians are reported. Every run is its own process; before each, the previous output is "
               "deleted, `sync` is called, and the script waits until the machine has been idle for 2 s (at most "
               "120 s; none of this is timed). Wall time is measured around the process, peak RSS is "
               "GNU time's maximum resident set size (`/usr/bin/time -f %M`). \"Others' CPU\" is the machine's busy CPU "
               "time (`/proc/stat`) during the run minus the contender's own: work of other processes (the "
               "machine is shared), kernel threads (write-back, memory reclaim) included. The page cache is not dropped: inputs are read from "
               "memory in every run.")
    out.append("")
    out.append("- **A** `cp -r <model>/unet <tmp>/unet_copy`: the floor for a standalone output.")
    out.append("- **A'** the same copy followed by `sync <copied files>` (fsync). Information only: the floor "
               "for a copy that is flushed to disk, the comparison for versions of time-onnx that fsync their "
               "output before renaming it into place (up to bf62d7a; a68c11a dropped the fsync).")
    out.append(f"- **B** `time-onnx edit <model>/unet/model.onnx --src \"{SRC}\" --dst \"{DST}\" "
               "-o <tmp>/out/model.onnx` (the release binary built above), end to end.")
    out.append("- **C** the Python route, a fresh `python` process: transformers `CLIPTokenizer`, the text encoder "
               "through onnxruntime (4 augmented pairs, one batch of 8), the TIME solve in numpy (float64, all 77 "
               "positions), `onnx.load(..., load_external_data=True)`, the K/V initializers (MatMuls fed by "
               "`encoder_hidden_states`) replaced through `numpy_helper`, `onnx.save_model(..., "
               "save_as_external_data=True, all_tensors_to_one_file=True, location=\"weights.pb\")`. "
               "Code: `python_route()` in `scripts/bench_edit.py`.")
    out.append(f"- **D** `time-onnx edit --model <model> --src \"{SRC}\" --dst \"{DST}\" --save-operator "
               "<tmp>/op.safetensors`: the edit as an operator (the d×d matrix A, for `generate --edit`), no UNet "
               "read or written: tokenizer, text encoder run, solve, SHA-256 fingerprint of the text encoder's "
               "weights, operator file.")
    out.append("- **E** B with `--dry-run`: everything but the write. time-onnx copies the UNet's bulk in a "
               "background thread, started once the prompts are tokenized and aligned, while the text encoder, the "
               "solve and the apply run; B's own stage times are therefore those of stages sharing the two cores "
               "with the copy. E gives each stage alone: its text encoder time is what is subtracted from B, and "
               "its solve + apply is the figure for that target.")
    out.append("- **F** ONNX Runtime from Python, a fresh process: `InferenceSession` of the text encoder (graph "
               "optimization \"extended\" and one intra-op thread per core, as time-onnx's D) and one run of a "
               "batch of 8 prompts, timed inside the process around those two calls: what D's text encoder stage "
               "costs at best. Code: `ort_text_encoder()`.")
    out.append("- **G** numpy's float32 matmul of the apply's shapes, Aᵀ [d, d] @ Wᵀ [d, C] for every K/V "
               "initializer, median of 6 timed passes in a fresh process with `OPENBLAS_CORETYPE` and "
               "`OPENBLAS_L2_SIZE` unset; the OpenBLAS kernel (threadpoolctl) is printed. Code: `numpy_sgemm()`.")
    out.append("")
    out.append("B, D and E run with `-v`, which prints the time of each stage on one line of stderr; the tables "
               "give each stage's median over the timed runs.")
    out.append("")
    for r in results:
        c = r["contenders"]
        out.append(f"### {r['name']}: `{r['model'].relative_to(REPO) if r['model'].is_relative_to(REPO) else r['model']}`")
        out.append("")
        size = sum(f.stat().st_size for f in (r["model"] / "unet").iterdir())
        out.append(f"UNet folder: {size / 2**20:,.1f} MiB. B printed: \"{r['b_stdout'].splitlines()[-1] if r['b_stdout'] else ''}\"; "
                   f"C printed: \"{r['c_stdout'].splitlines()[-1].split(';')[0] if r['c_stdout'] else ''}\".")
        out.append("")
        out.append(f"| contender | median wall (s) | runs (s) | min (s) | CPU user+sys, median (s) | others' CPU during a "
                   f"run, max (s) | peak RSS, median (MiB) |")
        out.append("|---|---:|---|---:|---:|---:|---:|")
        for k in ("A", "A'", "B", "C", "D", "E", "F", "G"):
            x = c[k]
            runs_s = ", ".join(f"{q.wall:.3f}" for q in x.runs)
            out.append(f"| {k}: {x.label} | {x.median_wall:.3f} | {runs_s} | {x.min_wall:.3f} | {x.median_cpu:.2f} | {x.max_foreign:.2f} | "
                       f"{x.median_rss:,.0f} |")
        out.append("")
        stages = ["read UNet", "tokenize", "text encoder", "solve", "save operator", "apply", "write"]

        def split_line(x) -> str:
            names = [n for n in stages if any(n in sp for sp in x.splits)]
            return ", ".join(f"{n} {x.median_stage(n):.0f} ms" for n in names)

        te_s = c["E"].median_stage("text encoder") / 1e3
        b_wall, a_wall, ap_wall, c_wall = c["B"].median_wall, c["A"].median_wall, c["A'"].median_wall, c["C"].median_wall
        b_minus_te = b_wall - te_s
        out.append("Stages, medians over the timed runs (`-v`):")
        out.append("")
        for k in ("B", "D", "E"):
            out.append(f"- {k}: {split_line(c[k])}")
        out.append("")
        out.append(f"D printed: \"{r['d_stdout'].splitlines()[-1] if r['d_stdout'] else ''}\".")
        out.append("")
        if r["key"] == "full":
            out.append("| target | measured | verdict |")
            out.append("|---|---|---|")
            ratio_a = b_minus_te / a_wall
            per_round_a = [(br.wall - te_s) / ar.wall for br, ar in zip(c["B"].runs, c["A"].runs)]
            out.append(f"| (B − text encoder of E) ≤ 1.2 × A | ({b_wall:.2f} − {te_s:.2f}) / {a_wall:.2f} = "
                       f"**{ratio_a:.2f} ×** (per round {min(per_round_a):.2f}–{max(per_round_a):.2f} ×) | "
                       f"{verdict(ratio_a <= 1.2)}"
                       f"{'' if ratio_a <= 1.2 else f' by {ratio_a / 1.2:.2f} × ({b_minus_te - 1.2 * a_wall:.2f} s over)'} |")
            out.append(f"| (information) (B − text encoder) vs A' (copy + fsync) | {b_minus_te:.2f} / {ap_wall:.2f} = "
                       f"{b_minus_te / ap_wall:.2f} × | — |")
            out.append(f"| (information) the same two ratios from the fastest runs | (B − text encoder) / A = "
                       f"{(c['B'].min_wall - te_s) / c['A'].min_wall:.2f} ×; C / B = "
                       f"{c['C'].min_wall / c['B'].min_wall:.2f} × | — |")
            speed = c_wall / b_wall
            per_round = [cr.wall / br.wall for cr, br in zip(c["C"].runs, c["B"].runs)]
            out.append(f"| B ≥ 5 × faster than C | {c_wall:.2f} / {b_wall:.2f} = **{speed:.2f} ×** (per round "
                       f"{min(per_round):.2f}–{max(per_round):.2f} ×) | "
                       f"{verdict(speed >= 5)}{'' if speed >= 5 else f' (needs B ≤ {c_wall / 5:.2f} s)'} |")
            rss = c["B"].max_rss
            out.append(f"| peak RSS of B < 1 GB (1024 MiB) | max over timed runs {rss:,.0f} MiB (C: "
                       f"{c['C'].median_rss:,.0f} MiB) | {verdict(rss < 1024)} |")
            f_in = [inproc_s(x.stdout, "ort") for x in c["F"].runs]
            f_s = statistics.median(f_in)
            d_wall = c["D"].median_wall
            d_ratio = d_wall / f_s
            out.append(f"| D ≤ 1.2 × F (ONNX Runtime in Python: text encoder session + one batch-8 run, in-process) | "
                       f"{d_wall:.2f} / {f_s:.2f} = **{d_ratio:.2f} ×** (F runs "
                       f"{', '.join(f'{v:.2f}' for v in f_in)} s; {last_line(c['F'])}) | {verdict(d_ratio <= 1.2)}"
                       f"{'' if d_ratio <= 1.2 else f' (needs D ≤ {1.2 * f_s:.2f} s)'} |")
            g_ms = statistics.median(inproc_s(x.stdout, "sgemm") for x in c["G"].runs)
            apply_ms = c["E"].median_stage("apply")
            g_ratio = apply_ms / g_ms
            out.append(f"| apply ≤ 1.1 × G (numpy's sgemm of the same shapes) | E's apply {apply_ms:.0f} ms / "
                       f"{g_ms:.0f} ms = **{g_ratio:.2f} ×** ({last_line(c['G'])}) | {verdict(g_ratio <= 1.1)} |")
            sa = c["E"].median_stage("solve", "apply")
            sa_runs = ", ".join(f"{sp['solve'] + sp['apply']:.0f}" for sp in c["E"].splits)
            sa_b = c["B"].median_stage("solve", "apply")
            out.append(f"| (information, the earlier absolute bar) solve + apply to all 32 K/V matrices (d = 768) < "
                       f"150 ms | E: {sa:.0f} ms (median of \"solve\" + \"apply\"; runs {sa_runs} ms) | — |")
            out.append(f"| (information) the same within B, sharing the cores with the copy | {sa_b:.0f} ms | — |")
            d_max = max(x.wall for x in c["D"].runs)
            out.append(f"| (information, the earlier absolute bar) D end to end < 2 s | median {d_wall:.2f} s (runs "
                       f"{', '.join(f'{x.wall:.2f}' for x in c['D'].runs)}; slowest {d_max:.2f} s); B − D = "
                       f"{b_wall - d_wall:.2f} s is what the UNet costs | — |")
            out.append("")
        else:
            out.append(f"Ratios (no targets for this model; A takes a few ms, so the first ratio measures fixed costs): "
                       f"(B − text encoder) / A = {b_minus_te / a_wall:.1f} ×; C / B = {c_wall / b_wall:.2f} ×; "
                       f"peak RSS B {c['B'].max_rss:,.0f} MiB, C {c['C'].median_rss:,.0f} MiB; D (operator) "
                       f"{c['D'].median_wall:.3f} s, {c['D'].max_rss:,.0f} MiB.")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


# ======================================================================================
# main
# ======================================================================================
def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--python-route":
        python_route(sys.argv[2], sys.argv[3])
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--ort-text-encoder":
        ort_text_encoder(sys.argv[2])
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--numpy-sgemm":
        numpy_sgemm(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "third_party" / "sd14-random")
    ap.add_argument("--tiny", type=Path, default=REPO / "tests" / "fixtures" / "sd-tiny" / "diffusers-onnx")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per contender (default 3)")
    ap.add_argument("--tmp", type=Path, default=REPO / "third_party" / "bench-edit-tmp",
                    help="scratch folder for the outputs (default third_party/bench-edit-tmp)")
    ap.add_argument("--rev", help="build time-onnx from this commit (git archive) instead of the working tree")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating BENCHMARKS.md")
    args = ap.parse_args()
    command = "python3 scripts/bench_edit.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    model, tiny, tmp = args.model.resolve(), args.tiny.resolve(), args.tmp.resolve()

    if not (model / "unet" / "weights.pb").exists():
        say(f"{model} missing: building it with scripts/make_full_size_model.py")
        subprocess.check_call([sys.executable, str(REPO / "scripts" / "make_full_size_model.py"), "--out", str(model)])
    binary, build_what, build_s = build_time_onnx(args.rev)

    tmp.mkdir(parents=True, exist_ok=True)
    load_before = loadavg()
    results = []
    try:
        results.append(bench_model("full", "full size (SD 1.4 architecture, random weights, fp32)", model, tmp, args.runs, binary))
        results.append(bench_model("tiny", "tiny (sd-tiny fixture)", tiny, tmp, args.runs, binary))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    facts = machine_facts(tmp.parent)
    facts["quiet"] = quiet_summary()
    facts["load"] = (load_before, loadavg())
    section = render(results, facts, command, args.runs, build_s, tmp, build_what)
    print()
    print(section)
    if not args.no_write:
        write_section("edit", section)
        say(f"wrote the 'edit' section of {BENCH_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
