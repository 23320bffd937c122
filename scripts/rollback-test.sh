#!/usr/bin/env bash
# A rollback, as it happens in production: the previous release's `cmdflow` binary runs against
# the schema today's binary migrated. The previous release is the commit before the newest
# migration was added; it is built from this repository's history in a worktree of its own,
# with a build directory of its own inside CARGO_TARGET_DIR (kept between runs, so only the
# first run builds it all).
#
#   1. today's binary migrates a fresh database (through 0020);
#   2. the previous binary's `migrate` accepts it (0020 is marked compatible) and applies nothing;
#   3. the previous binary's worker starts against it and stays up;
#   4. with a newer migration recorded that is not marked compatible, the previous binary's
#      `migrate` and worker refuse to start, naming it.
#
# Needs the services (scripts/services.sh) and today's debug `cmdflow` (cargo build -p cmdflow).
# ROLLBACK_FROM overrides the previous release (a commit).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'rollback-test.sh: %s\n' "$*" >&2; exit 1; }

target="${CARGO_TARGET_DIR:-target}"
today="$target/debug/cmdflow"
[ -x "$today" ] || die "$today is missing: cargo build -p cmdflow"

newest=$(ls migrations/*.sql | sort | tail -n 1)
added=$(git log --diff-filter=A --format=%H -n 1 HEAD -- "$newest")
from="${ROLLBACK_FROM:-$added^}"
if ! previous_commit=$(git rev-parse --verify --quiet "$from^{commit}"); then
    git fetch -q --unshallow >/dev/null 2>&1 || true
    added=$(git log --diff-filter=A --format=%H -n 1 HEAD -- "$newest")
    from="${ROLLBACK_FROM:-$added^}"
    previous_commit=$(git rev-parse --verify --quiet "$from^{commit}") || {
        echo "rollback-test.sh: SKIPPED: the previous release ($from) is not in this clone's history (a shallow clone that cannot be deepened)" >&2
        exit 0
    }
fi
old_target="$target/rollback"
worktree=$(mktemp -d "${TMPDIR:-/tmp}/cmdflow-rollback.XXXXXX")
db="cmdflow_rollback_$$"
admin="postgres://postgres@127.0.0.1:5432/postgres"
url="postgres://postgres@127.0.0.1:5432/$db"
worker_pid=""
namespace="rollback$$"
cleanup() {
    [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null || true
    git worktree remove --force "$worktree" >/dev/null 2>&1 || rm -rf "$worktree"
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    # The worker declared the namespace's queues (quorum queues, each a replicated log the
    # broker keeps): delete them, or every run leaves its set behind. The exchanges are left;
    # rabbitmqctl cannot delete one, and they hold nothing.
    if command -v rabbitmqctl >/dev/null 2>&1; then
        rabbitmqctl -q list_queues name 2>/dev/null | grep "^$namespace\." |
            while read -r queue; do
                rabbitmqctl -q delete_queue "$queue" </dev/null >/dev/null 2>&1 || true
            done
    fi
}
trap cleanup EXIT

echo "previous release: $(git log -1 --format='%h %s' "$previous_commit")"
git worktree add --detach -q "$worktree" "$previous_commit"
(cd "$worktree" && CARGO_TARGET_DIR="$old_target" cargo build -q -p cmdflow)
previous="$old_target/debug/cmdflow"

export CMDFLOW_DATABASE_URL="$url" CMDFLOW_EXAMPLES=true RUST_LOG=warn
export CMDFLOW_NAMESPACE="$namespace" CMDFLOW_HTTP_ADDR=127.0.0.1:0 CMDFLOW_METRICS_ADDR=127.0.0.1:0

"$today" migrate >/dev/null
echo "today's binary migrated $db"

out=$("$previous" migrate 2>&1) || die "the previous binary refused today's schema: $out"
echo "the previous binary's migrate accepts today's schema"

log=$(mktemp)
"$previous" worker >"$log" 2>&1 &
worker_pid=$!
sleep 5
kill -0 "$worker_pid" 2>/dev/null || die "the previous binary's worker stopped: $(tail -n 5 "$log")"
kill "$worker_pid"
wait "$worker_pid" 2>/dev/null || true
worker_pid=""
echo "the previous binary's worker runs against today's schema"

psql -q "$url" -c "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
                   VALUES (9999, 'a newer release, not compatible', true, '\\x00', 0)" >/dev/null
for role in migrate worker; do
    if out=$(timeout 30 "$previous" "$role" 2>&1); then
        die "the previous binary's $role ran against an incompatible migration"
    fi
    case "$out" in
        *"[9999]"*"not marked compatible"*) ;;
        *) die "the previous binary's $role did not name the incompatible migration: $out" ;;
    esac
done
echo "the previous binary refuses an incompatible newer migration, naming it"
