#!/usr/bin/env bash
# Where a run's cost goes: for W1 and W2 with 1, 2 and 4 workers, one load-generator run each
# (release build), under `perf record -a`, with PostgreSQL's WAL (`pg_stat_wal`) and Redis's call
# counts (`INFO commandstats`) read before and after. Prints per run: the result, the WAL records,
# bytes and syncs, the Redis calls, and the CPU share of each process name over the whole run
# (set-up included), with the CPU seconds that share is of the run's wall time. Needs `perf`
# (linux-perf), `psql` and `redis-cli`; run it alone on the machine.
#
#   ./scripts/bottlenecks.sh                 all six runs
#   BOTTLENECK_RUNS="w2:1 w2:4" ./scripts/bottlenecks.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'bottlenecks.sh: %s\n' "$*" >&2; exit 1; }
for tool in perf psql redis-cli; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

runs=${BOTTLENECK_RUNS:-w1:1 w1:2 w1:4 w2:1 w2:2 w2:4}
pg=${LOADGEN_PG_SERVER:-postgres://postgres@127.0.0.1:5432}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p cmdflow -p cmdflow-bench >&2
loadgen="$target/release/loadgen"
data=$(mktemp)
trap 'rm -f "$data" "$data.old"' EXIT

# WAL records, syncs, bytes; Redis calls of every command, summed.
wal() { psql "$pg/postgres" -Atc "SELECT wal_records, wal_sync, wal_bytes FROM pg_stat_wal" | tr '|' ' '; }
redis_calls() {
    redis-cli info commandstats | sed -n 's/^cmdstat_[^:]*:calls=\([0-9]*\).*/\1/p' |
        awk '{ n += $1 } END { print n + 0 }'
}

for run in $runs; do
    workload=${run%%:*}
    workers=${run##*:}
    read -r rec0 sync0 bytes0 < <(wal)
    calls0=$(redis_calls)
    began=$(date +%s.%N)
    result=$(perf record -q -a -F 199 -o "$data" -- "$loadgen" --workloads "$workload" \
        --workers "$workers" 2>/dev/null | tail -n 1)
    elapsed=$(awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    read -r rec1 sync1 bytes1 < <(wal)
    calls1=$(redis_calls)
    rate=$(printf '%s' "$result" | grep -o '"\(events\|parents\)_per_s":[0-9.]*' | head -n 1)
    printf '\n== %s, %s worker(s): %s\n' "$workload" "$workers" "$rate"
    printf 'WAL: %d records, %.1f MB, %d syncs; Redis: %d calls\n' \
        $((rec1 - rec0)) "$(awk -v b=$((bytes1 - bytes0)) 'BEGIN { print b / 1e6 }')" \
        $((sync1 - sync0)) $((calls1 - calls0))
    printf 'CPU share by process name, and CPU seconds (share x %d cores x %s s of the run):\n' \
        "$(nproc)" "$elapsed"
    perf report -i "$data" --sort comm --no-children 2>/dev/null |
        awk -v cores="$(nproc)" -v secs="$elapsed" '/^ *[0-9.]+%/ {
            share = $1; sub(/%/, "", share)
            printf "  %-8s %-16s %6.2f s\n", $1, $2, share / 100 * cores * secs
        }' | head -n 12
done
