"""The TrainingRun API (group ``kubearch.dev``, version ``v1alpha1``) as pydantic models.

Why pydantic and why here: the same classes generate the CRD's OpenAPI schema (``crd.py``), validate
specs inside the operator (cross-field rules the schema cannot express) and, through
``kubearch_trainer.config``, are what the trainer reads from its ``--config``. One source of truth,
so the API server, the operator and the trainer cannot disagree about a field. This module imports
neither torch nor kopf: the operator image stays small and the unit tests stay fast.

Names are camelCase on the wire (Kubernetes convention) and snake_case in Python; both are accepted.
``runPolicy`` keeps Kubeflow's names and meanings (``backoffLimit``, ``cleanPodPolicy`` ...), so a
PyTorchJob user reads it without a manual.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from kubearch_trainer.config import (
    FAMILY_OPTIONS,
    PATTERN_DESCRIPTIONS,
    ConfigError,
    DataConfig,
    FieldErrors,
    ModelConfig,
    TrainConfig,
    TrainingConfig,
    format_validation_error,
    trainer_cross_checks,
)
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from .pod_template import PodTemplate

GROUP = "kubearch.dev"
VERSION = "v1alpha1"
KIND = "TrainingRun"
PLURAL = "trainingruns"
SINGULAR = "trainingrun"
SHORT_NAMES = ("tr",)
API_VERSION = f"{GROUP}/{VERSION}"

#: The trainer image a run uses unless ``spec.resources.image`` says otherwise.
DEFAULT_IMAGE = "ghcr.io/kubearch/trainer:0.1.0"
#: torchrun's default rendezvous port; the headless Service exposes it.
DEFAULT_MASTER_PORT = 29500

PHASES = ("Pending", "Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
CLEAN_POD_POLICIES = ("None", "Running", "All")

# Pod names are "<run>-worker-<i>" and the headless Service is "<run>": both must be DNS-1035 labels
# (<= 63 chars, lowercase alphanumerics and '-', starting with a letter). "-worker-999" leaves 52.
MAX_RUN_NAME_LENGTH = 52
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# Kubernetes' own formats, checked here because the API server checks them on the objects the
# operator builds from the spec: a run that passes the schema must not be refused later (a pod
# with a bad label value is a 422 the user never sees). Patterns are RE2- and Rust-compatible.
#: A label value (also nodeSelector values): <= 63 chars, alphanumerics, '-', '_', '.' inside.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_VALUE_MAX = 63
#: A label key: optional DNS-subdomain prefix and '/', then a name of <= 63 chars.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_KEY_MAX = 253 + 1 + 63
#: PersistentVolumeClaim, PriorityClass and scheduler names: DNS-1123 subdomains.
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_SUBDOMAIN_MAX = 253
#: A container image reference: not blank, no whitespace anywhere.
IMAGE = r"^[^\s]+$"
IMAGE_MAX = 1024
#: Bounds on list/map sizes (they also bound the CEL rules' cost on the API server).
MAX_NODE_SELECTOR = 64
MAX_TOLERATIONS = 64
#: A quantity string (cpu, memory, shmSize) is short.
QUANTITY_MAX = 32

PATTERN_DESCRIPTIONS.update(
    {
        LABEL_VALUE: "a label value: at most 63 letters, digits, '-', '_' or '.', "
        "starting and ending with a letter or digit",
        LABEL_KEY: "a label key: an optional DNS subdomain and '/', then at most 63 letters, digits, "
        "'-', '_' or '.', starting and ending with a letter or digit",
        r"^$|" + LABEL_KEY: "empty or a label key: an optional DNS subdomain and '/', then at most 63 "
        "letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        DNS1123_SUBDOMAIN: "a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and "
        "ending with a letter or digit",
        IMAGE: "an image reference without blanks",
    }
)

LabelKey = Annotated[str, StringConstraints(max_length=LABEL_KEY_MAX, pattern=LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(max_length=LABEL_VALUE_MAX, pattern=LABEL_VALUE)]


class _Api(BaseModel):
    """Base for API sections: camelCase on the wire, snake_case accepted, unknown keys refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Toleration(_Api):
    """A Kubernetes toleration (same fields and rules as ``core/v1 Toleration``)."""

    key: str | None = Field(None, max_length=LABEL_KEY_MAX, pattern=r"^$|" + LABEL_KEY)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=LABEL_VALUE_MAX, pattern=LABEL_VALUE)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, le=1_000_000_000)

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> Toleration:
        # The API server's own toleration rules (CEL twins in crd.TOLERATION_RULES).
        problems = []
        if self.operator == "Exists" and self.value:
            problems.append(("value", "must be empty when operator is Exists"))
        if not self.key and self.operator != "Exists":
            problems.append(("operator", "must be Exists when key is empty (it matches every taint)"))
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            problems.append(("tolerationSeconds", "is only allowed with effect NoExecute"))
        if problems:
            raise FieldErrors(problems)
        return self


