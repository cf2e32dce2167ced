#!/usr/bin/env bash
# Stops the kube-apiserver of the cluster in DIR and starts it again with the
# exact same command line (same port, same flags, same etcd), then waits for
# /readyz. etcd keeps running, so all objects survive. For reconnection tests.
#
#   tests/cluster/restart-apiserver.sh [--stop|--start] [DIR]
#
#   (default)  stop, then start again
#   --stop     only stop it (the cluster is then "down" until --start)
#   --start    only start it (no-op if it is already running and ready)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mode=restart
case ${1:-} in
  --stop) mode=stop; shift ;;
  --start) mode=start; shift ;;
  -*) die "usage: $0 [--stop|--start] [DIR]" ;;
esac
(($# <= 1)) || die "usage: $0 [--stop|--start] [DIR]"
dir=${1:-${KACHE_CLUSTER_DIR:-$repo_root/target/kache-cluster}}
[[ -d "$dir" ]] || die "$dir does not exist; run up.sh first"
dir=$(cd "$dir" && pwd)
lock_dir "$dir"
[[ -s "$dir/apiserver.cmdline" ]] || die "$dir/apiserver.cmdline missing; run up.sh first"
pid_from_file "$dir/etcd.pid" "$(etcd_marker "$dir")" >/dev/null ||
  die "etcd of $dir is not running; run up.sh"

running() { pid_from_file "$dir/apiserver.pid" "$(apiserver_marker "$dir")" >/dev/null; }

if [[ $mode == start ]] && running && readyz_ok "$dir"; then
  log "kube-apiserver already running and ready"
  exit 0
fi
if [[ $mode != start ]]; then
  stop_component "$dir" apiserver
fi
[[ $mode == stop ]] && exit 0

# The command line was written by up.sh with printf %q, one line.
eval "cmd=($(cat "$dir/apiserver.cmdline"))"
# shellcheck disable=SC2154 # cmd is assigned by the eval above.
((${#cmd[@]} > 0)) || die "empty command line in $dir/apiserver.cmdline"
echo "=== $(date -u +%FT%TZ) restarting kube-apiserver ===" >>"$dir/apiserver.log"
start=$SECONDS
start_detached "$dir" apiserver "$dir/apiserver.log" "${cmd[@]}"
wait_apiserver_ready "$dir" "${KACHE_CLUSTER_READY_TIMEOUT:-120}" ||
  die "kube-apiserver did not become ready after restart"
log "kube-apiserver is ready again on port $(cat "$dir/apiserver.port") after $((SECONDS - start))s"
