#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job on the bundled
# model: a TIME edit of its UNet ("A pack of roses" -> "A pack of blue roses"),
# then the same seeds generated before and after, tiled into one picture.
# Everything lands in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin=target/release/time-onnx
model=models/tiny-random
out=out/demo
prompt="A pack of roses"
seeds=(1 2 3 4)
rm -rf "$out"
mkdir -p "$out/unet"

"$bin" -q edit "$model/unet/model.onnx" --src "$prompt" --dst "A pack of blue roses" \
  -o "$out/unet/model.onnx" | tee "$out/edit.txt"

before=() after=()
for s in "${seeds[@]}"; do
  "$bin" -q generate --model "$model" --prompt "$prompt" --seed "$s" --steps 25 \
    -o "$out/before-$s.png" >/dev/null
  "$bin" -q generate --model "$model" --unet "$out/unet/model.onnx" --prompt "$prompt" --seed "$s" --steps 25 \
    -o "$out/after-$s.png" >/dev/null
  before+=("$out/before-$s.png") after+=("$out/after-$s.png")
done
"$bin" grid "${before[@]}" "${after[@]}" --cols "${#seeds[@]}" -o "$out/before-after.png" >/dev/null

echo "demo: \"$prompt\", seeds ${seeds[*]}: top row the original UNet, bottom row the edited one -> $out/before-after.png"
echo "demo: $(cat "$out/edit.txt")"
echo "demo: models/tiny-random has random weights, so its images are noise; the change shows as different noise."
