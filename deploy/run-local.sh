#!/usr/bin/env bash
# Builds kache and runs it on 127.0.0.1:8001 in front of the cluster of the
# current kubeconfig; where there is none (or it is unreachable), in front of
# kache's own local API server (tests/cluster/up.sh: a real kube-apiserver
# with etcd on loopback). Extra arguments go to `kache serve`.
#
#   deploy/run-local.sh                     # then, in another shell:
#   kubectl --kubeconfig target/kache.kubeconfig get pods -A
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
log() { echo "run-local: $*" >&2; }

command -v cargo >/dev/null || { log "cargo is required (rustup: https://rustup.rs)"; exit 1; }
log "building kache (release)"
cargo build --release --locked -p kache-proxy --bin kache
kache=${CARGO_TARGET_DIR:-$repo/target}/release/kache

kubeconfig_args=()
if [[ -n "${KUBECONFIG:-}" || -f "$HOME/.kube/config" ]] && command -v kubectl >/dev/null \
   && kubectl version --request-timeout=5s >/dev/null 2>&1; then
  log "upstream: the current kubeconfig's cluster ($(kubectl config current-context 2>/dev/null || echo default))"
else
  log "no reachable cluster in the kubeconfig: starting kache's local API server"
  env_file=$(tests/cluster/up.sh "$repo/target/kache-cluster")
  # shellcheck disable=SC1090
  source "$env_file"
  kubeconfig_args=(--kubeconfig "$KACHE_ADMIN_KUBECONFIG")
  log "local API server at $KACHE_APISERVER_URL (stop it with tests/cluster/down.sh)"
fi

listen=${KACHE_LISTEN:-127.0.0.1:8001}
"$kache" kubeconfig --listen "$listen" "${kubeconfig_args[@]}" > "$repo/target/kache.kubeconfig"
log "clients: kubectl --kubeconfig $repo/target/kache.kubeconfig get pods -A"
exec "$kache" serve --listen "$listen" "${kubeconfig_args[@]}" "$@"
