"""Fixtures of the real-node end-to-end tests (pytest marker ``node``, opt-in with ``--node``).

``cluster`` starts, once per session, the integration tests' control plane (etcd, kube-apiserver,
kube-controller-manager with the controllers a node needs, kube-scheduler) plus a real node
(``node.RealNode``: containerd, CNI bridge, kubelet, CoreDNS) and imports the images built by
``images/build.sh`` into containerd. ``operator`` installs the Helm chart with the built operator
image: the operator runs as a pod under its ServiceAccount.

A missing piece (docker, the node's binaries, an image, helm, root) skips the tests locally, with
the command that provides it, and FAILS them in CI (``CI=true``) so that a broken build can
never pass as green.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from controlplane import binary_dir, missing_binaries, wait_for
from kubernetes.client.rest import ApiException
from node import RealNode, missing_pieces

REPO = Path(__file__).resolve().parents[2]
IMAGES_ENV = (
    Path(os.environ.get("KUBEARCH_CACHE", Path.home() / ".cache" / "kubearch")) / "images" / "current.env"
)
OPERATOR_NAMESPACE = "kubearch-system"
RELEASE = "kubearch"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.node)


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(missing: list[str], what: str) -> None:
    """Skip (locally) or fail (CI) when something the tests need is missing."""
    if missing:
        message = f"{what}: missing {'; '.join(missing)}"
        if _ci():
            pytest.fail(message)
        pytest.skip(message)


# ------------------------------------------------------------------------------------ images
@dataclass
class Images:
    operator: str
    trainer: str
    docker: str
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.docker, "run", "--rm", *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )


@pytest.fixture(scope="session")
def images() -> Images:
    """The images of the last ``make images`` (tags from ~/.cache/kubearch/images/current.env)."""
    tags = {}
    if IMAGES_ENV.exists():
        for line in IMAGES_ENV.read_text().splitlines():
            key, _, value = line.partition("=")
            tags[key] = value
    # The daemon that built the images (images/build.sh records it).
    docker_host = tags.get("DOCKER_HOST", "unix:///var/lib/kubearch-docker/docker.sock")
    docker = shutil.which("/usr/bin/docker") or shutil.which("docker")
    env = {**os.environ, "DOCKER_HOST": docker_host}
    missing = []
    if docker is None:
        missing.append("docker (bash tests/e2e/setup-docker.sh)")
    elif subprocess.run([docker, "version"], capture_output=True, env=env).returncode != 0:
        missing.append(f"a running dockerd at {docker_host} (bash tests/e2e/setup-docker.sh)")
    for name in ("OPERATOR", "TRAINER"):
        tag = tags.get(f"KUBEARCH_{name}_IMAGE")
        if not tag:
            missing.append(f"the {name.lower()} image (make images)")
        elif (
            docker
            and subprocess.run([docker, "image", "inspect", tag], capture_output=True, env=env).returncode
        ):
            missing.append(f"image {tag} in docker (make images)")
    require(missing, "container images")
    assert docker is not None
    return Images(tags["KUBEARCH_OPERATOR_IMAGE"], tags["KUBEARCH_TRAINER_IMAGE"], docker, env)


# ------------------------------------------------------------------------------------ cluster
KIND_HOSTPATH = Path("/tmp/kubearch-e2e")  # mounted at the same path in kind's node (kind.yaml)


@dataclass
class KindNode:
    """``--cluster`` (``make kind-e2e``): the kind node container stands in for :class:`RealNode`."""

    name: str
    kubeconfig: Path
    kubectl_bin: str

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["docker", "exec", self.name, "ctr", "-n", "k8s.io", *args], capture_output=True, text=True
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} on {self.name} failed:\n{proc.stderr}")
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        return ""


@dataclass
class Cluster:
    """The control plane + the real node (or a kind cluster), with kubectl and python clients."""

    node: RealNode | KindNode
    images: Images
    core: Any = field(init=False)
    custom: Any = field(init=False)
    apps: Any = field(init=False)

    def __post_init__(self) -> None:
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        api = kubernetes.client.ApiClient(cfg)
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.apps = kubernetes.client.AppsV1Api(api)

    @property
    def kubeconfig(self) -> Path:
        return self.node.kubeconfig if isinstance(self.node, KindNode) else self.node.plane.kubeconfig

    @property
    def kubectl_bin(self) -> str:
        return self.node.kubectl_bin if isinstance(self.node, KindNode) else self.node.plane.kubectl

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def cluster(
    images: Images, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if request.config.getoption("--cluster"):  # make kind-e2e: images already `kind load`ed
        kubeconfig = Path(os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")))
        kubectl = shutil.which("kubectl")
        if not kubectl or not kubeconfig.exists():
            pytest.fail(f"--cluster needs kubectl on PATH and a kubeconfig ({kubeconfig})")
        nodes = subprocess.run(
            [kubectl, f"--kubeconfig={kubeconfig}", "get", "nodes", "-o", "name"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if len(nodes) != 1:
            pytest.fail(f"--cluster expects a one-node kind cluster (tests/e2e/kind.yaml), found {nodes}")
        yield Cluster(KindNode(nodes[0].removeprefix("node/"), kubeconfig, kubectl), images)
        return
    missing = [f"{b} in {binary_dir()} (bash tests/controlplane/build.sh)" for b in missing_binaries()]
    missing += [
        f"{b} in {binary_dir()} (bash tests/controlplane/build.sh)"
        for b in missing_binaries(("kube-scheduler",))
    ]
    require(missing + missing_pieces(), "a real node")
    # Short paths: containerd's socket path must stay under the 108-byte limit of unix sockets.
    root = Path(os.environ.get("KUBEARCH_NODE_WORKDIR", "/tmp")) / f"kn-{uuid.uuid4().hex[:6]}"
    plane = RealNode.control_plane(root / "cp")
    node = RealNode(plane, root / "node")
    try:
        plane.start()
        plane.start_scheduler()
        node.start()
        for ref in (images.operator, images.trainer):
            node.import_docker_image(ref, images.docker, images.env)
        yield Cluster(node, images)
    finally:
        node.stop()
        plane.stop()
        for name in ("kubelet", "containerd", "coredns"):
            print(f"\n--- {name} log (tail) ---\n{node.log_tail(name, 15)}")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def operator(cluster: Cluster) -> Iterator[str]:
    """``helm install`` the chart with the built operator image; yields the operator pod's name."""
    from helmbin import helm

    repository, tag = cluster.images.operator.rsplit(":", 1)
    helm(
        "install", RELEASE, str(REPO / "charts" / "kubearch"), "--kubeconfig", str(cluster.kubeconfig),
        "-n", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", f"operator.image.repository={repository}", "--set", f"operator.image.tag={tag}",
        "--set", "operator.image.pullPolicy=Never", "--set", "operator.resyncSeconds=1",
    )  # fmt: skip
    # The garbage collector must watch TrainingRuns: start it once the chart's CRDs exist.
    if isinstance(cluster.node, RealNode):
        cluster.node.plane.start_controller_manager()

    def ready_pod() -> str | None:
        pods = cluster.core.list_namespaced_pod(
            OPERATOR_NAMESPACE, label_selector="app.kubernetes.io/component=operator"
        ).items
        for pod in pods:
            if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
                return pod.metadata.name
        return None

    try:
        name = wait_for(ready_pod, timeout=180, interval=1, what="the operator pod to be Ready")
    except AssertionError as err:
        pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        logs = cluster.kubectl("logs", "-n", OPERATOR_NAMESPACE, "deploy/kubearch", check=False)
        events = cluster.kubectl("get", "events", "-n", OPERATOR_NAMESPACE, check=False).stdout
        raise AssertionError(f"{err}\n{pods}\n{events}\n{logs.stdout}{logs.stderr}") from None
    yield name
    print("\n--- operator log (tail) ---\n" + cluster.kubectl(
        "logs", "-n", OPERATOR_NAMESPACE, name, "--tail=30", check=False).stdout)  # fmt: skip


@pytest.fixture
def host_dir(cluster: Cluster, tmp_path: Path) -> Path:
    """A directory the node can mount as a hostPath and the test can read (kind: a shared mount)."""
    if isinstance(cluster.node, KindNode):
        path = KIND_HOSTPATH / uuid.uuid4().hex[:8]
        path.mkdir(parents=True)
        return path
    return tmp_path


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test (its default ServiceAccount exists before the test starts)."""
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    wait_for(
        lambda: cluster.core.read_namespaced_service_account("default", name),
        timeout=30,
        what="the namespace's default ServiceAccount",
    )
    yield name
    with contextlib.suppress(ApiException):
        cluster.core.delete_namespace(name)
