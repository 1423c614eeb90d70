"""End to end on a real node: the chart's operator pod runs TrainingRuns whose pods are real
containers of the trainer image, started by a kubelet through containerd.

What this covers that the process kubelet (tests/integration/process_kubelet.py) cannot: the
images, the operator under its ServiceAccount inside the cluster, cluster DNS for the rendezvous
(the ``wait-for-master`` init container really waits for the headless Service's record), pod IPs,
volumes (a PersistentVolume with the training text and the checkpoints), and a memory limit
enforced by the kernel (OOMKilled).
"""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import wait_for

GROUP, VERSION, PLURAL = "kubearch.dev", "v1alpha1", "trainingruns"
TRAIN_TIMEOUT = 300  # seconds for one group to start and train on a loaded 2-core machine
METRICS_PORT = 9090
DATA_PATH = "/checkpoints/data/corpus.txt"


def tiny_spec(trainer_image: str, steps: int, **extra: Any) -> dict[str, Any]:
    """A two-pod CPU run of a tiny dense model over gloo, from the built trainer image."""
    spec: dict[str, Any] = {
        "model": {"architecture": "dense", "size": "tiny", "dModel": 64, "nLayers": 2, "nHeads": 4,
                  "dFf": 128, "maxSeqLen": 64},
        "data": {"seqLen": 64},
        "training": {"stepsPerEpoch": steps, "batchSize": 4, "warmupSteps": 2, "evalEvery": 0,
                     "evalBatches": 2, "logEvery": 2, "device": "cpu"},
        "resources": {"nodes": 2, "gpusPerNode": 0, "nprocPerNode": 1, "image": trainer_image,
                      "imagePullPolicy": "Never", "shmSize": "64Mi"},
        "runPolicy": {"backoffLimit": 1, "cleanPodPolicy": "None"},
    }  # fmt: skip
    for section, values in extra.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def apply_run(cluster, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": spec,
    }
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(body))


def run_status(cluster, ns: str, name: str) -> dict[str, Any]:
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}


def diagnostics(cluster, ns: str) -> str:
    """Pods, events and every container's log of the namespace, for assertion messages."""
    out = [cluster.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False).stdout]
    out.append(cluster.kubectl("get", "events", "-n", ns, check=False).stdout[-3000:])
    for pod in cluster.core.list_namespaced_pod(ns).items:
        for c in ["wait-for-master", "trainer"]:
            logs = cluster.kubectl("logs", "-n", ns, pod.metadata.name, "-c", c, "--tail=40", check=False)
            out.append(f"--- {pod.metadata.name}/{c} ---\n{logs.stdout}{logs.stderr}")
    return "\n".join(out)


