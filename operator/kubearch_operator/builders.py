"""Pure builders: a TrainingRun spec in, Kubernetes manifests (plain dicts) out.

Nothing here talks to the API server, so every rule about names, env, resources and ownership is
unit-tested without a cluster and the kopf handlers stay thin.

What the pods run (one pod per node, PyTorchJob style)::

    torchrun --nnodes N --nproc-per-node P --node-rank i --master-addr $(MASTER_ADDR)
             --master-port $(MASTER_PORT) --max-restarts 0
             -m kubearch_trainer --config /etc/kubearch/config.yaml [--plugin MODULE]

Environment, with torchrun's own meanings (Kubeflow's PyTorchJob sets WORLD_SIZE to the number of
*pods* and RANK to the pod index, which contradicts what torchrun then sets in each process):

* ``WORLD_SIZE`` = N x P, the total number of training processes: exactly what torchrun gives each
  process, so the pod's value and the process's value agree.
* ``NODE_RANK`` (= torchrun's GROUP_RANK) = the pod's index, 0 for the master.
* ``RANK`` is *not* set on the pod: a pod holds P processes, torchrun gives each its own global RANK
  and LOCAL_RANK; any single per-pod value would be wrong for P - 1 of them.
* ``NNODES``, ``NPROC_PER_NODE``, ``MASTER_ADDR``, ``MASTER_PORT`` and the ``PET_*`` twins that
  torchrun reads as defaults for its flags (``PET_NNODES`` ... ), so scripts written for Kubeflow
  move over unchanged.

Rendezvous is static (``--master-addr`` + ``--node-rank``): the master pod's stable DNS name
``<run>-master-0.<run>.<namespace>.svc`` comes from the pod's hostname/subdomain and a headless
Service that publishes not-ready addresses. Every pod (the master too: its agent connects to its
own store by name) runs an init container that waits until that name resolves, so no worker
races the master's DNS record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from kubearch_trainer.config import ConfigError, TrainConfig

from . import gpu_matrix
from .api import API_VERSION, KIND, ChosenShape, TrainingRunSpec
from .pod_template import apply_pod_template

APP_LABEL = "app.kubernetes.io/name"
APP = "kubearch"
RUN_LABEL = "kubearch.dev/run"
ROLE_LABEL = "kubearch.dev/role"
INDEX_LABEL = "kubearch.dev/replica-index"
ATTEMPT_LABEL = "kubearch.dev/attempt"
#: Live progress the trainer may publish on its own pod (JSON: step, loss, tokens_per_second).
PROGRESS_ANNOTATION = "kubearch.dev/progress"
CONFIG_MOUNT = "/etc/kubearch"
CONFIG_KEY = "config.yaml"
#: libyaml's emitter when PyYAML was built with it (its wheels are): the pure-Python one took
#: ~7 ms per ConfigMap, the largest part of a run's first pass; the text is the same.
YAML_DUMPER: type = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
CHECKPOINT_MOUNT = "/checkpoints"
#: Writable scratch space (emptyDir): the root filesystem is read-only, so TMPDIR, HOME and the
#: caches (torch.compile/Triton, torchrun's logs) point here. Not /tmp, so that no image path is
#: shadowed; tempfile, torch and Triton follow TMPDIR/HOME/XDG_CACHE_HOME.
SCRATCH_MOUNT = "/scratch"
#: The trainer image's user (Dockerfile ``USER 65532``); fsGroup makes volumes writable to it.
RUN_AS_USER = 65532
TERMINATION_LOG = "/dev/termination-log"
CONTAINER = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
#: scheduler-plugins' coscheduling label and Volcano's annotation naming a pod's PodGroup.
SCHEDULER_PLUGINS_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"

_WAIT_FOR_MASTER = """\
import os, socket, sys, time
host = os.environ["MASTER_ADDR"]
deadline = time.monotonic() + float(os.environ.get("KUBEARCH_DNS_TIMEOUT", "600"))
while True:
    try:
        socket.getaddrinfo(host, None)
        print(f"{host} resolves; starting", flush=True)
        break
    except socket.gaierror:
        if time.monotonic() > deadline:
            sys.exit(f"{host} did not resolve in time")
        time.sleep(2)
