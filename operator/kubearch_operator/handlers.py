"""kopf handlers: thin wiring between the API server and the pure reconcile step.

Run it with ``kopf run -m kubearch_operator.handlers --all-namespaces`` or ``python -m
kubearch_operator``. Design:

* One **daemon per TrainingRun** runs a level-triggered loop: read the run and its pods, ask
  :func:`kubearch_operator.status.reconcile` what to do, do it, write the status. Running every
  step of a run in one loop serialises them without locks; it is woken at once by the run's own
  create/update/``spec.runPolicy.suspend`` handlers and by events of its pods, and otherwise
  re-checks every ``KUBEARCH_RESYNC_SECONDS`` (deadlines, TTLs, missed events).
* Every write is idempotent: pods, Service and ConfigMap have deterministic names and are created
  if absent (a 409 means another pass already did it), so a handler running twice or after an
  operator crash never makes duplicates.
* A spec the operator cannot run (caught by the pydantic models after the CRD schema let it in)
  changes nothing but a ``SpecValid=False`` condition: running pods keep running.
* kopf's own bookkeeping goes into ``kubearch.dev/*`` annotations, not into ``status``, whose
  schema belongs to the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes
from kubearch_trainer.config import ConfigError
from kubernetes.client.rest import ApiException
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from . import builders
from .api import GROUP, KIND, PHASES, PLURAL, VERSION, check_run_name, parse_spec, parse_status
from .status import invalid_spec, reconcile, rfc3339

log = logging.getLogger("kubearch.operator")

RESYNC_SECONDS = float(os.environ.get("KUBEARCH_RESYNC_SECONDS", "10"))
METRICS_PORT = int(os.environ.get("KUBEARCH_OPERATOR_METRICS_PORT", "8000"))

RECONCILES = Counter("kubearch_operator_reconcile_total", "Reconcile passes by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "kubearch_operator_reconcile_duration_seconds",
    "Wall time of one reconcile pass.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RUNS = Gauge("kubearch_operator_runs", "TrainingRuns this operator tracks, by phase.", ["phase"])
POD_CREATIONS = Counter("kubearch_operator_pod_creations_total", "Pods created for TrainingRuns.")
ERRORS = Counter("kubearch_operator_errors_total", "Errors while reconciling, by kind.", ["kind"])

_wakeups: dict[tuple[str, str], asyncio.Event] = {}
_phases: dict[tuple[str, str], str] = {}
_phases_lock = threading.Lock()
_clients: dict[str, Any] = {}
_metrics_started = False

#: A sentinel: the run is gone (or going); its loop ends.
GONE = -1.0


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------
def _load_kube_config() -> None:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    api = kubernetes.client.ApiClient()
    _clients.update(
        api=api, core=kubernetes.client.CoreV1Api(api), custom=kubernetes.client.CustomObjectsApi(api)
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _metrics_started
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.peering.name = os.environ.get("KUBEARCH_PEERING", "kubearch")
    # A crashed replica's peering record blocks its replacement until it expires (kopf pauses
    # while a same-priority peer looks alive): this bounds that wait.
    settings.peering.lifetime = int(os.environ.get("KUBEARCH_PEERING_LIFETIME", "60"))
    settings.posting.level = logging.WARNING  # kopf's own per-handler events stay out of `describe`
    settings.watching.server_timeout = 300
    _load_kube_config()
    if METRICS_PORT and not _metrics_started:
        start_http_server(METRICS_PORT)
        _metrics_started = True
        log.info("operator metrics on :%d/metrics", METRICS_PORT)


@kopf.on.probe(id="trackedRuns")
def tracked_runs(**_: Any) -> int:
    """Reported by kopf's liveness endpoint (``--liveness``)."""
    return len(_wakeups)


# ------------------------------------------------------------------------------------------------
# API helpers (every call idempotent)
# ------------------------------------------------------------------------------------------------
def _to_dict(obj: Any) -> dict[str, Any]:
    return _clients["api"].sanitize_for_serialization(obj)


def _create_if_absent(create: Any, namespace: str, body: dict[str, Any]) -> bool:
    """Create; False if it already exists (a previous pass, or another operator replica, made it)."""
    try:
        create(namespace, body)
        return True
    except ApiException as err:
        if err.status == 409:
            return False
        raise


