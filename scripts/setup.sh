#!/usr/bin/env bash
# Sets up everything time-onnx needs on a Debian 12 machine that reaches only the
# package registries, then builds the release binary. Idempotent: a second run
# only checks. Run as root (or with sudo) the first time, for apt.
#
#   scripts/setup.sh            CPU ONNX Runtime + release build
#   scripts/setup.sh --cuda     GPU build of ONNX Runtime and its CUDA 13 libraries
#   scripts/setup.sh --no-build everything but the cargo build
set -euo pipefail

ORT_VERSION=1.31.1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TP="$ROOT/third_party"
cuda=0
build=1
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. System packages -------------------------------------------------------
# libopenblas-dev: ndarray-linalg links the system OpenBLAS (its static build
# downloads sources, which cannot work here). pkg-config helps -sys crates find it.
# python3-pip/venv: only to fetch the ONNX Runtime wheel from PyPI.
# strace: the fault-injection tests (tests/hostile.rs: full disk, signals mid-write,
# which files are opened). g++: libfuzzer-sys, built by the fuzz targets' CI check.
need=()
for pkg in libopenblas-dev pkg-config ca-certificates strace g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ! python3 -m pip --version >/dev/null 2>&1; then need+=(python3-pip); fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need+=(python3-venv); fi
if [ ${#need[@]} -gt 0 ]; then
  say "installing apt packages: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Rust ----------------------------------------------------------------------
# A cargo at least as new as Cargo.toml's rust-version on the PATH is used as it
# is (rustup's, say). Otherwise Debian 12's own registry has a recent toolchain:
# rustc-web and cargo-web (bookworm-security, 1.96), with rustfmt-web and
# rust-web-clippy, which scripts/test.sh needs.
MSRV=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
cargo_ok() {
  command -v cargo >/dev/null 2>&1 && version_ge "$(cargo --version | awk '{print $2}')" "$MSRV"
}
if ! cargo_ok; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  web=(rustc-web cargo-web rustfmt-web rust-web-clippy)
  $SUDO apt-get update -qq
  candidate=$(apt-cache policy cargo-web 2>/dev/null | sed -n 's/^ *Candidate: *\([0-9.]*\).*/\1/p')
  if [ -n "$candidate" ] && version_ge "$candidate" "$MSRV"; then
    say "no cargo >= $MSRV on the PATH: installing Debian's ${web[*]} ($candidate)"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${web[@]}" >/dev/null
    hash -r
  fi
  if ! cargo_ok; then
    found=$(command -v cargo >/dev/null 2>&1 && cargo --version || echo "no cargo")
    say "time-onnx needs cargo >= $MSRV; found: $found; Debian's cargo-web candidate: ${candidate:-none}"
    say "(on Debian 12, enable bookworm-security in the apt sources; elsewhere install Rust with rustup)"
    exit 1
  fi
fi

# --- 2. ONNX Runtime from the PyPI wheel --------------------------------------
# The wheel ships libonnxruntime.so.<version>, which needs only libc and
# libstdc++. We unpack it to third_party/onnxruntime/, where the binary looks
# (its path is baked in at build time, see src/runtime/library.rs).
unpack_wheel() { # <wheel> <dest>: extract without needing `unzip`
  python3 -m zipfile -e "$1" "$2"
}

# pip matches --platform tags exactly, so list the older manylinux tags the
# nvidia-* wheels use as well.
pip_download() { # <requirement> <dir>
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --disable-pip-version-check "$1" -d "$2"
}

fetch_wheel() { # <requirement> <dir>
  mkdir -p "$2"
  if ! ls "$2"/*.whl >/dev/null 2>&1; then
    say "downloading $1 from PyPI"
    pip_download "$1" "$2"
  fi
}

install_ort() { # <package> <dest>
  local pkg=$1 dest=$2 lib="libonnxruntime.so.$ORT_VERSION"
  if [ -f "$dest/$lib" ] && [ -L "$dest/libonnxruntime.so.1" ]; then
    say "ONNX Runtime $ORT_VERSION ($pkg) already in ${dest#$ROOT/}"
    return
  fi
  local wheels="$TP/wheels/$pkg-$ORT_VERSION" tmp
  fetch_wheel "$pkg==$ORT_VERSION" "$wheels"
  tmp=$(mktemp -d "$TP/.unpack.XXXXXX")
  unpack_wheel "$wheels"/*.whl "$tmp"
  mkdir -p "$dest"
  cp "$tmp"/onnxruntime/capi/libonnxruntime*.so* "$dest/"
  rm -rf "$tmp"
  ln -sfn "$lib" "$dest/libonnxruntime.so.1"
  ln -sfn libonnxruntime.so.1 "$dest/libonnxruntime.so"
  say "ONNX Runtime $ORT_VERSION ($pkg) unpacked into ${dest#$ROOT/}"
}

mkdir -p "$TP"
install_ort onnxruntime "$TP/onnxruntime"

if [ "$cuda" = 1 ]; then
  # The GPU build's CUDA provider needs the CUDA 13 runtime, cuBLAS(Lt), cuRAND
  # and cuDNN 9; PyPI ships them as nvidia-* wheels. Everything lands in one
  # folder; `time-onnx` loads it when ORT_DYLIB_PATH points there (the line
  # printed at the end), and the loader finds the CUDA libraries through
  # LD_LIBRARY_PATH.
  gpu="$TP/onnxruntime-gpu"
  install_ort onnxruntime-gpu "$gpu"
  # Versions that are known to work together (torch 2.14's CUDA 13 set).
  for req in nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.1.3 nvidia-curand==10.4.0.35 \
             nvidia-cudnn-cu13==9.24.0.43 nvidia-nvjitlink==13.5.37; do
    marker="$gpu/.have-${req%%==*}"
    [ -f "$marker" ] && continue
    dir="$TP/wheels/${req%%==*}"
    rm -rf "$dir"; mkdir -p "$dir"
    say "downloading $req (CUDA 13) from PyPI"
    pip_download "$req" "$dir"
    tmp=$(mktemp -d "$TP/.unpack.XXXXXX")
    for w in "$dir"/*.whl; do unpack_wheel "$w" "$tmp"; done
    find "$tmp" -name 'lib*.so*' -exec cp -P {} "$gpu/" \;
    rm -rf "$tmp"
    touch "$marker"
  done
  say "CUDA build ready. Use it with:"
  printf 'export ORT_DYLIB_PATH=%s/libonnxruntime.so.1 LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$gpu" "$gpu"
fi

# --- 3. Release build ---------------------------------------------------------
if [ "$build" = 1 ]; then
  say "building time-onnx (release)"
  (cd "$ROOT" && cargo build --release --locked)
  say "built $ROOT/target/release/time-onnx"
fi
