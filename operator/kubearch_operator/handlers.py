"""kopf wiring: a watch-driven TrainingRun controller in the controller-runtime style.

Run it with ``kopf run -m kubearch_operator.handlers --all-namespaces`` or ``python -m
kubearch_operator``. Design:

* **State comes from watch streams, not from requests.** kopf watches TrainingRuns, and the pods,
  Services and ConfigMaps labelled ``app.kubernetes.io/name=kubearch`` (a label selector the API
  server applies: only kubearch's objects stream in). Runs are cached by ``@kopf.on.event``;
  children are kept in ``@kopf.index`` es keyed by ``(namespace, run)`` (kopf fills the indexes
  before any other handler runs, so a restarted operator never mistakes "not listed yet" for
  "missing").
* **What triggers a reconcile**: any watch event of a run (create, spec change, suspend/resume,
  status written by someone else, the initial listing after a start) or of one of its pods,
  Services or ConfigMaps puts the run's key on a :class:`~kubearch_operator.workqueue.WorkQueue`.
  Timers exist only for what is due: ``activeDeadlineSeconds``, ``ttlSecondsAfterFinished``, error
  back-off. A safety resync re-queues every run every ``KUBEARCH_RESYNC_SECONDS`` (default 600 s;
  0 disables it); at rest a pass makes no request at all, as nothing differs from the cache.
* **Passes are serialised per run**: the queue never hands one key to two workers; an event during
  a pass queues the key once more. ``KUBEARCH_WORKERS`` threads run passes for different runs.
* **Idempotent and restart-safe**: deterministic names, create-if-absent, and the status is written
  (with the run's ``resourceVersion`` as a precondition, so a pass decided on a stale copy is
  refused with 409 and redone) *before* pods are deleted or created. A pass that created pods
  waits for the watch to show them before the next pass of that run (Job controller
  "expectations"), so a lagging cache never reads as a lost pod.
* **Children are ensured on every pass from the cache**: a Service or ConfigMap that is missing,
  or that belongs to an earlier run of the same name (``kubectl replace --force``), is replaced;
  a 409 on create counts as "ours" only when the existing object's owner uid is this run's.
* **No finalizer, no kopf annotations on runs**: only ``on.event``/``index`` handlers are used,
  which need neither; children are garbage-collected through their ownerReferences, so deleting a
  run completes even while the operator is down, and a huge spec cannot overflow kopf's
  ``last-handled-configuration`` annotation (there is none). A kopf finalizer left by an older
  operator version is removed by kopf on the first event.
* An object the API server refuses (400/413/422) fails the run at once, naming object, field and
  message (:mod:`kubearch_operator.refusals`); an unreachable API server is logged once per outage
  (:class:`~kubearch_operator.workqueue.Outage`) and retried with back-off.
* A spec the operator cannot run (caught by the pydantic models after the CRD schema let it in)
  changes nothing but a ``SpecValid=False`` condition: running pods keep running.
* ``crashpoint.reached(...)`` marks the stages a kill test must hit (status written, a pod
  deleted, a pod created...); a no-op unless ``KUBEARCH_CRASH_AT`` is set (tests only).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes
import urllib3
from kubearch_trainer.config import ConfigError
from kubernetes.client.rest import ApiException
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from . import builders, crashpoint, refusals
from .api import (
    GROUP,
    KIND,
    PHASES,
    PLURAL,
    TERMINAL_PHASES,
    VERSION,
    check_run_name,
    parse_spec,
    parse_status,
)
from .peering import configure_peering
from .rawapi import CoreWrites
from .status import invalid_spec, reconcile, rfc3339
from .workqueue import (
    EndlessBackoffs,
    Expectations,
    Outage,
    Versions,
    WorkQueue,
    find_ghosts,
    retry_after_seconds,
)

log = logging.getLogger("kubearch.operator")

#: Safety resync period (seconds); 0 disables it. Passes at rest make no API request.
RESYNC_SECONDS = float(os.environ.get("KUBEARCH_RESYNC_SECONDS", "600"))
WORKERS = max(1, int(os.environ.get("KUBEARCH_WORKERS", "8")))
METRICS_PORT = int(os.environ.get("KUBEARCH_OPERATOR_METRICS_PORT", "8000"))
#: Accept header of a metadata-only LIST (the API server answers a PartialObjectMetadataList).
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
#: Period (seconds) of the fallback sweep for children deleted while their watch was down (one
#: LIST per child kind); 0 disables it. A re-listing that shows a known child sweeps at once.
GHOST_SWEEP_SECONDS = float(os.environ.get("KUBEARCH_GHOST_SWEEP_SECONDS", "300"))

RECONCILES = Counter("kubearch_operator_reconcile_total", "Reconcile passes by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "kubearch_operator_reconcile_duration_seconds",
    "Wall time of one reconcile pass (the work: decisions and API calls, not the queue wait).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RECONCILE_CPU_SECONDS = Histogram(
    "kubearch_operator_reconcile_cpu_seconds",
    "CPU time of one reconcile pass in its thread (the operator's own work, without waiting for the"
    " API server or for the interpreter lock).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
QUEUE_SECONDS = Histogram(
    "kubearch_operator_queue_wait_seconds",
    "Time a run's key waited in the work queue before a worker took it.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
QUEUE_DEPTH = Gauge("kubearch_operator_queue_depth", "Run keys waiting for a worker.")
RUNS = Gauge("kubearch_operator_runs", "TrainingRuns this operator tracks, by phase.", ["phase"])
for _phase in PHASES:  # every phase exported from the start, at 0 until a run is in it
    RUNS.labels(phase=_phase)
POD_CREATIONS = Counter("kubearch_operator_pod_creations_total", "Pods created for TrainingRuns.")
ERRORS = Counter("kubearch_operator_errors_total", "Errors while reconciling, by kind.", ["kind"])

#: Labels of every object the operator creates; the watches select on them server-side.
CHILD_SELECTOR = f"{builders.APP_LABEL}={builders.APP},{builders.RUN_LABEL}"
CHILD_LABELS = {builders.APP_LABEL: builders.APP, builders.RUN_LABEL: kopf.PRESENT}
CHILD_RESOURCES = ("pods", "services", "configmaps")
#: The kopf index of each child resource, and the kubernetes client's name for it.
CHILD_INDEX = {"pods": "kubearch_pods", "services": "kubearch_services", "configmaps": "kubearch_configmaps"}
CHILD_KIND = {"pods": "pod", "services": "service", "configmaps": "config_map"}

RunKey = tuple[str, str]


# ------------------------------------------------------------------------------------------------
# controller state (owned by the event loop; worker threads get snapshots)
# ------------------------------------------------------------------------------------------------
@dataclass
class _State:
    runs: dict[RunKey, dict[str, Any]] = field(default_factory=dict)
    indexes: dict[str, Any] = field(default_factory=dict)  # kopf Index objects, by index name
    queue: WorkQueue | None = None
    pool: ThreadPoolExecutor | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    expectations: Expectations = field(default_factory=Expectations)
    #: uid -> (generation, parsed spec and plan, or the ConfigError): one entry per run, so
    #: replacing or dropping it never scans the others (O(1) per run at 10,000 runs).
    specs: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    phases: dict[RunKey, str] = field(default_factory=dict)
    #: runs per phase, kept as phases change (the gauge is not recounted over every run per pass)
    phase_counts: dict[str, int] = field(default_factory=dict)
    #: resourceVersion of every child by resource (event loop only): which changed in a re-listing
    child_versions: dict[str, Versions] = field(
        default_factory=lambda: {plural: Versions() for plural in CHILD_RESOURCES}
    )
    ghosts: set[str] = field(default_factory=set)  # uids kopf's indexes keep after their deletion
    sweeps: dict[str, asyncio.Task] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_state = _State()
_clients: dict[str, Any] = {}
_metrics_started = False
outage = Outage(log)

#: Errors that mean "could not talk to the API server" (refused, reset, timed out, DNS).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, ConnectionError, OSError)


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------
def _load_kube_config() -> None:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    config = kubernetes.client.Configuration.get_default_copy()
    config.connection_pool_maxsize = max(config.connection_pool_maxsize or 0, WORKERS * 2)
    api = kubernetes.client.ApiClient(config)
    _clients.update(
        api=api,
        core=kubernetes.client.CoreV1Api(api),
        custom=kubernetes.client.CustomObjectsApi(api),
        writes=CoreWrites(api),
    )


class _QuietEventHandlers(logging.Filter):
    """Drop kopf's "Handler 'on_..._event' succeeded." line: one per watch event (tens of
    thousands at scale) saying nothing a metric does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not (msg.startswith("Handler 'on_") and "_event' succeeded" in msg)


