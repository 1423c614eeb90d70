"""The pure lifecycle step: pods (+ stored status) -> new status and actions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubearch_operator.api import TrainingRunStatus, parse_spec
from kubearch_operator.builders import build_pods, plan_run
from kubearch_operator.status import (
    Decision,
    classify_failure,
    invalid_spec,
    pod_view,
    reconcile,
    rfc3339,
    set_condition,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
RUN = "demo"


def make_spec(**run_policy: Any):
    return parse_spec({"resources": {"nodes": 2, "gpusPerNode": 1}, "runPolicy": run_policy})


def make_pods(spec, attempt: int = 0, phases: tuple[str, ...] = ("Pending", "Pending")) -> list[dict]:
    pods = build_pods(RUN, "ns", "uid", spec, plan_run(spec).shape, attempt)
    for pod, phase in zip(pods, phases, strict=True):
        pod["status"] = {"phase": phase}
    return pods


def terminate(pod: dict, phase: str, code: int, message: str = "", reason: str = "Error") -> dict:
    pod["status"] = {
        "phase": phase,
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {"terminated": {"exitCode": code, "reason": reason, "message": message}},
            }
        ],
    }
    return pod


def step(spec, status: TrainingRunStatus, pods: list[dict], now: datetime = NOW) -> Decision:
    return reconcile(spec, status, pods, now, run=RUN, shape=plan_run(spec).shape, generation=3)


def running_status(**kw: Any) -> TrainingRunStatus:
    return TrainingRunStatus(phase="Running", start_time=rfc3339(NOW - timedelta(seconds=10)), **kw)


def cond(status: TrainingRunStatus, type_: str):
    return next(c for c in status.conditions if c.type == type_)


def test_new_run_creates_its_group() -> None:
    d = step(make_spec(), TrainingRunStatus(), [])
    assert d.create_group and not d.resume and not d.delete_pods
    assert d.status.phase == "Created" and d.status.start_time == rfc3339(NOW)
    assert cond(d.status, "Created").reason == "PodsCreated" and d.status.observed_generation == 3


def test_all_running_is_running_and_counts_replicas() -> None:
    spec = make_spec()
    d = step(spec, TrainingRunStatus(phase="Created"), make_pods(spec, phases=("Running", "Running")))
    assert d.status.phase == "Running" and not d.create_group
    assert d.status.replica_statuses["Master"].active == 1 and d.status.replica_statuses["Worker"].active == 1


def test_partial_creation_is_completed_not_restarted() -> None:
    spec = make_spec()
    d = step(spec, TrainingRunStatus(phase="Created"), make_pods(spec)[:1])
    assert d.create_group and d.status.restart_count == 0 and not d.delete_pods


def test_retryable_failure_restarts_the_whole_group() -> None:
    spec = make_spec(backoffLimit=2)
    pods = make_pods(spec, phases=("Running", "Running"))
    terminate(pods[1], "Failed", 137)
    d = step(spec, running_status(), pods)
    assert d.status.phase == "Restarting" and d.status.restart_count == 1
    assert sorted(d.delete_pods) == ["demo-master-0", "demo-worker-1"]  # the healthy master goes too
    assert cond(d.status, "Restarting").reason == "Signal9" and "1 of 2" in d.status.message
    assert not d.create_group


def test_next_attempt_waits_for_the_old_pods_then_resumes() -> None:
    spec = make_spec()
    restarting = TrainingRunStatus(phase="Restarting", restart_count=1, start_time=rfc3339(NOW))
    set_condition(restarting, "Restarting", "True", "Signal9", "pod demo-worker-1 exited 137", NOW)
    old = make_pods(spec, attempt=0)
    d = step(spec, restarting, old)
    assert not d.create_group and sorted(d.delete_pods) == ["demo-master-0", "demo-worker-1"]
    d = step(spec, restarting, [])
    assert d.create_group and d.resume and d.status.phase == "Restarting"
    d = step(spec, d.status, make_pods(spec, attempt=1, phases=("Running", "Running")))
    assert d.status.phase == "Running" and cond(d.status, "Restarting").status == "False"


def test_backoff_limit_fails_the_run_and_cleans_running_pods() -> None:
    spec = make_spec(backoffLimit=1)
    pods = make_pods(spec, attempt=1, phases=("Running", "Running"))
    terminate(pods[0], "Failed", 1)
    d = step(spec, running_status(restart_count=1), pods)
    assert d.status.phase == "Failed" and cond(d.status, "Failed").reason == "BackoffLimitExceeded"
    assert d.delete_pods == ["demo-worker-1"]  # cleanPodPolicy Running: only the unfinished one
    assert d.status.completion_time == rfc3339(NOW) and cond(d.status, "Running").status == "False"


@pytest.mark.parametrize(
    ("code", "reason"), [(64, "ConfigError"), (65, "DataError"), (66, "NaNAbort"), (67, "CudaOOM")]
)
def test_permanent_exit_codes_are_not_retried(code: int, reason: str) -> None:
    spec = make_spec(backoffLimit=5)
    pods = make_pods(spec, phases=("Running", "Running"))
    terminate(pods[1], "Failed", code)
    d = step(spec, running_status(), pods)
    assert d.status.phase == "Failed" and d.status.restart_count == 0
    assert cond(d.status, "Failed").reason == reason and "not retried" in d.status.message


def test_failure_message_carries_the_trainers_error() -> None:
    pod = make_pods(make_spec())[1]
    report = json.dumps(
        {"status": "failed", "exit_code": 67, "error": "CUDA out of memory. Tried to allocate"}
    )
    failure = classify_failure(pod_view(terminate(pod, "Failed", 67, report)))
    assert not failure.retryable and failure.message.endswith(
        "not retried: CUDA out of memory. Tried to allocate"
    )


def test_classification() -> None:
    spec = make_spec()
    pod = make_pods(spec)[0]
    assert not classify_failure(pod_view(terminate(pod, "Failed", 137, reason="OOMKilled"))).retryable
    assert classify_failure(pod_view(terminate(pod, "Failed", 143))).reason == "Signal15"
    assert classify_failure(pod_view(terminate(pod, "Failed", 2))).retryable
    evicted = {**pod, "status": {"phase": "Failed", "reason": "Evicted"}}
    assert (
        classify_failure(pod_view(evicted)).retryable
        and classify_failure(pod_view(evicted)).reason == "Evicted"
    )


def test_a_pod_lost_while_running_restarts_the_group() -> None:
    spec = make_spec(backoffLimit=1)
    pods = make_pods(spec, phases=("Running", "Running"))[:1]
    d = step(spec, running_status(), pods)
    assert d.status.phase == "Restarting" and cond(d.status, "Restarting").reason == "PodLost"


@pytest.mark.parametrize(
    ("phase", "restart_count"), [("Created", 0), ("Restarting", 1)], ids=["first group", "after a restart"]
)
def test_a_pod_never_created_is_created_even_if_the_others_already_run(
    phase: str, restart_count: int
) -> None:
    """Issue 9's kills: the operator dies between creating the master and the worker, and the
    kubelet starts the master meanwhile. The worker was never created, so it was not lost: the
    next operator creates it, and neither restarts the group nor fails the run (backoffLimit 1)."""
    spec = make_spec(backoffLimit=1)
    pods = make_pods(spec, attempt=restart_count, phases=("Running", "Running"))[:1]
    status = TrainingRunStatus(phase=phase, restart_count=restart_count, start_time=rfc3339(NOW))
    d = step(spec, status, pods)
    assert d.create_group and not d.delete_pods
    assert (d.status.phase, d.status.restart_count) == (phase, restart_count)


def test_master_success_succeeds_and_reports_progress() -> None:
    spec = make_spec(cleanPodPolicy="Running")
    pods = make_pods(spec, phases=("Running", "Running"))
    # the trainer's termination summary (kubearch_trainer.results.write_termination_log)
    summary = {"status": "completed", "exit_code": 0, "steps": 500, "final_train_loss": 2.5}
    summary |= {"final_val_loss": 2.7, "tokens_per_second": 1000.0, "val_accuracy": None, "device": "cuda:0"}
    terminate(pods[0], "Succeeded", 0, json.dumps(summary), reason="Completed")
    d = step(spec, running_status(), pods)
    assert d.status.phase == "Succeeded" and d.delete_pods == ["demo-worker-1"]
    assert (d.status.progress.step, d.status.progress.loss, d.status.progress.tokens_per_second) == (
        500,
        2.5,
        1000.0,
    )
    assert d.status.metrics == {"final_val_loss": 2.7}


def test_nan_loss_is_not_written() -> None:
    spec = make_spec()
    pods = make_pods(spec, phases=("Running", "Running"))
    pods[0]["metadata"]["annotations"] = {"kubearch.dev/progress": '{"step": 7, "loss": NaN}'}
    d = step(spec, running_status(), pods)
    assert d.status.progress.step == 7 and d.status.progress.loss is None


@pytest.mark.parametrize(("policy", "deleted"), [("None", []), ("Running", ["demo-worker-1"]), ("All", None)])
def test_clean_pod_policy_at_terminal_phase(policy: str, deleted: list[str] | None) -> None:
    spec = make_spec(cleanPodPolicy=policy)
    pods = make_pods(spec, phases=("Running", "Running"))
    terminate(pods[0], "Succeeded", 0)
    done = TrainingRunStatus(phase="Succeeded", completion_time=rfc3339(NOW))
    d = step(spec, done, pods)
    assert sorted(d.delete_pods) == (deleted if deleted is not None else ["demo-master-0", "demo-worker-1"])
    assert d.status.phase == "Succeeded" and not d.create_group


def test_ttl_after_finished() -> None:
    spec = make_spec(ttlSecondsAfterFinished=60)
    done = TrainingRunStatus(phase="Failed", completion_time=rfc3339(NOW))
    early = step(spec, done, [], NOW + timedelta(seconds=20))
    assert not early.delete_run and early.requeue_after == pytest.approx(40)
    assert step(spec, done, [], NOW + timedelta(seconds=61)).delete_run


def test_active_deadline() -> None:
    spec = make_spec(activeDeadlineSeconds=60)
    started = TrainingRunStatus(phase="Running", start_time=rfc3339(NOW - timedelta(seconds=30)))
    pods = make_pods(spec, phases=("Running", "Running"))
    d = step(spec, started, pods)
    assert d.status.phase == "Running" and d.requeue_after == pytest.approx(30)
    d = step(spec, started, pods, NOW + timedelta(seconds=31))
    assert d.status.phase == "Failed" and cond(d.status, "Failed").reason == "DeadlineExceeded"
    assert sorted(d.delete_pods) == ["demo-master-0", "demo-worker-1"]


def test_suspend_then_resume() -> None:
    spec = make_spec(suspend=True, activeDeadlineSeconds=60)
    d = step(spec, running_status(restart_count=1), make_pods(spec, attempt=1, phases=("Running", "Running")))
    assert d.status.phase == "Suspended" and sorted(d.delete_pods) == ["demo-master-0", "demo-worker-1"]
    assert d.status.start_time is None and d.status.restart_count == 1  # the deadline clock resets
    resumed = step(make_spec(suspend=False), d.status, [])
    assert resumed.create_group and resumed.resume
    assert resumed.status.phase == "Created" and cond(resumed.status, "Suspended").reason == "Resumed"
    assert resumed.status.start_time == rfc3339(NOW)


def test_condition_transition_time_moves_only_on_change() -> None:
    st = TrainingRunStatus()
    set_condition(st, "Running", "True", "A", "a", NOW)
    set_condition(st, "Running", "True", "B", "b", NOW + timedelta(seconds=5))
    assert cond(st, "Running").last_transition_time == rfc3339(NOW) and cond(st, "Running").reason == "B"
    set_condition(st, "Running", "False", "C", "c", NOW + timedelta(seconds=9))
    assert cond(st, "Running").last_transition_time == rfc3339(NOW + timedelta(seconds=9))


def test_a_running_group_keeps_its_shape_until_the_next_group() -> None:
    spec = make_spec()
    first = step(spec, TrainingRunStatus(), [])
    bigger = parse_spec({"resources": {"nodes": 3, "gpusPerNode": 1}})
    d = step(bigger, first.status, make_pods(spec, phases=("Running", "Running")))
    assert d.status.phase == "Running" and d.status.chosen_shape.nodes == 2 and not d.create_group
    suspended = step(parse_spec({"resources": {"nodes": 3}, "runPolicy": {"suspend": True}}), d.status, [])
    resumed = step(bigger, suspended.status, [])
    assert resumed.create_group and resumed.status.chosen_shape.nodes == 3


def test_pods_beyond_the_shape_are_removed() -> None:
    spec = parse_spec({"resources": {"nodes": 3, "gpusPerNode": 1}})
    three = make_pods(spec, phases=("Running", "Running", "Running"))
    small = make_spec()
    running = running_status(chosen_shape=plan_run(small).shape)
    d = step(small, running, three)
    assert d.delete_pods == ["demo-worker-2"] and d.status.phase == "Running"


def test_invalid_spec_changes_only_a_condition() -> None:
    st = running_status(restart_count=2)
    new = invalid_spec(st, "spec.model: d_model (100) must be divisible by n_heads (3)", NOW, 4)
    assert new.phase == "Running" and new.restart_count == 2
    assert cond(new, "SpecValid").status == "False" and "divisible" in cond(new, "SpecValid").message


def test_torchrun_exit_1_with_the_trainers_permanent_code_is_not_retried() -> None:
    """torchrun exits 1 whatever its worker's code was; the trainer's report carries the real one."""
    report = json.dumps({"status": "data_error", "exit_code": 65, "error": "data.path: 'x' does not exist"})
    failure = classify_failure(pod_view(terminate(make_pods(make_spec())[0], "Failed", 1, report)))
    assert not failure.retryable and failure.reason == "DataError"
    assert failure.message.endswith("not retried: data.path: 'x' does not exist")
    crashed = json.dumps({"status": "failed", "exit_code": 1, "error": "RuntimeError: boom"})
    assert classify_failure(pod_view(terminate(make_pods(make_spec())[0], "Failed", 1, crashed))).retryable


def test_master_success_is_final_even_if_a_worker_then_fails() -> None:
    """Defect 1: torch's shutdown race (a worker exits 1 after the master succeeded) restarted a
    finished run. Kubeflow's rule: the master's success is the job's success, and success is final."""
    spec = make_spec(backoffLimit=3)
    pods = make_pods(spec, phases=("Running", "Running"))
    terminate(pods[0], "Succeeded", 0, reason="Completed")
    terminate(pods[1], "Failed", 1)
    d = step(spec, running_status(), pods)
    assert d.status.phase == "Succeeded" and d.status.restart_count == 0
    assert not d.create_group and "demo-master-0" not in d.delete_pods
    # and a later pass over the same pods keeps it so
    again = step(spec, d.status, pods, NOW + timedelta(seconds=5))
    assert again.status.phase == "Succeeded" and again.status.restart_count == 0


