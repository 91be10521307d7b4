#!/usr/bin/env python3
"""Runs `time-onnx eval` on a Ray cluster: one task per shard, then merges the shards locally.

    python3 scripts/ray_eval.py --shards 4 --out OUT [options] -- --model M --dataset D [eval flags]

Shard K goes to OUT/shards/K/ (`eval --shard K/N`), the merged report to OUT/report/
(`eval --merge`). OUT must be on a path every node sees. A rerun reuses complete shards and resumes
partial ones (`--resume`: the binary continues from whole rows). Each attempt of shard K adds a
line to OUT/shards/K.attempts/<worker pid> and its child's stderr to OUT/shards/K.logs/<worker pid>.log.
Needs only the standard library and `ray` (scripts/requirements-ray.txt).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

FORBIDDEN = ("-o", "--output", "--shard", "--resume", "--merge")  # the driver sets these itself


def fail(msg: str) -> None:
    print(f"ray_eval.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ray_eval.py", usage="%(prog)s --shards N --out OUT [options] -- EVAL_ARGS...",
        description="Shard `time-onnx eval` over a Ray cluster and merge the shards.")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto",
                   help="Ray cluster address (default: $RAY_ADDRESS, else auto)")
    p.add_argument("--shards", type=int, required=True, help="number of shards N (one Ray task each)")
    p.add_argument("--out", type=Path, required=True, help="OUT: shards in OUT/shards/K, report in OUT/report")
    p.add_argument("--binary", default="time-onnx", help="the time-onnx binary (default: time-onnx on PATH)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per task (default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per task (default 0)")
    p.add_argument("--max-retries", type=int, default=3, help="retries per shard, crashes and errors (default 3)")
    p.add_argument("--ship", type=Path, help="folder sent to every worker as its working dir (Ray working_dir); "
                   "relative binary/model paths are then resolved inside it")
    if "--" not in argv:
        p.error("missing `--` before the time-onnx eval arguments")
    cut = argv.index("--")
    a = p.parse_args(argv[:cut])
    a.eval_args = argv[cut + 1:]
    if a.shards < 1:
        p.error("--shards must be at least 1")
    if a.num_cpus < 0 or a.num_gpus < 0 or a.max_retries < 0:
        p.error("--num-cpus, --num-gpus and --max-retries must not be negative")
    if not a.eval_args:
        p.error("no time-onnx eval arguments after `--` (at least --model and --dataset)")
    for x in a.eval_args:
        if x.split("=", 1)[0] in FORBIDDEN or (x.startswith("-o") and not x.startswith("--")):
            p.error(f"`{x}` is set by ray_eval.py itself; leave -o/--output/--shard/--resume/--merge out")
    if a.ship is not None and not a.ship.is_dir():
        p.error(f"--ship {a.ship}: not a folder")
    return a


def shard_state(d: Path) -> dict | None:
    """The `shard` of the report in d plus `done` (its finished rows), or None if none is readable yet."""
    try:
        r = json.loads((d / "results.json").read_text())
        return {**r["shard"], "done": len(r["rows"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def attempts(out: Path, k: int) -> int:
    d = out / "shards" / f"{k}.attempts"
    return sum(len(f.read_text().splitlines()) for f in d.iterdir()) if d.is_dir() else 0


def run_shard(binary: str, eval_args: list[str], k: int, n: int, out: str, cwd: str | None) -> float:
    """One attempt at shard k: the binary as a child that dies with this worker. Returns seconds."""
    t0 = time.time()
    d = Path(out) / "shards" / str(k)
    marks = Path(out) / "shards" / f"{k}.attempts"
    marks.mkdir(parents=True, exist_ok=True)
    with open(marks / str(os.getpid()), "a") as f:  # a line per attempt: the same worker may retry
        f.write(f"{socket.gethostname()} {time.strftime('%H:%M:%S')}\n")
    cmd = [binary, "eval", *eval_args, "--shard", f"{k}/{n}", "-o", str(d)]
    if (d / "results.json").exists():  # a report is written whole after each row: continue from it
        cmd.append("--resume")
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # resolved before fork

    def die_with_parent() -> None:
        prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL: a killed worker takes its child along
        if os.getppid() != parent:  # the worker died before prctl took effect
            os._exit(1)

    # The child's stderr goes to a file, not a pipe: a pipe would kill it with EPIPE only when it next
    # writes, and the file keeps each attempt's log. Its lines are relayed (Ray forwards them).
    log = Path(out) / "shards" / f"{k}.logs" / f"{os.getpid()}.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "ab") as w:
        w.write(f"== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        w.flush()
        start = w.tell()
        proc = subprocess.Popen(cmd, cwd=cwd, stderr=w, preexec_fn=die_with_parent)
    last, pending = "", b""
    with open(log, "rb") as r:
        r.seek(start)
        while True:
            exited = proc.poll() is not None  # before reading: nothing written after is lost
            chunk = r.read()
            if not chunk and exited:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                sys.stderr.write(text + "\n")
                last = text.strip() or last
            sys.stderr.flush()
            if not chunk:
                time.sleep(0.2)
    last = pending.decode(errors="replace").strip() or last
    if proc.wait() != 0:
        raise RuntimeError(f"shard {k}/{n}: {Path(binary).name} exited with {proc.returncode}: {last or '(no stderr)'}")
    return time.time() - t0


def one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # RayTaskError wraps the task's own exception
    text = str(cause if cause is not None else e).strip() or type(e).__name__
    return text.splitlines()[0] if cause is not None else " ".join(text.split())[:300]


def main() -> None:
    a = parse(sys.argv[1:])
    out = a.out.resolve()
    n = a.shards
    report = out / "report"
    if (report / "results.json").exists():
        fail(f"{report}/results.json exists already; remove {report} to merge again")
    # Where the workers find the binary: with --ship a relative path stays relative (to the working dir).
    if a.ship is not None and "/" in a.binary and not os.path.isabs(a.binary):
        task_bin, local_bin = a.binary, str((a.ship / a.binary).resolve())
    elif "/" in a.binary:
        task_bin = local_bin = os.path.abspath(a.binary)
    else:
        task_bin, local_bin = a.binary, shutil.which(a.binary) or a.binary
    if not (os.path.isfile(local_bin) and os.access(local_bin, os.X_OK)):
        fail(f"--binary {a.binary}: no executable {local_bin} here (the merge runs on this machine)")
    cwd = None if a.ship is not None else os.getcwd()  # without --ship, paths mean what they mean here

    todo = []
    for k in range(n):
        d = out / "shards" / str(k)
        s = shard_state(d)
        if s is not None and (s.get("index"), s.get("count")) != (k, n):
            fail(f"{d} holds shard {s.get('index')}/{s.get('count')}, not {k}/{n}: use that --shards or another --out")
        if s is not None and s["done"] == s["rows"][1] - s["rows"][0]:
            print(f"shard {k}/{n}: complete already in {d} (rows {s['rows'][0]}..{s['rows'][1]}), reusing", flush=True)
        else:
            todo.append(k)

    failed: dict[int, str] = {}
    if todo:
        try:
            import ray  # only needed when there is work: a rerun that just merges works without it
        except ImportError:
            fail("no `ray` in this Python: run with third_party/venv-ray/bin/python (scripts/test_ray.sh makes it) "
                 "or pip install -r scripts/requirements-ray.txt")
        host, _, port = a.address.rpartition(":")
        if host and port.isdigit() and "//" not in a.address:  # ray.init waits minutes for a dead GCS
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except OSError as e:
                fail(f"cannot connect to Ray at {a.address}: {e}")
        try:
            ray.init(address=a.address, log_to_driver=True, logging_level="warning",
                     runtime_env={"working_dir": str(a.ship)} if a.ship is not None else None)
        except Exception as e:  # noqa: BLE001 — any connection failure is one line for the user
            fail(f"cannot connect to Ray at {a.address}: {one_line(e)}")
        task = ray.remote(run_shard).options(num_cpus=a.num_cpus, num_gpus=a.num_gpus,
                                             max_retries=a.max_retries, retry_exceptions=True)
        t0 = time.time()
        refs = {task.remote(task_bin, a.eval_args, k, n, str(out), cwd): k for k in todo}
        print(f"submitted {len(todo)} of {n} shards to Ray ({a.address})", flush=True)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            k = refs[done[0]]
            try:
                secs = ray.get(done[0])
                s = shard_state(out / "shards" / str(k))
                rows = f"rows {s['rows'][0]}..{s['rows'][1]}" if s else "rows ?"
                print(f"shard {k}/{n} {rows} done in {time.time() - t0:.1f} s (last attempt {secs:.1f} s), "
                      f"attempts: {attempts(out, k)}, {len(pending)} shard(s) still running", flush=True)
            except Exception as e:  # noqa: BLE001 — a task that failed for good, after its retries
                failed[k] = one_line(e)
                print(f"shard {k}/{n} FAILED after {attempts(out, k)} attempt(s): {failed[k]}", flush=True)
        ray.shutdown()
    if failed:
        first = min(failed)
        fail(f"{len(failed)} of {n} shards failed ({', '.join(map(str, sorted(failed)))}): {failed[first]}; "
             "rerun to retry them (finished rows are kept)")

    cmd = [local_bin, "eval", "--merge", *[str(out / "shards" / str(k)) for k in range(n)], "-o", str(report)]
    print("merging:", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:  # the binary printed its one-line reason
        fail(f"the merge refused the shards in {out / 'shards'}")
    print(f"report: {report / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
