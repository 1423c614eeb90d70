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

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .api import ArchitectureSearchSpec, ArchitectureSearchStatus

#: Label on every trial TrainingRun: the search's name.
SEARCH_LABEL = "kubearch.dev/search"
#: Label on every trial: its index (creation order).
TRIAL_INDEX_LABEL = "kubearch.dev/trial-index"
#: Label on every trial: its configuration number (shared by a configuration's rungs).
TRIAL_CONFIG_LABEL = "kubearch.dev/trial-config"
#: Label on every trial: its rung (0-based).
TRIAL_RUNG_LABEL = "kubearch.dev/trial-rung"


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


def trial_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Normalise a trainer report (results.json, termination summary or TrainingRun status.metrics
    merged with status.progress) into the search's camelCase metric names. Implemented in the
    search-core work; see the module docstring."""
    raise NotImplementedError


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
    memory, and compute counts, leaderboard, rung statistics and the phase. Implemented in the
    search-core work."""
    raise NotImplementedError
