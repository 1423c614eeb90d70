#!/usr/bin/env bash
# Build what a real test node needs, into ~/.cache/kubearch/node/<k8s-version>/:
#   kubelet  from the same pinned k8s.io/kubernetes module as the control plane
#            (tests/controlplane/go.mod; same Go toolchain, flags and version ldflags, so the node
#            reports v1.34.x and the Go build cache of the control-plane build is reused);
#   coredns  `go install github.com/coredns/coredns@v1.15.0` in its own module context (inside
#            the Kubernetes 1.34 module it does not build: it needs a newer client-go);
#   pause    the sandbox's PID 1, compiled from the module's build/pause/linux/pause.c (static).
# Idempotent: when every binary is present and runs, this costs nothing. Prints the directory.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/../controlplane" && pwd)"
K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$HERE/go.mod")"
COREDNS_VERSION="v1.15.0"
DEST="${KUBEARCH_NODE_DIR:-$HOME/.cache/kubearch/node/$K8S_VERSION}"
GO_MIN="1.24.0"
GO_FALLBACK="go1.24.13"

if [[ -x "$DEST/kubelet" && -x "$DEST/coredns" && -x "$DEST/pause" ]] \
  && "$DEST/kubelet" --version >/dev/null 2>&1 && "$DEST/coredns" -version >/dev/null 2>&1; then
  echo "node binaries $K8S_VERSION already built" >&2
  echo "$DEST"
  exit 0
fi
# shellcheck source=../controlplane/go-env.sh
source "$HERE/go-env.sh"   # the Go toolchain (GO_BIN, GOTOOLCHAIN), shared with build.sh and Helm
# The same build environment and version ldflags as tests/controlplane/build.sh, so the Go build
# cache of the control-plane build is reused and the node reports v1.34.x, not v0.0.0-master.
# shellcheck source=../controlplane/k8s-build-env.sh
source "$HERE/k8s-build-env.sh"
mkdir -p "${DEST%/*}"
STAGE="$(mktemp -d "${DEST%/*}/stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
start=$(date +%s)
cd "$HERE"
echo "building kubelet $K8S_VERSION with $("$GO_BIN" version) ..." >&2
"$GO_BIN" build -p "${KUBEARCH_BUILD_JOBS:-$(nproc)}" -ldflags="$LDFLAGS" -o "$STAGE/" \
  k8s.io/kubernetes/cmd/kubelet
echo "kubelet built in $(( $(date +%s) - start )) s; building coredns $COREDNS_VERSION ..." >&2
(cd "$STAGE" && GOFLAGS="-trimpath -buildvcs=false" GOBIN="$STAGE" \
  "$GO_BIN" install -ldflags="-s -w" "github.com/coredns/coredns@$COREDNS_VERSION")
pause_src="$("$GO_BIN" list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
${CC:-cc} -Os -static -DVERSION="$K8S_VERSION" -o "$STAGE/pause" "$pause_src"
mkdir -p "$DEST"
for b in kubelet coredns pause; do mv -f "$STAGE/$b" "$DEST/$b"; done
echo "node binaries built in $(( $(date +%s) - start )) s:" >&2
"$DEST/kubelet" --version >&2
out="$("$DEST/coredns" -version)"; echo "${out%%$'\n'*}" >&2   # no `| head` under pipefail
echo "$DEST"
