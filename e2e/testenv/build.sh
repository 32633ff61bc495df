#!/usr/bin/env bash
# Builds the real control-plane binaries the test environment runs, from the Go
# module proxy at pinned versions, and caches them under the user's cache dir
# keyed by version. Safe to run repeatedly: a cached binary is reused.
#
# Why from source: this machine has Go and no Docker engine, and no release
# tarballs can be fetched; the Go module proxy is the one source we have.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache_root=${GPUPOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpupool}
bin="$cache_root/testenv/r2-k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION/bin"
mkdir -p "$bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Go's build cache for Kubernetes grows to ~5 GB and the module cache to ~2 GB;
# only the binaries are kept, so both live in the scratch dir and go with it.
# (-modcacherw: module files are read-only by default and would defeat rm -rf.)
export GOCACHE="$work/gocache" GOMODCACHE="$work/gomod" GOFLAGS="${GOFLAGS:-} -modcacherw"

log() { printf '[testenv-build] %s\n' "$*" >&2; }

have() { [ -x "$bin/$1" ]; }

build_kubernetes() {
  if have kube-apiserver && have kube-controller-manager && have kube-scheduler && have kubectl; then return; fi
  log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $KUBERNETES_VERSION"
  local m="$work/k8s"
  mkdir -p "$m"
  cat >"$m/go.mod" <<EOF
module gpupool.dev/testenv/k8s

go 1.25
EOF
  cat >"$m/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
EOF
  # k8s.io/kubernetes points its staging modules at ./staging; outside its own
  # tree every one of them must be replaced by the published v0.x.y tag.
  local gomod
  gomod=$(cd "$m" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  local staging_version="v0.${KUBERNETES_VERSION#v1.}"
  local replaces=()
  while read -r mod; do
    replaces+=("-replace=$mod=$mod@$staging_version")
  done < <(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
  (cd "$m" && go mod edit "${replaces[@]}" && go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION" && go mod tidy -e >/dev/null 2>&1 || true)
  (cd "$m" && go get "k8s.io/kubernetes@$KUBERNETES_VERSION" >/dev/null 2>&1 && go mod tidy)
  # Stamp the version as the release build does, so clients that check the
  # server version (helm's kubeVersion, kubectl's skew warning) see it.
  local minor=${KUBERNETES_VERSION#v1.}
  minor=${minor%%.*}
  local v=k8s.io/component-base/version
  local ldflags="-s -w -X $v.gitVersion=$KUBERNETES_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    (cd "$m" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  done
}

build_etcd() {
  if have etcd; then return; fi
  log "building etcd $ETCD_VERSION"
  local m="$work/etcd"
  mkdir -p "$m"
  # The etcd root module carries replace directives, so `go install` refuses
  # it; etcdmain is the same entry point its main.go calls.
  cat >"$m/go.mod" <<EOF
module gpupool.dev/testenv/etcd

go 1.25
EOF
  cat >"$m/main.go" <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (cd "$m" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null && go mod tidy >/dev/null \
    && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin/etcd" .)
}

build_go_install() {
  local name=$1 pkg=$2
  if have "$name"; then return; fi
  log "building $name from $pkg"
  GOBIN="$bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$pkg"
}

build_etcd
build_go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
build_go_install helm "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
build_kubernetes

echo "$bin"
