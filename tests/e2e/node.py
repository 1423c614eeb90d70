"""A real node for the local test cluster: containerd (CRI) + CNI bridge + kubelet + CoreDNS.

The integration tests' control plane (``tests/integration/controlplane.py``) has no kubelet. This
module adds one that runs pods in real containers, so the end-to-end tests exercise images,
cluster DNS, volumes and memory limits as a cluster does. Every piece is a host process started
and stopped by PID; the binaries come from ``tests/e2e/build-node.sh`` (kubelet, CoreDNS, pause)
and Debian's ``docker.io``/``containernetworking-plugins`` packages (containerd, runc, CNI plugins),
installed by ``tests/e2e/setup-docker.sh``.

Layout (the settings are those checked in ``shared/NOTES-k8s.md``):

* **Network.** A Linux bridge ``kubearch0`` with the gateway address ``10.89.0.1/24``, created
  before anything else so that CoreDNS and the kubelet can bind to it. The CNI ``bridge`` plugin
  (+ ``host-local`` IPAM, ``firewall`` so that docker's ``FORWARD DROP`` policy lets pod traffic
  through, ``loopback``) attaches pods to it. The node's InternalIP is the gateway: the API
  server reaches the kubelet there (``kubectl logs``) and pods reach the host there.
* **The API server from pods.** Pods talk to ``kubernetes.default`` = ``10.96.0.1:443``. There is
  no kube-proxy: one iptables DNAT rule maps that address to the API server's port on the gateway
  (the API server then binds 0.0.0.0 and its certificate names both addresses).
* **containerd** with its CRI plugin on its own socket and state directory (not docker's),
  ``restrict_oom_score_adj`` (these machines lack CAP_SYS_RESOURCE: runc could not raise the
  sandbox's oom_score_adj), the cgroupfs driver, and a pause image built here as its sandbox
  image. Its root directory is persistent (``/var/lib/kubearch-node/containerd``) so the 6 GB
  trainer image is imported once per machine, not once per test session.
* **kubelet** with cgroupfs, ``failSwapOn: false``, ``failCgroupV1: false`` (the hosts use cgroup
  v1), ``clusterDNS`` = the gateway, anonymous read access for the API server (test cluster), and
  image GC off so the imported images stay. Its root directory is bind-mounted onto itself by the
  kubelet: ``stop`` unmounts it recursively.
* **CoreDNS** as a host process bound to the gateway, serving ``cluster.local`` from the API
  server (headless Service records need the ``endpointslice`` controller).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane import REPO, ControlPlane, free_port, pinned_version, wait_for

BRIDGE = "kubearch0"
SUBNET = "10.89.0.0/24"
GATEWAY = "10.89.0.1"
API_SERVICE_IP = "10.96.0.1"  # the first address of the control plane's service range
CNI_BIN = Path("/usr/lib/cni")
STATE = Path(os.environ.get("KUBEARCH_NODE_STATE", "/var/lib/kubearch-node"))
PAUSE_IMAGE = "docker.io/kubearch/pause:" + pinned_version()
#: The controllers the real node needs on top of the integration tests' set (the chart installs a
#: Deployment; cluster DNS needs EndpointSlices; projected tokens need kube-root-ca.crt; PVCs bind).
NODE_CONTROLLERS = (
    "endpointslice",
    "root-ca-cert-publisher",
    "persistentvolume-binder",
    "deployment",
    "replicaset",
)
#: Host packages that provide containerd, runc, ctr and the CNI plugins.
HOST_BINARIES = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip")


def node_binary_dir() -> Path:
    override = os.environ.get("KUBEARCH_NODE_DIR")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "kubearch" / "node" / pinned_version()


def missing_pieces() -> list[str]:
    """What a real node still lacks here, each with the command that provides it."""
    missing = []
    d = node_binary_dir()
    for b in ("kubelet", "coredns", "pause"):
        if not os.access(d / b, os.X_OK):
            missing.append(f"{d / b} (bash tests/e2e/build-node.sh)")
    for b in HOST_BINARIES:
        if shutil.which(b) is None:
            missing.append(f"{b} (bash tests/e2e/setup-docker.sh)")
    for plugin in ("bridge", "host-local", "loopback", "firewall"):
        if not (CNI_BIN / plugin).exists():
            missing.append(f"{CNI_BIN / plugin} (bash tests/e2e/setup-docker.sh)")
    if os.geteuid() != 0:
        missing.append("root (containerd and the kubelet need it)")
    return missing


def _run(*args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class RealNode:
    """One kubelet node named ``name`` joined to ``plane`` (which must bind 0.0.0.0)."""

    plane: ControlPlane
    workdir: Path
    name: str = "kubearch-node"
    bin_dir: Path = field(default_factory=node_binary_dir)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    kubelet_port: int = 0
    _dnat: list[str] = field(default_factory=list)

    @staticmethod
    def control_plane(workdir: Path) -> ControlPlane:
        """A control plane a real node can join (see the module docstring)."""
        return ControlPlane(
            workdir,
            bind_address="0.0.0.0",
            advertise_address=GATEWAY,
            extra_sans=(GATEWAY, API_SERVICE_IP),
            extra_controllers=NODE_CONTROLLERS,
        )

    # ------------------------------------------------------------------------------ paths
    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.workdir / "kubelet"

    def ctr(self, *args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        return _run(
            "ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args, check=check, **kwargs
        )

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    # ------------------------------------------------------------------------------ start
    def start(self, timeout: float = 120.0) -> RealNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._network()
        self._start_containerd()
        self._import_pause()
        self._start_coredns()
        self._start_kubelet()
        self.wait_ready(timeout)
        return self

    def _network(self) -> None:
        if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
        addrs = _run("ip", "-4", "addr", "show", BRIDGE).stdout
        if f"{GATEWAY}/" not in addrs:
            _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        # The `kubernetes` Service's address -> the API server (kube-proxy's job, for one Service).
        self._dnat = [
            "PREROUTING", "-d", f"{API_SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
            "-j", "DNAT", "--to-destination", f"{GATEWAY}:{self.plane.api_port}",
        ]  # fmt: skip
        _run("iptables", "-t", "nat", "-I", *self._dnat)
        net_d = self.workdir / "cni" / "net.d"
        net_d.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "kubearch",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                },
                {"type": "firewall"},
            ],
        }
        (net_d / "10-kubearch.conflist").write_text(json.dumps(conflist, indent=2))

    def _start_containerd(self) -> None:
        root = STATE / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "containerd.toml"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(
            f"""version = 2
