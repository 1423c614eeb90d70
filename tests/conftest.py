"""Shared pytest set-up: markers that need hardware or a cluster skip cleanly when it is absent."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster",
        action="store_true",
        default=False,
        help="run the 'cluster' tests against the cluster KUBECONFIG points at (e.g. kind)",
    )
    parser.addoption(
        "--node",
        action="store_true",
        default=False,
        help="run the 'node' end-to-end tests (tests/e2e: images, a real kubelet + containerd)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # operator-only installs
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "cluster" in item.keywords and not config.getoption("--cluster"):
            item.add_marker(pytest.mark.skip(reason="needs --cluster and a KUBECONFIG (kind)"))
        if item.get_closest_marker("node") and not config.getoption("--node"):
            item.add_marker(pytest.mark.skip(reason="opt-in: `make test-node` (pytest --node tests/e2e)"))
