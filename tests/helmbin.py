"""Locate the Helm CLI that ``tests/helm/build-helm.sh`` builds from source (Go module proxy).

Missing binaries skip the Helm tests locally, with the command that builds them, and fail them in
CI (``CI=true``) so a broken build never passes as green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubearch"
HELM_VERSION = os.environ.get("HELM_VERSION", "v3.22.0")


def helm_binary() -> str:
    cache = Path(os.environ.get("KUBEARCH_CACHE", Path.home() / ".cache" / "kubearch"))
    built = cache / "helm" / HELM_VERSION / "helm"
    if built.exists():
        return str(built)
    found = shutil.which("helm")
    if found:
        return found
    message = f"helm not found at {built}; build it with `bash tests/helm/build-helm.sh`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def helm(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
    """Run helm with an isolated home so the developer's repos/config never leak into tests."""
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "kubearch-helm-home"
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    proc = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, env=env, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
