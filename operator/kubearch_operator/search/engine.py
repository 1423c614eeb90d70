"""The pure search step: (spec, status, what the trials report, now) -> what to do next.

One code path for the operator and for ``kubearch search``: the operator observes trials as child
TrainingRuns (their ``status``), the local runner as processes and their ``results.json``; both
turn what they see into :class:`TrialObservation` and carry out the :class:`SearchDecision` this
module returns. Nothing here does I/O, imports torch or kopf, or reads the clock.

Contract (both callers rely on it):

* The returned ``status`` is written (the operator: status subresource; local: ``search.json``)
  *before* any trial in ``create`` is started. Every trial to create already has its
  :class:`~kubearch_operator.search.api.TrialRecord` (state ``Planned``) in that status, with a
  deterministic name ``<search>-<index>``, so a restart between the write and the creation creates
  the same trial again, never a second one.
* ``step`` is idempotent: called twice with the same inputs it returns the same decision, and a
  ``Planned`` trial that already exists (observed) is simply adopted.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from kubearch_trainer.config import format_validation_error
from kubearch_trainer.exit_codes import ExitCode
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from ..api import Condition, TrainingRunSpec
from . import algorithms, planner
from .algorithms import ConfigView
from .api import (
    FINAL_TRIAL_STATES,
    KEPT_METRICS,
    ArchitectureSearchSpec,
    ArchitectureSearchStatus,
    LeaderboardEntry,
    RungStatistics,
    TrialCounts,
    TrialRecord,
    set_path,
    template_dict,
)

#: Label on every trial TrainingRun: the search's name.
SEARCH_LABEL = "kubearch.dev/search"
#: Label on every trial: its index (creation order).
TRIAL_INDEX_LABEL = "kubearch.dev/trial-index"
#: Label on every trial: its configuration number (shared by a configuration's rungs).
TRIAL_CONFIG_LABEL = "kubearch.dev/trial-config"
#: Label on every trial: its rung (0-based).
TRIAL_RUNG_LABEL = "kubearch.dev/trial-rung"
#: Annotation on every trial: its parameters (path -> value) as JSON.
TRIAL_PARAMETERS_ANNOTATION = "kubearch.dev/trial-parameters"
#: Annotation on every trial: what the memory planner changed and why (JSON), when it changed something.
TRIAL_PLAN_ANNOTATION = "kubearch.dev/trial-plan"

#: Trial failure reasons that mean out of memory: the TrainingRun's reason for the trainer's exit 67
#: (``CudaOOM``, see kubearch_operator.status), a container OOMKilled, or a caller's plain ``OOM``.
OOM_REASONS = frozenset({"OOM", "CudaOOM", "OOMKilled"})
#: Failures that do not count against ``maxFailedTrials``: the trial never ran (the planner or the
#: budget refused it with its reason), so it says nothing about the search's health.
NOT_COUNTED_FAILURES = frozenset({"WontFit", "ExceedsMaxGPUs"})
#: Entries kept in ``status.leaderboard`` (the report ranks every trial from ``status.trials``).
LEADERBOARD_SIZE = 10
ACTIVE_STATES = frozenset({"Planned", "Created", "Running"})
#: Attempts to create a trial's TrainingRun that the API server answered with an error other than a
#: refusal (422, failed at once) or our own run (409): a quota (403), an admission webhook's 500, a
#: namesake that is not ours. After this many the trial fails with reason ``CreateFailed`` (counted
#: against maxFailedTrials, replaced like any failure) instead of staying Planned forever. The
#: operator's back-off (2, 4, 8, 16 s) spreads them over about half a minute.
MAX_CREATE_ATTEMPTS = 5


@dataclass(frozen=True)
class TrialObservation:
    """What the caller sees of one trial that exists (a TrainingRun, or a local process).

    ``metrics`` use the search's camelCase names: ``valLoss``, ``trainLoss``, ``valAccuracy``,
    ``perplexity``, ``tokensPerSecond``, ``peakMemoryBytes``, ``timeSeconds`` and any other metric
    the trainer reports, camelCased (see :func:`trial_metrics`).
    ``reason`` is the TrainingRun's failure reason when ``state == "Failed"`` (``OOM`` for the
    trainer's exit 67 or an OOMKilled container, else e.g. ``ConfigError``, ``BackoffLimitExceeded``).
    """

    name: str
    state: Literal["Created", "Running", "Succeeded", "Failed"]
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    message: str = ""
    exit_code: int | None = None


@dataclass(frozen=True)
class TrialToCreate:
    """A trial the caller must start: a TrainingRun ``spec`` (camelCase dict) and its labels."""

    name: str
    index: int
    spec: dict[str, Any]
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class SearchDecision:
    """What :func:`step` decided; ``status`` is written before anything else is done."""

    status: ArchitectureSearchStatus
    create: list[TrialToCreate] = field(default_factory=list)
    #: Trials (by name) to stop now: the search ended (goal reached, failure budget spent).
    stop: list[str] = field(default_factory=list)
    #: (type, reason, message) Kubernetes events to post about the search.
    events: list[tuple[str, str, str]] = field(default_factory=list)


_METRIC_ALIASES = {
    "final_val_loss": "valLoss",
    "val_loss": "valLoss",
    "final_train_loss": "trainLoss",
    "train_loss": "trainLoss",
    "final_loss": "trainLoss",
    "loss": "trainLoss",
    "val_accuracy": "valAccuracy",
    "tokens_per_second": "tokensPerSecond",
    "tokens_per_s": "tokensPerSecond",
    "peak_memory_bytes": "peakMemoryBytes",
    "train_time_s": "timeSeconds",
    "wall_time_s": "wallTimeSeconds",
    "step": "steps",
    "global_step": "steps",
}
_NOT_METRICS = frozenset({"exit_code", "exitCode", "world_size", "worldSize", "resumed_from_step"})


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def trial_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Normalise a trainer report into the search's camelCase metric names.

    Accepts ``results.json``, the termination summary (snake_case), or a TrainingRun ``status``
    (its ``metrics`` and ``progress`` are read; ``progress.loss`` is the last train loss). Known
    names map to ``valLoss``, ``trainLoss``, ``valAccuracy``, ``perplexity``, ``tokensPerSecond``,
    ``peakMemoryBytes``, ``timeSeconds`` (training time; wall time when that is all there is);
    every other finite number is kept, camelCased. ``perplexity`` defaults to exp(valLoss).
    """
    layers: list[dict[str, Any]] = []
    for nested in ("progress", "metrics"):  # lower precedence than the report's own keys
        if isinstance(report.get(nested), dict):
            layers.append(report[nested])
    layers.append(report)
    out: dict[str, float] = {}
    for layer in layers:
        # "final_*" wins over the plain name at the same level (results.json has both kinds)
        for key in sorted(layer, key=lambda k: str(k).startswith("final_")):
            value = _finite(layer[key])
            if value is None or key in _NOT_METRICS:
                continue
            name = _METRIC_ALIASES.get(key) or (to_camel(key) if "_" in key else key)
            out[name] = value
    if "perplexity" not in out and "valLoss" in out and out["valLoss"] < 700:
        out["perplexity"] = math.exp(out["valLoss"])
    if "timeSeconds" not in out and "wallTimeSeconds" in out:
        out["timeSeconds"] = out["wallTimeSeconds"]
    return out