root = "{root}"
state = "{self.workdir / "containerd-state"}"
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.workdir / "containerd-ttrpc.sock"}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{self.workdir / "cni" / "net.d"}"
"""
        )
        self._spawn("containerd", ["containerd", "--config", str(config)])
        wait_for(
            lambda: self._check_alive() or self.ctr("version", check=False).returncode == 0,
            timeout=30,
            what="containerd's socket",
        )
        # Containers of an earlier session (the root directory persists): none may linger.
        for cid in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            self.ctr("tasks", "delete", "-f", cid, check=False)
            self.ctr("containers", "delete", cid, check=False)

    def has_image(self, ref: str) -> bool:
        ref = ref if ref.count("/") >= 2 else f"docker.io/{ref}"
        return ref in self.ctr("images", "ls", "-q").stdout.split()

    def import_docker_image(self, ref: str, docker: str, docker_env: dict[str, str]) -> None:
        """``docker save REF | ctr -n k8s.io images import -`` unless containerd already has it."""
        if self.has_image(ref):
            return
        save = subprocess.Popen([docker, "save", ref], stdout=subprocess.PIPE, env=docker_env)
        try:
            self.ctr("images", "import", "-", stdin=save.stdout)
        finally:
            assert save.stdout is not None
            save.stdout.close()
            save.wait()
        if save.returncode != 0:
            raise RuntimeError(f"docker save {ref} failed ({save.returncode})")
        # Earlier builds of the same image (another tag of the repository) only take disk space.
        repository = ref.rsplit(":", 1)[0]
        repository = repository if repository.count("/") >= 2 else f"docker.io/{repository}"
        stale = [r for r in self.ctr("images", "ls", "-q").stdout.split() if r.startswith(f"{repository}:")]
        stale = [r for r in stale if r != (ref if ref.count("/") >= 2 else f"docker.io/{ref}")]
        if stale:
            self.ctr("images", "rm", *stale, check=False)

    def _import_pause(self) -> None:
        """The sandbox image: a one-file image of the statically linked pause binary."""
        if self.has_image(PAUSE_IMAGE):
            return
        build = self.workdir / "pause-image"
        shutil.rmtree(build, ignore_errors=True)
        (build / "rootfs").mkdir(parents=True)
        shutil.copy2(self.bin_dir / "pause", build / "rootfs" / "pause")
        _run("tar", "-C", str(build / "rootfs"), "-cf", str(build / "layer.tar"), "pause")
        _oci_archive(build, PAUSE_IMAGE, entrypoint=["/pause"])
        self.ctr("images", "import", str(build / "image.tar"))

    def _start_coredns(self) -> None:
        corefile = self.workdir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {GATEWAY}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.plane.kubeconfig} kubearch-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        self._spawn("coredns", [str(self.bin_dir / "coredns"), "-conf", str(corefile)])

        def answering() -> bool:
            self._check_alive()
            with socket.create_connection((GATEWAY, 53), timeout=1):
                return True

        wait_for(answering, timeout=30, what="CoreDNS on the bridge gateway")

    def _start_kubelet(self) -> None:
        self.kubelet_port = free_port()
        config = self.workdir / "kubelet.yaml"
        config.write_text(
            f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {GATEWAY}
port: {self.kubelet_port}
readOnlyPort: 0
healthzPort: 0
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
clusterDNS: [{GATEWAY}]
clusterDomain: cluster.local
containerRuntimeEndpoint: unix://{self.containerd_socket}
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi"}}
localStorageCapacityIsolation: false
serializeImagePulls: false
resolvConf: {self.workdir / "resolv.conf"}
"""
        )
        (self.workdir / "resolv.conf").write_text(f"nameserver {GATEWAY}\n")
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={self.plane.kubeconfig}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={self.workdir / 'kubelet-pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={GATEWAY}",
                "--node-labels=kubearch.dev/real-node=true",
                "--v=1",
            ],
        )

    def node_ready(self) -> bool:
        self._check_alive()
        out = _run(
            self.plane.kubectl, f"--kubeconfig={self.plane.kubeconfig}", "get", "node", self.name,
            "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False,
        )  # fmt: skip
        return out.stdout.strip() == "True"

    def wait_ready(self, timeout: float) -> None:
        try:
            wait_for(self.node_ready, timeout=timeout, interval=1, what=f"node {self.name} to be Ready")
        except (AssertionError, RuntimeError) as err:
            raise RuntimeError(f"{err}\n--- kubelet ---\n{self.log_tail('kubelet', 60)}") from None

    # ------------------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Kill the pods' containers, stop every process by PID, unmount, undo the network."""
        with contextlib.suppress(Exception):
            self._stop_proc("kubelet")
        if "containerd" in self.procs:
            with contextlib.suppress(Exception):
                for cid in self.ctr("containers", "ls", "-q").stdout.split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
                    self.ctr("tasks", "delete", "-f", cid, check=False)
                    self.ctr("containers", "delete", cid, check=False)
        for name in ("coredns", "containerd"):
            with contextlib.suppress(Exception):
                self._stop_proc(name)
        self._unmount_all()
        if self._dnat:
            _run("iptables", "-t", "nat", "-D", *self._dnat, check=False)
            self._dnat = []
        _run("ip", "link", "delete", BRIDGE, check=False)

    def _stop_proc(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def _unmount_all(self) -> None:
        """Every mount under the work directory (the kubelet's self-bind, pod volumes, shm ...)."""
        for _ in range(3):
            mounts = [
                line.split()[1]
                for line in Path("/proc/self/mounts").read_text().splitlines()
                if line.split()[1].startswith(str(self.workdir))
            ]
            if not mounts:
                return
            for target in sorted(mounts, key=len, reverse=True):
                _run("umount", "-R", "-l", target, check=False)
            time.sleep(0.2)


def _oci_archive(build: Path, ref: str, *, entrypoint: list[str]) -> None:
    """``build/image.tar``: a docker-save style archive of ``build/layer.tar`` (ctr imports it)."""
    layer = (build / "layer.tar").read_bytes()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [ref.removeprefix("docker.io/")], "Layers": ["layer/layer.tar"]}]
    ).encode()
    with tarfile.open(build / "image.tar", "w") as tar:
        for name, data in ((config_name, config), ("manifest.json", manifest), ("layer/layer.tar", layer)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


__all__ = ["GATEWAY", "PAUSE_IMAGE", "REPO", "RealNode", "missing_pieces", "node_binary_dir"]
