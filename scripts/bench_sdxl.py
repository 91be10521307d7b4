#!/usr/bin/env python3
"""Benchmark `time-onnx edit` and `generate` on a full-size SDXL; write BENCHMARKS.md "## SDXL".

    python3 scripts/bench_sdxl.py [--model DIR] [--runs 3] [--gen-runs 2] [--steps 4] [--size 256]
                                  [--threads 2] [--tmp DIR] [--skip-edit] [--skip-generate] [--no-write]

The model (default third_party/sdxl-random, built by scripts/make_full_size_sdxl.py: SDXL base's architecture,
random weights, fp32 text encoders, fp16 UNet with external data) is what `optimum-cli export onnx` writes.

Edit contenders, each in its own process, side by side on the same files:
  (A)  cp -r <model>/unet <tmp>/unet_copy                      the floor for a standalone output
  (B)  time-onnx -v edit <unet> --src "A pack of roses" --dst "A pack of blue roses" -o <tmp>/out/model.onnx
  (C)  the Python route: transformers' two CLIPTokenizers, both text encoders through onnxruntime (penultimate
       hidden states concatenated, 4 augmented pairs in one batch each), TIME's alignment and solve in numpy
       float64, onnx.load (external data), every K/V initializer (MatMul fed by encoder_hidden_states) replaced
       through numpy_helper, onnx.save_model with external data
  (D)  time-onnx -v edit --model <model> ... --save-operator <tmp>/op.safetensors   (no UNet read or written)
  (T)  onnxruntime alone in a fresh python process: both text encoder sessions created and run on one batch of
       8 prompts: the text encoders' own footprint (peak RSS) that the edit's peak RSS is held against
  (E)  (B) with --dry-run: the stage times without the background copy sharing the cores
Bars (issue 16): (B − its text encoder stage) ≤ 1.2 × A; C ≥ 5 × B; peak RSS of B ≤ peak RSS of T + 0.5 GiB.
With --skip-edit or --skip-generate the section is printed, not written: it holds both halves and notes by hand.

Generate contenders, one after the other (both may not fit in memory side by side), same files and threads:
  (G1) time-onnx -v generate --model <model> --prompt "A pack of roses" --steps N --height S --width S --seed 1
           --threads <threads> --device cpu --output-type npy -o <tmp>/x.npy
  (G2) a fresh python process: optimum's ORTStableDiffusionXLPipeline.from_pretrained(<model>,
       provider="CPUExecutionProvider", session_options=<intra-op threads>), pipe(prompt, height=S, width=S,
       num_inference_steps=N, guidance_scale=5.0, output_type="np"), np.save
Per step: the median time between the ends of consecutive denoising steps (time-onnx's -v line; optimum's
`callback_on_step_end` timestamps); start → image: the output file's mtime minus the time just before the process
was spawned. Bars (issue 16): per step ≤ 1.0 × optimum; start → image ≤ 0.7 × optimum.

Method: `cargo build --release` first; every contender once untimed, then --runs (--gen-runs) timed rounds; medians.
Before every run the output is deleted, `sync` is called and the script waits for 2 idle seconds. Runs inside
third_party/venv-fixtures (scripts/_venv.py).
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


# ======================================================================================
# children, each run as `bench_sdxl.py --<role> ...` in a fresh process
# ======================================================================================
def encode(model_dir: Path, texts: list[str]):
    """Both encoders' penultimate hidden states concatenated [n, 77, 2048] float64 (diffusers' encode_prompt)."""
    import numpy as np
    import onnxruntime as ort
    from transformers import CLIPTokenizer

    parts = []
    for enc, tok_dir in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tok = CLIPTokenizer.from_pretrained(str(model_dir / tok_dir))
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="np").input_ids.astype(np.int64)
        sess = ort.InferenceSession(str(model_dir / enc / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        last = max(int(n.split(".")[1]) for n in names if n.startswith("hidden_states."))
        out = dict(zip(names, sess.run(None, {"input_ids": ids})))
        parts.append(out[f"hidden_states.{last - 1}"].astype(np.float64))
        del sess
    return np.concatenate(parts, axis=-1)


def python_route(unet_path: str, out_dir: str) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from transformers import CLIPTokenizer

    from bench_edit import augmented_prompts, time_alignment, time_operator_t

    unet_path = Path(unet_path)
    model_dir = unet_path.parent.parent
    tok = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))

    old_texts, new_texts = augmented_prompts()
    started = time.perf_counter()
    emb = encode(model_dir, old_texts + new_texts)
    encoders_s = time.perf_counter() - started
    # TIME's alignment with the first tokenizer (diffusers' edit_model), the solve in float64
    n = len(old_texts)
    at = time_operator_t(emb[:n], emb[n:], time_alignment(tok, old_texts, new_texts))
    model = onnx.load(str(unet_path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    kv = [node.input[1] for node in model.graph.node
          if node.op_type == "MatMul" and node.input[0] == "encoder_hidden_states" and node.input[1] in inits]
    for name in kv:
        t = inits[name]
        w = numpy_helper.to_array(t)                       # Wᵀ [d, C]
        t.CopyFrom(numpy_helper.from_array((at @ w.astype(np.float64)).astype(w.dtype), name))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data")
    print(f"python route: replaced {len(kv)} K/V initializers; wrote {out / 'model.onnx'}")
    print(f"python route: encoders_s={encoders_s:.3f} rest_s={time.perf_counter() - started - encoders_s:.3f}")


def ort_text_encoders(model_dir: str) -> None:
    import numpy as np
    import onnxruntime as ort

    t0 = time.perf_counter()
    for enc in ("text_encoder", "text_encoder_2"):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        sess = ort.InferenceSession(str(Path(model_dir) / enc / "model.onnx"), so, providers=["CPUExecutionProvider"])
        ids = np.full((8, 77), 49407, dtype=np.int64)
        ids[:, 0], ids[:, 1:6] = 49406, 320
        sess.run(None, {"input_ids": ids})
        globals()[f"keep_{enc}"] = sess  # both alive at once, as an edit holds them
    print(f"ort: both text encoders created and run in {time.perf_counter() - t0:.2f} s")


def optimum_run(argv: list[str]) -> None:
    model, steps, size, threads, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    import numpy as np
    import onnxruntime as ort
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    pipe = ORTStableDiffusionXLPipeline.from_pretrained(model, provider="CPUExecutionProvider", session_options=so)
    pipe.set_progress_bar_config(disable=True)
    ends = [time.perf_counter()]

    def step_end(_pipe, _i, _t, kwargs):
        ends.append(time.perf_counter())
        return kwargs
    img = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
               callback_on_step_end=step_end).images
    np.save(out, img.astype(np.float32))
    gaps = sorted((b - a) * 1e3 for a, b in zip(ends[1:], ends[2:]))
    med = gaps[len(gaps) // 2] if len(gaps) % 2 else (gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2
    print(f"optimum: denoising steps: median {med:.2f} ms ({len(gaps)} timed)")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("--python-route", "--ort-text-encoders",
                                                                    "--optimum-run"):
    _venv.bootstrap(__file__)
    role, args = sys.argv[1], sys.argv[2:]
    if role == "--python-route":
        python_route(*args)
    elif role == "--ort-text-encoders":
        ort_text_encoders(*args)
    else:
        optimum_run(args)
    sys.exit(0)

if __name__ == "__main__":
    _venv.bootstrap(__file__, hf_env=False)  # the children get their environment explicitly

import argparse  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402

from _bench import (ANSI_RE, BIN, binary_env, build_time_onnx, loadavg, machine_facts, quiet_summary, rm,  # noqa: E402
                    say, verdict, write_section)
from bench_edit import DST, SRC, Contender, parse_split  # noqa: E402

STEP_RE = re.compile(r"denoising steps: median ([0-9.]+) ms")


def py_env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DIFFUSERS_VERBOSITY="error")


def bench_edit(model: Path, tmp: Path, runs: int, binary: Path) -> dict:
    unet = model / "unet" / "model.onnx"
    work = tmp / "edit"
    rm(work)
    work.mkdir(parents=True)
    vpy, me = str(VENV / "bin" / "python"), str(Path(__file__).resolve())
    env = binary_env(binary)
    edit = [str(binary), "-v", "edit"]
    args = ["--src", SRC, "--dst", DST]
    contenders = [
        Contender("A", "cp -r", ["cp", "-r", str(model / "unet"), str(work / "unet_copy")], work / "unet_copy"),
        Contender("B", "time-onnx edit", edit + [str(unet), *args, "-o", str(work / "out" / "model.onnx")],
                  work / "out", mkdir=work / "out", env=env),
        Contender("C", "Python route", [vpy, me, "--python-route", str(unet), str(work / "py_out")], work / "py_out",
                  env=py_env()),
        Contender("D", "time-onnx edit --save-operator", edit + ["--model", str(model), *args, "--save-operator",
                                                                 str(work / "op.safetensors")],
                  work / "op.safetensors", env=env),
        Contender("T", "onnxruntime: both text encoders", [vpy, me, "--ort-text-encoders", str(model)],
                  work / "nothing", env=py_env()),
        Contender("E", "time-onnx edit --dry-run", edit + [str(unet), *args, "--dry-run"], work / "nothing", env=env),
    ]
    size = sum(f.stat().st_size for f in (model / "unet").iterdir())
    say(f"== edit: {model} (UNet folder {size / 2**30:.2f} GiB)")
    for c in contenders:
        c.run(timed=False)
    for r in range(runs):
        say(f" round {r + 1}/{runs}")
        for c in contenders:
            c.run(timed=True)
    by = {c.key: c for c in contenders}
    return {"contenders": by, "unet_bytes": size,
            "b_stdout": re.sub(r"; wrote .*", "", ANSI_RE.sub("", by["B"].runs[-1].stdout).strip()),
            "c_stdout": by["C"].runs[-1].stdout.strip()}


def spawn_timed(cmd: list[str], env: dict, out: Path) -> tuple[float, float, str, str, int]:
    """(start → output file written, process wall, stdout, stderr, peak RSS kB) of one run."""
    from _bench import run_measured, wait_quiet

    rm(out)
    os.sync()
    wait_quiet()
    t0 = time.time()
    r = run_measured(cmd, env)
    if r.rc != 0:
        raise SystemExit(f"{cmd[:3]} failed (exit {r.rc}):\n{r.stdout}\n{r.stderr}")
    return out.stat().st_mtime - t0, r.wall, r.stdout, r.stderr, r.rss_kb


def bench_generate(model: Path, tmp: Path, runs: int, binary: Path, steps: int, size: int, threads: int) -> dict:
    work = tmp / "generate"
    rm(work)
    work.mkdir(parents=True)
    out = work / "x.npy"
    ours = [str(binary), "-v", "generate", "--model", str(model), "--prompt", PROMPT, "--steps", str(steps),
            "--height", str(size), "--width", str(size), "--seed", "1", "--guidance", "5", "--threads", str(threads),
            "--device", "cpu", "--output-type", "npy", "-o", str(out)]
    theirs = [str(VENV / "bin" / "python"), str(Path(__file__).resolve()), "--optimum-run", str(model), str(steps),
              str(size), str(threads), str(out)]
    res: dict[str, list] = {"G1": [], "G2": []}
    say(f"== generate: {model}, {size}×{size}, {steps} steps, {threads} threads")
    for r in range(runs + 1):
        for key, cmd, env in (("G1", ours, binary_env(binary)), ("G2", theirs, py_env())):
            start_to_image, wall, stdout, stderr, rss = spawn_timed(cmd, env, out)
            m = STEP_RE.search(ANSI_RE.sub("", stderr if key == "G1" else stdout))
            if not m:
                raise SystemExit(f"{key}: no 'denoising steps' line:\n{stdout}\n{stderr}")
            step = float(m.group(1))
            say(f"  {key} {'timed ' if r else 'warmup'} start→image {start_to_image:7.2f} s, process {wall:7.2f} s, "
                f"step {step:8.1f} ms, peak RSS {rss / 1024:6.0f} MiB")
            if r:
                res[key].append((start_to_image, wall, step, rss))
    return res


def med(xs) -> float:
    return statistics.median(xs)


def route_split(stdout: str) -> tuple[float, float]:
    """(text encoders, onnx load/edit/save) seconds the Python route printed."""
    line = next(ln for ln in stdout.splitlines() if "encoders_s=" in ln)
    kv = dict(item.split("=") for item in line.split(": ", 1)[1].split())
    return float(kv["encoders_s"]), float(kv["rest_s"])


def render(edit: dict | None, gen: dict | None, facts: dict, command: str, args) -> str:
    out = ["## SDXL", ""]
    out.append(f"Measured {datetime.date.today().isoformat()} with `{command}`; time-onnx built from "
               f"{facts['built']}. Machine: {facts['nproc']} cores, {facts['cpu']} (flags: "
               f"{facts['flags']}), {facts['mem']} RAM, Linux {facts['kernel']}; onnxruntime {facts['onnxruntime']}, "
               f"onnx {facts['onnx']}, numpy {facts['numpy']}. Model: `{args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model}` "
               f"(scripts/make_full_size_sdxl.py: SDXL base's architecture, random weights; text encoders fp32, UNet "
               f"fp16 with external data). Load average after the runs: {loadavg()}; {quiet_summary()}.")
    out.append("")
    if edit:
        c = edit["contenders"]
        te = c["B"].median_stage("text encoder") / 1e3
        b_wall, a_wall, c_wall = c["B"].median_wall, c["A"].median_wall, c["C"].median_wall
        out += [f"### edit ({edit['unet_bytes'] / 2**30:.2f} GiB UNet folder, {args.runs} rounds, medians)", "",
                "| contender | wall (s) | per round (s) | peak RSS (MiB) |", "|---|---:|---|---:|"]
        for k in ("A", "B", "C", "D", "T", "E"):
            x = c[k]
            rounds = ", ".join(f"{r.wall:.2f}" for r in x.runs)
            out.append(f"| {k}: {x.label} | {x.median_wall:.2f} | {rounds} | {x.median_rss:.0f} |")
        out += ["", f"B's output: {edit['b_stdout']}", "", f"B's stages (median ms): " + ", ".join(
            f"{n} {c['B'].median_stage(n):.0f}" for n in c["B"].splits[0]), "",
                f"E's stages (median ms): " + ", ".join(f"{n} {c['E'].median_stage(n):.0f}" for n in c["E"].splits[0]),
                "", "| bar | measured | |", "|---|---|---|"]
        r1 = (b_wall - te) / a_wall
        out.append(f"| (B − text encoder stage) ≤ 1.2 × A | ({b_wall:.2f} − {te:.2f}) / {a_wall:.2f} = **{r1:.2f} ×** "
                   f"| {verdict(r1 <= 1.2)} |")
        r2 = c_wall / b_wall
        c_rest = med(route_split(r.stdout)[1] for r in c["C"].runs)
        r3 = c_rest / (b_wall - te)
        out.append(f"| C ≥ 5 × B, whole runs | {c_wall:.2f} / {b_wall:.2f} = **{r2:.2f} ×** | {verdict(r2 >= 5)} |")
        out.append(f"| C ≥ 5 × B, beyond the text encoders: C's onnx load/edit/save against (B − its text "
                   f"encoder stage) | {c_rest:.2f} / ({b_wall:.2f} − {te:.2f}) = **{r3:.2f} ×** | {verdict(r3 >= 5)} |")
        rss_b, rss_t = c["B"].max_rss, c["T"].max_rss
        out.append(f"| peak RSS of B ≤ T + 512 MiB | {rss_b:.0f} MiB vs {rss_t:.0f} + 512 MiB (B − T = "
                   f"{rss_b - rss_t:+.0f} MiB, highest of the rounds) | {verdict(rss_b <= rss_t + 512)} |")
        out.append("")
    if gen:
        g1, g2 = gen["G1"], gen["G2"]
        out += [f"### generate ({args.size}×{args.size}, {args.steps} steps, guidance 5, {args.threads} threads, CPU; "
                f"{args.gen_runs} rounds run one contender after the other, medians)", "",
                "| contender | start → image (s) | process (s) | per step (ms) | peak RSS (MiB) |",
                "|---|---:|---:|---:|---:|"]
        for key, label, rows in (("G1", "time-onnx generate", g1), ("G2", "optimum ORTStableDiffusionXLPipeline", g2)):
            out.append(f"| {key}: {label} | {med(r[0] for r in rows):.2f} | {med(r[1] for r in rows):.2f} | "
                       f"{med(r[2] for r in rows):.0f} | {max(r[3] for r in rows) / 1024:.0f} |")
        step = med(r[2] for r in g1) / med(r[2] for r in g2)
        start = med(r[0] for r in g1) / med(r[0] for r in g2)
        out += ["", "| bar | measured | |", "|---|---|---|",
                f"| per step ≤ 1.0 × optimum | **{step:.2f} ×** | {verdict(step <= 1.0)} |",
                f"| start → image ≤ 0.7 × optimum | **{start:.2f} ×** | {verdict(start <= 0.7)} |", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "third_party" / "sdxl-random")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen-runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=REPO / "third_party" / "bench-sdxl-tmp")
    ap.add_argument("--skip-edit", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not (args.model / "unet" / "model.onnx").exists():
        raise SystemExit(f"{args.model}: no SDXL model; build it with scripts/make_full_size_sdxl.py")
    binary, built, _ = build_time_onnx(None)
    args.tmp.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(args.tmp)
    facts["built"] = built
    edit = None if args.skip_edit else bench_edit(args.model, args.tmp, args.runs, binary)
    gen = None if args.skip_generate else bench_generate(args.model, args.tmp, args.gen_runs, binary, args.steps,
                                                          args.size, args.threads)
    command = "python3 scripts/bench_sdxl.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = render(edit, gen, facts, command.strip(), args)
    print(section)
    if args.skip_edit or args.skip_generate:
        # The section holds both halves and the notes written by hand around them: a run of one half
        # prints its part to be pasted in, it does not replace the whole.
        say("one half skipped: BENCHMARKS.md left as it is (paste the printed part in by hand)")
    elif not args.no_write:
        write_section("SDXL", section)
    rm(args.tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
