#!/usr/bin/env bash
# The test command of the project: installs what the tests need if it is missing, then runs them.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh --setup-only    # only steps a-c (Redis, Python venv, Codex CLI)
#   bash scripts/test.sh -- FILTER...    # extra arguments after `--` go to `cargo test`
#
# Steps:
#   a. Redis answers on 127.0.0.1:6379 (installs redis-server with apt-get and starts it if not)
#   b. Python venv at ${SWITCHYARD_VENV:-$REPO/.venv} with scripts/requirements.txt
#   c. Codex CLI under $REPO/.tools (npm), exported as SWITCHYARD_CODEX_BIN
#   d. cargo test --all-targets, with SWITCHYARD_EVENT_DUMP_DIR pointing at an empty directory
#      under the cargo target dir where the tests write the event streams they saw
#   e. scripts/check_events.py over proto-fixtures/ and over the dumped streams
#
# Exported for the Rust tests: SWITCHYARD_PYTHON, SWITCHYARD_CODEX_BIN, SWITCHYARD_EVENT_DUMP_DIR.
# CARGO_TARGET_DIR is honoured when set.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

CODEX_VERSION="0.169.0"
REDIS_HOST="127.0.0.1"
REDIS_PORT="6379"
VENV="${SWITCHYARD_VENV:-$REPO/.venv}"
TOOLS="$REPO/.tools"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"

SETUP_ONLY=0
CARGO_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --setup-only) SETUP_ONLY=1; shift ;;
        --) shift; CARGO_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "test.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

T_START=$(date +%s.%N)

elapsed_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

run_step() {
    local name="$1"; shift
    local t0
    t0=$(date +%s.%N)
    echo "==> [$name]"
    "$@"
    echo "<== [$name] done in $(elapsed_since "$t0")s"
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else echo "test.sh: need root to run: $*" >&2; return 1
    fi
}

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: apt-get not found; install these by hand: $*" >&2
        return 1
    fi
    if [[ $APT_UPDATED -eq 0 ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# --- a. Redis -----------------------------------------------------------------------------

redis_ping() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
    else
        # No client: speak RESP over bash's /dev/tcp.
        (
            exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT" || exit 1
            printf 'PING\r\n' >&3
            IFS= read -r -t 2 reply <&3 || exit 1
            [[ "$reply" == "+PONG"* ]]
        ) 2>/dev/null
    fi
}

step_redis() {
    # tests/shared_state.rs starts and stops Redis servers of its own: the binary must exist.
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "redis-server not installed; installing it with apt-get"
        apt_install redis-server
    fi
    if redis_ping; then
        echo "Redis answers on $REDIS_HOST:$REDIS_PORT"
        return 0
    fi
    echo "starting redis-server on $REDIS_HOST:$REDIS_PORT"
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no
    local i
    for i in $(seq 1 100); do
        if redis_ping; then echo "Redis answers on $REDIS_HOST:$REDIS_PORT"; return 0; fi
        sleep 0.1
    done
    echo "test.sh: Redis does not answer on $REDIS_HOST:$REDIS_PORT after starting it" >&2
    return 1
}

# --- b. Python venv -----------------------------------------------------------------------

pinned_openai() {
    sed -n 's/^openai==\([^[:space:]#]*\).*/\1/p' "$REPO/scripts/requirements.txt" | head -n1
}

venv_satisfied() {
    local want="$1"
    [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c "import sys, openai, pydantic, websockets; sys.exit(0 if openai.__version__ == '$want' else 1)" \
            >/dev/null 2>&1
}

step_venv() {
    local want
    want="$(pinned_openai)"
    if [[ -z "$want" ]]; then
        echo "test.sh: scripts/requirements.txt pins no openai==VERSION" >&2
        return 1
    fi
    if venv_satisfied "$want"; then
        echo "venv $VENV already has openai $want"
    else
        if [[ ! -x "$VENV/bin/python" ]]; then
            echo "creating venv $VENV"
            if ! python3 -m venv "$VENV"; then
                echo "python3 -m venv failed; installing python3-venv"
                rm -rf "$VENV"
                apt_install python3-venv
                python3 -m venv "$VENV"
            fi
        fi
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO/scripts/requirements.txt"
        if ! venv_satisfied "$want"; then
            echo "test.sh: openai $want still not importable from $VENV" >&2
            return 1
        fi
        echo "venv $VENV now has openai $want"
    fi
    export SWITCHYARD_PYTHON="$VENV/bin/python"
    echo "SWITCHYARD_PYTHON=$SWITCHYARD_PYTHON"
}

# --- c. Codex CLI -------------------------------------------------------------------------

codex_expected_path() {
    local pkg triple
    case "$(uname -m)" in
        x86_64|amd64) pkg="codex-linux-x64"; triple="x86_64-unknown-linux-musl" ;;
        aarch64|arm64) pkg="codex-linux-arm64"; triple="aarch64-unknown-linux-musl" ;;
        *) pkg="codex-linux-x64"; triple="x86_64-unknown-linux-musl" ;;
    esac
    echo "$TOOLS/node_modules/@openai/$pkg/vendor/$triple/bin/codex"
}

