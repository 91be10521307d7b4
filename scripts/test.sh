#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite:
# formatting, clippy and rustdoc with warnings as errors, and every test.
# This is the README's test command; .ci/run calls it and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
step() { printf '\n== %s\n' "$*" >&2; }
step "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --all --manifest-path fuzz/Cargo.toml -- --check
step "cargo clippy (warnings are errors)"
cargo clippy --release --locked --all-targets -- -D warnings
step "cargo doc (warnings are errors: links and examples in doc comments stay true)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked
step "cargo test"
cargo test --release --locked
step "the serve page in headless chromium (installed when missing)"
python3 scripts/test_browser.py
step "serve through tritonclient's HTTP client (own venv; bounded)"
python3 scripts/test_v2_client.py
step "sharded eval on a local Ray cluster (own venv; bounded)"
scripts/test_ray.sh
step "the manifests in docs/ (no cluster here applies them)"
third_party/venv-ray/bin/python scripts/check_manifests.py
step "fuzz targets build (scripts/fuzz.sh runs them)"
cargo build --release --locked --manifest-path fuzz/Cargo.toml
