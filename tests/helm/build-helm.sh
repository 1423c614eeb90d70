#!/usr/bin/env bash
# Builds the real Helm CLI from the Go module proxy (no release-page download is reachable here)
# and caches it under ~/.cache/kubearch/helm/<version>/helm. A second run costs nothing.
set -euo pipefail
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
dest="${KUBEARCH_CACHE:-$HOME/.cache/kubearch}/helm/${HELM_VERSION}"
if [ -x "$dest/helm" ]; then
  echo "helm ${HELM_VERSION}: cached at $dest/helm"
  exit 0
fi
mkdir -p "$dest"
start=$(date +%s)
GOBIN="$dest" CGO_ENABLED=0 GOFLAGS=-mod=mod go install -trimpath -ldflags='-s -w' "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
echo "helm ${HELM_VERSION}: built in $(( $(date +%s) - start ))s at $dest/helm"
