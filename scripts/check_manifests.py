"""Checks the Kubernetes manifests in docs/deploy.md and docs/cluster.md, which no cluster here can apply.

    third_party/venv-ray/bin/python scripts/check_manifests.py [--binary target/release/time-onnx]

(Any Python with PyYAML; the Ray test's venv has it, pinned in scripts/requirements-ray.txt.)

Every ```yaml block must parse (PyYAML, all documents) and each document must name its apiVersion, kind
and metadata.name. Then what a mistake would silently break:
- every `time-onnx` flag in a container's args or a RayJob's entrypoint exists in that command's `--help`
  (serve, or eval after the driver's `--`), and the driver's own flags exist in scripts/ray_eval.py;
- a serving container listens on 0.0.0.0 at the port its containerPort and probes use, and its
  readiness probe is /v2/health/ready (liveness /v2/health/live);
- every volumeMount names a volume of its pod, and the --model, --operators and --token-file paths of a
  serving container lie under one of its mounts.
Exits 1 with one line per problem.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

try:
    import yaml
except ImportError:
    sys.exit("check_manifests.py needs PyYAML: run it with third_party/venv-ray/bin/python (scripts/test_ray.sh makes it)")

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "docs" / "deploy.md", REPO / "docs" / "cluster.md"]
PROBLEMS: list[str] = []


def problem(where: str, what: str) -> None:
    PROBLEMS.append(f"{where}: {what}")


def flags_of(help_text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))


def help_flags(binary: str, command: str) -> set[str]:
    return flags_of(subprocess.run([binary, command, "--help"], capture_output=True, text=True, check=True).stdout)


def used_flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and w != "--"]


def pods(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of a Deployment, an InferenceService predictor or a RayJob's groups."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Deployment":
        return [("template", spec["template"]["spec"])]
    if kind == "InferenceService":
        return [("predictor", spec["predictor"])]
    if kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        out = [("head", cluster["headGroupSpec"]["template"]["spec"])]
        out += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
        return out
    return []


def under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def check_serving(where: str, c: dict, mounts: list[str], serve_flags: set[str]) -> None:
    args = c.get("args") or []
    if args[:1] != ["serve"]:
        return
    for f in used_flags(args[1:]):
        if f not in serve_flags:
            problem(where, f"time-onnx serve has no flag {f}")
    values = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
    host, _, port = values.get("listen", "127.0.0.1:8000").rpartition(":")
    if host != "0.0.0.0":
        problem(where, f"--listen {host}:{port} is not reachable from outside the pod (use 0.0.0.0)")
    ports = {p.get("containerPort") for p in c.get("ports", [])}
    if int(port) not in ports:
        problem(where, f"listens on {port} but declares containerPort {sorted(ports)}")
    for probe, path in [("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                        ("startupProbe", "/v2/health/ready")]:
        if probe in c:
            get = c[probe].get("httpGet", {})
            if probe == "readinessProbe" and get.get("path") != path:
                problem(where, f"{probe} path {get.get('path')} (want {path})")
            if get.get("port") not in (int(port), "http"):
                problem(where, f"{probe} port {get.get('port')} != {port}")
    if "readinessProbe" not in c:
        problem(where, "no readinessProbe")
    for flag in ("model", "operators", "token-file"):
        if flag in values and not under(values[flag], mounts):
            problem(where, f"--{flag} {values[flag]} is not under a volume mount ({mounts})")


def check_rayjob(where: str, doc: dict, eval_flags: set[str], driver_flags: set[str]) -> None:
    words = shlex.split(doc["spec"]["entrypoint"])
    if "--" not in words or not any(w.endswith("scripts/ray_eval.py") for w in words):
        problem(where, "the entrypoint does not run scripts/ray_eval.py ... -- <eval arguments>")
        return
    cut = words.index("--")
    for f in used_flags(words[:cut]):
        if f not in driver_flags:
            problem(where, f"scripts/ray_eval.py has no flag {f}")
    for f in used_flags(words[cut + 1:]):
        if f not in eval_flags:
            problem(where, f"time-onnx eval has no flag {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=str(REPO / "target" / "release" / "time-onnx"))
    args = ap.parse_args()
    serve_flags, eval_flags = help_flags(args.binary, "serve"), help_flags(args.binary, "eval")
    # The driver's flags, from its argparse calls (importing it would need Ray).
    driver_flags = set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', (REPO / "scripts" / "ray_eval.py").read_text()))
    checked = 0
    for md in DOCS:
        blocks = re.findall(r"```yaml\n(.*?)```", md.read_text(), flags=re.S)
        if not blocks:
            problem(md.name, "no yaml block")
        for b, block in enumerate(blocks):
            try:
                docs = [d for d in yaml.safe_load_all(block) if d is not None]
            except yaml.YAMLError as e:
                problem(f"{md.name} block {b}", f"does not parse: {str(e).splitlines()[0]}")
                continue
            for doc in docs:
                checked += 1
                name = (doc.get("metadata") or {}).get("name")
                where = f"{md.name} {doc.get('kind')} {name}"
                if not (doc.get("apiVersion") and doc.get("kind") and name):
                    problem(where, "apiVersion, kind and metadata.name are required")
                    continue
                if doc["kind"] == "RayJob":
                    check_rayjob(where, doc, eval_flags, driver_flags)
                for part, pod in pods(doc):
                    volumes = {v["name"] for v in pod.get("volumes", [])}
                    for c in pod.get("containers", []):
                        mounts = c.get("volumeMounts", [])
                        for m in mounts:
                            if m["name"] not in volumes:
                                problem(f"{where} {part}", f"mount {m['name']} names no volume ({sorted(volumes)})")
                        check_serving(f"{where} {part}", c, [m["mountPath"] for m in mounts], serve_flags)
    for p in PROBLEMS:
        print(p, file=sys.stderr)
    if PROBLEMS:
        sys.exit(1)
    print(f"{checked} manifests in {', '.join(d.name for d in DOCS)}: ok")


if __name__ == "__main__":
    main()