def observe_trainingrun(obj: dict[str, Any]) -> TrialObservation:
    """The operator's side of the contract: a trial TrainingRun object -> :class:`TrialObservation`.

    Phases map to Created (Pending, Created, Suspended), Running (Running, Restarting), Succeeded
    and Failed; a failure's reason is the ``Failed`` condition's (``CudaOOM`` for the trainer's exit
    67, ``OOMKilled``, ``BackoffLimitExceeded``, ...); metrics come from ``status.metrics`` and
    ``status.progress`` through :func:`trial_metrics`.
    """
    status = obj.get("status") or {}
    name = (obj.get("metadata") or {}).get("name", "")
    phase = status.get("phase") or "Pending"
    metrics = trial_metrics(status)
    message = str(status.get("message") or "")
    if phase == "Succeeded":
        return TrialObservation(name, "Succeeded", metrics, message=message)
    if phase == "Failed":
        failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {})
        return TrialObservation(name, "Failed", metrics, str(failed.get("reason") or "Failed"), message)
    state = "Running" if phase in ("Running", "Restarting") else "Created"
    return TrialObservation(name, state, metrics, message=message)  # type: ignore[arg-type]


def trial_name(search: str, index: int) -> str:
    """Deterministic trial name: ``<search>-<index>`` (index zero-padded to 3 digits)."""
    return f"{search}-{index:03d}"


