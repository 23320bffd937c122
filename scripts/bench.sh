#!/usr/bin/env bash
# Runs the benchmark matrix on the local services, each entry in a fresh load-generator run (its
# own database and namespace, removed afterwards), then prints a Markdown table:
#
#   1. the hand-written baseline b1, b2, b3, b4 (no cmdflow workers running);
#   2. W1, W2, W2s (W2 with the group's reports `settled`), W3, W4 with 1, 2 and 4
#      `cmdflow worker` processes;
#   3. feedw1: W1 while clients read the owner feed over 1,000,000 seeded commands, as fast as
#      answers come and then paced at 200 requests/s; then paced at 200 requests/s while W1 is
#      published at the B1 rate of this run (the fleet carrying the baseline's full load).
#
#   ./scripts/bench.sh                      full sizes (the load generator's defaults)
#   BENCH_SCALE=0.1 ./scripts/bench.sh      every size times 0.1 (a quick look)
#
# Environment (all optional):
#   BENCH_SCALE       multiplies every size below (default 1)
#   BENCH_EVENTS      W1/B1 increments (20000)        BENCH_COUNTERS    W1/B1 counters (1000)
#   BENCH_PARENTS     W2/B2 parents (1000)            BENCH_CHILDREN    children per parent (10)
#   BENCH_TIMERS      W3/B3 timers (10000)            BENCH_SPAN_S      their span in s (30, at least 5)
#   BENCH_HOT_EVENTS  W4/B4 increments (2000)         BENCH_FEED        feedw1 seed commands (1000000)
#   BENCH_WORKERS     worker counts for W1–W4 ("1 2 4")
#   BENCH_OUT         where the raw JSON lines go (target/bench/<time>.jsonl)
#   LOADGEN_ARGS      extra arguments for every run, e.g. "--concurrency 16"
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'bench.sh: %s\n' "$*" >&2; exit 1; }

scale=${BENCH_SCALE:-1}
# `size DEFAULT [MIN]`: DEFAULT times the scale, rounded, at least MIN (1).
size() {
    awk -v n="$1" -v s="$scale" -v min="${2:-1}" \
        'BEGIN { v = int(n * s + 0.5); if (v < min) v = min; print v }'
}
awk -v s="$scale" 'BEGIN { exit !(s > 0) }' || die "BENCH_SCALE must be a positive number, not '$scale'"

events=${BENCH_EVENTS:-$(size 20000)}
counters=${BENCH_COUNTERS:-$(size 1000)}
parents=${BENCH_PARENTS:-$(size 1000)}
children=${BENCH_CHILDREN:-10}
timers=${BENCH_TIMERS:-$(size 10000)}
span_s=${BENCH_SPAN_S:-$(size 30 5)}
hot_events=${BENCH_HOT_EVENTS:-$(size 2000)}
feed=${BENCH_FEED:-$(size 1000000 1000)}
workers_list=${BENCH_WORKERS:-1 2 4}
# shellcheck disable=SC2206 # word splitting of the extra arguments is intended
extra=(${LOADGEN_ARGS:-})

target=${CARGO_TARGET_DIR:-target}
out=${BENCH_OUT:-target/bench/$(date +%Y%m%d-%H%M%S).jsonl}
mkdir -p "$(dirname "$out")"
: >"$out"

printf '==> cargo build --release -p cmdflow -p cmdflow-bench\n' >&2
cargo build --release -p cmdflow -p cmdflow-bench >&2
loadgen="$target/release/loadgen"
[ -x "$loadgen" ] || die "$loadgen was not built"

sizes=(--events "$events" --counters "$counters" --parents "$parents" --children "$children"
    --timers "$timers" --timer-span-s "$span_s" --hot-events "$hot_events" --feed-commands "$feed")

failures=0
# `run ARGS…`: one fresh load-generator run; its JSON lines are appended to $out.
run() {
    printf '==> loadgen %s\n' "$*" >&2
    if ! "$loadgen" "${sizes[@]}" "${extra[@]}" "$@" | tee -a "$out"; then
        printf 'bench.sh: loadgen %s failed; going on\n' "$*" >&2
        failures=$((failures + 1))
    fi
}

# The baseline runs with 64 consumers and a prefetch of 128: the best b1 of 16/256, 32/64 and
# 64/128 on a 2-core machine (3,102, 3,204 and 3,455 events/s).
for b in b1 b2 b3 b4; do
    run --workloads "$b" --workers 0 --schedulers 0 --concurrency 64 --prefetch 128
done
for w in w1 w2 w2s w3 w4; do
    for n in $workers_list; do
        run --workloads "$w" --workers "$n"
    done
done
run --workloads feedw1 --workers 1
run --workloads feedw1 --workers 1 --feed-rate 200
# The feed (paced at 200 requests/s) while the fleet carries the hand-written pipeline's full
# load: W1 paced at the B1 figure of this run, for 15 s.
b1_rate=$(grep '"workload":"B1"' "$out" | sed -n 's/.*"events_per_s":\([0-9]*\).*/\1/p' | tail -n 1)
if [ -n "$b1_rate" ] && [ "$b1_rate" -gt 0 ]; then
    run --workloads feedw1 --workers 1 --feed-rate 200 --event-rate "$b1_rate" \
        --events $((b1_rate * 15))
else
    printf 'bench.sh: no B1 figure in %s; the paced feedw1 run is skipped\n' "$out" >&2
    failures=$((failures + 1))
fi

printf '\n'
"$loadgen" --table "$out"
printf '\nRaw JSON lines: %s\n' "$(realpath "$out")"
[ "$failures" -eq 0 ] || die "$failures run(s) failed; see above"
