"""kopf handlers of ArchitectureSearch: watch-driven, thin wiring around the pure search engine.

Registered by one import in ``handlers.py``; runs in the same ``kopf run`` process. Design (the
same as the TrainingRun controller's watch-driven form):

* **No requests at rest.** Two kopf indexes hold what a pass reads: every ArchitectureSearch
  (``search_index``, key ``(namespace, name)``) and every trial TrainingRun (``trial_index``, runs
  labelled ``kubearch.dev/search``, key ``(namespace, search)``). They are filled from kopf's watch
  streams, so a pass makes no GET or LIST; it writes only when something changed (status, new
  trials, stopped trials, events). There is no timer: nothing in a search is due at a time (trial
  deadlines belong to the TrainingRuns). The only delayed wake-up is the retry after a failed pass.
* **Triggers.** An event of the search (create, update, resume at operator start) or of one of its
  trials (phase, metrics, deletion) marks the search dirty. One worker task per search drains it:
  passes for one search never overlap, and a burst of trial events collapses into one pass.
* **A pass** reads the search and its trials from the indexes, calls
  :func:`kubearch_operator.search.engine.step`, writes ``status`` (skipped if unchanged), *then*
  creates the trials the decision plans (deterministic names ``<search>-<index>``, already recorded
  as ``Planned`` in the status just written), deletes the trials in ``decision.stop`` and posts its
  events. A crash between the write and the creation re-creates the same trial, never a second one;
  a 409 on create is accepted only when the existing run is owned by this search (owner UID).
* **The status written last is remembered** per search UID and used instead of the index's copy,
  which may lag behind our own write (the trial's watch event can arrive before the search's):
  the engine must never see a trial it already planned as unknown. The operator is the only
  writer of this status (kopf peering keeps one replica active).
* A spec that validation refuses changes nothing but ``SpecValid=False`` (field named) and the
  message: no trial is created, running trials keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes
from kubearch_trainer.config import ConfigError
from kubernetes.client.rest import ApiException
from prometheus_client import Counter, Gauge, Histogram

from . import search_builders as sb
from .api import GROUP, VERSION
from .api import PLURAL as RUN_PLURAL
from .search import engine
from .search.api import KIND as SEARCH_KIND
from .search.api import PLURAL as SEARCH_PLURAL
from .search.api import SEARCH_PHASES, ArchitectureSearchStatus, parse_search_spec, parse_search_status
from .status import rfc3339

log = logging.getLogger("kubearch.operator.search")

#: Seconds before a failed pass is retried; doubles per consecutive failure up to RETRY_MAX.
RETRY_SECONDS = float(os.environ.get("KUBEARCH_SEARCH_RETRY_SECONDS", "2"))
RETRY_MAX = 60.0

# ------------------------------------------------------------------------------------------------
# metrics (exported by the operator's metrics server, started in handlers.configure)
# ------------------------------------------------------------------------------------------------
SEARCHES = Gauge(
    "kubearch_operator_searches", "ArchitectureSearches this operator tracks, by phase.", ["phase"]
)
SEARCH_TRIALS = Gauge(
    "kubearch_operator_search_trials", "Trials of a search by state.", ["namespace", "search", "state"]
)
SEARCH_BEST = Gauge(
    "kubearch_operator_search_best_objective",
    "Objective of the search's best trial so far.",
    ["namespace", "search", "metric"],
)
SEARCH_TRIAL_OBJECTIVE = Gauge(
    "kubearch_operator_search_trial_objective",
    "Objective a trial reported (its rung's value).",
    ["namespace", "search", "trial", "rung"],
)
SEARCH_LEADERBOARD = Gauge(
    "kubearch_operator_search_leaderboard_objective",
    "The search's leaderboard: objective by rank (1 = best, the goal's direction applied).",
    ["namespace", "search", "rank", "trial"],
)
SEARCH_RECONCILES = Counter(
    "kubearch_operator_search_reconcile_total", "ArchitectureSearch passes by result.", ["result"]
)
SEARCH_RECONCILE_SECONDS = Histogram(
    "kubearch_operator_search_reconcile_duration_seconds",
    "Wall time of one ArchitectureSearch pass (engine step and the writes it decides).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SEARCH_TRIAL_CREATIONS = Counter(
    "kubearch_operator_search_trial_creations_total", "Trial TrainingRuns created for searches."
)


@dataclass
class _SearchState:
    """What the operator process remembers of one search between passes (see module docstring)."""

    uid: str = ""
    #: The status this process wrote last (camelCase dict), used instead of the index's copy.
    status: dict[str, Any] | None = None
    #: Trials this process created (or found to be ours) that the index may not show yet.
    created: set[str] = field(default_factory=set)
    #: Trials the API server refused to create (name -> its message): observed as Failed.
    refused: dict[str, str] = field(default_factory=dict)
    #: Inputs of the last pass that changed nothing; an event with the same inputs is skipped.
    fingerprint: str | None = None
    dirty: bool = False
    task: asyncio.Task | None = None
    failures: int = 0
    retry: asyncio.TimerHandle | None = None
    phase: str | None = None
    #: Label sets of this search's gauges, so they are removed with the search.
    series: dict[Gauge, set[tuple[str, ...]]] = field(default_factory=dict)


_states: dict[tuple[str, str], _SearchState] = {}
_indexes: dict[str, Any] = {}
_clients: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------
@kopf.on.startup()
def configure_search_clients(**_: Any) -> None:
    """API clients of this controller (its own, so it does not depend on handlers.py's internals)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    api = kubernetes.client.ApiClient()
    _clients.update(
        api=api, core=kubernetes.client.CoreV1Api(api), custom=kubernetes.client.CustomObjectsApi(api)
    )


# ------------------------------------------------------------------------------------------------
# indexes (filled from kopf's watch streams; a pass reads only these)
# ------------------------------------------------------------------------------------------------
@kopf.index(GROUP, VERSION, SEARCH_PLURAL)
def search_index(name: str, namespace: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): sb.search_snapshot(dict(body))}