def _delete_pod(namespace: str, name: str) -> None:
    try:
        _clients["core"].delete_namespaced_pod(name, namespace, grace_period_seconds=30)
    except ApiException as err:
        if err.status != 404:
            raise


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
        _clients["core"].create_namespaced_event(meta["namespace"], body)
    except ApiException as err:  # events are best effort
        log.warning("could not post event %s: %s", reason, err.reason)


def _ensure_group(
    run: dict[str, Any], spec: Any, plan: builders.RunPlan, shape: Any, attempt: int, resume: bool
) -> int:
    """Service, ConfigMap, PodGroup (gang) and the pods of ``attempt`` in ``shape``; pods created."""
    core, custom = _clients["core"], _clients["custom"]
    name, ns, uid = run["metadata"]["name"], run["metadata"]["namespace"], run["metadata"]["uid"]
    _create_if_absent(core.create_namespaced_service, ns, builders.build_service(name, ns, uid, spec))
    cm = builders.build_configmap(name, ns, uid, plan, resume=resume)
    if not _create_if_absent(core.create_namespaced_config_map, ns, cm):
        core.patch_namespaced_config_map(cm["metadata"]["name"], ns, {"data": cm["data"]})
    group = builders.build_pod_group(name, ns, uid, spec, shape)
    if group is not None:
        api_group, version = group["apiVersion"].split("/")
        try:
            custom.create_namespaced_custom_object(api_group, version, ns, "podgroups", group)
        except ApiException as err:
            if err.status == 404:
                raise ConfigError(
                    f"runPolicy.schedulingPolicy: the API server has no {group['apiVersion']} PodGroup"
                ) from None
            if err.status != 409:
                raise
    created = 0
    for pod in builders.build_pods(name, ns, uid, spec, shape, attempt):
        if _create_if_absent(core.create_namespaced_pod, ns, pod):
            created += 1
    POD_CREATIONS.inc(created)
    return created


def _record_phase(key: tuple[str, str], phase: str | None) -> None:
    with _phases_lock:
        if phase is None:
            _phases.pop(key, None)
        else:
            _phases[key] = phase
        counts = {p: 0 for p in PHASES}
        for p in _phases.values():
            counts[p] = counts.get(p, 0) + 1
    for p, n in counts.items():
        RUNS.labels(phase=p).set(n)


# ------------------------------------------------------------------------------------------------
# the reconcile pass (blocking; runs in a worker thread)
# ------------------------------------------------------------------------------------------------
def reconcile_run(namespace: str, name: str) -> float | None:
    """One pass for one run; returns seconds until a deadline/TTL is due, None, or GONE."""
    core, custom = _clients["core"], _clients["custom"]
    key = (namespace, name)
    try:
        run = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            _record_phase(key, None)
            return GONE
        raise
    meta = run["metadata"]
    if meta.get("deletionTimestamp"):
        _record_phase(key, None)
        return GONE
    stored = run.get("status") or {}
    status = parse_status(stored)
    now = datetime.now(UTC)
    generation = meta.get("generation")
    try:
        check_run_name(name)
        spec = parse_spec(run.get("spec"))
        plan = builders.plan_run(spec)
    except ConfigError as err:
        new = invalid_spec(status, str(err), now, generation)
        _write_status(run, stored, new.model_dump(mode="json", by_alias=True))
        if (stored.get("message") or "") != new.message:
            _post_event(run, "Warning", "InvalidSpec", str(err))
        RECONCILES.labels(result="invalid").inc()
        _record_phase(key, new.phase)
        return None

    pods = [
        _to_dict(p)
        for p in core.list_namespaced_pod(namespace, label_selector=builders.run_selector(name)).items
    ]
    # Pods left by an earlier run of the same name (no garbage collector yet): not ours, delete them.
    foreign = [
        p
        for p in pods
        if all(o.get("uid") != meta["uid"] for o in p["metadata"].get("ownerReferences") or [])
    ]
    owned = [p for p in pods if p not in foreign]
    decision = reconcile(spec, status, owned, now, run=name, shape=plan.shape, generation=generation)
    # Status first, actions second: a crash in between leaves the intent recorded (e.g. the new
    # restartCount), and the next pass finishes the job (old-attempt pods are deleted as stale).
    new = decision.status.model_dump(mode="json", by_alias=True)
    _write_status(run, stored, new)
    for pod in foreign:
        if not pod["metadata"].get("deletionTimestamp"):
            _delete_pod(namespace, pod["metadata"]["name"])
    for pod_name in decision.delete_pods:
        _delete_pod(namespace, pod_name)
    if decision.create_group and not foreign:
        try:
            shape = decision.status.chosen_shape or plan.shape
            _ensure_group(run, spec, plan, shape, decision.status.restart_count, decision.resume)
        except ConfigError as err:
            refused = invalid_spec(decision.status, str(err), now, generation)
            _write_status(run, new, refused.model_dump(mode="json", by_alias=True))
    for type_, reason, message in decision.events:
        _post_event(run, type_, reason, message)
    _record_phase(key, decision.status.phase)
    RECONCILES.labels(result="ok").inc()
    if decision.delete_run:
        log.info("deleting %s/%s: ttlSecondsAfterFinished passed", namespace, name)
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as err:
            if err.status != 404:
                raise
        _record_phase(key, None)
        return GONE
    return decision.requeue_after


