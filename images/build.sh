#!/usr/bin/env bash
# Build the operator and trainer images from a wheelhouse: `images/build.sh [operator] [trainer]`.
#
#   BASE=python:3.11-slim (default)  the usual base, pulled from Docker Hub (users)
#   BASE=local                       a Debian bookworm base with Python 3.11 built here with
#                                    debootstrap (tests/CI: no image registry is reachable)
#
# Steps, each cached under ~/.cache/kubearch so that a second run costs nothing:
#   1. dockerd (tests/e2e/setup-docker.sh installs and starts it when it is not running);
#   2. the base image (BASE=local: debootstrap --variant=minbase + docker import);
#   3. a wheelhouse per image: `pip download -r images/requirements-<image>.txt` on the host, in a
#      directory named after the hash of the requirements file;
#   4. kubearch's own wheel, then `docker build --target <image>` with a context of hard links to
#      the wheels; the build installs with `pip --no-index`, so it needs no network;
#   5. the image is tagged kubearch/<image>:<hash of its inputs> (Dockerfile, requirements, base
#      image id, kubearch's sources) and :dev; an existing tag skips the build.
# Writes the tags to ~/.cache/kubearch/images/current.env (read by the e2e tests) and prints them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KUBEARCH_CACHE:-$HOME/.cache/kubearch}"
OUT="$CACHE/images"
PYTHON="${PYTHON:-python3}"
BASE="${BASE:-python:3.11-slim}"
LOCAL_BASE="kubearch/debian-python:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(operator trainer)
mkdir -p "$OUT"

eval "$(bash "$REPO/tests/e2e/setup-docker.sh" | tail -1)"
DOCKER="$(command -v /usr/bin/docker || command -v docker)"
export DOCKER_BUILDKIT=1
t0=$(date +%s)
log() { echo "[images +$(($(date +%s) - t0))s] $*" >&2; }

# --- 2. base image ----------------------------------------------------------------------------
if [[ "$BASE" == local ]]; then
  BASE="$LOCAL_BASE"
  if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    log "building $BASE with debootstrap ($DEBIAN_MIRROR) ..."
    root="$(mktemp -d "$OUT/rootfs.XXXXXX")"
    # python3-venv brings ensurepip (Debian's python3 has no pip); passwd brings useradd.
    debootstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates \
      bookworm "$root" "$DEBIAN_MIRROR" >"$OUT/debootstrap.log" 2>&1 \
      || { tail -20 "$OUT/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    ln -sf python3 "$root/usr/bin/python"
    tar -C "$root" -c . | "$DOCKER" import \
      -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$root"
    log "base image $BASE built"
  fi
elif ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  "$DOCKER" pull "$BASE"
fi
base_id="$("$DOCKER" image inspect -f '{{.Id}}' "$BASE")"

# --- 3. wheelhouses ---------------------------------------------------------------------------
wheelhouse() {  # $1 = operator|trainer; prints the directory
  local req="$REPO/images/requirements-$1.txt" dir
  dir="$CACHE/wheelhouse/$1-$(sha256sum "$req" | cut -c1-16)"
  if [[ ! -f "$dir/.complete" ]]; then
    log "downloading the $1 wheels into $dir ..."
    rm -rf "$dir"
    mkdir -p "$dir"
    "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$dir" -r "$req" >&2
    grep -v '^#' "$req" >"$dir/requirements.txt"
    touch "$dir/.complete"
    log "$1 wheels: $(du -sh "$dir" | cut -f1)"
  fi
  echo "$dir"
}

# --- 4./5. images -----------------------------------------------------------------------------
# The trainer never imports kubearch_operator: its image's key leaves operator/ out, so an
# operator change does not rebuild (and re-import into containerd) the 6 GB trainer image.
src_hash() {
  (cd "$REPO" && find pyproject.toml README.md "$@" -type f ! -path '*/__pycache__/*' \
    ! -name '*.pyc' ! -path '*.egg-info*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}
app="$(mktemp -d "$OUT/app.XXXXXX")"
trap 'rm -rf "$app"' EXIT
declare -A TAGS
for target in "${TARGETS[@]}"; do
  wh="$(wheelhouse "$target")"
  if [[ "$target" == trainer ]]; then src="$(src_hash trainer_image)"; else src="$(src_hash trainer_image operator)"; fi
  key="$( (cat "$REPO/Dockerfile" "$wh/requirements.txt"; echo "$base_id $src $target") \
    | sha256sum | cut -c1-16)"
  tag="kubearch/$target:$key"
  TAGS[$target]="$tag"
  if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
    log "$tag is up to date"
    "$DOCKER" tag "$tag" "kubearch/$target:dev"
    continue
  fi
  if [[ -z "$(ls "$app")" ]]; then
    # The host's setuptools if it can build wheels (offline), else an isolated build env.
    "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$app" "$REPO" >&2 \
      || "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$app" "$REPO" >&2
    rm -rf "$REPO/build" "$REPO"/*.egg-info "$REPO"/*/*.egg-info
  fi
  # One fixed context directory per image: BuildKit then syncs it incrementally into the copy it
  # keeps (hard links to unchanged wheels look unchanged) instead of keeping 3 GB per build.
  ctx="$OUT/ctx-$target"
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp -al "$wh" "$ctx/$target" 2>/dev/null || cp -a "$wh" "$ctx/$target"
  cp -a "$app" "$ctx/app"
  log "building $tag (base $BASE) ..."
  "$DOCKER" build --quiet --target "$target" --build-arg "BASE=$BASE" -f "$REPO/Dockerfile" \
    -t "$tag" -t "kubearch/$target:dev" "$ctx" >/dev/null
  # Older builds of this image: drop their tags (their shared layers stay, the rest is freed).
  "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}' "kubearch/$target" \
    | grep -vx -e "$tag" -e "kubearch/$target:dev" | xargs -r "$DOCKER" rmi >/dev/null || true
  "$DOCKER" image prune -f >/dev/null || true   # the untagged images those tags left
  log "built $tag: $("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')"
done

# Tags of every image built so far (this run's and earlier runs' of the other target).
for target in "${!TAGS[@]}"; do
  touch "$OUT/current.env"
  grep -v "^KUBEARCH_$(tr a-z A-Z <<<"$target")_IMAGE=" "$OUT/current.env" >"$OUT/current.env.new" || true
  echo "KUBEARCH_$(tr a-z A-Z <<<"$target")_IMAGE=${TAGS[$target]}" >>"$OUT/current.env.new"
  mv "$OUT/current.env.new" "$OUT/current.env"
done
grep -v '^DOCKER_HOST=' "$OUT/current.env" >"$OUT/current.env.new" || true
echo "DOCKER_HOST=$DOCKER_HOST" >>"$OUT/current.env.new"
mv "$OUT/current.env.new" "$OUT/current.env"
cat "$OUT/current.env"
