#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for FUZZ_SECS seconds each (default 900) on its committed
# corpus, minimizes the corpus, and prints one line per target: time, executions, corpus size,
# crashes. Stable toolchain: cargo-fuzz needs nightly flags, which RUSTC_BOOTSTRAP=1 allows.
#
#   bash scripts/fuzz.sh                                 # all targets, 15 minutes each
#   FUZZ_SECS=60 FUZZ_TARGETS="sse config" bash scripts/fuzz.sh
#
# A crash leaves its input in fuzz/artifacts/TARGET/; `cargo fuzz run TARGET FILE` replays it.
set -uo pipefail
cd "$(dirname "$0")/../fuzz" || exit 1
SECS=${FUZZ_SECS:-900}
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz || exit 1
cargo fuzz build -s none || exit 1
TARGETS=${FUZZ_TARGETS:-$(cargo fuzz list)}
summary=()
failed=0
for t in $TARGETS; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    started=$(date +%s)
    cargo fuzz run -s none "$t" "corpus/$t" -- -max_total_time="$SECS" -print_final_stats=1 >"$log" 2>&1
    status=$?
    took=$(($(date +%s) - started))
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
    crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    if [ "$status" -ne 0 ]; then
        failed=1
        tail -40 "$log"
    fi
    cargo fuzz cmin -s none "$t" "corpus/$t" >/dev/null 2>&1
    line="$t: ${took} s of ${SECS}, ${runs:-?} executions, corpus $(find "corpus/$t" -type f | wc -l) files, exit $status, $crashes artifact(s)"
    echo "$line"
    summary+=("$line")
    rm -f "$log"
done
echo
echo "fuzz summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD)):"
printf '%s\n' "${summary[@]}"
exit $failed
