"""Benchmark: `time-onnx serve` batching requests that carry different edits, against the same
requests one at a time.

    python3 scripts/bench_serve.py [--runs N] [--no-write] [--only toy|full]

Issue 18's bar: 8 concurrent clients, each with its own edit, against the same 8 requests sent one
after another: at least 1.5x on the toy model (per-call overhead dominates) and at least 1.0x at full
size (SD 1.4's architecture with random weights, third_party/sd14-random, 256x256, compute-bound on
2 cores): batching across edits costs nothing. One server per model, loaded once; each run sends
the sequential set and the concurrent set back to back (alternating which goes first), after a
quiet-machine wait; the figure is the median over runs of (sequential wall time) / (concurrent wall
time). /metrics shows the batch sizes the server drew. The GPU gain, the point of batching, is not
measured here (no GPU).

Writes the "## serve" section of BENCHMARKS.md unless --no-write.
"""
from __future__ import annotations

import _venv

if __name__ == "__main__":
    _venv.bootstrap(__file__)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from _bench import BIN, REPO, cpu_flags, loadavg, machine_facts, say, sh, verdict, wait_quiet, write_section  # noqa: E402

TMP = REPO / "third_party" / "bench-serve-tmp"
MODELS = {
    # name: (folder, edits, prompt, steps, size, bar)
    "toy": (REPO / "models" / "toy",
            [("a circle", "a blue circle"), ("a square", "a red square"), ("a triangle", "a green triangle"),
             ("a diamond", "a yellow diamond"), ("a circle", "a red circle"), ("a square", "a blue square"),
             ("a triangle", "a yellow triangle"), ("a diamond", "a green diamond")],
            "a circle", 25, None, 1.5),
    "full": (REPO / "third_party" / "sd14-random",
             [("a rose", "a blue rose"), ("a frog", "a purple frog"), ("a banana", "a red banana"),
              ("a nurse", "a male nurse"), ("a doctor", "a female doctor"), ("a sunflower", "a pink sunflower"),
              ("an apple", "a blue apple"), ("a strawberry", "a white strawberry")],
             "a rose in a garden", 8, 256, 1.0),
}
CLIENTS = 8


def post(addr: str, path: str, body: dict) -> bytes:
    req = urllib.request.Request(f"{addr}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()


def start(folder) -> tuple[subprocess.Popen, str]:
    ops = TMP / f"ops-{folder.name}"
    proc = subprocess.Popen([str(BIN), "serve", "--model", str(folder), "--operators", str(ops),
                             "--listen", "127.0.0.1:0", "--device", "cpu", "--threads", "2",
                             "--max-batch", str(CLIENTS), "--batch-wait-ms", "50"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    return proc, line.split()[-1]


def measure(name: str, runs: int) -> dict:
    folder, edits, prompt, steps, size, bar = MODELS[name]
    if not folder.exists():
        subprocess.check_call([sys.executable, str(REPO / "scripts" / "make_full_size_model.py")])
    proc, addr = start(folder)
    try:
        ids = [json.loads(post(addr, "/v1/edits", {"src": s, "dst": d}))["id"] for s, d in edits]
        bodies = [{"prompt": prompt, "seed": k, "steps": steps, "edits": [ids[k]], "output": "npy",
                   **({"height": size, "width": size} if size else {})} for k in range(CLIENTS)]
        post(addr, "/v1/images", bodies[0])  # sessions warm

        def sequential() -> float:
            t = time.perf_counter()
            for b in bodies:
                post(addr, "/v1/images", b)
            return time.perf_counter() - t

        def concurrent() -> float:
            threads = [threading.Thread(target=post, args=(addr, "/v1/images", b)) for b in bodies]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return time.perf_counter() - t

        ratios, seqs, concs = [], [], []
        for r in range(runs):
            wait_quiet()
            if r % 2 == 0:
                s, c = sequential(), concurrent()
            else:
                c, s = concurrent(), sequential()
            seqs.append(s)
            concs.append(c)
            ratios.append(s / c)
            say(f"{name} run {r + 1}/{runs}: one at a time {s:.2f} s, {CLIENTS} concurrent {c:.2f} s, ratio {s / c:.2f}")
        with urllib.request.urlopen(f"{addr}/metrics", timeout=60) as m:
            batches = [line for line in m.read().decode().splitlines() if line.startswith("time_onnx_batches_total{")]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"name": name, "steps": steps, "size": size or "default", "bar": bar,
            "seq": statistics.median(seqs), "conc": statistics.median(concs),
            "ratio": statistics.median(ratios), "ratios": ratios, "batches": batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only", choices=sorted(MODELS))
    args = ap.parse_args()
    TMP.mkdir(parents=True, exist_ok=True)
    say("cargo build --release")
    subprocess.check_call(["cargo", "build", "--release", "--quiet"], cwd=REPO)
    facts = machine_facts(TMP, modules=())
    results = [measure(n, args.runs) for n in (MODELS if not args.only else [args.only])]
    lines = [
        "## serve",
        "",
        f"`python3 scripts/bench_serve.py --runs {args.runs}` ({time.strftime('%Y-%m-%d')}, commit "
        f"{sh('git -C ' + str(REPO) + ' rev-parse --short HEAD')}; {facts['cpu']}, {facts['nproc']} cores, "
        f"flags {cpu_flags()}; load {loadavg()}).",
        "",
        f"{CLIENTS} requests, each with its own edit, sent one at a time against all at once "
        f"(`--max-batch {CLIENTS} --batch-wait-ms 50`, `--threads 2`, CPU). The GPU gain is not measured here.",
        "",
        "| model | steps | size | one at a time | concurrent | ratio (median) | bar | batches drawn |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        ok = r["ratio"] >= r["bar"]
        batches = ", ".join(b.split("{")[1].replace('"}', "").replace('size="', "size ") for b in r["batches"])
        lines.append(f"| {r['name']} | {r['steps']} | {r['size']} | {r['seq']:.2f} s | {r['conc']:.2f} s | "
                     f"{r['ratio']:.2f}x ({', '.join(f'{x:.2f}' for x in r['ratios'])}) | ≥ {r['bar']}x: "
                     f"{verdict(ok)} | {batches} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_section("serve", section)


if __name__ == "__main__":
    main()