logging.getLogger("kopf.objects").addFilter(_QuietEventHandlers())
# urllib3 logs a WARNING for every retry of every request while the API server is away; the
# operator logs the outage itself once (workqueue.Outage), so those per-request lines are noise.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base, for change-detecting handlers — which this operator does not have.

    Why: on every watch event kopf builds the object's "essence" (a deep copy of the whole body,
    status and pod specs included) to diff it with the last handled one for
    ``on.create/update/resume/field`` handlers. This operator has only ``on.event`` and ``index``
    handlers, which never see a diff; those copies were ~9 % of its CPU while 2,000 runs were
    created (py-spy, GIL samples). :func:`check_handler_kinds` refuses to start if a
    change-detecting handler is ever added, since it would need the real storage.
    """

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return None

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


def check_handler_kinds(registry: Any) -> None:
    """Fail fast if a registered handler needs what :class:`NoDiffBase` leaves out: change
    detection (on.create/update/resume/field) or the diff base of daemons and timers."""
    changing = list(registry._changing.get_all_handlers())
    spawning = list(registry._spawning.get_all_handlers())
    if changing or spawning:
        names = ", ".join(h.id for h in changing + spawning)
        raise RuntimeError(
            f"change-detecting or daemon/timer handlers ({names}) need kopf's diff base storage; "
            "this operator is built on on.event/index handlers only (see NoDiffBase)"
        )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _metrics_started
    check_handler_kinds(kopf.get_default_registry())
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    configure_peering(settings, os.environ)  # --peering wins over KUBEARCH_PEERING (peering.py)
    settings.posting.level = logging.WARNING  # kopf's own per-handler events stay out of `describe`
    settings.watching.server_timeout = 300
    # API errors (5xx) are retried for as long as they last; kopf's default gives up after 54 s
    # and a watch that gives up ends the operator (workqueue.EndlessBackoffs).
    settings.networking.error_backoffs = EndlessBackoffs()
    # kopf applies a handler's `labels=` filter client-side, after every pod of the cluster has
    # streamed in; this selector makes the API server filter the children's watches instead.
    for plural in CHILD_RESOURCES:
        settings.watching.label_selectors["v1", plural] = CHILD_SELECTOR
    _load_kube_config()
    if METRICS_PORT and not _metrics_started:
        start_http_server(METRICS_PORT)
        _metrics_started = True
        log.info("operator metrics on :%d/metrics", METRICS_PORT)


@kopf.on.startup()
async def start_workers(**_: Any) -> None:
    """The work queue and its workers live as long as the operator's event loop."""
    _state.queue = WorkQueue()
    _state.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="reconcile")
    _state.tasks = [asyncio.create_task(_worker(i)) for i in range(WORKERS)]
    if RESYNC_SECONDS > 0:
        _state.tasks.append(asyncio.create_task(_safety_resync(RESYNC_SECONDS)))
    if GHOST_SWEEP_SECONDS > 0:
        _state.tasks.append(asyncio.create_task(_periodic_sweeps(GHOST_SWEEP_SECONDS)))


