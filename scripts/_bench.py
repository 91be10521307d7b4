"""Measuring helpers shared by scripts/bench_edit.py and scripts/bench_generate.py.

Every measured run is its own process. Before it, the caller waits for a quiet machine (`wait_quiet`);
wall time is taken around the process, peak RSS from GNU time (`/usr/bin/time -f %M`; wait4()'s
ru_maxrss as a fallback), and the CPU time other processes used during the run ("others' CPU",
from /proc/stat) is recorded, the machine being shared.

Standard library only (numpy, onnx, ... are imported lazily by `machine_facts`).
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import _venv

REPO = _venv.REPO
BIN = REPO / "target" / "release" / "time-onnx"
BUILD_DIR = REPO / "third_party" / "bench-edit-build"  # --rev builds (shared by the bench scripts)
ORT_LIB = REPO / "third_party" / "onnxruntime" / "libonnxruntime.so.1"
BENCH_MD = REPO / "BENCHMARKS.md"
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
GNU_TIME = Path("/usr/bin/time")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Result:
    def __init__(self, wall: float, cpu: float, rss_kb: int, rc: int, stdout: str, stderr: str, foreign: float):
        self.wall, self.cpu, self.rss_kb, self.rc, self.stdout, self.stderr = wall, cpu, rss_kb, rc, stdout, stderr
        self.foreign = foreign  # CPU seconds used by everything else on the machine during the run


def busy_cpu_seconds() -> float:
    """Machine-wide non-idle CPU time (all cores) from /proc/stat."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


QUIET_WAITS: list[float] = []  # seconds waited for a quiet machine before each run; None-free
QUIET_LIMIT = 120.0


def wait_quiet(limit: float = QUIET_LIMIT, threshold: float = 0.15, need: int = 2) -> float:
    """Waits until the machine has been idle (< `threshold` busy CPU-seconds per second, all cores) for
    `need` consecutive seconds, at most `limit` seconds. Returns the time waited (limit = gave up)."""
    t0 = time.perf_counter()
    quiet = 0
    while quiet < need and time.perf_counter() - t0 < limit:
        b0 = busy_cpu_seconds()
        time.sleep(1.0)
        quiet = quiet + 1 if busy_cpu_seconds() - b0 < threshold else 0
    waited = time.perf_counter() - t0
    QUIET_WAITS.append(waited)
    return waited


def quiet_summary() -> str:
    if not QUIET_WAITS:
        return "no runs"
    gave_up = sum(1 for w in QUIET_WAITS if w >= QUIET_LIMIT)
    return (f"waiting for an idle machine took {statistics.median(QUIET_WAITS):.1f} s median, "
            f"{max(QUIET_WAITS):.1f} s at most; gave up {gave_up} time(s)")


