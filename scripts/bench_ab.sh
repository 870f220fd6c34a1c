#!/usr/bin/env bash
# A/B of relay builds on one mock: the binaries take turns, run by run, under the same load and
# the same background noise, so a hot-path change can be judged on a machine others share.
#
#   bash scripts/bench_ab.sh REPS BIN_A BIN_B [BIN...]
#
# Each run: paced (10 sessions x 20 turns x 50 deltas of 64 B every 1 ms) and saturation (50
# sessions, unpaced, 2 s). Prints the median per binary of: paced p50, p99 and first-event p50
# (us), paced relay CPU per 1,000 events (ms), saturation events/s and CPU per 1,000 events.
# The load generator and the mock are the first binary's. Ports: BENCH_PORT_BASE (default 19300).
# A binary written `PATH+redis` runs with `state.backend: redis` on BENCH_REDIS_URL (default
# redis://127.0.0.1:6379), under a prefix of its own per run (SC-7).
set -euo pipefail
REPS=$1
shift
LG=$1
BASE=${BENCH_PORT_BASE:-19300}
WORK=$(mktemp -d /tmp/switchyard-ab.XXXXXX)
cat >"$WORK/relay.yaml" <<Y
listen: 127.0.0.1:$((BASE + 2))
keys:
  - id: bench
    key: sy-ab-key
accounts:
  - id: mock
    base_url: http://127.0.0.1:$BASE/v1
    api_key: sk-ab
    mode: ctx_pool
    max_conns: 1024
store:
  path: $WORK/usage.db
Y
REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}
"$LG" mock-upstream --listen "127.0.0.1:$BASE" >"$WORK/mock.log" 2>&1 &
MOCK=$!
trap 'kill $MOCK 2>/dev/null || true' EXIT
sleep 0.5
cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {print s}'; }
for _ in $(seq 1 "$REPS"); do
    for bin in "$@"; do
        config="$WORK/relay.yaml"
        if [[ $bin == *+redis ]]; then
            config="$WORK/relay-redis.yaml"
            cp "$WORK/relay.yaml" "$config"
            printf 'state:\n  backend: redis\n  redis_url: %s\n  redis_prefix: "bench-ab:%s"\n' \
                "$REDIS_URL" "$RANDOM$RANDOM" >>"$config"
        fi
        # A fresh store per run: a store grown by earlier runs slows the start (spend seeding).
        rm -f "$WORK"/usage.db*
        "${bin%+redis}" serve --config "$config" >"$WORK/relay.log" 2>&1 &
        relay=$!
        for _ in $(seq 1 100); do
            curl -sf "http://127.0.0.1:$((BASE + 2))/readyz" >/dev/null && break
            sleep 0.1
        done
        for scen in paced sat; do
            if [[ $scen == paced ]]; then
                load="--sessions 10 --turns 20 --events 50 --bytes 64 --interval-us 1000"
            else
                load="--sessions 50 --duration 2s --events 50 --bytes 64 --interval-us 0"
            fi
            c0=$(cpu_ns $relay)
            # shellcheck disable=SC2086
            "$LG" loadgen --url "ws://127.0.0.1:$((BASE + 2))/v1/responses" --key sy-ab-key $load --json >"$WORK/run.json" 2>/dev/null
            c1=$(cpu_ns $relay)
            python3 - "$WORK/run.json" "$scen" "$bin" $((c1 - c0)) >>"$WORK/results.txt" <<'P'
import json, sys
r = json.load(open(sys.argv[1]))
cpu = int(sys.argv[4]) / max(r["events"], 1) / 1000
print(sys.argv[2], sys.argv[3], r["latency_us"]["p50"], r["latency_us"]["p99"],
      r["first_event_us"]["p50"], r["events_per_sec"], round(cpu, 2), sum(r["errors"].values()))
P
        done
        kill $relay
        wait $relay 2>/dev/null || true
    done
done
python3 - "$WORK/results.txt" <<'P'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    scen, binary, *vals = line.split()
    runs[(scen, binary)].append([float(v) for v in vals])
print("scenario binary: p50 p99 first-event-p50 events/s cpu-ms-per-1k errors (medians, n)")
for (scen, binary), rows in sorted(runs.items()):
    meds = [round(statistics.median(col), 1) for col in zip(*rows)]
    print(scen, binary, *meds, f"(n={len(rows)})")
P
