"""`time-onnx serve` through a stock Open Inference Protocol v2 client: tritonclient's HTTP client.

    python3 scripts/test_v2_client.py [--binary target/release/time-onnx]

Makes its own venv (third_party/venv-v2client, from scripts/requirements-v2client.txt, rebuilt when
that file changes), starts the server on the toy model (loopback, a free port), and with the client's
defaults (binary tensor data, as tritonclient sends it) and with JSON tensors: health and metadata,
then `infer` with an edit id; the FP32 image must equal the float image /v1/images returns for the same
request, the UINT8 image its 8-bit values. Bounded to 180 s; the server is stopped in any case.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "third_party" / "venv-v2client"
REQS = REPO / "scripts" / "requirements-v2client.txt"
LIMIT_S = 180


def in_venv() -> None:
    """Re-runs this script inside its venv, creating or refreshing the venv first."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    stamp, want = VENV / ".requirements.sha256", hashlib.sha256(REQS.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:
        print(f"[v2 client] (re)creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", "-r", str(REQS)],
                       check=True, timeout=900)
        stamp.write_text(want)
    os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), __file__, *sys.argv[1:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=str(REPO / "target" / "release" / "time-onnx"))
    args = ap.parse_args()
    in_venv()
    signal.alarm(LIMIT_S)
    import tempfile

    import numpy as np
    import tritonclient.http as http

    tmp = tempfile.mkdtemp(prefix="time-onnx-v2-")
    server = subprocess.Popen([args.binary, "serve", "--model", str(REPO / "models" / "toy"), "--device", "cpu",
                               "--listen", "127.0.0.1:0", "--operators", f"{tmp}/ops"], stdout=subprocess.PIPE, text=True)
    try:
        addr = server.stdout.readline().split()[-1]
        base = addr.removeprefix("http://")

        def post(path: str, body: dict) -> bytes:
            req = urllib.request.Request(addr + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.read()

        edit = json.loads(post("/v1/edits", {"src": "a circle", "dst": "a blue circle"}))["id"]
        npy = post("/v1/images", {"prompt": "a circle", "seed": 5, "steps": 10, "edits": [edit], "output": "npy"})
        header = int.from_bytes(npy[8:10], "little")
        want = np.frombuffer(npy[10 + header:], dtype="<f4").reshape(1, 32, 32, 3)

        client = http.InferenceServerClient(url=base)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("toy")
        meta = client.get_model_metadata("toy")
        assert {o["name"] for o in meta["outputs"]} == {"image", "image_fp32"}, meta
        for binary in (True, False):
            inputs = []
            for name, dtype, value in [("prompt", "BYTES", np.array([b"a circle"], dtype=object)),
                                       ("edits", "BYTES", np.array([edit.encode()], dtype=object)),
                                       ("seed", "INT64", np.array([5], dtype=np.int64)),
                                       ("steps", "INT64", np.array([10], dtype=np.int64)),
                                       ("guidance", "FP32", np.array([7.5], dtype=np.float32))]:
                tensor = http.InferInput(name, list(value.shape), dtype)
                tensor.set_data_from_numpy(value, binary_data=binary)
                inputs.append(tensor)
            outputs = [http.InferRequestedOutput("image_fp32", binary_data=binary),
                       http.InferRequestedOutput("image", binary_data=binary)]
            result = client.infer("toy", inputs, outputs=outputs, request_id="r1")
            got, got8 = result.as_numpy("image_fp32"), result.as_numpy("image")
            assert got.shape == (1, 32, 32, 3) and got.dtype == np.float32, (got.shape, got.dtype)
            diff = float(np.abs(got - want).max())
            assert diff <= 1e-5, f"FP32 differs from /v1/images by {diff}"
            assert np.array_equal(got8, np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)), "UINT8 differs"
            print(f"[v2 client] PASS ({'binary' if binary else 'JSON'} tensors): FP32 equals /v1/images "
                  f"(max diff {diff}), UINT8 its 8-bit values", flush=True)
        nope = http.InferInput("nope", [1], "INT64")
        nope.set_data_from_numpy(np.array([1], dtype=np.int64))
        try:
            client.infer("toy", [nope])
        except Exception as e:  # noqa: BLE001 - tritonclient raises its own exception type
            assert "nope" in str(e), e
            print(f"[v2 client] PASS: an unknown input is refused: {e}", flush=True)
        else:
            sys.exit("FAIL: an unknown input was accepted")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
