#!/usr/bin/env bash
# Builds a real kube-apiserver from Debian's `kubernetes` source package and
# caches it under ${KACHE_CACHE_DIR:-~/.cache/kache}, keyed by the package
# version. Prints the binary's path on stdout. Idempotent: a cached binary is
# reused without touching apt.
#
# Prerequisites are installed here (as root) so a fresh machine needs nothing
# else; a failure is an error, never a skip.
set -euo pipefail

cache_dir=${KACHE_CACHE_DIR:-$HOME/.cache/kache}
mkdir -p "$cache_dir"

log() { echo "build-apiserver: $*" >&2; }

# Fast path: any cached binary whose version stamp matches the last build.
if [[ -f "$cache_dir/kube-apiserver.version" ]]; then
  version=$(cat "$cache_dir/kube-apiserver.version")
  bin="$cache_dir/kube-apiserver-$version"
  if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
  fi
fi

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

src_list=/etc/apt/sources.list.d/kache-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null; then
  log "enabling deb-src"
  # Copy the machine's own `Types: deb` stanzas, so the same mirror/snapshot is used.
  as_root sh -c "sed -e 's/^Types: deb\$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > $src_list"
fi
log "installing build prerequisites"
as_root apt-get update -qq >&2
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  golang-go etcd-server rsync jq openssl dpkg-dev golang-github-modern-go-reflect2-dev >&2

version=$(apt-cache showsrc kubernetes | awk '/^Version:/ {print $2; exit}')
[[ -n "$version" ]] || { log "cannot find the kubernetes source package"; exit 1; }
bin="$cache_dir/kube-apiserver-$version"
if [[ ! -x "$bin" ]]; then
  work=$(mktemp -d "$cache_dir/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  log "fetching kubernetes $version source into $work"
  (cd "$work" && apt-get source -qq kubernetes >&2)
  tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
  [[ -d "$tree" ]] || { log "source tree not found"; exit 1; }
  # The vendored reflect2 v1.0.1 crashes under Go >= 1.18 whenever json-iterator
  # encodes (pretty JSON, YAML): use Debian's v1.0.2 instead.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  mkdir -p "$tree/.go/src/k8s.io"
  ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
  log "building kube-apiserver (several minutes)"
  (cd "$tree" && env GOPATH="$tree/.go" CGO_ENABLED=0 make WHAT=cmd/kube-apiserver >&2)
  built=$(find "$tree/_output" -type f -name kube-apiserver -perm -u+x | head -1)
  [[ -x "$built" ]] || { log "build produced no kube-apiserver"; exit 1; }
  install -m 0755 "$built" "$bin.tmp"
  mv "$bin.tmp" "$bin"
fi
echo "$version" > "$cache_dir/kube-apiserver.version"
echo "$bin"
