#!/usr/bin/env bash
# From nothing to a command going through: starts the services, builds cmdflow, runs
# `cmdflow up` (gateway + worker in one process) in the background, then starts a demo.counter
# command, sends it five increments and a finish, and prints its state and history.
#
# Reuses a cmdflow that already answers on the address. Environment:
#   CMDFLOW_HTTP_ADDR   where the gateway listens (default 127.0.0.1:8080)
#   CARGO_TARGET_DIR    cargo's build directory (default ./target)
#   CMDFLOW_DEV_KEY     the development key the fleet accepts (default: one generated once and
#                       kept in $RUNDIR/cmdflow-dev-key, so a fleet reused later still accepts it)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ADDR=${CMDFLOW_HTTP_ADDR:-127.0.0.1:8080}
export CMDFLOW_URL="http://$ADDR"
RUNDIR=${TMPDIR:-/tmp}
LOG="$RUNDIR/cmdflow-up.log"
PIDFILE="$RUNDIR/cmdflow-up.pid"
BIN="${CARGO_TARGET_DIR:-target}/release/cmdflow"
WAIT=60

# Every /v1 call needs a credential: the fleet runs with a development key holding every scope,
# and the CLI sends it as CMDFLOW_TOKEN.
KEYFILE="$RUNDIR/cmdflow-dev-key"
if [ -z "${CMDFLOW_DEV_KEY:-}" ]; then
    if [ ! -s "$KEYFILE" ]; then
        (umask 077 && printf 'cfk_%s\n' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$KEYFILE")
    fi
    CMDFLOW_DEV_KEY=$(cat "$KEYFILE")
fi
export CMDFLOW_DEV_KEY CMDFLOW_TOKEN="$CMDFLOW_DEV_KEY"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'quickstart.sh: %s\n' "$*" >&2; exit 1; }

# GET $CMDFLOW_URL$1 answers 2xx. Uses curl, or bash's /dev/tcp where curl is missing.
http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -sf -o /dev/null --max-time 5 "$CMDFLOW_URL$1"
    else
        local host=${ADDR%:*} port=${ADDR##*:}
        timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port
            printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' '$1' '$ADDR' >&3
            read -r _ status _ <&3; [[ \$status == 2* ]]" 2>/dev/null
    fi
}

listening() { timeout 2 bash -c "exec 3<>/dev/tcp/${ADDR%:*}/${ADDR##*:}" >/dev/null 2>&1; }

log_tail() {
    [ -f "$LOG" ] || return 0
    echo "--- last lines of $LOG ---" >&2
    tail -n 30 "$LOG" >&2
}

# Our own fleet from an earlier run, if its process is still alive.
our_pid() {
    local pid
    [ -f "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

step "services (PostgreSQL, Redis, RabbitMQ)"
bash scripts/services.sh

step "build: cargo build --release -p cmdflow"
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found. cmdflow needs a Rust toolchain >= 1.94; install it with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . \"\$HOME/.cargo/env\""
command -v cc >/dev/null 2>&1 ||
    die "no C compiler/linker (cc) found; install one, e.g. apt-get install -y build-essential"
cargo build --release -p cmdflow
[ -x "$BIN" ] || die "the build did not produce $BIN"
cmdflow() { "$BIN" "$@"; }

step "fleet: cmdflow up on $ADDR"
pid=
if http_ok /readyz; then
    echo "A cmdflow already answers at $CMDFLOW_URL; using it."
    pid=$(our_pid) || pid=
else
    if listening; then
        # Something holds the address: a cmdflow still starting (healthz answers), or another program.
        http_ok /healthz ||
            die "something that is not cmdflow listens on $ADDR; stop it or set CMDFLOW_HTTP_ADDR to a free address"
        echo "A cmdflow is starting at $CMDFLOW_URL; waiting for it."
        pid=$(our_pid) || pid=
    else
        # The fleet runs in its own session, so it outlives this script and a Ctrl-C here.
        CMDFLOW_HTTP_ADDR="$ADDR" NO_COLOR=1 setsid "$BIN" up </dev/null >"$LOG" 2>&1 &
        pid=$!
        echo "$pid" >"$PIDFILE"
        echo "Started cmdflow up (pid $pid, log $LOG)."
    fi
    deadline=$((SECONDS + WAIT))
    until http_ok /readyz; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            log_tail
            die "cmdflow up exited before it was ready"
        fi
        if ((SECONDS >= deadline)); then
            log_tail
            die "cmdflow did not answer $CMDFLOW_URL/readyz within ${WAIT}s"
        fi
        sleep 0.5
    done
fi
if [ -n "$pid" ] && [ -f "$LOG" ]; then
    grep -m1 '^cmdflow is up' "$LOG" || true
fi

step "a command going through"
echo "\$ cmdflow start demo.counter --owner member:42 --wait"
started=$(cmdflow start demo.counter --owner member:42 --wait)
echo "$started"
id=$(awk '$1 == "started" { print $2; exit }' <<<"$started")
[ -n "$id" ] || die "cmdflow start did not print the new command's id"

for _ in 1 2 3 4 5; do
    echo "\$ cmdflow emit demo.increment --command $id --data '{\"by\": 2}'"
    cmdflow emit demo.increment --command "$id" --data '{"by": 2}'
done

# Each event is applied on its own; wait for all five before finishing, so that the finish is
# not applied ahead of an increment that is still on its way.
deadline=$((SECONDS + 30))
# (Read the whole output before matching: a reader that quits early would break the pipe.)
until grep -q '"count":10' <<<"$(cmdflow show "$id")"; do
    ((SECONDS < deadline)) || die "the five increments were not applied within 30s (see $LOG)"
    sleep 0.2
done

echo "\$ cmdflow emit demo.finish --command $id"
cmdflow emit demo.finish --command "$id"

deadline=$((SECONDS + 30))
until grep -Eq '^state +completed' <<<"$(cmdflow show "$id")"; do
    ((SECONDS < deadline)) || die "command $id did not complete within 30s (see $LOG)"
    sleep 0.2
done

echo
echo "\$ cmdflow show $id"
cmdflow show "$id"
echo
echo "\$ cmdflow history $id"
cmdflow history "$id"

step "cmdflow is running"
echo "gateway:  $CMDFLOW_URL   (API description: $CMDFLOW_URL/openapi.json)"
echo "console:  $CMDFLOW_URL/console   (sign in with the key in $KEYFILE)"
echo "cli:      $BIN --help"
if [ -n "$pid" ]; then
    echo "log:      $LOG"
    echo "stop it:  kill \$(cat $PIDFILE)"
else
    echo "It was already running before this script (not started by it); stop it where it was started."
fi
