#!/usr/bin/env bash
# Starts a real etcd + kube-apiserver on loopback for kache's integration tests.
#
#   tests/cluster/up.sh [DIR]
#
# DIR defaults to $KACHE_CLUSTER_DIR, else <repo>/target/kache-cluster. If DIR
# already holds a running, healthy cluster it is reused; otherwise stale state
# is removed and a fresh cluster is started on free loopback ports. On success
# prints the path of DIR/env (a sourceable file describing the cluster) on
# stdout. See README.md in this directory.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# <= 1)) || die "usage: $0 [DIR]"
dir=$(resolve_dir "${1:-}")
ready_timeout=${KACHE_CLUSTER_READY_TIMEOUT:-120}
lock_dir "$dir"

# ---------------------------------------------------------------- reuse ----
if [[ -f "$dir/env" ]] &&
  pid_from_file "$dir/etcd.pid" "$(etcd_marker "$dir")" >/dev/null &&
  pid_from_file "$dir/apiserver.pid" "$(apiserver_marker "$dir")" >/dev/null &&
  readyz_ok "$dir"; then
  log "reusing the running cluster in $dir"
  echo "$dir/env"
  exit 0
fi

# ------------------------------------------------------- prerequisites ----
for tool in curl openssl setsid nohup base64; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
apiserver_bin=$("$cluster_scripts_dir/build-apiserver.sh") ||
  die "build-apiserver.sh failed"
[[ -x "$apiserver_bin" ]] || die "build-apiserver.sh printed '$apiserver_bin', not an executable"
# build-apiserver.sh installs etcd-server, but its cached fast path skips apt.
if ! command -v etcd >/dev/null; then
  log "installing etcd-server"
  if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >&2 ||
    die "cannot install etcd-server"
fi
etcd_bin=$(command -v etcd)

# ---------------------------------------------------------- clean state ----
log "starting a fresh cluster in $dir"
# Leftovers are being thrown away: a short grace (an apiserver whose etcd died
# ignores TERM for a long time).
stop_component "$dir" apiserver 3
stop_component "$dir" etcd 3
rm -rf "$dir/etcd-data" "$dir/pki" "$dir/cert-dir"
rm -f "$dir"/{env,audit.log,audit-policy.yaml,tokens.csv,etcd.log,apiserver.log} \
  "$dir"/{etcd.pid,apiserver.pid,apiserver.port,apiserver.cmdline} \
  "$dir"/{admin,admin-token,alice,bob}.kubeconfig
mkdir -p "$dir/pki" "$dir/etcd-data" "$dir/cert-dir"
chmod 700 "$dir/etcd-data"

