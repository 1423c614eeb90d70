# kubearch developer commands. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install controlplane crds lint test test-unit compare

## Install the package with every extra (idempotent: pip skips what is already there).
install:
	$(PIP) install --quiet --disable-pip-version-check -e '.[trainer,operator,dev]'

## Build (once, cached under ~/.cache/kubearch) etcd, kube-apiserver, kube-controller-manager,
## kubectl and the Helm CLI from source for the integration and chart tests.
controlplane:
	bash tests/controlplane/build.sh
	bash tests/helm/build-helm.sh

## Regenerate the CRDs from the pydantic models into manifests/ and the Helm chart.
crds:
	$(PYTHON) -m kubearch_operator.crd > manifests/crd-trainingrun.yaml
	$(PYTHON) -m kubearch_operator.crd architecturesearch > manifests/crd-architecturesearch.yaml
	cp manifests/crd-trainingrun.yaml manifests/crd-architecturesearch.yaml charts/kubearch/crds/

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

## The whole suite: lint, unit tests, integration tests against a real API server.
test: install controlplane lint
	$(PYTHON) -m pytest -q -ra --durations=15

test-unit: install lint
	$(PYTHON) -m pytest -q -ra tests/unit

## The main job: a tiny four-architecture comparison on CPU.
compare: install
	kubearch compare
