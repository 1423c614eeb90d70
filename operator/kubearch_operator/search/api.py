"""The ArchitectureSearch API (``kubearch.dev/v1alpha1``) as pydantic models.

Why here, next to the TrainingRun models: a search's ``trialTemplate`` *is* a TrainingRun spec, so
its search space is checked against :class:`~kubearch_operator.api.TrainingRunSpec` itself — a path
that does not exist or a value a TrainingRun would refuse is refused with the path named, before
any trial exists. This module imports neither torch nor kopf: the same classes generate the CRD
(``kubearch_operator.crd``), validate specs in the operator, and drive ``kubearch search`` on a
laptop.

Names follow Katib where Katib has one (``objective.goal``, ``parallelTrials``,
``maxFailedTrials``) and the issue's manifest elsewhere.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, get_args

from kubearch_trainer.config import PATTERN_DESCRIPTIONS, ConfigError, FieldErrors, format_validation_error
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ..api import GROUP, VERSION, Condition, TrainingRunSpec, _Api

KIND = "ArchitectureSearch"
PLURAL = "architecturesearches"
SINGULAR = "architecturesearch"
#: ``as`` is a Python keyword and ``kubectl get as`` reads badly; ``asearch`` clashes with nothing built in.
SHORT_NAMES = ("asearch", "asr")
API_VERSION = f"{GROUP}/{VERSION}"

SEARCH_PHASES = ("Pending", "Running", "Succeeded", "Failed")
TRIAL_STATES = ("Planned", "Created", "Running", "Succeeded", "Failed", "Stopped")
#: Trial states that will not change any more.
FINAL_TRIAL_STATES = frozenset({"Succeeded", "Failed", "Stopped"})

#: Objective metrics whose goal is implied; any other metric the trainer reports needs ``goal``.
KNOWN_GOALS: dict[str, str] = {
    "valLoss": "minimize",
    "trainLoss": "minimize",
    "perplexity": "minimize",
    "valAccuracy": "maximize",
    "tokensPerSecond": "maximize",
}
#: Top-level sections of a TrainingRun spec a search parameter may point into.
SECTIONS = ("model", "data", "training", "resources", "runPolicy")
#: A trial's ``numEpochs`` is forced to 1 and ``stepsPerEpoch`` to the rung's steps.
RUNG_STEP_PATHS = ("training.stepsPerEpoch", "training.numEpochs")

Scalar = str | int | float | bool

# Bounds (issue 9's bad-input rule): every number has a sane maximum, every string a length, every
# list a size. Each bound is in the CRD's schema (or a CEL rule) and in these models.
#: |min|, |max|, step and goalValue: no TrainingRun number goes beyond 1e15 (resources.datasetSamples,
#: the largest bound; tests/unit/test_search_bounds.py checks it), so a range beyond it only holds
#: values every trial would refuse.
NUMBER_LIMIT = 1e15
#: Values of one parameter: a list, or a range's steps (``(max - min) / step``). Also what keeps
#: grid enumeration cheap: 256 per axis.
MAX_VALUES = 256
#: A string in ``values``: the longest TrainingRun string field (training.outputDir, data.path).
MAX_VALUE_LENGTH = 4096
#: Paths set per rung by ``rungOverrides``.
MAX_OVERRIDES = 32
#: A rung's steps become the trial's ``training.stepsPerEpoch`` (its maximum).
MAX_RUNG_STEPS = 1_000_000_000
#: Configurations a search may try. Each configuration keeps one record per rung in
#: ``status.trials`` (two after an OOM retry) and the whole object must stay under etcd's request
#: limit (1.5 MiB): see :func:`status_size_bound` and ``STATUS_BUDGET_BYTES``.
MAX_TRIALS = 200
#: What ``status`` may grow to at most, of etcd's default 1.5 MiB (``--max-request-bytes``): the
#: rest is for the spec (whose template can be large), metadata and managedFields.
STATUS_BUDGET_BYTES = 1_000_000
#: (maxTrials + maxFailedTrials) x rungs: configuration-rungs a search may record. With two records
#: each at most (an OOM retry) of at most :data:`RECORD_BYTES_SMALL` bytes (one short parameter),
#: they fill at most :data:`STATUS_BUDGET_BYTES`; the test checks the arithmetic, the operator also
#: checks the spec's own parameters (:func:`status_size_bound`). A CEL rule of the CRD.
MAX_CONFIG_RUNGS = 250
#: The spec itself, as JSON: with the status budget and metadata it stays under etcd's 1.5 MiB.
SPEC_BUDGET_BYTES = 400_000
#: ``planning.gpuMemory``: a Kubernetes quantity (or ``24GB``) between 1 GiB and 4 TiB.
GPU_MEMORY_PATTERN = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[eEk]|GB|MB)?$"
GPU_MEMORY_MAX_LENGTH = 32
GPU_MEMORY_RANGE = (2**30, 4 * 2**40)
PATTERN_DESCRIPTIONS[GPU_MEMORY_PATTERN] = "a byte quantity such as 24Gi, 80G or 25769803776"
#: Status text is clipped to these lengths (the record size bound relies on them).
MAX_STATUS_MESSAGE = 240
MAX_STATUS_REASON = 64
#: Metrics a trial record keeps: those of KEPT_METRICS it has, plus this many others (the objective
#: when it is not one of them; the engine passes no others), names as long as objective.metric.
MAX_OTHER_METRICS = 1
MAX_METRIC_NAME = 100
#: Objectives whose range is known: a goalValue outside it is never reached (valAccuracy 95 is a
#: percentage where a fraction is meant). name -> (lowest, highest) allowed goalValue.
GOAL_VALUE_RANGES: dict[str, tuple[float, float]] = {
    "valAccuracy": (0.0, 1.0),
    "valLoss": (0.0, NUMBER_LIMIT),
    "trainLoss": (0.0, NUMBER_LIMIT),
    "perplexity": (1.0, NUMBER_LIMIT),
    "tokensPerSecond": (0.0, NUMBER_LIMIT),
}


def _camel_path(path: str) -> str:
    """``training.learning_rate`` -> ``training.learningRate`` (both spellings are accepted)."""
    return ".".join(to_camel(p) if "_" in p else p for p in path.split("."))


def _check_scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, str) and len(value) > MAX_VALUE_LENGTH:
        raise ValueError(f"{where}: a string of {len(value)} characters; at most {MAX_VALUE_LENGTH}")
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > NUMBER_LIMIT:
        raise ValueError(f"{where}: {value!r} is outside [-1e15, 1e15]")
    if isinstance(value, bool | int | float | str) and not (
        isinstance(value, float) and not math.isfinite(value)
    ):
        return value
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise ValueError(f"{where}: {shown} is not a string, number or boolean")


def set_path(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Return a copy of a (camelCase) spec dict with ``path`` set to ``value``; parents are created."""
    out = _deep_copy(spec)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def template_dict(template: TrainingRunSpec) -> dict[str, Any]:
    """The trial template as the user wrote it (camelCase, unset fields left out)."""
    return template.model_dump(mode="json", by_alias=True, exclude_unset=True)