class Resources(_Api):
    """The run's shape: ``auto: true`` (the GPU matrix picks it) or explicit nodes x GPUs.

    With ``auto`` the operator fills nodes, GPUs per node, batch size, gradient accumulation and
    mixed precision from the seed's GPU matrix (see ``gpu_matrix.py``) and writes the choice and its
    reason into ``status.chosenShape``. Explicit ``nodes``/``gpusPerNode`` and ``auto`` exclude each
    other, so that a reader of the spec never has to guess which one won.
    """

    auto: bool = Field(False, description="Choose the shape from the GPU matrix (dataset size x model).")
    dataset_samples: int | None = Field(
        None,
        ge=0,
        le=10**15,
        description="Training samples in the data set; the GPU matrix's first axis (auto).",
    )
    nodes: int | None = Field(None, ge=1, le=64, description="Pods (one per node); default 1.")
    gpus_per_node: int | None = Field(
        None, ge=0, le=16, description="nvidia.com/gpu per pod; 0 runs on CPU. Default 1 (0 if auto picks)."
    )
    nproc_per_node: int | None = Field(
        None, ge=1, le=64, description="torchrun processes per pod; default gpusPerNode (1 on CPU)."
    )
    gpu_type: str | None = Field(
        None,
        max_length=LABEL_VALUE_MAX,
        pattern=LABEL_VALUE,
        description="GPU model label value, e.g. NVIDIA-A100-SXM4-80GB (nodeSelector on gpuTypeLabel).",
    )
    gpu_type_label: str = Field(
        "nvidia.com/gpu.product",
        max_length=LABEL_KEY_MAX,
        pattern=LABEL_KEY,
        description="Node label that carries the GPU model.",
    )
    cpu: str | None = Field(
        None, max_length=QUANTITY_MAX, pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="CPU request per pod."
    )
    memory: str | None = Field(
        None,
        max_length=QUANTITY_MAX,
        pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[eEmk])?$",
        description="Memory request and limit per pod.",
    )
    shm_size: str = Field(
        "2Gi",
        max_length=QUANTITY_MAX,
        pattern=r"^[0-9]+([EPTGMK]i?)?$",
        description="Size limit of the memory-backed /dev/shm.",
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=MAX_NODE_SELECTOR, description="Node labels the pods require."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_TOLERATIONS)
    image: str = Field(DEFAULT_IMAGE, max_length=IMAGE_MAX, pattern=IMAGE, description="Trainer image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    checkpoint_claim: str | None = Field(
        None,
        max_length=DNS1123_SUBDOMAIN_MAX,
        pattern=DNS1123_SUBDOMAIN,
        description="PersistentVolumeClaim mounted at /checkpoints so restarts resume; else emptyDir.",
    )
    master_port: int = Field(DEFAULT_MASTER_PORT, ge=1, le=65535)

    @model_validator(mode="after")
    def _auto_or_explicit(self) -> Resources:
        problems = []
        if self.auto:
            clash = [to_camel(f) for f in ("nodes", "gpus_per_node") if getattr(self, f) is not None]
            if clash:
                problems.append(
                    (clash[0], f"auto: true chooses the shape; remove {', '.join(clash)} or set auto: false")
                )
        elif self.nproc_per_node is not None:
            gpus = 1 if self.gpus_per_node is None else self.gpus_per_node
            if gpus and self.nproc_per_node > gpus:
                problems.append(
                    (
                        "nprocPerNode",
                        f"{self.nproc_per_node} processes for {gpus} GPU(s) per node: at most one "
                        "process per GPU (gpusPerNode: 0 runs any number on CPU)",
                    )
                )
        if problems:
            raise FieldErrors(problems)
        return self