def is_oom(obs: TrialObservation) -> bool:
    return obs.reason in OOM_REASONS or obs.exit_code == int(ExitCode.CUDA_OOM)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def trial_spec(spec: ArchitectureSearchSpec, rec: TrialRecord) -> dict[str, Any]:
    """A trial's TrainingRun spec (camelCase dict), a pure function of the search spec and its record:
    template + parameters + the rung's overrides + rung length + what the planner changed."""
    out = template_dict(spec.trial_template)
    for path, value in rec.parameters.items():
        out = set_path(out, path, value)
    overrides = spec.algorithm.rung_overrides
    if overrides and rec.rung < len(overrides):
        for path, value in overrides[rec.rung].items():
            out = set_path(out, path, value)
    out = set_path(out, "training.numEpochs", 1)
    out = set_path(out, "training.stepsPerEpoch", rec.steps)
    if rec.plan.get("changed"):
        out = set_path(out, "training.batchSize", rec.plan["batchSize"])
        out = set_path(out, "training.gradientAccumulationSteps", rec.plan["gradientAccumulationSteps"])
        if rec.plan.get("gradientCheckpointing"):
            out = set_path(out, "training.useGradientCheckpointing", True)
    return out


def _to_create(name: str, spec: ArchitectureSearchSpec, rec: TrialRecord) -> TrialToCreate:
    labels = {
        SEARCH_LABEL: name,
        TRIAL_INDEX_LABEL: str(rec.index),
        TRIAL_CONFIG_LABEL: str(rec.config),
        TRIAL_RUNG_LABEL: str(rec.rung),
    }
    annotations = {TRIAL_PARAMETERS_ANNOTATION: json.dumps(rec.parameters, sort_keys=True)}
    if rec.plan.get("changed"):
        annotations[TRIAL_PLAN_ANNOTATION] = json.dumps(rec.plan, sort_keys=True)
    return TrialToCreate(rec.name, rec.index, trial_spec(spec, rec), labels, annotations)


def _set_condition(
    st: ArchitectureSearchStatus, type_: str, status: str, reason: str, msg: str, ts: str
) -> None:
    for c in st.conditions:
        if c.type == type_:
            if c.status != status:
                c.last_transition_time = ts
            c.status, c.reason, c.message = status, reason, msg  # type: ignore[assignment]
            return
    st.conditions.append(
        Condition(type=type_, status=status, reason=reason, message=msg, last_transition_time=ts)
    )


# ----------------------------------------------------------------------------------- bookkeeping
def _chains(records: list[TrialRecord]) -> dict[int, dict[int, list[TrialRecord]]]:
    """config -> rung -> its trials in creation order (an OOM retry follows the trial it retries)."""
    out: dict[int, dict[int, list[TrialRecord]]] = {}
    for rec in sorted(records, key=lambda r: r.index):
        out.setdefault(rec.config, {}).setdefault(rec.rung, []).append(rec)
    return out


def _needs_oom_retry(rec: TrialRecord) -> bool:
    """An OOM'd trial that has not been retried and whose micro-batch can still be halved."""
    return (
        rec.state == "Failed"
        and rec.reason == "OOM"
        and rec.oom_retries == 0
        and int(rec.plan.get("batchSize") or 2) > 1
    )


def _views(records: list[TrialRecord], n_rungs: int) -> list[ConfigView]:
    views = []
    for config, rungs in sorted(_chains(records).items()):
        top = max(rungs)
        latest = rungs[top][-1]
        objectives = {
            r: chain[-1].objective
            for r, chain in rungs.items()
            if chain[-1].objective is not None and chain[-1].state in ("Succeeded", "Stopped")
        }
        if latest.state in ACTIVE_STATES or _needs_oom_retry(latest):
            status = "running"
        elif latest.state == "Failed":
            status = "failed"
        elif latest.state == "Stopped":
            status = "stopped"
        else:
            status = "done" if top >= n_rungs - 1 else "waiting"
        params = rungs[min(rungs)][0].parameters
        views.append(ConfigView(config, params, top, status, objectives))  # type: ignore[arg-type]
    return views


