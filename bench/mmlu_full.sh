#!/usr/bin/env bash
# The full 5-shot MMLU test set (57 subjects, 14,042 questions) on the default model, one subject at a time
# so that a stopped run resumes where it was: each subject's `qlora eval mmlu --json` lands in
# OUT/SUBJECT.json (atomically), with its wall and CPU seconds in OUT/times.tsv; subjects already there are
# skipped. At the end, the micro and macro accuracy over every subject.
# Usage: bench/mmlu_full.sh OUT_DIR [qlora eval mmlu options, e.g. --adapter DIR]
# Run it alone: its times are the point (`nice -n 19` when sharing the machine; the CPU seconds stay comparable).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$1"; shift
DATA="${MMLU_DATA:-../shared/data/mmlu/data}"
QLORA=.build/release/qlora
mkdir -p "$OUT"
[ -f "$OUT/times.tsv" ] || printf "subject\tquestions\twall_s\tuser_s\tsys_s\n" >"$OUT/times.tsv"
for csv in "$DATA"/test/*_test.csv; do
  subject=$(basename "$csv" _test.csv)
  [ -f "$OUT/$subject.json" ] && continue
  TIMEFORMAT="%R %U %S"
  { t=$( { time "$QLORA" eval mmlu --data "$DATA" --subjects "$subject" --json "$@" >"$OUT/$subject.json.part" 2>"$OUT/$subject.log"; } 2>&1 ); } \
    || { echo "mmlu: $subject failed, see $OUT/$subject.log" >&2; exit 1; }
  n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["questions"])' "$OUT/$subject.json.part")
  mv "$OUT/$subject.json.part" "$OUT/$subject.json"
  read -r wall user sys <<<"$t"
  printf "%s\t%s\t%s\t%s\t%s\n" "$subject" "$n" "$wall" "$user" "$sys" >>"$OUT/times.tsv"
  echo "mmlu: $subject: $n questions, ${wall}s" >&2
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
correct = total = 0
accuracies = []
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    for s in json.load(open(f))["subjects"]:
        correct += s["correct"]; total += s["total"]; accuracies.append(s["correct"] / s["total"])
rows = [l.split("\t") for l in open(os.path.join(out, "times.tsv")).read().splitlines()[1:]]
wall = sum(float(r[2]) for r in rows); cpu = sum(float(r[3]) + float(r[4]) for r in rows)
print(json.dumps({"subjects": len(accuracies), "questions": total, "correct": correct,
                  "micro_accuracy": correct / max(total, 1), "macro_accuracy": sum(accuracies) / max(len(accuracies), 1),
                  "wall_seconds": wall, "cpu_seconds": cpu}))
PY
