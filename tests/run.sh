#!/usr/bin/env bash
# Runs every test of kache on this machine: formatting, lints, unit tests,
# in-process tests, and the integration tests against a real kube-apiserver
# (built from Debian's source package and started on loopback by
# tests/cluster/up.sh). Installs what it needs; a missing prerequisite is an
# error, never a skip.
#
#   tests/run.sh                 # everything
#   KACHE_KEEP_CLUSTER=1 tests/run.sh   # leave the API server running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

log() { echo "tests/run.sh: $*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

command -v cargo >/dev/null || { log "cargo is required (rustup: https://rustup.rs)"; exit 1; }
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    rustup component add "$component"
  fi
done
if ! command -v kubectl >/dev/null && [[ -z "${KUBECTL:-}" ]]; then
  log "installing kubectl (Debian's kubernetes-client)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client
fi
if ! command -v chromium >/dev/null && [[ -z "${CHROMIUM:-}" ]]; then
  log "installing chromium (Debian's, a headless browser for the status page test)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi

log "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

cluster_dir=${KACHE_CLUSTER_DIR:-$repo/target/kache-cluster}
log "starting the real API server in $cluster_dir"
tests/cluster/up.sh "$cluster_dir" >/dev/null
if [[ -z "${KACHE_KEEP_CLUSTER:-}" ]]; then
  trap 'tests/cluster/down.sh "$cluster_dir" >/dev/null 2>&1 || true' EXIT
fi
export KACHE_CLUSTER_DIR=$cluster_dir

log "building kache"
cargo build --locked -p kache-proxy --bin kache
export KACHE_BIN=${CARGO_TARGET_DIR:-$repo/target}/debug/kache

log "tests"
cargo test --workspace --locked --no-fail-fast "$@"
