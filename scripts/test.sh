#!/usr/bin/env bash
# Runs every check: the services the integration tests need, formatting, clippy, then all the
# tests (unit and integration, against the real local services).
#
#   ./scripts/test.sh                 everything
#   ./scripts/test.sh -- --nocapture  extra arguments go to `cargo test --workspace`
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Each step says how long the one before it took, and the last line the whole run.
began=$SECONDS
step_began=$SECONDS
step_name=""
step() {
    if [ -n "$step_name" ]; then
        printf '    (%s: %ds)\n' "$step_name" "$((SECONDS - step_began))"
    fi
    step_name="$*"
    step_began=$SECONDS
    printf '\n==> %s\n' "$*"
}
die() { printf 'test.sh: %s\n' "$*" >&2; exit 1; }

if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found. cmdflow needs a Rust toolchain >= 1.94; install it with rustup."
rustc_version=$(rustc --version | awk '{print $2}')
printf '1.94.0\n%s\n' "$rustc_version" | sort -V -C ||
    die "rustc $rustc_version is too old; cmdflow needs >= 1.94: rustup update stable"
command -v cc >/dev/null 2>&1 ||
    die "no C compiler/linker (cc) found; install one, e.g. apt-get install -y build-essential"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing: rustup component add clippy"

step "services"
bash scripts/services.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "chromium and chromedriver (the console's browser tests)"
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium and chromedriver: $(chromium --version 2>/dev/null | head -n1)"
else
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "chromium or chromedriver missing: installing chromium chromium-driver with apt-get"
    $sudo apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null ||
        die "could not install chromium chromium-driver; install them by hand (apt-get install -y chromium chromium-driver)"
fi

step "python test venv: scripts/test-venv.sh (CloudEvents SDK, pika, openapi-spec-validator)"
CMDFLOW_TEST_VENV=$(bash scripts/test-venv.sh) || die "could not make the tests' Python venv (see above)"
export CMDFLOW_TEST_VENV

step "cargo doc -p cmdflow --no-deps (the SDK reference, warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc -p cmdflow --no-deps

step "cargo test --workspace $*"
cargo test --workspace "$@"

step "rollback: the previous release's binary against today's schema (scripts/rollback-test.sh)"
bash scripts/rollback-test.sh

step "k8s manifests: scripts/k8s-validate.sh" && bash scripts/k8s-validate.sh
step "all checks passed in $(((SECONDS - began) / 60)) min $(((SECONDS - began) % 60)) s"
