"""Pure helpers of the ArchitectureSearch controller: objects in, observations and manifests out.

The controller (``search_handlers.py``) is thin: it keeps kopf indexes of searches and of their
trial TrainingRuns, calls :func:`kubearch_operator.search.engine.step`, and carries out the
decision. Everything between the API's dicts and the engine's dataclasses lives here, without I/O,
so each rule is unit-tested without a cluster:

* what the indexes keep of a search and of a trial (small snapshots, not whole bodies);
* a trial TrainingRun -> :class:`~kubearch_operator.search.engine.TrialObservation` (phase, metrics
  through :func:`~kubearch_operator.search.engine.trial_metrics`, the failure reason with the
  trainer's exit 67 and an ``OOMKilled`` container both read as ``OOM``);
* a :class:`~kubearch_operator.search.engine.TrialToCreate` -> the TrainingRun manifest, owned by
  the search (``controller: true``, ``blockOwnerDeletion``) so the garbage collector deletes the
  trials with their search;
* status bookkeeping: the ``SpecValid`` condition, whether a new status differs from the stored one;
* the per-search samples of the operator's Prometheus gauges.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any

from kubearch_trainer.config import ConfigError

from .api import API_VERSION as RUN_API_VERSION
from .api import KIND as RUN_KIND
from .api import MAX_RUN_NAME_LENGTH, Condition
from .builders import APP, APP_LABEL
from .search.api import API_VERSION as SEARCH_API_VERSION
from .search.api import KIND as SEARCH_KIND
from .search.api import MAX_CONDITION_MESSAGE, ArchitectureSearchStatus, clip, parse_search_status
from .search.engine import (
    MAX_CREATE_ATTEMPTS,
    SEARCH_LABEL,
    TrialObservation,
    TrialToCreate,
    trial_metrics,
)
from .status import parse_time, rfc3339

#: Trials are named ``<search>-<index>``; five digits of index (maxTrials 1000 x 16 rungs, plus
#: OOM retries) and the dash must still leave a valid TrainingRun name.
MAX_SEARCH_NAME_LENGTH = MAX_RUN_NAME_LENGTH - 6
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: TrainingRun failure reasons (``status.py``) that mean "out of memory" to the search engine:
#: the trainer's exit 67 (``CudaOOM``) and a container the kernel OOM-killed (``OOMKilled``).
OOM_REASONS = frozenset({"CudaOOM", "OOMKilled", "OOM"})
_EXITED = re.compile(r"\bexited (\d+)\b")
#: TrainingRun phase -> trial state the engine knows.
_STATES = {"Running": "Running", "Restarting": "Running", "Succeeded": "Succeeded", "Failed": "Failed"}


# ------------------------------------------------------------------------------------------------
# what the kopf indexes keep
# ------------------------------------------------------------------------------------------------
def search_snapshot(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of an ArchitectureSearch the controller reads (a plain copy, safe across threads)."""
    meta = body.get("metadata") or {}
    return {
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "uid": meta.get("uid", ""),
        "generation": meta.get("generation"),
        "deleting": bool(meta.get("deletionTimestamp")),
        "spec": _copy(body.get("spec") or {}),
        "status": _copy(body.get("status") or {}),
    }


