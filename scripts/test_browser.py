"""The page at `/` of `time-onnx serve`, in a real headless browser (Debian's chromium).

    python3 scripts/test_browser.py [--binary target/release/time-onnx]

Starts the server on the toy model (loopback, a free port) and chromedriver, fills the page's form
(prompt, source, destination, seed), submits it, and checks that both images appear, decode, have
the toy model's size and differ, and that the "after" image is the one /v1/images draws with the
edit. Talks to chromedriver's W3C WebDriver HTTP API with the standard library only. Installs
chromium and chromium-driver with apt-get when they are missing (as root). Bounded: every wait has
a deadline, the whole run a 180 s limit; the server and the browser are stopped in any case.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_S = 180


def say(msg: str) -> None:
    print(f"[browser] {msg}", flush=True)


def ensure_chromium() -> None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    # As scripts/setup.sh installs its packages: as root, or through sudo.
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if not shutil.which("apt-get") or (sudo and not shutil.which("sudo")):
        sys.exit("chromium and chromedriver are missing: apt-get install chromium chromium-driver")
    say("installing chromium and chromium-driver (Debian packages)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium",
                    "chromium-driver"], check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method: str, url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: {e.code} {e.read()[:300]!r}") from None


class Browser:
    """One WebDriver session of a headless chromium."""

    def __init__(self, driver: str):
        self.driver = driver
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": shutil.which("chromium"),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,900"]}}}}
        self.session = call("POST", f"{driver}/session", caps)["value"]["sessionId"]
        self.base = f"{driver}/session/{self.session}"

    def go(self, url: str) -> None:
        call("POST", f"{self.base}/url", {"url": url})

    def element(self, css: str) -> str:
        found = call("POST", f"{self.base}/element", {"using": "css selector", "value": css})["value"]
        return next(iter(found.values()))

    def fill(self, css: str, text: str) -> None:
        e = self.element(css)
        call("POST", f"{self.base}/element/{e}/clear", {})
        call("POST", f"{self.base}/element/{e}/value", {"text": text})

    def click(self, css: str) -> None:
        call("POST", f"{self.base}/element/{self.element(css)}/click", {})

    def js(self, script: str):
        return call("POST", f"{self.base}/execute/sync", {"script": script, "args": []})["value"]

    def close(self) -> None:
        try:
            call("DELETE", self.base, timeout=20)
        except Exception:  # noqa: BLE001 - the driver is killed next anyway
            pass


# Both images' pixels through a canvas, with their sizes: what the page shows.
PIXELS = """
const out = {};
for (const id of ["before", "after"]) {
  const img = document.getElementById(id);
  if (!img.complete || img.naturalWidth === 0) { return null; }
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0);
  out[id] = { w: c.width, h: c.height, data: Array.from(g.getImageData(0, 0, c.width, c.height).data) };
}
out.status = document.getElementById("status").textContent;
return out;
"""


def png_rgba(png: bytes) -> list[int]:
    """RGBA values of an 8-bit RGB PNG without interlacing (what the server writes), via zlib."""
    import struct
    import zlib
    pos, w, h, idat = 8, 0, 0, b""
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        chunk = png[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), 3 * w, [], bytearray(3 * w)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0
            b, c = prev[i], prev[i - 3] if i >= 3 else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    out = []
    for line in rows:
        for x in range(w):
            out += [line[3 * x], line[3 * x + 1], line[3 * x + 2], 255]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=str(REPO / "target" / "release" / "time-onnx"))
    args = ap.parse_args()
    signal.alarm(LIMIT_S)  # the whole check, whatever hangs
    start = time.monotonic()
    ensure_chromium()
    tmp = Path(tempfile.mkdtemp(prefix="time-onnx-browser-"))
    server = subprocess.Popen([args.binary, "serve", "--model", str(REPO / "models" / "toy"), "--device", "cpu",
                               "--listen", "127.0.0.1:0", "--operators", str(tmp / "ops")],
                              stdout=subprocess.PIPE, text=True)
    port = free_port()
    driver = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    browser = None
    try:
        addr = server.stdout.readline().split()[-1]
        say(f"server at {addr}")
        drv = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if call("GET", f"{drv}/status", timeout=5)["value"].get("ready"):
                    break
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                sys.exit("FAIL: chromedriver did not start")
            time.sleep(0.2)
        browser = Browser(drv)
        browser.go(addr + "/")
        form = {"#prompt": "a circle", "#src": "a circle", "#dst": "a blue circle", "#seed": "3", "#steps": "10"}
        for css, text in form.items():
            browser.fill(css, text)
        browser.click("#go")
        deadline = time.monotonic() + 90
        shown = None
        while time.monotonic() < deadline:
            shown = browser.js(PIXELS)
            if shown and shown["status"].endswith("done"):
                break
            time.sleep(0.5)
        if not shown or not shown["status"].endswith("done"):
            sys.exit(f"FAIL: the page did not show both images: {shown and shown['status']!r}")
        before, after = shown["before"], shown["after"]
        say(f"status {shown['status']!r}; images {before['w']}x{before['h']} and {after['w']}x{after['h']}")
        if (before["w"], before["h"]) != (32, 32) or (after["w"], after["h"]) != (32, 32):
            sys.exit("FAIL: the images do not have the toy model's 32x32 size")
        differing = sum(1 for a, b in zip(before["data"], after["data"]) if a != b)
        if differing == 0:
            sys.exit("FAIL: the images before and after the edit are the same")
        # The page's "after" image is the edit the API draws for the same request.
        edit = call("POST", f"{addr}/v1/edits", {"src": "a circle", "dst": "a blue circle"})
        req = urllib.request.Request(f"{addr}/v1/images", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "a circle", "seed": 3, "steps": 10,
                                                      "edits": [edit["id"]]}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            want = png_rgba(r.read())
        if want != after["data"]:
            sys.exit("FAIL: the page's 'after' image is not the one /v1/images draws with the edit")
        say(f"PASS: both images shown, {differing} of {len(before['data'])} values differ, "
            f"'after' = /v1/images with edit {edit['id'][:12]} ({time.monotonic() - start:.1f} s)")
    finally:
        if browser:
            browser.close()
        for p in (driver, server):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
