# Sourced (not run) by tests/controlplane/build.sh and tests/helm/build-helm.sh: finds a Go
# toolchain and sets GO_BIN and GOTOOLCHAIN. One copy of this logic, so a machine without Go
# builds Helm with the same fetched toolchain as the control plane (before, build-helm.sh called
# a bare `go` and failed there).
#
# Order: KUBEARCH_GO=/path/to/go; `go` on PATH; /usr/local/go/bin/go; else an official toolchain
# zip fetched from the Go module proxy into ~/.cache/kubearch/go-toolchain (KUBEARCH_GO=fetch
# forces this). A go older than 1.21 cannot switch toolchains and is passed over. Callers may set
# GO_MIN (the release their go.mod needs) before sourcing; an older go then sets
# GOTOOLCHAIN=$GO_FALLBACK, which go itself fetches through the module proxy.
# shellcheck shell=bash

GO_MIN="${GO_MIN:-1.24.0}"
GO_FALLBACK="${GO_FALLBACK:-go1.24.13}"

_kubearch_version_ge() {  # $1 >= $2 (dotted versions); no `| head` under pipefail (SIGPIPE)
  local sorted
  sorted="$(printf '%s\n%s\n' "$2" "$1" | sort -V)"
  [[ "${sorted%%$'\n'*}" == "$2" ]]
}

_kubearch_fetch_go() {
  local proxy tc arch zip
  proxy="$(printf '%s' "${GOPROXY:-https://proxy.golang.org}" | cut -d, -f1)"
  [[ "$proxy" == direct || "$proxy" == off ]] && proxy="https://proxy.golang.org"
  tc="${KUBEARCH_CACHE:-$HOME/.cache/kubearch}/go-toolchain/$GO_FALLBACK"
  if [[ ! -x "$tc/go/bin/go" ]]; then
    command -v unzip >/dev/null || { apt-get update -qq && apt-get install -y -qq unzip curl; }
    mkdir -p "$tc"
    arch="$(uname -m | sed 's/x86_64/amd64/;s/aarch64/arm64/')"
    zip="$tc/tc.zip"
    curl -fsSL -o "$zip" "$proxy/golang.org/toolchain/@v/v0.0.1-$GO_FALLBACK.linux-$arch.zip"
    (cd "$tc" && unzip -q "$zip" && rm -f "$zip")
    mv "$tc/golang.org/toolchain@"* "$tc/go"
    chmod +x "$tc/go/bin/"* "$tc/go/pkg/tool/"*/* 2>/dev/null || true
  fi
  GO_BIN="$tc/go/bin/go"
}

GO_BIN="${KUBEARCH_GO:-$(command -v go || true)}"
if [[ -z "$GO_BIN" && -x /usr/local/go/bin/go ]]; then GO_BIN=/usr/local/go/bin/go; fi
[[ "$GO_BIN" == fetch ]] && GO_BIN=""
if [[ -n "$GO_BIN" ]] && ! _kubearch_version_ge "$("$GO_BIN" env GOVERSION | sed 's/^go//')" 1.21.0; then
  GO_BIN=""
fi
[[ -n "$GO_BIN" ]] || _kubearch_fetch_go
if _kubearch_version_ge "$("$GO_BIN" env GOVERSION | sed 's/^go//')" "$GO_MIN"; then
  export GOTOOLCHAIN=local
else
  export GOTOOLCHAIN="$GO_FALLBACK"
fi
export GO_BIN
