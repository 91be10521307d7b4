#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job on the bundled toy model
# (models/toy, see its MODEL_CARD.md): the model assumes circles are red; a TIME edit of its UNet
# ("a circle" -> "a blue circle") changes that. The same seeds are generated before and after,
# for "a circle" and for "a square" (which must stay green), and tiled into one picture.
# Everything lands in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin=target/release/time-onnx
model=models/toy
out=out/demo
# λ: the best trade-off measured on this model (models/toy/measured.json, MODEL_CARD.md); the
# paper's 0.1 also turns squares and triangles blue here.
lambda=$(python3 -c 'import json; print(json.load(open("models/toy/measured.json"))["best_lambda"])')
seeds=(0 1 2 3 4 5 6 7)
rm -rf "$out"
mkdir -p "$out/unet"

"$bin" -q edit "$model/unet/model.onnx" --src "a circle" --dst "a blue circle" --lambda "$lambda" \
  -o "$out/unet/model.onnx" | tee "$out/edit.txt"

tiles=()
labels=()
for prompt in "a circle" "a square"; do
  for unet in "$model/unet/model.onnx" "$out/unet/model.onnx"; do
    tag=$([ "$unet" = "$model/unet/model.onnx" ] && echo before || echo after)
    labels+=(--row-label "\"$prompt\", $tag")
    for s in "${seeds[@]}"; do
      f="$out/${prompt// /-}-$tag-$s.png"
      "$bin" -q generate --model "$model" --unet "$unet" --prompt "$prompt" --seed "$s" \
        --steps 25 --scheduler ddim --device cpu -o "$f" >/dev/null
      tiles+=("$f")
    done
  done
done
"$bin" grid "${tiles[@]}" --cols "${#seeds[@]}" --scale 3 "${labels[@]}" \
  --heading "seeds ${seeds[0]} to ${seeds[-1]}, the same before and after the edit" \
  -o "$out/before-after.png" >/dev/null

echo "demo: seeds ${seeds[*]}; rows: \"a circle\" before, after; \"a square\" before, after -> $out/before-after.png"
echo "demo: $(cat "$out/edit.txt")"
