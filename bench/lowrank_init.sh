#!/usr/bin/env bash
# Where PiSSA and LoftQ start, against plain QLoRA: the held-out loss of the default model before the first step
# (demo/quill.jsonl, a tenth held out, f32 products so that only the base's quantization differs), for the f32 model
# (no quantization: the floor), NF4 + double quantization with LoRA's zero start, PiSSA (the residual quantized) and
# LoftQ after 1, 2 and 5 rounds; r 64 (the paper's), alpha 16. Usage: bash bench/lowrank_init.sh [qlora binary]
set -euo pipefail
BIN=${1:-.build/release/qlora}
MODEL=${QLORA_CACHE:-$HOME/.cache/swift-qlora}/models/SmolLM2-135M-Instruct.Q4_1.gguf
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "| start | quantization of the frozen base | held-out loss before training | init seconds |"
echo "|---|---|---:|---:|"
run() {
  local label=$1 quant=$2; shift 2
  local out="$TMP/$RANDOM"
  local t0=$(date +%s.%N)
  local json=$("$BIN" train --model "$MODEL" --data demo/quill.jsonl --output "$out" --max-steps 1 --batch-size 2 --grad-accum 1 \
    --max-seq-len 256 --val-split 0.1 --compute-dtype f32 --lora-r 64 --quant-type "$quant" --json "$@" 2>"$TMP/log")
  local init=$(grep -oE "(PiSSA|LoftQ)[^:]*: A and B of [0-9]+ projections .* in [0-9.]+ s" "$TMP/log" | grep -oE "[0-9.]+ s$" || echo "-")
  echo "| $label | $quant | $(python3 -c "import json,sys; print(f\"{json.loads(sys.argv[1])['val_loss_before']:.4f}\")" "$json") | ${init% s} |"
}
run "LoRA (B = 0)" none
run "LoRA (B = 0)" nf4
run "PiSSA" nf4 --lora-init pissa
run "LoftQ, 1 round" nf4 --lora-init loftq
run "LoftQ, 2 rounds" nf4 --lora-init loftq --loftq-iter 2
run "LoftQ, 5 rounds" nf4 --lora-init loftq --loftq-iter 5
