#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo fuzz, libFuzzer with AddressSanitizer) for SECONDS each
# (default 600), after seeding their corpora from the fixtures. Crashes land in
# fuzz/artifacts/<target>/; each one found becomes a regression test in tests/hostile.rs.
# Needs a nightly toolchain (sanitizers) and `cargo install cargo-fuzz`.
#
#     scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(onnx_model prompts)

# Seeds: every fixture ONNX graph under 1 MiB (weights inline or external), and the prompts of
# the tokenizer golden and the toy dataset, as "source<TAB>destination".
mkdir -p fuzz/corpus/onnx_model fuzz/corpus/prompts
find tests/fixtures models -name '*.onnx' -size -1024k -print0 |
    while IFS= read -r -d '' f; do cp "$f" "fuzz/corpus/onnx_model/seed-$(sha256sum "$f" | cut -c1-16)"; done
python3 - <<'PY'
import csv, hashlib, json, pathlib
out = pathlib.Path("fuzz/corpus/prompts")
gold = json.loads(pathlib.Path("tests/fixtures/goldens/tokenizer.json").read_text())
seeds = [p["prompt"] for p in gold["prompts"]] + ["A pack of roses\tA pack of blue roses", "an apple\ta green apple"]
toy = pathlib.Path("models/toy/toy_timed.csv")
if toy.exists():
    for row in csv.DictReader(toy.open()):
        seeds.append(f"{row['old']}\t{row['new']}")
for s in seeds:
    b = s.encode()
    (out / f"seed-{hashlib.sha256(b).hexdigest()[:16]}").write_bytes(b)
PY

for t in "${targets[@]}"; do
    echo "== $t: ${secs} s"
    cargo +nightly fuzz run --release "$t" -- -max_total_time="$secs" -print_final_stats=1 -max_len=65536 2>&1 |
        tee "fuzz/$t.log" | grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY|artifact_prefix|Test unit written)' || true
done
