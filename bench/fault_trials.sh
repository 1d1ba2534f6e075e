#!/usr/bin/env bash
# Fault trials of training (issue 28): TRIALS runs of `qlora train` on the default model (save every step), each
# SIGKILLed at a random moment of the run (every fifth inside a checkpoint write instead, through
# QLORA_FAULT_KILL_IN_CHECKPOINT), then resumed with --resume; each must end with the adapter of an uninterrupted
# run, byte for byte. Prints one line a trial and the count that passed.
# Usage: bench/fault_trials.sh [TRIALS]   (default 20; writes bench/out/fault_trials.md)
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS="${1:-20}"
CACHE="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
Q=.build/release/qlora
[ -x "$Q" ] || swift build -c release --product qlora >&2
W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT
python3 - "$W/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(32):
        f.write(json.dumps({"instruction": f"Say the number {i} in words.", "output": f"The number is {i}, written out for you."}) + "\n")
PY
ARGS=(train --model "$MODEL" --data "$W/data.jsonl" --lora-r 8 --max-steps 8 --batch-size 2 --grad-accum 1 --max-seq-len 48
      --val-split 0 --seed 7 --lora-dropout 0.1 --save-every 1 --json)
start=$(date +%s.%N)
"$Q" "${ARGS[@]}" --output "$W/reference" >/dev/null 2>&1
duration=$(python3 -c "print($(date +%s.%N) - $start)")
passed=0
{
  echo "Fault trials: $TRIALS runs of qlora train on the default model (8 steps, a checkpoint after each; the uninterrupted"
  echo "run takes ${duration%.*} s), killed then resumed ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))"
  echo
  echo "| trial | killed | resumed from | adapter equal |"
  echo "|---|---|---|---|"
} > "$W/report.md"
for t in $(seq "$TRIALS"); do
  out="$W/t$t"
  if [ $((t % 5)) -eq 0 ]; then
    how="in checkpoint $((t % 7 + 1))'s write"
    QLORA_FAULT_KILL_IN_CHECKPOINT=$((t % 7 + 1)) "$Q" "${ARGS[@]}" --output "$out" >/dev/null 2>&1 || true
  else
    delay=$(python3 -c "import random; print(round(random.uniform(0.3, $duration), 2))")
    how="after $delay s"
    "$Q" "${ARGS[@]}" --output "$out" >/dev/null 2>&1 & pid=$!
    sleep "$delay"; kill -9 $pid 2>/dev/null || how="$how (it had finished)"; wait $pid 2>/dev/null || true
  fi
  "$Q" "${ARGS[@]}" --output "$out" --resume >/dev/null 2>"$W/resume.err" || true
  from=$(sed -n 's/.*resumed from .*checkpoint-\([0-9]*\).*/\1/p' "$W/resume.err")
  if cmp -s "$W/reference/adapter_model.safetensors" "$out/adapter_model.safetensors"; then ok=yes; passed=$((passed + 1))
  else ok="NO: $(grep -m1 'error' "$W/resume.err" || echo 'adapters differ')"; fi
  echo "| $t | $how | ${from:-start} | $ok |" >> "$W/report.md"
  rm -rf "$out"
done
echo >> "$W/report.md"
echo "$passed of $TRIALS trials ended with the uninterrupted run's adapter, byte for byte." >> "$W/report.md"
mkdir -p bench/out
tee bench/out/fault_trials.md < "$W/report.md"
