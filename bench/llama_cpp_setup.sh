#!/usr/bin/env bash
# llama.cpp for the side-by-side inference bench (bench/inference_bench.py), from nothing but PyPI:
#   1. the source vendored in the llama-cpp-python sdist (pip download --no-binary), built with cmake for
#      this CPU (GGML_NATIVE, as a llama.cpp user builds it): llama-bench, llama-batched-bench, llama-quantize,
#      llama-server;
#   2. the default model as a Hugging Face folder (its GGUF weights dequantized to f32 by transformers, the
#      real SmolLM2 tokenizer from our fixtures), converted by llama.cpp's own convert_hf_to_gguf.py to F16
#      and quantized by llama-quantize to Q4_0 and Q4_K_M.
# Usage: bench/llama_cpp_setup.sh PYTHON   (PYTHON: the reference stack, bench/requirements.txt; "-" builds
# llama.cpp and skips step 2, for bench/serve_load.sh, which serves the GGUF file we ship as it is)
# Everything goes to $QLORA_CACHE/llama.cpp; steps already done are skipped. Prints `KEY=VALUE` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$1"
CACHE="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"
VERSION=0.3.36
DIR="$CACHE/llama.cpp"
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
say() { echo "llama.cpp setup: $*" >&2; }
mkdir -p "$DIR"

if [ ! -d "$SRC" ]; then
  say "downloading the llama-cpp-python $VERSION sdist"
  python3 -m pip download --quiet --no-binary llama-cpp-python --no-deps "llama-cpp-python==$VERSION" -d "$DIR" >&2
  tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
# The sdist names the llama.cpp commit it vendors in its changelog ("update llama.cpp to ggml-org/llama.cpp@...").
COMMIT=$(awk -v v="## [$VERSION]" '$0 == v {f = 1; next} f && /^## / {exit} f && /llama.cpp@/ {sub(/.*llama.cpp@/, ""); print; exit}' \
  "$DIR/llama_cpp_python-$VERSION/CHANGELOG.md")
BIN="$SRC/build/bin"
if [ ! -x "$BIN/llama-bench" ] || [ ! -x "$BIN/llama-batched-bench" ] || [ ! -x "$BIN/llama-quantize" ] || [ ! -x "$BIN/llama-server" ] \
   || [ ! -x "$BIN/llama-simple" ] || [ ! -x "$BIN/llama-perplexity" ] || [ ! -x "$BIN/llama-completion" ]; then
  command -v cmake >/dev/null || { say "installing cmake"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake >&2; }
  say "building llama.cpp $COMMIT (a few minutes on 2 cores)"
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF >&2
  cmake --build "$SRC/build" -j "$(nproc)" --target llama-bench llama-batched-bench llama-quantize llama-server \
    llama-simple llama-perplexity llama-completion >&2
fi
if [ "$PY" = "-" ]; then
  echo "LLAMA_CPP_COMMIT=$COMMIT"
  echo "LLAMA_CPP_BIN=$BIN"
  exit 0
fi

HF="bench/out/llama.cpp-hf"
if [ ! -f "$DIR/smollm2-f16.gguf" ]; then
  say "writing the default model as a Hugging Face folder ($HF)"
  "$PY" - "$MODEL" "$HF" <<'PY'
import json, os, shutil, sys
sys.path.insert(0, "bench")
from reference_stack import dequantized_folder
model, out = sys.argv[1], sys.argv[2]
folder = dequantized_folder(model)
os.makedirs(out, exist_ok=True)
target = os.path.join(out, "model.safetensors")
if not os.path.exists(target):
    os.symlink(os.path.abspath(os.path.join(folder, "model.safetensors")), target)
config = json.load(open(os.path.join(folder, "config.json")))
config["architectures"] = ["LlamaForCausalLM"]  # transformers' GGUF loader leaves them out
config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
json.dump(config, open(os.path.join(out, "config.json"), "w"))
shutil.copy("Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json", os.path.join(out, "tokenizer.json"))
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
           "unk_token": "<|endoftext|>", "model_max_length": 8192}, open(os.path.join(out, "tokenizer_config.json"), "w"))
PY
  say "converting with convert_hf_to_gguf.py (F16)"
  "$PY" "$SRC/convert_hf_to_gguf.py" "$HF" --outtype f16 --outfile "$DIR/smollm2-f16.gguf.part" >&2
  mv "$DIR/smollm2-f16.gguf.part" "$DIR/smollm2-f16.gguf"
fi
for t in Q4_0 Q4_K_M; do
  if [ ! -f "$DIR/smollm2-$t.gguf" ]; then
    say "quantizing to $t"
    "$BIN/llama-quantize" "$DIR/smollm2-f16.gguf" "$DIR/smollm2-$t.gguf.part" "$t" >&2
    mv "$DIR/smollm2-$t.gguf.part" "$DIR/smollm2-$t.gguf"
  fi
done
echo "LLAMA_CPP_COMMIT=$COMMIT"
echo "LLAMA_CPP_VERSION=llama-cpp-python $VERSION"
echo "LLAMA_CPP_BIN=$BIN"
echo "LLAMA_CPP_MODELS=$DIR"
