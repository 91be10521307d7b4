#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job on the bundled
# model: a TIME edit of its UNet ("A pack of roses" -> "A pack of blue roses"),
# written to out/demo/unet/, then what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin=target/release/time-onnx
model=models/tiny-random
out=out/demo
rm -rf "$out"
mkdir -p "$out/unet"
"$bin" edit "$model/unet/model.onnx" --src "A pack of roses" --dst "A pack of blue roses" \
  -o "$out/unet/model.onnx" --save-weights "$out/edited_kv.safetensors"
"$bin" inspect "$out/unet/model.onnx" > "$out/unet-inspect.txt"
echo "demo: edited UNet in $out/unet/ (what it holds: $out/unet-inspect.txt)."
echo "demo: before/after images need \`time-onnx generate\`, which is not implemented yet (issue 5)."
