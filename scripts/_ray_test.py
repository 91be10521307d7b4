"""The Python half of scripts/test_ray.sh: runs its three bars against a Ray cluster already started.

    python scripts/_ray_test.py --address 127.0.0.1:PORT --binary target/release/time-onnx --tmp DIR

Bar 1: a 4-shard Ray eval equals a single-process eval (results.json less `seconds`, report.md,
row-NN.png). Bar 2: a Ray worker killed mid-shard is retried, resumes from whole rows, leaves no
orphaned time-onnx, and the result is still the same. Bar 3: `eval --merge` refuses a changed,
a truncated, and an incomplete shard. Prints PASS/FAIL per bar; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EVAL = ["--model", "models/toy", "--dataset", "models/toy/toy_timed.csv",
        "--seeds", "4", "--steps", "10", "--device", "cpu", "--threads", "1"]
SHARDS = 4


class Fail(Exception):
    pass


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise Fail(msg)


def log(msg: str) -> None:
    print(f"[ray-test] {msg}", flush=True)


def strip_seconds(x):
    """x without any `seconds` field (the only thing allowed to differ between runs)."""
    if isinstance(x, dict):
        return {k: strip_seconds(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [strip_seconds(v) for v in x]
    return x


def same_report(want: Path, got: Path) -> None:
    """got/ holds what want/ holds: results.json less `seconds`, same digest, report.md and PNGs byte for byte."""
    w, g = (json.loads((d / "results.json").read_text()) for d in (want, got))
    check(w.get("digest") is not None and w.get("digest") == g.get("digest"),
          f"digest differs: {w.get('digest')} vs {g.get('digest')}")
    sw, sg = strip_seconds(w), strip_seconds(g)
    if sw != sg:
        keys = sorted(k for k in set(sw) | set(sg) if sw.get(k) != sg.get(k))
        raise Fail(f"results.json differs (less `seconds`) in {keys}")
    check((want / "report.md").read_bytes() == (got / "report.md").read_bytes(), "report.md differs")
    pw, pg = sorted(p.name for p in want.glob("row-*.png")), sorted(p.name for p in got.glob("row-*.png"))
    check(pw == pg and pw, f"row PNGs differ: {pw} vs {pg}")
    for name in pw:
        check((want / name).read_bytes() == (got / name).read_bytes(), f"{name} differs")


def ray_eval(a, out: Path, *extra: str, log_to: Path | None = None, wait: bool = True):
    cmd = [sys.executable, str(REPO / "scripts" / "ray_eval.py"), "--address", a.address, "--shards", str(SHARDS),
           "--out", str(out), "--binary", a.binary, "--max-retries", "3", *extra, "--", *EVAL]
    f = open(log_to, "w") if log_to else None
    p = subprocess.Popen(cmd, cwd=REPO, stdout=f or None, stderr=subprocess.STDOUT if f else None, text=True)
    return p.wait() if wait else p


def shard_rows(d: Path) -> tuple[list, list[int]] | None:
    try:
        r = json.loads((d / "results.json").read_text())
        return r["rows"], r["shard"]["rows"]
    except (OSError, ValueError, KeyError):
        return None


def children(pid: int, k: int) -> list[int]:
    """Live time-onnx processes of shard k whose parent is pid (Ray reuses a worker for several shards)."""
    out = []
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            s = st.read_text()
            args = (st.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        comm, rest = s[s.index("(") + 1:s.rindex(")")], s[s.rindex(")") + 2:].split()
        ours = int(rest[1]) == pid and f"{k}/{SHARDS}".encode() in args
        if comm.startswith("time-onnx") and rest[0] != "Z" and ours:
            out.append(int(st.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return s[s.rindex(")") + 2] != "Z"


def bar1(a, tmp: Path, single: Path) -> None:
    out = tmp / "ray1"
    t = time.time()
    rc = ray_eval(a, out, "--ship", str(a.stage))  # --ship: the model travels in Ray's working_dir
    check(rc == 0, f"ray_eval.py exited {rc}")
    log(f"4-shard Ray eval (--ship) took {time.time() - t:.1f} s")
    same_report(single, out / "report")
    # A rerun reuses every complete shard and only merges; an existing report is refused.
    rc = ray_eval(a, out, log_to=tmp / "rerun.log")
    text = (tmp / "rerun.log").read_text()
    check(rc == 1 and "exists already" in text, f"rerun over an existing report: exit {rc}: {text.strip()}")
    shutil.rmtree(out / "report")
    rc = ray_eval(a, out, log_to=tmp / "rerun.log")
    text = (tmp / "rerun.log").read_text()
    check(rc == 0 and text.count("complete already") == SHARDS and "submitted" not in text,
          f"rerun did not just reuse the shards (exit {rc}): {text.strip()}")
    same_report(single, out / "report")


def bar2(a, tmp: Path, single: Path) -> None:
    out = tmp / "ray2"
    drv = ray_eval(a, out, log_to=tmp / "fault.log", wait=False)
    try:
        fault(a, tmp, single, out, drv)
    finally:
        if drv.poll() is None:
            drv.kill()
        shown = [ln for ln in (tmp / "fault.log").read_text().splitlines() if ln.startswith(("shard ", "ray_eval"))]
        print("\n".join(f"  driver: {ln}" for ln in shown), flush=True)


def fault(a, tmp: Path, single: Path, out: Path, drv) -> None:
    # Shard sizes as bar 1 recorded them: kill a shard with some rows done and some to go (so that
    # the retry must resume), or, once only 1-row shards are left, one whose child has run >= 2 s.
    bar1_shards = [shard_rows(tmp / "ray1" / "shards" / str(k)) for k in range(SHARDS)]
    check(all(bar1_shards), "bar 2 needs the shard sizes of bar 1's shards")
    sizes = {k: s[1][1] - s[1][0] for k, s in enumerate(bar1_shards)}
    victim = None  # (shard, worker pid, its time-onnx children, rows finished before the kill)
    seen: dict[tuple[int, int], float] = {}  # (shard, worker pid) -> when its child was first seen
    deadline = time.time() + 240
    while victim is None:
        check(time.time() < deadline, "no shard reached a killable state in 240 s")
        check(drv.poll() is None, f"the driver ended (exit {drv.returncode}) before a worker could be killed")
        done = {k: len((shard_rows(out / "shards" / str(k)) or ([], 0))[0]) for k in range(SHARDS)}
        multi_left = any(sizes[k] > 1 and done[k] < sizes[k] for k in range(SHARDS))
        for k in range(SHARDS):
            marks = out / "shards" / f"{k}.attempts"
            pids = [int(p.name) for p in marks.iterdir()] if marks.is_dir() else []
            if len(pids) != 1 or not children(pids[0], k):
                continue
            pid = pids[0]
            seen.setdefault((k, pid), time.time())
            partial = 0 < done[k] < sizes[k]
            single_row_busy = sizes[k] == 1 and done[k] == 0 and not multi_left and time.time() - seen[k, pid] >= 2
            kids = children(pid, k)  # still mid-shard right now?
            if (partial or single_row_busy) and kids:
                victim = (k, pid, kids, shard_rows(out / "shards" / str(k))[0] if done[k] else [])
                break
        time.sleep(0.1)
    k, pid, kids, before = victim
    os.kill(pid, signal.SIGKILL)
    log(f"killed Ray worker {pid} (shard {k}, {len(before)} row(s) finished, time-onnx child {kids})")
    t = time.time()
    while any(alive(c) for c in kids) and time.time() - t < 5:
        time.sleep(0.1)
    orphans = [c for c in kids if alive(c)]
    check(not orphans, f"time-onnx {orphans} outlived its killed worker {pid} (PR_SET_PDEATHSIG)")
    log(f"its time-onnx child was gone {time.time() - t:.2f} s after the kill")
    rc = drv.wait(timeout=max(10.0, deadline + 120 - time.time()))
    text = (tmp / "fault.log").read_text()
    check(rc == 0, f"ray_eval.py exited {rc} after the kill: {text.strip().splitlines()[-1:]}")
    files = list((out / "shards" / f"{k}.attempts").iterdir())
    check(len(files) >= 2, f"shard {k} has {len(files)} attempt file(s); no retry on another worker")
    after = shard_rows(out / "shards" / str(k))[0]
    check(after[:len(before)] == before, f"shard {k}: rows finished before the kill were redone, not resumed")
    log(f"shard {k}: {len(files)} attempts; the {len(before)} row(s) finished before the kill were kept (--resume)")
    same_report(single, out / "report")


def bar3(a, tmp: Path) -> None:
    src = tmp / "ray1" / "shards"
    check(all((src / str(k) / "results.json").exists() for k in range(SHARDS)), "no shard set from bar 1")

    def merge(name: str, change) -> tuple[int, str]:
        shards, out = tmp / "corrupt" / name, tmp / "corrupt" / f"{name}-out"
        shutil.copytree(src, shards)
        what = change(shards)
        p = subprocess.run([a.binary, "eval", "--merge", *[str(shards / str(k)) for k in range(SHARDS)],
                            "-o", str(out)], cwd=REPO, capture_output=True, text=True)
        err = p.stderr.strip().splitlines()
        last = err[-1] if err else ""
        log(f"merge with {what}: exit {p.returncode}: {last}")
        check(p.returncode == 0 or not (out / "results.json").exists(), f"a refused merge wrote {out}/results.json")
        return p.returncode, last

    rc, _ = merge("intact", lambda d: "intact shards")
    check(rc == 0, "the intact copy of the shards was refused")

    def flip(d: Path) -> str:  # one pick of one image of one prompt, A <-> B
        p = d / "1" / "results.json"
        r = json.loads(p.read_text())
        picks = r["rows"][0]["prompts"][0]["picks"]
        was = picks[0]
        picks[0] = "B" if was == "A" else "A"
        p.write_text(json.dumps(r, indent=2))
        return f"{p.relative_to(d)} changed (a pick {was} -> {picks[0]})"

    rc, err = merge("flipped", flip)
    check(rc != 0, "a changed results.json was merged")
    changed = str(tmp / "corrupt" / "flipped" / "1")
    check("digest" in err.lower() or changed in err, f"the refusal names neither the digest nor {changed}: {err}")

    def truncate(d: Path) -> str:
        p = d / "2" / "results.json"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return f"{p.relative_to(d)} truncated"

    rc, _ = merge("truncated", truncate)
    check(rc != 0, "a truncated results.json was merged")

    def drop_png(d: Path) -> str:
        p = sorted((d / "0").glob("row-*.png"))[0]
        p.unlink()
        return f"{p.relative_to(d)} deleted"

    rc, _ = merge("no-png", drop_png)
    check(rc != 0, "a shard with a row PNG missing was merged")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--binary", dest="binary_src", required=True)
    p.add_argument("--tmp", type=Path, required=True)
    a = p.parse_args()
    tmp = a.tmp
    a.binary = str(tmp / "time-onnx")  # a copy: a rebuild during the test cannot change what is tested
    shutil.copy2(a.binary_src, a.binary)
    a.stage = tmp / "stage"  # what --ship sends: just the toy model (the binary is on a shared path)
    shutil.copytree(REPO / "models" / "toy", a.stage / "models" / "toy")

    single = tmp / "single"
    t = time.time()
    rc = subprocess.run([a.binary, "eval", *EVAL, "-o", str(single)], cwd=REPO).returncode
    if rc != 0:
        print(f"FAIL  the single-process eval every bar compares with exited {rc}", flush=True)
        sys.exit(1)
    log(f"single-process eval took {time.time() - t:.1f} s")

    results = {}
    for name, bar in [("bar 1 (4 Ray shards == one process)", lambda: bar1(a, tmp, single)),
                      ("bar 2 (worker killed -> retried, resumed, same result)", lambda: bar2(a, tmp, single)),
                      ("bar 3 (merge refuses corrupt shards)", lambda: bar3(a, tmp))]:
        t = time.time()
        try:
            bar()
            results[name] = f"PASS  {name} ({time.time() - t:.0f} s)"
        except Exception as e:  # noqa: BLE001 — one bar failing must not hide the others
            results[name] = f"FAIL  {name}: {type(e).__name__ + ': ' if not isinstance(e, Fail) else ''}{e}"
    print("\n== Ray test summary", flush=True)
    print("\n".join(results.values()), flush=True)
    sys.exit(0 if all(r.startswith("PASS") for r in results.values()) else 1)


if __name__ == "__main__":
    main()
