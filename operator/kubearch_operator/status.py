"""Pure reconciliation: (spec, stored status, the run's pods, now) -> new status + actions.

All of a TrainingRun's lifecycle rules live here, as one function with no I/O, so they are tested
case by case without a cluster; the kopf handlers only carry out :class:`Decision`.

Rules (Kubeflow's meanings, with the failure modes its users report fixed):

* Pods carry ``kubearch.dev/attempt`` = the run's restart count. Only the current attempt's pods
  count; older ones are deleted, and a new group is created only when they are gone (names repeat).
* One pod failing fails the *group*: every pod of the attempt is deleted and the group recreated
  with ``restartCount + 1`` (resuming from the last checkpoint) while ``restartCount <
  backoffLimit``; then the run is Failed (``BackoffLimitExceeded``).
* Exit codes are classified with ``kubearch_trainer.exit_codes``: config/data errors, NaN aborts and
  CUDA OOM (and a container ``OOMKilled``) fail the run at once; 130/137/143 (preemption, eviction,
  node shutdown), evicted/preempted pods, 1 and any other code are retried.
* A pod missing from a group that has run (phase Running) was lost: the group restarts. Before
  the group ran, a missing pod is created (an operator killed mid-creation leaves a partial group).
* The master (index 0) succeeding makes the run Succeeded (torchrun nodes finish together), even
  if a worker fails after it (Kubeflow: master success is job success); success is final.
* A changed condition moves to the end of ``status.conditions`` (Kubeflow's convention), so
  ``conditions[-1]`` is the current state.
* ``activeDeadlineSeconds`` counts from ``startTime`` (set when the group is first created, reset by
  suspend like a Job's); past it the run Fails with ``DeadlineExceeded``.
* ``suspend`` deletes the pods and keeps status; resuming creates the group again from the
  checkpoint. Without ``checkpointClaim`` there is none to resume from (emptyDir): the run says
  so with ``CheckpointPersistent=False`` and a ``RestartFromScratch`` event per recreated group.
  At a terminal phase ``cleanPodPolicy`` deletes All pods, the unfinished (Running)
  ones, or None; ``ttlSecondsAfterFinished`` then deletes the run itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubearch_trainer.exit_codes import PERMANENT_EXIT_CODES, RETRYABLE_SIGNAL_EXIT_CODES, ExitCode

from .api import (
    TERMINAL_PHASES,
    ChosenShape,
    Condition,
    Progress,
    ReplicaStatus,
    TrainingRunSpec,
    TrainingRunStatus,
)
from .builders import ATTEMPT_LABEL, CONTAINER, INDEX_LABEL, PROGRESS_ANNOTATION, pod_name

#: Pod-level reasons (pod.status.reason) that mean the node or the scheduler took the pod away.
RETRYABLE_POD_REASONS = frozenset(
    {"Evicted", "Preempted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated"}
)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class PodView:
    """What reconciliation needs to know about one pod."""

    name: str
    index: int
    attempt: int
    phase: str
    deleting: bool
    exit_code: int | None = None
    container_reason: str | None = None
    pod_reason: str | None = None
    termination_message: str | None = None
    progress_annotation: str | None = None


def pod_view(pod: dict[str, Any]) -> PodView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    exit_code = reason = message = None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") != CONTAINER:
            continue
        terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get(
            "terminated"
        )
        if terminated:
            exit_code = terminated.get("exitCode")
            reason = terminated.get("reason")
            message = terminated.get("message")
    return PodView(
        name=meta.get("name", ""),
        index=int(labels.get(INDEX_LABEL, "0")),
        attempt=int(labels.get(ATTEMPT_LABEL, "0")),
        phase=status.get("phase") or "Pending",
        deleting=bool(meta.get("deletionTimestamp")),
        exit_code=exit_code,
        container_reason=reason,
        pod_reason=status.get("reason"),
        termination_message=message,
        progress_annotation=(meta.get("annotations") or {}).get(PROGRESS_ANNOTATION),
    )


@dataclass(frozen=True)
class Failure:
    pod: str
    retryable: bool
    reason: str
    message: str


def classify_failure(v: PodView) -> Failure:
    """Is a failed pod worth restarting the group for? (see the module docstring)."""
    failure = _classify(v)
    error = parse_report(v.termination_message).get("error")
    if isinstance(error, str) and error:  # the trainer's own words, from its termination message
        return Failure(failure.pod, failure.retryable, failure.reason, f"{failure.message}: {error[:300]}")
    return failure


def _classify(v: PodView) -> Failure:
    if v.container_reason == "OOMKilled":
        return Failure(v.name, False, "OOMKilled", f"pod {v.name} was OOMKilled (host memory); not retried")
    if v.pod_reason in RETRYABLE_POD_REASONS:
        return Failure(v.name, True, v.pod_reason, f"pod {v.name} {v.pod_reason.lower()}; retryable")
    code = v.exit_code
    reported = parse_report(v.termination_message).get("exit_code")
    if code == ExitCode.FAILED and isinstance(reported, int) and reported in PERMANENT_EXIT_CODES:
        # torchrun exits 1 whatever its worker's code was; the trainer's own code is in its report.
        code = reported
    if code is None:
        return Failure(v.name, True, "PodFailed", f"pod {v.name} failed without an exit code; retryable")
    if code in PERMANENT_EXIT_CODES:
        name = ExitCode(code).name
        reason = (
            "".join(part.capitalize() for part in name.split("_")).replace("Oom", "OOM").replace("Nan", "NaN")
        )
        return Failure(v.name, False, reason, f"pod {v.name} exited {code} ({name}); not retried")
    if code in RETRYABLE_SIGNAL_EXIT_CODES:
        return Failure(
            v.name, True, f"Signal{code - 128}", f"pod {v.name} exited {code} (signal {code - 128})"
        )
    return Failure(v.name, True, f"ExitCode{code}", f"pod {v.name} exited {code}; retryable")


@dataclass
class Decision:
    """What the handler must do, in order: delete pods, create the group, patch status, delete run."""

    status: TrainingRunStatus
    create_group: bool = False
    resume: bool = False  # the group to create continues from the checkpoint
    delete_pods: list[str] = field(default_factory=list)
    delete_run: bool = False
    requeue_after: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def set_condition(
    st: TrainingRunStatus, type_: str, status: str, reason: str, message: str, now: datetime
) -> None:
    """Set a condition the way Kubeflow's ``setCondition`` does: a change moves it to the end.

    Tools read ``conditions[-1]`` as the current state (Kubeflow's convention, ``kubectl wait``
    scripts, dashboards), so a condition whose status or reason changes is taken out and appended;
    one that only refreshes its message stays where it is. ``lastTransitionTime`` moves only when
    ``status`` does.
    """
    current = next((c for c in st.conditions if c.type == type_), None)
    if current is not None and current.status == status and current.reason == reason:
        current.message = message
        return
    since = current.last_transition_time if current is not None and current.status == status else None
    st.conditions = [c for c in st.conditions if c.type != type_]
    st.conditions.append(
        Condition(
            type=type_,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            message=message,
            last_transition_time=since or rfc3339(now),
        )
    )


def condition(st: TrainingRunStatus, type_: str) -> Condition | None:
    return next((c for c in st.conditions if c.type == type_), None)


def _num(value: Any) -> float | None:
    """A finite number, else None (NaN/inf cannot be written into a JSON status)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def parse_report(text: str | None) -> dict[str, Any]:
    """The trainer's JSON summary (termination message) or progress annotation; {} if not JSON."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


#: Keys of the trainer's summary (``kubearch_trainer.results.write_termination_log``) and progress annotation
#: that feed ``status.progress``; every other finite number lands in ``status.metrics``.
_STEP_KEYS = ("step", "steps", "global_step")
_LOSS_KEYS = ("loss", "final_train_loss", "train_loss", "final_loss")
_SPEED_KEYS = ("tokens_per_second", "tokensPerSecond", "tokens_per_s")
_NOT_METRICS = frozenset({*_STEP_KEYS, *_LOSS_KEYS, *_SPEED_KEYS, "exit_code", "world_size"})


def _first(report: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    return next((_num(report[k]) for k in keys if _num(report.get(k)) is not None), None)


def _apply_report(st: TrainingRunStatus, report: dict[str, Any]) -> None:
    """Fold the trainer's JSON (snake_case or camelCase names) into progress and metrics."""
    if not report:
        return
    prog = st.progress or Progress()
    step = _first(report, _STEP_KEYS)
    if step is not None:
        prog.step = int(step)
    loss = _first(report, _LOSS_KEYS)
    if loss is not None:
        prog.loss = loss
    speed = _first(report, _SPEED_KEYS)
    if speed is not None:
        prog.tokens_per_second = speed
    st.progress = prog
    nested = report.get("metrics") if isinstance(report.get("metrics"), dict) else {}
    for key, value in [*report.items(), *nested.items()]:
        if key not in _NOT_METRICS and _num(value) is not None:
            st.metrics[key] = float(value)
    if isinstance(report.get("checkpoint"), str):
        st.checkpoint = report["checkpoint"]


