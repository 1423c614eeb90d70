"""A local control plane for the integration tests: etcd + kube-apiserver (+ kube-controller-manager).

The binaries come from ``tests/controlplane/build.sh`` (built from source, cached under
``~/.cache/kubearch/controlplane/<version>/``). Everything listens on free loopback ports, keeps
its state in a temporary directory and is stopped by PID. There is no kubelet and no scheduler:
pods are stored but never run, so the tests play the kubelet by writing pod status themselves.

* TLS: a throw-away CA and a serving certificate for 127.0.0.1/localhost (python ``cryptography``).
* Authentication: a static admin token (``--token-auth-file``, group ``system:masters``) and
  service-account tokens signed with a generated key, so the operator can run as the
  ServiceAccount of ``manifests/rbac.yaml`` and the tests check its ClusterRole really suffices.
* Authorization: RBAC, as in a real cluster.
* kube-controller-manager runs only the garbage collector (ownerReference cascade), the namespace
  controller (namespace deletion), the service-account controller (``default`` accounts) and the
  node-lifecycle controller (lifts the not-ready taint off KWOK's fake nodes once they are Ready).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
GO_MOD = REPO / "tests" / "controlplane" / "go.mod"
T = TypeVar("T")
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
#: Needed only by the fake-node tests (tests/integration/test_operator_kwok.py).
SCHEDULING_BINARIES = ("kube-scheduler", "kwok")


def pinned_version() -> str:
    match = re.search(r"^\s*k8s\.io/kubernetes\s+(v\S+)", GO_MOD.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"{GO_MOD} does not pin k8s.io/kubernetes")
    return match.group(1)


def binary_dir() -> Path:
    override = os.environ.get("KUBEARCH_CONTROLPLANE_DIR")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "kubearch" / "controlplane" / pinned_version()


def missing_binaries(names: tuple[str, ...] = BINARIES) -> list[str]:
    d = binary_dir()
    return [b for b in names if not os.access(d / b, os.X_OK)]


def wait_for(fn: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.2, what: str = "") -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
            last = value
        except Exception as err:  # API errors, missing keys: not there yet
            value, last = None, err
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}; last: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_pki(d: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """CA, serving cert for the API server (127.0.0.1 + ``extra_ips``), and the service-account key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem_key(k: rsa.RSAPrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    now = dt.datetime.now(dt.UTC)
    ca_key, srv_key, sa_key = key(), key(), key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubearch-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    srv = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "apiserver.crt").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    (d / "apiserver.key").write_bytes(pem_key(srv_key))
    (d / "sa.key").write_bytes(pem_key(sa_key))
    (d / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, user: str = "admin") -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: kubearch-test
  cluster:
    server: {server}
    certificate-authority: {ca_file}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: kubearch-test
  context:
    cluster: kubearch-test
    user: {user}
