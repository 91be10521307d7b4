#!/usr/bin/env python3
"""Record what the time-onnx binary does, to show that a change kept it (or to see what it changed).

    python3 scripts/behaviour.py record [--binary target/release/time-onnx] -o before.json
    python3 scripts/behaviour.py compare before.json after.json

`record` runs a fixed list of commands on the test fixtures and the toy model, each in a fresh folder
at the same absolute path (/tmp/time-onnx-behaviour/<case>), so that paths printed or stored in files
are the same from one binary to the next. For each case it keeps the exit code, stdout and stderr
(ANSI colour codes removed), and the SHA-256 of every file the case left in its folder. Fields that
measure time are masked by name before hashing or comparing:
  - stdout: "in <x> s" (edit's summary, eval's last line);
  - eval's results.json: every "seconds" key (per-row wall time), removed before hashing.
Nothing else is masked: images, ONNX files, operator files, reports and error lines must be
byte-identical.

`compare` prints every case whose record differs, with the differing fields, and exits 1 if any does.

Only the standard library is used. The cases cover: edit (-o, --save-operator, --save-weights,
--dry-run, --values-only, composition, every export flavour), generate with each scheduler and
its options, eval on two toy rows, inspect (--json too), grid, doctor, and error cases covering the
most common variants of every error type (bad files, prompts, numbers, folders, operators,
scheduler configs, datasets, the ONNX Runtime library).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "sd-tiny"
D = FIX / "diffusers-onnx"
TOY = REPO / "models" / "toy"
WORK = Path("/tmp/time-onnx-behaviour")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TIMING = re.compile(r"in \d+(\.\d+)? s\b")
TIMEOUT_S = 600


def edit(unet: Path, src: str, dst: str, *extra: str) -> list[str]:
    return ["edit", str(unet), "--src", src, "--dst", dst, *extra]


def gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--device", "cpu", *extra]


ROSES = ("A pack of roses", "A pack of blue roses")


def cases() -> list[dict]:
    """Each case: name, args, optional setup (a function of the case folder) and env changes."""
    out: list[dict] = []

    def case(name, args, setup=None, env=None):
        out.append({"name": name, "args": args, "setup": setup, "env": env or {}})

    mk_unet_dir = lambda d: (d / "edited" / "unet").mkdir(parents=True)  # noqa: E731

    # --- edit -------------------------------------------------------------------------------
    for flavour in ["diffusers-onnx", "optimum", "dynamo", "fp16", "fp16-io32", "ort-packed-kv"]:
        case(f"edit-{flavour}", edit(FIX / flavour / "unet" / "model.onnx", *ROSES, "-o", "edited/unet/model.onnx"),
             setup=mk_unet_dir)
    case("edit-save-operator-and-weights",
         edit(D / "unet" / "model.onnx", *ROSES, "-o", "edited/unet/model.onnx",
              "--save-operator", "op.safetensors", "--save-weights", "w.safetensors", "--lambda", "0.5"),
         setup=mk_unet_dir)
    case("edit-operator-only", ["edit", "--model", str(D), "--src", "a cat", "--dst", "a black cat",
                                "--save-operator", "op.safetensors", "--no-augs"])
    case("edit-dry-run", edit(D / "unet" / "model.onnx", *ROSES, "--dry-run", "--aug", "A drawing of "))
    case("edit-values-only", edit(D / "unet" / "model.onnx", *ROSES, "--values-only", "-o", "edited/unet/model.onnx"),
         setup=mk_unet_dir)
    case("edit-same-prompt", edit(D / "unet" / "model.onnx", "a dog", "a dog", "-o", "edited/unet/model.onnx"),
         setup=mk_unet_dir)

    def chained(d: Path):
        (d / "first").mkdir()
        (d / "second").mkdir()
        run_binary(ARGS.binary, edit(D / "unet" / "model.onnx", *ROSES, "-o", str(d / "first" / "model.onnx")), d, {})

    case("edit-composed", edit(Path("first/model.onnx"), "A car", "A red car", "--model", str(D),
                               "-o", "second/model.onnx"), setup=chained)
    case("edit-toy", edit(TOY / "unet" / "model.onnx", "a circle", "a blue circle", "--lambda", "100",
                          "-o", "edited/unet/model.onnx"), setup=mk_unet_dir)

    # --- generate ---------------------------------------------------------------------------
    for sched in ["pndm", "ddim", "euler", "euler-a", "lms", "dpm++2m"]:
        case(f"generate-{sched}", gen(D, "--prompt", "a red apple", "--steps", "4", "--scheduler", sched,
                                      "--seed", "3", "-o", "out.png"))
        case(f"generate-{sched}-npy", gen(D, "--prompt", "a red apple", "--steps", "4", "--scheduler", sched,
                                          "--seed", "3", "--output-type", "npy", "-o", "out.npy"))
    case("generate-ddim-eta", gen(D, "--prompt", "a tree", "--steps", "3", "--scheduler", "ddim", "--eta", "0.5",
                                  "--output-type", "npy", "-o", "out.npy"))
    case("generate-negative-two-images", gen(D, "--prompt", "a tree", "--negative-prompt", "green", "--steps", "3",
                                             "--num-images", "2", "-o", "out.png"))
    case("generate-no-guidance-odd", gen(D, "--prompt", "a tree", "--steps", "3", "--guidance", "1",
                                         "--num-images", "3", "--output-type", "npy", "-o", "out.npy"))
    case("generate-one-thread", gen(D, "--prompt", "a tree", "--steps", "3", "--threads", "1",
                                    "--output-type", "npy", "-o", "out.npy"))
    case("generate-size", gen(D, "--prompt", "a tree", "--steps", "2", "--height", "48", "--width", "32",
                              "--output-type", "npy", "-o", "out.npy"))
    case("generate-graph-opt-all", gen(D, "--prompt", "a tree", "--steps", "2", "--graph-opt", "all",
                                       "--output-type", "npy", "-o", "out.npy"))

    def prompts_file(d: Path):
        (d / "prompts.txt").write_text("a house\n\n  a boat  \na plane\n")

    case("generate-prompts-file", gen(D, "--prompts", "prompts.txt", "--steps", "2", "-o", "out.png"),
         setup=prompts_file)

    def latents(d: Path):
        write_npy(d / "lat.npy", (1, 4, 8, 8), [((i * 37) % 101) / 50.0 - 1.0 for i in range(256)])

    case("generate-latents", gen(D, "--prompt", "a tree", "--steps", "3", "--latents", "lat.npy",
                                 "--height", "64", "--width", "64",
                                 "--num-images", "2", "--output-type", "npy", "-o", "out.npy"), setup=latents)

    def operator(d: Path):
        run_binary(ARGS.binary, ["edit", "--model", str(D), "--src", ROSES[0], "--dst", ROSES[1],
                                 "--save-operator", str(d / "op.safetensors")], d, {})

    case("generate-edit-operator", gen(D, "--prompt", "roses", "--steps", "3", "--edit", "op.safetensors",
                                       "--edit", "op.safetensors", "-o", "out.png"), setup=operator)

    def edited_unet(d: Path):
        (d / "e").mkdir()
        run_binary(ARGS.binary, edit(D / "unet" / "model.onnx", *ROSES, "-o", str(d / "e" / "model.onnx")), d, {})

    case("generate-edited-unet", gen(D, "--unet", "e/model.onnx", "--prompt", "roses", "--steps", "3",
                                     "-o", "out.png"), setup=edited_unet)
    case("generate-safety", gen(FIX / "with-safety", "--prompt", "a tree", "--steps", "2", "-o", "out.png"))
    case("generate-no-safety", gen(FIX / "with-safety", "--prompt", "a tree", "--steps", "2",
                                   "--no-safety-checker", "-o", "out.png"))
    for flavour in ["optimum", "dynamo", "fp16", "fp16-io32"]:
        case(f"generate-{flavour}", gen(FIX / flavour, "--prompt", "a tree", "--steps", "3", "--scheduler", "euler",
                                        "--output-type", "npy", "-o", "out.npy"))
    case("generate-toy", gen(TOY, "--prompt", "a circle", "--steps", "10", "--scheduler", "ddim", "--seed", "1",
                             "-o", "out.png"))
    case("generate-device-auto", ["generate", "--model", str(D), "--prompt", "a tree", "--steps", "2",
                                  "--output-type", "npy", "-o", "out.npy"])

    # --- eval, inspect, grid, doctor --------------------------------------------------------
    case("eval-toy", ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"), "--rows", "0..2",
                      "--seeds", "2", "--steps", "6", "--device", "cpu", "-o", "report"])

    def resumed(d: Path):
        run_binary(ARGS.binary, ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"),
                                 "--rows", "0..1", "--seeds", "2", "--steps", "6", "--device", "cpu",
                                 "-o", str(d / "report")], d, {})

    case("eval-resume", ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"), "--rows", "0..2",
                         "--seeds", "2", "--steps", "6", "--device", "cpu", "-o", "report", "--resume"],
         setup=resumed)
    case("inspect-unet", ["inspect", str(D / "unet" / "model.onnx")])
    case("inspect-unet-json", ["inspect", "--json", str(FIX / "ort-packed-kv" / "unet" / "model.onnx")])
    case("inspect-text-encoder-json", ["inspect", "--json", str(D / "text_encoder" / "model.onnx")])
    case("inspect-operator", ["inspect", "op.safetensors"], setup=operator)
    case("inspect-operator-json", ["inspect", "--json", "op.safetensors"], setup=operator)

    def two_pngs(d: Path):
        for i in range(3):
            run_binary(ARGS.binary, gen(D, "--prompt", f"thing {i}", "--steps", "2", "-o", str(d / f"{i}.png")), d, {})

    case("grid", ["grid", "0.png", "1.png", "2.png", "--cols", "2", "--scale", "2", "-o", "grid.png"],
         setup=two_pngs)
    case("doctor", ["doctor"])

    # --- errors -----------------------------------------------------------------------------
    u = D / "unet" / "model.onnx"
    case("err-missing-unet", edit(Path("nope/model.onnx"), *ROSES, "--model", str(D), "-o", "x.onnx"))
    case("err-empty-unet", edit(Path("empty.onnx"), *ROSES, "--model", str(D), "-o", "x.onnx"),
         setup=lambda d: (d / "empty.onnx").write_bytes(b""))
    case("err-garbage-unet", edit(Path("garbage.onnx"), *ROSES, "--model", str(D), "-o", "x.onnx"),
         setup=lambda d: (d / "garbage.onnx").write_bytes(bytes(range(256)) * 4))
    case("err-no-graph", edit(Path("nograph.onnx"), *ROSES, "--model", str(D), "-o", "x.onnx"),
         setup=lambda d: (d / "nograph.onnx").write_bytes(b"\x08\x07"))
    case("err-unet-is-text-encoder", edit(D / "text_encoder" / "model.onnx", *ROSES, "--model", str(D),
                                          "-o", "x.onnx"))
    case("err-inspect-garbage", ["inspect", "garbage.onnx"],
         setup=lambda d: (d / "garbage.onnx").write_bytes(b"\xff" * 64))
    case("err-missing-word", edit(u, "A pack of roses", "A bunch of blue flowers", "-o", "x/model.onnx"),
         setup=lambda d: (d / "x").mkdir())
    case("err-empty-source", edit(u, "  ", "A red rose", "-o", "x/model.onnx"), setup=lambda d: (d / "x").mkdir())
    case("err-truncated-word", edit(u, "a cat", "a " + "very " * 80 + "cat", "-o", "x/model.onnx"),
         setup=lambda d: (d / "x").mkdir())
    for lam in ["0", "-1", "nan", "inf"]:
        case(f"err-lambda-{lam}", edit(u, *ROSES, f"--lambda={lam}", "-o", "x/model.onnx"),
             setup=lambda d: (d / "x").mkdir())
    case("err-lambda-word", edit(u, *ROSES, "--lambda", "big", "-o", "x/model.onnx"))
    case("err-output-is-input", edit(Path("in/model.onnx"), *ROSES, "--model", str(D), "-o", "in/model.onnx"),
         setup=lambda d: shutil.copytree(D / "unet", d / "in"))
    case("err-output-folder-missing", edit(u, *ROSES, "-o", "missing/unet/model.onnx"))
    case("err-values-only-operator", edit(u, *ROSES, "--values-only", "--save-operator", "op.safetensors"))
    case("err-no-tokenizer-files", edit(u, *ROSES, "--tokenizer", "tok", "-o", "x/model.onnx"),
         setup=lambda d: ((d / "tok").mkdir(), (d / "x").mkdir()))

    def bad_merges(d: Path):
        shutil.copytree(FIX / "tokenizer", d / "tok")
        (d / "tok" / "merges.txt").write_text("#version: 0.2\na b c\n")
        (d / "x").mkdir()

    case("err-bad-merges", edit(u, *ROSES, "--tokenizer", "tok", "-o", "x/model.onnx"), setup=bad_merges)

    def bad_tok_config(d: Path):
        shutil.copytree(FIX / "tokenizer", d / "tok")
        (d / "tok" / "tokenizer_config.json").write_text("{not json")
        (d / "x").mkdir()

    case("err-bad-tokenizer-config", edit(u, *ROSES, "--tokenizer", "tok", "-o", "x/model.onnx"),
         setup=bad_tok_config)
    case("err-text-encoder-missing", edit(u, *ROSES, "--text-encoder", "nope.onnx", "-o", "x/model.onnx"))
    case("err-text-encoder-garbage", edit(u, *ROSES, "--text-encoder", "te.onnx", "-o", "x/model.onnx"),
         setup=lambda d: ((d / "te.onnx").write_bytes(b"\x0a\x03abc"), (d / "x").mkdir()))
    case("err-model-folder-incomplete", gen(Path("m"), "--prompt", "a tree"),
         setup=lambda d: (d / "m").mkdir())
    case("err-height", gen(D, "--prompt", "a tree", "--height", "30", "-o", "out.png"))
    case("err-steps-zero", gen(D, "--prompt", "a tree", "--steps", "0", "-o", "out.png"))
    case("err-num-images-zero", gen(D, "--prompt", "a tree", "--num-images", "0", "-o", "out.png"))
    case("err-unknown-scheduler", gen(D, "--prompt", "a tree", "--scheduler", "heun"))
    case("err-eta-euler", gen(D, "--prompt", "a tree", "--steps", "2", "--scheduler", "euler", "--eta", "0.3"))
    case("err-steps-too-many", gen(D, "--prompt", "a tree", "--steps", "1001", "-o", "out.png"))

    def karras(d: Path):
        shutil.copytree(D, d / "m")
        cfg = json.loads((D / "scheduler" / "scheduler_config.json").read_text())
        cfg.update({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True})
        (d / "m" / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))

    case("err-scheduler-unsupported", gen(Path("m"), "--prompt", "a tree", "--steps", "2"), setup=karras)

    def bad_sched_json(d: Path):
        karras(d)
        (d / "m" / "scheduler" / "scheduler_config.json").write_text('{"steps_offset": "one"}')

    case("err-scheduler-json", gen(Path("m"), "--prompt", "a tree", "--steps", "2"), setup=bad_sched_json)
    case("err-operator-garbage", gen(D, "--prompt", "a tree", "--edit", "op.safetensors"),
         setup=lambda d: (d / "op.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "))
    case("err-operator-missing", gen(D, "--prompt", "a tree", "--edit", "none.safetensors"))

    def toy_operator(d: Path):
        run_binary(ARGS.binary, ["edit", "--model", str(TOY), "--src", "a circle", "--dst", "a blue circle",
                                 "--save-operator", str(d / "op.safetensors")], d, {})

    case("err-operator-other-encoder", gen(D, "--prompt", "a tree", "--edit", "op.safetensors", "--steps", "2"),
         setup=toy_operator)
    case("err-latents-shape", gen(D, "--prompt", "a tree", "--steps", "2", "--latents", "lat.npy"),
         setup=lambda d: write_npy(d / "lat.npy", (1, 4, 4, 4), [0.0] * 64))
    case("err-latents-garbage", gen(D, "--prompt", "a tree", "--steps", "2", "--latents", "lat.npy"),
         setup=lambda d: (d / "lat.npy").write_bytes(b"not an npy file"))
    case("err-prompts-empty", gen(D, "--prompts", "p.txt"), setup=lambda d: (d / "p.txt").write_text("\n \n"))
    case("generate-empty-prompt", gen(D, "--prompt", "", "--steps", "2", "-o", "out.png"))
    case("err-eval-bad-dataset", ["eval", "--model", str(TOY), "--dataset", "bad.csv", "--device", "cpu",
                                  "-o", "report"], setup=lambda d: (d / "bad.csv").write_text("old,new\na circle\n"))
    case("err-eval-rows", ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"), "--rows", "5..900",
                           "--device", "cpu", "-o", "report"])
    case("err-eval-classifier", ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"),
                                 "--classifier", "dino", "-o", "report"])
    case("err-eval-exists", ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"), "--rows", "0..1",
                             "--seeds", "2", "--steps", "6", "--device", "cpu", "-o", "report"], setup=resumed)
    case("err-eval-resume-other-settings",
         ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"), "--rows", "0..1",
          "--seeds", "3", "--steps", "6", "--device", "cpu", "-o", "report", "--resume"], setup=resumed)
    case("err-eval-seeds-zero", ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"),
                                 "--seeds", "0", "-o", "report"])
    case("err-eval-clip-missing", ["eval", "--model", str(TOY), "--dataset", str(TOY / "toy_timed.csv"),
                                   "--rows", "0..1", "--seeds", "1", "--steps", "2", "--device", "cpu",
                                   "--classifier", "clip:nowhere", "-o", "report"])
    case("err-ort-library", ["doctor"], env={"ORT_DYLIB_PATH": "/nonexistent/libonnxruntime.so.1"})
    case("err-ort-library-garbage", ["doctor"], env={"ORT_DYLIB_PATH": "./lib.so"},
         setup=lambda d: (d / "lib.so").write_bytes(b"not a library"))
    case("err-device-cuda", ["generate", "--model", str(D), "--prompt", "a tree", "--steps", "2", "--device", "cuda"])
    case("err-grid-missing", ["grid", "a.png", "b.png", "-o", "g.png"])
    case("err-clap-missing-dst", ["edit", str(u), "--src", "a"])
    return out


def write_npy(path: Path, shape: tuple, values: list[float]) -> None:
    import struct
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % (
        ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else ""))
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    data = struct.pack(f"<{len(values)}f", *values)
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data)


def run_binary(binary: Path, args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RUST_BACKTRACE", "RUST_LOG")}
    full_env.update(env)
    return subprocess.run([str(binary), *args], cwd=cwd, env=full_env, capture_output=True, timeout=TIMEOUT_S)


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.name == "results.json":
        report = json.loads(data)
        for row in report.get("rows", []):
            row.pop("seconds", None)
        data = json.dumps(report, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def record(binary: Path, out: Path) -> None:
    results = {}
    for c in cases():
        d = WORK / c["name"]
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        if c["setup"]:
            c["setup"](d)
        before = {p for p in d.rglob("*") if p.is_file()}
        before_digest = {str(p.relative_to(d)): file_digest(p) for p in before}
        p = run_binary(binary, c["args"], d, c["env"])
        files = {}
        for f in sorted(d.rglob("*")):
            if f.is_file() and not f.is_symlink():
                rel = str(f.relative_to(d))
                digest = file_digest(f)
                if before_digest.get(rel) != digest:
                    files[rel] = digest
        clean = lambda b: ANSI.sub("", b.decode("utf-8", "replace"))  # noqa: E731
        results[c["name"]] = {
            "args": c["args"],
            "code": p.returncode,
            "stdout": TIMING.sub("in <t> s", clean(p.stdout)),
            "stderr": clean(p.stderr),
            "files": files,
        }
        status = "ok " if p.returncode == 0 else f"rc{p.returncode}"
        line = clean(p.stderr).strip().splitlines()[-1:] if p.returncode else []
        print(f"{status} {c['name']}" + (f": {line[0][:150]}" if line else ""), file=sys.stderr)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    errors = sum(1 for r in results.values() if r["code"] != 0)
    print(f"{len(results)} cases ({errors} ending in an error) -> {out}", file=sys.stderr)


def compare(a: Path, b: Path) -> int:
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    differ = 0
    for name in sorted(set(ra) | set(rb)):
        x, y = ra.get(name), rb.get(name)
        if x is None or y is None:
            print(f"{name}: only in {'the second' if x is None else 'the first'}")
            differ += 1
            continue
        fields = [k for k in ("args", "code", "stdout", "stderr", "files") if x[k] != y[k]]
        if fields:
            differ += 1
            print(f"{name}: differs in {', '.join(fields)}")
            for k in fields:
                print(f"  - {k}: {json.dumps(x[k])[:600]}")
                print(f"  + {k}: {json.dumps(y[k])[:600]}")
    print(f"{len(set(ra) | set(rb))} cases, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "time-onnx")
    r.add_argument("-o", "--output", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    ARGS = ap.parse_args()
    if ARGS.cmd == "record":
        ARGS.binary = ARGS.binary.resolve()
        record(ARGS.binary, ARGS.output)
    else:
        sys.exit(compare(ARGS.a, ARGS.b))