@kopf.index(GROUP, VERSION, RUN_PLURAL, labels={engine.SEARCH_LABEL: kopf.PRESENT})
def trial_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[engine.SEARCH_LABEL]): sb.trial_snapshot(dict(body))}


# ------------------------------------------------------------------------------------------------
# triggers
# ------------------------------------------------------------------------------------------------
@kopf.on.event(GROUP, VERSION, SEARCH_PLURAL)
async def on_search_event(
    event: dict[str, Any], name: str, namespace: str, search_index: Any, trial_index: Any, **_: Any
) -> None:
    """The search was created, changed (spec or our own status write) or listed at start-up."""
    _indexes.update(search=search_index, trial=trial_index)
    if event.get("type") == "DELETED":
        _forget((namespace, name))
        return
    _kick((namespace, name))


@kopf.on.event(GROUP, VERSION, RUN_PLURAL, labels={engine.SEARCH_LABEL: kopf.PRESENT})
async def on_trial_event(
    namespace: str, labels: kopf.Labels, search_index: Any, trial_index: Any, **_: Any
) -> None:
    """A trial changed phase or metrics, appeared or went away: its search decides what next."""
    _indexes.update(search=search_index, trial=trial_index)
    _kick((namespace, labels[engine.SEARCH_LABEL]))


@kopf.on.probe(id="trackedSearches")
def tracked_searches(**_: Any) -> int:
    return len(_states)


def _kick(key: tuple[str, str]) -> None:
    """Mark the search dirty; start its worker unless one is draining it already."""
    state = _states.setdefault(key, _SearchState())
    state.dirty = True
    if state.retry is not None:
        state.retry.cancel()
        state.retry = None
    if state.task is None or state.task.done():
        state.task = asyncio.get_running_loop().create_task(_drain(key, state))