def check_assignment(template: TrainingRunSpec, assignment: dict[str, Any], where: str) -> TrainingRunSpec:
    """Apply ``path -> value`` pairs to the template and validate the result as a TrainingRun spec.

    Raises ValueError naming ``where`` and the TrainingRun's own message (e.g. ``model.size: 'huge'
    is not one of tiny, ...``), so a bad value is refused before any trial exists.
    """
    spec = template_dict(template)
    for path, value in assignment.items():
        spec = set_path(spec, path, value)
    try:
        return TrainingRunSpec.model_validate(spec)
    except ValidationError as err:
        lines = []
        for line in format_validation_error(err).splitlines():
            field, _, msg = line.partition(": ")
            if len(assignment) == 1 and field == next(iter(assignment)):
                lines.append(f"{where}: {msg} (as {field} of a TrainingRun spec)")
            else:
                lines.append(f"{where}: trialTemplate.{line}")
        raise ValueError("\n".join(lines)) from None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``X`` or ``X | None``), or None for a leaf value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def path_problem(path: str) -> str | None:
    """Why ``path`` (camelCase) does not name a value field of a TrainingRun spec; None if it does.

    The message lists the fields that do exist where the path went wrong, so a typo is fixed at once.
    """
    model: type[BaseModel] | None = TrainingRunSpec
    walked: list[str] = []
    for part in path.split("."):
        if model is None:
            return f"{'.'.join(walked)} is a value, it has no field {part!r}"
        fields = {(info.alias or name): info for name, info in model.model_fields.items()}
        info = fields.get(part)
        if info is None:
            where = ".".join(walked) or "a TrainingRun spec"
            return f"{path!r} is not a field of a TrainingRun spec; {where} has: {', '.join(sorted(fields))}"
        walked.append(part)
        model = _submodel(info.annotation)
    if model is not None:
        return (
            f"{path!r} is a whole section; name one of its fields ({', '.join(sorted(model.model_fields))})"
        )
    return None


def path_exists(path: str) -> bool:
    """Whether ``path`` (camelCase) names a value field of a TrainingRun spec (not a whole section)."""
    return path_problem(path) is None


