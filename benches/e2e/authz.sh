#!/usr/bin/env bash
# Authorization-overhead benchmark: USERS users (service accounts, each with
# its own token) read one cached configmap (rv=0 GET) and a namespace's
# configmaps (rv=0 LIST) in closed loops — from the API server directly,
# through kache in local mode (plain HTTP and HTTPS, no authentication) and
# through kache in shared mode (--authorization rbac and sar) — in one run.
# Writes a markdown report to benches/e2e/authz-results.md. See
# benches/e2e/README.md.
#
#   benches/e2e/authz.sh                  # builds kache and kache-e2e in release mode
#   KEEP=1 benches/e2e/authz.sh           # leave the benchmark cluster running
#   KACHE_BIN=path/to/kache benches/e2e/authz.sh
#
# Knobs (environment): USERS (10), CONFIGMAPS (100), DURATION (seconds per
# cell, 10), ROUNDS (2), MAX_REQUESTS (per cell, 500000), AUTHZ_TTL (seconds, 10),
# TOKEN_TTL (seconds, 120), KACHE_LOG (RUST_LOG for kache; default: kache's
# own, info, one line per request), NAMESPACE (kache-authz), BENCH_CLUSTER_DIR (target/bench-cluster),
# BENCH_WORK_DIR (target/bench-authz), RESULTS (benches/e2e/authz-results.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
# shellcheck source=lib.sh
source "$repo/benches/e2e/lib.sh"

USERS=${USERS:-10}
CONFIGMAPS=${CONFIGMAPS:-100}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
MAX_REQUESTS=${MAX_REQUESTS:-500000}
AUTHZ_TTL=${AUTHZ_TTL:-10}
TOKEN_TTL=${TOKEN_TTL:-120}
NAMESPACE=${NAMESPACE:-kache-authz}
cluster_dir=${BENCH_CLUSTER_DIR:-$repo/target/bench-cluster}
work=${BENCH_WORK_DIR:-$repo/target/bench-authz}
results_md=${RESULTS:-$repo/benches/e2e/authz-results.md}