@kopf.on.cleanup()
async def stop_workers(**_: Any) -> None:
    tasks = [*_state.tasks, *_state.sweeps.values()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    _state.sweeps.clear()
    _state.tasks = []
    if _state.pool is not None:
        _state.pool.shutdown(wait=False, cancel_futures=True)


@kopf.on.probe(id="trackedRuns")
def tracked_runs(**_: Any) -> int:
    """Reported by kopf's liveness endpoint (``--liveness``)."""
    return len(_state.runs)


# ------------------------------------------------------------------------------------------------
# caches fed by the watches
# ------------------------------------------------------------------------------------------------
def _rv(obj: dict[str, Any] | None) -> int:
    """resourceVersion as an int (etcd's revision) for "which copy is newer"; -1 if unknown."""
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:
        return -1


def _store_run(key: RunKey, body: dict[str, Any]) -> bool:
    """Keep the newest copy: a late watch event must not undo the status this operator wrote.

    Returns whether ``body`` is news to the cache. The watch event of this operator's own status
    write carries the resourceVersion the write returned (already cached): not news, and no
    second pass is queued for it — a third of all passes while 1,500 runs were created.
    ``managedFields`` are dropped: nothing reads them, and they are most of a small run's size.
    """
    if body.get("metadata", {}).get("managedFields") is not None:
        body = {**body, "metadata": {k: v for k, v in body["metadata"].items() if k != "managedFields"}}
    cached = _state.runs.get(key)
    same_run = cached is not None and cached["metadata"].get("uid") == body["metadata"].get("uid")
    if same_run and _rv(cached) >= _rv(body) >= 0:
        return False
    _state.runs[key] = body
    return True


def slim_pod(body: Any) -> dict[str, Any]:
    """What reconciliation reads of a pod: metadata, phase and container states (no spec)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    annotations = meta.get("annotations") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {k: v for k, v in annotations.items() if k == builders.PROGRESS_ANNOTATION},
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "ownerReferences": [
                {"uid": r.get("uid"), "controller": r.get("controller")}
                for r in meta.get("ownerReferences") or []
            ],
        },
        "status": {
            k: status[k]
            for k in ("phase", "reason", "message", "startTime", "containerStatuses")
            if k in status
        },
    }


def slim_child(body: Any) -> dict[str, Any]:
    """A Service or ConfigMap: name, uid, owner, whether it is going, a hash of its data."""
    meta = body.get("metadata") or {}
    data = body.get("data")
    return {
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "owner": refusals.owner_uid(body),
        "deleting": bool(meta.get("deletionTimestamp")),
        "data": _digest(data) if data is not None else None,
    }


def _digest(data: Any) -> str:
    text = "\0".join(f"{k}={v}" for k, v in sorted((data or {}).items()))
    return hashlib.sha256(text.encode()).hexdigest()


# The index functions are ``async`` though they never await: kopf runs a sync handler in its
# thread executor (a thread hop and a shielded task per watch event); an async one is awaited
# in the event loop directly. They only slim a body.
@kopf.index("v1", "pods", labels=CHILD_LABELS)
async def kubearch_pods(namespace: str, labels: dict[str, str], body: Any, **_: Any) -> dict:
    return {(namespace, labels[builders.RUN_LABEL]): slim_pod(body)}


@kopf.index("v1", "services", labels=CHILD_LABELS)
async def kubearch_services(namespace: str, labels: dict[str, str], body: Any, **_: Any) -> dict:
    return {(namespace, labels[builders.RUN_LABEL]): slim_child(body)}


@kopf.index("v1", "configmaps", labels=CHILD_LABELS)
async def kubearch_configmaps(namespace: str, labels: dict[str, str], body: Any, **_: Any) -> dict:
    return {(namespace, labels[builders.RUN_LABEL]): slim_child(body)}


def _grab_indexes(kwargs: dict[str, Any]) -> None:
    if not _state.indexes:
        _state.indexes = {n: kwargs[n] for n in ("kubearch_pods", "kubearch_services", "kubearch_configmaps")}


def _enqueue(key: RunKey) -> None:
    if _state.queue is not None:
        _state.queue.add(key)
        QUEUE_DEPTH.set(len(_state.queue))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_run_event(event: dict[str, Any], namespace: str, name: str, **kwargs: Any) -> None:
    """Every event of a run (including the initial listing) updates the cache and queues it."""
    _grab_indexes(kwargs)
    key = (namespace, name)
    if event.get("type") == "DELETED":
        _forget(key, event["object"])
        return
    if _store_run(key, event["object"]):
        _enqueue(key)


def _forget(key: RunKey, body: dict[str, Any]) -> None:
    cached = _state.runs.get(key)
    if cached is not None and cached["metadata"].get("uid") != body["metadata"].get("uid"):
        return  # a newer run of the same name is already cached
    _state.runs.pop(key, None)
    _state.expectations.clear(key)
    with _state.lock:
        _state.specs.pop(body["metadata"].get("uid"), None)
    if _state.queue is not None:
        _state.queue.drop(key)
    _record_phase(key, None)


async def _on_child_event(
    plural: str, event: dict[str, Any], namespace: str, name: str, labels: dict[str, str]
) -> None:
    key = (namespace, labels.get(builders.RUN_LABEL, ""))
    kind = event.get("type")
    meta = (event.get("object") or {}).get("metadata") or {}
    uid, version = str(meta.get("uid") or name), str(meta.get("resourceVersion") or "")
    versions = _state.child_versions[plural]
    changed = False
    if kind == "DELETED":
        versions.forget(uid)
        _state.ghosts.discard(uid)
    else:
        if kind is None and versions.seen(uid):  # a re-listing: look for what it no longer shows
            _start_sweep(plural)
        changed = versions.changed(uid, version)
    awaited = _state.expectations.observed(key, name)
    # The initial listing needs no pass of its own: each run's own listing event queues it. A
    # re-listing (the watch could not resume, kopf lists again) does, for the children that
    # changed or appeared while the watch was down: no other event will ever bring them.
    relisted = kind is None and (changed or awaited)
    if (kind is not None or relisted) and key in _state.runs:
        crashpoint.reached("child-event", key)
        _enqueue(key)


@kopf.on.event("v1", "pods", labels=CHILD_LABELS)
async def on_pod_event(event: dict[str, Any], namespace: str, name: str, labels: Any, **_: Any) -> None:
    """A pod of a run changed (phase, exit, deletion): reconcile its run."""
    await _on_child_event("pods", event, namespace, name, labels)


@kopf.on.event("v1", "services", labels=CHILD_LABELS)
async def on_service_event(event: dict[str, Any], namespace: str, name: str, labels: Any, **_: Any) -> None:
    """A Service of a run changed or went away: re-ensure it."""
    await _on_child_event("services", event, namespace, name, labels)


@kopf.on.event("v1", "configmaps", labels=CHILD_LABELS)
async def on_configmap_event(event: dict[str, Any], namespace: str, name: str, labels: Any, **_: Any) -> None:
    """A ConfigMap of a run changed or went away: re-ensure it."""
    await _on_child_event("configmaps", event, namespace, name, labels)


# ------------------------------------------------------------------------------------------------
# children deleted while their watch was down (kopf keeps them in its indexes)
# ------------------------------------------------------------------------------------------------
def _start_sweep(plural: str) -> None:
    """One sweep per re-listing: the first known child it shows starts it."""
    task = _state.sweeps.get(plural)
    if task is None or task.done():
        _state.sweeps[plural] = asyncio.get_running_loop().create_task(_sweep(plural))


def _list_children(plural: str) -> tuple[set[str], int]:
    """uids of every kubearch child of ``plural`` now, and the LIST's resourceVersion.

    Metadata only (``PartialObjectMetadataList``, as kubectl's and client-go's metadata informers
    ask): at 10,000 runs a full pod LIST is tens of MB to serialise and parse, the uids are bytes.
    """
    lister = getattr(_clients["core"], f"list_{CHILD_KIND[plural]}_for_all_namespaces")
    response = lister(
        label_selector=CHILD_SELECTOR,
        _preload_content=False,
        _headers={"Accept": METADATA_ONLY},
    )
    body = json.loads(response.data)
    uids = {str((item.get("metadata") or {}).get("uid")) for item in body.get("items") or []}
    return uids, int((body.get("metadata") or {}).get("resourceVersion") or -1)


def _child_uid(value: dict[str, Any]) -> str:
    return str(value.get("uid") or (value.get("metadata") or {}).get("uid") or "")


async def _sweep(plural: str) -> None:
    """Mark as ghosts the indexed children a fresh LIST no longer shows, and queue their runs."""
    index = _state.indexes.get(CHILD_INDEX[plural])
    if index is None or _state.pool is None:
        return
    try:
        listed, listed_at = await asyncio.get_running_loop().run_in_executor(
            _state.pool, _list_children, plural
        )
    except (ApiException, *CONNECTION_ERRORS) as err:
        log.info("could not list %s to look for deleted children: %s", plural, err)
        return
    versions = _state.child_versions[plural]
    cached = [
        (key, uid, versions.version(uid))
        for key, store in list(index.items())
        for value in store
        if (uid := _child_uid(value)) and uid not in _state.ghosts
    ]
    for key, uid in find_ghosts(cached, listed, listed_at):
        log.info("%s/%s: a %s deleted while its watch was down; reconciling", *key, plural[:-1])
        _state.ghosts.add(uid)
        versions.forget(uid)
        if key in _state.runs:
            _enqueue(key)


async def _periodic_sweeps(period: float) -> None:
    """The fallback for a re-listing that shows no known child (all were deleted meanwhile)."""
    while True:
        await asyncio.sleep(period)
        for plural in CHILD_RESOURCES:
            await _sweep(plural)


# ------------------------------------------------------------------------------------------------
# workers
# ------------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What one pass sees: copies taken in the event loop, so the worker thread reads no live
    structure that the watches mutate."""

    key: RunKey
    run: dict[str, Any]
    pods: list[dict[str, Any]]
    services: list[dict[str, Any]]
    configmaps: list[dict[str, Any]]


@dataclass
class Outcome:
    requeue_after: float | None = None
    retry: bool = False  # an error: back off
    retry_after: float = 0.0  # the API server's Retry-After (429): no pass of the run sooner
    gone: bool = False
    written: dict[str, Any] | None = None  # the run as the status write returned it


def _index_values(name: str, key: RunKey) -> list[dict[str, Any]]:
    """What kopf's index holds for ``key``, without the ghosts (see :func:`_sweep`)."""
    index = _state.indexes.get(name)
    store = index.get(key) if index is not None else None
    if store is None:
        return []
    return [v for v in store if not _state.ghosts or _child_uid(v) not in _state.ghosts]


async def _worker(number: int) -> None:
    queue = _state.queue
    assert queue is not None and _state.pool is not None
    loop = asyncio.get_running_loop()
    while True:
        key, waited = await queue.get()
        QUEUE_SECONDS.observe(waited)
        QUEUE_DEPTH.set(len(queue))
        try:
            await _process(key, queue, loop)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in this wiring must not kill the worker
            log.exception("worker %d: unexpected error for %s/%s", number, *key)
            queue.retry(key)
        finally:
            queue.done(key)


async def _process(key: RunKey, queue: WorkQueue, loop: asyncio.AbstractEventLoop) -> None:
    run = _state.runs.get(key)
    if run is None:
        return
    wait = _state.expectations.satisfied(key)
    if wait is not None:  # pods this run created are not in the cache yet: their events re-queue it
        queue.add_after(key, wait)
        return
    snap = Snapshot(
        key,
        run,
        _index_values("kubearch_pods", key),
        _index_values("kubearch_services", key),
        _index_values("kubearch_configmaps", key),
    )
    outcome = await loop.run_in_executor(_state.pool, reconcile_run, snap)
    cached = _state.runs.get(key)  # None if the run was deleted during the pass: keep it gone
    if (
        outcome.written is not None
        and cached is not None
        and cached["metadata"]["uid"] == run["metadata"]["uid"]
    ):
        _store_run(key, outcome.written)
    if outcome.gone:
        queue.drop(key)
        return
    if outcome.retry:
        queue.retry(key, at_least=outcome.retry_after)
        return
    queue.forget(key)
    if outcome.requeue_after is not None:
        queue.add_after(key, outcome.requeue_after)


async def _safety_resync(period: float) -> None:
    """Re-queue every run once per ``period``, spread over it (no burst of passes)."""
    while True:
        keys = list(_state.runs)
        step = period / max(1, len(keys))
        if not keys:
            await asyncio.sleep(period)
        for key in keys:
            await asyncio.sleep(step)
            if key in _state.runs:
                _enqueue(key)


# ------------------------------------------------------------------------------------------------
# the reconcile pass (blocking; runs in a worker thread)
# ------------------------------------------------------------------------------------------------
class Refused(Exception):
    """The API server refused an object built from the spec (400/413/422): never retried."""


class Blocked(Exception):
    """A child of an earlier run of the same name is in the way; it is being deleted."""


def reconcile_run(snap: Snapshot) -> Outcome:
    """One pass for one run, timed; every error becomes an Outcome (logged once, no traceback
    for the API server being away)."""
    started, cpu_started = time.perf_counter(), time.thread_time()
    try:
        outcome = _reconcile(snap)
        outage.ok()
        return outcome
    except ApiException as err:
        outage.ok()  # it answered
        RECONCILES.labels(result="error").inc()
        if err.status == 409:  # our copy of the run was stale: the watch brings the new one
            ERRORS.labels(kind="conflict").inc()
            log.debug("%s/%s: conflict, retrying: %s", *snap.key, err.reason)
        elif err.status == 404:  # the run is gone
            return Outcome(gone=True)
        elif refusals.namespace_terminating(err.status, err.body):  # the run goes with it
            log.debug("%s/%s: namespace is being deleted; not retrying", *snap.key)
            return Outcome(gone=True)
        elif err.status == 429:  # throttled (API Priority and Fairness): wait as long as it says
            wait = retry_after_seconds((err.headers or {}).get("Retry-After")) or 0.0
            ERRORS.labels(kind="throttled").inc()
            log.info("%s/%s: throttled by the API server; next try in %.0fs", *snap.key, wait)
            return Outcome(retry=True, retry_after=wait)
        else:
            ERRORS.labels(kind=f"api{err.status}").inc()
            log.warning("%s/%s: reconcile failed: %s %s; will retry", *snap.key, err.status, err.reason)
        return Outcome(retry=True)
    except CONNECTION_ERRORS as err:
        ERRORS.labels(kind="connection").inc()
        RECONCILES.labels(result="error").inc()
        outage.failed(err)
        return Outcome(retry=True)
    except Exception:
        ERRORS.labels(kind="internal").inc()
        RECONCILES.labels(result="error").inc()
        log.exception("%s/%s: reconcile failed", *snap.key)
        return Outcome(retry=True)
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - started)
        RECONCILE_CPU_SECONDS.observe(time.thread_time() - cpu_started)


