#!/usr/bin/env bash
# Watch benchmark: what serving watches costs kache, against the API server
# serving the same watches itself, in one run on one machine.
#
#   1. Fan-out: WATCHERS watches of one namespace's OBJECTS pods (~4 KB
#      each), each on its own HTTP/1.1 connection (and, with TRANSPORTS'
#      http2, again H2_STREAMS to an HTTP/2 connection, as client-go
#      multiplexes its watches: TLS with ALPN to the API server, prior
#      knowledge to kache's cleartext listener), from the version of an
#      rv=0 LIST, with bookmarks; then a writer patches the pods straight at
#      the API server, RATE changes a second, CHANGES in all (each patch sets
#      an annotation with its id and send time). Per encoding (ENCODINGS),
#      through a freshly started kache, then straight at the API server
#      (DIRECT_WATCHERS watchers).
#   2. Sync memory: SYNCERS clients released together each sync every pod
#      of the cluster (PODS pods in 10 namespaces, plus the fan-out's) through
#      kache, (a) as informers do before WatchList: rv=0 LIST, then WATCH from
#      its resourceVersion; (b) as a streaming list: watch=true&
#      sendInitialEvents=true&resourceVersionMatch=NotOlderThan&
#      allowWatchBookmarks=true&resourceVersion= until the BOOKMARK annotated
#      k8s.io/initial-events-end. Each mode against a freshly started kache
#      whose pod store is filled first.
#
# What the numbers mean:
#   delivery latency    per event per watcher: when the watcher read it minus
#                       when the writer's PATCH response arrived (one
#                       process, one clock). Negative when the event came
#                       before the PATCH response; "from send" counts from
#                       when the PATCH was sent instead.
#   missing / out of    per watcher, changes it never got / got after a change
#   order               with a higher resourceVersion; summed over watchers
#                       (must be 0). A watcher that failed to connect misses all.
#   CPU per event       CPU seconds (utime+stime, /proc/PID/stat) of kache, the
#                       API server and etcd from the first change until the
#                       last delivery (or the drain timeout), divided by the
#                       events delivered (changes x watchers), or by changes.
#   RSS idle / connected / after
#                       the serving process's VmRSS (kache, or the API server
#                       for the direct cells) before the watchers, 2 s after
#                       all are registered (kache's kache_cache_watchers, the
#                       API server's apiserver_longrunning_gauge) and read
#                       whatever their start sent (nothing, from an rv=0
#                       LIST's version), and after the changes.
#                       per idle watcher = (connected - idle) / WATCHERS.
#   upstream pod watches
#                       apiserver_longrunning_gauge{resource=pods,verb=WATCH}
#                       while the watchers are connected, minus what was open
#                       before kache started: kache's own watches, which must
#                       be 1 (each cell has a kache of its own, serving one
#                       encoding from one store fed by one watch).
#   time to synced      per sync client, from the barrier's release: classic,
#                       until the LIST's last byte and the WATCH's response
#                       headers; streaming, until the initial-events-end
#                       BOOKMARK. Bytes are what the client read until then.
#   sync memory         kache's VmRSS before the clients (its peak reset with
#                       /proc/PID/clear_refs), its peak sampled every 50 ms
#                       while they sync, and VmHWM once all are synced.
#   sets                each client's synced set (namespace/name@resourceVersion)
#                       against a consistent LIST straight from the API server.
#
# Writes a markdown report to benches/e2e/watch-results.md (raw JSON in
# target/bench-watch/json).
#
#   benches/e2e/watch.sh                 # builds kache and the clients in release mode
#   KEEP=1 benches/e2e/watch.sh          # leave its cluster running (reused next time)
#   KACHE_BIN=path/to/kache benches/e2e/watch.sh
#   PARTS=fanout benches/e2e/watch.sh    # one part (fanout, sync)
#
# Knobs (environment): WATCHERS (1000), DIRECT_WATCHERS (WATCHERS), OBJECTS
# (300), RATE (100), CHANGES (1000), ENCODINGS (json,protobuf), TRANSPORTS
# (http1,http2), H2_STREAMS (100: a current API server's limit), SYNCERS (50),
# PODS (10000), PARTS (fanout,sync), BENCH_CLUSTER_DIR
# (target/bench-watch-cluster), BENCH_WORK_DIR (target/bench-watch), RESULTS
# (benches/e2e/watch-results.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$repo/benches/e2e/lib.sh"

