#!/usr/bin/env bash
# End-to-end benchmark: the same requests sent to the API server directly and
# through kache, in one run on one machine. Prints a markdown table and writes
# it to benches/e2e/results.md. See benches/e2e/README.md.
#
#   benches/e2e/run.sh                 # everything (builds in release mode)
#   KEEP=1 benches/e2e/run.sh          # leave the benchmark cluster running (reused next time)
#   KACHE_BIN=path/to/kache benches/e2e/run.sh   # measure a prebuilt kache
#
# Knobs (environment): PODS (10000), DURATION (seconds per throughput cell, 15),
# MAX_REQUESTS (per cell, 3000), PASSTHROUGH_MAX (per consistent-LIST cell, 20),
# LABEL_SELECTOR (team=team-3), FIELD_SELECTOR (metadata.namespace=bench-03),
# NGINX (1; 0 leaves the nginx anchor out), SHM_DIR (/dev/shm), MEM_HEADROOM_MB
# (3072), KUBECTL_RUNS (20), BURST (100) and BURST_PATH, KUBECTL_BURST (100) and
# KUBECTL_BURST_ARGS, KUBECTL (kubectl binary), BENCH_CLUSTER_DIR
# (target/bench-cluster), BENCH_WORK_DIR (target/bench-e2e), RESULTS
# (benches/e2e/results.md). Details in benches/e2e/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
# shellcheck source=lib.sh
source "$repo/benches/e2e/lib.sh"
# shellcheck source=nginx.sh
source "$repo/benches/e2e/nginx.sh"

PODS=${PODS:-10000}
DURATION=${DURATION:-15}
MAX_REQUESTS=${MAX_REQUESTS:-3000}
BURST=${BURST:-100}
KUBECTL_RUNS=${KUBECTL_RUNS:-20}
KUBECTL_BURST=${KUBECTL_BURST:-100}
PASSTHROUGH_MAX=${PASSTHROUGH_MAX:-20}
LABEL_SELECTOR=${LABEL_SELECTOR:-team=team-3}
FIELD_SELECTOR=${FIELD_SELECTOR:-metadata.namespace=bench-03}
NGINX=${NGINX:-1}
SHM_DIR=${SHM_DIR:-/dev/shm}
MEM_HEADROOM_MB=${MEM_HEADROOM_MB:-3072}
cluster_dir=${BENCH_CLUSTER_DIR:-$repo/target/bench-cluster}
work=${BENCH_WORK_DIR:-$repo/target/bench-e2e}
results_md=${RESULTS:-$repo/benches/e2e/results.md}
if [[ -z "${KUBECTL:-}" ]]; then
  # The gcloud `kubectl` is a dispatcher that sends its own GET /version first:
  # prefer a real kubectl binary so the request counts are kubectl's own.
  KUBECTL=$(printf '%s\n' /usr/lib/google-cloud-sdk/bin/kubectl.1.* | sort -V | tail -n 1)
  [[ -x "$KUBECTL" ]] || KUBECTL=kubectl
fi

log() { echo "bench: $(date +%T) $*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in cargo python3 curl "$KUBECTL"; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
nginx_bin=
if [[ $NGINX == 1 ]]; then
  nginx_bin=$(nginx_ensure) || die "nginx is required for the anchor cells (or set NGINX=0 to leave them out)"
fi

rm -rf "$work/json" "$work/state" "$work"/kubectl-cache-*
mkdir -p "$work/json"
loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)
json=$work/json

# ------------------------------------------------------------------ build
log "building (release)"
build_binaries "$work"

# ------------------------------------------------------------------ cluster
log "starting the benchmark cluster in $cluster_dir"
env_file=$(tests/cluster/up.sh "$cluster_dir")
# shellcheck disable=SC1090
source "$env_file"
export BENCH_TOKEN=$KACHE_ADMIN_TOKEN
direct=(--url "$KACHE_APISERVER_URL" --ca "$KACHE_CA_CERT")