def _plan(uid: str, name: str, generation: Any, spec_body: Any) -> tuple[Any, builders.RunPlan]:
    """Parsed spec and plan, cached per (uid, generation): a pass on a pod event re-parses nothing."""
    entry = _state.specs.get(uid)
    if entry is not None and entry[0] == generation:
        cached = entry[1]
    else:
        try:
            check_run_name(name)
            spec = parse_spec(spec_body)
            cached = (spec, builders.plan_run(spec))
        except ConfigError as err:
            cached = err
        with _state.lock:
            _state.specs[uid] = (generation, cached)  # replaces an older generation's entry
    if isinstance(cached, ConfigError):
        raise cached
    return cached


def _reconcile(snap: Snapshot) -> Outcome:
    run = snap.run
    meta = run["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    key = snap.key
    if meta.get("deletionTimestamp"):
        _record_phase(key, None)
        return Outcome(gone=True)
    stored = run.get("status") or {}
    status = parse_status(stored)
    now = datetime.now(UTC)
    generation = meta.get("generation")
    try:
        spec, plan = _plan(uid, name, generation, run.get("spec"))
    except ConfigError as err:
        new = invalid_spec(status, str(err), now, generation)
        written = _write_status(run, stored, new.model_dump(mode="json", by_alias=True))
        if (stored.get("message") or "") != new.message:
            _post_event(run, "Warning", "InvalidSpec", str(err))
        RECONCILES.labels(result="invalid").inc()
        _record_phase(key, new.phase)
        return Outcome(written=written)

    owned = [p for p in snap.pods if _owned(p, uid)]
    foreign = [p for p in snap.pods if not _owned(p, uid)]
    decision = reconcile(
        spec, status, owned, now, run=name, shape=plan.shape.model_copy(), generation=generation
    )
    # Status first, actions second: a crash in between leaves the intent recorded (e.g. the new
    # restartCount), and the next pass finishes the job (old-attempt pods are deleted as stale).
    new = decision.status.model_dump(mode="json", by_alias=True)
    written = _write_status(run, stored, new)
    current_run = written or run
    for pod in foreign:  # pods of an earlier run of this name (the garbage collector is slower)
        if not pod["metadata"].get("deletionTimestamp"):
            _delete(
                _clients["core"].delete_namespaced_pod,
                pod["metadata"]["name"],
                namespace,
                pod["metadata"]["uid"],
            )
    for pod_name in decision.delete_pods:
        _delete(_clients["core"].delete_namespaced_pod, pod_name, namespace)
        crashpoint.reached("pod-deleted", key)
    outcome = Outcome(written=written, requeue_after=decision.requeue_after)
    phase = decision.status.phase
    if phase not in TERMINAL_PHASES:
        try:
            ready = _ensure_children(snap, spec, plan, decision)
            if decision.create_group and ready and not foreign:
                shape = decision.status.chosen_shape or plan.shape
                _ensure_group(snap, spec, shape, decision.status.restart_count, owned)
            elif decision.create_group:
                outcome.requeue_after = 1.0  # the way is being cleared; events re-queue sooner
        except Refused as err:
            message = str(err)
            log.warning("%s/%s: %s", namespace, name, message)
            failed = refusals.refused(decision.status, message, now)
            fresh = current_run.get("status") or {}
            written2 = _write_status(current_run, fresh, failed.model_dump(mode="json", by_alias=True))
            outcome.written = written2 or outcome.written
            decision.events.append(("Warning", refusals.REFUSED_REASON, message))
            phase = failed.phase
            outcome.requeue_after = 0.5  # apply cleanPodPolicy to what was created before
        except ConfigError as err:
            refused = invalid_spec(decision.status, str(err), now, generation)
            fresh = current_run.get("status") or {}
            written2 = _write_status(current_run, fresh, refused.model_dump(mode="json", by_alias=True))
            outcome.written = written2 or outcome.written
    for type_, reason, message in decision.events:
        _post_event(run, type_, reason, message)
    _record_phase(key, phase)
    RECONCILES.labels(result="ok").inc()
    if decision.delete_run:
        log.info("deleting %s/%s: ttlSecondsAfterFinished passed", namespace, name)
        _delete(
            lambda n, ns, **kw: _clients["custom"].delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, n, propagation_policy="Background", **kw
            ),
            name,
            namespace,
            uid,
        )
        _record_phase(key, None)
        return Outcome(gone=True)
    return outcome


