# syntax=docker/dockerfile:1.7
# Multi-stage build: `docker build --target operator -t kubearch/operator .`
#                    `docker build --target trainer  -t kubearch/trainer .`
# The operator image carries no torch (the shared config module imports neither torch nor kopf);
# the trainer image carries PyPI's CUDA build of torch, which also runs on CPU nodes.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer_image ./trainer_image
COPY operator ./operator

FROM base AS operator
RUN pip install '.[operator]' && rm -rf /src
RUN useradd --uid 65532 --no-create-home kubearch
USER 65532
EXPOSE 8000 8080
ENTRYPOINT ["python", "-m", "kubearch_operator"]

FROM base AS trainer
RUN pip install '.[trainer]' && rm -rf /src
RUN useradd --uid 65532 --create-home kubearch
USER 65532
WORKDIR /home/kubearch
EXPOSE 9090
# The operator's pods run `torchrun ... -m kubearch_trainer --config /etc/kubearch/config.yaml`.
ENTRYPOINT ["python", "-m", "kubearch_trainer"]