def _kept_metrics(metrics: dict[str, float], spec: ArchitectureSearchSpec) -> dict[str, float]:
    """What a record keeps of a trial's metrics: those the leaderboard and the report read, and the
    objective (the record's size is bounded: see api.status_size_bound)."""
    keep = {*KEPT_METRICS, spec.objective.metric}
    return {k: v for k, v in metrics.items() if k in keep}


def _fold(rec: TrialRecord, obs: TrialObservation, spec: ArchitectureSearchSpec, ts: str) -> None:
    """Fold what the caller saw of a trial into its record (Planned trials are adopted here)."""
    if obs.state in ("Created", "Running"):
        if rec.state == "Planned" or obs.state == "Running":
            rec.state = obs.state
        rec.start_time = rec.start_time or ts
        if obs.metrics:
            rec.metrics = _kept_metrics(obs.metrics, spec)
        return
    rec.start_time = rec.start_time or ts
    rec.completion_time = ts
    rec.metrics = _kept_metrics(obs.metrics, spec)
    if obs.state == "Succeeded":
        value = obs.metrics.get(spec.objective.metric)
        if value is None:
            rec.state, rec.reason = "Failed", "MetricMissing"
            rec.message = f"the trial succeeded but reported no {spec.objective.metric!r} metric"
            return
        rec.state, rec.reason, rec.objective = "Succeeded", "Succeeded", value
        rec.message = f"{spec.objective.metric} {value:.6g} after {rec.steps} steps"
        if rec.plan.get("changed"):  # keep saying what was changed and why
            rec.message += f"; planned: {rec.plan.get('reason', '')}"
        return
    rec.state = "Failed"
    rec.reason = "OOM" if is_oom(obs) else (obs.reason or "Failed")
    rec.message = obs.message or (f"exit code {obs.exit_code}" if obs.exit_code is not None else "failed")
    if rec.plan.get("changed"):
        rec.message += f"; planned: {rec.plan.get('reason', '')}"


def _better_key(minimize: bool):
    return lambda value: value if minimize else -value


def _reached(spec: ArchitectureSearchSpec, value: float) -> bool:
    goal = spec.objective.goal_value
    if goal is None:
        return False
    return value <= goal if spec.objective.minimize else value >= goal


def leaderboard(
    spec: ArchitectureSearchSpec, records: list[TrialRecord], size: int | None
) -> list[LeaderboardEntry]:
    """One entry per configuration: its trial at the highest rung it finished; further-trained
    configurations first (a longer rung is a different contest), then by objective, best first."""
    minimize = spec.objective.minimize
    best: list[TrialRecord] = []
    for rungs in _chains(records).values():
        done = [chain[-1] for chain in rungs.values() if chain[-1].objective is not None]
        if done:
            best.append(max(done, key=lambda r: r.rung))
    key = _better_key(minimize)
    best.sort(key=lambda r: (-r.rung, key(r.objective), r.config))
    out = []
    for rank, r in enumerate(best[:size] if size else best, start=1):
        m = r.metrics
        out.append(
            LeaderboardEntry(
                rank=rank,
                trial=r.name,
                config=r.config,
                rung=r.rung,
                steps=r.steps,
                parameters=dict(r.parameters),
                objective=float(r.objective),  # type: ignore[arg-type]
                val_accuracy=m.get("valAccuracy"),
                time_seconds=m.get("timeSeconds"),
                peak_memory_bytes=m.get("peakMemoryBytes"),
                tokens_per_second=m.get("tokensPerSecond"),
            )
        )
    return out


def rung_statistics(spec: ArchitectureSearchSpec, records: list[TrialRecord]) -> list[RungStatistics]:
    """The seed's per-mode statistics, per rung: one outcome per configuration that reached the rung
    (an OOM retry replaces the trial it retries); success rate = finished / (finished + failed);
    mean ± std (population) and range of the objective over the finished ones."""
    steps = spec.rung_steps()
    out = []
    chains = _chains(records)
    for r, n_steps in enumerate(steps):
        latest = [rungs[r][-1] for rungs in chains.values() if r in rungs]
        values = [t.objective for t in latest if t.objective is not None]
        failed = sum(t.state == "Failed" and not _needs_oom_retry(t) for t in latest)
        stopped = sum(t.state == "Stopped" and t.objective is None for t in latest)
        st = RungStatistics(rung=r, steps=n_steps, trials=len(latest), succeeded=len(values), failed=failed)
        st.stopped = stopped
        if values or failed:
            st.success_rate = len(values) / (len(values) + failed)
        if values:
            st.mean = statistics.fmean(values)
            st.std = statistics.pstdev(values) if len(values) > 1 else 0.0
            st.min, st.max = min(values), max(values)
        out.append(st)
    return out


