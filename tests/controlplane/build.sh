#!/usr/bin/env bash
# Build a pinned Kubernetes control plane from source for the integration tests:
# kube-apiserver, kube-controller-manager (garbage collector -> ownerReference cascade),
# kube-scheduler, a kubectl of the same version, etcd, and KWOK (fake nodes/kubelets), into
# ~/.cache/kubearch/controlplane/<k8s-version>/.
#
# Why from source: no registry reachable from CI ships these binaries, but the Go module proxy
# does ship their source. Idempotent: when every binary is present and runs, this costs nothing.
# Prints the directory of the binaries as its last line of output.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$HERE/go.mod")"
ETCD_VERSION="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$HERE/go.mod")"
DEST="${KUBEARCH_CONTROLPLANE_DIR:-$HOME/.cache/kubearch/controlplane/$K8S_VERSION}"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)
# KWOK is its own module (with its own k8s.io/* versions), installed at a pinned release.
KWOK_VERSION="v0.7.0"
# The Go release the toolchain must at least be (k8s.io/kubernetes's own go.mod `go` line).
GO_MIN="1.24.0"
GO_FALLBACK="go1.24.13"
# `--version | head -1` under pipefail failed the script (exit 141) after a full build: head
# exits after one line, and etcd's next write gets SIGPIPE. Read whole outputs instead.
first_line() { local out; out="$("$@")"; printf '%s\n' "${out%%$'\n'*}"; }

all_present() {
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "$DEST/$b" ]] || return 1
  done
  "$DEST/kube-apiserver" --version >/dev/null 2>&1 && "$DEST/etcd" --version >/dev/null 2>&1
}

if all_present; then
  echo "control plane $K8S_VERSION (etcd $ETCD_VERSION) already built" >&2
  echo "$DEST"
  exit 0
fi

# --- a Go toolchain (shared with tests/helm/build-helm.sh) -----------------------------------
# shellcheck source=go-env.sh
source "$HERE/go-env.sh"

# --- build ------------------------------------------------------------------------------------
# k8s's version package is normally stamped by its Makefile; do the same so --version is honest.
# shellcheck source=k8s-build-env.sh
source "$HERE/k8s-build-env.sh"   # CGO/GOFLAGS/GOSUMDB and LDFLAGS, shared with build-node.sh

mkdir -p "${DEST%/*}"
STAGE="$(mktemp -d "${DEST%/*}/stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
start=$(date +%s)
echo "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $K8S_VERSION," \
  "etcd $ETCD_VERSION and kwok $KWOK_VERSION" \
  "with $("$GO_BIN" version) (GOTOOLCHAIN=$GOTOOLCHAIN) ..." >&2
cd "$HERE"
"$GO_BIN" build -p "${KUBEARCH_BUILD_JOBS:-$(nproc)}" -ldflags="$LDFLAGS" -o "$STAGE/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl \
  go.etcd.io/etcd/server/v3
# `go build` names a /vN module's binary after the element before /vN.
mv "$STAGE/server" "$STAGE/etcd"
# `go install pkg@version` builds KWOK with its own go.mod, outside this module.
(cd "$STAGE" && GOFLAGS="-trimpath -buildvcs=false" GOBIN="$STAGE" \
  "$GO_BIN" install -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
mkdir -p "$DEST"
for b in "${BINARIES[@]}"; do mv -f "$STAGE/$b" "$DEST/$b"; done
echo "built in $(( $(date +%s) - start )) s:" >&2
"$DEST/kube-apiserver" --version >&2
first_line "$DEST/etcd" --version >&2
"$DEST/kwok" --version >&2 || true
echo "$DEST"