def _owned(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


# ------------------------------------------------------------------------------------------------
# API helpers (every call idempotent)
# ------------------------------------------------------------------------------------------------
def _create(kind: str, create: Any, namespace: str, body: dict[str, Any]) -> bool:
    """Create; False on 409. A refusal (400/413/422) raises :class:`Refused` naming the object."""
    try:
        create(namespace, body)  # rawapi.CoreWrites: sent as JSON, the answer read and released
        return True
    except ApiException as err:
        if err.status == 409:
            return False
        if refusals.is_refused(err.status):
            raise Refused(
                refusals.describe_refusal(kind, body["metadata"]["name"], err.status, err.body)
            ) from None
        raise


def _release(response: Any) -> None:
    """Read an unparsed response to its end and hand its connection back to the pool.

    Without this, ``_preload_content=False`` leaves the connection busy and the next request
    opens a new TLS connection: a handshake per request, for the operator and the API server.
    """
    if hasattr(response, "release_conn"):
        response.read()
        response.release_conn()


def _delete(delete: Any, name: str, namespace: str, uid: str | None = None) -> None:
    """Delete, optionally only if ``uid`` still names the object (never a newer namesake)."""
    kwargs: dict[str, Any] = {}
    if uid is not None:
        kwargs["body"] = kubernetes.client.V1DeleteOptions(
            preconditions=kubernetes.client.V1Preconditions(uid=uid)
        )
    try:
        delete(name, namespace, **kwargs)
    except ApiException as err:
        if err.status not in (404, 409):  # gone already / precondition failed: someone else's now
            raise


def _check_existing(kind: str, read: Any, delete: Any, name: str, namespace: str, uid: str) -> bool:
    """After a 409: True if the existing object is ours; else delete it (it belongs to an earlier
    run of the same name) and return False."""
    try:
        existing = _clients["api"].sanitize_for_serialization(read(name, namespace))
    except ApiException as err:
        if err.status == 404:
            return False  # deleted meanwhile: the next pass creates it
        raise
    owner = refusals.owner_uid(existing)
    if owner == uid:
        return True
    log.info("%s/%s: %s %s belongs to another owner (%s); replacing it", namespace, name, kind, name, owner)
    _delete(delete, name, namespace, existing["metadata"].get("uid"))
    return False


def _ensure_child(
    kind: str,
    cached: Iterable[dict[str, Any]],
    name: str,
    namespace: str,
    build: Any,
    uid: str,
    resource: str,
) -> tuple[bool, dict[str, Any] | None]:
    """Make the object ``build()`` returns exist and be ours; (ours now, our cached copy).

    ``build`` is called only when a request is needed: a pass that finds the object in the
    cache renders nothing (the ConfigMap's YAML is the costliest part of a pass).
    """
    core = _clients["core"]
    delete = getattr(core, f"delete_namespaced_{resource}")
    mine = next((c for c in cached if c["name"] == name), None)
    if mine is not None:
        if mine["owner"] == uid and not mine["deleting"]:
            return True, mine
        if not mine["deleting"]:
            log.info(
                "%s/%s: %s belongs to another owner (%s); replacing it", namespace, name, kind, mine["owner"]
            )
            _delete(delete, name, namespace, mine["uid"])
        return False, None
    if _create(kind, getattr(_clients["writes"], f"create_namespaced_{resource}"), namespace, build()):
        return True, None
    read = getattr(core, f"read_namespaced_{resource}")
    if _check_existing(kind, read, delete, name, namespace, uid):
        return True, {"name": name, "data": None}  # ours, content unknown to the cache
    return False, None


def _ensure_children(snap: Snapshot, spec: Any, plan: builders.RunPlan, decision: Any) -> bool:
    """Service and ConfigMap, on every pass (from the cache: no request when both are there).

    The ConfigMap's content is brought up to date only when a group is about to be created
    (``resume`` changes with restarts); a running group keeps the config it started with.
    True when both are this run's.
    """
    meta = snap.run["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    svc_ok, _ = _ensure_child(
        "Service",
        snap.services,
        builders.service_name(name),
        namespace,
        lambda: builders.build_service(name, namespace, uid, spec),
        uid,
        "service",
    )
    resume = decision.resume if decision.create_group else _resume_of(decision.status)
    rendered: list[dict[str, Any]] = []

    def configmap() -> dict[str, Any]:
        if not rendered:
            rendered.append(builders.build_configmap(name, namespace, uid, plan, resume=resume))
        return rendered[0]

    cm_name = builders.configmap_name(name)
    cm_ok, cached = _ensure_child(
        "ConfigMap", snap.configmaps, cm_name, namespace, configmap, uid, "config_map"
    )
    if (
        cm_ok
        and decision.create_group
        and cached is not None
        and cached["data"] != _digest(configmap()["data"])
    ):
        try:
            _release(
                _clients["core"].patch_namespaced_config_map(
                    cm_name, namespace, {"data": configmap()["data"]}, _preload_content=False
                )
            )
            crashpoint.reached("configmap-patched", snap.key)
        except ApiException as err:
            if refusals.is_refused(err.status):
                raise Refused(refusals.describe_refusal("ConfigMap", cm_name, err.status, err.body)) from None
            raise
    return svc_ok and cm_ok


def _resume_of(status: Any) -> bool:
    """Whether a group created now would resume (as :func:`status.reconcile` decides it)."""
    return status.restart_count > 0 or any(c.type == "Suspended" for c in status.conditions)


def _ensure_group(snap: Snapshot, spec: Any, shape: Any, attempt: int, owned: list[dict[str, Any]]) -> None:
    """PodGroup (gang) and the pods of ``attempt`` that the cache does not show yet."""
    core, custom = _clients["core"], _clients["custom"]
    meta = snap.run["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    group = builders.build_pod_group(name, namespace, uid, spec, shape)
    if group is not None:
        api_group, version = group["apiVersion"].split("/")
        try:
            custom.create_namespaced_custom_object(api_group, version, namespace, "podgroups", group)
        except ApiException as err:
            if err.status == 404:
                raise ConfigError(
                    f"runPolicy.schedulingPolicy: the API server has no {group['apiVersion']} PodGroup"
                ) from None
            if refusals.is_refused(err.status):
                raise Refused(refusals.describe_refusal("PodGroup", name, err.status, err.body)) from None
            if err.status != 409:
                raise
    present = {p["metadata"]["name"] for p in owned}
    todo = [
        p
        for p in builders.build_pods(name, namespace, uid, spec, shape, attempt)
        if p["metadata"]["name"] not in present
    ]
    # Expect before creating: the watch event may arrive before the create call returns.
    names = [p["metadata"]["name"] for p in todo]
    _state.expectations.expect(snap.key, names)
    unseen = set(names)  # pods whose ADDED event will never come (not created by this call)
    created = 0
    try:
        for pod in todo:
            pod_name = pod["metadata"]["name"]
            if _create("Pod", _clients["writes"].create_namespaced_pod, namespace, pod):
                created += 1
                unseen.discard(pod_name)
                crashpoint.reached("pod-created", snap.key)
                continue
            _check_existing(
                "Pod", core.read_namespaced_pod, core.delete_namespaced_pod, pod_name, namespace, uid
            )
    finally:
        for pod_name in unseen:
            _state.expectations.observed(snap.key, pod_name)
        POD_CREATIONS.inc(created)


def _post_event(run: dict[str, Any], type_: str, reason: str, message: str) -> None:
    meta = run["metadata"]
    now = datetime.now(UTC)
    body = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": type_,
        "reason": reason,
        "message": message[:1000],
        "source": {"component": "kubearch-operator"},
        "firstTimestamp": rfc3339(now),
        "lastTimestamp": rfc3339(now),
        "count": 1,
    }
    try:
        _clients["writes"].create_namespaced_event(meta["namespace"], body)
    except ApiException as err:  # events are best effort
        log.warning("could not post event %s: %s", reason, err.reason)
        return
    crashpoint.reached("event-posted", (meta["namespace"], meta["name"]))


def _record_phase(key: RunKey, phase: str | None) -> None:
    """Track ``key``'s phase (None: forget it) and move the per-phase gauge by the change only."""
    with _state.lock:
        before = _state.phases.pop(key, None) if phase is None else _state.phases.get(key)
        if phase is not None:
            _state.phases[key] = phase
        if before == phase:
            return
        counts = _state.phase_counts
        changed = []
        if before is not None:
            counts[before] = counts.get(before, 0) - 1
            changed.append(before)
        if phase is not None:
            counts[phase] = counts.get(phase, 0) + 1
            changed.append(phase)
        values = [(p, counts[p]) for p in changed]
    for p, n in values:
        RUNS.labels(phase=p).set(n)


def _prune(value: Any) -> Any:
    """Drop nulls and empty values: the stored status has none (the merge patch deletes them)."""
    if isinstance(value, dict):
        out = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [], "")}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def _write_status(run: dict[str, Any], stored: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """Patch the status subresource unless nothing changed; returns the run as written.

    The run's resourceVersion goes into the patch as a precondition: a status decided on a stale
    copy of the run is refused (409) and decided again on the newer copy.
    """
    if _prune(new) == _prune(stored):
        return None
    meta = run["metadata"]
    key = (meta["namespace"], meta["name"])
    crashpoint.reached("status-write", key)
    patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": new}
    written = _clients["custom"].patch_namespaced_custom_object_status(
        GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch
    )
    crashpoint.reached("status-written", key)
    return written


from . import search_handlers  # noqa: E402, F401  (registers the ArchitectureSearch handlers)
