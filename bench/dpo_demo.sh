#!/usr/bin/env bash
# SFT then DPO on the default model, as a Zephyr-style recipe runs on a laptop:
#   1. supervised finetuning on demo/quill.jsonl (less a held-out tenth);
#   2. preference pairs from the same data: chosen = the dataset's answer, rejected = the base model's own greedy answer;
#   3. DPO on top of the SFT adapter (the reference is the SFT model: the base with the SFT adapter, the new adapter off),
#      evaluated on the held-out pairs every few steps.
# Prints the training and held-out reward margins and the held-out chosen answers' log-probability per evaluation,
# and writes bench/results/dpo_demo.json. Resumable: each stage is skipped when its output exists.
#
#   bash bench/dpo_demo.sh [DPO_STEPS] [QLORA_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-40}"
BIN="${2:-.build/release/qlora}"
OUT="${QLORA_DPO_DEMO_DIR:-bench/out/dpo_demo}"
mkdir -p "$OUT" bench/results

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open("demo/quill.jsonl") if l.strip()]
single = [(i, r["messages"]) for i, r in enumerate(rows)
          if len(r["messages"]) == 2 and r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"]
held = {i for k, (i, _) in enumerate(single) if k % 10 == 0}
with open(f"{out}/sft_train.jsonl", "w") as f:
    for i, r in enumerate(rows):
        if i not in held:
            f.write(json.dumps(r) + "\n")
with open(f"{out}/prompts.jsonl", "w") as f:
    for i, m in single:
        f.write(json.dumps({"question_id": i, "prompt": m[0]["content"]}) + "\n")
with open(f"{out}/split.json", "w") as f:
    json.dump({"held": sorted(held), "single": [i for i, _ in single]}, f)
print(f"{len(rows)} conversations: {len(single)} single-turn, {len(held)} held out")
EOF

if [ ! -s "$OUT/sft/adapter_model.safetensors" ]; then
  echo "== 1. SFT on demo/quill.jsonl (held-out tenth left out)"
  "$BIN" train --data "$OUT/sft_train.jsonl" --output "$OUT/sft" --lora-r 16 --learning-rate 1e-3 --epochs 2 --val-split 0
fi

if [ ! -s "$OUT/base_answers.jsonl" ] || [ "$(wc -l < "$OUT/base_answers.jsonl")" -lt "$(wc -l < "$OUT/prompts.jsonl")" ]; then
  echo "== 2. The base model's own greedy answers (the rejected side)"
  "$BIN" eval generate --prompts "$OUT/prompts.jsonl" --output "$OUT/base_answers.jsonl" --temperature 0 --max-tokens 96 --batch 8
fi

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open("demo/quill.jsonl") if l.strip()]
split = json.load(open(f"{out}/split.json"))
held = set(split["held"])
base = {json.loads(l)["question_id"]: json.loads(l)["choices"][0]["turns"][0] for l in open(f"{out}/base_answers.jsonl") if l.strip()}
n = {"train": 0, "val": 0}
with open(f"{out}/pairs_train.jsonl", "w") as t, open(f"{out}/pairs_val.jsonl", "w") as v:
    for i in split["single"]:
        m = rows[i]["messages"]
        if base[i].strip() == m[1]["content"].strip():
            continue
        pair = {"prompt": [m[0]], "chosen": [m[1]], "rejected": [{"role": "assistant", "content": base[i]}]}
        (v if i in held else t).write(json.dumps(pair) + "\n")
        n["val" if i in held else "train"] += 1
print(f"pairs: {n['train']} train, {n['val']} held out")
EOF

if [ ! -s "$OUT/dpo/adapter_model.safetensors" ]; then
  echo "== 3. DPO on top of the SFT adapter"
  "$BIN" train --method dpo --adapter "$OUT/sft" --data "$OUT/pairs_train.jsonl" --val-data "$OUT/pairs_val.jsonl" --output "$OUT/dpo" \
    --lora-r 16 --learning-rate 1e-4 --batch-size 2 --grad-accum 4 --max-steps "$STEPS" --eval-every 5 --max-seq-len 384 --lora-dropout 0
fi

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
lines = [json.loads(l) for l in open(f"{out}/dpo/metrics.jsonl") if l.strip()]
train = [l for l in lines if "loss" in l]
evals = [l for l in lines if "val_loss" in l]
print(f"{'step':>5} {'val loss':>9} {'held-out margin':>16} {'held-out acc':>13} {'held-out logp(chosen)':>22}")
for l in evals:
    print(f"{l['step']:>5} {l['val_loss']:>9.4f} {l['eval_rewards/margins']:>16.4f} {l['eval_rewards/accuracies']:>13.2f} {l['eval_logps/chosen']:>22.2f}")
k = max(1, len(train) // 5)
first, last = train[:k], train[-k:]
mean = lambda xs, key: sum(x[key] for x in xs) / len(xs)
print(f"training margin: first {k} steps {mean(first, 'rewards/margins'):.4f}, last {k} steps {mean(last, 'rewards/margins'):.4f}")
speed = sorted(l["tokens_per_second"] for l in train[1:])
summary = {"steps": len(train), "eval": evals, "train_margin_first": mean(first, "rewards/margins"),
           "train_margin_last": mean(last, "rewards/margins"), "median_tokens_per_second": speed[len(speed) // 2] if speed else None}
json.dump(summary, open("bench/results/dpo_demo.json", "w"), indent=1)
print(f"median DPO step: {summary['median_tokens_per_second']:.0f} tokens/s")
EOF