class SearchParameter(_Api):
    """One axis of the search: a path into the trial spec and a list of values or a numeric range."""

    path: str = Field(
        max_length=200,
        pattern=r"^(model|data|training|resources|runPolicy)(\.[A-Za-z][A-Za-z0-9_]*)+$",
        description="Field of the trial spec, e.g. model.size, model.attention, training.learningRate.",
    )
    values: list[Any] | None = Field(
        None,
        min_length=1,
        max_length=MAX_VALUES,
        description="The values to try (strings, numbers or booleans).",
    )
    min: float | None = Field(
        None,
        ge=-NUMBER_LIMIT,
        le=NUMBER_LIMIT,
        description="Lower end of a numeric range (random / tpe; grid needs step).",
    )
    max: float | None = Field(
        None, ge=-NUMBER_LIMIT, le=NUMBER_LIMIT, description="Upper end of a numeric range (inclusive)."
    )
    log: bool = Field(False, description="Sample the range on a log scale (min must be > 0).")
    step: float | None = Field(
        None,
        gt=0,
        le=NUMBER_LIMIT,
        description=f"Spacing of the range's values (grid enumerates them); at most {MAX_VALUES} values.",
    )
    type: Literal["int", "float"] | None = Field(
        None, description="Range type; default int when min, max (and step) are whole numbers, else float."
    )

    @field_validator("path")
    @classmethod
    def _camel(cls, value: str) -> str:
        return _camel_path(value)

    @field_validator("values")
    @classmethod
    def _scalars(cls, values: list[Any] | None) -> list[Any] | None:
        if values is None:
            return None
        if not values:
            raise ValueError("must list at least one value")
        out = [_check_scalar(v, f"values[{i}]") for i, v in enumerate(values)]
        if len({repr(v) for v in out}) != len(out):
            raise ValueError("lists a value twice")
        return out

    @model_validator(mode="after")
    def _values_or_range(self) -> SearchParameter:
        has_range = self.min is not None or self.max is not None
        if (self.values is None) == (not has_range):
            raise ValueError("give either values or min and max")
        if has_range:
            if self.min is None or self.max is None:
                raise ValueError("a range needs both min and max")
            if not self.min < self.max:
                raise FieldErrors([("max", f"{self.max:g} must be above min ({self.min:g})")])
            if self.log and self.min <= 0:
                raise FieldErrors([("min", f"{self.min:g}: log: true needs min > 0")])
            if self.log and self.step is not None:
                raise FieldErrors([("step", "log and step exclude each other")])
            if self.step is not None:
                span = self.max - self.min
                if self.step > span:
                    raise FieldErrors(
                        [("step", f"{self.step:g} is larger than the range max - min ({span:g})")]
                    )
                if span / self.step >= MAX_VALUES:
                    raise FieldErrors(
                        [
                            (
                                "step",
                                f"{self.step:g} makes {math.floor(span / self.step) + 1} values of "
                                f"[{self.min:g}, {self.max:g}]; at most {MAX_VALUES} (a larger step)",
                            )
                        ]
                    )
            if self.type == "int" and not all(
                float(x).is_integer() for x in (self.min, self.max, self.step or 1)
            ):
                raise FieldErrors([("type", "int needs whole numbers for min, max and step")])
            if self.type is None:
                whole = all(float(x).is_integer() for x in (self.min, self.max, self.step or 1))
                self.type = "int" if whole else "float"
        elif self.log or self.step is not None or self.type is not None:
            raise ValueError("log, step and type apply to ranges (min/max), not to values")
        return self

    @property
    def is_range(self) -> bool:
        return self.values is None

    def grid_values(self) -> list[Any]:
        """Every value grid search visits; a range needs a step."""
        if self.values is not None:
            return list(self.values)
        if self.step is None:
            raise ValueError(f"{self.path}: grid search needs values or a range with step")
        assert self.min is not None and self.max is not None
        count = math.floor((self.max - self.min) / self.step + 1e-9) + 1
        out = [self.min + i * self.step for i in range(count)]
        return [round(v) for v in out] if self.type == "int" else out


class Objective(_Api):
    """What a trial is judged by: a metric the trainer reports and whether lower or higher is better."""

    metric: str = Field(
        "valLoss",
        max_length=100,
        pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
        description="valLoss, valAccuracy, perplexity, tokensPerSecond, or any metric the trainer reports.",
    )
    goal: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize for losses and perplexity, maximize for accuracy and speed."
    )
    goal_value: float | None = Field(
        None,
        ge=-NUMBER_LIMIT,
        le=NUMBER_LIMIT,
        description="The search succeeds as soon as a trial reaches this objective (valAccuracy: a "
        "fraction in [0, 1]; losses and tokensPerSecond >= 0; perplexity >= 1).",
    )

    @field_validator("metric")
    @classmethod
    def _camel(cls, value: str) -> str:
        return to_camel(value) if "_" in value else value

    @model_validator(mode="after")
    def _goal(self) -> Objective:
        if self.goal is None:
            implied = KNOWN_GOALS.get(self.metric)
            if implied is None:
                raise FieldErrors(
                    [("goal", f"{self.metric!r} has no implied direction; set goal to minimize or maximize")]
                )
            self.goal = implied  # type: ignore[assignment]
        bounds = GOAL_VALUE_RANGES.get(self.metric)
        if self.goal_value is not None and bounds is not None:
            lo, hi = bounds
            if not lo <= self.goal_value <= hi:
                allowed = f"between {lo:g} and {hi:g}" if hi < NUMBER_LIMIT else f">= {lo:g}"
                raise FieldErrors(
                    [("goalValue", f"{self.goal_value:g} is never reached: {self.metric} is {allowed}")]
                )
        return self

    @property
    def minimize(self) -> bool:
        return self.goal == "minimize"


