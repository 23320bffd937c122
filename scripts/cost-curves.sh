#!/usr/bin/env bash
# How cost grows with the work: three curves, each point a fresh load-generator run (its own
# database and namespace) with one `cmdflow worker` process, in release mode.
#
#   1. W1 and the owner feed (feedw1: W1 while 10 clients read random owners' feeds at 200
#      requests/s in all) with 0, 1,000,000 and 10,000,000 ended commands and their history
#      already in the tables;
#   2. W3 (10,000 timers due over 30 s) with 10,000, 100,000 and 1,000,000 timers pending;
#   3. W2 with 10, 100 and 1,000 children per parent (10,000 children in each run), in the
#      default mode (`settled`, W2s) and with a report per child (`each`, W2).
#
# The hand-written baseline (b1, b2) runs first, so each point reads as a ratio too.
#
#   ./scripts/cost-curves.sh                  all three curves
#   CURVES="w2 w3" ./scripts/cost-curves.sh   some of them (w1, w2, w3)
#   CURVE_FEED="0 1000000" ...                the seed sizes of the W1 curve
#
# The raw JSON lines go to CURVES_OUT (target/bench/curves-<time>.jsonl).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

curves=${CURVES:-w1 w2 w3}
feeds=${CURVE_FEED:-0 1000000 10000000}
target=${CARGO_TARGET_DIR:-target}
out=${CURVES_OUT:-target/bench/curves-$(date +%Y%m%d-%H%M%S).jsonl}
mkdir -p "$(dirname "$out")"
: >"$out"

printf '==> cargo build --release -p cmdflow -p cmdflow-bench\n' >&2
cargo build --release -p cmdflow -p cmdflow-bench >&2
loadgen="$target/release/loadgen"

run() {
    printf '==> loadgen %s\n' "$*" >&2
    "$loadgen" "$@" | grep '^{' | tee -a "$out"
}

run --workers 0 --schedulers 0 --workloads b1,b2
for curve in $curves; do
    case $curve in
    w1)
        for n in $feeds; do
            # feedw1 seeds at least one command.
            run --workers 1 --schedulers 0 --workloads feedw1 --feed-rate 200 --feed-commands "$n"
        done
        ;;
    w2)
        for c in 10 100 1000; do
            run --workers 1 --schedulers 0 --workloads w2s,w2 --parents $((10000 / c)) --children "$c"
        done
        ;;
    w3)
        for n in 10000 100000 1000000; do
            run --workers 1 --schedulers 1 --workloads w3 --pending-timers "$n"
        done
        ;;
    *) printf 'cost-curves.sh: unknown curve %s (w1, w2, w3)\n' "$curve" >&2; exit 1 ;;
    esac
done
printf '==> raw lines in %s\n' "$out" >&2
