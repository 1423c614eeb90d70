"""The operator, unchanged and as a real process, against a real kube-apiserver.

There is no kubelet: the tests play it by writing pod status through the pods' status subresource
(Running, Succeeded, Failed with an exit code and a termination message), then poll the API until
the operator's reaction shows, with a deadline and never a fixed sleep. Runs request GPUs and a
node label no node has, so on a real cluster (``--cluster``) no kubelet ever picks the pods up and
contradicts the status the test writes.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from controlplane import REPO, wait_for
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL = "kubearch.dev", "v1alpha1", "trainingruns"
NEVER_SCHEDULE = {"kubearch.dev/test-only": "never-schedule"}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def spec(nodes: int = 2, **run_policy: Any) -> dict[str, Any]:
    return {
        "model": {"architecture": "dense", "size": "tiny"},
        "training": {"stepsPerEpoch": 10},
        "resources": {"nodes": nodes, "gpusPerNode": 1, "nodeSelector": NEVER_SCHEDULE},
        "runPolicy": {"backoffLimit": 1, **run_policy},
    }


def create_run(kube, ns: str, name: str, body_spec: dict[str, Any]) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": body_spec,
    }
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def get_run(kube, ns: str, name: str) -> dict[str, Any]:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def run_status(kube, ns: str, name: str) -> dict[str, Any]:
    return get_run(kube, ns, name).get("status") or {}


def patch_spec(kube, ns: str, name: str, patch: dict[str, Any]) -> None:
    kube.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": patch})


def pods(kube, ns: str, run: str, *, live: bool = True) -> list[Any]:
    items = kube.core.list_namespaced_pod(ns, label_selector=f"kubearch.dev/run={run}").items
    return sorted(
        (p for p in items if not (live and p.metadata.deletion_timestamp)), key=lambda p: p.metadata.name
    )


def wait_pods(kube, ns: str, run: str, count: int, attempt: int = 0, timeout: float = 30) -> list[Any]:
    def ready() -> list[Any] | None:
        found = pods(kube, ns, run)
        ok = len(found) == count and all(
            p.metadata.labels["kubearch.dev/attempt"] == str(attempt) for p in found
        )
        return found if ok else None

    return wait_for(ready, timeout=timeout, what=f"{count} pod(s) of {run} attempt {attempt}")


def wait_phase(kube, ns: str, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(
        lambda: (s := run_status(kube, ns, name)).get("phase") == phase and s,
        timeout=timeout,
        what=f"{name} to reach phase {phase}",
    )


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def set_pod(kube, ns: str, name: str, phase: str, exit_code: int | None = None, message: str = "") -> None:
    """Play the kubelet: write the pod's phase and its trainer container's state."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if phase == "Running":
        state: dict[str, Any] = {"running": {"startedAt": now}}
    else:
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
        state = {"terminated": {**terminated, "startedAt": now, "finishedAt": now, "message": message}}
    status = {
        "phase": phase,
        "containerStatuses": [
            {
                "name": "trainer",
                "image": "ghcr.io/kubearch/trainer:0.1.0",
                "imageID": "",
                "ready": phase == "Running",
                "restartCount": 0,
                "started": phase == "Running",
                "state": state,
            }
        ],
    }
    kube.core.patch_namespaced_pod_status(name, ns, {"status": status})


def env_of(pod: Any) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env if e.value is not None}


def gone(read: Any, *args: Any) -> bool:
    try:
        read(*args)
    except ApiException as err:
        return err.status == 404
    return False


# ------------------------------------------------------------------------------------------------
# the schema
# ------------------------------------------------------------------------------------------------
BAD_SPECS = [
    ({"model": {"size": "huge"}}, 'Unsupported value: "huge"'),
    # CEL, not an enum: a name that model.plugin's module registers must get through
    ({"model": {"architecture": "gpt5"}}, "spec.model.architecture: Invalid value"),
    ({"resources": {"auto": True, "nodes": 2}}, "auto: true chooses the shape"),
    ({"runPolicy": {"backoffLimit": -1}}, "should be greater than or equal to 0"),
    ({"runPolicy": {"cleanPodPolicy": "Sometimes"}}, 'Unsupported value: "Sometimes"'),
    ({"model": {"colour": "blue"}}, 'unknown field "spec.model.colour"'),
]


@pytest.mark.parametrize(("bad", "expected"), BAD_SPECS, ids=[e for _, e in BAD_SPECS])
def test_api_server_refuses_bad_specs(installed, bad: dict[str, Any], expected: str) -> None:
    doc = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": "bad"},
        "spec": bad,
    }
    proc = installed.kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-", stdin=yaml.safe_dump(doc), check=False
    )
    assert proc.returncode != 0, proc.stdout
    assert expected in proc.stderr