class EarlyStopping(_Api):
    """Katib's median stop at rung granularity: after a rung, a trial worse than the median stops."""

    name: Literal["medianStop"] = "medianStop"
    min_trials_required: int = Field(
        3, ge=1, le=1000, description="Finished trials at a rung before anything is stopped there."
    )
    start_rung: int = Field(0, ge=0, le=15, description="First rung (0-based) at which trials may stop.")


class Algorithm(_Api):
    """How trials are proposed and promoted."""

    name: Literal["grid", "random", "asha", "tpe"] = Field("grid", description="Search algorithm.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of random, tpe and ties.")
    rungs: list[Annotated[int, Field(ge=1, le=MAX_RUNG_STEPS)]] = Field(
        default_factory=list,
        max_length=16,
        description="Training steps per rung, increasing (e.g. [50, 200]); default one rung with the "
        "template's steps. Every algorithm trains a configuration rung by rung; asha promotes the top "
        "1/eta of each rung, the others train every configuration at every rung unless early-stopped.",
    )
    rung_overrides: list[Annotated[dict[str, Any], Field(max_length=MAX_OVERRIDES)]] = Field(
        default_factory=list,
        max_length=16,
        description="Per rung, path -> value set on that rung's trials (e.g. training.batchSize).",
    )
    eta: int = Field(
        3, ge=2, le=16, description="asha: reduction factor; the top 1/eta of a rung is promoted."
    )
    n_startup_trials: int = Field(
        10, ge=0, le=1000, description="tpe: random configurations before the model-based sampler starts."
    )
    early_stopping: EarlyStopping | None = None

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, rungs: list[int]) -> list[int]:
        for i, steps in enumerate(rungs):
            if steps < 1:
                raise ValueError(f"rungs[{i}]: {steps} must be >= 1")
            if i and steps <= rungs[i - 1]:
                raise ValueError(f"rungs[{i}]: {steps} must be larger than rungs[{i - 1}] ({rungs[i - 1]})")
        return rungs

    @model_validator(mode="after")
    def _overrides_match(self) -> Algorithm:
        if self.rung_overrides and len(self.rung_overrides) != len(self.rungs):
            raise FieldErrors(
                [
                    (
                        "rungOverrides",
                        f"{len(self.rung_overrides)} entries but rungs has {len(self.rungs)}: one per rung",
                    )
                ]
            )
        if self.name == "asha" and len(self.rungs) < 2:
            raise FieldErrors([("rungs", "asha needs at least two rungs (training steps), e.g. [50, 200]")])
        stopping = self.early_stopping
        if stopping is not None:
            if self.name == "asha":
                raise FieldErrors(
                    [("earlyStopping", "applies to grid, random and tpe; asha stops by not promoting")]
                )
            if stopping.start_rung > len(self.rungs) - 2:
                raise FieldErrors(
                    [
                        (
                            "earlyStopping.startRung",
                            f"{stopping.start_rung}: median stop acts after a rung that has a next "
                            f"one, so it needs at most len(rungs) - 2 = {len(self.rungs) - 2} "
                            f"(rungs has {len(self.rungs)})",
                        )
                    ]
                )
        self.rung_overrides = [{_camel_path(k): v for k, v in o.items()} for o in self.rung_overrides]
        return self