# ---------------------------------------------------------- certificates ----
pki=$dir/pki
ossl() { openssl "$@" 2>>"$pki/openssl.log" >/dev/null || die "openssl $1 failed; see $pki/openssl.log"; }
newkey() { ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1"; }

newkey "$pki/ca.key"
ossl req -x509 -new -key "$pki/ca.key" -sha256 -days 3650 -subj "/CN=kache-test-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
  -out "$pki/ca.crt"

# sign NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt (X.509 v3) signed by the CA.
sign() {
  local name=$1 subj=$2 ext=$3
  newkey "$pki/$name.key"
  ossl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr"
  printf '%s\n' "$ext" >"$pki/$name.ext"
  ossl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -sha256 -days 3650 -extfile "$pki/$name.ext" -out "$pki/$name.crt"
  rm -f "$pki/$name.csr"
}
client_ext='basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth'

sign apiserver "/CN=kube-apiserver" 'basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1'
sign admin "/O=system:masters/CN=admin" "$client_ext"
newkey "$pki/sa.key"
ossl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
chmod 600 "$pki"/*.key

# ---------------------------------------------------------------- users ----
token() { openssl rand -hex 24; }
admin_token=$(token)
alice_token=$(token)
bob_token=$(token)
# token,user,uid,"group,..."
cat >"$dir/tokens.csv" <<EOF
$admin_token,admin-token,kache-admin-token,"system:masters"
$alice_token,alice,kache-alice
$bob_token,bob,kache-bob
EOF
chmod 600 "$dir/tokens.csv"

# ------------------------------------------------------------ audit log ----
cat >"$dir/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  # The server's own loopback client (bootstrap controllers etc.).
  - level: None
    users: ["system:apiserver"]
  - level: Metadata
EOF

# ---------------------------------------------------------------- ports ----
# free_port VAR: sets VAR to a port in 15000-32767 (below the default
# ephemeral range) with no TCP socket on it at all and not picked before.
picked=()
free_port() {
  local -n out=$1
  local p i q taken
  for ((i = 0; i < 200; i++)); do
    p=$((15000 + RANDOM % 17768))
    taken=0
    for q in "${picked[@]}"; do [[ "$q" == "$p" ]] && taken=1; done
    ((taken == 0)) || continue
    if command -v ss >/dev/null; then
      [[ -z $(ss -Htan "( sport = :$p )" 2>/dev/null) ]] || continue
    elif (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      continue
    fi
    picked+=("$p")
    # shellcheck disable=SC2034 # nameref to the caller's variable
    out=$p
    return 0
  done
  die "no free port found"
}

# ----------------------------------------------------------------- etcd ----
etcd_healthy() {
  curl -sS --max-time 2 "http://127.0.0.1:$1/health" 2>/dev/null | grep -q '"health":"true"'
}

etcd_port="" peer_port="" apiserver_port=""
for attempt in 1 2 3; do
  free_port etcd_port
  free_port peer_port
  rm -rf "$dir/etcd-data" && mkdir -m 700 "$dir/etcd-data"
  echo "=== $(date -u +%FT%TZ) starting etcd (attempt $attempt) ===" >>"$dir/etcd.log"
  start_detached "$dir" etcd "$dir/etcd.log" "$etcd_bin" \
    --name=kache \
    "$(etcd_marker "$dir")" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="kache=http://127.0.0.1:$peer_port" \
    --initial-cluster-state=new \
    --initial-cluster-token=kache-test \
    --logger=zap --log-outputs=stderr
  ok=0
  for ((i = 0; i < 150; i++)); do
    if etcd_healthy "$etcd_port"; then ok=1; break; fi
    pid_from_file "$dir/etcd.pid" "$(etcd_marker "$dir")" >/dev/null || break
    sleep 0.2
  done
  ((ok == 1)) && break
  stop_component "$dir" etcd
  if grep -q 'address already in use' "$dir/etcd.log" && ((attempt < 3)); then
    log "etcd port clash; retrying with other ports"
    continue
  fi
  dump_logs "$dir"
  die "etcd did not become healthy"
done
log "etcd is healthy on 127.0.0.1:$etcd_port"

# ------------------------------------------------------- kube-apiserver ----
for attempt in 1 2 3; do
  free_port apiserver_port
  echo "$apiserver_port" >"$dir/apiserver.port"
  apiserver_cmd=(
    "$apiserver_bin"
    --bind-address=127.0.0.1
    --advertise-address=127.0.0.1
    --secure-port="$apiserver_port"
    --insecure-port=0
    --etcd-servers="http://127.0.0.1:$etcd_port"
    --cert-dir="$dir/cert-dir"
    --tls-cert-file="$pki/apiserver.crt"
    --tls-private-key-file="$pki/apiserver.key"
    --client-ca-file="$pki/ca.crt"
    --token-auth-file="$dir/tokens.csv"
    --service-account-key-file="$pki/sa.pub"
    --service-account-signing-key-file="$pki/sa.key"
    --service-account-issuer=https://kubernetes.default.svc.cluster.local
    --api-audiences=https://kubernetes.default.svc.cluster.local
    --service-cluster-ip-range=10.0.0.0/24
    --authorization-mode=RBAC
    --disable-admission-plugins=ServiceAccount
    --allow-privileged=true
    --audit-policy-file="$dir/audit-policy.yaml"
    "$(apiserver_marker "$dir")"
    --audit-log-format=json
    --audit-log-mode=blocking
    --audit-log-maxbackup=0
    --audit-log-maxsize=0
  )
  # The exact command line, replayable by restart-apiserver.sh.
  printf '%q ' "${apiserver_cmd[@]}" >"$dir/apiserver.cmdline"
  echo >>"$dir/apiserver.cmdline"
  echo "=== $(date -u +%FT%TZ) starting kube-apiserver (attempt $attempt) ===" >>"$dir/apiserver.log"
  start_detached "$dir" apiserver "$dir/apiserver.log" "${apiserver_cmd[@]}"
  if wait_apiserver_ready "$dir" "$ready_timeout" 2>"$dir/.startup-failure"; then
    rm -f "$dir/.startup-failure"
    break
  fi
  stop_component "$dir" apiserver
  if grep -q 'address already in use' "$dir/apiserver.log" && ((attempt < 3)); then
    log "apiserver port clash; retrying with another port"
    continue
  fi
  cat "$dir/.startup-failure" >&2
  rm -f "$dir/.startup-failure"
  stop_component "$dir" etcd
  die "kube-apiserver did not become ready"
done
server="https://127.0.0.1:$apiserver_port"
log "kube-apiserver is ready at $server"

# ----------------------------------------------------------- kubeconfigs ----
b64() { base64 -w0 <"$1"; }
ca_data=$(b64 "$pki/ca.crt")
# kubeconfig NAME USER-STANZA-LINES
kubeconfig() {
  local name=$1 user=$2
  cat >"$dir/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: kache-test
    cluster:
      server: $server
      certificate-authority-data: $ca_data
users:
  - name: $name
    user:
$user
contexts:
  - name: $name
    context:
      cluster: kache-test
      user: $name
      namespace: default
current-context: $name
EOF
  chmod 600 "$dir/$name.kubeconfig"
}
kubeconfig admin "      client-certificate-data: $(b64 "$pki/admin.crt")
      client-key-data: $(b64 "$pki/admin.key")"
kubeconfig admin-token "      token: $admin_token"
kubeconfig alice "      token: $alice_token"
kubeconfig bob "      token: $bob_token"

# ------------------------------------------------------------------ env ----
{
  echo "# Generated by tests/cluster/up.sh on $(date -u +%FT%TZ); source it."
  q() { printf 'export %s=%q\n' "$1" "$2"; }
  q KACHE_CLUSTER_DIR "$dir"
  q KACHE_APISERVER_URL "$server"
  q KACHE_APISERVER_PORT "$apiserver_port"
  q KACHE_ETCD_ENDPOINT "http://127.0.0.1:$etcd_port"
  q KACHE_AUDIT_LOG "$dir/audit.log"
  q KACHE_CA_CERT "$pki/ca.crt"
  q KACHE_ADMIN_CERT "$pki/admin.crt"
  q KACHE_ADMIN_KEY "$pki/admin.key"
  q KACHE_ADMIN_KUBECONFIG "$dir/admin.kubeconfig"
  q KACHE_ADMIN_TOKEN_KUBECONFIG "$dir/admin-token.kubeconfig"
  q KACHE_ALICE_KUBECONFIG "$dir/alice.kubeconfig"
  q KACHE_BOB_KUBECONFIG "$dir/bob.kubeconfig"
  q KACHE_ADMIN_TOKEN "$admin_token"
  q KACHE_ALICE_TOKEN "$alice_token"
  q KACHE_BOB_TOKEN "$bob_token"
} >"$dir/env.tmp"
mv "$dir/env.tmp" "$dir/env"
echo "$dir/env"
