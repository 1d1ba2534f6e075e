#!/usr/bin/env bash
# One QLoRA training step per model family at the same shapes, side by side with Llama's (the block is written
# once, so a family should cost what its extra parts cost: Gemma 3's two more norms and q/k norms, Qwen3's q/k
# norms, Phi-3's fused projections). Two sizes: the tiny test models of Tests/QLoRAModelTests/Resources (made by
# scripts/reference/make_family_fixtures.py) against a random Llama of their shapes, and random bf16 checkpoints
# of SmolLM2-like shapes (hidden 576, intermediate 1536, 8 layers, 9 / 3 heads, vocab 8192) of each family.
# Rounds interleave the models; the best step of each model's rounds is reported (the tiny models' steps take about
# a millisecond, so theirs are mostly per-call overhead). Needs only the Swift build.
# Usage: bench/family_bench.sh [ROUNDS]   (default 3; writes bench/out/family.md)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
BENCH=.build/release/qlora-bench
[ -x "$BENCH" ] || swift build -c release --product qlora-bench >&2
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
R=Tests/QLoRAModelTests/Resources
mkdir -p bench/out
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') (family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' '))"

# name|model|batch|seq
cases=()
# Tiny: each fixture and a Llama of its shapes (hidden 64, intermediate 128, 4 / 2 heads, vocab 320).
for f in qwen3:2:32 gemma3:6:32 phi3:2:16; do
  IFS=: read -r fam layers hd <<<"$f"
  "$BENCH" synth-llama "$W/tiny-llama-$fam" --hidden 64 --intermediate 128 --layers "$layers" --heads 4 --kv-heads 2 --vocab 320 --head-dim "$hd" >/dev/null
  cases+=("tiny $fam|$R/tiny-$fam|4|64" "tiny llama like $fam|$W/tiny-llama-$fam|4|64")
done
for fam in llama qwen3 gemma3 phi3; do
  "$BENCH" synth-llama "$W/$fam" --hidden 576 --intermediate 1536 --layers 8 --heads 9 --kv-heads 3 --vocab 8192 --family "$fam" >/dev/null
  cases+=("576x8 $fam|$W/$fam|2|512")
done

declare -A best
for round in $(seq "$ROUNDS"); do
  for c in "${cases[@]}"; do
    IFS='|' read -r name model batch seq <<<"$c"
    steps=3; [ "${name#tiny}" != "$name" ] && steps=20  # a tiny step takes about a millisecond: more of them
    tps=$("$BENCH" train-step "$model" --batch "$batch" --seq "$seq" --steps "$steps" --rank 16 --compute-dtype bf16 \
          | sed -n 's/.*"tokens_per_second": *\([0-9.]*\).*/\1/p')
    prev="${best[$name]:-0}"
    best[$name]=$(python3 -c "print(max($prev, $tps))")
    echo "round $round: $name $tps tokens/s" >&2
  done
done

{
  echo "QLoRA training step per family ($CPU, $ROUNDS rounds, best of each; bf16 compute, r 16, gradient checkpointing)"
  echo
  echo "| model | batch x seq | tokens/s | vs Llama of the same shapes |"
  echo "|---|---|---|---|"
  for c in "${cases[@]}"; do
    IFS='|' read -r name model batch seq <<<"$c"
    case "$name" in
      "tiny llama like "*) continue ;;
      "tiny "*) ref="${best["tiny llama like ${name#tiny }"]}" ;;
      *) ref="${best["576x8 llama"]}" ;;
    esac
    ratio=$(python3 -c "print(f'{${best[$name]} / $ref:.2f}')")
    printf '| %s | %s x %s | %.0f | %s (Llama %.0f) |\n' "$name" "$batch" "$seq" "${best[$name]}" "$ratio" "$ref"
  done
} | tee bench/out/family.md
