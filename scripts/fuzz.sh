#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/Sources/qlora-fuzz, each for a set time, over the seed corpora in fuzz/corpus.
#
#   scripts/fuzz.sh [SECONDS] [TARGET ...]     (default: 60 seconds, every target)
#   make fuzz FUZZ_SECONDS=1800 FUZZ_TARGETS="gguf safetensors"
#
# The build is separate from the release one (.build/fuzz, -sanitize=fuzzer,address, -DQLORA_FUZZ). Inputs that
# grow are kept in .build/fuzz/corpus/TARGET (the committed seeds are never written); a crash, hang (-timeout),
# over-allocation (-malloc_limit_mb) or sanitizer report stops its target and lands in .build/fuzz/artifacts/TARGET.
# One line per target is appended to .build/fuzz/results.tsv: target, seconds, executions, edges, features,
# corpus size, outcome. Exit status 1 when any target found something.
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${1:-60}"
shift || true
ALL_TARGETS=(json safetensors gguf tokenizer encode template config yaml dataset mmlu judging request)
if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi
FUZZ_CONFIG="${FUZZ_CONFIG:-release}"
BUILD=.build/fuzz
BIN="$BUILD/$FUZZ_CONFIG/qlora-fuzz"

for t in "${TARGETS[@]}"; do
    case " ${ALL_TARGETS[*]} " in *" $t "*) ;; *) echo "fuzz.sh: unknown target '$t' (targets: ${ALL_TARGETS[*]})" >&2; exit 2 ;; esac
done

echo "== building qlora-fuzz ($FUZZ_CONFIG, -sanitize=fuzzer,address)"
# SwiftPM passes its two sanitizers to swiftc as two flags, and swiftc keeps only the last (-sanitize=address):
# the Swift modules then get no coverage counters and libFuzzer is blind to them (measured: 8,109 counters in
# the whole binary, all from the C targets, and "no interesting inputs"). One combined flag gives both.
swift build -c "$FUZZ_CONFIG" --build-path "$BUILD" --sanitize=fuzzer --sanitize=address -Xswiftc -sanitize=fuzzer,address \
    -Xswiftc -DQLORA_FUZZ --product qlora-fuzz || exit 2

# The tokenizers that encode, dataset and request run against: the default model's first, then the reference set.
TOKS="$BUILD/tokenizers"
mkdir -p "$TOKS"
cp Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json "$TOKS/smollm2.tokenizer.json"
for xz in Tests/QLoRATokenizerTests/Resources/tokenizers/*.tokenizer.json.xz; do
    out="$TOKS/$(basename "${xz%.xz}")"
    [ -s "$out" ] || xz -dc "$xz" > "$out"
done

# Scratch files (the readers that take paths) go to memory, not the disk.
SCRATCH=/dev/shm
[ -d "$SCRATCH" ] && [ -w "$SCRATCH" ] || SCRATCH="${TMPDIR:-/tmp}"

found=0
for t in "${TARGETS[@]}"; do
    corpus="$BUILD/corpus/$t"
    artifacts="$BUILD/artifacts/$t"
    log="$BUILD/logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    echo "== $t: ${SECONDS_EACH}s"
    QLORA_FUZZ_TARGET="$t" QLORA_FUZZ_TOKENIZERS="$TOKS" TMPDIR="$SCRATCH" \
    ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=0" \
        "$BIN" "$corpus" "fuzz/corpus/$t" \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=3072 -malloc_limit_mb=1024 -max_len=65536 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 -close_fd_mask=1 > "$log" 2>&1
    rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    edges=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -o '[0-9]*')
    features=$(grep -Eo 'ft: [0-9]+' "$log" | tail -1 | grep -o '[0-9]*')
    units=$(find "$corpus" -type f | wc -l)
    if [ "$rc" -eq 0 ]; then outcome=clean; else outcome="FOUND (exit $rc): $(ls -t "$artifacts" | head -1)"; found=1; fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$SECONDS_EACH" "${execs:-?}" "${edges:-?}" "${features:-?}" "$units" "$outcome" \
        | tee -a "$BUILD/results.tsv"
    if [ "$rc" -ne 0 ]; then
        grep -E 'ERROR|Fatal error|SUMMARY|==[0-9]+==' "$log" | head -5
        echo "   log: $log   reproduce: QLORA_FUZZ_TARGET=$t QLORA_FUZZ_TOKENIZERS=$TOKS $BIN $artifacts/<file>"
    fi
done
exit "$found"