def _prune(value: Any) -> Any:
    """Drop nulls and empty values: the stored status has none (the merge patch deletes them)."""
    if isinstance(value, dict):
        out = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [], "")}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def _write_status(run: dict[str, Any], stored: dict[str, Any], new: dict[str, Any]) -> None:
    """Patch the status subresource, unless nothing changed (no write, no event, per resync)."""
    if _prune(new) == _prune(stored):
        return
    meta = run["metadata"]
    _clients["custom"].patch_namespaced_custom_object_status(
        GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": new}
    )


def _wake(namespace: str | None, name: str | None) -> None:
    """Called from async handlers only: asyncio.Event is not thread-safe."""
    event = _wakeups.get((namespace or "", name or ""))
    if event is not None:
        event.set()


# ------------------------------------------------------------------------------------------------
# kopf handlers
# ------------------------------------------------------------------------------------------------
async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, timeout: float) -> None:
    """Until a wake-up, a stop request (kopf's flag: exit promptly, no cancellation) or ``timeout``."""
    waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, return_exceptions=True)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def run_loop(name: str, namespace: str, stopped: kopf.DaemonStopped, logger: Any, **_: Any) -> None:
    """The per-run reconcile loop (see the module docstring)."""
    key = (namespace, name)
    wake = _wakeups.setdefault(key, asyncio.Event())
    try:
        while not stopped:
            wake.clear()
            started = time.perf_counter()
            try:
                requeue = await asyncio.to_thread(reconcile_run, namespace, name)
            except ApiException as err:
                ERRORS.labels(kind="api").inc()
                RECONCILES.labels(result="error").inc()
                logger.warning("reconcile failed: %s %s", err.status, err.reason)
                requeue = 2.0
            except Exception:
                ERRORS.labels(kind="internal").inc()
                RECONCILES.labels(result="error").inc()
                logger.exception("reconcile failed")
                requeue = 5.0
            finally:
                RECONCILE_SECONDS.observe(time.perf_counter() - started)
            if requeue == GONE:
                return
            timeout = RESYNC_SECONDS if requeue is None else max(0.1, min(RESYNC_SECONDS, requeue))
            await _sleep(wake, stopped, timeout)
    finally:
        _wakeups.pop(key, None)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def on_run_changed(name: str, namespace: str, **_: Any) -> None:
    """Any change of the run: reconcile now rather than at the next resync."""
    _wake(namespace, name)


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.runPolicy.suspend")
async def on_suspend_changed(old: Any, new: Any, name: str, namespace: str, logger: Any, **_: Any) -> None:
    logger.info("runPolicy.suspend: %s -> %s", old, new)
    _wake(namespace, name)


@kopf.on.event("", "v1", "pods", labels={builders.APP_LABEL: builders.APP, builders.RUN_LABEL: kopf.PRESENT})
async def on_pod_event(namespace: str, labels: dict[str, str], **_: Any) -> None:
    """A pod of a run changed (phase, exit, deletion): wake its run's loop."""
    _wake(namespace, labels.get(builders.RUN_LABEL))


from . import search_handlers  # noqa: E402, F401  (registers the ArchitectureSearch handlers)
