#!/usr/bin/env bash
# make bench: swift-qlora against the Python reference stack, side by side, in one run.
# The reference stack lives in a venv outside the repository: $QLORA_BENCH_PYTHON if set, else one made
# from bench/requirements.txt under $QLORA_CACHE/bench-venv (torch's PyPI wheel is large: ~5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"
PY="${QLORA_BENCH_PYTHON:-}"
if [ -z "$PY" ]; then
  VENV="$CACHE/bench-venv"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "bench: creating $VENV from bench/requirements.txt" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r bench/requirements.txt
  fi
  PY="$VENV/bin/python"
fi
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p bench/out
"$PY" bench/prepare_tensors.py "$MODEL" bench/out
"$PY" bench/quant_bench.py .build/release/qlora-bench bench/out/smollm2_mlp.safetensors bench/out/big_4096x11008.safetensors \
  | tee bench/out/quant.md
TEXT="Tests/QLoRAEvaluationTests/Resources/war_and_peace_excerpt.txt"
"$PY" bench/generate_bench.py .build/release/qlora "$MODEL" "$TEXT" | tee bench/out/generate.md
"$PY" bench/train_bench.py .build/release/qlora-bench "$MODEL" | tee bench/out/train.md
"$PY" bench/inference_bench.py .build/release/qlora-bench | tee bench/out/inference.md