current-context: kubearch-test
"""
    )
    return path


@dataclass
class ControlPlane:
    workdir: Path
    bin_dir: Path = field(default_factory=binary_dir)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    api_port: int = 0
    token: str = "kubearch-admin-token"
    #: A real node (tests/e2e/node.py) needs pods to reach the API server: it binds 0.0.0.0,
    #: advertises the node's bridge address and adds that and the ``kubernetes`` Service's IP to
    #: the certificate. It also needs more controllers (endpointslice for cluster DNS, ...).
    bind_address: str = "127.0.0.1"
    advertise_address: str = "127.0.0.1"
    extra_sans: tuple[str, ...] = ()
    extra_controllers: tuple[str, ...] = ()
    _apiserver_args: list[str] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def kubectl(self) -> str:
        return str(self.bin_dir / "kubectl")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(
            [str(self.bin_dir / name), *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def start(self, timeout: float = 90.0) -> ControlPlane:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        _write_pki(pki, self.extra_sans)
        etcd_port, peer_port = free_port(), free_port()
        self.api_port = free_port()
        self._etcd_args = [
            "--name=kubearch-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=kubearch-test=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",  # test data: speed over durability
            "--log-level=warn",
        ]
        self._spawn("etcd", self._etcd_args)
        (pki / "tokens.csv").write_text(f"{self.token},admin,admin-uid,system:masters\n")
        self._apiserver_args = [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--bind-address={self.bind_address}",
            f"--advertise-address={self.advertise_address}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            f"--cert-dir={self.workdir / 'certs'}",
            "--v=0",
        ]
        self._spawn("kube-apiserver", self._apiserver_args)
        write_kubeconfig(self.kubeconfig, self.server, pki / "ca.crt", self.token)
        self._wait_ready(timeout)
        return self

    def restart_apiserver(self, down_seconds: float, timeout: float = 90.0) -> None:
        """An outage: stop kube-apiserver, keep it down ``down_seconds``, start it again on the same
        port with the same etcd (clients see connection refused meanwhile)."""
        self.stop_process("kube-apiserver")
        time.sleep(down_seconds)  # the length of the outage itself, not a wait for a condition
        self._spawn("kube-apiserver", self._apiserver_args)
        self._wait_ready(timeout)
        self._wait_controllers_back(timeout)

    def restart_etcd(self, down_seconds: float, timeout: float = 90.0) -> None:
        """An etcd outage under a running kube-apiserver: stop etcd, keep it down ``down_seconds``,
        start it again on the same ports and data (the API server answers errors meanwhile, its
        watch caches stall), then wait until the API server reports ready again."""
        self.stop_process("etcd")
        time.sleep(down_seconds)  # the length of the outage itself, not a wait for a condition
        self._spawn("etcd", self._etcd_args)
        self._wait_ready(timeout)
        self._wait_controllers_back(timeout)

    def _wait_controllers_back(self, timeout: float) -> None:
        """After an outage client-go's reflectors reconnect with back-off (measured: a new
        namespace got its ``default`` ServiceAccount only 39 s after the API server returned) and
        the garbage collector keeps GETting owners its stale graph lost, so the tests that follow
        would race (and count the requests of) a controller-manager catching up. The outage is the
        operator's test, not the controller-manager's: start a fresh one, and wait until its
        service-account controller serves (a probe namespace gets its account)."""
        if "kube-controller-manager" not in self.procs:
            return
        self.stop_process("kube-controller-manager")
        self.start_controller_manager()
        probe = f"outage-probe-{os.getpid()}-{int(time.monotonic() * 1000)}"
        kubectl = [self.kubectl, f"--kubeconfig={self.kubeconfig}"]
        subprocess.run([*kubectl, "create", "namespace", probe], check=True, capture_output=True)
        wait_for(
            lambda: (
                subprocess.run(
                    [*kubectl, "get", "serviceaccount", "default", "-n", probe], capture_output=True
                ).returncode
                == 0
            ),
            timeout=timeout,
            what="the restarted controller-manager to serve (a probe namespace's account)",
        )
        subprocess.run([*kubectl, "delete", "namespace", probe, "--wait=false"], capture_output=True)

    def start_controller_manager(self) -> None:
        """Start after the CRDs are installed: the garbage collector then watches TrainingRuns at
        once instead of at its next discovery resync (30 s later)."""
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--controllers="
                + ",".join(
                    (
                        "garbagecollector",
                        "namespace",
                        "serviceaccount",
                        "nodelifecycle",
                        *self.extra_controllers,
                    )
                ),
                f"--root-ca-file={self.workdir / 'pki' / 'ca.crt'}",
                "--leader-elect=false",
                "--secure-port=0",
                "--concurrent-gc-syncs=5",
                "--v=0",
            ],
        )

    def start_scheduler(self) -> None:
        """kube-scheduler: binds pods to (fake) nodes by their resources, selectors and taints."""
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=0",
            ],
        )

    def start_kwok(self) -> None:
        """KWOK plays the kubelet of nodes annotated ``kwok.x-k8s.io/node=fake``: marks them Ready,
        moves pods bound to them to Running and finishes their graceful deletion."""
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-lease-duration-seconds=40",
                "--cidr=10.244.0.1/24",
                "--node-ip=10.244.0.1",
            ],
        )

    def stop_process(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def _wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.workdir / "pki" / "ca.crt"))
        request = urllib.request.Request(
            f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}
        )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError as err:  # connection refused, 500 while post-start hooks run, ...
                last = str(err)
            time.sleep(0.3)
        raise RuntimeError(
            f"kube-apiserver not ready after {timeout}s ({last}):\n{self.log_tail('kube-apiserver')}"
        )

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop_process(name)

    def versions(self) -> dict[str, str]:
        out = {}
        for b in ("kube-apiserver", "etcd"):
            text = subprocess.run([str(self.bin_dir / b), "--version"], capture_output=True, text=True).stdout
            out[b] = text.splitlines()[0] if text else "?"
        return out


def cleanup_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    """``python tests/integration/controlplane.py [--workdir DIR]``: a local control plane for a demo
    or for ``pytest --cluster``; prints the KUBECONFIG to export and runs until interrupted."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir", type=Path, default=None, help="state directory (default: a temp dir)")
    args = parser.parse_args()
    missing = missing_binaries()
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)} in {binary_dir()}: run bash tests/controlplane/build.sh"
        )
    plane = ControlPlane(args.workdir or Path(tempfile.mkdtemp(prefix="kubearch-cp-")))
    try:
        plane.start()
        plane.start_controller_manager()
        print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
        print(f"export PATH={plane.bin_dir}:$PATH   # kubectl {pinned_version()}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        plane.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
