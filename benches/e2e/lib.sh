# Shared by the end-to-end benchmark scripts (run.sh, authz.sh): sourced, not run.

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
