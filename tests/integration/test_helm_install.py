"""``helm install`` of the chart against the real API server, then ``helm uninstall``.

No kubelet runs here, so the operator Deployment's pod never starts; what this proves is that the
API server accepts every object the chart renders (schema, RBAC objects, CRDs) and that Helm can
own and remove them. The release name differs from the plain manifests' objects so the two
installs never collide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import free_port, wait_for, write_kubeconfig
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


def test_operator_runs_from_the_rendered_chart_with_non_default_values(
    installed: Any, release_namespace: str, tmp_path: Path
) -> None:
    """Defect 4: with operator.peeringName and watchNamespaces set, the operator started exactly
    as the chart's Deployment says (its command, args, env and ServiceAccount) takes part in the
    namespaced KopfPeering the chart made in the watched namespace. Before, the start-up handler
    reset the name to "kubearch" and the chart made no KopfPeering: kopf paused for good."""
    if installed.local is None:
        pytest.skip("runs the operator with a ServiceAccount token of the local control plane")
    kubeconfig = str(installed.kubeconfig)
    release, watched, peering = "kbw", f"watched-{uuid.uuid4().hex[:6]}", f"peer-{uuid.uuid4().hex[:6]}"
    installed.kubectl("create", "namespace", watched)
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
        f"operator.peeringName={peering}",
        "--set",
        f"operator.watchNamespaces={{{watched}}}",
        "--set",
        "grafana.dashboards.enabled=false",
    )
    proc = None
    try:
        manifest = helm(
            "get", "manifest", release, "--kubeconfig", kubeconfig, "-n", release_namespace
        ).stdout
        (dep,) = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment"]
        pod_spec = dep["spec"]["template"]["spec"]
        (container,) = pod_spec["containers"]
        token = installed.kubectl(
            "create", "token", pod_spec["serviceAccountName"], "-n", release_namespace
        ).stdout.strip()
        plane = installed.local
        op_kubeconfig = write_kubeconfig(
            tmp_path / "kubeconfig", plane.server, plane.workdir / "pki" / "ca.crt", token, "chart-operator"
        )
        health, metrics = free_port(), free_port()
        command = [sys.executable if c == "python" else c for c in container["command"]]
        args = [
            f"--liveness=http://127.0.0.1:{health}/healthz" if a.startswith("--liveness=") else a
            for a in container["args"]
        ]
        env = {e["name"]: e["value"] for e in container["env"]}
        env["KUBEARCH_OPERATOR_METRICS_PORT"] = str(metrics)  # the chart's port may be taken here
        log_path = tmp_path / "operator.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*command, *args],
                env={**os.environ, **env, "KUBECONFIG": str(op_kubeconfig)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def peered() -> dict | None:
            if proc.poll() is not None:
                raise AssertionError(f"operator exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            obj = installed.custom.get_namespaced_custom_object(
                "kopf.dev", "v1", watched, "kopfpeerings", peering
            )
            return obj.get("status") or None

        status = wait_for(
            peered, timeout=60, what=f"the operator to register in KopfPeering {watched}/{peering}"
        )
        assert len(status) == 1  # this operator, and it is the one whose flags the chart wrote
        assert f"--peering={peering}" in args and f"--namespace={watched}" in args
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        helm("uninstall", release, "--kubeconfig", kubeconfig, "-n", release_namespace)
        installed.kubectl("delete", "namespace", release_namespace, watched, "--wait=false")
