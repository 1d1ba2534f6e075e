#!/usr/bin/env bash
# QLoRA's claim on our model: finetuning on a 4-bit NF4 base matches finetuning on the f32 base.
# The same data (demo/quill.jsonl), seed, LoRA and batches for both; 200 optimizer steps each.
# Prints both loss curves (training loss averaged over windows of 20 steps, validation loss every 50).
# Usage: bench/nf4_vs_f32.sh [STEPS] [OUT]   (about 3 minutes per run on 2 cores with bf16 compute)
# LORA_R, LORA_ALPHA, LORA_DROPOUT override the LoRA settings (16, 32, 0.05); DATA the dataset (demo/quill.jsonl), SEED the seed (1).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.build/release/qlora
STEPS="${1:-200}"
OUT="${2:-bench/out/nf4-vs-f32}"
R="${LORA_R:-16}" ALPHA="${LORA_ALPHA:-32}" DROPOUT="${LORA_DROPOUT:-0.05}"
DATA="${DATA:-demo/quill.jsonl}" SEED="${SEED:-1}"
mkdir -p "$OUT"
for qt in nf4 none; do
  rm -rf "$OUT/$qt"
  "$BIN" train --data "$DATA" --output "$OUT/$qt" --quant-type "$qt" --lora-r "$R" --lora-alpha "$ALPHA" \
    --lora-dropout "$DROPOUT" --learning-rate 2e-4 --max-steps "$STEPS" --batch-size 2 --grad-accum 1 --max-seq-len 128 \
    --val-split 0.1 --eval-every 50 --seed "$SEED" --json > "$OUT/$qt.json"
done
python3 - "$OUT" "$STEPS" <<'PY'
import json, sys
out, steps = sys.argv[1], int(sys.argv[2])
runs = {}
for qt in ("nf4", "none"):
    rows = [json.loads(l) for l in open(f"{out}/{qt}/metrics.jsonl")]
    runs[qt] = ({r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r})
w = 20
print(f"| steps | NF4 train loss | f32 train loss | NF4 / f32 |")
print(f"|---|---:|---:|---:|")
for end in range(w, steps + 1, w):
    a = sum(runs["nf4"][0][s] for s in range(end - w + 1, end + 1)) / w
    b = sum(runs["none"][0][s] for s in range(end - w + 1, end + 1)) / w
    print(f"| {end - w + 1}-{end} | {a:.4f} | {b:.4f} | {a / b:.4f} |")
print()
print(f"| step | NF4 validation loss | f32 validation loss | NF4 / f32 |")
print(f"|---|---:|---:|---:|")
for s in sorted(runs["nf4"][1]):
    a, b = runs["nf4"][1][s], runs["none"][1].get(s)
    if b is not None:
        print(f"| {s} | {a:.4f} | {b:.4f} | {a / b:.4f} |")
PY
