"""``spec.podTemplate``: what a cluster user adds to every pod of a run, and the merge rules.

A TrainingRun's pods are built by kubearch (``builders.build_pod``), but a real cluster needs more
than kubearch knows about: a data volume, a ServiceAccount with cloud credentials, pull secrets,
affinity, a PriorityClass, labels for cost accounting, a securityContext the admission policy
demands, the GPU resource name of the cluster's device plugin. Kubeflow's PyTorchJob takes a whole
pod template; here an override is merged into the pod kubearch builds, with strategic-merge
conventions: lists of named things (containers, init containers, volumes, env, imagePullSecrets)
merge by ``name``, volumeMounts by ``mountPath``, maps (labels, annotations, securityContext)
key by key.

The pods' contract is not negotiable: whatever kubearch put into the pod (the trainer's command
and args, the rendezvous env such as ``MASTER_ADDR``/``WORLD_SIZE``/``NODE_RANK``, its volumes
and mount paths, its labels) cannot be replaced by an override. A conflicting override is refused
with the field named (:class:`PodTemplateError`, which the operator reports in the run's status),
rather than silently winning or silently losing.

Pure functions on plain dicts: unit-tested without a cluster.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

from kubearch_trainer.config import ConfigError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel

#: A Kubernetes object kept as it is (the API server validates it when the pod is created).
RawObject = Annotated[
    dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
]
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
#: Every string, list and map has a bound (the CRD's schema and CEL cost need them; issue 9).
MAX_ITEMS = 64
Name = Annotated[str, StringConstraints(max_length=253)]  # a DNS-1123 subdomain at most
MetaKey = Annotated[str, StringConstraints(max_length=317)]  # prefix (253) + "/" + name (63)
LabelValue = Annotated[str, StringConstraints(max_length=63)]
AnnotationValue = Annotated[str, StringConstraints(max_length=4096)]


class PodTemplateError(ConfigError):
    """An override that would break the pods' contract; the message names the field.

    A ``ConfigError``: the operator reports it as the run's InvalidSpec status, creating no pod."""


class _Api(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ContainerOverride(_Api):
    """Merged into kubearch's container of the same ``name`` (``trainer`` or ``wait-for-master``)."""

    name: str = Field(max_length=63, description="trainer, or wait-for-master under initContainers.")
    env: list[RawObject] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Merged by name; kubearch's names refused."
    )
    volume_mounts: list[RawObject] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Merged by mountPath."
    )
    security_context: RawObject | None = Field(None, description="Merged key by key.")
    resources: RawObject | None = Field(
        None, description="Init containers only: the trainer's come from spec.resources."
    )


class TemplateMetadata(_Api):
    labels: dict[MetaKey, LabelValue] = Field(default_factory=dict, max_length=MAX_ITEMS)
    annotations: dict[MetaKey, AnnotationValue] = Field(default_factory=dict, max_length=MAX_ITEMS)


class PodSpecOverride(_Api):
    service_account_name: Name | None = None
    image_pull_secrets: list[RawObject] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Merged by name."
    )
    affinity: RawObject | None = None
    priority_class_name: Name | None = None
    security_context: RawObject | None = Field(None, description="Pod securityContext, merged key by key.")
    volumes: list[RawObject] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Merged by name."
    )
    containers: list[ContainerOverride] = Field(default_factory=list, max_length=MAX_ITEMS)
    init_containers: list[ContainerOverride] = Field(default_factory=list, max_length=MAX_ITEMS)


class PodTemplate(_Api):
    """``spec.podTemplate``: merged into every pod of the run (see the module docstring)."""

    metadata: TemplateMetadata = Field(default_factory=TemplateMetadata)
    spec: PodSpecOverride = Field(default_factory=PodSpecOverride)
    gpu_resource_name: str = Field(
        DEFAULT_GPU_RESOURCE,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9._]*[a-z0-9])?$",
        description="Extended resource of the GPUs: nvidia.com/gpu, amd.com/gpu, nvidia.com/mig-1g.10gb ...",
    )


# ------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------
def _merge_named(
    ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str, where: str, what: str
) -> list[dict[str, Any]]:
    """Append ``theirs`` to ``ours`` (merge key ``key``); an item kubearch already has is refused."""
    taken = {item.get(key) for item in ours}
    out = list(ours)
    seen: set[Any] = set()
    for item in theirs:
        name = item.get(key)
        if not name:
            raise PodTemplateError(f"{where}: every item needs a {key}")
        if name in taken:
            raise PodTemplateError(f"{where}[{name}]: {what}; it cannot be overridden")
        if name in seen:
            raise PodTemplateError(f"{where}[{name}]: given twice")
        seen.add(name)
        out.append(copy.deepcopy(item))
    return out


def _merge_map(ours: dict[str, Any] | None, theirs: dict[str, Any], where: str) -> dict[str, Any]:
    """Key-by-key merge; a key kubearch set to a different value is refused."""
    out = dict(ours or {})
    for key, value in theirs.items():
        if key in out and out[key] != value:
            raise PodTemplateError(f"{where}.{key}: set by kubearch to {out[key]!r}; it cannot be overridden")
        out[key] = copy.deepcopy(value)
    return out