kache_pid=
nginx_pid=
shm=
cleanup() {
  nginx_stop
  [[ -n "$shm" ]] && rm -rf "$shm"
  if [[ -n "$kache_pid" ]] && kill -0 "$kache_pid" 2>/dev/null; then
    kill -TERM "$kache_pid" 2>/dev/null || true
    wait "$kache_pid" 2>/dev/null || true
  fi
  if [[ "${KEEP:-0}" != 1 ]]; then
    tests/cluster/down.sh "$cluster_dir" >/dev/null 2>&1 || true
  else
    log "KEEP=1: the cluster stays up ($env_file)"
  fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# kache's list files (memory files sent with sendfile, see cache/src/filed.rs):
# shared memory, in VmRSS only for pages kache read through the mapping.
files_kb() {
  local total=0 fd
  for fd in /proc/"$1"/fd/*; do
    [[ $(readlink "$fd" 2>/dev/null) == /memfd:kache-list* ]] || continue
    total=$(( total + $(stat -L -c %s "$fd" 2>/dev/null || echo 0) ))
  done
  echo $(( total / 1024 ))
}
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
mem_available_mb() { awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo; }
# json_field FILE KEY: one top-level field of a JSON file.
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
# note FILE KEY TEXT: writes {"KEY": TEXT} (a cell that did not run: skipped, failed).
note() { python3 -c 'import json,sys; json.dump({sys.argv[2]: sys.argv[3]}, open(sys.argv[1], "w"))' "$@"; }

# Memory guard. Every cell estimates the memory its requests take beyond what
# is already in use, from the size of one answer (B bytes): the API server
# holds ~RV0_COST x B per concurrent rv=0 LIST it serves from its watch cache
# and ~CONSISTENT_COST x B per consistent LIST (read from etcd, decoded,
# encoded again; 10 concurrent LISTs of 10,000 pods grew it by 2.3 GB, 5.4 x
# 43 MB), and the load generator keeps one whole answer (2 x B with its
# parse). A cell runs only when MemAvailable covers the estimate plus
# MEM_HEADROOM_MB (others share the machine); else it is skipped and says why.
RV0_COST=5
CONSISTENT_COST=6
mb_of() { echo $(( ($1 + 1048575) / 1048576 )); }
# grown_mb CELL NAME: how much NAME's RSS grew during a cell that ran (MB, 0 if unknown).
grown_mb() {
  python3 -c 'import json,sys
r = json.load(open(sys.argv[1])).get("rssKb", {}).get(sys.argv[2]) or {}
print(max(0, int(((r.get("peak") or 0) - (r.get("start") or 0)) / 1024)))' "$json/$1.json" "$2" 2>/dev/null || echo 0
}
skip_reason=
# fits NEED_MB: true if NEED_MB + MEM_HEADROOM_MB is available; else sets skip_reason.
fits() {
  local need=$1 have
  have=$(mem_available_mb)
  if (( have >= need + MEM_HEADROOM_MB )); then
    return 0
  fi
  skip_reason="would need ~$(( need / 1024 )).$(( need % 1024 * 10 / 1024 )) GB of memory (estimate) + ${MEM_HEADROOM_MB} MB headroom; $(( have / 1024 )).$(( have % 1024 * 10 / 1024 )) GB available"
  return 1
}
# cell NAME NEED_MB LOAD_ARGS...: `kache-e2e load` into $json/NAME.json, unless
# the memory guard skips it; a load that fails is recorded as failed, and the
# run goes on.
cell() {
  local name=$1 need=$2
  shift 2
  if ! fits "$need"; then
    log "$name skipped: $skip_reason"
    note "$json/$name.json" skipped "$skip_reason"
    return 0
  fi
  if ! "$E2E" load "$@" > "$json/$name.json" 2> "$work/$name.stderr"; then
    log "$name failed: $(tail -n 3 "$work/$name.stderr")"
    note "$json/$name.json" failed "$(tail -n 1 "$work/$name.stderr")"
  fi
}

# ------------------------------------------------------------------ pods
ensure_pods "$json"
sleep 2   # let the API server's watch cache catch up with the last creates
"$E2E" list-size "${direct[@]}" --path '/api/v1/pods?resourceVersion=0' > "$json/rawsize.json"
"$E2E" list-size "${direct[@]}" --path '/api/v1/pods?resourceVersion=0' \
  --accept application/vnd.kubernetes.protobuf > "$json/rawsize-protobuf.json"
log "raw list: $(cat "$json/rawsize.json")"

# ------------------------------------------------------------------ kache
port=$(free_port)
admin_port=$(free_port)
KACHE_URL=http://127.0.0.1:$port
ADMIN_URL=http://127.0.0.1:$admin_port
log "starting kache on $KACHE_URL (admin $ADMIN_URL)"
"$KACHE" serve --kubeconfig "$KACHE_ADMIN_KUBECONFIG" --listen "127.0.0.1:$port" \
  --admin-listen "127.0.0.1:$admin_port" --state-dir "$work/state" 2> "$work/kache.log" &
kache_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "$ADMIN_URL/readyz" >/dev/null 2>&1 && break
  kill -0 "$kache_pid" 2>/dev/null || die "kache exited: $(tail -n 20 "$work/kache.log")"
  sleep 0.2
done
curl -fsS "$ADMIN_URL/readyz" >/dev/null || die "kache is not ready: $(tail -n 20 "$work/kache.log")"
"$KACHE" kubeconfig --server "$KACHE_URL" > "$work/kache.kubeconfig"
kache_via=(--url "$KACHE_URL" --no-auth)
rss_idle=$(rss_kb "$kache_pid")

# fill_cache ENCODING ACCEPT: one rv=0 list through kache, then wait until
# /debug/cache shows the pods synced in that encoding; prints the seconds taken.
# The list that starts the store selects no pod (label kache-bench=fill), so
# that kache's peak memory right after the fill is the sync's own, not that of
# also answering every pod.
fill_cache() {
  local encoding=$1 accept=$2 start deadline=$((SECONDS + 120 + PODS / 500))
  start=$(date +%s.%N)
  curl -fsS -o /dev/null -H "Accept: $accept" \
    "$KACHE_URL/api/v1/pods?resourceVersion=0&labelSelector=kache-bench%3Dfill" \
    || die "first $encoding list through kache failed"
  while (( SECONDS < deadline )); do
    curl -fsS "$ADMIN_URL/debug/cache" > "$json/debug-cache.json" || true
    if python3 - "$json/debug-cache.json" "$PODS" "$encoding" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
pods = [r for r in d.get("resources", [])
        if r.get("resource") == "pods" and r.get("group") == "" and r.get("encoding", "json") == sys.argv[3]]
sys.exit(0 if pods and pods[0].get("synced") and pods[0].get("objects", 0) >= int(sys.argv[2]) else 1)
EOF
    then
      python3 -c "import time,sys; print(round(time.time() - float(sys.argv[1]), 2))" "$start"
      return 0
    fi
    sleep 0.2
  done
  log "WARNING: kache's $encoding pod cache did not sync within $((120 + PODS / 500)) s; those reads are forwarded"
  echo null
}
log "filling kache's pod cache: JSON"
fill_json=$(fill_cache json application/json)
hwm_json=$(hwm_kb "$kache_pid")
sleep 1
rss_json=$(rss_kb "$kache_pid")
log "filling kache's pod cache: protobuf"
fill_protobuf=$(fill_cache protobuf application/vnd.kubernetes.protobuf)
sleep 1
rss_filled=$(rss_kb "$kache_pid")
curl -fsS "$ADMIN_URL/debug/cache" > "$json/debug-cache.json"
log "cache filled in ${fill_json}s (JSON) + ${fill_protobuf}s (protobuf); kache RSS ${rss_idle} kB -> ${rss_json} kB (peak ${hwm_json} kB) -> ${rss_filled} kB"
list_path='/api/v1/pods?resourceVersion=0'
body_json=$(json_field "$json/rawsize.json" bodyBytes)
body_protobuf=$(json_field "$json/rawsize-protobuf.json" bodyBytes)

# ------------------------------------------------------------------ nginx, serving kache's answers
# kache's whole rv=0 pod list, in JSON and in protobuf, saved on a tmpfs and
# served by nginx with the Content-Type kache sent: the same bytes, from
# memory, by a static file server.
nginx_skip=
nginx_version=
if [[ $NGINX != 1 ]]; then
  nginx_skip="NGINX=0"
else
  shm_need_mb=$(( $(mb_of "$body_json") + $(mb_of "$body_protobuf") + 64 ))
  shm_free_mb=$(df -Pm "$SHM_DIR" 2>/dev/null | awk 'NR == 2 {print $4}')
  if [[ -z "$shm_free_mb" ]] || (( shm_free_mb < shm_need_mb )); then
    nginx_skip="$SHM_DIR has ${shm_free_mb:-no} MB free, the answers need $shm_need_mb MB"
  elif ! fits "$shm_need_mb"; then
    nginx_skip="the answers held in $SHM_DIR $skip_reason"
  fi
fi
if [[ -z "$nginx_skip" ]]; then
  shm=$(mktemp -d "$SHM_DIR/kache-bench-XXXXXX")
  chmod 755 "$shm"
  mkdir "$shm/bodies"
  "$E2E" list-size "${kache_via[@]}" --path "$list_path" --accept application/json \
    --save "$shm/bodies/pods.json" > "$json/nginx-body-json.json"
  "$E2E" list-size "${kache_via[@]}" --path "$list_path" --accept application/vnd.kubernetes.protobuf \
    --save "$shm/bodies/pods.protobuf" > "$json/nginx-body-protobuf.json"
  chmod 644 "$shm/bodies"/*
  nginx_port=$(free_port)
  NGINX_URL=http://127.0.0.1:$nginx_port
  nginx_config "$shm" "$nginx_port" "$(json_field "$json/nginx-body-json.json" contentType)" \
    "$(json_field "$json/nginx-body-protobuf.json" contentType)"
  nginx_start "$nginx_bin" "$shm" "$nginx_port" || die "nginx did not start (config: $shm/nginx.conf)"
  nginx_version=$("$nginx_bin" -v 2>&1 | sed 's/^nginx version: //')
  mapfile -t nginx_cpu < <(nginx_cpu_args)
  log "nginx ($nginx_version) serves kache's answers on $NGINX_URL from $shm"
else
  log "nginx cells skipped: $nginx_skip"
fi

# ------------------------------------------------------------------ 1. rv=0 LIST throughput
apiserver_pid=$(cat "$cluster_dir/apiserver.pid")
etcd_pid=$(cat "$cluster_dir/etcd.pid")
cpu_all=(--cpu "apiserver=$apiserver_pid" --cpu "etcd=$etcd_pid" --cpu "kache=$kache_pid")
kache_side=("${kache_via[@]}" --kache-metrics "$ADMIN_URL/metrics")
for enc in json protobuf; do
  case $enc in
    json) accept=application/json body=$body_json ;;
    protobuf) accept=application/vnd.kubernetes.protobuf body=$body_protobuf ;;
  esac
  for c in 1 8; do
    # The API server first, for the whole time. Then kache and nginx in
    # turns, kache, nginx, nginx, kache, each half the time and requests: the
    # machine's load drifts over a run by more than the two differ, and the
    # turns put a drift on both alike.
    for turn in direct kache nginx nginx-2 kache-2; do
      side=${turn%-2}
      name=list-$enc-c$c-$turn
      duration=$DURATION max=$MAX_REQUESTS
      [[ $side == direct ]] || duration=$((DURATION / 2)) max=$(( (MAX_REQUESTS + 1) / 2 ))
      case $side in
        direct)
          # The API server's growth in the 1-client cell, if more than the estimate.
          per=$(( RV0_COST * $(mb_of "$body") ))
          if (( c > 1 )) && (( $(grown_mb "list-$enc-c1-direct" apiserver) > per )); then
            per=$(grown_mb "list-$enc-c1-direct" apiserver)
          fi
          args=("${direct[@]}") need=$(( c * per + 2 * $(mb_of "$body") )) ;;
        kache) args=("${kache_side[@]}") need=$(( 2 * $(mb_of "$body") )) ;;
        nginx)
          if [[ -n "$nginx_skip" ]]; then
            note "$json/$name.json" skipped "$nginx_skip"
            continue
          fi
          args=(--url "$NGINX_URL" --no-auth "${nginx_cpu[@]}") need=$(( 2 * $(mb_of "$body") )) ;;
      esac
      log "1. rv=0 LIST $enc c=$c $turn (${duration}s)"
      cell "$name" "$need" "${args[@]}" "${cpu_all[@]}" --path "$list_path" --accept "$accept" \
        --concurrency "$c" --duration "$duration" --max-requests "$max" --audit-log "$KACHE_AUDIT_LOG"
    done
  done
done
rss_after_load=$(rss_kb "$kache_pid")
hwm_after_load=$(hwm_kb "$kache_pid")
files_after_load=$(files_kb "$kache_pid")
curl -fsS "$ADMIN_URL/metrics" > "$work/metrics-after-list.txt" || true
nginx_stop
[[ -n "$shm" ]] && rm -rf "$shm" && shm=

# ------------------------------------------------------------------ 1b. consistent LIST, passed through
# No resourceVersion: a quorum read kache forwards (one client: nothing to
# coalesce). Its cost is the forwarding's; both sides read etcd. The API
# server's own time per LIST drifts over a run by more than forwarding
# costs, so the sides take turns, direct, kache, kache, direct, each half
# the time and requests: a drift falls on both alike.
for turn in direct kache kache-2 direct-2; do
  if [[ $turn == direct* ]]; then args=("${direct[@]}"); else args=("${kache_side[@]}"); fi
  log "1b. consistent LIST of all pods, $turn ($((DURATION / 2))s, at most $((PASSTHROUGH_MAX / 2)))"
  cell "passthrough-$turn" $(( (CONSISTENT_COST + 2) * $(mb_of "$body_json") )) "${args[@]}" "${cpu_all[@]}" \
    --path /api/v1/pods --accept application/json --concurrency 1 --duration "$((DURATION / 2))" \
    --max-requests "$(( (PASSTHROUGH_MAX + 1) / 2 ))" --audit-log "$KACHE_AUDIT_LOG"
done

# ------------------------------------------------------------------ 1c. selector LISTs from memory
urlencode() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
for kind in label field; do
  if [[ $kind == label ]]; then
    path="$list_path&labelSelector=$(urlencode "$LABEL_SELECTOR")"
  else
    path="$list_path&fieldSelector=$(urlencode "$FIELD_SELECTOR")"
  fi
  # The answer's size, from kache's memory, sizes the direct cells' guard.
  "$E2E" list-size "${kache_via[@]}" --path "$path" > "$json/selector-$kind-size.json"
  body=$(json_field "$json/selector-$kind-size.json" bodyBytes)
  for c in 1 8; do
    for side in direct kache; do
      if [[ $side == direct ]]; then
        args=("${direct[@]}") need=$(( c * RV0_COST * $(mb_of "$body") + 2 * $(mb_of "$body") ))
      else
        args=("${kache_side[@]}") need=$(( 2 * $(mb_of "$body") ))
      fi
      log "1c. rv=0 LIST with a $kind selector c=$c $side (${DURATION}s)"
      cell "selector-$kind-c$c-$side" "$need" "${args[@]}" "${cpu_all[@]}" --path "$path" \
        --accept application/json --concurrency "$c" --duration "$DURATION" \
        --max-requests "$MAX_REQUESTS" --audit-log "$KACHE_AUDIT_LOG"
    done
  done
done

# ------------------------------------------------------------------ 3. discovery: fresh kubectl
for side in direct kache; do
  if [[ $side == direct ]]; then kc=$KACHE_ADMIN_KUBECONFIG; else kc=$work/kache.kubeconfig; fi
  log "3. $KUBECTL_RUNS x kubectl get pods, empty cache dir, $side"
  "$E2E" procs --n "$KUBECTL_RUNS" --fresh-cache-dir --audit-log "$KACHE_AUDIT_LOG" -- \
    "$KUBECTL" --kubeconfig "$kc" get pods > "$json/discovery-$side.json"
done

# ------------------------------------------------------------------ 4. bursts of consistent LISTs
# Sized for a 2-core, 24 GB machine shared with others (measured there):
# 10 concurrent direct consistent LISTs of all 10,000 pods took 30 s and grew
# the API server from 1.0 to 3.3 GB RSS (etcd to 0.8 GB), so 100 would not fit;
# one `kubectl get pods -A -o json` over them takes ~1 GB RSS and ~13 s of CPU,
# so 100 at once would need ~95 GB. The bursts therefore read one namespace
# (1,000 pods). Override with BURST_PATH / KUBECTL_BURST_ARGS.
BURST_PATH=${BURST_PATH:-/api/v1/namespaces/bench-00/pods}
read -r -a kubectl_burst_args <<< "${KUBECTL_BURST_ARGS:-get pods -n bench-00 -o json --field-selector spec.nodeName=node-1}"
# What one upstream LIST of the burst reads, from kache's memory: the burst
# path at rv=0 (4a) and namespace bench-00 (4b's default). Through kache at
# most two upstream calls per key run at once (one running, one gathering).
if [[ $BURST_PATH == *\?* ]]; then sep='&'; else sep='?'; fi
burst_mb=$(mb_of "$("$E2E" list-size "${kache_via[@]}" --path "$BURST_PATH${sep}resourceVersion=0" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["bodyBytes"])')")
ns_mb=$(mb_of "$("$E2E" list-size "${kache_via[@]}" --path /api/v1/namespaces/bench-00/pods?resourceVersion=0 \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["bodyBytes"])')")
for side in direct kache; do
  if [[ $side == direct ]]; then
    args=("${direct[@]}") need=$(( BURST * CONSISTENT_COST * burst_mb ))
  else
    args=("${kache_via[@]}") need=$(( 2 * CONSISTENT_COST * burst_mb ))
  fi
  if ! fits "$need"; then
    log "4a. $side skipped: $skip_reason"
    note "$json/burst-$side.json" skipped "$skip_reason"
    continue
  fi
  log "4a. burst of $BURST concurrent GET $BURST_PATH, $side"
  "$E2E" burst "${args[@]}" --path "$BURST_PATH" --accept application/json --n "$BURST" \
    --audit-log "$KACHE_AUDIT_LOG" > "$json/burst-$side.json"
done
for side in direct kache; do
  # ~100 MB per kubectl process, and the upstream LISTs of bench-00.
  if [[ $side == direct ]]; then
    kc=$KACHE_ADMIN_KUBECONFIG need=$(( KUBECTL_BURST * (100 + CONSISTENT_COST * ns_mb) ))
  else
    kc=$work/kache.kubeconfig need=$(( KUBECTL_BURST * 100 + 2 * CONSISTENT_COST * ns_mb ))
  fi
  if ! fits "$need"; then
    log "4b. $side skipped: $skip_reason"
    note "$json/kubectl-burst-$side.json" skipped "$skip_reason"
    continue
  fi
  # One warm discovery cache shared by every run: the burst measures the LIST.
  "$KUBECTL" --kubeconfig "$kc" --cache-dir "$work/kubectl-cache-$side" api-resources >/dev/null
  log "4b. $KUBECTL_BURST concurrent kubectl ${kubectl_burst_args[*]}, $side"
  "$E2E" procs --n "$KUBECTL_BURST" --parallel --audit-log "$KACHE_AUDIT_LOG" -- \
    "$KUBECTL" --kubeconfig "$kc" --cache-dir "$work/kubectl-cache-$side" "${kubectl_burst_args[@]}" \
    > "$json/kubectl-burst-$side.json"
done
rss_end=$(rss_kb "$kache_pid")
hwm_end=$(hwm_kb "$kache_pid")
curl -fsS "$ADMIN_URL/metrics" > "$work/metrics-end.txt" || true

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
  "kubectl": "$("$KUBECTL" version --client -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])' || echo unknown)",
  "kubectlPath": "$KUBECTL",
  "kache": "$kache_build",
  "pods": $PODS,
  "duration": $DURATION,
  "burst": $BURST,
  "kubectlBurst": $KUBECTL_BURST,
  "burstPath": "$BURST_PATH",
  "kubectlBurstArgs": "${kubectl_burst_args[*]}",
  "nginx": "${nginx_version:-not run: $nginx_skip}",
  "passthroughMax": $PASSTHROUGH_MAX,
  "labelSelector": "$LABEL_SELECTOR",
  "fieldSelector": "$FIELD_SELECTOR",
  "memHeadroomMb": $MEM_HEADROOM_MB,
  "fillSecondsJson": $fill_json,
  "fillSecondsProtobuf": $fill_protobuf,
  "rssIdleKb": $rss_idle,
  "rssJsonKb": $rss_json,
  "hwmJsonKb": $hwm_json,
  "rssFilledKb": $rss_filled,
  "rssAfterLoadKb": $rss_after_load,
  "hwmAfterLoadKb": $hwm_after_load,
  "filesAfterLoadKb": $files_after_load,
  "rssEndKb": $rss_end,
  "hwmEndKb": $hwm_end
}
EOF
python3 "$repo/benches/e2e/report.py" "$json" > "$results_md"
cat "$results_md"
log "results written to $results_md (raw JSON in $json)"