def _replica_statuses(pods: list[PodView]) -> dict[str, ReplicaStatus]:
    out: dict[str, ReplicaStatus] = {}
    for v in pods:
        rs = out.setdefault("Master" if v.index == 0 else "Worker", ReplicaStatus())
        if v.phase == "Succeeded":
            rs.succeeded += 1
        elif v.phase == "Failed":
            rs.failed += 1
        else:
            rs.active += 1
    return out


FROM_SCRATCH = (
    "this group starts over at step 0: without resources.checkpointClaim the checkpoints lived in "
    "an emptyDir that went away with the previous pods"
)


def _checkpoint_condition(spec: TrainingRunSpec, st: TrainingRunStatus, now: datetime) -> None:
    """``CheckpointPersistent``: does a group restart or a resume continue, or start over?

    Checkpoints go to ``/checkpoints``: a PersistentVolumeClaim when ``checkpointClaim`` names one,
    else an emptyDir that is deleted with the pods. The emptyDir default keeps a first run free of
    storage set-up, but then a restart cannot resume; this condition (and a ``RestartFromScratch``
    event each time a group is recreated) says so instead of starting at step 0 silently.
    """
    claim = spec.resources.checkpoint_claim
    if claim:
        set_condition(
            st,
            "CheckpointPersistent",
            "True",
            "PersistentVolumeClaim",
            f"checkpoints go to PersistentVolumeClaim {claim}: restarts and resumes continue from them",
            now,
        )
    else:
        set_condition(
            st,
            "CheckpointPersistent",
            "False",
            "EmptyDir",
            "checkpoints go to an emptyDir deleted with the pods: a group restart or a resume starts "
            "over at step 0; set resources.checkpointClaim to a PersistentVolumeClaim to resume",
            now,
        )


