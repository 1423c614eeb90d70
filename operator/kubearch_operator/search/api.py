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

import math
import re
from typing import Any, Literal, get_args

from kubearch_trainer.config import ConfigError, format_validation_error
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
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


def _camel_path(path: str) -> str:
    """``training.learning_rate`` -> ``training.learningRate`` (both spellings are accepted)."""
    return ".".join(to_camel(p) if "_" in p else p for p in path.split("."))


def _check_scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, bool | int | float | str) and not (
        isinstance(value, float) and not math.isfinite(value)
    ):
        return value
    raise ValueError(f"{where}: {value!r} is not a string, number or boolean")


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
        None, max_length=256, description="The values to try (strings, numbers or booleans)."
    )
    min: float | None = Field(
        None, description="Lower end of a numeric range (random / tpe; grid needs step)."
    )
    max: float | None = Field(None, description="Upper end of a numeric range (inclusive).")
    log: bool = Field(False, description="Sample the range on a log scale (min must be > 0).")
    step: float | None = Field(
        None, gt=0, description="Spacing of the range's values (grid enumerates them)."
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
                raise ValueError(f"min ({self.min}) must be below max ({self.max})")
            if self.log and self.min <= 0:
                raise ValueError(f"log: true needs min > 0 (got {self.min})")
            if self.log and self.step is not None:
                raise ValueError("log and step exclude each other")
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
        None, description="The search succeeds as soon as a trial reaches this objective."
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
                raise ValueError(
                    f"goal: {self.metric!r} has no implied direction; set goal to minimize or maximize"
                )
            self.goal = implied  # type: ignore[assignment]
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
    rungs: list[int] = Field(
        default_factory=list,
        max_length=16,
        description="Training steps per rung, increasing (e.g. [50, 200]); default one rung with the "
        "template's steps. Every algorithm trains a configuration rung by rung; asha promotes the top "
        "1/eta of each rung, the others train every configuration at every rung unless early-stopped.",
    )
    rung_overrides: list[dict[str, Any]] = Field(
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
            raise ValueError(
                f"rungOverrides has {len(self.rung_overrides)} entries but rungs has {len(self.rungs)}"
            )
        if self.name == "asha" and len(self.rungs) < 2:
            raise ValueError("asha needs at least two rungs (training steps), e.g. rungs: [50, 200]")
        self.rung_overrides = [{_camel_path(k): v for k, v in o.items()} for o in self.rung_overrides]
        return self


class Budget(_Api):
    """Limits of the search."""

    max_trials: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Configurations to try (a configuration's rungs count once); default: the grid's "
        "size for grid, 16 otherwise.",
    )
    parallel_trials: int = Field(1, ge=1, le=256, description="Trials (TrainingRuns) running at once.")
    max_failed_trials: int = Field(3, ge=0, le=1000, description="The search fails after more failed trials.")
    max_gpus: int | None = Field(None, ge=1, le=4096, description="GPUs in use by running trials at once.")


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
        description="Memory of one trial GPU (e.g. 24Gi); default: looked up from "
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
            parse_bytes(value)
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
        return self

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
class TrialRecord(_Api):
    """One trial: a configuration at one rung, run as the child TrainingRun ``name``.

    Written to the search's status *before* the TrainingRun is created, so an operator restart finds
    the intent and creates exactly that run (deterministic name) — never a second one.
    """

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
