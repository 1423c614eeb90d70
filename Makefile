# kubearch developer commands. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install controlplane crds lint test test-unit compare images images-local node test-node kind-e2e

## Install the package with every extra (idempotent: pip skips what is already there).
install:
	$(PIP) install --quiet --disable-pip-version-check -e '.[trainer,operator,dev]'

## Build (once, cached under ~/.cache/kubearch) etcd, kube-apiserver, kube-controller-manager,
## kubectl and the Helm CLI from source for the integration and chart tests.
controlplane:
	bash tests/controlplane/build.sh
	bash tests/helm/build-helm.sh

## Container images kubearch/operator and kubearch/trainer from a wheelhouse (images/build.sh;
## cached by a hash of their inputs). IMAGE_BASE=local builds a Debian base with debootstrap
## instead of pulling python:3.11-slim (what the tests use: no registry is reachable in CI).
IMAGE_BASE ?= python:3.11-slim
images:
	BASE=$(IMAGE_BASE) PYTHON=$(PYTHON) bash images/build.sh

images-local:
	$(MAKE) images IMAGE_BASE=local

## A real node for the test cluster: docker.io/containerd/CNI from Debian, kubelet + CoreDNS +
## pause built from source (cached under ~/.cache/kubearch/node).
node: controlplane
	bash tests/e2e/setup-docker.sh
	bash tests/e2e/build-node.sh

## End to end on the built images and a real kubelet + containerd node (tests/e2e, marker `node`).
test-node: install node images-local
	$(PYTHON) -m pytest -q -ra --durations=15 --node tests/e2e

## The same end-to-end tests against a kind cluster (needs internet: kind pulls its node image).
KIND ?= kind
kind-e2e: install
	$(MAKE) images
	mkdir -p /tmp/kubearch-e2e
	$(KIND) get clusters | grep -qx kubearch-e2e || \
	  $(KIND) create cluster --name kubearch-e2e --config tests/e2e/kind.yaml
	. $$HOME/.cache/kubearch/images/current.env && \
	  $(KIND) load docker-image --name kubearch-e2e "$$KUBEARCH_OPERATOR_IMAGE" "$$KUBEARCH_TRAINER_IMAGE"
	$(KIND) get kubeconfig --name kubearch-e2e > /tmp/kubearch-e2e/kubeconfig
	KUBECONFIG=/tmp/kubearch-e2e/kubeconfig $(PYTHON) -m pytest -q -ra --node --cluster tests/e2e

## Regenerate the CRDs from the pydantic models into manifests/ and the Helm chart.
crds:
	$(PYTHON) -m kubearch_operator.crd > manifests/crd-trainingrun.yaml
	$(PYTHON) -m kubearch_operator.crd architecturesearch > manifests/crd-architecturesearch.yaml
	cp manifests/crd-trainingrun.yaml manifests/crd-architecturesearch.yaml charts/kubearch/crds/

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

## The whole suite: lint, unit tests, integration tests against a real API server, and the
## end-to-end tests on the built images and a real kubelet + containerd node (--node).
test: install controlplane lint node images-local
	$(PYTHON) -m pytest -q -ra --durations=15 --node

test-unit: install lint
	$(PYTHON) -m pytest -q -ra tests/unit

## The main job: a tiny four-architecture comparison on CPU.
compare: install
	kubearch compare