def _counts(records: list[TrialRecord]) -> TrialCounts:
    c = TrialCounts(total=len(records))
    for r in records:
        setattr(c, r.state.lower(), getattr(c, r.state.lower()) + 1)
    return c


def _summarise(name: str, spec: ArchitectureSearchSpec, st: ArchitectureSearchStatus) -> None:
    st.trial_counts = _counts(st.trials)
    st.leaderboard = leaderboard(spec, st.trials, LEADERBOARD_SIZE)
    st.best_trial = st.leaderboard[0] if st.leaderboard else None
    st.rung_statistics = rung_statistics(spec, st.trials)
    st.configurations = len({t.config for t in st.trials})


def _end_all(st: ArchitectureSearchStatus, d: SearchDecision, reason: str, ts: str) -> None:
    """Stop every trial that is not final (the search ended)."""
    for rec in st.trials:
        if rec.state in ACTIVE_STATES:
            d.stop.append(rec.name)
            rec.state, rec.reason, rec.completion_time = "Stopped", reason, ts
            rec.message = f"stopped: the search ended ({reason})"


def _finish(
    st: ArchitectureSearchStatus, d: SearchDecision, phase: str, reason: str, msg: str, ts: str
) -> None:
    st.phase, st.message, st.completion_time = phase, msg, ts  # type: ignore[assignment]
    _set_condition(st, phase, "True", reason, msg, ts)
    _set_condition(st, "Running", "False", reason, msg, ts)
    d.events.append(("Normal" if phase == "Succeeded" else "Warning", reason, msg))


