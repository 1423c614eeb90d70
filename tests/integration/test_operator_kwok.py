"""Scheduling for real: kube-scheduler + KWOK fake GPU nodes (local control plane only).

The other integration tests keep pods unscheduled and write their status themselves. Here
kube-scheduler binds the pods to two fake nodes with ``nvidia.com/gpu: 4`` each, and KWOK plays
their kubelets (Ready nodes, Running pods, graceful deletion finished), so the operator sees the
pod lifecycle a cluster produces. Still no containers: the exit of the trainer is written by the
test, as KWOK has nothing to run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from controlplane import SCHEDULING_BINARIES, binary_dir, missing_binaries, wait_for
from test_operator_integration import (
    cond,
    create_run,
    pods,
    run_status,
    set_pod,
    wait_phase,
)

T = TypeVar("T")
GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
NODES = ("gpu-node-0", "gpu-node-1")


def fake_node(name: str) -> dict:
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "4"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "nvidia.com/gpu.product": GPU_PRODUCT,
            },
        },
        "status": {"allocatable": resources, "capacity": resources, "phase": "Running"},
    }


@pytest.fixture(scope="module")
def gpu_nodes(installed, operator) -> Iterator[tuple[str, ...]]:
    plane = installed.local
    if plane is None:
        pytest.skip("fake KWOK nodes are started with the local control plane only (not with --cluster)")
    missing = missing_binaries(SCHEDULING_BINARIES)
    if missing:
        message = f"{', '.join(missing)} missing in {binary_dir()}: run `bash tests/controlplane/build.sh`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    plane.start_scheduler()
    plane.start_kwok()
    for name in NODES:
        installed.core.create_node(fake_node(name))
    wait_for(
        lambda: all(
            cond(
                {"conditions": [c.to_dict() for c in installed.core.read_node(n).status.conditions or []]},
                "Ready",
            )["status"]
            == "True"
            for n in NODES
        ),
        timeout=30,
        what="KWOK to mark the fake nodes Ready",
    )
    try:
        yield NODES
    finally:
        for name in NODES:
            installed.core.delete_node(name)
        plane.stop_process("kwok")
        plane.stop_process("kube-scheduler")


def observe(sample: Callable[[], T], seconds: float, interval: float = 0.2) -> list[T]:
    """Samples of ``sample()`` over a window: for claims that something *never* happens."""
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.append(sample())
        time.sleep(interval)
    return out


def gpu_spec(nodes: int) -> dict:
    return {
        "model": {"architecture": "dense", "size": "tiny"},
        "resources": {"nodes": nodes, "gpusPerNode": 4, "gpuType": GPU_PRODUCT},
        "runPolicy": {"backoffLimit": 0},
    }


def test_group_is_scheduled_one_pod_per_gpu_node_and_runs(installed, gpu_nodes, namespace: str) -> None:
    kube, ns, run = installed, namespace, "scheduled"
    create_run(kube, ns, run, gpu_spec(nodes=2))
    placed = wait_for(
        lambda: (
            (found := pods(kube, ns, run))
            and len(found) == 2
            and all(p.spec.node_name for p in found)
            and found
        ),
        what="both pods bound to nodes",
    )
    assert sorted(p.spec.node_name for p in placed) == list(gpu_nodes)  # 4 GPUs each: one pod per node
    status = wait_phase(kube, ns, run, "Running")  # KWOK, not the test, made the pods Running
    assert status["replicaStatuses"]["Master"]["active"] == 1
    set_pod(kube, ns, f"{run}-master-0", "Succeeded", 0, '{"steps": 10, "final_train_loss": 3.0}')
    wait_phase(kube, ns, run, "Succeeded")
    # cleanPodPolicy Running deletes the bound worker; KWOK finishes its graceful deletion.
    wait_for(
        lambda: not any(p.metadata.name.endswith("worker-1") for p in pods(kube, ns, run, live=False)),
        what="worker gone",
    )


def test_a_group_larger_than_the_cluster_waits_unscheduled(installed, gpu_nodes, namespace: str) -> None:
    kube, ns, run = installed, namespace, "too-big"
    create_run(kube, ns, run, gpu_spec(nodes=3))  # 12 GPUs asked, 8 exist
    found = wait_for(
        lambda: (
            (f := pods(kube, ns, run)) and len(f) == 3 and sum(bool(p.spec.node_name) for p in f) == 2 and f
        ),
        what="two of three pods bound",
    )
    (pending,) = [p for p in found if not p.spec.node_name]
    scheduled = wait_for(
        lambda: next(
            (
                c
                for c in kube.core.read_namespaced_pod(pending.metadata.name, ns).status.conditions or []
                if c.type == "PodScheduled"
            ),
            None,
        ),
        what="the scheduler's verdict",
    )
    assert scheduled.status == "False" and scheduled.reason == "Unschedulable"
    assert "nvidia.com/gpu" in scheduled.message
    # Without a gang scheduler the group cannot start: the run stays Created, never Running.
    # KWOK runs the two bound pods; once the operator has counted all three (two running, one
    # pending) the run must still be Created. A Running phase would have left a Running condition
    # behind (conditions are history), so "never Running" is checked on every sample of a window
    # of several resyncs and pod events, not only on the phase a wait already waited for.
    wait_for(
        lambda: all(p.status.phase == "Running" for p in pods(kube, ns, run) if p.spec.node_name),
        what="KWOK to run the two bound pods",
    )
    wait_for(
        lambda: (
            sum(r.get("active", 0) for r in run_status(kube, ns, run).get("replicaStatuses", {}).values())
            == 3
        ),
        what="the operator to count the three pods",
    )
    samples = observe(lambda: run_status(kube, ns, run), seconds=5.0)
    assert len(samples) >= 10
    for status in samples:
        assert status["phase"] == "Created", status
        assert all(c["type"] != "Running" for c in status.get("conditions", [])), status
