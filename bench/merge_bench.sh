#!/usr/bin/env bash
# `qlora merge`'s time and peak resident memory (/usr/bin/time -v) on the default model with the demo's adapter
# recipe and on a synthetic 1.1B Llama (TinyLlama's shape: qlora-bench synth-llama, random bf16 weights) with a
# random r-16 adapter on every projection; folder (bf16) and GGUF (q8_0) outputs. Writes bench/out/merge-bench/.
# Usage: bench/merge_bench.sh [ADAPTER_FOR_THE_DEFAULT_MODEL]  (default: a random r-16 adapter)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out/merge-bench
QLORA=.build/release/qlora
BENCH=.build/release/qlora-bench
CACHE="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"
mkdir -p "$OUT"
grep -m1 "model name" /proc/cpuinfo >&2
measure() {  # label, then the merge arguments
  local label="$1"; shift
  /usr/bin/time -v "$QLORA" merge "$@" --force --quiet 2>"$OUT/$label.time" >/dev/null
  printf "%s\t%s\t%s\n" "$label" "$(awk -F': ' '/Elapsed/ {print $2}' "$OUT/$label.time")" \
    "$(awk -F': ' '/Maximum resident/ {printf "%.0f MB", $2 / 1024}' "$OUT/$label.time")"
}
SMALL_ADAPTER="${1:-$OUT/smollm2-adapter}"
if [ -z "${1:-}" ] && [ ! -d "$SMALL_ADAPTER" ]; then
  mkdir -p "$OUT/smollm2-shape"
  printf '{"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}' >"$OUT/smollm2-shape/config.json"
  "$BENCH" synth-adapter "$OUT/smollm2-shape" "$SMALL_ADAPTER"
fi
[ -d "$OUT/tinyllama" ] || { "$BENCH" synth-llama "$OUT/tinyllama"; cp Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json "$OUT/tinyllama/tokenizer.json"; }
[ -d "$OUT/tinyllama-adapter" ] || "$BENCH" synth-adapter "$OUT/tinyllama" "$OUT/tinyllama-adapter"
printf "merge\twall\tpeak RSS\n"
measure smollm2-folder-bf16 --model "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" --adapter "$SMALL_ADAPTER" --output "$OUT/smollm2-merged" --dtype bf16
measure smollm2-gguf-q8_0 --model "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" --adapter "$SMALL_ADAPTER" --output "$OUT/smollm2-merged.gguf" --gguf-type q8_0
measure tinyllama-folder-bf16 --model "$OUT/tinyllama" --adapter "$OUT/tinyllama-adapter" --output "$OUT/tinyllama-merged" --dtype bf16
measure tinyllama-gguf-q8_0 --model "$OUT/tinyllama" --adapter "$OUT/tinyllama-adapter" --output "$OUT/tinyllama-merged.gguf" --gguf-type q8_0
"$BENCH" load "$OUT/tinyllama" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("for scale: the 1.1B model loaded in NF4 (qlora-bench load): %.0f MB peak RSS; one layer in f32: %.0f MB"
      % (r["peak_rss_bytes"] / 2**20, r["one_layer_f32_bytes"] / 2**20))'
