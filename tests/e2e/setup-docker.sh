#!/usr/bin/env bash
# Install Debian's docker.io (dockerd, containerd, runc), debootstrap and the CNI plugins, and
# start dockerd by hand as a background process (no systemd on CI machines). Idempotent: a
# dockerd that already answers is left alone; packages already installed cost nothing.
#
# State lives under $KUBEARCH_DOCKER_DIR (default /var/lib/kubearch-docker): its own data root,
# exec root and socket (unix://$DIR/docker.sock), so a docker a developer already runs is not
# touched; a daemon that already answers on the default socket is used instead (unless
# KUBEARCH_OWN_DOCKERD is set). Prints `export DOCKER_HOST=...` as its last line.
# `setup-docker.sh stop` stops the daemon it started, by PID.
set -euo pipefail

DIR="${KUBEARCH_DOCKER_DIR:-/var/lib/kubearch-docker}"
SOCK="$DIR/docker.sock"
PIDFILE="$DIR/dockerd.pid"
LOG="$DIR/dockerd.log"
export DOCKER_HOST="unix://$SOCK"
# Debian's CLI (same release as the daemon, with its built-in BuildKit client) if present.
DOCKER="$(command -v /usr/bin/docker || command -v docker)"

if [[ "${1:-start}" == stop ]]; then
  if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    pid="$(cat "$PIDFILE")"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$PIDFILE"
  exit 0
fi

# A docker daemon the user already runs (e.g. for kind) is used as it is.
if [[ -z "${KUBEARCH_OWN_DOCKERD:-}" ]] && command -v docker >/dev/null \
  && env -u DOCKER_HOST docker version >/dev/null 2>&1; then
  echo "using the running docker daemon" >&2
  echo "export DOCKER_HOST=unix:///var/run/docker.sock"
  exit 0
fi

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
if ((${#need[@]})); then
  echo "installing ${need[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" ca-certificates >&2
  DOCKER="$(command -v /usr/bin/docker || command -v docker)"
fi

if ! "$DOCKER" version >/dev/null 2>&1; then
  mkdir -p "$DIR"
  if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "dockerd (pid $(cat "$PIDFILE")) is starting" >&2
  else
    # setsid: the daemon outlives this script and its caller's terminal.
    setsid dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" --host "$DOCKER_HOST" \
      --pidfile "$PIDFILE" >"$LOG" 2>&1 < /dev/null &
  fi
  for _ in $(seq 1 120); do
    "$DOCKER" version >/dev/null 2>&1 && break
    sleep 0.5
  done
  "$DOCKER" version >/dev/null 2>&1 || { tail -30 "$LOG" >&2; echo "dockerd did not start" >&2; exit 1; }
fi
echo "export DOCKER_HOST=$DOCKER_HOST"
