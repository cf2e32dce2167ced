#!/usr/bin/env bash
# Stops the etcd + kube-apiserver started by up.sh in DIR (TERM, then KILL
# after a grace period). Idempotent; keeps DIR's files (logs, audit log,
# certificates) for inspection — up.sh wipes them on its next fresh start.
#
#   tests/cluster/down.sh [DIR]
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# <= 1)) || die "usage: $0 [DIR]"
dir=${1:-${KACHE_CLUSTER_DIR:-$repo_root/target/kache-cluster}}
if [[ ! -d "$dir" ]]; then
  log "$dir does not exist; nothing to stop"
  exit 0
fi
dir=$(cd "$dir" && pwd)
lock_dir "$dir"

stop_component "$dir" apiserver
stop_component "$dir" etcd
rm -f "$dir/env"
log "cluster in $dir is stopped"
