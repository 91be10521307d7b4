#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job on the bundled
# model: a TIME edit of its UNet, then images before and after from the same
# seeds, into out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin=target/release/time-onnx
model=models/tiny-random
out=out/demo
mkdir -p "$out"
"$bin" doctor
"$bin" inspect "$model/unet/model.onnx" | tee "$out/unet-inspect.txt"
echo "demo: \`time-onnx edit\` and \`time-onnx generate\` are not implemented yet (issues 4 and 5); the demo stops at inspecting the bundled UNet." >&2