def test_every_example_is_accepted_by_the_schema(installed, namespace: str) -> None:
    proc = installed.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(REPO / "examples"))
    assert proc.stdout.count("created (server dry run)") == len(list((REPO / "examples").glob("*.yaml")))


def test_every_manifest_is_accepted(installed, operator) -> None:
    """namespace, CRD, RBAC and peering are applied by the fixtures; the Deployment is checked too."""
    proc = installed.kubectl("apply", "--dry-run=server", "-f", str(REPO / "manifests"))
    assert (
        "deployment.apps/kubearch-operator" in proc.stdout
        and "service/kubearch-operator-metrics" in proc.stdout
    )


# ------------------------------------------------------------------------------------------------
# the operator
# ------------------------------------------------------------------------------------------------
def test_dense_example_creates_the_group_and_status_follows_pods(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "dense-small"
    installed.kubectl("apply", "-n", ns, "-f", str(REPO / "examples" / "trainingrun-dense.yaml"))
    master, worker = wait_pods(kube, ns, run, 2)
    uid = get_run(kube, ns, run)["metadata"]["uid"]

    assert [master.metadata.name, worker.metadata.name] == [f"{run}-master-0", f"{run}-worker-1"]
    for index, pod in enumerate((master, worker)):
        env = env_of(pod)
        assert env["WORLD_SIZE"] == "8" and env["NNODES"] == "2" and env["NPROC_PER_NODE"] == "4"
        assert env["NODE_RANK"] == env["PET_NODE_RANK"] == str(index)
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == f"{run}-master-0.{run}.{ns}.svc"
        assert "RANK" not in env  # torchrun sets RANK per process
        container = pod.spec.containers[0]
        assert container.command == ["torchrun"]
        assert f"--node-rank={index}" in container.args and "--nproc-per-node=4" in container.args
        assert container.resources.limits["nvidia.com/gpu"] == "4"
        assert pod.spec.init_containers[0].name == "wait-for-master"
        assert pod.spec.hostname == pod.metadata.name and pod.spec.subdomain == run
        assert pod.metadata.labels["kubearch.dev/role"] == ("master" if index == 0 else "worker")
        (owner,) = pod.metadata.owner_references
        assert (owner.kind, owner.uid, owner.controller) == ("TrainingRun", uid, True)
    svc = kube.core.read_namespaced_service(run, ns)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
    assert svc.metadata.owner_references[0].uid == uid
    config = yaml.safe_load(kube.core.read_namespaced_config_map(f"{run}-config", ns).data["config.yaml"])
    assert config["training"]["batchSize"] == 256 and config["training"]["useAmp"] is True
    status = wait_phase(kube, ns, run, "Created")
    assert status["chosenShape"]["gpus"] == 8 and status["chosenShape"]["source"] == "auto"
    assert "> 10M" in status["chosenShape"]["reason"]

    for pod in (master, worker):
        set_pod(kube, ns, pod.metadata.name, "Running")
    status = wait_phase(kube, ns, run, "Running")
    assert cond(status, "Running")["status"] == "True"
    assert status["replicaStatuses"]["Worker"]["active"] == 1
    table = installed.kubectl("get", "tr", run, "-n", ns).stdout
    assert all(word in table for word in ("ARCHITECTURE", "dense", "small", "8", "Running"))

    summary = {"status": "completed", "exit_code": 0, "steps": 2000, "final_train_loss": 1.25}
    summary |= {"final_val_loss": 1.4, "tokens_per_second": 5120.0}  # the trainer's summary keys
    set_pod(kube, ns, master.metadata.name, "Succeeded", 0, json.dumps(summary))
    status = wait_phase(kube, ns, run, "Succeeded")
    assert status["progress"] == {"step": 2000, "loss": 1.25, "tokensPerSecond": 5120.0}
    assert status["metrics"]["final_val_loss"] == 1.4 and status["completionTime"]
    # cleanPodPolicy Running: the still-running worker goes, the finished master stays for its logs.
    wait_for(lambda: [p.metadata.name for p in pods(kube, ns, run)] == [master.metadata.name], what="cleanup")
    text = operator.metrics()
    assert (
        "kubearch_operator_pod_creations_total" in text
        and "kubearch_operator_reconcile_duration_seconds" in text
    )


def test_failure_restarts_the_whole_group_until_backoff_limit(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "restarts"
    create_run(kube, ns, run, spec(nodes=2))
    first = wait_pods(kube, ns, run, 2)
    set_pod(kube, ns, f"{run}-worker-1", "Failed", 137)  # SIGKILL: preempted, retryable
    second = wait_pods(kube, ns, run, 2, attempt=1)
    assert not {p.metadata.uid for p in first} & {p.metadata.uid for p in second}, "the master restarted too"
    status = wait_for(lambda: (s := run_status(kube, ns, run)).get("restartCount") == 1 and s, what="restart")
    assert cond(status, "Restarting")["reason"] == "Signal9"
    config = yaml.safe_load(kube.core.read_namespaced_config_map(f"{run}-config", ns).data["config.yaml"])
    assert config["training"]["resume"] is True  # the new group continues from the checkpoint

    set_pod(kube, ns, f"{run}-master-0", "Failed", 1)
    status = wait_phase(kube, ns, run, "Failed")
    assert cond(status, "Failed")["reason"] == "BackoffLimitExceeded" and status["restartCount"] == 1
    wait_for(lambda: [p.metadata.name for p in pods(kube, ns, run)] == [f"{run}-master-0"], what="cleanup")

    # Deleting the run cascades to everything it owns (garbage collector + ownerReferences).
    installed.kubectl("delete", "tr", run, "-n", ns, "--wait=false")
    wait_for(lambda: not pods(kube, ns, run, live=False), timeout=40, what="pods garbage-collected")
    wait_for(lambda: gone(kube.core.read_namespaced_service, run, ns), timeout=40, what="service collected")
    wait_for(
        lambda: gone(kube.core.read_namespaced_config_map, f"{run}-config", ns),
        timeout=40,
        what="cm collected",
    )


def test_permanent_exit_code_fails_at_once(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "config-error"
    create_run(kube, ns, run, spec(nodes=2, backoffLimit=3, cleanPodPolicy="All"))
    wait_pods(kube, ns, run, 2)
    set_pod(kube, ns, f"{run}-worker-1", "Failed", 64)  # CONFIG_ERROR: never retried
    status = wait_phase(kube, ns, run, "Failed")
    assert cond(status, "Failed")["reason"] == "ConfigError" and status["restartCount"] == 0
    wait_for(lambda: not pods(kube, ns, run), what="cleanPodPolicy All")


def test_suspend_deletes_pods_and_resume_recreates_them(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "pausable"
    create_run(kube, ns, run, spec(nodes=2))
    wait_pods(kube, ns, run, 2)
    patch_spec(kube, ns, run, {"runPolicy": {"suspend": True}})
    status = wait_phase(kube, ns, run, "Suspended")
    wait_for(lambda: not pods(kube, ns, run), what="pods deleted on suspend")
    assert cond(status, "Suspended")["status"] == "True" and "startTime" not in status

    patch_spec(kube, ns, run, {"runPolicy": {"suspend": False}})
    wait_pods(kube, ns, run, 2)
    status = wait_phase(kube, ns, run, "Created")
    assert cond(status, "Suspended")["reason"] == "Resumed"
    config = yaml.safe_load(kube.core.read_namespaced_config_map(f"{run}-config", ns).data["config.yaml"])
    assert config["training"]["resume"] is True


def test_active_deadline_fails_the_run(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "deadline"
    create_run(kube, ns, run, spec(nodes=1, activeDeadlineSeconds=2))
    wait_pods(kube, ns, run, 1)
    status = wait_phase(kube, ns, run, "Failed", timeout=20)
    assert cond(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not pods(kube, ns, run), what="running pods cleaned")


def test_ttl_deletes_the_finished_run_and_its_children(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "short-lived"
    create_run(kube, ns, run, spec(nodes=1, ttlSecondsAfterFinished=1, cleanPodPolicy="None"))
    wait_pods(kube, ns, run, 1)
    set_pod(kube, ns, f"{run}-master-0", "Succeeded", 0)
    wait_for(lambda: gone(get_run, kube, ns, run), timeout=30, what="TTL deletion")
    wait_for(lambda: not pods(kube, ns, run, live=False), timeout=40, what="pods garbage-collected")


def test_rejected_update_keeps_pods_running(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "guarded"
    create_run(kube, ns, run, spec(nodes=2))
    before = {p.metadata.uid for p in wait_pods(kube, ns, run, 2)}
    # Schema-valid, but the model rule (heads divide the width) refuses it.
    patch_spec(kube, ns, run, {"model": {"dModel": 100, "nHeads": 3}})
    status = wait_for(
        lambda: (s := run_status(kube, ns, run)) and cond(s, "SpecValid")["status"] == "False" and s,
        what="SpecValid=False",
    )
    assert "divisible" in cond(status, "SpecValid")["message"]
    assert {p.metadata.uid for p in pods(kube, ns, run)} == before


def test_operator_restart_creates_no_duplicates(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "survivor"
    create_run(kube, ns, run, spec(nodes=2))
    before = {p.metadata.uid for p in wait_pods(kube, ns, run, 2)}
    operator.stop(signal.SIGKILL)  # a crash: no graceful shutdown
    operator.start()
    for name in (f"{run}-master-0", f"{run}-worker-1"):
        set_pod(kube, ns, name, "Running")
    wait_phase(kube, ns, run, "Running")  # the new process reconciles the run ...
    after = pods(kube, ns, run)
    assert {p.metadata.uid for p in after} == before  # ... and re-created nothing
