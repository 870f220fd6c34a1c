#!/usr/bin/env bash
# The relay against a direct connection and a plain byte pipe, same load, one run.
#
#   direct: loadgen -> mock
#   pipe:   loadgen -> nginx (plain WebSocket proxy_pass, proxy_buffering off, tcp_nodelay on) -> mock
#   relay:  loadgen -> switchyard serve (one key, one ctx_pool account) -> mock
#
# Every process is a release build of this checkout (or Debian's nginx), started here with a
# generated config in a temporary directory and stopped at the end. Results go to $BENCH_OUT
# (JSON per run); the last thing printed is a markdown summary for BENCHMARKS.md.
#
# Environment (all optional):
#   BENCH_QUICK=1        short runs (about a minute in all) to check the script or a change
#   BENCH_REPS=N         repetitions of each load scenario (default 3, quick 1)
#   BENCH_SCENARIOS="…"  subset of: paced saturation big_paced big_unpaced idle
#   BENCH_SAT_SECS=N     length of the unpaced runs (default 10, quick 3)
#   BENCH_IDLE=N         idle sockets (default 5000, quick 1000)
#   BENCH_OUT=DIR        where results go (default: a new temporary directory)
#   BENCH_NO_BUILD=1     use the existing release binary
#   BENCH_PORT_BASE=N    mock N, nginx N+1, relay N+2 (default 19100)
#   BENCH_NICE=N         run everything at this niceness (e.g. -10 on a machine that others share)
set -euo pipefail
if [[ -n ${BENCH_NICE:-} ]]; then renice -n "$BENCH_NICE" $$ >/dev/null; fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-/var/tmp/switchyard-target}
BIN=$TARGET/release/switchyard
QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
    REPS=${BENCH_REPS:-1} SAT=${BENCH_SAT_SECS:-3} IDLE=${BENCH_IDLE:-1000} PACED_TURNS=10 BIG_TURNS=5
else
    REPS=${BENCH_REPS:-3} SAT=${BENCH_SAT_SECS:-10} IDLE=${BENCH_IDLE:-5000} PACED_TURNS=60 BIG_TURNS=25
fi
SCENARIOS=${BENCH_SCENARIOS:-paced saturation big_paced big_unpaced idle}
BASE=${BENCH_PORT_BASE:-19100}
MOCK_PORT=$BASE PIPE_PORT=$((BASE + 1)) RELAY_PORT=$((BASE + 2))
RELAY_KEY=sy-bench-key UP_KEY=sk-bench
WORK=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
OUT=${BENCH_OUT:-$WORK/results}
mkdir -p "$OUT"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v nginx >/dev/null; then
    log "installing nginx (Debian package)"
    apt-get install -y nginx >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y nginx >/dev/null; }
fi
if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    log "building the release binary"
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --quiet)
fi
[[ -x $BIN ]] || { log "no release binary at $BIN (set CARGO_TARGET_DIR?)"; exit 1; }
# 5,000 sockets need 5,000 descriptors in the load generator, the mock and the relay, and
# twice that in nginx (client and upstream side).
ulimit -n "$(ulimit -Hn)"

# --- processes -------------------------------------------------------------------------------

MOCK_PID="" RELAY_PID="" NGINX_PID=""

wait_port() {
    local port=$1
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "nothing listens on port $port"; return 1
}

start_mock() {
    "$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
    MOCK_PID=$!
    wait_port "$MOCK_PORT"
}

start_relay() {
    cat >"$WORK/relay.yaml" <<EOF
listen: 127.0.0.1:$RELAY_PORT
keys:
  - id: bench
    key: $RELAY_KEY
accounts:
  - id: mock
    base_url: http://127.0.0.1:$MOCK_PORT/v1
    api_key: $UP_KEY
    mode: ctx_pool
    max_conns: 1024
    concurrency: 1024
store:
  path: $WORK/usage.db
EOF
    "$BIN" serve --config "$WORK/relay.yaml" >"$WORK/relay.log" 2>&1 &
    RELAY_PID=$!
    wait_port "$RELAY_PORT"
}

start_nginx() {
    mkdir -p "$WORK/nginx"
    cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes auto;
worker_rlimit_nofile 20000;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 16000; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    server {
        listen 127.0.0.1:$PIPE_PORT;
        location / {
            proxy_pass http://127.0.0.1:$MOCK_PORT;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_buffering off;
            tcp_nodelay on;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }
    }
}
EOF
    nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' 2>>"$WORK/nginx/error.log" &
    NGINX_PID=$!
    wait_port "$PIPE_PORT"
}

stop() {
    local pid
    for pid in "$@"; do
        [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
}

stop_all() {
    stop "$RELAY_PID" "$NGINX_PID" "$MOCK_PID"
    RELAY_PID="" NGINX_PID="" MOCK_PID=""
}
trap 'stop_all; rm -rf "$WORK/nginx"' EXIT

# The processes of the middle: none, nginx's master and workers, or the relay.
middle_pids() {
    case $1 in
    direct) ;;
    pipe) echo "$NGINX_PID" $(pgrep -P "$NGINX_PID" || true) ;;
    relay) echo "$RELAY_PID" ;;
    esac
}

