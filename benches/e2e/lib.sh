# Shared by the end-to-end benchmark scripts (run.sh, authz.sh, restarts.sh): sourced, not run.
# shellcheck shell=bash disable=SC2034,SC2154 # sets and reads the sourcing script's variables

# build_binaries WORK: builds the load generator and (unless $KACHE_BIN names
# one) kache in release mode, and copies both into WORK so that other builds
# in the same target directory cannot swap them mid-run. Sets E2E, KACHE and
# kache_build (what was measured, for the report).
build_binaries() {
  local work=$1
  cargo build --release --quiet -p kache-benches --bin kache-e2e
  local target_dir=${CARGO_TARGET_DIR:-$repo/target}
  cp "$target_dir/release/kache-e2e" "$work/kache-e2e"
  E2E=$work/kache-e2e
  if [[ -z "${KACHE_BIN:-}" ]]; then
    cargo build --release --quiet -p kache-proxy --bin kache
    cp "$target_dir/release/kache" "$work/kache"
    kache_build="working tree of $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- config cache proxy || echo ' + uncommitted changes')"
  else
    cp "$KACHE_BIN" "$work/kache"
    kache_build=${KACHE_BUILD_NOTE:-$KACHE_BIN}
  fi
  KACHE=$work/kache
}

# ensure_pods JSON_DIR: creates $PODS pods in namespaces bench-00…bench-09
# (16 concurrent POSTs) unless at least that many pods exist. Writes
# JSON_DIR/pods-before.json (the count before) and JSON_DIR/create.json.
# Needs E2E, the direct=(--url … --ca …) arguments, BENCH_TOKEN and log().
ensure_pods() {
  local json=$1 have
  log "counting pods"
  "$E2E" list-size "${direct[@]}" --path '/api/v1/pods?resourceVersion=0' > "$json/pods-before.json"
  have=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["items"])' "$json/pods-before.json")
  if (( have < PODS )); then
    log "creating $PODS pods (have $have)"
    "$E2E" create-pods "${direct[@]}" --count "$PODS" --namespaces 10 --concurrency 16 > "$json/create.json"
  else
    log "$have pods already there"
    echo '{"created":0,"existed":'"$have"',"seconds":0}' > "$json/create.json"
  fi
}