log() { echo "authz-bench: $(date +%T) $*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in cargo python3 curl; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

rm -rf "$work/json" "$work"/state-* "$work"/*.log
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
# A cluster that was already running (another benchmark's, KEEP=1) is left running.
grep -q 'reusing the running cluster' "$work/up.log" && reused=1 || reused=0
# shellcheck disable=SC1090
source "$env_file"
export BENCH_TOKEN=$KACHE_ADMIN_TOKEN
apiserver_pid=$(cat "$cluster_dir/apiserver.pid")
etcd_pid=$(cat "$cluster_dir/etcd.pid")

declare -A kache_pids=()
cleanup() {
  local pid i
  for pid in "${kache_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${kache_pids[@]}"; do
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  # One access-log line per request adds up to hundreds of MB: keep the ends.
  local f
  for f in "$work"/kache-*.log; do
    [[ -f $f ]] && (( $(wc -l < "$f") > 1000 )) || continue
    { head -n 100 "$f"; echo "[…]"; tail -n 100 "$f"; } > "$f.short" 2>/dev/null && mv "$f.short" "$f"
  done
  if [[ "${KEEP:-0}" == 1 || $reused == 1 ]]; then
    log "the cluster stays up ($env_file)"
  else
    tests/cluster/down.sh "$cluster_dir" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ users, grants, configmaps
log "setting up $USERS users and $CONFIGMAPS configmaps in namespace $NAMESPACE"
"$E2E" authz-setup --url "$KACHE_APISERVER_URL" --ca "$KACHE_CA_CERT" --namespace "$NAMESPACE" \
  --users "$USERS" --configmaps "$CONFIGMAPS" > "$json/setup.json"

# ------------------------------------------------------------------ kache: four configurations
cat > "$work/kache.yaml" <<EOF
cache:
  preload: [v1/configmaps]
shared:
  tokenCacheTtlSeconds: $TOKEN_TTL
  authorizationCacheTtlSeconds: $AUTHZ_TTL
EOF
declare -A kache_url=() kache_admin=() kache_ca=()
# start_kache NAME ARGS...: one kache on free loopback ports, its own state directory.
start_kache() {
  local name=$1 port admin_port scheme=http
  shift
  port=$(free_port)
  admin_port=$(free_port)
  [[ " $* " == *" --tls "* ]] && scheme=https
  env ${KACHE_LOG:+RUST_LOG=$KACHE_LOG} "$KACHE" serve --kubeconfig "$KACHE_ADMIN_KUBECONFIG" --config "$work/kache.yaml" \
    --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    --state-dir "$work/state-$name" "$@" 2> "$work/kache-$name.log" &
  kache_pids[$name]=$!
  kache_url[$name]=$scheme://127.0.0.1:$port
  kache_admin[$name]=http://127.0.0.1:$admin_port
  kache_ca[$name]=$work/state-$name/ca.crt
}
start_kache local-http
start_kache local-https --tls
start_kache shared-rbac --mode shared --tls --authorization rbac
start_kache shared-sar --mode shared --tls --authorization sar
for name in "${!kache_pids[@]}"; do
  log "waiting for kache $name (${kache_url[$name]}) to be ready with $CONFIGMAPS+ configmaps cached"
  deadline=$((SECONDS + 120))
  until curl -fsS "${kache_admin[$name]}/readyz" >/dev/null 2>&1 \
    && curl -fsS "${kache_admin[$name]}/debug/cache" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
cm = [r for r in d.get("resources", []) if r.get("resource") == "configmaps" and r.get("group") == ""]
sys.exit(0 if cm and cm[0].get("synced") and cm[0].get("objects", 0) >= int(sys.argv[1]) else 1)' "$CONFIGMAPS"; do
    kill -0 "${kache_pids[$name]}" 2>/dev/null || die "kache $name exited: $(tail -n 20 "$work/kache-$name.log")"
    (( SECONDS < deadline )) || die "kache $name not ready with configmaps cached within 120 s"
    sleep 0.2
  done
done

# ------------------------------------------------------------------ cells
declare -A paths=(
  [get]="/api/v1/namespaces/$NAMESPACE/configmaps/cm-000?resourceVersion=0"
  [list]="/api/v1/namespaces/$NAMESPACE/configmaps?resourceVersion=0"
)
common=(--apiserver-url "$KACHE_APISERVER_URL" --apiserver-ca "$KACHE_CA_CERT" --namespace "$NAMESPACE"
  --users "$USERS" --duration "$DURATION" --max-requests "$MAX_REQUESTS" --audit-log "$KACHE_AUDIT_LOG"
  --cpu "apiserver=$apiserver_pid" --cpu "etcd=$etcd_pid")
# The configurations compared most closely run next to each other; the
# second round runs them in the opposite order, so drift in the machine's
# load shows as a spread between rounds rather than as a difference.
sides=(local-http shared-rbac shared-sar local-https direct)
for round in $(seq 1 "$ROUNDS"); do
  order=("${sides[@]}")
  if (( round % 2 == 0 )); then
    order=()
    for ((i = ${#sides[@]} - 1; i >= 0; i--)); do order+=("${sides[i]}"); done
  fi
  for req in get list; do
    for side in "${order[@]}"; do
      case $side in
        direct) args=(--url "$KACHE_APISERVER_URL" --ca "$KACHE_CA_CERT") ;;
        local-http) args=(--url "${kache_url[$side]}" --no-auth) ;;
        local-https) args=(--url "${kache_url[$side]}" --ca "${kache_ca[$side]}" --no-auth) ;;
        *) args=(--url "${kache_url[$side]}" --ca "${kache_ca[$side]}") ;;
      esac
      if [[ $side != direct ]]; then
        args+=(--kache-metrics "${kache_admin[$side]}/metrics" --cpu "kache=${kache_pids[$side]}")
      fi
      log "round $round/$ROUNDS: $req $side (${DURATION}s, $USERS users)"
      "$E2E" authz-load "${args[@]}" "${common[@]}" --path "${paths[$req]}" > "$json/$req-$side-r$round.json"
    done
  done
done
for name in "${!kache_pids[@]}"; do
  curl -fsS "${kache_admin[$name]}/metrics" > "$work/metrics-$name.txt" || true
done

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
  "users": $USERS,
  "configmaps": $CONFIGMAPS,
  "duration": $DURATION,
  "rounds": $ROUNDS,
  "authzTtl": $AUTHZ_TTL,
  "tokenTtl": $TOKEN_TTL,
  "namespace": "$NAMESPACE"
}
EOF
python3 "$repo/benches/e2e/authz-report.py" "$json" > "$results_md"
cat "$results_md"
log "results written to $results_md (raw JSON in $json)"
