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
# MAX_REQUESTS (per cell, 3000), KUBECTL_RUNS (20), BURST (100) and BURST_PATH,
# KUBECTL_BURST (100) and KUBECTL_BURST_ARGS, KUBECTL (kubectl binary),
# BENCH_CLUSTER_DIR (target/bench-cluster), BENCH_WORK_DIR (target/bench-e2e),
# RESULTS (benches/e2e/results.md). Details in benches/e2e/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
# shellcheck source=lib.sh
source "$repo/benches/e2e/lib.sh"

PODS=${PODS:-10000}
DURATION=${DURATION:-15}
MAX_REQUESTS=${MAX_REQUESTS:-3000}
BURST=${BURST:-100}
KUBECTL_RUNS=${KUBECTL_RUNS:-20}
KUBECTL_BURST=${KUBECTL_BURST:-100}
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
cleanup() {
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
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

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
fill_cache() {
  local encoding=$1 accept=$2 start deadline=$((SECONDS + 120))
  start=$(date +%s.%N)
  curl -fsS -o /dev/null -H "Accept: $accept" "$KACHE_URL/api/v1/pods?resourceVersion=0" \
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
  log "WARNING: kache's $encoding pod cache did not sync within 120 s; those reads are forwarded"
  echo null
}
log "filling kache's pod cache: JSON"
fill_json=$(fill_cache json application/json)
sleep 1
rss_json=$(rss_kb "$kache_pid")
log "filling kache's pod cache: protobuf"
fill_protobuf=$(fill_cache protobuf application/vnd.kubernetes.protobuf)
sleep 1
rss_filled=$(rss_kb "$kache_pid")
curl -fsS "$ADMIN_URL/debug/cache" > "$json/debug-cache.json"
log "cache filled in ${fill_json}s (JSON) + ${fill_protobuf}s (protobuf); kache RSS ${rss_idle} kB -> ${rss_json} kB -> ${rss_filled} kB"

# ------------------------------------------------------------------ 1. rv=0 LIST throughput
apiserver_pid=$(cat "$cluster_dir/apiserver.pid")
etcd_pid=$(cat "$cluster_dir/etcd.pid")
list_path='/api/v1/pods?resourceVersion=0'
for enc in json protobuf; do
  case $enc in
    json) accept=application/json ;;
    protobuf) accept=application/vnd.kubernetes.protobuf ;;
  esac
  for c in 1 8; do
    for side in direct kache; do
      if [[ $side == direct ]]; then
        args=("${direct[@]}")
      else
        args=("${kache_via[@]}" --kache-metrics "$ADMIN_URL/metrics")
      fi
      args+=(--cpu "apiserver=$apiserver_pid" --cpu "etcd=$etcd_pid" --cpu "kache=$kache_pid")
      log "1. rv=0 LIST $enc c=$c $side (${DURATION}s)"
      "$E2E" load "${args[@]}" --path "$list_path" --accept "$accept" --concurrency "$c" \
        --duration "$DURATION" --max-requests "$MAX_REQUESTS" --audit-log "$KACHE_AUDIT_LOG" \
        > "$json/list-$enc-c$c-$side.json"
    done
  done
done
rss_after_load=$(rss_kb "$kache_pid")
hwm_after_load=$(hwm_kb "$kache_pid")
curl -fsS "$ADMIN_URL/metrics" > "$work/metrics-after-list.txt" || true

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
mem_available_mb() { awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo; }
for side in direct kache; do
  if [[ $side == direct ]]; then args=("${direct[@]}"); else args=("${kache_via[@]}"); fi
  if (( $(mem_available_mb) < 4096 )); then
    log "4a. skipped: less than 4 GB of memory available"
    echo '{"skipped": "less than 4 GB of memory available"}' > "$json/burst-$side.json"
    continue
  fi
  log "4a. burst of $BURST concurrent GET $BURST_PATH, $side"
  "$E2E" burst "${args[@]}" --path "$BURST_PATH" --accept application/json --n "$BURST" \
    --audit-log "$KACHE_AUDIT_LOG" > "$json/burst-$side.json"
done
for side in direct kache; do
  if [[ $side == direct ]]; then kc=$KACHE_ADMIN_KUBECONFIG; else kc=$work/kache.kubeconfig; fi
  need=$((KUBECTL_BURST * 100 + 2048))
  if (( $(mem_available_mb) < need )); then
    log "4b. skipped: less than $need MB of memory available"
    echo '{"skipped": "less than '"$need"' MB of memory available"}' > "$json/kubectl-burst-$side.json"
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
  "fillSecondsJson": $fill_json,
  "fillSecondsProtobuf": $fill_protobuf,
  "rssIdleKb": $rss_idle,
  "rssJsonKb": $rss_json,
  "rssFilledKb": $rss_filled,
  "rssAfterLoadKb": $rss_after_load,
  "hwmAfterLoadKb": $hwm_after_load,
  "rssEndKb": $rss_end,
  "hwmEndKb": $hwm_end
}
EOF
python3 "$repo/benches/e2e/report.py" "$json" > "$results_md"
cat "$results_md"
log "results written to $results_md (raw JSON in $json)"
