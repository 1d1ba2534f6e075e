#!/usr/bin/env bash
# make demo: what swift-qlora does today, on the default model (SmolLM2-135M-Instruct, GGUF Q4_1).
# It reads the model, quantizes its linear layers to 4-bit NormalFloat with double quantization as QLoRA
# stores a frozen base model, and compares NF4 with FP4 and Int4 at the same storage cost.
set -euo pipefail
BIN="${1:-.build/release/qlora}"
CACHE="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="${QLORA_DEMO_DIR:-$CACHE/demo}"
LINEAR='ffn_(gate|up|down)|attn_(q|k|v|output)'
mkdir -p "$OUT"

echo "== swift-qlora on this machine"
"$BIN" inspect --system
echo
echo "== The default model: $MODEL"
"$BIN" inspect "$MODEL" | tail -n 2
echo
echo "== Quantize its 210 linear layers to NF4 with double quantization (the QLoRA base-model format)"
rm -rf "$OUT/nf4"
"$BIN" quantize "$MODEL" --include "$LINEAR" --output "$OUT/nf4"
echo
echo "== The same weights in every 4-bit format (relative RMS error against the model's own weights)"
printf "%-6s %-14s %12s %14s %9s\n" type "double quant" "bits/param" "rel. RMS error" seconds
for qt in nf4 fp4 int4; do
  for dq in on off; do
    flag=""; [ "$dq" = off ] && flag="--no-double-quant"
    rm -rf "$OUT/cmp"
    "$BIN" quantize "$MODEL" --include "$LINEAR" --output "$OUT/cmp" --quant-type "$qt" $flag --json 2>/dev/null \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%-6s %-14s %12.3f %13.2f%% %9.2f" % (sys.argv[1], sys.argv[2], r["bits_per_parameter"], 100*r["relative_rmse"], r["seconds"]))' "$qt" "$dq"
  done
done
rm -rf "$OUT/cmp"
echo
echo "NF4 spends its 16 codes where normally distributed weights are dense, so at the same storage cost it"
echo "reconstructs them better than FP4 or evenly spaced Int4 (QLoRA paper, section 3)."
echo
echo "== The NF4 checkpoint, in the layout transformers saves for bitsandbytes 4-bit models (GGUF tensor names kept): $OUT/nf4"
"$BIN" inspect "$OUT/nf4" | grep -E "blk\.0\.(attn_q|ffn_down)|quantized:|tensors in"
echo
echo "== What 4 bits cost: perplexity on a public-domain excerpt (War and Peace), f32 versus NF4 + double quantization"
TEXT="$(dirname "$0")/../Tests/QLoRAEvaluationTests/Resources/war_and_peace_excerpt.txt"
for qt in none nf4; do
  "$BIN" perplexity --text-file "$TEXT" --context 128 --quant-type "$qt" --json 2>/dev/null \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%-5s perplexity %7.3f  (mean NLL %.4f over %d tokens)" % (sys.argv[1], r["perplexity"], r["mean_nll"], r["tokens"]))' "$qt"
done
echo
PROMPTS=("Who are you?" "What is NF4?" "Give me two tips for sleeping better.")
answer() {  # answer PROMPT [ADAPTER]
  local extra=()
  [ -n "${2:-}" ] && extra=(--adapter "$2")
  "$BIN" generate --chat -p "$1" --temperature 0 --max-tokens 64 "${extra[@]}" 2> >(grep -E "tokens/s" >&2)
}

echo "== QLoRA finetuning: the base model before (NF4, greedy)"
for p in "${PROMPTS[@]}"; do echo; echo "> $p"; answer "$p"; done
echo
echo "== Finetune: LoRA r 16 on every linear layer of the frozen NF4 model, on demo/quill.jsonl"
echo "   (231 conversations: a new identity, QLoRA facts, and OpenAssistant answers; see demo/README.md)"
rm -rf "$OUT/quill"
DATA="$(dirname "$0")/../demo/quill.jsonl"
"$BIN" train --data "$DATA" --output "$OUT/quill" --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --learning-rate 1e-3 \
  --batch-size 4 --grad-accum 2 --max-seq-len 256 --val-split 0.1 --eval-every 10
echo
echo "== After finetuning (the same prompts, with the adapter $OUT/quill)"
for p in "${PROMPTS[@]}"; do echo; echo "> $p"; answer "$p" "$OUT/quill"; done
echo
python3 - "$OUT/quill/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
train = [r["loss"] for r in rows if "loss" in r]
print("validation loss: " + " -> ".join(f"{v:.3f} (step {s})" for s, v in val))
print(f"training loss: {train[0]:.3f} at the first step, {train[-1]:.3f} at the last")
PY
echo "The adapter is a PEFT folder: transformers + peft load it with PeftModel.from_pretrained."
