"""Fixtures for the operator's integration tests.

By default a local control plane (etcd + kube-apiserver + kube-controller-manager built by
``tests/controlplane/build.sh``) is started once per session. With ``--cluster`` the same tests run
against the cluster ``KUBECONFIG`` points at (e.g. kind) instead. Missing binaries skip the tests
locally with the command to build them, and FAIL them in CI (``CI=true``) so that a broken build
can never pass as green.

The operator runs unchanged as a real process, ``python -m kopf run -m kubearch_operator.handlers``,
with a token of the ServiceAccount from ``manifests/rbac.yaml`` (local control plane), so the
ClusterRole's verbs are exercised for real.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from controlplane import (
    REPO,
    ControlPlane,
    binary_dir,
    free_port,
    missing_binaries,
    wait_for,
    write_kubeconfig,
)
from kubernetes.client.rest import ApiException

OPERATOR_NAMESPACE = "kubearch-system"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@dataclass
class Kube:
    """A cluster the tests talk to: kubectl + python clients with the admin's credentials."""

    kubeconfig: Path
    kubectl_bin: str
    local: ControlPlane | None = None
    api: Any = field(init=False)
    core: Any = field(init=False)
    custom: Any = field(init=False)

    def __post_init__(self) -> None:
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        self.api = kubernetes.client.ApiClient(cfg)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    @property
    def has_garbage_collector(self) -> bool:
        return True  # the local control plane runs kube-controller-manager; a real cluster has one


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    if request.config.getoption("--cluster"):
        kubeconfig = Path(os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")))
        kubectl = shutil.which("kubectl")
        if not kubectl or not kubeconfig.exists():
            pytest.fail(f"--cluster needs kubectl on PATH and a kubeconfig ({kubeconfig})")
        yield Kube(kubeconfig, kubectl)
        return
    missing = missing_binaries()
    if missing:
        message = (
            f"control-plane binaries {', '.join(missing)} missing in {binary_dir()}; "
            "build them with `bash tests/controlplane/build.sh`"
        )
        if _ci():
            pytest.fail(message)
        pytest.skip(message)
    plane = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    try:
        plane.start()
        yield Kube(plane.kubeconfig, plane.kubectl, local=plane)
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def installed(kube: Kube) -> Kube:
    """CRD, namespace and RBAC from manifests/ applied, the CRD established."""
    for name in ("crd-trainingrun.yaml", "crd-architecturesearch.yaml", "namespace.yaml", "rbac.yaml"):
        kube.kubectl("apply", "-f", str(REPO / "manifests" / name))
    for crd in ("trainingruns.kubearch.dev", "architecturesearches.kubearch.dev"):
        kube.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{crd}")
    if kube.local is not None:
        kube.local.start_controller_manager()
    return kube


class Operator:
    """The operator as a subprocess: ``python -m kopf run -m kubearch_operator.handlers``."""

    def __init__(self, kube: Kube, workdir: Path) -> None:
        self.kube, self.workdir = kube, workdir
        self.proc: subprocess.Popen | None = None
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.kubeconfig = self._kubeconfig()
        self.log_path = workdir / "operator.log"

    def _kubeconfig(self) -> Path:
        plane = self.kube.local
        if plane is None:  # an existing cluster: the user's own credentials
            return self.kube.kubeconfig
        sa_token = wait_for(
            lambda: self.kube.kubectl(
                "create", "token", "kubearch-operator", "-n", OPERATOR_NAMESPACE, "--duration=2h"
            ).stdout.strip(),
            timeout=30,
            what="a token of the operator's ServiceAccount",
        )
        return write_kubeconfig(
            self.workdir / "operator.kubeconfig",
            plane.server,
            plane.workdir / "pki" / "ca.crt",
            sa_token,
            "operator",
        )

    def start(self, **extra_env: str) -> Operator:
        """Start the process; ``extra_env`` adds or overrides variables for this start only."""
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBEARCH_RESYNC_SECONDS": "0",  # no safety resync: every reaction must come from an event
            "KUBEARCH_PEERING_LIFETIME": "5",  # after a crash, the dead peer blocks for this long
            "KUBEARCH_OPERATOR_METRICS_PORT": str(self.metrics_port),
            # a failed search pass is retried after 0.5, 1, 2, 4 s (production: 2, 4, 8, 16 s)
            "KUBEARCH_SEARCH_RETRY_SECONDS": "0.5",
            **extra_env,
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's lifetime
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "-m",
                "kubearch_operator.handlers",
                "--all-namespaces",
                "--peering=kubearch",  # as manifests/operator.yaml runs it
                f"--liveness=http://127.0.0.1:{self.health_port}/healthz",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(self.healthy, timeout=60, what="the operator's liveness endpoint")
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- operator log ---\n{self.log_tail()}") from None
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def operator(installed: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    # kopf peering as in production: the CRDs first, then the ClusterKopfPeering object.
    peering = REPO / "manifests" / "peering.yaml"
    installed.kubectl("apply", "-f", str(peering), "--selector=", check=False)
    installed.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", "crd/clusterkopfpeerings.kopf.dev"
    )
    installed.kubectl("apply", "-f", str(peering))
    op = Operator(installed, tmp_path_factory.mktemp("operator")).start()
    try:
        yield op
    finally:
        op.stop()
        print(f"\n--- operator log (tail) ---\n{op.log_tail(30)}")


@pytest.fixture
def namespace(installed: Kube) -> Iterator[str]:
    """A fresh namespace per test (deleted afterwards; the namespace controller empties it)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    installed.core.create_namespace({"metadata": {"name": name, "labels": {"kubearch.dev/test": "true"}}})
    # The ServiceAccount admission plugin refuses pods until the `default` account exists.
    wait_for(
        lambda: installed.core.read_namespaced_service_account("default", name),
        timeout=30,
        what="the namespace's default ServiceAccount",
    )
    yield name
    with contextlib.suppress(ApiException):
        installed.core.delete_namespace(name)