"""


@dataclass(frozen=True)
class RunPlan:
    """A run's resolved shape and the trainer config its pods get."""

    shape: ChosenShape
    config: TrainConfig

    @property
    def nodes(self) -> int:
        return self.shape.nodes


def plan_run(spec: TrainingRunSpec) -> RunPlan:
    """Resolve ``resources`` (explicit, or ``auto`` through the GPU matrix) into a shape and config.

    With ``auto``, the matrix's batch size, accumulation and mixed precision replace the trainer's
    defaults, but a value the user wrote in ``spec.training`` wins (pydantic's ``model_fields_set``
    tells the two apart; the CRD therefore sets no schema default for those three fields).
    """
    res, training = spec.resources, spec.training.model_copy()
    if res.auto:
        choice = gpu_matrix.choose(res.dataset_samples, spec.model)
        shape = choice.shape
        nodes, gpus = shape.nodes, shape.gpus_per_node
        overrides = {
            "batch_size": shape.micro_batch,
            "gradient_accumulation_steps": shape.gradient_accumulation_steps,
            "use_amp": shape.mixed_precision,
        }
        kept = sorted(k for k in overrides if k in spec.training.model_fields_set)
        training = training.model_copy(update={k: v for k, v in overrides.items() if k not in kept})
        reason = choice.reason + (f"; kept spec.training {', '.join(kept)}" if kept else "")
        source = "auto"
    else:
        nodes = res.nodes or 1
        gpus = 1 if res.gpus_per_node is None else res.gpus_per_node
        reason = f"explicit: {nodes} node(s) x {gpus} GPU(s)" + ("" if gpus else " (CPU)")
        source = "explicit"
    nproc = res.nproc_per_node or max(gpus, 1)
    if gpus and nproc > gpus:  # explicit shapes are refused by the schema; auto is known only here
        raise ConfigError(
            f"spec.resources.nprocPerNode: {nproc} processes for the {gpus} GPU(s) per node that "
            f"auto chose: at most one process per GPU; remove nprocPerNode"
        )
    shape_status = ChosenShape(
        nodes=nodes,
        gpus_per_node=gpus,
        nproc_per_node=nproc,
        gpus=nodes * gpus,
        world_size=nodes * nproc,
        gpu_type=res.gpu_type,
        batch_size=training.batch_size,
        global_batch_size=training.batch_size * nodes * nproc * training.gradient_accumulation_steps,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        mixed_precision=training.use_amp,
        source=source,
        reason=reason,
    )
    config = TrainConfig(model=spec.model.model_copy(), data=spec.data.model_copy(), training=training)
    return RunPlan(shape=shape_status, config=config)


# ------------------------------------------------------------------------------------------------
# names and metadata
# ------------------------------------------------------------------------------------------------
def pod_name(run: str, index: int) -> str:
    """Deterministic pod names make create-if-absent idempotent: a second create is a 409."""
    return f"{run}-master-0" if index == 0 else f"{run}-worker-{index}"


def service_name(run: str) -> str:
    return run


def configmap_name(run: str) -> str:
    return f"{run}-config"


def master_address(run: str, namespace: str) -> str:
    return f"{pod_name(run, 0)}.{service_name(run)}.{namespace}.svc"


def run_labels(run: str) -> dict[str, str]:
    return {APP_LABEL: APP, RUN_LABEL: run}


def run_selector(run: str) -> str:
    """Label selector of everything a run owns."""
    return ",".join(f"{k}={v}" for k, v in run_labels(run).items())


def owner_reference(run: str, uid: str) -> dict[str, Any]:
    """Controller reference to the TrainingRun: the garbage collector deletes children with it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, run: str, namespace: str, uid: str, labels: dict[str, str] | None = None) -> dict:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**run_labels(run), **(labels or {})},
        "ownerReferences": [owner_reference(run, uid)],
    }


# ------------------------------------------------------------------------------------------------
# manifests
# ------------------------------------------------------------------------------------------------
def trainer_config(plan: RunPlan, run: str, *, resume: bool) -> dict[str, Any]:
    """The YAML the trainer reads: the plan's config, with output under the checkpoint volume."""
    data = plan.config.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["training"]["outputDir"] = f"{CHECKPOINT_MOUNT}/{run}"
    data["training"]["resume"] = bool(resume or plan.config.training.resume)
    return data


