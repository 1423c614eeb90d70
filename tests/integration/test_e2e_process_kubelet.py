"""End to end: the operator's pods really run the trainer (torchrun, gloo DDP, world size 2).

A TrainingRun is applied with kubectl to a real kube-apiserver; the operator (a real process)
creates the group; :class:`process_kubelet.ProcessKubelet` runs each pod's init container and
``torchrun ... -m kubearch_trainer --config /etc/kubearch/config.yaml`` as local processes and
writes the pod status a kubelet would, termination message included. So the whole contract is
checked with nothing hand-written in between: the config the operator renders is one the trainer
accepts, the trainer's JSON summary reaches ``status.progress``/``status.metrics``, and its exit
codes drive the operator's retry policy. No images, containers, cluster DNS or GPUs: see the
kubelet's docstring for what that leaves out.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import wait_for
from process_kubelet import ProcessKubelet

GROUP, VERSION, PLURAL = "kubearch.dev", "v1alpha1", "trainingruns"
TRAIN_TIMEOUT = 150  # seconds for one group to train on a loaded 2-core machine


def tiny_spec(steps: int, **extra: Any) -> dict[str, Any]:
    """A two-pod CPU run of a tiny dense model: seconds per step, yet real DDP over gloo."""
    spec: dict[str, Any] = {
        "model": {
            "architecture": "dense",
            "size": "tiny",
            "dModel": 64,
            "nLayers": 2,
            "nHeads": 4,
            "dFf": 128,
            "maxSeqLen": 64,
        },
        "data": {"seqLen": 64},
        "training": {
            "stepsPerEpoch": steps,
            "batchSize": 4,
            "warmupSteps": 2,
            "evalEvery": 0,
            "evalBatches": 2,
            "logEvery": 2,
            "device": "cpu",
        },
        "resources": {"nodes": 2, "gpusPerNode": 0, "nprocPerNode": 1},
        "runPolicy": {"backoffLimit": 1, "cleanPodPolicy": "None"},
    }
    for section, values in extra.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def apply_run(kube, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": spec,
    }
    kube.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(body))


def run_status(kube, ns: str, name: str) -> dict[str, Any]:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}


def wait_phase(kube, ns: str, name: str, phases: tuple[str, ...], timeout: float = TRAIN_TIMEOUT) -> dict:
    return wait_for(
        lambda: (s := run_status(kube, ns, name)).get("phase") in phases and s,
        timeout=timeout,
        interval=0.5,
        what=f"{name} to reach phase {' or '.join(phases)}",
    )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def logs(kubelet: ProcessKubelet, run: str, attempt: int = 0) -> str:
    """Both pods' container logs, for assertion messages."""
    out = []
    for pod in (f"{run}-master-0", f"{run}-worker-1"):
        for log in sorted(kubelet.pod_dir(pod, attempt).glob("*.log")):
            out.append(f"--- {pod}/{log.name} ---\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


@pytest.fixture
def kubelet_for(installed, namespace: str, tmp_path: Path):
    """``kubelet_for(run)`` starts a process kubelet for that run; all are stopped afterwards."""
    started: list[ProcessKubelet] = []

    def start(run: str) -> ProcessKubelet:
        kubelet = ProcessKubelet(installed.core, namespace, run, tmp_path / run).start()
        started.append(kubelet)
        return kubelet

    yield start
    for kubelet in started:
        kubelet.stop()


def test_two_pods_train_with_ddp_and_the_run_succeeds(installed, operator, namespace, kubelet_for) -> None:
    run = "e2e-ok"
    kubelet = kubelet_for(run)
    apply_run(installed, namespace, run, tiny_spec(steps=6))
    status = wait_phase(installed, namespace, run, ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", f"{status}\n{logs(kubelet, run)}"
    assert status["restartCount"] == 0
    # Both processes joined one process group: the trainer saw world size 2.
    master_log = (kubelet.pod_dir(f"{run}-master-0") / "trainer.log").read_text()
    assert "device cpu x2" in master_log, master_log[-2000:]
    # The results the trainer wrote into the (remapped) checkpoint volume are what status reports.
    results_files = list(kubelet.pod_dir(f"{run}-master-0").glob(f"checkpoints-*/{run}/results.json"))
    assert len(results_files) == 1, logs(kubelet, run)
    results = json.loads(results_files[0].read_text())
    assert results["status"] == "completed" and results["world_size"] == 2
    assert results["steps"] == 6
    assert status["progress"]["step"] == results["steps"]
    assert status["progress"]["loss"] == pytest.approx(results["final_train_loss"])
    assert status["metrics"]["final_val_loss"] == pytest.approx(results["final_val_loss"])
    # cleanPodPolicy None keeps both finished pods: each one succeeded.
    done = wait_for(
        lambda: (
            (s := run_status(installed, namespace, run))["replicaStatuses"]["Worker"]["succeeded"] == 1 and s
        ),
        timeout=30,
        what="the worker pod's success in replicaStatuses",
    )
    one_done = {"active": 0, "failed": 0, "succeeded": 1}
    assert done["replicaStatuses"] == {"Master": one_done, "Worker": one_done}
    master = installed.core.read_namespaced_pod(f"{run}-master-0", namespace)
    terminated = master.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0 and terminated.reason == "Completed"
    assert json.loads(terminated.message)["steps"] == 6


def test_missing_data_fails_the_run_at_once_with_the_trainers_reason(
    installed, operator, namespace, kubelet_for
) -> None:
    run = "e2e-nodata"
    kubelet = kubelet_for(run)
    apply_run(installed, namespace, run, tiny_spec(steps=4, data={"path": "/data/does-not-exist.txt"}))
    status = wait_phase(installed, namespace, run, ("Succeeded", "Failed"))
    assert status["phase"] == "Failed", f"{status}\n{logs(kubelet, run)}"
    assert status["restartCount"] == 0  # a data error is permanent: no group restart
    failed = condition(status, "Failed")
    assert failed["reason"] == "DataError", failed
    assert "does-not-exist.txt" in failed["message"] and "does not exist" in failed["message"], failed


def test_sigkill_restarts_the_group_which_resumes_from_the_checkpoint(
    installed, operator, namespace, kubelet_for
) -> None:
    run, steps = "e2e-resume", 30
    kubelet = kubelet_for(run)
    spec = tiny_spec(steps, training={"checkpointEvery": 2}, resources={"checkpointClaim": "ckpt"})
    apply_run(installed, namespace, run, spec)
    checkpoint = kubelet.claim_dir("ckpt") / run / "checkpoint.pt"
    wait_for(checkpoint.exists, timeout=TRAIN_TIMEOUT, what=f"a first checkpoint in {checkpoint}")
    master_uid = installed.core.read_namespaced_pod(f"{run}-master-0", namespace).metadata.uid
    os.kill(kubelet.procs[master_uid].pid, signal.SIGKILL)  # torchrun itself, like the OOM killer
    status = wait_phase(installed, namespace, run, ("Succeeded", "Failed"), timeout=2 * TRAIN_TIMEOUT)
    assert status["phase"] == "Succeeded", f"{status}\n{logs(kubelet, run, 1)}"
    assert status["restartCount"] == 1
    events = installed.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={run}")
    restarts = [e.message for e in events.items if e.reason == "Restarting"]
    assert len(restarts) == 1 and "exited 137 (signal 9)" in restarts[0], restarts
    resumed = (kubelet.pod_dir(f"{run}-master-0", attempt=1) / "trainer.log").read_text()
    match = re.search(r"kubearch: resumed from \S+ at step (\d+)", resumed)
    assert match and 0 < int(match.group(1)) < steps, resumed[-2000:]
    assert status["progress"]["step"] == steps


#: The README's example plugin; on the process kubelet's PYTHONPATH it stands for a module baked
#: into the trainer image.
PLUGINS = Path(__file__).resolve().parents[2] / "examples" / "plugins"


def plugin_spec(architecture: str) -> dict[str, Any]:
    spec = tiny_spec(steps=4)
    spec["model"] = {"plugin": "my_pkg.bigram", "architecture": architecture, "maxSeqLen": 64}
    return spec


@pytest.fixture
def plugin_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pods' processes inherit the test's environment: put the plugin package on their path."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))
    )


def test_a_plugin_architecture_trains_in_the_pods(
    installed, operator, namespace, kubelet_for, plugin_importable
) -> None:
    run = "e2e-plugin"
    kubelet = kubelet_for(run)
    apply_run(installed, namespace, run, plugin_spec("bigram"))
    status = wait_phase(installed, namespace, run, ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", f"{status}\n{logs(kubelet, run)}"
    pod = installed.core.read_namespaced_pod(f"{run}-master-0", namespace)
    assert pod.spec.containers[0].args[-2:] == ["--plugin", "my_pkg.bigram"]
    master_log = (kubelet.pod_dir(f"{run}-master-0") / "trainer.log").read_text()
    assert "kubearch: bigram (" in master_log and "device cpu x2" in master_log, master_log[-2000:]


def test_an_architecture_the_plugin_does_not_register_fails_the_run_at_once(
    installed, operator, namespace, kubelet_for, plugin_importable
) -> None:
    run = "e2e-plugin-bad"
    kubelet = kubelet_for(run)
    apply_run(installed, namespace, run, plugin_spec("trigram"))  # the schema lets it through
    status = wait_phase(installed, namespace, run, ("Succeeded", "Failed"))
    assert status["phase"] == "Failed", f"{status}\n{logs(kubelet, run)}"
    assert status["restartCount"] == 0  # exit 64 is permanent
    failed = condition(status, "Failed")
    assert failed["reason"] == "ConfigError", failed
    assert "'trigram' is not registered by model.plugin 'my_pkg.bigram'" in failed["message"], failed