def _snapshot(key: tuple[str, str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The search and its trials as the indexes hold them now (read in the event loop)."""
    searches, trials = _indexes.get("search"), _indexes.get("trial")
    search = next(iter(searches.get(key, ())), None) if searches is not None else None
    found = list(trials.get(key, ())) if trials is not None else []
    return search, found


async def _drain(key: tuple[str, str], state: _SearchState) -> None:
    """Run passes for one search until no new event arrived during the last one."""
    while state.dirty:
        state.dirty = False
        search, trials = _snapshot(key)
        if search is None or search["deleting"]:
            _forget(key, keep_state=search is not None)
            return
        started = time.perf_counter()
        try:
            exported = await asyncio.to_thread(reconcile_search, search, trials, state)
            state.failures = 0
            if exported is not None and _states.get(key) is state:  # not deleted meanwhile
                _export(search, exported, state)
        except Exception as err:  # the pass is retried after a back-off; each failure is counted
            state.failures += 1
            delay = min(RETRY_MAX, RETRY_SECONDS * 2 ** (state.failures - 1))
            SEARCH_RECONCILES.labels(result="error").inc()
            if isinstance(err, CreateFailed):
                log.warning("search %s/%s: creating a trial failed (%s); retry in %.0fs", *key, err, delay)
            elif isinstance(err, ApiException):
                log.warning(
                    "search %s/%s: pass failed (%s %s); retry in %.0fs",
                    *key, err.status, err.reason, delay,
                )  # fmt: skip
            elif state.failures == 1:
                log.exception("search %s/%s: pass failed; retry in %.0fs", *key, delay)
            else:
                log.warning("search %s/%s: pass failed again (%s); retry in %.0fs", *key, err, delay)
            state.retry = asyncio.get_running_loop().call_later(delay, _kick, key)
            return
        finally:
            SEARCH_RECONCILE_SECONDS.observe(time.perf_counter() - started)


def _forget(key: tuple[str, str], *, keep_state: bool = False) -> None:
    """The search is gone (or being deleted): drop its gauges and what this process remembers."""
    state = _states.get(key)
    if state is None:
        return
    for gauge, series in state.series.items():
        for labels in series:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
    state.series.clear()
    _record_phase(key, None)
    if state.retry is not None:
        state.retry.cancel()
    if not keep_state:
        _states.pop(key, None)


# ------------------------------------------------------------------------------------------------
# one pass (blocking API calls; runs in a worker thread, one at a time per search)
# ------------------------------------------------------------------------------------------------
def reconcile_search(
    search: dict[str, Any], trials: list[dict[str, Any]], state: _SearchState
) -> ArchitectureSearchStatus | None:
    """One pass; returns the status to export as metrics (None: nothing changed since the last)."""
    name, namespace, uid = search["name"], search["namespace"], search["uid"]
    if state.uid != uid:  # first pass, or a new search under a deleted one's name
        state.uid, state.status, state.fingerprint = uid, None, None
        state.created.clear()
        state.refused.clear()
    stored = state.status if state.status is not None else search["status"]
    if _fingerprint(search, stored, trials, state) == state.fingerprint:
        SEARCH_RECONCILES.labels(result="unchanged").inc()
        return None
    status = parse_search_status(stored)
    now = datetime.now(UTC)
    generation = search["generation"]
    try:
        sb.check_search_name(name)
        spec = parse_search_spec(search["spec"])
    except ConfigError as err:
        new = sb.invalid_spec(status, str(err), now, generation)
        if _write_status(search, stored, new, state) and status.message != new.message:
            _post_event(search, "Warning", "InvalidSpec", str(err))
        state.fingerprint = _fingerprint(search, state.status, trials, state)
        SEARCH_RECONCILES.labels(result="invalid").inc()
        return new

    observed = sb.observations(trials, uid)
    state.created -= observed.keys()
    for trial_name, message in state.refused.items():
        observed.setdefault(trial_name, sb.refused_trial(trial_name, message))
    decision = engine.step(name, spec, status, observed, now, generation=generation)
    new = sb.spec_accepted(decision.status, now)
    # Status first: every trial to create is recorded (Planned) before it exists.
    _write_status(search, stored, new, state)
    created = created_or_refused = 0
    for trial in decision.create:
        if trial.name in observed or trial.name in state.created:
            continue
        try:
            refused = _create_trial(search, trial)
        except CreateFailed as err:
            # Counted on the trial's record (status: visible, survives a restart) and retried with
            # the pass's back-off; the engine fails the trial after MAX_CREATE_ATTEMPTS.
            new = sb.create_failed(new, trial.name, str(err), now)
            _write_status(search, state.status, new, state)
            _post_event(search, "Warning", "TrialCreateFailed", f"trial {trial.name}: {err}")
            raise
        if refused is not None:  # fold it into the search now (another pass), not retried forever
            state.refused[trial.name] = refused
            state.dirty = True
            created_or_refused += 1
            continue
        state.created.add(trial.name)
        created += 1
        created_or_refused += 1
    if decision.create:  # a TrialsCreated=False condition of an earlier failure turns True
        _write_status(search, state.status, sb.trials_created(new, now), state)
    ours = {t["name"] for t in trials if sb.owned_by(t, uid) and not t["deleting"]}
    for trial_name in decision.stop:
        if trial_name in ours:
            _delete_trial(namespace, trial_name)
    for type_, reason, message in decision.events:
        _post_event(search, type_, reason, message)
    SEARCH_TRIAL_CREATIONS.inc(created)
    quiet = not (created_or_refused or decision.stop or decision.events)
    state.fingerprint = _fingerprint(search, state.status, trials, state) if quiet else None
    SEARCH_RECONCILES.labels(result="ok").inc()
    return new


def _fingerprint(
    search: dict[str, Any], status: dict[str, Any] | None, trials: list[dict[str, Any]], state: _SearchState
) -> str:
    """Everything a pass reads: equal fingerprints mean the pass would decide the same again."""
    return repr((search["generation"], search["spec"], status, trials, sorted(state.refused.items())))


def _write_status(
    search: dict[str, Any], stored: dict[str, Any], new: ArchitectureSearchStatus, state: _SearchState
) -> bool:
    """Replace the status subresource unless nothing changed; remember what was written."""
    body = sb.status_dict(new)
    if not sb.status_changed(stored, new):
        state.status = body
        return False
    # A JSON patch replaces the whole status: a merge patch would keep keys the engine dropped
    # from maps (parameters, algorithmState).
    _clients["custom"].patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        search["namespace"],
        SEARCH_PLURAL,
        search["name"],
        [{"op": "add", "path": "/status", "value": body}],
        _content_type="application/json-patch+json",
    )
    state.status = body
    return True


class CreateFailed(Exception):
    """The API server answered a trial's creation with an error that is not a refusal (422) and not
    our own run (409): counted on the trial (``createFailures``), retried with back-off, and after
    ``engine.MAX_CREATE_ATTEMPTS`` the trial fails with reason ``CreateFailed``."""


def _create_trial(search: dict[str, Any], trial: engine.TrialToCreate) -> str | None:
    """Create the trial's TrainingRun; a 409 is fine only if the run there is this search's.

    Returns the API server's message when it refuses the TrainingRun (422: e.g. a CEL rule of the
    TrainingRun CRD that the search's validation does not know): that trial fails with reason
    ``TrialRefused`` and the search goes on, instead of retrying an object that cannot exist.
    Raises :class:`CreateFailed` for any other answer (a quota's 403, a webhook's 500, a namesake
    that is not ours); a connection failure (no answer: an outage) propagates as it is and is not
    counted against the trial.
    """
    namespace, uid = search["namespace"], search["uid"]
    body = sb.trial_manifest(search["name"], namespace, uid, trial)
    custom = _clients["custom"]
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, RUN_PLURAL, body)
        log.info("search %s/%s: created trial %s", namespace, search["name"], trial.name)
        return None
    except ApiException as err:
        if err.status == 422:
            message = f"the API server refused TrainingRun {trial.name}: {sb.api_message(err.body)}"
            _post_event(search, "Warning", "TrialRefused", message)
            return message
        if err.status != 409:
            raise CreateFailed(f"{err.status} {err.reason}: {sb.api_message(err.body)}") from err
    existing = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, RUN_PLURAL, trial.name)
    if sb.owned_by(existing, uid):
        return None  # created by an earlier pass (or an operator that crashed after creating it)
    message = f"trial {trial.name}: a TrainingRun of that name exists and belongs to something else"
    if not (existing.get("metadata") or {}).get("deletionTimestamp"):
        _post_event(search, "Warning", "TrialNameTaken", message)
    # retried with back-off (the namesake may be on its way out), at most MAX_CREATE_ATTEMPTS times
    raise CreateFailed(message)


def _delete_trial(namespace: str, name: str) -> None:
    try:
        _clients["custom"].delete_namespaced_custom_object(
            GROUP, VERSION, namespace, RUN_PLURAL, name, propagation_policy="Background"
        )
    except ApiException as err:
        if err.status != 404:
            raise


def _post_event(search: dict[str, Any], type_: str, reason: str, message: str) -> None:
    now = rfc3339(datetime.now(UTC))
    body = {
        "metadata": {"generateName": f"{search['name']}.", "namespace": search["namespace"]},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": SEARCH_KIND,
            "name": search["name"],
            "namespace": search["namespace"],
            "uid": search["uid"],
        },
        "type": type_,
        "reason": reason,
        "message": message[:1000],
        "source": {"component": "kubearch-operator"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        _clients["core"].create_namespaced_event(search["namespace"], body)
    except ApiException as err:  # events are best effort
        log.warning("could not post event %s: %s", reason, err.reason)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def _set(state: _SearchState, gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
    gauge.labels(*labels).set(value)
    state.series.setdefault(gauge, set()).add(labels)


def _export(search: dict[str, Any], status: ArchitectureSearchStatus, state: _SearchState) -> None:
    """Per-search gauges from the status just computed; series of trials gone are removed."""
    ns, name = search["namespace"], search["name"]
    old = {g: set(s) for g, s in state.series.items()}
    state.series.clear()
    for trial_state, count in sb.trial_counts(status).items():
        _set(state, SEARCH_TRIALS, (ns, name, trial_state), count)
    metric = str((search["spec"].get("objective") or {}).get("metric") or "valLoss")
    if status.best_trial is not None:
        _set(state, SEARCH_BEST, (ns, name, metric), status.best_trial.objective)
    for trial in status.trials:
        if trial.objective is not None:
            _set(state, SEARCH_TRIAL_OBJECTIVE, (ns, name, trial.name, str(trial.rung)), trial.objective)
    for entry in status.leaderboard:
        _set(state, SEARCH_LEADERBOARD, (ns, name, str(entry.rank), entry.trial), entry.objective)
    for gauge, series in old.items():
        for labels in series - state.series.get(gauge, set()):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
    _record_phase((ns, name), status.phase)


def _record_phase(key: tuple[str, str], phase: str | None) -> None:
    """Searches by phase (called in the event loop only, like every gauge update here)."""
    state = _states.get(key)
    if state is not None:
        state.phase = phase
    counts = dict.fromkeys(SEARCH_PHASES, 0)
    for s in _states.values():
        if s.phase is not None:
            counts[s.phase] = counts.get(s.phase, 0) + 1
    for phase_, n in counts.items():
        SEARCHES.labels(phase=phase_).set(n)
