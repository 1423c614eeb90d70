# Two images from one file, built from a wheelhouse by `make images` (images/build.sh), which
# downloads the pinned wheels on the host, builds kubearch's own wheel and passes both as the
# build context:
#   images/build.sh                       # python:3.11-slim base (users)
#   BASE=kubearch/debian-python:bookworm images/build.sh   # the local Debian base (tests, offline)
# Installing with `pip --no-index` from wheels fetched on the host means the build itself needs no
# network (air-gapped clusters, and CI machines whose containers cannot reach PyPI).
#
# The operator image carries no torch (the shared config module imports neither torch nor kopf);
# the trainer image carries PyPI's CUDA build of torch, which also runs on CPU nodes.
# No `# syntax=` line on purpose: it would pull a frontend image from a registry.
ARG BASE=python:3.11-slim

FROM ${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/kubearch PATH=/opt/kubearch/bin:$PATH
# A venv works on both bases (Debian's python3 refuses system-wide pip installs, PEP 668).
RUN python3 -m venv /opt/kubearch \
 && groupadd --gid 65532 kubearch \
 && useradd --uid 65532 --gid 65532 --create-home --home-dir /home/kubearch kubearch

FROM base AS operator
# Dependencies first, in their own layer: a code change rebuilds only the small layer below.
RUN --mount=type=bind,source=operator,target=/wheels \
    pip install --no-index --find-links /wheels -r /wheels/requirements.txt
RUN --mount=type=bind,source=app,target=/app \
    pip install --no-index --no-deps /app/kubearch-*.whl \
 && python -c "import kubearch_operator.handlers"
USER 65532
WORKDIR /home/kubearch
EXPOSE 8000 8080
ENTRYPOINT ["python", "-m", "kubearch_operator"]

FROM base AS trainer
RUN --mount=type=bind,source=trainer,target=/wheels \
    pip install --no-index --find-links /wheels -r /wheels/requirements.txt
RUN --mount=type=bind,source=app,target=/app \
    pip install --no-index --no-deps /app/kubearch-*.whl \
 && python -c "import kubearch_trainer.cli"
USER 65532
WORKDIR /home/kubearch
EXPOSE 9090
# The operator's pods run `torchrun ... -m kubearch_trainer --config /etc/kubearch/config.yaml`.
ENTRYPOINT ["python", "-m", "kubearch_trainer"]
