#!/usr/bin/env bash
# Makes the Python virtualenv some tests use to speak to cmdflow as other software does: the
# CloudEvents SDK, an AMQP client and openapi-spec-validator (tests/python/requirements.txt).
# Prints the venv's directory. Does nothing when the venv already holds those requirements.
#
#   ./scripts/test-venv.sh            in tests/.venv, or in $CMDFLOW_TEST_VENV when set
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'test-venv.sh: %s\n' "$*" >&2; exit 1; }

venv="${CMDFLOW_TEST_VENV:-$PWD/tests/.venv}"
requirements="$PWD/tests/python/requirements.txt"
installed="$venv/.requirements"

ready() { [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$installed"; }
ready && { echo "$venv"; exit 0; }

command -v python3 >/dev/null 2>&1 ||
    die "python3 not found; install it, e.g. apt-get install -y python3 python3-venv"
mkdir -p "$(dirname "$venv")"
# Test processes that start at once make the venv once.
exec 9>"$venv.lock"
command -v flock >/dev/null 2>&1 && flock 9
ready && { echo "$venv"; exit 0; }

rm -rf "$venv"
python3 -m venv "$venv" >&2 ||
    die "python3 -m venv failed; install the venv module, e.g. apt-get install -y python3-venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2 ||
    die "pip could not install $requirements into $venv (is PyPI reachable?)"
cp "$requirements" "$installed"
echo "$venv"