def test_master_success_wins_over_a_worker_that_disappeared() -> None:
    spec = make_spec(backoffLimit=3)
    pods = make_pods(spec, phases=("Running", "Running"))[:1]
    terminate(pods[0], "Succeeded", 0, reason="Completed")
    d = step(spec, running_status(), pods)
    assert d.status.phase == "Succeeded" and d.status.restart_count == 0


def test_the_changed_condition_moves_to_the_end() -> None:
    """Defect 2: conditions were updated in place, so after a restart a running run's last
    condition read Restarting/False. Kubeflow appends the changed condition."""
    spec = make_spec(backoffLimit=2)
    d = step(spec, TrainingRunStatus(), [])
    assert (d.status.conditions[-1].type, d.status.conditions[-1].status) == ("Created", "True")
    d = step(spec, d.status, make_pods(spec, phases=("Running", "Running")))
    assert (d.status.conditions[-1].type, d.status.conditions[-1].status) == ("Running", "True")
    pods = make_pods(spec, phases=("Running", "Running"))
    terminate(pods[1], "Failed", 137)
    d = step(spec, d.status, pods)
    assert (d.status.conditions[-1].type, d.status.conditions[-1].status) == ("Restarting", "True")
    d = step(spec, d.status, [])  # old pods gone: the next group is created
    d = step(spec, d.status, make_pods(spec, attempt=1, phases=("Running", "Running")))
    assert d.status.phase == "Running"
    assert (d.status.conditions[-1].type, d.status.conditions[-1].status) == ("Running", "True")
    assert [c.type for c in d.status.conditions].count("Running") == 1  # moved, not duplicated
    done = make_pods(spec, attempt=1, phases=("Running", "Running"))
    terminate(done[0], "Succeeded", 0, reason="Completed")
    d = step(spec, d.status, done)
    assert (d.status.conditions[-1].type, d.status.conditions[-1].status) == ("Succeeded", "True")