codex_version_ok() {
    [[ -x "$1" ]] && "$1" --version 2>/dev/null | grep -qF "$CODEX_VERSION"
}

step_codex() {
    local bin
    bin="$(codex_expected_path)"
    if codex_version_ok "$bin"; then
        echo "Codex CLI $CODEX_VERSION already at $bin"
    else
        if ! command -v npm >/dev/null 2>&1; then
            echo "npm not installed; installing nodejs and npm with apt-get"
            apt_install nodejs npm
        fi
        echo "installing @openai/codex@$CODEX_VERSION under $TOOLS"
        mkdir -p "$TOOLS"
        npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error "@openai/codex@$CODEX_VERSION"
        if [[ ! -x "$bin" ]]; then
            local found
            found="$(find "$TOOLS/node_modules" -type f -name codex -path '*/vendor/*' -perm -u+x 2>/dev/null | head -n1)"
            if [[ -z "$found" ]]; then
                echo "test.sh: the codex binary is not at $bin and no vendored codex binary was found under $TOOLS" >&2
                return 1
            fi
            echo "NOTE: the codex binary is not at $bin but at $found"
            bin="$found"
        fi
        if ! codex_version_ok "$bin"; then
            echo "test.sh: $bin does not report version $CODEX_VERSION: $("$bin" --version 2>&1 || true)" >&2
            return 1
        fi
    fi
    export SWITCHYARD_CODEX_BIN="$bin"
    echo "SWITCHYARD_CODEX_BIN=$SWITCHYARD_CODEX_BIN ($("$bin" --version 2>&1 | head -n1))"
}

# --- d. cargo test ------------------------------------------------------------------------

step_cargo_test() {
    export SWITCHYARD_EVENT_DUMP_DIR="$TARGET_DIR/event-dumps"
    rm -rf "$SWITCHYARD_EVENT_DUMP_DIR"
    mkdir -p "$SWITCHYARD_EVENT_DUMP_DIR"
    echo "SWITCHYARD_EVENT_DUMP_DIR=$SWITCHYARD_EVENT_DUMP_DIR"
    cargo test --all-targets ${CARGO_ARGS[@]+"${CARGO_ARGS[@]}"}
}

# --- e. event shapes ----------------------------------------------------------------------

step_check_events() {
    "$SWITCHYARD_PYTHON" "$REPO/scripts/check_events.py" "$REPO/proto-fixtures"
    local dump="${SWITCHYARD_EVENT_DUMP_DIR:-}"
    if [[ -n "$dump" && -d "$dump" ]] && find "$dump" -type f -name '*.jsonl' -print -quit | grep -q .; then
        "$SWITCHYARD_PYTHON" "$REPO/scripts/check_events.py" "$dump"
    else
        echo "no event dumps in ${dump:-<unset>}; only proto-fixtures checked"
    fi
}

run_step "a. redis" step_redis
run_step "b. python venv" step_venv
run_step "c. codex cli" step_codex
if [[ $SETUP_ONLY -eq 1 ]]; then
    echo "setup done in $(elapsed_since "$T_START")s (--setup-only: tests not run)"
    exit 0
fi
run_step "d. cargo test" step_cargo_test
run_step "e. check event shapes" step_check_events
echo "all test steps passed in $(elapsed_since "$T_START")s"
