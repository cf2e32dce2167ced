#!/usr/bin/env bash
# Restarts and outages benchmark: what kache's own restarts and the API
# server's cost, measured in one run on one machine, in three scenarios:
#
#   1. cold vs warm start: time from starting kache to its first rv=0 LIST of
#      all pods answered from memory, empty state directory vs snapshots left
#      by a previous run stopped with SIGTERM; the upstream requests each made
#      and kache's peak RSS (REPS repetitions, median);
#   2. an API server restart, then an outage with an etcd compaction, under
#      WATCHERS informer-style clients, directly and through kache: upstream
#      requests the event caused, the clients' watch ends and relists, and the
#      time until they saw a change made after it;
#   3. chaos: CHAOS_CLIENTS clients through kache while the API server
#      restarts, kache is SIGTERMed and SIGKILLed (and restarted on the same
#      state directory) and etcd is compacted, on a schedule; then every
#      informer's view must equal a direct LIST (else this script fails).
#
# Writes a markdown report to benches/e2e/restarts-results.md (raw JSON in
# target/bench-restarts/json). See benches/e2e/README.md.
#
#   benches/e2e/restarts.sh              # builds kache and kache-e2e in release mode
#   KEEP=1 benches/e2e/restarts.sh       # leave its cluster running (reused next time)
#   KACHE_BIN=path/to/kache benches/e2e/restarts.sh
#   SCENARIOS=start,chaos benches/e2e/restarts.sh   # a subset
#
# Knobs (environment): PODS (10000), REPS (3), WATCHERS (50), OUTAGE (seconds
# the API server stays down in scenario 2, 30), CHAOS_DURATION (seconds of
# client load in scenario 3, 230), SNAPSHOT_INTERVAL (kache's
# cache.snapshotIntervalSeconds, 15), SCENARIOS (start,restart,chaos),
# BENCH_CLUSTER_DIR (target/bench-restarts-cluster: its own cluster, since it
# restarts the API server and compacts etcd), BENCH_WORK_DIR
# (target/bench-restarts), RESULTS (benches/e2e/restarts-results.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$repo/benches/e2e/lib.sh"

PODS=${PODS:-10000}
REPS=${REPS:-3}
WATCHERS=${WATCHERS:-50}
OUTAGE=${OUTAGE:-30}
CHAOS_DURATION=${CHAOS_DURATION:-230}
SNAPSHOT_INTERVAL=${SNAPSHOT_INTERVAL:-15}
SCENARIOS=${SCENARIOS:-start,restart,chaos}
cluster_dir=${BENCH_CLUSTER_DIR:-$repo/target/bench-restarts-cluster}
work=${BENCH_WORK_DIR:-$repo/target/bench-restarts}
results_md=${RESULTS:-$repo/benches/e2e/restarts-results.md}
# Scenario 2's informers watch these (each also holds a sentinel pod).
watch_namespaces=bench-00,bench-01,bench-02,bench-03,bench-04
# Scenario 3's writers work in chaos-0…chaos-3; its informers also watch two benchmark namespaces.
chaos_namespaces=chaos-0,chaos-1,chaos-2,chaos-3