def build_configmap(
    run: str, namespace: str, uid: str, plan: RunPlan, *, resume: bool = False
) -> dict[str, Any]:
    text = yaml.dump(trainer_config(plan, run, resume=resume), Dumper=YAML_DUMPER, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(configmap_name(run), run, namespace, uid),
        "data": {CONFIG_KEY: text},
    }


def build_service(run: str, namespace: str, uid: str, spec: TrainingRunSpec) -> dict[str, Any]:
    """Headless Service for rendezvous; it publishes pods before they are Ready (torchrun is not)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service_name(run), run, namespace, uid),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": run_labels(run),
            "ports": [
                {
                    "name": "rendezvous",
                    "port": spec.resources.master_port,
                    "targetPort": spec.resources.master_port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def torchrun_args(shape: ChosenShape, index: int, plugin: str | None = None) -> list[str]:
    """torchrun's flags, then the trainer's: its config file and, for ``spec.model.plugin``,
    ``--plugin MODULE`` (the trainer imports it before validating, so it registers the
    architecture; the module must be importable in the image)."""
    return [
        f"--nnodes={shape.nodes}",
        f"--nproc-per-node={shape.nproc_per_node}",
        f"--node-rank={index}",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--max-restarts=0",  # the operator restarts the whole group, from the last checkpoint
        "-m",
        "kubearch_trainer",
        "--config",
        f"{CONFIG_MOUNT}/{CONFIG_KEY}",
        *(["--plugin", plugin] if plugin else []),
    ]


def pod_env(run: str, namespace: str, spec: TrainingRunSpec, shape: ChosenShape, index: int) -> list[dict]:
    """Per-pod environment with torchrun's meanings (see the module docstring)."""
    values = {
        "MASTER_ADDR": master_address(run, namespace),
        "MASTER_PORT": str(spec.resources.master_port),
        "WORLD_SIZE": str(shape.world_size),
        "NNODES": str(shape.nodes),
        "NPROC_PER_NODE": str(shape.nproc_per_node),
        "NODE_RANK": str(index),
    }
    values.update(
        {
            "PET_MASTER_ADDR": values["MASTER_ADDR"],
            "PET_MASTER_PORT": values["MASTER_PORT"],
            "PET_NNODES": values["NNODES"],
            "PET_NPROC_PER_NODE": values["NPROC_PER_NODE"],
            "PET_NODE_RANK": values["NODE_RANK"],
            "KUBEARCH_RUN": run,
            "KUBEARCH_TERMINATION_LOG": TERMINATION_LOG,
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": SCRATCH_MOUNT,
            "HOME": SCRATCH_MOUNT,
            "XDG_CACHE_HOME": f"{SCRATCH_MOUNT}/.cache",
        }
    )
    env = [{"name": k, "value": v} for k, v in values.items()]
    env += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    return env