def trial_snapshot(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of a trial TrainingRun the search reads: identity, owners and status."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return {
        "name": meta.get("name", ""),
        "uid": meta.get("uid", ""),
        "owners": [o.get("uid", "") for o in meta.get("ownerReferences") or []],
        "deleting": bool(meta.get("deletionTimestamp")),
        "labels": dict(meta.get("labels") or {}),
        "status": {
            k: _copy(status[k])
            for k in ("phase", "message", "conditions", "metrics", "progress", "startTime", "completionTime")
            if k in status
        },
    }


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def owned_by(snapshot: dict[str, Any], uid: str) -> bool:
    """Whether a trial (snapshot or full object) belongs to the search with ``uid``."""
    if "owners" in snapshot:
        return uid in snapshot["owners"]
    refs = (snapshot.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


# ------------------------------------------------------------------------------------------------
# observations
# ------------------------------------------------------------------------------------------------
def failure_reason(reason: str) -> str:
    """The engine's reason for a failed trial: ``OOM`` for any out-of-memory reason, else as is."""
    return "OOM" if reason in OOM_REASONS else reason


def _failed_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {})


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def trial_report(status: dict[str, Any]) -> dict[str, Any]:
    """A TrainingRun's ``status.metrics`` merged with ``status.progress`` (the trainer's report as
    the TrainingRun controller folded it) plus ``timeSeconds`` from its start and completion times."""
    report: dict[str, Any] = {k: v for k, v in (status.get("metrics") or {}).items() if _finite(v)}
    report.update({k: v for k, v in (status.get("progress") or {}).items() if _finite(v)})
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    if start is not None and end is not None and not ({"timeSeconds", "time_seconds"} & report.keys()):
        report["timeSeconds"] = max(0.0, (end - start).total_seconds())
    return report


def observe_trial(snapshot: dict[str, Any]) -> TrialObservation:
    """A trial TrainingRun (see :func:`trial_snapshot`) as the engine sees it."""
    status = snapshot.get("status") or {}
    state = _STATES.get(status.get("phase") or "Pending", "Created")
    reason = message = ""
    exit_code: int | None = None
    if state == "Failed":
        failed = _failed_condition(status)
        reason = failure_reason(failed.get("reason") or "Failed")
        message = failed.get("message") or status.get("message") or ""
        match = _EXITED.search(message)
        exit_code = int(match.group(1)) if match else None
    return TrialObservation(
        name=snapshot["name"],
        state=state,  # type: ignore[arg-type]
        metrics=trial_metrics(trial_report(status)),
        reason=reason,
        message=message,
        exit_code=exit_code,
    )


def refused_trial(name: str, message: str) -> TrialObservation:
    """A trial whose TrainingRun the API server refused to create: failed, with its words."""
    return TrialObservation(name=name, state="Failed", reason="TrialRefused", message=message[:1000])


def api_message(body: Any) -> str:
    """The ``message`` of a Kubernetes ``Status`` error body (JSON text), else the text itself."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        data = json.loads(text)
    except ValueError:
        return text[:1000]
    return str(data.get("message") or text)[:1000] if isinstance(data, dict) else text[:1000]


def observations(trials: list[dict[str, Any]], uid: str) -> dict[str, TrialObservation]:
    """The search's own trials by name; runs of a deleted namesake search (other owner) are left out."""
    return {t["name"]: observe_trial(t) for t in trials if owned_by(t, uid)}


# ------------------------------------------------------------------------------------------------
# manifests
# ------------------------------------------------------------------------------------------------
def owner_reference(search: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": SEARCH_API_VERSION,
        "kind": SEARCH_KIND,
        "name": search,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def trial_manifest(search: str, namespace: str, uid: str, trial: TrialToCreate) -> dict[str, Any]:
    """The child TrainingRun of ``trial``: the engine's spec, labels and annotations, owned by the search."""
    labels = {APP_LABEL: APP, **trial.labels, SEARCH_LABEL: search}
    return {
        "apiVersion": RUN_API_VERSION,
        "kind": RUN_KIND,
        "metadata": {
            "name": trial.name,
            "namespace": namespace,
            "labels": labels,
            "annotations": dict(trial.annotations),
            "ownerReferences": [owner_reference(search, uid)],
        },
        "spec": _copy(trial.spec),
    }


def check_search_name(name: str) -> None:
    """Refuse a search name that cannot prefix its trials' names (``<search>-<index>``)."""
    if len(name) > MAX_SEARCH_NAME_LENGTH or not _DNS1035.match(name):
        raise ConfigError(
            f"metadata.name: {name!r} must be a DNS-1035 label (lowercase letters, digits and '-', "
            f"starting with a letter) of at most {MAX_SEARCH_NAME_LENGTH} characters, so that its "
            f"trials <name>-<index> are valid TrainingRun names"
        )


# ------------------------------------------------------------------------------------------------
# status
# ------------------------------------------------------------------------------------------------
def set_condition(
    status: ArchitectureSearchStatus, type_: str, value: str, reason: str, message: str, now: datetime
) -> None:
    """Upsert a condition; its transition time moves only when its status does."""
    for c in status.conditions:
        if c.type == type_:
            if c.status != value:
                c.last_transition_time = rfc3339(now)
            c.status, c.reason, c.message = value, reason, message  # type: ignore[assignment]
            return
    status.conditions.append(
        Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=rfc3339(now))
    )