# ------------------------------------------------------------------------------------------ step
def step(
    name: str,
    spec: ArchitectureSearchSpec,
    status: ArchitectureSearchStatus,
    observed: dict[str, TrialObservation],
    now: datetime,
    *,
    generation: int | None = None,
) -> SearchDecision:
    """One pass of the search: fold observations into the trial records, decide promotions, stops
    and new trials within the budget (parallelTrials, maxGPUs, maxTrials), plan each new trial's
    memory, and compute counts, leaderboard, rung statistics and the phase.

    A pure function of its arguments (see the module docstring for the contract with callers).
    """
    st = status.model_copy(deep=True)
    if generation is not None:
        st.observed_generation = generation
    d = SearchDecision(status=st)
    ts = rfc3339(now)
    if st.phase in ("Succeeded", "Failed"):
        # Finished: make sure nothing of it still runs (e.g. after a restart mid-stop).
        d.stop = sorted(n for n, o in observed.items() if o.state in ("Created", "Running"))
        return d
    if st.phase == "Pending":
        st.phase, st.start_time = "Running", st.start_time or ts
        msg = f"{spec.algorithm.name} search over {len(spec.search_space)} parameter(s) started"
        _set_condition(st, "Running", "True", "Started", msg, ts)
        d.events.append(("Normal", "Started", msg))

    # 1. What the trials did.
    for rec in st.trials:
        if rec.state in FINAL_TRIAL_STATES:
            continue
        obs = observed.get(rec.name)
        if obs is None:
            if rec.state in ("Created", "Running"):
                rec.state, rec.reason, rec.completion_time = "Failed", "TrialLost", ts
                rec.message = "the trial disappeared before it finished (deleted?)"
            elif rec.create_failures >= MAX_CREATE_ATTEMPTS:
                rec.state, rec.reason, rec.completion_time = "Failed", "CreateFailed", ts
                rec.message = (
                    f"its TrainingRun could not be created in {rec.create_failures} attempts: {rec.message}"
                )
                d.events.append(("Warning", "TrialCreateFailed", f"trial {rec.name}: {rec.message}"))
            continue  # a Planned trial not seen yet: created below (again)
        before = rec.state
        _fold(rec, obs, spec, ts)
        if rec.state == "Failed" and before != "Failed":
            kind = "Warning"
            d.events.append((kind, f"Trial{rec.reason}", f"trial {rec.name} failed: {rec.message}"[:500]))

    n_rungs = len(spec.rung_steps())
    views = _views(st.trials, n_rungs)

    # 2. Failure budget, goal.
    counted = [
        v for v in views if v.status == "failed" and _latest(st.trials, v).reason not in NOT_COUNTED_FAILURES
    ]
    if len(counted) > spec.budget.max_failed_trials:
        reasons: dict[str, int] = {}
        for v in counted:
            r = _latest(st.trials, v).reason
            reasons[r] = reasons.get(r, 0) + 1
        why = ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items()))
        msg = (
            f"{len(counted)} trials failed ({why}), more than budget.maxFailedTrials "
            f"({spec.budget.max_failed_trials})"
        )
        _end_all(st, d, "SearchFailed", ts)
        _finish(st, d, "Failed", "MaxFailedTrialsExceeded", msg, ts)
        _summarise(name, spec, st)
        return d
    reached = [
        t
        for t in st.trials
        if t.objective is not None and t.state == "Succeeded" and _reached(spec, t.objective)
    ]
    if reached:
        best = min(reached, key=lambda t: (_better_key(spec.objective.minimize)(t.objective), t.index))
        msg = (
            f"trial {best.name} reached {spec.objective.metric} {best.objective:.6g} "
            f"(goal {spec.objective.goal_value:g})"
        )
        _end_all(st, d, "GoalReached", ts)
        _finish(st, d, "Succeeded", "GoalReached", msg, ts)
        _summarise(name, spec, st)
        return d

    # 3. Promotions and stops.
    failed_runtime = len(counted)
    limit = spec.max_trials() + failed_runtime
    grid_cap = algorithms.max_configurations(spec)
    if grid_cap is not None:
        limit = min(limit, grid_cap)
    proposed = len(views)
    decisions = algorithms.advance(spec, views, more_configs_coming=proposed < limit)
    chains = _chains(st.trials)
    continuations: list[tuple[int, int]] = []
    for dec in decisions:
        rec = chains[dec.config][dec.rung][-1]
        if dec.action == "stop":
            rec.state, rec.reason, rec.message = "Stopped", dec.reason, dec.message
        else:
            continuations.append((dec.config, dec.rung + 1))

    # 4. New trials within parallelTrials and maxGPUs (Planned ones count: they are being created).
    steps = spec.rung_steps()
    active = [t for t in st.trials if t.state in ACTIVE_STATES]
    slots = spec.budget.parallel_trials - len(active)
    gpus_used = sum(_gpus(spec, t) for t in active)
    next_index = max((t.index for t in st.trials), default=-1) + 1
    state = dict(st.algorithm_state)

    def admit(rec: TrialRecord, plan: bool) -> bool:
        """Plan and record one trial; False when the budget is full (nothing recorded)."""
        nonlocal slots, gpus_used, next_index
        try:
            trial = TrainingRunSpec.model_validate(trial_spec(spec, rec))
        except ValidationError as err:
            rec.state, rec.reason, rec.completion_time = "Failed", "InvalidConfiguration", ts
            rec.message = format_validation_error(err, prefix="spec.")[:500]
            st.trials.append(rec)
            next_index += 1
            return True
        gpus = planner.trial_gpus(trial)
        max_gpus = spec.budget.max_gpus
        if max_gpus is not None and gpus > max_gpus:
            rec.state, rec.reason, rec.completion_time = "Failed", "ExceedsMaxGPUs", ts
            rec.message = f"the trial needs {gpus} GPUs, budget.maxGPUs is {max_gpus}"
            st.trials.append(rec)
            next_index += 1
            return True
        if slots <= 0 or (max_gpus is not None and gpus_used + gpus > max_gpus):
            return False
        if plan:
            mp = planner.plan_trial(trial, spec.planning)
            rec.plan = mp.as_record()
            if not mp.fits:
                rec.state, rec.reason, rec.message, rec.completion_time = "Failed", "WontFit", mp.reason, ts
                st.trials.append(rec)
                next_index += 1
                d.events.append(("Warning", "TrialWontFit", f"trial {rec.name}: {mp.reason}"[:500]))
                return True
            if mp.changed:
                rec.message = f"planned: {mp.reason}"
        st.trials.append(rec)
        next_index += 1
        slots -= 1
        gpus_used += gpus
        return True

    # 4a. OOM retries: same configuration and rung, half the micro-batch, twice the accumulation.
    for config, rungs in sorted(chains.items()):
        for rung, chain in sorted(rungs.items()):
            last = chain[-1]
            if not _needs_oom_retry(last) or last is not rungs[max(rungs)][-1]:
                continue
            current = TrainingRunSpec.model_validate(trial_spec(spec, last)).training
            b, a = current.batch_size, current.gradient_accumulation_steps
            retry = TrialRecord(
                index=next_index,
                name=trial_name(name, next_index),
                config=config,
                rung=rung,
                steps=last.steps,
                parameters=dict(last.parameters),
                oom_retries=last.oom_retries + 1,
                plan={
                    **last.plan,
                    "changed": True,
                    "batchSize": b // 2,
                    "gradientAccumulationSteps": a * 2,
                    "gradientCheckpointing": current.use_gradient_checkpointing,
                    "oomRetryOf": last.name,
                    "reason": f"{last.name} ran out of memory at micro-batch {b}x{a}: retried at "
                    f"{b // 2}x{a * 2} (effective batch {b * a} kept)",
                },
            )
            retry.message = retry.plan["reason"]
            if admit(retry, plan=False):
                last.message = f"{last.message}; retried as {retry.name}"[:1000]
                d.events.append(("Normal", "TrialOOMRetry", retry.message))
    # 4b. Continuations (promotions), in configuration order.
    for config, rung in continuations:
        first = chains[config][min(chains[config])][0]
        rec = TrialRecord(
            index=next_index,
            name=trial_name(name, next_index),
            config=config,
            rung=rung,
            steps=steps[rung],
            parameters=dict(first.parameters),
        )
        if not admit(rec, plan=True):
            break
    # 4c. New configurations.
    history = _views(st.trials, n_rungs)
    while slots > 0 and len(history) < limit:
        params_list, state = algorithms.propose(spec, history, 1, state)
        if not params_list:
            limit = len(history)  # the algorithm has nothing more to offer (grid exhausted)
            break
        config = len(history)
        rec = TrialRecord(
            index=next_index,
            name=trial_name(name, next_index),
            config=config,
            rung=0,
            steps=steps[0],
            parameters=params_list[0],
        )
        if not admit(rec, plan=True):
            break
        history = _views(st.trials, n_rungs)
    st.algorithm_state = {**state, "name": spec.algorithm.name, "configurationLimit": limit}

    # 5. Everything proposed and final?
    views = _views(st.trials, n_rungs)
    if (
        not any(t.state in ACTIVE_STATES for t in st.trials)
        and len(views) >= limit
        and all(v.status in ("done", "stopped", "failed") for v in views)
    ):
        _summarise(name, spec, st)
        best = st.best_trial
        msg = f"all {len(views)} configurations finished"
        if best is not None:
            msg += f"; best {spec.objective.metric} {best.objective:.6g} ({best.trial})"
        _finish(st, d, "Succeeded", "Completed", msg, ts)
        return d

    d.create = [_to_create(name, spec, t) for t in st.trials if t.state == "Planned"]
    _summarise(name, spec, st)
    c = st.trial_counts
    final = sum(v.status in ("done", "stopped", "failed") for v in views)
    st.message = (
        f"{final}/{limit} configurations final; trials: {c.running + c.created} running, "
        f"{c.planned} planned, {c.succeeded} succeeded, {c.failed} failed, {c.stopped} stopped"
    )
    if st.best_trial is not None:
        st.message += f"; best {spec.objective.metric} {st.best_trial.objective:.6g} ({st.best_trial.trial})"
    return d


def _latest(records: list[TrialRecord], view: ConfigView) -> TrialRecord:
    return _chains(records)[view.config][view.rung][-1]


def _gpus(spec: ArchitectureSearchSpec, rec: TrialRecord) -> int:
    try:
        return planner.trial_gpus(TrainingRunSpec.model_validate(trial_spec(spec, rec)))
    except ValidationError:
        return 0
