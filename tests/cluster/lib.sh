# shellcheck shell=bash
# Helpers shared by up.sh, down.sh and restart-apiserver.sh. Sourced, not run.

# Directory of these scripts and the repository root.
cluster_scripts_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$cluster_scripts_dir/../.." && pwd)

log() { echo "kache-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# resolve_dir [DIR] -> absolute cluster directory (created if missing).
resolve_dir() {
  local dir=${1:-${KACHE_CLUSTER_DIR:-$repo_root/target/kache-cluster}}
  mkdir -p "$dir"
  (cd "$dir" && pwd)
}

# lock_dir DIR: serialises up/down/restart on one DIR (e.g. several test
# binaries calling up.sh at once). Held on fd 9 until the script exits; the
# cluster's processes are started with fd 9 closed so they don't keep it.
lock_dir() {
  command -v flock >/dev/null || return 0
  exec 9>"$1/.lock"
  if ! flock -n 9; then
    log "waiting for another script working on $1"
    flock -w 300 9 || die "timed out waiting for the lock on $1"
  fi
}

# A marker that only processes belonging to this cluster directory have on
# their command line; used to verify pid files and to find orphans.
etcd_marker() { echo "--data-dir=$1/etcd-data"; }
apiserver_marker() { echo "--audit-log-path=$1/audit.log"; }

# proc_has_arg PID ARG: true if process PID is alive and ARG is one of its
# arguments (guards against pid reuse).
proc_has_arg() {
  local pid=$1 arg=$2
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  local a
  while IFS= read -r -d '' a; do
    [[ "$a" == "$arg" ]] && return 0
  done < "/proc/$pid/cmdline"
  return 1
}

# pid_from_file FILE MARKER: prints the pid stored in FILE if that process is
# alive and carries MARKER; fails otherwise.
pid_from_file() {
  local file=$1 marker=$2 pid
  [[ -f "$file" ]] || return 1
  pid=$(cat "$file" 2>/dev/null) || return 1
  proc_has_arg "$pid" "$marker" || return 1
  echo "$pid"
}

# pids_with_arg MARKER: every live process carrying MARKER (orphans whose pid
# file is gone). Matches one exact argument, never a name pattern.
pids_with_arg() {
  local marker=$1 p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [[ "$p" == "$$" ]] && continue
    proc_has_arg "$p" "$marker" && echo "$p"
  done
  return 0
}

# stop_pids NAME GRACE_SECONDS PID...: TERM, wait up to GRACE, then KILL; waits
# until all are gone.
stop_pids() {
  local name=$1 grace=$2; shift 2
  (($# > 0)) || return 0
  local pid
  log "stopping $name (pid $*)"
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + grace)) alive
  while :; do
    alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]} == 0)) && return 0
    ((SECONDS >= deadline)) && break
    sleep 0.2
  done
  log "$name did not exit after ${grace}s; sending KILL to ${alive[*]}"
  for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  deadline=$((SECONDS + 10))
  while :; do
    alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]} == 0)) && return 0
    # A zombie whose parent is not us cannot be reaped here; it holds no port.
    local z=1
    for pid in "${alive[@]}"; do
      [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] || z=0
    done
    ((z == 1)) && return 0
    ((SECONDS >= deadline)) && die "$name (pid ${alive[*]}) survived KILL"
    sleep 0.2
  done
}

# stop_component DIR etcd|apiserver [GRACE_SECONDS]
stop_component() {
  local dir=$1 comp=$2 grace=${3:-15} marker pids=()
  case $comp in
    etcd) marker=$(etcd_marker "$dir") ;;
    apiserver) marker=$(apiserver_marker "$dir") ;;
    *) die "unknown component $comp" ;;
  esac
  local p
  while IFS= read -r p; do [[ -n "$p" ]] && pids+=("$p"); done < <(
    pid_from_file "$dir/$comp.pid" "$marker" || true
    pids_with_arg "$marker"
  )
  # De-duplicate.
  if ((${#pids[@]} > 0)); then
    mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
  fi
  stop_pids "$comp" "$grace" "${pids[@]}"
  rm -f "$dir/$comp.pid"
}

# start_detached DIR NAME LOGFILE CMD...: runs CMD in its own session, detached
# from the caller's terminal and stdio, appending to LOGFILE; the process
# writes its own pid to DIR/NAME.pid before exec'ing CMD.
start_detached() {
  local dir=$1 name=$2 logfile=$3; shift 3
  rm -f "$dir/$name.pid"
  # shellcheck disable=SC2016 # $$ and "$@" expand in the child shell.
  setsid nohup bash -c 'echo $$ > "$0"; exec "$@"' "$dir/$name.pid" "$@" \
    >>"$logfile" 2>&1 </dev/null 9>&- &
  disown || true
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s "$dir/$name.pid" ]] && return 0
    sleep 0.1
  done
  die "$name did not start (no pid file); see $logfile"
}

# readyz_ok DIR: true if the apiserver described by DIR/port answers /readyz.
readyz_ok() {
  local dir=$1 port
  port=$(cat "$dir/apiserver.port" 2>/dev/null) || return 1
  [[ -n "$port" ]] || return 1
  local out
  out=$(curl -sS --max-time 5 --cacert "$dir/pki/ca.crt" \
    --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
    "https://127.0.0.1:$port/readyz" 2>/dev/null) || return 1
  [[ "$out" == ok ]]
}

# wait_apiserver_ready DIR TIMEOUT: waits for /readyz; on timeout (or if the
# process died) prints the logs' tails and fails.
wait_apiserver_ready() {
  local dir=$1 timeout=$2
  local deadline=$((SECONDS + timeout))
  while ! readyz_ok "$dir"; do
    if ! pid_from_file "$dir/apiserver.pid" "$(apiserver_marker "$dir")" >/dev/null; then
      log "kube-apiserver exited during startup"
      dump_logs "$dir"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "kube-apiserver not ready after ${timeout}s"
      dump_logs "$dir"
      return 1
    fi
    sleep 0.5
  done
}

dump_logs() {
  local dir=$1 f
  for f in "$dir/etcd.log" "$dir/apiserver.log"; do
    [[ -f "$f" ]] || continue
    echo "----- tail of $f -----" >&2
    if [[ $f == */etcd.log ]]; then tail -n 15 "$f" >&2; else tail -n 40 "$f" >&2; fi
  done
}