def _merge_container(container: dict[str, Any], override: ContainerOverride, where: str, init: bool) -> None:
    container["env"] = _merge_named(
        container.get("env") or [], override.env, "name", f"{where}.env",
        "set by kubearch (rendezvous and run identity)",
    )  # fmt: skip
    container["volumeMounts"] = _merge_named(
        container.get("volumeMounts") or [], override.volume_mounts, "mountPath", f"{where}.volumeMounts",
        "a path kubearch mounts",
    )  # fmt: skip
    if not container["env"]:
        del container["env"]
    if not container["volumeMounts"]:
        del container["volumeMounts"]
    if override.security_context:
        container["securityContext"] = _merge_map(
            container.get("securityContext"), override.security_context, f"{where}.securityContext"
        )
    if override.resources:
        if not init:
            raise PodTemplateError(
                f"{where}.resources: the trainer's resources come from spec.resources "
                "(cpu, memory, gpusPerNode); set them there"
            )
        container["resources"] = _merge_map(
            container.get("resources"), override.resources, f"{where}.resources"
        )


def _rename_gpu_resource(pod_spec: dict[str, Any], name: str) -> None:
    """kubearch asks for ``nvidia.com/gpu``; another device plugin's resource replaces it."""
    if name == DEFAULT_GPU_RESOURCE:
        return
    for container in pod_spec.get("containers", []):
        limits = (container.get("resources") or {}).get("limits") or {}
        if DEFAULT_GPU_RESOURCE in limits:
            limits[name] = limits.pop(DEFAULT_GPU_RESOURCE)
    for toleration in pod_spec.get("tolerations", []):
        if toleration.get("key") == DEFAULT_GPU_RESOURCE:
            toleration["key"] = name


def apply_pod_template(pod: dict[str, Any], template: PodTemplate | None) -> dict[str, Any]:
    """``pod`` (as ``builders.build_pod`` made it) with ``template`` merged in; ``pod`` is not changed.

    Raises :class:`PodTemplateError` naming the first field that conflicts with kubearch's pod.
    """
    if template is None:
        return pod
    pod = copy.deepcopy(pod)
    meta, spec, over = pod["metadata"], pod["spec"], template.spec
    where = "spec.podTemplate"
    if template.metadata.labels:
        meta["labels"] = _merge_map(meta.get("labels"), template.metadata.labels, f"{where}.metadata.labels")
    if template.metadata.annotations:
        meta["annotations"] = _merge_map(
            meta.get("annotations"), template.metadata.annotations, f"{where}.metadata.annotations"
        )
    for field, value in (
        ("serviceAccountName", over.service_account_name),
        ("priorityClassName", over.priority_class_name),
        ("affinity", over.affinity),
    ):
        if value is None:
            continue
        if field in spec and spec[field] != value:
            raise PodTemplateError(
                f"{where}.spec.{field}: already {spec[field]!r} from the run's spec "
                "(runPolicy.schedulingPolicy); set it in one place"
            )
        spec[field] = copy.deepcopy(value)
    if over.security_context:
        spec["securityContext"] = _merge_map(
            spec.get("securityContext"), over.security_context, f"{where}.spec.securityContext"
        )
    if over.image_pull_secrets:
        spec["imagePullSecrets"] = _merge_named(
            spec.get("imagePullSecrets") or [], over.image_pull_secrets, "name",
            f"{where}.spec.imagePullSecrets", "already listed",
        )  # fmt: skip
    if over.volumes:
        spec["volumes"] = _merge_named(
            spec.get("volumes") or [], over.volumes, "name", f"{where}.spec.volumes",
            "a volume kubearch mounts (config, dshm, checkpoints)",
        )  # fmt: skip
    for field, overrides, init in (
        ("containers", over.containers, False),
        ("initContainers", over.init_containers, True),
    ):
        by_name = {c["name"]: c for c in spec.get(field) or []}
        for override in overrides:
            path = f"{where}.spec.{field}[{override.name}]"
            if override.name not in by_name:
                known = ", ".join(by_name) or "none"
                raise PodTemplateError(f"{path}: no such container (kubearch's {field}: {known})")
            _merge_container(by_name[override.name], override, path, init)
    _rename_gpu_resource(spec, template.gpu_resource_name)
    _check_mounts_resolve(spec, where)
    return pod


def _check_mounts_resolve(spec: dict[str, Any], where: str) -> None:
    """Every volumeMount names a volume of the pod (else the API server refuses the pod later)."""
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    for field in ("initContainers", "containers"):
        for container in spec.get(field) or []:
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    raise PodTemplateError(
                        f"{where}.spec.{field}[{container['name']}].volumeMounts[{mount.get('mountPath')}]: "
                        f"no volume named {mount.get('name')!r} (add it to {where}.spec.volumes)"
                    )