def _finish(st: TrainingRunStatus, phase: str, reason: str, message: str, now: datetime) -> None:
    st.phase = phase  # type: ignore[assignment]
    st.message = message
    st.completion_time = rfc3339(now)
    set_condition(st, "Running", "False", reason, message, now)
    if condition(st, "Restarting"):
        set_condition(st, "Restarting", "False", reason, message, now)
    set_condition(st, phase, "True", reason, message, now)  # last: the run's final state


def _terminal(spec: TrainingRunSpec, d: Decision, views: list[PodView], now: datetime) -> Decision:
    """cleanPodPolicy and ttlSecondsAfterFinished for a finished run."""
    policy = spec.run_policy.clean_pod_policy
    live = [v for v in views if not v.deleting]
    if policy == "All":
        d.delete_pods = [v.name for v in live]
    elif policy == "Running":
        d.delete_pods = [v.name for v in live if v.phase not in ("Succeeded", "Failed")]
    ttl = spec.run_policy.ttl_seconds_after_finished
    done = parse_time(d.status.completion_time)
    if ttl is not None and done is not None:
        left = ttl - (now - done).total_seconds()
        if left <= 0:
            d.delete_run = True
        else:
            d.requeue_after = left
    return d


def reconcile(
    spec: TrainingRunSpec,
    status: TrainingRunStatus,
    pods: list[dict[str, Any]],
    now: datetime,
    *,
    run: str,
    shape: ChosenShape,
    generation: int | None = None,
) -> Decision:
    """The whole lifecycle step for run ``run``; ``shape`` = what the current spec asks for.

    A group that exists keeps the shape it was created with (``status.chosenShape``): changes to
    the spec's shape, model or data apply when the next group is created (restart or resume).
    """
    st = status.model_copy(deep=True)
    st.observed_generation = generation
    set_condition(st, "SpecValid", "True", "Valid", "spec accepted", now)
    _checkpoint_condition(spec, st, now)
    d = Decision(status=st)
    views = [pod_view(p) for p in pods]
    same_attempt = [v for v in views if v.attempt == st.restart_count]
    if st.chosen_shape is None or not same_attempt:
        st.chosen_shape = shape
    nodes = st.chosen_shape.nodes
    current = [v for v in same_attempt if v.index < nodes]
    stale = [v for v in views if v not in current]
    if current:
        st.replica_statuses = _replica_statuses(current)
    for v in sorted(current, key=lambda v: v.index, reverse=True):  # the master's report wins
        _apply_report(st, parse_report(v.progress_annotation))
        _apply_report(st, parse_report(v.termination_message))

    if st.phase in TERMINAL_PHASES:
        return _terminal(spec, d, views, now)

    rp = spec.run_policy
    if rp.suspend:
        d.delete_pods = [v.name for v in views if not v.deleting]
        if st.phase != "Suspended":
            msg = "runPolicy.suspend is true: pods deleted, status kept"
            st.phase, st.message, st.start_time = "Suspended", msg, None
            set_condition(st, "Running", "False", "Suspended", msg, now)
            set_condition(st, "Suspended", "True", "Suspended", msg, now)
            d.events.append(("Normal", "Suspended", msg))
        st.replica_statuses = _replica_statuses(
            [v for v in current if not v.deleting and v.name not in d.delete_pods]
        )
        return d
    resumed = False
    if st.phase == "Suspended":
        msg = "runPolicy.suspend is false: recreating the group from the last checkpoint"
        st.phase, st.message, resumed = "Pending", msg, True
        set_condition(st, "Suspended", "False", "Resumed", msg, now)
        d.events.append(("Normal", "Resumed", msg))

    start = parse_time(st.start_time)
    if rp.active_deadline_seconds and start is not None:
        left = rp.active_deadline_seconds - (now - start).total_seconds()
        if left <= 0:
            msg = f"run was active longer than activeDeadlineSeconds ({rp.active_deadline_seconds}s)"
            _finish(st, "Failed", "DeadlineExceeded", msg, now)
            d.events.append(("Warning", "DeadlineExceeded", msg))
            return _terminal(spec, d, views, now)
        d.requeue_after = left

    if stale:  # a previous attempt is still going away; its names block the new group
        d.delete_pods = [v.name for v in stale if not v.deleting]
        return d

    by_name = {v.name: v for v in current}
    master = by_name.get(pod_name(run, 0))
    if master is not None and master.phase == "Succeeded":
        # Kubeflow's rule: the master's success is the job's success, whatever a worker does
        # after it (torch's shutdown race often makes one exit 1), and success is final.
        msg = "the master finished successfully"
        _finish(st, "Succeeded", "Succeeded", msg, now)
        d.events.append(("Normal", "Succeeded", msg))
        return _terminal(spec, d, views, now)

    failed = [classify_failure(v) for v in current if v.phase == "Failed"]
    started = any(v.phase in ("Running", "Succeeded") for v in current)
    # A missing pod is *lost* only once the whole group has been seen running (phase Running).
    # Before that it may never have been created: an operator killed between two pod creations
    # leaves a partial group, whose first pods the kubelet may start meanwhile. Those pods are
    # created (below), not taken for a failure that restarts the group or spends backoffLimit.
    if not failed and started and st.phase == "Running":
        lost = [n for n in (pod_name(run, i) for i in range(nodes)) if n not in by_name]
        failed = [Failure(n, True, "PodLost", f"pod {n} disappeared while the group ran") for n in lost]
    if failed:
        permanent = next((f for f in failed if not f.retryable), None)
        if permanent is not None:
            _finish(st, "Failed", permanent.reason, permanent.message, now)
            d.events.append(("Warning", permanent.reason, permanent.message))
            return _terminal(spec, d, views, now)
        first = failed[0]
        if st.restart_count < rp.backoff_limit:
            st.restart_count += 1
            msg = f"{first.message}; restarting the group ({st.restart_count} of {rp.backoff_limit})"
            st.phase, st.message = "Restarting", msg
            set_condition(st, "Running", "False", "Restarting", msg, now)
            set_condition(st, "Restarting", "True", first.reason, msg, now)
            d.delete_pods = [v.name for v in current if not v.deleting]
            d.events.append(("Warning", "Restarting", msg))
            return d
        msg = f"{first.message}; backoffLimit ({rp.backoff_limit}) reached"
        _finish(st, "Failed", "BackoffLimitExceeded", msg, now)
        d.events.append(("Warning", "BackoffLimitExceeded", msg))
        return _terminal(spec, d, views, now)

    if len(current) < nodes:
        d.create_group = True
        d.resume = resumed or st.restart_count > 0 or condition(st, "Suspended") is not None
        if d.resume and not spec.resources.checkpoint_claim and not current:
            d.events.append(("Warning", "RestartFromScratch", FROM_SCRATCH))
        if st.start_time is None:
            st.start_time = rfc3339(now)
        if st.phase == "Pending":
            msg = f"created {nodes} pod(s)"
            st.phase, st.message = "Created", msg
            set_condition(st, "Created", "True", "PodsCreated", msg, now)
            d.events.append(("Normal", "Created", msg))
        return d

    if all(v.phase in ("Running", "Succeeded") for v in current) and st.phase != "Running":
        msg = f"all {nodes} pod(s) running"
        st.phase, st.message = "Running", msg
        if condition(st, "Restarting"):
            set_condition(st, "Restarting", "False", "PodsRunning", msg, now)
        set_condition(st, "Running", "True", "PodsRunning", msg, now)
        d.events.append(("Normal", "Running", msg))
    return d


def invalid_spec(
    status: TrainingRunStatus, message: str, now: datetime, generation: int | None
) -> TrainingRunStatus:
    """A spec the operator cannot run: say why, and change nothing else (running pods keep running)."""
    st = status.model_copy(deep=True)
    set_condition(st, "SpecValid", "False", "InvalidSpec", message, now)
    st.message = f"spec rejected (generation {generation}); pods unchanged: {message}"
    return st