class SchedulingPolicy(_Api):
    """Gang scheduling and priority, as Kubeflow's ``runPolicy.schedulingPolicy``."""

    scheduler_name: str | None = Field(
        None,
        max_length=DNS1123_SUBDOMAIN_MAX,
        pattern=DNS1123_SUBDOMAIN,
        description="Gang scheduler of the pods, e.g. volcano or scheduler-plugins-scheduler.",
    )
    queue: str | None = Field(
        None, max_length=DNS1123_SUBDOMAIN_MAX, pattern=DNS1123_SUBDOMAIN, description="Volcano queue."
    )
    priority_class: str | None = Field(
        None,
        max_length=DNS1123_SUBDOMAIN_MAX,
        pattern=DNS1123_SUBDOMAIN,
        description="PriorityClass of the pods (alone: no PodGroup, the default scheduler).",
    )
    min_available: int | None = Field(
        None, ge=1, le=64, description="Gang size: pods that must be schedulable together (default: all)."
    )

    @model_validator(mode="after")
    def _needs_a_scheduler(self) -> SchedulingPolicy:
        orphans = [to_camel(f) for f in ("queue", "min_available") if getattr(self, f) is not None]
        if orphans and not self.scheduler_name:
            raise FieldErrors([(o, "needs schedulerName: only a gang scheduler reads it") for o in orphans])
        return self


class RunPolicy(_Api):
    """Failure and lifecycle policy with Kubeflow's names and meanings."""

    backoff_limit: int = Field(
        3, ge=0, le=1000, description="Group restarts allowed after retryable failures."
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        le=10 * 365 * 86400,
        description="Fail the run when it has been active this long (reset by suspend).",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=10 * 365 * 86400,
        description="Delete the run (and its pods) this long after it finished.",
    )
    suspend: bool = Field(False, description="true deletes the pods and keeps the run; false resumes it.")
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Pods deleted when the run finishes: None, Running (unfinished ones) or All."
    )
    scheduling_policy: SchedulingPolicy | None = None


class TrainingRunSpec(_Api):
    """``spec`` of a TrainingRun: the trainer's three sections plus resources and run policy."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    resources: Resources = Field(default_factory=Resources)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    pod_template: PodTemplate | None = Field(
        None, description="Merged into every pod: env, volumes, serviceAccountName, ... (pod_template.py)."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainingRunSpec:
        """The rules across fields; each is also a CEL rule of the CRD (``crd.py``), so ``kubectl
        apply`` refuses the spec first and the operator says the same thing if one gets past."""
        problems = trainer_cross_checks(self.model, self.data, self.training)
        problems += spec_cross_checks(self)
        if problems:
            raise FieldErrors(problems)
        return self

    def train_config(self) -> TrainConfig:
        """The trainer's view of this spec (before the GPU matrix adjusts batch and precision)."""
        return TrainConfig(
            model=self.model.model_copy(), data=self.data.model_copy(), training=self.training.model_copy()
        )


def chosen(section: BaseModel, field: str) -> bool:
    """Written in the spec with a value other than the field's default."""
    default = type(section).model_fields[field].default
    return field in section.model_fields_set and getattr(section, field) != default


