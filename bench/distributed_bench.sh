#!/usr/bin/env bash
# Data-parallel training on this machine: `qlora train` on the default model as one process with 1 thread, one
# process with 2 threads, and `mpirun -np 2` with 1 thread a rank (OpenMPI over loopback), the same global batches
# (STEPS steps of BATCH x ACCUM sequences of up to SEQ tokens, r 64). Reports the mean tokens/s of the steps after
# the first (metrics.jsonl), the scaling efficiency of 2 ranks against 1 process of 1 thread, and the share of a
# step rank 0 spent in the all-reduce (allreduce_seconds, waiting for the slower rank included).
# Usage: bench/distributed_bench.sh [STEPS] [SEQ]   (defaults 5 and 256; writes bench/out/distributed.md)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-5}"; SEQ="${2:-256}"; BATCH=2; ACCUM=4
CACHE="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
Q=.build/release/qlora
[ -x "$Q" ] || swift build -c release --product qlora >&2
W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT
python3 - "$W/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(64):
        f.write(json.dumps({"instruction": f"Write a few sentences about the number {i}.",
                            "output": " ".join(f"The number {i} follows {i - 1} and comes before {i + 1}." for _ in range(12))}) + "\n")
PY
ARGS=(train --model "$MODEL" --data "$W/data.jsonl" --lora-r 64 --max-steps "$STEPS" --batch-size "$BATCH" --grad-accum "$ACCUM"
      --max-seq-len "$SEQ" --val-split 0 --seed 1 --template guanaco --json)
mean() { python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if '\"loss\"' in l][1:]; print(sum(x[sys.argv[2]] for x in r)/len(r))" "$@"; }
QLORA_THREADS=1 "$Q" "${ARGS[@]}" --output "$W/one1" >/dev/null 2>&1
QLORA_THREADS=2 "$Q" "${ARGS[@]}" --output "$W/one2" >/dev/null 2>&1
QLORA_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np 2 "$Q" "${ARGS[@]}" --output "$W/two" >/dev/null 2>&1
t11=$(mean "$W/one1/metrics.jsonl" tokens_per_second); t12=$(mean "$W/one2/metrics.jsonl" tokens_per_second)
t2=$(mean "$W/two/metrics.jsonl" tokens_per_second); ar=$(mean "$W/two/metrics.jsonl" allreduce_seconds)
params=$(python3 -c "import json; print(json.load(open('$W/two/adapter_config.json'))['r'])")
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') (family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' '))"
python3 - "$t11" "$t12" "$t2" "$ar" "$STEPS" "$SEQ" "$BATCH" "$ACCUM" "$CPU" <<'PY' | tee bench/out/distributed.md
import sys
t11, t12, t2, ar = map(float, sys.argv[1:5]); steps, seq, batch, accum = map(int, sys.argv[5:9]); cpu = sys.argv[9]
tokens_per_step = None
print(f"Data-parallel QLoRA on the default model ({cpu}; {steps} steps of {batch} x {accum} sequences of up to {seq} tokens, "
      f"r 64, bf16 compute; mean of the steps after the first)\n")
print("| run | tokens/s | vs 1 process, 1 thread |")
print("|---|---|---|")
print(f"| 1 process, 1 thread | {t11:.0f} | 1.00 |")
print(f"| 1 process, 2 threads | {t12:.0f} | {t12 / t11:.2f} |")
print(f"| mpirun -np 2, 1 thread each | {t2:.0f} | {t2 / t11:.2f} (scaling efficiency {t2 / t11 / 2:.0%}) |")
step_seconds = batch * accum * seq / t2  # an upper bound on tokens a step (padding is not trained)
print(f"\nAll-reduce: {ar:.3f} s a step on rank 0 (waiting for the slower rank included), "
      f"about {ar / (ar + step_seconds) * 100:.1f}% of a step at these tokens/s.")
PY