class Budget(_Api):
    """Limits of the search."""

    max_trials: int | None = Field(
        None,
        ge=1,
        le=MAX_TRIALS,
        description="Configurations to try (a configuration's rungs count once); default: the grid's "
        f"size for grid, 16 otherwise. (maxTrials + maxFailedTrials) x rungs is at most {MAX_CONFIG_RUNGS} "
        "(the status keeps a record per trial).",
    )
    parallel_trials: int = Field(
        1, ge=1, le=256, description="Trials (TrainingRuns) running at once; at most maxTrials."
    )
    max_failed_trials: int = Field(
        3,
        ge=0,
        le=MAX_TRIALS,
        description="The search fails after more failed trials (each is replaced by a new configuration).",
    )
    max_gpus: int | None = Field(None, ge=1, le=4096, description="GPUs in use by running trials at once.")

    @model_validator(mode="after")
    def _parallel_within_trials(self) -> Budget:
        if self.max_trials is not None and self.parallel_trials > self.max_trials:
            raise FieldErrors(
                [
                    (
                        "parallelTrials",
                        f"{self.parallel_trials} exceeds maxTrials ({self.max_trials}): at most "
                        "maxTrials trials can ever run at once",
                    )
                ]
            )
        return self


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([EPTGMK]i?|[eEk]|GB|MB)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "MB": 10**6,
    "GB": 10**9,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_bytes(quantity: str | int) -> int:
    """A Kubernetes quantity (``24Gi``, ``80G``, ``25769803776``) in bytes."""
    if isinstance(quantity, int):
        return quantity
    m = _QUANTITY.match(quantity.strip())
    if not m:
        raise ValueError(f"{quantity!r} is not a byte quantity such as 24Gi, 80G or 25769803776")
    return int(float(m.group(1)) * _QUANTITY_FACTORS[m.group(2)])


