#!/usr/bin/env bash
# Builds the real Helm CLI from the Go module proxy (no release-page download is reachable here)
# and caches it under ~/.cache/kubearch/helm/<version>/helm. A second run costs nothing.
# The Go toolchain is the one tests/controlplane/build.sh uses (go-env.sh): on a machine without
# Go it is fetched from the module proxy, as for the control plane.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
dest="${KUBEARCH_CACHE:-$HOME/.cache/kubearch}/helm/${HELM_VERSION}"
if [ -x "$dest/helm" ]; then
  echo "helm ${HELM_VERSION}: cached at $dest/helm"
  exit 0
fi
# Helm v3.22's go.mod asks for go 1.24.
GO_MIN="1.24.0"
# shellcheck source=../controlplane/go-env.sh
source "$HERE/../controlplane/go-env.sh"
mkdir -p "$dest"
start=$(date +%s)
GOBIN="$dest" CGO_ENABLED=0 GOFLAGS=-mod=mod \
  "$GO_BIN" install -trimpath -ldflags='-s -w' "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
echo "helm ${HELM_VERSION}: built in $(( $(date +%s) - start ))s at $dest/helm"
