#!/usr/bin/env bash
# The serving load test (issue 14): `qlora serve` and llama.cpp's llama-server on the same GGUF file (the
# default model, Q4_1, as we ship it), the same 80 Vicuna prompts, greedy, 64 tokens a reply, streamed,
# at 1, 4 and 16 concurrent clients (qlora-bench serve-load, our own client, on loopback).
#   - ours on the base alone, then with two LoRA adapters (r 16 and r 64, trained here on demo/quill.jsonl)
#     mixed with the base request by request: base, quill16, quill64, base, ...;
#   - llama-server on the base alone, 16 slots (llama.cpp built from the llama-cpp-python sdist:
#     bench/llama_cpp_setup.sh), then with the same two adapters written by `qlora export-adapter` in llama.cpp's
#     LoRA GGUF (one --lora with both, comma-separated: a repeated --lora keeps only the last), mixed the same way
#     through its per-request "lora" field (--lora-init-without-apply).
# Usage: bench/serve_load.sh [OUT_DIR]   (default bench/out/serve-load); JSON lines, one per server and level.
# Needs: swift build -c release (qlora, qlora-bench). Runs one server at a time; nothing else should run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/out/serve-load}"
CACHE="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS="../shared/data/eval/vicuna_bench/question.jsonl"
[ -f "$PROMPTS" ] || PROMPTS="Tests/QLoRAEvaluationTests/Resources/judge/questions.jsonl"
QLORA=.build/release/qlora
BENCH=.build/release/qlora-bench
CLIENTS="${CLIENTS:-1,4,16}"
LOAD=(--prompts "$PROMPTS" --clients "$CLIENTS" --requests-per-client 4 --min-requests 8 --seconds 300 --max-tokens 64)
mkdir -p "$OUT"
say() { echo "serve-load: $*" >&2; }

# Two adapters, trained as the demo trains (about a minute and a half each on 2 cores).
for r in 16 64; do
  dir="$OUT/quill$r"
  if [ ! -f "$dir/adapter_model.safetensors" ]; then
    say "training adapter quill$r (r $r)"
    "$QLORA" train --data demo/quill.jsonl --output "$dir" --lora-r "$r" --lora-alpha $((2 * r)) --lora-dropout 0.05 \
      --learning-rate 1e-3 --batch-size 4 --grad-accum 2 --max-seq-len 256 --val-split 0.1 --eval-every 10 >"$dir.log" 2>&1 \
      || { say "training failed: see $dir.log"; exit 1; }
  fi
done

# Waits for "listening on" (ours) or /health 200 (llama-server) on PORT.
wait_for() {
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  say "the server on port $1 did not come up"; return 1
}

PORT=18431
run_ours() {
  local label="$1"; shift
  local models="$1"; shift
  "$QLORA" serve --port "$PORT" --max-batch 16 --max-queue 64 "$@" >"$OUT/$label.stdout" 2>"$OUT/$label.log" &
  local pid=$!
  wait_for "$PORT"
  say "$label: $models"
  "$BENCH" serve-load --url "http://127.0.0.1:$PORT" --models "$models" --label "$label" "${LOAD[@]}" | tee -a "$OUT/results.jsonl"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

: >"$OUT/results.jsonl"
BASE_ID=$(basename "$MODEL")
run_ours qlora-base "$BASE_ID"
run_ours qlora-mixed "$BASE_ID,quill16,quill64" --adapter "quill16=$OUT/quill16" --adapter "quill64=$OUT/quill64"

eval "$(bash bench/llama_cpp_setup.sh - | grep '^LLAMA_CPP_')"
"$LLAMA_CPP_BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -t "$(nproc)" -tb "$(nproc)" --parallel 16 -c 16384 \
  --no-webui >"$OUT/llama-server.log" 2>&1 &
pid=$!
wait_for "$PORT"
say "llama-server ($LLAMA_CPP_COMMIT)"
"$BENCH" serve-load --url "http://127.0.0.1:$PORT" --models "$BASE_ID" --label "llama-server" "${LOAD[@]}" | tee -a "$OUT/results.jsonl"
kill "$pid"; wait "$pid" 2>/dev/null || true

for r in 16 64; do
  [ -f "$OUT/quill$r.gguf" ] || "$QLORA" export-adapter --adapter "$OUT/quill$r" --model "$MODEL" --output "$OUT/quill$r.gguf" >/dev/null
done
"$LLAMA_CPP_BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -t "$(nproc)" -tb "$(nproc)" --parallel 16 -c 16384 \
  --lora "$OUT/quill16.gguf,$OUT/quill64.gguf" --lora-init-without-apply --no-webui >"$OUT/llama-server-mixed.log" 2>&1 &
pid=$!
wait_for "$PORT"
say "llama-server with two adapters ($LLAMA_CPP_COMMIT)"
"$BENCH" serve-load --url "http://127.0.0.1:$PORT" --models "$BASE_ID,lora:0,lora:1" --label "llama-server-mixed" "${LOAD[@]}" | tee -a "$OUT/results.jsonl"
kill "$pid"; wait "$pid" 2>/dev/null || true
say "results: $OUT/results.jsonl"
