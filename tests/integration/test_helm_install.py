"""``helm install`` of the chart against the real API server, then ``helm uninstall``.

No kubelet runs here, so the operator Deployment's pod never starts; what this proves is that the
API server accepts every object the chart renders (schema, RBAC objects, CRDs) and that Helm can
own and remove them. The release name differs from the plain manifests' objects so the two
installs never collide.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from controlplane import wait_for
from helmbin import CHART, helm


@pytest.fixture
def release_namespace(installed: Any) -> str:
    return f"helm-{uuid.uuid4().hex[:6]}"


def test_helm_install_and_uninstall(installed: Any, release_namespace: str) -> None:
    kubeconfig = str(installed.kubeconfig)
    release = "kbh"
    helm(
        "install",
        release,
        str(CHART),
        "--kubeconfig",
        kubeconfig,
        "--namespace",
        release_namespace,
        "--create-namespace",
        "--set",
        "operator.peeringName=kbh-peering",
    )
    try:
        status = helm("status", release, "--kubeconfig", kubeconfig, "-n", release_namespace).stdout
        assert "STATUS: deployed" in status
        name = f"{release}-kubearch-operator"
        dep = installed.kubectl("get", "deployment", name, "-n", release_namespace, "-o", "name").stdout
        assert dep.strip() == f"deployment.apps/{name}"
        installed.kubectl("get", "clusterrole", name)
        installed.kubectl("get", "clusterkopfpeering", "kbh-peering")
        cms = installed.kubectl(
            "get", "configmap", "-n", release_namespace, "-l", "grafana_dashboard=1", "-o", "name"
        )
        assert "kubearch-dashboard-kubearch-training" in cms.stdout
        # The API server defaulted the Deployment: proof it went through real admission.
        strategy = installed.kubectl(
            "get", "deployment", name, "-n", release_namespace, "-o", "jsonpath={.spec.revisionHistoryLimit}"
        ).stdout
        assert strategy == "10"
    finally:
        helm("uninstall", release, "--kubeconfig", kubeconfig, "-n", release_namespace)
    wait_for(
        lambda: (
            installed.kubectl("get", "clusterrole", f"{release}-kubearch-operator", check=False).returncode
            != 0
        ),
        timeout=30,
        what="the release's ClusterRole to be deleted by helm uninstall",
    )
    installed.kubectl("delete", "namespace", release_namespace, "--wait=false")