def _resources(spec: TrainingRunSpec, shape: ChosenShape) -> dict[str, dict[str, Any]]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        requests["memory"] = limits["memory"] = spec.resources.memory
    if shape.gpus_per_node:
        limits[GPU_RESOURCE] = str(shape.gpus_per_node)  # quantities are strings in the API
    out: dict[str, dict[str, Any]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_security_context() -> dict[str, Any]:
    """Non-root, seccomp RuntimeDefault (the "restricted" Pod Security Standard); fsGroup so the
    checkpoint claim and the emptyDirs are writable by the trainer's user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """No privilege escalation, no capabilities, read-only root: the trainer writes only to its
    volumes (/checkpoints, /scratch, /dev/shm) and the termination log."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def build_pod(
    run: str,
    namespace: str,
    uid: str,
    spec: TrainingRunSpec,
    shape: ChosenShape,
    index: int,
    attempt: int = 0,
) -> dict[str, Any]:
    """Pod ``index`` of a run's group (0 = master). ``attempt`` = the run's restart count."""
    res = spec.resources
    role = "master" if index == 0 else "worker"
    labels = {ROLE_LABEL: role, INDEX_LABEL: str(index), ATTEMPT_LABEL: str(attempt)}
    annotations: dict[str, str] = {}
    policy = spec.run_policy.scheduling_policy
    if gang_scheduled(spec):
        labels[SCHEDULER_PLUGINS_GROUP_LABEL] = run
        annotations[VOLCANO_GROUP_ANNOTATION] = run
    metadata = _metadata(pod_name(run, index), run, namespace, uid, labels)
    if annotations:
        metadata["annotations"] = annotations
    env = pod_env(run, namespace, spec, shape, index)
    mounts = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
        {"name": "scratch", "mountPath": SCRATCH_MOUNT},
    ]
    ports = [{"name": "rendezvous", "containerPort": res.master_port, "protocol": "TCP"}]
    if spec.training.metrics_port:
        ports.append({"name": "metrics", "containerPort": spec.training.metrics_port, "protocol": "TCP"})
    container = {
        "name": CONTAINER,
        "image": res.image,
        "imagePullPolicy": res.image_pull_policy,
        "command": ["torchrun"],
        "args": torchrun_args(shape, index, spec.model.plugin),
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "resources": _resources(spec, shape),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }
    wait = {
        "name": "wait-for-master",
        "image": res.image,
        "imagePullPolicy": res.image_pull_policy,
        "command": ["python", "-c", _WAIT_FOR_MASTER],
        "env": [e for e in env if e["name"] == "MASTER_ADDR"],
        "securityContext": container_security_context(),
    }
    checkpoint_volume: dict[str, Any] = (
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": res.checkpoint_claim}}
        if res.checkpoint_claim
        else {"name": "checkpoints", "emptyDir": {}}
    )
    node_selector = dict(res.node_selector)
    if res.gpu_type:
        node_selector[res.gpu_type_label] = res.gpu_type
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    if shape.gpus_per_node and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    pod_spec: dict[str, Any] = {
        "hostname": pod_name(run, index),
        "subdomain": service_name(run),
        "restartPolicy": "Never",  # a failure restarts the whole group, decided by the operator
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "securityContext": pod_security_context(),
        "initContainers": [wait],
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(run)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
            checkpoint_volume,
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if policy is not None:
        if policy.scheduler_name:
            pod_spec["schedulerName"] = policy.scheduler_name
        if policy.priority_class:
            pod_spec["priorityClassName"] = policy.priority_class
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    return apply_pod_template(pod, spec.pod_template)  # the user's additions; contract kept


def build_pods(
    run: str, namespace: str, uid: str, spec: TrainingRunSpec, shape: ChosenShape, attempt: int = 0
) -> list[dict[str, Any]]:
    return [build_pod(run, namespace, uid, spec, shape, i, attempt) for i in range(shape.nodes)]


def gang_scheduled(spec: TrainingRunSpec) -> bool:
    """A PodGroup is made only when the pods go to a named scheduler that reads it.

    The default scheduler ignores PodGroups: a ``schedulingPolicy`` with only ``priorityClass``
    sets the pods' ``priorityClassName`` and nothing else (the schema refuses ``queue`` and
    ``minAvailable`` without ``schedulerName``).
    """
    policy = spec.run_policy.scheduling_policy
    return policy is not None and bool(policy.scheduler_name)


def build_pod_group(
    run: str, namespace: str, uid: str, spec: TrainingRunSpec, shape: ChosenShape
) -> dict | None:
    """The gang: a Volcano PodGroup when schedulerName is 'volcano', else scheduler-plugins' one.

    None unless a scheduler is named (see :func:`gang_scheduled`). ``minAvailable`` defaults to
    all pods of the group, so a 2-node run never holds one node's GPUs while waiting for the other.
    """
    policy = spec.run_policy.scheduling_policy
    if policy is None or not gang_scheduled(spec):
        return None
    min_member = policy.min_available or shape.nodes
    metadata = _metadata(run, run, namespace, uid)
    if policy.scheduler_name == "volcano":
        group_spec: dict[str, Any] = {"minMember": min_member}
        if policy.queue:
            group_spec["queue"] = policy.queue
        if policy.priority_class:
            group_spec["priorityClassName"] = policy.priority_class
        return {
            "apiVersion": "scheduling.volcano.sh/v1beta1",
            "kind": "PodGroup",
            "metadata": metadata,
            "spec": group_spec,
        }
    return {
        "apiVersion": "scheduling.x-k8s.io/v1alpha1",
        "kind": "PodGroup",
        "metadata": metadata,
        "spec": {"minMember": min_member},
    }