def spec_cross_checks(spec: TrainingRunSpec) -> list[tuple[str, str]]:
    """Contradictions between fields of a run, as (camelCase path, message) pairs.

    Options of another family, an explicit hybrid window and an explicit warm-up are checked only
    when *chosen*: written with a value other than the default (:func:`chosen`). The CRD gives
    them no default, so its CEL rules (``!has(x) || x == default || ...``) see the same thing, and
    a spec dumped whole (every default written out, as ``model_dump`` does) stays valid.
    """
    model, data, training, res = spec.model, spec.data, spec.training, spec.resources
    problems = []
    for field, families in FAMILY_OPTIONS.items():
        if chosen(model, field) and model.architecture not in families:
            problems.append(
                (
                    f"model.{to_camel(field)}",
                    f"applies to architecture {', '.join(families)} only, not {model.architecture}",
                )
            )
    if (
        model.architecture == "hybrid"
        and chosen(model, "hybrid_local_window")
        and model.hybrid_local_window > data.seq_len
    ):
        problems.append(
            (
                "model.hybridLocalWindow",
                f"{model.hybrid_local_window} exceeds data.seqLen ({data.seq_len}): "
                "a window longer than the sequence is full attention",
            )
        )
    if chosen(training, "warmup_steps") and training.warmup_steps > training.total_steps:
        problems.append(
            (
                "training.warmupSteps",
                f"{training.warmup_steps} exceeds the run's steps "
                f"(numEpochs x stepsPerEpoch = {training.total_steps})",
            )
        )
    if training.device == "cuda" and not res.auto and res.gpus_per_node == 0:
        problems.append(("training.device", "cuda needs GPUs; resources.gpusPerNode is 0"))
    if training.metrics_port is not None and training.metrics_port == res.master_port:
        problems.append(
            (
                "training.metricsPort",
                f"{training.metrics_port} is resources.masterPort (torchrun's rendezvous port)",
            )
        )
    return problems


# ------------------------------------------------------------------------------------------------
# Status
# ------------------------------------------------------------------------------------------------
class Condition(_Api):
    """A Kubernetes-style condition; ``lastTransitionTime`` changes only when ``status`` does."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class ReplicaStatus(_Api):
    """Pod counts of one replica type (Master or Worker), Kubeflow style."""

    active: int = 0
    succeeded: int = 0
    failed: int = 0


class ChosenShape(_Api):
    """The shape the run was given and why (the GPU matrix's row, or 'explicit')."""

    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    gpus: int = Field(description="Total GPUs (nodes x gpusPerNode).")
    world_size: int = Field(description="torchrun processes in total (nodes x nprocPerNode).")
    gpu_type: str | None = None
    batch_size: int = Field(description="Per-process micro-batch.")
    global_batch_size: int = Field(
        description="Samples per optimizer step (micro x processes x accumulation)."
    )
    gradient_accumulation_steps: int
    mixed_precision: bool
    source: Literal["auto", "explicit"]
    reason: str


class Progress(_Api):
    """Latest training progress reported by the trainer."""

    step: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None


class TrainingRunStatus(_Api):
    """``status`` of a TrainingRun, written only by the operator (status subresource)."""

    phase: Literal["Pending", "Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended"] = (
        "Pending"
    )
    message: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    replica_statuses: dict[str, ReplicaStatus] = Field(default_factory=dict)
    start_time: str | None = None
    completion_time: str | None = None
    restart_count: int = 0
    observed_generation: int | None = None
    chosen_shape: ChosenShape | None = None
    progress: Progress | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    checkpoint: str | None = None


def parse_spec(spec: dict[str, Any] | None) -> TrainingRunSpec:
    """Validate a TrainingRun ``spec``; raise :class:`ConfigError` naming each bad field."""
    try:
        return TrainingRunSpec.model_validate(spec or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix="spec.")) from None


def parse_status(status: dict[str, Any] | None) -> TrainingRunStatus:
    """Read the stored status leniently: a status this version cannot read starts over as Pending."""
    try:
        return TrainingRunStatus.model_validate(status or {})
    except ValidationError:
        return TrainingRunStatus()


def check_run_name(name: str) -> None:
    """Refuse names that cannot become a Service and pod names (see MAX_RUN_NAME_LENGTH)."""
    if len(name) > MAX_RUN_NAME_LENGTH or not _DNS1035.match(name):
        raise ConfigError(
            f"metadata.name: {name!r} must be a DNS-1035 label (lowercase letters, digits and '-', "
            f"starting with a letter) of at most {MAX_RUN_NAME_LENGTH} characters"
        )