WATCHERS=${WATCHERS:-1000}
DIRECT_WATCHERS=${DIRECT_WATCHERS:-$WATCHERS}
OBJECTS=${OBJECTS:-300}
RATE=${RATE:-100}
CHANGES=${CHANGES:-1000}
ENCODINGS=${ENCODINGS:-json,protobuf}
TRANSPORTS=${TRANSPORTS:-http1,http2}
H2_STREAMS=${H2_STREAMS:-100}
SYNCERS=${SYNCERS:-50}
PODS=${PODS:-10000}
PARTS=${PARTS:-fanout,sync}
cluster_dir=${BENCH_CLUSTER_DIR:-$repo/target/bench-watch-cluster}
work=${BENCH_WORK_DIR:-$repo/target/bench-watch}
results_md=${RESULTS:-$repo/benches/e2e/watch-results.md}
namespace=watch-bench

log() { echo "watch-bench: $(date +%T) $*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in cargo python3 curl; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
wants() { [[ ",$PARTS," == *",$1,"* ]]; }

# A thousand watchers are a thousand sockets in this process, in kache and
# in the API server (which inherits this limit when this script starts it).
hard=$(ulimit -Hn)
if [[ $hard == unlimited ]] || (( hard > 65536 )); then hard=65536; fi
ulimit -n "$hard"

wall_start=$SECONDS
rm -rf "$work/json" "$work"/state-* "$work"/*.log
mkdir -p "$work/json"
json=$work/json
loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ build
log "building (release)"
build_binaries "$work"
cargo build --release --quiet -p kache-benches --bin kache-watch-bench
cp "${CARGO_TARGET_DIR:-$repo/target}/release/kache-watch-bench" "$work/kache-watch-bench"
WB=$work/kache-watch-bench

# ------------------------------------------------------------------ cluster
log "starting (or reusing) the benchmark cluster in $cluster_dir"
tests/cluster/up.sh "$cluster_dir" > "$work/up.out" 2> "$work/up.log" \
  || die "tests/cluster/up.sh failed: $(tail -n 20 "$work/up.log")"
env_file=$(tail -n 1 "$work/up.out")
# shellcheck disable=SC1090
source "$env_file"
export BENCH_TOKEN=$KACHE_ADMIN_TOKEN
direct=(--url "$KACHE_APISERVER_URL" --ca "$KACHE_CA_CERT")
api=(--apiserver-url "$KACHE_APISERVER_URL" --apiserver-ca "$KACHE_CA_CERT")
apiserver_pid=$(cat "$cluster_dir/apiserver.pid")
etcd_pid=$(cat "$cluster_dir/etcd.pid")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
jget() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$1" "$2"; }

# ------------------------------------------------------------------ kache
# A fresh kache (empty state directory: a cold start) for each part that
# measures its memory.
kache_pid=
kache_starts=0
KACHE_URL=
ADMIN_URL=
start_kache() {
  kache_starts=$((kache_starts + 1))
  local port admin_port state=$work/state-$kache_starts
  port=$(free_port)
  admin_port=$(free_port)
  KACHE_URL=http://127.0.0.1:$port
  ADMIN_URL=http://127.0.0.1:$admin_port
  echo "=== $(date -u +%FT%T.%NZ) start $kache_starts ===" >> "$work/kache.log"
  "$KACHE" serve --kubeconfig "$KACHE_ADMIN_KUBECONFIG" --listen "127.0.0.1:$port" \
    --admin-listen "127.0.0.1:$admin_port" --state-dir "$state" 2>> "$work/kache.log" &
  kache_pid=$!
  local deadline=$((SECONDS + 120))
  until curl -fsS -o /dev/null "$ADMIN_URL/readyz" 2>/dev/null; do
    kill -0 "$kache_pid" 2>/dev/null || die "kache exited: $(tail -n 20 "$work/kache.log")"
    (( SECONDS < deadline )) || die "kache not ready within 120 s: $(tail -n 20 "$work/kache.log")"
    sleep 0.1
  done
}
stop_kache() {
  [[ -n "$kache_pid" ]] || return 0
  kill -TERM "$kache_pid" 2>/dev/null || true
  local i
  for ((i = 0; i < 300; i++)); do
    kill -0 "$kache_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$kache_pid" 2>/dev/null || true
  wait "$kache_pid" 2>/dev/null || true
  kache_pid=
  rm -rf "$work/state-$kache_starts"
}
cleanup() {
  stop_kache
  if [[ "${KEEP:-0}" == 1 ]]; then
    log "KEEP=1: the cluster stays up ($env_file)"
  else
    tests/cluster/down.sh "$cluster_dir" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# The API server's own limit on open files bounds the direct watchers.
apiserver_nofile=$(awk '/^Max open files/ {print $4}' "/proc/$apiserver_pid/limits")
if [[ $apiserver_nofile != unlimited ]] && (( DIRECT_WATCHERS + 500 > apiserver_nofile )); then
  DIRECT_WATCHERS=$((apiserver_nofile - 500))
  log "the API server may open $apiserver_nofile files: $DIRECT_WATCHERS direct watchers"
fi

# ------------------------------------------------------------------ 1. fan-out
if wants fanout; then
  log "1. $OBJECTS pods in namespace $namespace"
  "$WB" setup "${api[@]}" --namespace "$namespace" --objects "$OBJECTS" > "$json/fanout-setup.json"
  baseline=$("$WB" pod-watches "${api[@]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["podWatches"])')
  echo "{\"podWatches\": $baseline}" > "$json/fanout-baseline.json"
  cell=0
  IFS=, read -r -a encodings <<< "$ENCODINGS"
  IFS=, read -r -a transports <<< "$TRANSPORTS"
  # A cell's name and its fan-out flags: "json", or "json-h2" over HTTP/2.
  cell_name() { if [[ $2 == http2 ]]; then echo "$1-h2"; else echo "$1"; fi; }
  streams_flag() { if [[ $1 == http2 ]]; then echo "--http2-streams=$H2_STREAMS"; else echo "--http2-streams=0"; fi; }
  # kache first: the direct cells leave the API server with garbage to collect.
  for transport in "${transports[@]}"; do
    for enc in "${encodings[@]}"; do
      cell=$((cell + 1))
      name=$(cell_name "$enc" "$transport")
      start_kache
      log "1. kache, $name: $WATCHERS watchers, $CHANGES changes at $RATE/s"
      "$WB" fanout --url "$KACHE_URL" --no-auth "${api[@]}" --kache-admin "$ADMIN_URL" --namespace "$namespace" \
        --watchers "$WATCHERS" --changes "$CHANGES" --rate "$RATE" --encoding "$enc" --cell "$cell" \
        "$(streams_flag "$transport")" \
        --server-pid "$kache_pid" --cpu "kache=$kache_pid" --cpu "apiserver=$apiserver_pid" --cpu "etcd=$etcd_pid" \
        --baseline-watches "$baseline" > "$json/fanout-kache-$name.json" 2> "$work/fanout-kache-$name.log" \
        || die "fanout (kache, $name) failed: $(tail -n 20 "$work/fanout-kache-$name.log")"
      log "1. kache, $name: p99 $(jget "$json/fanout-kache-$name.json" latencyFromAnswer.p99_ms) ms, missing $(jget "$json/fanout-kache-$name.json" missing)"
      curl -fsS "$ADMIN_URL/metrics" > "$work/metrics-fanout-$name.txt" || true
      kill -0 "$kache_pid" 2>/dev/null || die "kache died during the fan-out: $(tail -n 20 "$work/kache.log")"
      stop_kache
    done
  done
  for transport in "${transports[@]}"; do
    for enc in "${encodings[@]}"; do
      cell=$((cell + 1))
      name=$(cell_name "$enc" "$transport")
      log "1. direct, $name: $DIRECT_WATCHERS watchers, $CHANGES changes at $RATE/s"
      "$WB" fanout "${direct[@]}" "${api[@]}" --namespace "$namespace" --watchers "$DIRECT_WATCHERS" \
        --changes "$CHANGES" --rate "$RATE" --encoding "$enc" --cell "$cell" "$(streams_flag "$transport")" \
        --server-pid "$apiserver_pid" --cpu "apiserver=$apiserver_pid" --cpu "etcd=$etcd_pid" \
        --baseline-watches "$baseline" > "$json/fanout-direct-$name.json" 2> "$work/fanout-direct-$name.log" \
        || die "fanout (direct, $name) failed: $(tail -n 20 "$work/fanout-direct-$name.log")"
      log "1. direct, $name: p99 $(jget "$json/fanout-direct-$name.json" latencyFromAnswer.p99_ms) ms, missing $(jget "$json/fanout-direct-$name.json" missing)"
    done
  done
fi

# ------------------------------------------------------------------ 2. sync memory
if wants sync; then
  ensure_pods "$json"
  for mode in classic stream; do
    start_kache
    log "2. $mode: $SYNCERS clients sync every pod through a fresh kache"
    "$WB" sync --url "$KACHE_URL" --no-auth "${api[@]}" --kache-admin "$ADMIN_URL" --mode "$mode" \
      --syncers "$SYNCERS" --pid "$kache_pid" --cpu "kache=$kache_pid" --cpu "apiserver=$apiserver_pid" \
      --audit-log "$KACHE_AUDIT_LOG" > "$json/sync-$mode.json" 2> "$work/sync-$mode.log" \
      || die "sync ($mode) failed: $(tail -n 20 "$work/sync-$mode.log")"
    log "2. $mode: synced p99 $(jget "$json/sync-$mode.json" timeToSynced.p99_ms) ms, peak RSS $(jget "$json/sync-$mode.json" rssPeakSampledKb) kB"
    curl -fsS "$ADMIN_URL/metrics" > "$work/metrics-sync-$mode.txt" || true
    kill -0 "$kache_pid" 2>/dev/null || die "kache died during the $mode sync: $(tail -n 20 "$work/kache.log")"
    stop_kache
  done
fi

# ------------------------------------------------------------------ report
apiserver_version=$(curl -fsS --cacert "$KACHE_CA_CERT" -H "Authorization: Bearer $KACHE_ADMIN_TOKEN" \
  "$KACHE_APISERVER_URL/version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gitVersion"])')
cat > "$json/machine.json" <<EOF
{
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "nproc": $(nproc),
  "cpu": "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)",
  "memTotalKb": $(awk '/^MemTotal:/ {print $2}' /proc/meminfo),
  "loadavgStart": "$loadavg_start",
  "loadavg": "$(cut -d' ' -f1-3 /proc/loadavg)",
  "apiserver": "$apiserver_version",
  "apiserverNofile": "$apiserver_nofile",
  "kache": "$kache_build",
  "watchers": $WATCHERS,
  "directWatchers": $DIRECT_WATCHERS,
  "objects": $OBJECTS,
  "rate": $RATE,
  "changes": $CHANGES,
  "encodings": "$ENCODINGS",
  "transports": "$TRANSPORTS",
  "h2Streams": $H2_STREAMS,
  "syncers": $SYNCERS,
  "pods": $PODS,
  "parts": "$PARTS",
  "wallSeconds": $((SECONDS - wall_start))
}
EOF
python3 "$repo/benches/e2e/watch-report.py" "$json" > "$results_md"
cat "$results_md"
log "results written to $results_md (raw JSON in $json); $((SECONDS - wall_start)) s in all"