def run_measured(cmd: list[str], env: dict | None = None) -> Result:
    """Wall time around the process; peak RSS from GNU time when present (a child forked from this
    Python process would otherwise inherit this process's RSS into its ru_maxrss), else wait4()."""
    import tempfile

    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe, \
            tempfile.NamedTemporaryFile(suffix=".time") as ft:
        full = [str(GNU_TIME), "-f", "%M", "-o", ft.name, *cmd] if GNU_TIME.exists() else cmd
        busy0 = busy_cpu_seconds()
        t = time.perf_counter()
        p = subprocess.Popen(full, stdout=fo, stderr=fe, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        busy = busy_cpu_seconds() - busy0
        rc = os.waitstatus_to_exitcode(status)
        cpu = ru.ru_utime + ru.ru_stime
        rss_kb = ru.ru_maxrss
        if GNU_TIME.exists():
            lines = Path(ft.name).read_text().split()
            if lines and lines[-1].isdigit():
                rss_kb = int(lines[-1])
        fo.seek(0)
        fe.seek(0)
        return Result(wall, cpu, rss_kb, rc, fo.read().decode(errors="replace"), fe.read().decode(errors="replace"),
                      max(0.0, busy - cpu))


def rm(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True).stdout.strip()
    except subprocess.CalledProcessError:
        return "?"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def machine_facts(tmp: Path, modules: tuple[str, ...] = ("onnx", "onnxruntime", "numpy")) -> dict:
    """Machine and tool versions; `modules` are imported for their __version__ (key = module name)."""
    import importlib

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    facts = {
        "nproc": sh("nproc"),
        "cpu": cpu,
        "mem": mem,
        "fs": sh(f"findmnt -n -o FSTYPE -T {shlex.quote(str(tmp))}") or sh(f"stat -f -c %T {shlex.quote(str(tmp))}"),
        "kernel": platform.release(),
        "rustc": sh("rustc --version"),
        "python": platform.python_version(),
        "flags": cpu_flags(),
    }
    for m in modules:
        facts[m] = importlib.import_module(m).__version__
    return facts


def cpu_flags() -> str:
    """The vector-unit flags a speed figure depends on (AVX2, AVX-512 parts, AMX), from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            keep = [f for f in line.split(":", 1)[1].split()
                    if f in ("avx", "avx2", "fma") or f.startswith(("avx512", "amx", "avx_vnni"))]
            return " ".join(keep) or "no AVX"
    return "?"


def build_time_onnx(rev: str | None) -> tuple[Path, str, float]:
    """`cargo build --release` of the working tree, or (rev) of that commit exported by `git archive` into
    third_party/bench-edit-build/ with its own target folder. Returns (binary, what was built, seconds)."""
    t = time.perf_counter()
    if rev:
        full = sh(f"git -C {shlex.quote(str(REPO))} rev-parse --verify {shlex.quote(rev + '^{commit}')}")
        if full == "?":
            raise SystemExit(f"unknown revision {rev!r}")
        src = BUILD_DIR / "src"
        stamp = BUILD_DIR / "src.rev"
        if not (stamp.exists() and stamp.read_text().strip() == full):
            rm(src)
            src.mkdir(parents=True)
            say(f"exporting {full[:12]} to {src}")
            subprocess.run(f"git -C {shlex.quote(str(REPO))} archive {full} | tar -x -C {shlex.quote(str(src))}",
                           shell=True, check=True)
            stamp.write_text(full + "\n")
        say(f"cargo build --release (commit {full[:12]}, target {BUILD_DIR / 'target'})")
        env = dict(os.environ, CARGO_TARGET_DIR=str(BUILD_DIR / "target"))
        subprocess.check_call(["cargo", "build", "--release", "--quiet", "--bin", "time-onnx"], cwd=src, env=env)
        binary = BUILD_DIR / "target" / "release" / "time-onnx"
        build_what = f"commit {full[:12]} (`git archive` export, `--rev {rev}`)"
    else:
        say("cargo build --release (working tree)")
        subprocess.check_call(["cargo", "build", "--release", "--quiet"], cwd=REPO)
        binary = BIN
        head = sh(f"git -C {shlex.quote(str(REPO))} rev-parse --short=12 HEAD")
        dirty = sh(f"git -C {shlex.quote(str(REPO))} status --porcelain -- src Cargo.toml Cargo.lock")
        build_what = f"the working tree at commit {head}" + (
            " **with uncommitted changes** under src/ or Cargo.* (rerun with --rev HEAD to measure a commit)"
            if dirty not in ("", "?") else " (clean)")
    build_s = time.perf_counter() - t
    say(f"built in {build_s:.1f} s: {build_what}")
    return binary, build_what, build_s


def binary_env(binary: Path) -> dict:
    """The environment for running `binary`: a build outside the repo does not find third_party/ by itself."""
    env = dict(os.environ)
    if ORT_LIB.exists() and binary != BIN:
        env["ORT_DYLIB_PATH"] = str(ORT_LIB)
    return env


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


PLACEHOLDERS = {  # sentences of BENCHMARKS.md's preamble that a section makes obsolete
    "edit": [("No figures yet: the edit and generate benchmarks land with those commands.",
              "The generate benchmark lands with that command.")],
    "generate": [("No figures yet: the edit and generate benchmarks land with those commands.", ""),
                 ("The generate benchmark lands with that command.", "")],
}


def write_section(name: str, section: str) -> None:
    """Replaces (or appends) the "## <name>" section of BENCHMARKS.md."""
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    for old, new in PLACEHOLDERS.get(name, []):
        text = text.replace(old, new)
    text = re.sub(r"\n{3,}", "\n\n", text)
    m = re.search(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if m:
        text = text[:m.start()] + section + ("\n" if text[m.end():] else "") + text[m.end():]
    else:
        text = text.rstrip() + "\n\n" + section
    BENCH_MD.write_text(text)
