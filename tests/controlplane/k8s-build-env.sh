# Sourced (not run) by tests/controlplane/build.sh and tests/e2e/build-node.sh after go-env.sh:
# the build environment and the version ldflags that `make` in k8s.io/kubernetes would stamp, in
# one place, so the control plane and the kubelet share the Go build cache and report the same
# version (not v0.0.0-master). Expects K8S_VERSION; sets LDFLAGS.
# shellcheck shell=bash

export CGO_ENABLED=0
export GOFLAGS="-mod=mod -trimpath -buildvcs=false"
# sum.golang.org is not reachable from every CI machine; go.sum (checked in) pins the hashes.
export GOSUMDB="${GOSUMDB_OVERRIDE:-off}"
export GONOSUMDB="${GONOSUMDB:-}"
VPKG=k8s.io/component-base/version
LDFLAGS="-s -w -X $VPKG.gitVersion=$K8S_VERSION -X $VPKG.gitMajor=1"
LDFLAGS+=" -X $VPKG.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $VPKG.gitTreeState=clean"
LDFLAGS+=" -X $VPKG.buildDate=1970-01-01T00:00:00Z"
LDFLAGS+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