class Planning(_Api):
    """The memory planner: fit each trial to its GPU *before* it is created (see planner.py)."""

    enabled: bool = Field(True, description="Plan trials' memory (micro-batch, accumulation, checkpointing).")
    gpu_memory: str | None = Field(
        None,
        max_length=GPU_MEMORY_MAX_LENGTH,
        pattern=GPU_MEMORY_PATTERN,
        description="Memory of one trial GPU (e.g. 24Gi), between 1Gi and 4Ti; default: looked up from "
        "trialTemplate.resources.gpuType (RTX-4090, A100-SXM4-80GB, H100, ...).",
    )
    safety_margin: float = Field(
        0.1,
        ge=0.0,
        lt=0.9,
        description="Fraction of the GPU kept free for what the estimator does not model (CUDA context, "
        "allocator slack, workspaces).",
    )

    @field_validator("gpu_memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None:
            lo, hi = GPU_MEMORY_RANGE
            if not lo <= parse_bytes(value) <= hi:
                raise ValueError(f"{value!r} is not between 1Gi and 4Ti (the memory of one GPU)")
        return value

    def gpu_memory_bytes(self) -> int | None:
        return parse_bytes(self.gpu_memory) if self.gpu_memory else None


class ArchitectureSearchSpec(_Api):
    """``spec`` of an ArchitectureSearch."""

    trial_template: TrainingRunSpec = Field(
        default_factory=TrainingRunSpec, description="The TrainingRun spec every trial starts from."
    )
    search_space: list[SearchParameter] = Field(min_length=1, max_length=32)
    objective: Objective = Field(default_factory=Objective)
    algorithm: Algorithm = Field(default_factory=Algorithm)
    budget: Budget = Field(default_factory=Budget)
    planning: Planning = Field(default_factory=Planning)

    @model_validator(mode="after")
    def _space_fits_template(self) -> ArchitectureSearchSpec:
        seen: set[str] = set()
        for i, param in enumerate(self.search_space):
            where = f"searchSpace[{i}]"
            if param.path in seen:
                raise ValueError(f"{where}.path: {param.path!r} appears twice in searchSpace")
            seen.add(param.path)
            if param.path in RUNG_STEP_PATHS:
                raise ValueError(
                    f"{where}.path: {param.path!r} is set by algorithm.rungs (steps per trial), not searched"
                )
            problem = path_problem(param.path)
            if problem:
                raise ValueError(f"{where}.path: {problem}")
            if param.values is not None:
                probes = [(f"{where}.values[{j}]", v) for j, v in enumerate(param.values)]
            else:
                lo, hi = (param.min, param.max) if param.type == "float" else (int(param.min), int(param.max))
                probes = [(f"{where}.min", lo), (f"{where}.max", hi)]
            for at, value in probes:
                check_assignment(self.trial_template, {param.path: value}, at)
            if self.algorithm.name == "grid":
                try:
                    param.grid_values()
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
        for r, overrides in enumerate(self.algorithm.rung_overrides):
            for path, value in overrides.items():
                where = f"algorithm.rungOverrides[{r}].{path}"
                if path in RUNG_STEP_PATHS:
                    raise ValueError(f"{where}: trial length is set by algorithm.rungs")
                problem = path_problem(path)
                if problem:
                    raise ValueError(f"{where}: {problem}")
                check_assignment(self.trial_template, {path: value}, where)
        self._fits_in_one_object()
        return self

    def _fits_in_one_object(self) -> None:
        """The status keeps a record per trial: refuse a budget whose status could outgrow etcd's
        object limit, naming the largest maxTrials that fits (see :func:`status_size_bound`)."""
        budget, rungs = self.budget, len(self.rung_steps())
        if self.algorithm.name == "grid" and budget.max_trials is None and self.grid_size() > MAX_TRIALS:
            raise FieldErrors(
                [
                    (
                        "budget.maxTrials",
                        f"the grid has {self.grid_size()} configurations, more than {MAX_TRIALS}; set "
                        f"maxTrials (at most {MAX_TRIALS}) to try the first ones, or search a smaller grid",
                    )
                ]
            )
        config_rungs = (self.max_trials() + budget.max_failed_trials) * rungs
        if config_rungs > MAX_CONFIG_RUNGS:
            raise FieldErrors(
                [
                    (
                        "budget.maxTrials",
                        f"(maxTrials {self.max_trials()} + maxFailedTrials {budget.max_failed_trials}) x "
                        f"{rungs} rung(s) = {config_rungs}; at most {MAX_CONFIG_RUNGS}: the status keeps a "
                        "record of every trial and must fit in one object (etcd's 1.5 MiB)",
                    )
                ]
            )
        size = status_size_bound(self)
        if size > STATUS_BUDGET_BYTES:
            fits = _largest_max_trials(self)
            raise FieldErrors(
                [
                    (
                        "budget.maxTrials",
                        f"{self.max_trials()}: with these parameters' values and {rungs} rung(s) the status "
                        f"could reach {size} bytes, over the {STATUS_BUDGET_BYTES} kept for it of etcd's "
                        f"1.5 MiB object limit; at most {fits} fit (or shorten the values)",
                    )
                ]
            )
        size = json_size(self.model_dump(mode="json", by_alias=True, exclude_unset=True))
        if size > SPEC_BUDGET_BYTES:
            raise ValueError(f"the spec takes {size} bytes as JSON; at most {SPEC_BUDGET_BYTES}")

    def rung_steps(self) -> list[int]:
        """Training steps of each rung; one rung of the template's length when none are given."""
        return list(self.algorithm.rungs) or [self.trial_template.training.total_steps]

    def grid_size(self) -> int:
        return math.prod(len(p.grid_values()) for p in self.search_space)

    def max_trials(self) -> int:
        """Configurations the search tries at most."""
        if self.budget.max_trials is not None:
            return self.budget.max_trials
        return self.grid_size() if self.algorithm.name == "grid" else 16


# ------------------------------------------------------------------------------------------------
# Status
# ------------------------------------------------------------------------------------------------
def json_size(value: Any) -> int:
    """Bytes of ``value`` as the API server stores it (JSON, UTF-8)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def clip(text: str, limit: int) -> str:
    """``text`` cut so that it takes at most ``limit`` bytes as a JSON string (quotes aside): the
    size bound holds for any text, escapes and multi-byte characters included. An ellipsis marks a cut."""
    if json_size(text) - 2 <= limit:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with "..."
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if json_size(text[:mid]) - 2 + 3 <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "..."


#: Metrics a trial record keeps first (the objective, the leaderboard's and the report's); other
#: metrics the trainer reports fill the rest of MAX_TRIAL_METRICS in name order.
KEPT_METRICS = (
    "valLoss",
    "trainLoss",
    "valAccuracy",
    "perplexity",
    "tokensPerSecond",
    "peakMemoryBytes",
    "timeSeconds",
    "steps",
)


class TrialRecord(_Api):
    """One trial: a configuration at one rung, run as the child TrainingRun ``name``.

    Written to the search's status *before* the TrainingRun is created, so an operator restart finds
    the intent and creates exactly that run (deterministic name) — never a second one.

    Its size is bounded (texts clipped, the metrics of KEPT_METRICS and MAX_OTHER_METRICS more, also
    on assignment), so
    that :func:`status_size_bound` holds: the status of a search must fit in one etcd object.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True
    )

    index: int = Field(ge=0, description="Creation order; the run is named <search>-<index>.")
    name: str
    config: int = Field(ge=0, description="Configuration number; a promotion keeps it.")
    rung: int = Field(0, ge=0)
    steps: int = Field(ge=1, description="Training steps of this trial (its rung).")
    parameters: dict[str, Any] = Field(default_factory=dict, description="path -> value.")
    state: Literal["Planned", "Created", "Running", "Succeeded", "Failed", "Stopped"] = "Planned"
    reason: str = ""
    message: str = ""
    objective: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    plan: dict[str, Any] = Field(
        default_factory=dict,
        description="What the memory planner changed (batch, accumulation, ...) and why.",
    )
    oom_retries: int = Field(0, ge=0)
    start_time: str | None = None
    completion_time: str | None = None
    create_failures: int = Field(
        0, ge=0, description="Failed attempts to create the TrainingRun (errors other than a refusal)."
    )

    @field_validator("message", mode="before")
    @classmethod
    def _clip_message(cls, value: Any) -> Any:
        return clip(value, MAX_STATUS_MESSAGE) if isinstance(value, str) else value

    @field_validator("reason", mode="before")
    @classmethod
    def _clip_reason(cls, value: Any) -> Any:
        return clip(value, MAX_STATUS_REASON) if isinstance(value, str) else value

    @field_validator("metrics", mode="before")
    @classmethod
    def _few_metrics(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        known = [k for k in KEPT_METRICS if k in value]
        others = sorted(
            k
            for k in value
            if k not in KEPT_METRICS and isinstance(k, str) and json_size(k) - 2 <= MAX_METRIC_NAME
        )
        return {k: value[k] for k in known + others[:MAX_OTHER_METRICS]}

    @field_validator("plan", mode="before")
    @classmethod
    def _clip_plan(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: clip(v, MAX_STATUS_MESSAGE) if isinstance(v, str) else v for k, v in value.items()}


class LeaderboardEntry(_Api):
    """A ranked trial, best first."""

    rank: int
    trial: str
    config: int
    rung: int
    steps: int
    parameters: dict[str, Any] = Field(default_factory=dict)
    objective: float
    val_accuracy: float | None = None
    time_seconds: float | None = None
    peak_memory_bytes: float | None = None
    tokens_per_second: float | None = None


class RungStatistics(_Api):
    """The seed's per-mode statistics: success rate and mean ± std / range of the objective."""

    rung: int
    steps: int
    trials: int = 0
    succeeded: int = 0
    failed: int = 0
    stopped: int = 0
    success_rate: float | None = None
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None


class TrialCounts(_Api):
    total: int = 0
    planned: int = 0
    created: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    stopped: int = 0


class ArchitectureSearchStatus(_Api):
    """``status`` of an ArchitectureSearch, written only by the operator (or ``kubearch search``)."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed"] = "Pending"
    message: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    configurations: int = Field(0, description="Configurations proposed so far.")
    trial_counts: TrialCounts = Field(default_factory=TrialCounts)
    best_trial: LeaderboardEntry | None = None
    leaderboard: list[LeaderboardEntry] = Field(default_factory=list)
    rung_statistics: list[RungStatistics] = Field(default_factory=list)
    algorithm_state: dict[str, Any] = Field(
        default_factory=dict, description="The algorithm's persisted state (JSON), read back after a restart."
    )
    trials: list[TrialRecord] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# The status must fit in one etcd object
# ------------------------------------------------------------------------------------------------
#: The longest JSON number (a float with 17 significant digits and a 3-digit exponent).
_LONG_FLOAT = -1.2345678901234567e-300
_TIME = "2026-01-01T00:00:00Z"
#: Bytes kept for the status outside ``trials``: message, conditions, algorithm state (measured
#: bounds: conditions' messages are clipped to MAX_CONDITION_MESSAGE).
MAX_CONDITION_MESSAGE = 2000
_CONDITIONS = 6  # Running, Succeeded/Failed, SpecValid, TrialsCreating, spare
#: A trial's name: a TrainingRun name (api.MAX_RUN_NAME_LENGTH = 52).
_NAME = "n" * 52


def _longest_value(param: SearchParameter) -> Any:
    if param.values is not None:
        return max(param.values, key=json_size)
    assert param.min is not None and param.max is not None
    if param.type == "int":
        return max((int(param.min), int(param.max)), key=json_size)
    return _LONG_FLOAT


def _longest_parameters(spec: ArchitectureSearchSpec) -> dict[str, Any]:
    return {p.path: _longest_value(p) for p in spec.search_space}


def largest_trial_record(spec: ArchitectureSearchSpec) -> TrialRecord:
    """The largest record a trial of ``spec`` can have: every text at its clip length, as many
    metrics as kept, the planner's whole plan, the longest value of every parameter."""
    text, reason = "m" * MAX_STATUS_MESSAGE, "r" * MAX_STATUS_REASON
    plan = {
        "planned": True,
        "fits": True,
        "changed": True,
        "batchSize": 1_048_576,
        "gradientAccumulationSteps": 65536,
        "gradientCheckpointing": False,
        "originalBatchSize": 1_048_576,
        "originalGradientAccumulationSteps": 65536,
        "estimatedBytes": 10**15,
        "unplannedBytes": 10**15,
        "limitBytes": 10**15,
        "gpuMemoryBytes": 10**15,
        "reason": text,
        "oomRetryOf": _NAME,
    }
    metrics = dict.fromkeys(KEPT_METRICS, _LONG_FLOAT)
    metrics |= {f"{'k' * (MAX_METRIC_NAME - 1)}{i}": _LONG_FLOAT for i in range(MAX_OTHER_METRICS)}
    return TrialRecord(
        index=99_999,
        name=_NAME,
        config=99_999,
        rung=15,
        steps=MAX_RUNG_STEPS,
        parameters=_longest_parameters(spec),
        state="Succeeded",
        reason=reason,
        message=text,
        objective=_LONG_FLOAT,
        metrics=metrics,
        plan=plan,
        oom_retries=1,
        start_time=_TIME,
        completion_time=_TIME,
        create_failures=99,
    )


def _record_json(model: BaseModel) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def status_overhead_bound(spec: ArchitectureSearchSpec) -> int:
    """Bytes of a status without its trial records, at most: the leaderboard (10 entries), the
    rung statistics, the conditions, the message and the algorithm's state."""
    entry = LeaderboardEntry(
        rank=99_999,
        trial=_NAME,
        config=99_999,
        rung=15,
        steps=MAX_RUNG_STEPS,
        parameters=_longest_parameters(spec),
        objective=_LONG_FLOAT,
        val_accuracy=_LONG_FLOAT,
        time_seconds=_LONG_FLOAT,
        peak_memory_bytes=_LONG_FLOAT,
        tokens_per_second=_LONG_FLOAT,
    )
    f = _LONG_FLOAT
    rung = RungStatistics(rung=15, steps=MAX_RUNG_STEPS, trials=10**5, succeeded=10**5, failed=10**5,
                          stopped=10**5, success_rate=f, mean=f, std=f, min=f, max=f)  # fmt: skip
    condition = Condition(
        type="TrialsCreating",
        status="Unknown",
        reason="r" * MAX_STATUS_REASON,
        message="m" * MAX_CONDITION_MESSAGE,
        last_transition_time=_TIME,
    )
    counts = TrialCounts(**dict.fromkeys(TrialCounts.model_fields, 10**6))
    state = {"name": "asha", "seed": 2**31 - 1, "proposed": 10**6, "configurationLimit": 10**6}
    empty = ArchitectureSearchStatus(
        phase="Succeeded",
        message="m" * MAX_CONDITION_MESSAGE,
        observed_generation=2**63 - 1,
        start_time=_TIME,
        completion_time=_TIME,
        configurations=10**6,
        trial_counts=counts,
        best_trial=entry,
        algorithm_state=state,
    )
    return (
        json_size(_record_json(empty))
        + 10 * (json_size(_record_json(entry)) + 1)
        + 16 * (json_size(_record_json(rung)) + 1)
        + _CONDITIONS * (json_size(_record_json(condition)) + 1)
    )


def records_bound(spec: ArchitectureSearchSpec) -> int:
    """Trial records a search keeps at most: every configuration it may propose (maxTrials, plus
    one replacement per failure it tolerates) at every rung, each with one OOM retry."""
    configs = spec.max_trials() + spec.budget.max_failed_trials
    return configs * len(spec.rung_steps()) * 2


def _largest_max_trials(spec: ArchitectureSearchSpec) -> int:
    """The largest maxTrials whose status bound fits the budget (0 if none)."""
    record = json_size(_record_json(largest_trial_record(spec))) + 1
    room = STATUS_BUDGET_BYTES - status_overhead_bound(spec)
    per_config = len(spec.rung_steps()) * 2 * record
    return max(0, room // per_config - spec.budget.max_failed_trials)


def status_size_bound(spec: ArchitectureSearchSpec) -> int:
    """The largest ``status`` (JSON bytes) the search can write: what must fit in etcd."""
    record = json_size(_record_json(largest_trial_record(spec))) + 1
    return status_overhead_bound(spec) + records_bound(spec) * record


def parse_search_spec(spec: dict[str, Any] | None) -> ArchitectureSearchSpec:
    """Validate an ArchitectureSearch ``spec``; raise :class:`ConfigError` naming each bad field."""
    try:
        return ArchitectureSearchSpec.model_validate(spec or {})
    except ValidationError as err:
        raise ConfigError(_field_style(format_validation_error(err, prefix="spec."))) from None


_SPEC_FIELDS = r"(searchSpace|algorithm|objective|budget|planning|trialTemplate)"


def _field_style(text: str) -> str:
    """``spec: searchSpace[0].path: ...`` -> ``spec.searchSpace[0].path: ...`` and list indices in
    brackets (``searchSpace.0`` -> ``searchSpace[0]``): one spelling of a field's place everywhere."""
    out = []
    for line in text.splitlines():
        line = re.sub(rf"^spec: (?={_SPEC_FIELDS}\b)", "spec.", line)
        field, sep, rest = line.partition(": ")
        field = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", field)
        inner = re.match(r"^(\w+)(\[\d+\]): ", rest)  # "spec.algorithm.rungs: rungs[1]: ..."
        if inner and field.endswith("." + inner.group(1)):
            field, rest = field + inner.group(2), rest[inner.end() :]
        out.append(field + sep + rest)
    return "\n".join(out)


def parse_search_status(status: dict[str, Any] | None) -> ArchitectureSearchStatus:
    """Read the stored status; one this version cannot read starts over (trials are found by label)."""
    try:
        return ArchitectureSearchStatus.model_validate(status or {})
    except ValidationError:
        return ArchitectureSearchStatus()
