# Sourced by build.sh and tests/e2e/build-node.sh: picks a Go toolchain (fetching one through
# the module proxy when there is none) and sets the build environment and the version ldflags
# that `make` in k8s.io/kubernetes would stamp. Expects K8S_VERSION and GO_MIN/GO_FALLBACK.
# Sets GO_BIN and LDFLAGS; exports GOTOOLCHAIN, CGO_ENABLED, GOFLAGS, GOSUMDB.

# --- a Go toolchain ---------------------------------------------------------------------------
# Any go >= 1.21 can fetch the toolchain go.mod asks for (GOTOOLCHAIN=auto). With no go at all
# (Debian's golang-go is too old to switch), fetch an official toolchain zip from the module proxy.
PROXY="$(printf '%s' "${GOPROXY:-https://proxy.golang.org}" | cut -d, -f1)"
[[ "$PROXY" == direct || "$PROXY" == off ]] && PROXY="https://proxy.golang.org"
# KUBEARCH_GO=/path/to/go picks a toolchain; KUBEARCH_GO=fetch forces the download path.
GO_BIN="${KUBEARCH_GO:-$(command -v go || true)}"
if [[ -z "$GO_BIN" && -x /usr/local/go/bin/go ]]; then GO_BIN=/usr/local/go/bin/go; fi
[[ "$GO_BIN" == fetch ]] && GO_BIN=""
if [[ -n "$GO_BIN" ]]; then
  have="$("$GO_BIN" env GOVERSION | sed 's/^go//')"
  if [[ "$(printf '%s\n%s\n' 1.21.0 "$have" | sort -V | head -1)" != 1.21.0 ]]; then GO_BIN=""; fi
fi
if [[ -z "$GO_BIN" ]]; then
  TC="$HOME/.cache/kubearch/go-toolchain/$GO_FALLBACK"
  if [[ ! -x "$TC/go/bin/go" ]]; then
    command -v unzip >/dev/null || { apt-get update -qq && apt-get install -y -qq unzip curl; }
    mkdir -p "$TC"
    zip="$TC/tc.zip"
    curl -fsSL -o "$zip" "$PROXY/golang.org/toolchain/@v/v0.0.1-$GO_FALLBACK.linux-$(uname -m | sed 's/x86_64/amd64/;s/aarch64/arm64/').zip"
    (cd "$TC" && unzip -q "$zip" && rm -f "$zip")
    mv "$TC/golang.org/toolchain@"* "$TC/go"
    chmod +x "$TC/go/bin/"* "$TC/go/pkg/tool/"*/* 2>/dev/null || true
  fi
  GO_BIN="$TC/go/bin/go"
fi
have="$("$GO_BIN" env GOVERSION | sed 's/^go//')"
if [[ "$(printf '%s\n%s\n' "$GO_MIN" "$have" | sort -V | head -1)" != "$GO_MIN" ]]; then
  export GOTOOLCHAIN="$GO_FALLBACK"   # fetched through the module proxy by go itself
else
  export GOTOOLCHAIN=local
fi

# --- build ------------------------------------------------------------------------------------
export CGO_ENABLED=0
export GOFLAGS="-mod=mod -trimpath -buildvcs=false"
# sum.golang.org is not reachable from every CI machine; go.sum (checked in) pins the hashes.
export GOSUMDB="${GOSUMDB_OVERRIDE:-off}"
export GONOSUMDB="${GONOSUMDB:-}"
# k8s's version package is normally stamped by its Makefile; do the same so --version is honest.
VPKG=k8s.io/component-base/version
LDFLAGS="-s -w -X $VPKG.gitVersion=$K8S_VERSION -X $VPKG.gitMajor=1"
LDFLAGS+=" -X $VPKG.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $VPKG.gitTreeState=clean"
LDFLAGS+=" -X $VPKG.buildDate=1970-01-01T00:00:00Z"
LDFLAGS+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