def wait_phase(cluster, ns: str, name: str, phases: tuple[str, ...], timeout: float = TRAIN_TIMEOUT) -> dict:
    try:
        return wait_for(
            lambda: (s := run_status(cluster, ns, name)).get("phase") in phases and s,
            timeout=timeout,
            interval=1,
            what=f"{name} to reach phase {' or '.join(phases)}",
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnostics(cluster, ns)}") from None


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def local_volume(cluster, ns: str, claim: str, path: Path) -> None:
    """A hostPath PersistentVolume pre-bound to claim ``claim`` (the PV controller binds them)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)  # the trainer runs as uid 65532
    pv = {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-{claim}"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "kubearch-local",
                 "hostPath": {"path": str(path), "type": "Directory"},
                 "claimRef": {"namespace": ns, "name": claim}},
    }  # fmt: skip
    pvc = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": ns},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "kubearch-local",
                 "volumeName": f"{ns}-{claim}", "resources": {"requests": {"storage": "1Gi"}}},
    }  # fmt: skip
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([pv, pvc]))
    wait_for(
        lambda: cluster.core.read_namespaced_persistent_volume_claim(claim, ns).status.phase == "Bound",
        timeout=60,
        what=f"claim {claim} to be Bound",
    )


def write_corpus(path: Path) -> str:
    """Made-up text (a seeded word salad): enough tokens for train and validation splits."""
    rng = random.Random(7)
    words = [
        "the",
        "node",
        "runs",
        "a",
        "pod",
        "whose",
        "trainer",
        "reads",
        "text",
        "from",
        "a",
        "volume",
        "and",
        "learns",
        "it",
    ]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.parent.chmod(0o777)
    return text


def test_operator_runs_as_a_pod_under_its_service_account(cluster, operator) -> None:
    pod = cluster.core.read_namespaced_pod(operator, "kubearch-system")
    assert pod.spec.node_name == cluster.node.name
    assert pod.status.container_statuses[0].image_id  # containerd ran the imported image
    assert pod.status.container_statuses[0].restart_count == 0
    account = cluster.core.read_namespaced_service_account(pod.spec.service_account_name, "kubearch-system")
    assert account.metadata.labels["app.kubernetes.io/managed-by"] == "Helm"
    # The operator talks to the API server under that account from inside the cluster: kopf
    # records itself as a peer in the chart's ClusterKopfPeering.
    peers = wait_for(
        lambda: cluster.custom.get_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", "kubearch"
        ).get("status"),
        timeout=60,
        what="the operator's entry in its ClusterKopfPeering",
    )
    assert any(operator in peer for peer in peers), peers  # keys: <peering>@<pod name>/<start>/...


def test_two_containers_rendezvous_over_cluster_dns_train_on_volume_data_and_succeed(
    cluster, operator, namespace, host_dir: Path
) -> None:
    run = "dns-ok"
    volume = host_dir / "pv"
    local_volume(cluster, namespace, "ckpt", volume)
    local_volume(cluster, namespace, "corpus", host_dir / "corpus")
    write_corpus(host_dir / "corpus" / "corpus.txt")
    spec = tiny_spec(
        cluster.images.trainer,
        steps=40,
        data={"path": "/data/corpus.txt"},
        training={"metricsPort": METRICS_PORT},
        resources={"checkpointClaim": "ckpt"},
    )
    # The training text comes from its own claim, mounted by the cluster user's pod template.
    spec["podTemplate"] = {
        "metadata": {"labels": {"team": "e2e"}},
        "spec": {
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "corpus", "readOnly": True}}],
            "containers": [
                {
                    "name": "trainer",
                    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
                }
            ],
        },
    }
    apply_run(cluster, namespace, run, spec)

    # While it trains: the trainer's metrics endpoint answers on the master pod's IP.
    def scrape() -> str | None:
        pod = cluster.core.read_namespaced_pod(f"{run}-master-0", namespace)
        if not pod.status.pod_ip or pod.status.phase != "Running":
            return None
        url = f"http://{pod.status.pod_ip}:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=3) as response:
            text = response.read().decode()
        return text if "kubearch_tokens_total" in text else None

    try:
        metrics = wait_for(
            scrape, timeout=TRAIN_TIMEOUT, interval=1, what="the trainer's metrics on the pod IP"
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnostics(cluster, namespace)}") from None
    assert 'run="dns-ok"' in metrics or "dns-ok" in metrics, metrics[:2000]

    status = wait_phase(cluster, namespace, run, ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", f"{status}\n{diagnostics(cluster, namespace)}"
    assert status["restartCount"] == 0
    # The results the trainer wrote onto the volume are what status reports.
    results = json.loads((volume / run / "results.json").read_text())
    assert results["status"] == "completed" and results["world_size"] == 2 and results["steps"] == 40
    assert status["progress"]["step"] == 40
    assert status["progress"]["loss"] == pytest.approx(results["final_train_loss"])
    # The worker found the master by its DNS name, through CoreDNS and the headless Service.
    worker_pod = cluster.core.read_namespaced_pod(f"{run}-worker-1", namespace)
    assert (
        worker_pod.status.pod_ip
        != cluster.core.read_namespaced_pod(f"{run}-master-0", namespace).status.pod_ip
    )
    wait_log = cluster.kubectl("logs", "-n", namespace, f"{run}-worker-1", "-c", "wait-for-master").stdout
    assert f"{run}-master-0.{run}.{namespace}.svc" in wait_log and "resolves" in wait_log, wait_log
    # The text came from the volume (the trainer names its data source), and DDP had 2 ranks.
    master_log = cluster.kubectl("logs", "-n", namespace, f"{run}-master-0", "-c", "trainer").stdout
    assert "/data/corpus.txt" in master_log and "device cpu x2" in master_log, master_log[-3000:]
    assert worker_pod.metadata.labels["team"] == "e2e"


def test_killing_the_master_container_restarts_the_group_which_resumes_from_the_pvc(
    cluster, operator, namespace, host_dir: Path
) -> None:
    run, steps = "resume", 60
    volume = host_dir / "pv"
    local_volume(cluster, namespace, "ckpt", volume)
    write_corpus(volume / "data" / "corpus.txt")
    spec = tiny_spec(
        cluster.images.trainer,
        steps=steps,
        data={"path": DATA_PATH},
        training={"checkpointEvery": 4},
        resources={"checkpointClaim": "ckpt"},
    )
    apply_run(cluster, namespace, run, spec)
    checkpoint = volume / run / "checkpoint.pt"
    try:
        wait_for(
            checkpoint.exists, timeout=TRAIN_TIMEOUT, interval=0.5, what=f"a first checkpoint {checkpoint}"
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnostics(cluster, namespace)}") from None
    master = cluster.core.read_namespaced_pod(f"{run}-master-0", namespace)
    container_id = master.status.container_statuses[0].container_id.removeprefix("containerd://")
    cluster.node.ctr("tasks", "kill", "-s", "SIGKILL", container_id)  # like the OOM killer would
    status = wait_phase(cluster, namespace, run, ("Succeeded", "Failed"), timeout=2 * TRAIN_TIMEOUT)
    assert status["phase"] == "Succeeded", f"{status}\n{diagnostics(cluster, namespace)}"
    assert status["restartCount"] == 1
    events = cluster.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={run}")
    restarts = [e.message for e in events.items if e.reason == "Restarting"]
    assert len(restarts) == 1 and "137" in restarts[0], restarts
    resumed = cluster.kubectl("logs", "-n", namespace, f"{run}-master-0", "-c", "trainer").stdout
    marker = "kubearch: resumed from "
    assert marker in resumed, resumed[-3000:]
    step = int(resumed.split(marker, 1)[1].split(" at step ", 1)[1].split()[0].rstrip(".,"))
    assert 0 < step < steps
    assert status["progress"]["step"] == steps


def test_a_memory_limit_the_trainer_exceeds_is_oomkilled_and_fails_the_run_without_retries(
    cluster, operator, namespace
) -> None:
    run = "oom"
    # 200Mi: importing torch alone takes more, so the kernel kills the container early.
    spec = tiny_spec(cluster.images.trainer, steps=20, resources={"memory": "200Mi"})
    spec["runPolicy"]["backoffLimit"] = 3  # retries allowed, yet an OOM must not use them
    apply_run(cluster, namespace, run, spec)
    status = wait_phase(cluster, namespace, run, ("Succeeded", "Failed"))
    assert status["phase"] == "Failed", f"{status}\n{diagnostics(cluster, namespace)}"
    assert status["restartCount"] == 0
    failed = condition(status, "Failed")
    assert failed["reason"] == "OOMKilled", failed
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"kubearch.dev/run={run}").items
    reasons = {
        p.metadata.name: (p.status.container_statuses or [None])[0] and p.status.container_statuses[0].state
        for p in pods
    }
    assert any(
        s is not None and s.terminated is not None and s.terminated.reason == "OOMKilled"
        for s in reasons.values()
    ), reasons