def test_a_message_refresh_keeps_the_conditions_place() -> None:
    st = TrainingRunStatus()
    set_condition(st, "Running", "True", "PodsRunning", "a", NOW)
    set_condition(st, "SpecValid", "True", "Valid", "ok", NOW)
    set_condition(st, "Running", "True", "PodsRunning", "b", NOW + timedelta(seconds=1))
    assert [c.type for c in st.conditions] == ["Running", "SpecValid"]
    assert cond(st, "Running").message == "b"


def test_without_a_checkpoint_claim_the_run_says_a_restart_starts_over() -> None:
    """Defect 3: with the default emptyDir a restart or resume silently started at step 0. The run
    now carries CheckpointPersistent=False from the start, and each recreated group posts a
    Warning event saying it starts over."""
    spec = make_spec(backoffLimit=2)
    d = step(spec, TrainingRunStatus(), [])
    persistent = cond(d.status, "CheckpointPersistent")
    assert persistent.status == "False" and persistent.reason == "EmptyDir"
    assert "checkpointClaim" in persistent.message
    assert not [e for e in d.events if e[1] == "RestartFromScratch"]  # the first group is no restart
    restarting = TrainingRunStatus(phase="Restarting", restart_count=1, start_time=rfc3339(NOW))
    d = step(spec, restarting, [])
    assert d.create_group
    (event,) = [e for e in d.events if e[1] == "RestartFromScratch"]
    assert event[0] == "Warning" and "step 0" in event[2] and "checkpointClaim" in event[2]
    suspended = step(make_spec(suspend=True), running_status(), [])
    resumed = step(make_spec(), suspended.status, [])
    assert resumed.create_group and any(e[1] == "RestartFromScratch" for e in resumed.events)


def test_with_a_checkpoint_claim_a_restart_resumes_quietly() -> None:
    spec = parse_spec({"resources": {"nodes": 2, "checkpointClaim": "ckpt"}})
    d = step(spec, TrainingRunStatus(), [])
    persistent = cond(d.status, "CheckpointPersistent")
    assert persistent.status == "True" and "ckpt" in persistent.message
    restarting = TrainingRunStatus(phase="Restarting", restart_count=1, start_time=rfc3339(NOW))
    d = step(spec, restarting, [])
    assert d.create_group and d.resume and not any(e[1] == "RestartFromScratch" for e in d.events)