# CPU time in ns of every thread of the given processes (schedstat: ns resolution, where
# /proc/PID/stat counts 10 ms ticks).
cpu_ns() {
    local total=0 pid f
    for pid in "$@"; do
        for f in /proc/"$pid"/task/*/schedstat; do
            read -r ns _ <"$f" && total=$((total + ns))
        done
    done
    echo "$total"
}

# utime+stime in clock ticks (/proc/PID/stat fields 14 and 15), as a cross-check.
cpu_ticks() {
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$total"
}

rss_kb() {
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")))
    done
    echo "$total"
}

url_of() {
    case $1 in
    direct) echo "ws://127.0.0.1:$MOCK_PORT/v1/responses $UP_KEY" ;;
    pipe) echo "ws://127.0.0.1:$PIPE_PORT/v1/responses $UP_KEY" ;;
    relay) echo "ws://127.0.0.1:$RELAY_PORT/v1/responses $RELAY_KEY" ;;
    esac
}

# --- scenarios -------------------------------------------------------------------------------

scenario_args() {
    case $1 in
    paced) echo "--sessions 10 --turns $PACED_TURNS --events 50 --bytes 64 --interval-us 1000" ;;
    saturation) echo "--sessions 50 --duration ${SAT}s --events 50 --bytes 64 --interval-us 0" ;;
    big_paced) echo "--sessions 10 --turns $BIG_TURNS --events 20 --bytes 16384 --interval-us 1000" ;;
    big_unpaced) echo "--sessions 10 --duration ${SAT}s --events 20 --bytes 16384 --interval-us 0" ;;
    esac
}

# One run of one load scenario against one target; the middle's CPU time goes beside it.
run_load() {
    local scen=$1 target=$2 rep=$3 url key pids c0 c1 t0 t1
    read -r url key <<<"$(url_of "$target")"
    pids=$(middle_pids "$target")
    c0=$(cpu_ns $pids) t0=$(cpu_ticks $pids)
    # shellcheck disable=SC2046
    "$BIN" loadgen --url "$url" --key "$key" $(scenario_args "$scen") --json \
        >"$OUT/$scen.$target.$rep.json" 2>>"$WORK/loadgen.log"
    c1=$(cpu_ns $pids) t1=$(cpu_ticks $pids)
    echo "{\"cpu_ns\": $((c1 - c0)), \"cpu_ticks\": $((t1 - t0))}" >"$OUT/$scen.$target.$rep.cpu.json"
    log "$scen $target #$rep: $(python3 "$ROOT/scripts/bench_report.py" --line "$OUT/$scen.$target.$rep.json")"
}

# Idle sockets on freshly started processes, so memory freed by earlier runs cannot hide the
# cost: RSS of the middle before and while N authenticated sockets are held.
run_idle() {
    local target=$1 url key pids before after out=$WORK/idle.$1.out
    stop_all
    start_mock
    case $target in pipe) start_nginx ;; relay) start_relay ;; esac
    read -r url key <<<"$(url_of "$target")"
    pids=$(middle_pids "$target")
    sleep 1
    before=$(rss_kb $pids)
    "$BIN" loadgen --idle --url "$url" --key "$key" --sessions "$IDLE" --hold 8s --json >"$out" 2>>"$WORK/loadgen.log" &
    local lg=$!
    for _ in $(seq 1 1200); do grep -q '^idle:' "$out" 2>/dev/null && break; sleep 0.1; done
    sleep 4
    after=$(rss_kb $pids)
    wait "$lg" || true
    local opened
    opened=$(sed -n 's/^idle: \([0-9]*\) sockets open/\1/p' "$out")
    echo "{\"sockets\": $IDLE, \"opened\": ${opened:-0}, \"rss_before_kb\": $before, \"rss_after_kb\": $after}" >"$OUT/idle.$target.json"
    log "idle $target: ${opened:-0} sockets, RSS $before -> $after KiB"
    stop_all
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores)"
    echo "kernel: $(uname -r)"
    echo "nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "reps: $REPS; quick: $QUICK; unpaced runs: ${SAT}s; idle sockets: $IDLE"
} >"$OUT/machine.txt"

log "results in $OUT"
for scen in $SCENARIOS; do
    [[ $scen == idle ]] && continue
    stop_all
    start_mock
    start_nginx
    start_relay
    for rep in $(seq 1 "$REPS"); do
        for target in direct pipe relay; do
            run_load "$scen" "$target" "$rep"
        done
    done
done
if [[ " $SCENARIOS " == *" idle "* ]]; then
    for target in pipe relay; do run_idle "$target"; done
fi
stop_all
python3 "$ROOT/scripts/bench_report.py" "$OUT"