def spec_accepted(status: ArchitectureSearchStatus, now: datetime) -> ArchitectureSearchStatus:
    """``SpecValid=True`` on the engine's status (the engine does not know about validation)."""
    set_condition(status, "SpecValid", "True", "Valid", "spec accepted", now)
    return status


def create_failed(
    status: ArchitectureSearchStatus, trial: str, error: str, now: datetime
) -> ArchitectureSearchStatus:
    """A trial whose TrainingRun could not be created (not a refusal): count the attempt on its record
    and say so in the ``TrialsCreated`` condition; the engine fails the trial after
    ``engine.MAX_CREATE_ATTEMPTS`` (see there), the operator retries with back-off until then."""
    st = status.model_copy(deep=True)
    rec = next((t for t in st.trials if t.name == trial), None)
    if rec is None:  # pragma: no cover - the engine records every trial it asks to create
        return st
    rec.create_failures += 1
    rec.message = f"creating the TrainingRun failed ({rec.create_failures}/{MAX_CREATE_ATTEMPTS}): {error}"
    set_condition(
        st,
        "TrialsCreated",
        "False",
        "CreateFailed",
        clip(f"trial {trial}: {rec.message}", MAX_CONDITION_MESSAGE),
        now,
    )
    return st


def trials_created(status: ArchitectureSearchStatus, now: datetime) -> ArchitectureSearchStatus:
    """Every planned trial was created: a ``TrialsCreated=False`` condition turns True (it is only
    added once a creation failed, so a search that never had a problem does not carry it)."""
    if any(c.type == "TrialsCreated" and c.status == "False" for c in status.conditions):
        set_condition(status, "TrialsCreated", "True", "Created", "every planned trial was created", now)
    return status


def invalid_spec(
    status: ArchitectureSearchStatus, message: str, now: datetime, generation: int | None
) -> ArchitectureSearchStatus:
    """A spec the operator refuses: say why (the field is named), change nothing else.

    No trial is created, and trials already running keep running: a typo in an update must not
    throw away hours of training.
    """
    st = status.model_copy(deep=True)
    message = clip(message, MAX_CONDITION_MESSAGE)
    set_condition(st, "SpecValid", "False", "InvalidSpec", message, now)
    st.message = f"spec rejected (generation {generation}); trials unchanged: {message}"
    return st


def status_dict(status: ArchitectureSearchStatus) -> dict[str, Any]:
    """The status as written: camelCase, nulls left out."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def status_changed(stored: dict[str, Any] | None, new: ArchitectureSearchStatus) -> bool:
    """Whether writing ``new`` changes anything (both read through the model, so the API server's
    defaults and dropped nulls do not count as changes)."""
    if not stored:
        return True
    return status_dict(parse_search_status(stored)) != status_dict(new)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def trial_counts(status: ArchitectureSearchStatus) -> dict[str, int]:
    """Trials by state, every state present (a gauge that drops to 0 must say 0, not vanish)."""
    counts = status.trial_counts.model_dump()
    counts.pop("total", None)
    return {state: int(n) for state, n in counts.items()}


def trial_objectives(status: ArchitectureSearchStatus) -> dict[str, float]:
    """Objective per trial that has one (the dashboard's "objective per trial over time")."""
    return {t.name: float(t.objective) for t in status.trials if t.objective is not None}


def age_seconds(status: ArchitectureSearchStatus, now: datetime) -> float | None:
    start = parse_time(status.start_time)
    return None if start is None else max(0.0, (now - start).total_seconds())