log() { echo "restarts-bench: $(date +%T) $*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in cargo python3 curl; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
wants() { [[ ",$SCENARIOS," == *",$1,"* ]]; }

wall_start=$SECONDS
rm -rf "$work/json" "$work/state" "$work"/*.log "$work/chaos.ready"
mkdir -p "$work/json"
json=$work/json
loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ build
log "building (release)"
build_binaries "$work"

# ------------------------------------------------------------------ cluster
log "starting (or reusing) the benchmark cluster in $cluster_dir"
tests/cluster/up.sh "$cluster_dir" > "$work/up.out" 2> "$work/up.log" \
  || die "tests/cluster/up.sh failed: $(tail -n 20 "$work/up.log")"
env_file=$(tail -n 1 "$work/up.out")
# shellcheck disable=SC1090
source "$env_file"
export BENCH_TOKEN=$KACHE_ADMIN_TOKEN
direct=(--url "$KACHE_APISERVER_URL" --ca "$KACHE_CA_CERT")
restart_apiserver=$repo/tests/cluster/restart-apiserver.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
jget() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$1" "$2"; }
now() { date +%s.%N; }

# ------------------------------------------------------------------ kache
# One kache at a time, always on the same ports and state directory, so
# clients reconnect to the restarted process.
port=$(free_port)
admin_port=$(free_port)
KACHE_URL=http://127.0.0.1:$port
ADMIN_URL=http://127.0.0.1:$admin_port
cat > "$work/kache.yaml" <<EOF
cache:
  snapshotIntervalSeconds: $SNAPSHOT_INTERVAL
EOF
kache_pid=
kache_starts=0
start_kache() {
  kache_starts=$((kache_starts + 1))
  echo "=== $(date -u +%FT%T.%NZ) start $kache_starts ===" >> "$work/kache.log"
  "$KACHE" serve --kubeconfig "$KACHE_ADMIN_KUBECONFIG" --config "$work/kache.yaml" \
    --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    --state-dir "$work/state" 2>> "$work/kache.log" &
  kache_pid=$!
}
# wait_kache_ready: until /readyz answers 200 (at most 120 s).
wait_kache_ready() {
  local deadline=$((SECONDS + 120))
  until curl -fsS -o /dev/null "$ADMIN_URL/readyz" 2>/dev/null; do
    kill -0 "$kache_pid" 2>/dev/null || die "kache exited: $(tail -n 20 "$work/kache.log")"
    (( SECONDS < deadline )) || die "kache not ready within 120 s: $(tail -n 20 "$work/kache.log")"
    sleep 0.05
  done
}
# stop_kache SIGNAL: signals kache and waits for it to exit (SIGKILL after 30 s).
stop_kache() {
  local signal=$1 i
  [[ -n "$kache_pid" ]] || return 0
  kill "-$signal" "$kache_pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    kill -0 "$kache_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$kache_pid" 2>/dev/null || true
  wait "$kache_pid" 2>/dev/null || true
  kache_pid=
}

chaos_pid=
cleanup() {
  if [[ -n "$chaos_pid" ]]; then
    kill -TERM "$chaos_pid" 2>/dev/null || true
    wait "$chaos_pid" 2>/dev/null || true
  fi
  stop_kache TERM
  # The API server may have been left stopped by an interrupted outage.
  "$restart_apiserver" --start "$cluster_dir" >/dev/null 2>&1 || true
  if [[ "${KEEP:-0}" == 1 ]]; then
    log "KEEP=1: the cluster stays up ($env_file)"
  else
    tests/cluster/down.sh "$cluster_dir" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ pods, sentinels
ensure_pods "$json"
log "sentinel pods and namespaces"
"$E2E" restarts-setup "${direct[@]}" --sentinel-namespaces "$watch_namespaces,$chaos_namespaces" > "$json/setup.json"
# Every pod, as a consistent read: what a cached rv=0 LIST must hold.
"$E2E" list-size "${direct[@]}" --path /api/v1/pods > "$json/rawsize.json"
total_pods=$(jget "$json/rawsize.json" items)
log "$total_pods pods in the cluster"

audit_mark() { "$E2E" audit-mark --audit-log "$KACHE_AUDIT_LOG" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mark"])'; }
# Pod watches the API server holds for itself (its loopback client), before
# any of ours: audit-since waits until no more than these are open.
"$E2E" open-watches "${direct[@]}" > "$json/baseline-watches.json"
baseline_watches=$(jget "$json/baseline-watches.json" openPodWatches)
audit_since() {
  "$E2E" audit-since "${direct[@]}" --audit-log "$KACHE_AUDIT_LOG" --quiesce-watches \
    --baseline-watches "$baseline_watches" "$@"
}

# ------------------------------------------------------------------ 1. cold vs warm start
# measure_start KIND REP: starts kache on the state directory as it is, times
# its first rv=0 LIST of every pod answered from memory (sent once kache's
# /readyz answers; for warm-eager as soon as kache accepts connections, as
# clients reconnecting to a restarted kache do; for warm-store once
# /debug/cache also lists the pod store restored from the snapshot), stops it
# with SIGTERM (which saves the snapshots), then counts its upstream requests.
measure_start() {
  local kind=$1 rep=$2 mark t0 out wait_args=()
  out=$json/start-$kind-$rep
  [[ $kind != warm-eager ]] && wait_args+=(--ready-url "$ADMIN_URL/readyz")
  [[ $kind == warm-store ]] && wait_args+=(--store-url "$ADMIN_URL/debug/cache")
  mark=$(audit_mark)
  t0=$(now)
  start_kache
  "$E2E" first-cached-list --url "$KACHE_URL" --no-auth --metrics "$ADMIN_URL/metrics" ${wait_args[@]+"${wait_args[@]}"} \
    --expect-items "$total_pods" --started-at "$t0" > "$out.json" \
    || die "$kind start $rep: no cached LIST ($(tail -n 5 "$work/kache.log"))"
  local hwm rss
  hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$kache_pid/status")
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$kache_pid/status")
  curl -fsS "$ADMIN_URL/metrics" > "$work/metrics-start-$kind-$rep.txt" || true
  stop_kache TERM
  local snapshot_bytes
  snapshot_bytes=$(du -sb "$work/state/snapshots" 2>/dev/null | cut -f1)
  audit_since --mark "$mark" --since "$t0" > "$out-upstream.json"
  echo "{\"hwmKb\": $hwm, \"rssKb\": $rss, \"snapshotBytes\": ${snapshot_bytes:-0}}" > "$out-process.json"
  log "1. $kind start $rep: $(jget "$out.json" seconds) s to the first cached LIST; upstream $(python3 -c '
import json,sys; d=json.load(open(sys.argv[1]))["byUser"].get("admin",{}); print({k:v for k,v in d.items() if "pods" in k})' "$out-upstream.json"); peak RSS $((hwm / 1024)) MB"
}
if wants start; then
  for rep in $(seq 1 "$REPS"); do
    rm -rf "$work/state"
    measure_start cold "$rep"
    for kind in warm warm-eager warm-store; do
      grep -q . <(find "$work/state/snapshots" -name '*.ksnap' 2>/dev/null) \
        || die "kache left no snapshot at SIGTERM: $(tail -n 20 "$work/kache.log")"
      measure_start "$kind" "$rep"
    done
  done
fi

# ------------------------------------------------------------------ 2. API server restart, WATCHERS watchers
# The disruptions, as the commands the informers subcommand runs in order.
restart_steps=(--step "'$restart_apiserver' '$cluster_dir'")
outage_steps=(--step "'$restart_apiserver' --stop '$cluster_dir'"
  --step "'$E2E' etcd-compact --etcd '$KACHE_ETCD_ENDPOINT' > '$json/outage-compaction.json'"
  --step "sleep $OUTAGE"
  --step "'$restart_apiserver' --start '$cluster_dir'")
if wants restart; then
  for event in restart outage; do
    for side in direct kache; do
      if [[ $event == restart ]]; then steps=("${restart_steps[@]}"); else steps=("${outage_steps[@]}"); fi
      if [[ $side == direct ]]; then
        target=("${direct[@]}")
      else
        start_kache
        wait_kache_ready
        target=(--url "$KACHE_URL" --no-auth)
      fi
      out=$json/watch-$event-$side
      mark=$(audit_mark)
      log "2. $event with $WATCHERS informers, $side"
      "$E2E" informers "${target[@]}" --apiserver-url "$KACHE_APISERVER_URL" --apiserver-ca "$KACHE_CA_CERT" \
        --watchers "$WATCHERS" --namespaces "$watch_namespaces" --selector "" --selector "team in (team-1,team-2)" \
        "${steps[@]}" --incidents "$out-incidents.jsonl" > "$out.json" 2> "$work/watch-$event-$side.log" \
        || die "informers ($event, $side) failed: $(tail -n 20 "$work/watch-$event-$side.log")"
      if [[ $side == kache ]]; then
        curl -fsS "$ADMIN_URL/metrics" > "$work/metrics-watch-$event.txt" || true
        kill -0 "$kache_pid" 2>/dev/null || die "kache died during the $event: $(tail -n 20 "$work/kache.log")"
        stop_kache TERM
      fi
      audit_since --mark "$mark" --since "$(jget "$out.json" disruptedAt)" --records "$out-records.json" \
        > "$out-upstream.json"
      log "2. $event, $side: sentinel seen after $(jget "$out.json" sentinelSeenAfterWrite.max) s (slowest); caused $(python3 -c '
import json,sys; print(json.load(open(sys.argv[1]))["caused"])' "$out.json")"
    done
  done
fi

# ------------------------------------------------------------------ 3. chaos
# A schedule of disruptions (seconds after the clients started); each entry
# is logged to chaos-timeline.jsonl with its start and end.
timeline=$json/chaos-timeline.jsonl
event_log() { echo "{\"event\": \"$1\", \"start\": $2, \"end\": $3}" >> "$timeline"; }
kache_crashes=0
# chaos_action NAME: one disruption.
chaos_action() {
  local name=$1 start
  start=$(now)
  if ! kill -0 "$kache_pid" 2>/dev/null; then
    # Not a scheduled stop: kache exited by itself.
    kache_crashes=$((kache_crashes + 1))
    log "3. kache is not running before $name: restarting it"
    event_log kache-crashed "$start" "$start"
    start_kache
    wait_kache_ready
  fi
  case $name in
    apiserver-restart)
      "$restart_apiserver" "$cluster_dir" 2>> "$work/chaos-actions.log" ;;
    kache-sigterm)
      stop_kache TERM; start_kache; wait_kache_ready ;;
    kache-sigkill)
      stop_kache KILL; start_kache; wait_kache_ready ;;
    etcd-compaction)
      "$E2E" etcd-compact --etcd "$KACHE_ETCD_ENDPOINT" >> "$json/chaos-compactions.jsonl" ;;
    apiserver-outage)
      "$restart_apiserver" --stop "$cluster_dir" 2>> "$work/chaos-actions.log"
      "$E2E" etcd-compact --etcd "$KACHE_ETCD_ENDPOINT" >> "$json/chaos-compactions.jsonl"
      sleep 20
      "$restart_apiserver" --start "$cluster_dir" 2>> "$work/chaos-actions.log" ;;
    kache-sigkill+apiserver-restart)
      # Both at once: kache starts again while the API server is still down.
      stop_kache KILL
      "$restart_apiserver" "$cluster_dir" 2>> "$work/chaos-actions.log" &
      local restarting=$!
      start_kache
      wait "$restarting"
      wait_kache_ready ;;
    *) die "unknown chaos action $name" ;;
  esac
  event_log "$name" "$start" "$(now)"
}
# Under this load an API server restart takes ~35 s (its stop waits up to
# 15 s before tests/cluster kills it), the outage ~60 s: the last disruption
# ends before the load does, so the convergence check sees a quiet cluster.
chaos_schedule=(
  "15 apiserver-restart"
  "55 kache-sigterm"
  "70 etcd-compaction"
  "80 kache-sigkill"
  "95 apiserver-outage"
  "160 kache-sigkill+apiserver-restart"
)
if wants chaos; then
  rm -f "$timeline" "$json/chaos-compactions.jsonl"
  chaos_first_start=$((kache_starts + 1))
  start_kache
  wait_kache_ready
  mark=$(audit_mark)
  chaos_t0=$(now)
  log "3. chaos: clients through kache for ${CHAOS_DURATION}s, disruptions on a schedule"
  "$E2E" chaos --url "$KACHE_URL" --no-auth --apiserver-url "$KACHE_APISERVER_URL" --apiserver-ca "$KACHE_CA_CERT" \
    --pods "$PODS" --duration "$CHAOS_DURATION" --ready-file "$work/chaos.ready" \
    --incidents "$json/chaos-incidents.jsonl" > "$json/chaos.json" 2> "$work/chaos.log" &
  chaos_pid=$!
  deadline=$((SECONDS + 300))
  until [[ -s "$work/chaos.ready" ]]; do
    kill -0 "$chaos_pid" 2>/dev/null || die "the chaos clients exited: $(tail -n 20 "$work/chaos.log")"
    (( SECONDS < deadline )) || die "the chaos clients did not start within 300 s"
    sleep 0.2
  done
  ready_at=$(cat "$work/chaos.ready")
  for entry in "${chaos_schedule[@]}"; do
    read -r offset action <<< "$entry"
    wait_s=$(python3 -c 'import sys,time; print(max(0.0, float(sys.argv[1]) + float(sys.argv[2]) - time.time()))' "$ready_at" "$offset")
    left=$(python3 -c 'import sys,time; print(int(float(sys.argv[1]) + float(sys.argv[2]) - time.time()))' "$ready_at" "$CHAOS_DURATION")
    if (( left < 45 )); then
      log "3. skipping $action: too close to the end of the load"
      event_log "skipped-$action" "$(now)" "$(now)"
      continue
    fi
    sleep "$wait_s"
    log "3. $action"
    chaos_action "$action"
  done
  log "3. schedule done; waiting for the clients' convergence check"
  chaos_rc=0
  deadline=$((SECONDS + ${CHAOS_DURATION%.*} + 400))
  while kill -0 "$chaos_pid" 2>/dev/null; do
    (( SECONDS < deadline )) || { kill -TERM "$chaos_pid"; die "the chaos clients did not finish in time"; }
    sleep 0.5
  done
  wait "$chaos_pid" || chaos_rc=$?
  chaos_pid=
  kill -0 "$kache_pid" 2>/dev/null || { kache_crashes=$((kache_crashes + 1)); event_log kache-crashed "$(now)" "$(now)"; }
  curl -fsS "$ADMIN_URL/metrics" > "$work/metrics-chaos.txt" || true
  stop_kache TERM
  audit_since --mark "$mark" --since "$chaos_t0" --records "$json/chaos-upstream-records.json" \
    > "$json/chaos-upstream.json"
  echo "{\"rc\": $chaos_rc, \"firstKacheStart\": $chaos_first_start, \"kacheCrashes\": $kache_crashes, \"panics\": $(grep -c 'panicked' "$work/kache.log" || true)}" \
    > "$json/chaos-status.json"
  (( chaos_rc == 0 )) || log "3. the chaos clients failed (exit $chaos_rc): $(tail -n 5 "$work/chaos.log")"
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
  "kache": "$kache_build",
  "pods": $PODS,
  "totalPods": $total_pods,
  "reps": $REPS,
  "watchers": $WATCHERS,
  "outage": $OUTAGE,
  "chaosDuration": $CHAOS_DURATION,
  "snapshotInterval": $SNAPSHOT_INTERVAL,
  "scenarios": "$SCENARIOS",
  "wallSeconds": $((SECONDS - wall_start))
}
EOF
python3 "$repo/benches/e2e/restarts-report.py" "$json" "$work/kache.log" > "$results_md"
cat "$results_md"
log "results written to $results_md (raw JSON in $json); $((SECONDS - wall_start)) s in all"
if wants chaos; then
  [[ $(jget "$json/chaos.json" converged) == True ]] || die "chaos: some informer's view differs from the API server's (see $json/chaos.json)"
  (( chaos_rc == 0 && kache_crashes == 0 )) || die "chaos: the clients failed or kache crashed"
fi
