"""engine.step as a pure function: budget (parallelTrials, maxGPUs), failures and their replacement,
the OOM retry, the goal, restarts with Planned trials, idempotence, leaderboard and rung statistics
(expected values computed by hand), and trial_metrics."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from kubearch_operator.search.api import ArchitectureSearchStatus, parse_search_spec, records_bound
from kubearch_operator.search.engine import (
    SEARCH_LABEL,
    TRIAL_INDEX_LABEL,
    TrialObservation,
    observe_trainingrun,
    step,
    trial_metrics,
)

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _spec(**kw):
    base = {
        "trialTemplate": {"model": {"architecture": "dense"}, "resources": {"gpusPerNode": 0}},
        "searchSpace": [{"path": "model.size", "values": ["tiny", "small"]}],
        "algorithm": {"name": "grid"},
        "budget": {"parallelTrials": 2},
    }
    for key, value in kw.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_search_spec(base)


class Driver:
    """Plays the caller: keeps what exists, creates what step asks for, reports results."""

    def __init__(self, spec, name: str = "s") -> None:
        self.spec, self.name = spec, name
        self.status = ArchitectureSearchStatus()
        self.observed: dict[str, TrialObservation] = {}
        self.created: list[str] = []
        self.stopped: list[str] = []
        self.t = T0
        self.max_running = 0

    def step(self):
        self.t += timedelta(seconds=10)
        d = step(self.name, self.spec, self.status, self.observed, self.t)
        self.status = d.status
        for name in d.stop:
            self.stopped.append(name)
            self.observed.pop(name, None)
        for trial in d.create:
            if trial.name not in self.observed:
                self.created.append(trial.name)
                self.observed[trial.name] = TrialObservation(trial.name, "Running")
        running = sum(o.state == "Running" for o in self.observed.values())
        self.max_running = max(self.max_running, running)
        return d

    def record(self, name: str):
        return next(t for t in self.status.trials if t.name == name)

    def running(self) -> list[str]:
        return [n for n, o in self.observed.items() if o.state == "Running"]

    def finish(self, name: str, **metrics: float) -> None:
        self.observed[name] = TrialObservation(name, "Succeeded", metrics)

    def fail(self, name: str, reason: str = "BackoffLimitExceeded", exit_code: int | None = None) -> None:
        self.observed[name] = TrialObservation(name, "Failed", {}, reason, "boom", exit_code)


def test_never_more_than_parallel_trials() -> None:
    spec = _spec(
        searchSpace=[
            {"path": "model.size", "values": ["tiny", "small", "medium"]},
            {"path": "model.attention", "values": ["baseline", "rope_only"]},
        ],
        budget={"parallelTrials": 2},
    )
    drv = Driver(spec)
    d = drv.step()
    assert [t.name for t in d.create] == ["s-000", "s-001"]
    assert d.create[0].labels[SEARCH_LABEL] == "s" and d.create[1].labels[TRIAL_INDEX_LABEL] == "1"
    assert drv.step().create == []  # both running: nothing new
    while drv.status.phase == "Running":
        for i, name in enumerate(drv.running()[:1]):
            drv.finish(name, valLoss=1.0 + i)
        drv.step()
    assert drv.status.phase == "Succeeded"
    assert drv.max_running == 2
    assert len(drv.created) == 6 == len(set(drv.created))


def test_max_gpus_limits_concurrent_trials() -> None:
    spec = _spec(
        trialTemplate={"model": {"architecture": "dense"}, "resources": {"nodes": 1, "gpusPerNode": 2}},
        budget={"parallelTrials": 4, "maxGpus": 3},
        planning={"enabled": False},
    )
    drv = Driver(spec)
    assert len(drv.step().create) == 1  # 2 GPUs in use, a second trial would need 4 > 3
    drv.finish("s-000", valLoss=2.0)
    assert [t.name for t in drv.step().create] == ["s-001"]


def test_failed_trial_is_replaced_then_search_fails_past_max_failed() -> None:
    spec = _spec(
        searchSpace=[{"path": "training.learningRate", "min": 1e-4, "max": 1e-2, "log": True}],
        algorithm={"name": "random", "seed": 1},
        budget={"maxTrials": 2, "parallelTrials": 2, "maxFailedTrials": 1},
    )
    drv = Driver(spec)
    drv.step()
    drv.fail("s-000")
    d = drv.step()
    assert [t.name for t in d.create] == ["s-002"]  # the failed configuration is replaced
    assert drv.record("s-000").state == "Failed" and drv.record("s-000").reason == "BackoffLimitExceeded"
    assert drv.status.phase == "Running"
    drv.fail("s-002", reason="NaNAbort")
    d = drv.step()
    assert drv.status.phase == "Failed"
    failed = next(c for c in drv.status.conditions if c.type == "Failed")
    assert failed.reason == "MaxFailedTrialsExceeded"
    assert "BackoffLimitExceeded: 1" in failed.message and "NaNAbort: 1" in failed.message
    assert d.stop == ["s-001"] and drv.record("s-001").state == "Stopped"
    assert d.create == []


def test_oom_is_retried_once_with_half_batch_then_counted_as_oom() -> None:
    spec = _spec(
        trialTemplate={
            "model": {"architecture": "dense"},
            "training": {"batchSize": 16, "gradientAccumulationSteps": 2},
            "resources": {"gpusPerNode": 0},
        },
        searchSpace=[{"path": "model.size", "values": ["tiny"]}],
        budget={"parallelTrials": 1, "maxFailedTrials": 0},
    )
    drv = Driver(spec)
    d = drv.step()
    assert d.create[0].spec["training"]["batchSize"] == 16
    drv.fail("s-000", reason="CudaOOM", exit_code=67)
    d = drv.step()
    assert [t.name for t in d.create] == ["s-001"]
    retry = d.create[0].spec["training"]
    assert (retry["batchSize"], retry["gradientAccumulationSteps"]) == (8, 4)  # effective 32 kept
    rec = drv.record("s-001")
    assert rec.config == 0 and rec.rung == 0 and rec.oom_retries == 1 and rec.plan["oomRetryOf"] == "s-000"
    assert drv.record("s-000").reason == "OOM" and "retried as s-001" in drv.record("s-000").message
    assert drv.status.phase == "Running"  # the first OOM is not a failure of the search
    drv.fail("s-001", reason="OOMKilled")
    d = drv.step()
    assert d.create == []  # no second retry
    assert drv.status.phase == "Failed"
    assert "OOM: 1" in drv.status.message


def test_goal_value_ends_the_search_and_stops_running_trials() -> None:
    spec = _spec(
        searchSpace=[{"path": "model.size", "values": ["tiny", "small", "medium"]}],
        objective={"metric": "valLoss", "goalValue": 2.0},
        budget={"parallelTrials": 3},
    )
    drv = Driver(spec)
    drv.step()
    drv.finish("s-001", valLoss=2.5)
    drv.step()
    assert drv.status.phase == "Running"
    drv.finish("s-002", valLoss=1.9)
    d = drv.step()
    assert drv.status.phase == "Succeeded"
    assert next(c for c in drv.status.conditions if c.type == "Succeeded").reason == "GoalReached"
    assert d.stop == ["s-000"] and drv.record("s-000").state == "Stopped"
    assert drv.record("s-000").reason == "GoalReached" and d.create == []
    assert drv.status.best_trial is not None and drv.status.best_trial.trial == "s-002"


def test_restart_with_planned_trials_recreates_the_same_names() -> None:
    spec = _spec(budget={"parallelTrials": 2})
    first = step("s", spec, ArchitectureSearchStatus(), {}, T0)
    names = [t.name for t in first.create]
    assert names == ["s-000", "s-001"]
    assert [t.state for t in first.status.trials] == ["Planned", "Planned"]
    # crash after writing status, before creating: the next pass asks for the same two trials
    stored = ArchitectureSearchStatus.model_validate(json.loads(first.status.model_dump_json(by_alias=True)))
    again = step("s", spec, stored, {}, T0 + timedelta(seconds=5))
    assert [t.name for t in again.create] == names
    assert [t.spec for t in again.create] == [t.spec for t in first.create]
    assert len(again.status.trials) == 2
    # one was created before the crash: it is adopted, the other created, still two records
    seen = {"s-000": TrialObservation("s-000", "Created")}
    third = step("s", spec, again.status, seen, T0 + timedelta(seconds=9))
    assert [t.name for t in third.create] == ["s-001"]
    assert [t.state for t in third.status.trials] == ["Created", "Planned"]


def test_step_is_idempotent() -> None:
    spec = _spec(budget={"parallelTrials": 1}, algorithm={"name": "grid", "rungs": [5, 10]})
    drv = Driver(spec)
    drv.step()
    drv.finish("s-000", valLoss=3.0)
    a = step("s", spec, drv.status, drv.observed, T0 + timedelta(minutes=1))
    b = step("s", spec, drv.status, drv.observed, T0 + timedelta(minutes=1))
    assert a.status == b.status and a.create == b.create and a.stop == b.stop
    # the decision is a fixed point: applied again, it creates nothing new
    c = step("s", spec, a.status, drv.observed, T0 + timedelta(minutes=2))
    assert [t.name for t in c.create] == [t.name for t in a.create] == ["s-001"]
    assert len(c.status.trials) == len(a.status.trials) == 2


def test_leaderboard_and_rung_statistics_from_observations() -> None:
    spec = _spec(
        searchSpace=[
            {"path": "model.size", "values": ["tiny", "small"]},
            {"path": "model.attention", "values": ["baseline", "rope_only"]},
        ],
        algorithm={"name": "grid", "rungs": [10, 20]},
        budget={"parallelTrials": 4, "maxFailedTrials": 2},
    )
    drv = Driver(spec)
    drv.step()
    rung0 = {"s-000": 4.0, "s-001": 3.0, "s-002": 5.0, "s-003": 2.0}
    for name, v in rung0.items():
        drv.finish(name, valLoss=v, valAccuracy=0.1, timeSeconds=30.0, tokensPerSecond=1000.0)
    d = drv.step()
    by_config = {t.labels["kubearch.dev/trial-config"]: t.name for t in d.create}
    assert len(d.create) == 4 and all(t.spec["training"]["stepsPerEpoch"] == 20 for t in d.create)
    rung1 = {"0": 3.5, "1": 2.5, "3": 1.5}
    for config, v in rung1.items():
        drv.finish(by_config[config], valLoss=v, valAccuracy=0.2, peakMemoryBytes=1e9)
    drv.fail(by_config["2"])
    drv.step()
    st = drv.status
    assert st.phase == "Succeeded"
    board = st.leaderboard
    assert [e.config for e in board] == [3, 1, 0, 2]  # rung-1 results first, then config 2's rung 0
    assert [e.objective for e in board] == [1.5, 2.5, 3.5, 5.0]
    assert board[0].parameters == {"model.size": "small", "model.attention": "rope_only"}
    assert board[0].val_accuracy == 0.2 and board[0].peak_memory_bytes == 1e9 and board[0].rung == 1
    assert board[3].rung == 0 and board[3].time_seconds == 30.0
    r0, r1 = st.rung_statistics
    assert (r0.steps, r0.trials, r0.succeeded, r0.failed, r0.success_rate) == (10, 4, 4, 0, 1.0)
    assert r0.mean == pytest.approx(3.5) and r0.std == pytest.approx(math.sqrt(1.25))
    assert (r0.min, r0.max) == (2.0, 5.0)
    assert (r1.steps, r1.trials, r1.succeeded, r1.failed, r1.success_rate) == (20, 4, 3, 1, 0.75)
    assert r1.mean == pytest.approx(2.5) and r1.std == pytest.approx(math.sqrt(2 / 3))
    assert st.best_trial is not None and st.best_trial.trial == board[0].trial
    assert (st.trial_counts.total, st.trial_counts.succeeded, st.trial_counts.failed) == (8, 7, 1)


def test_rung_overrides_and_trial_length_reach_the_trial_spec() -> None:
    spec = _spec(
        algorithm={
            "name": "grid",
            "rungs": [50, 200],
            "rungOverrides": [
                {"training.batchSize": 16, "training.evalEvery": 10},
                {"training.batchSize": 32},
            ],
        },
        budget={"parallelTrials": 1},
    )
    drv = Driver(spec)
    t = drv.step().create[0]
    want = {"numEpochs": 1, "stepsPerEpoch": 50, "batchSize": 16, "evalEvery": 10}
    assert {k: t.spec["training"][k] for k in want} == want
    assert t.spec["model"]["size"] == "tiny"
    drv.finish(t.name, valLoss=1.0)
    t2 = drv.step().create[0]
    assert (t2.spec["training"]["stepsPerEpoch"], t2.spec["training"]["batchSize"]) == (200, 32)
    assert t2.labels["kubearch.dev/trial-rung"] == "1"


def test_succeeded_trial_without_the_objective_fails_with_a_reason() -> None:
    drv = Driver(_spec(budget={"parallelTrials": 1, "maxFailedTrials": 5}))
    drv.step()
    drv.finish("s-000", trainLoss=2.0)
    drv.step()
    assert drv.record("s-000").state == "Failed" and drv.record("s-000").reason == "MetricMissing"


def test_finished_search_only_stops_leftovers() -> None:
    drv = Driver(_spec(searchSpace=[{"path": "model.size", "values": ["tiny"]}]))
    drv.step()
    drv.finish("s-000", valLoss=1.0)
    drv.step()
    assert drv.status.phase == "Succeeded"
    d = step("s", drv.spec, drv.status, {"s-000": TrialObservation("s-000", "Running")}, T0)
    assert d.stop == ["s-000"] and d.create == [] and d.status == drv.status


def test_trial_metrics_from_results_and_trainingrun_status() -> None:
    results = {
        "status": "completed",
        "exit_code": 0,
        "final_val_loss": 2.0,
        "final_train_loss": 2.2,
        "val_accuracy": 0.4,
        "tokens_per_second": 1234.0,
        "peak_memory_bytes": 5_000_000,
        "train_time_s": 12.5,
        "wall_time_s": 15.0,
        "nan_count": 0,
        "val_metrics": {"val_loss": 2.0},
        "architecture": "dense",
    }
    m = trial_metrics(results)
    assert m["valLoss"] == 2.0 and m["trainLoss"] == 2.2 and m["valAccuracy"] == 0.4
    assert m["tokensPerSecond"] == 1234.0 and m["peakMemoryBytes"] == 5e6
    assert m["timeSeconds"] == 12.5 and m["wallTimeSeconds"] == 15.0 and m["nanCount"] == 0
    assert m["perplexity"] == pytest.approx(math.exp(2.0))
    assert "exitCode" not in m and "architecture" not in m
    # a TrainingRun's status: termination-summary keys in metrics, the last loss in progress
    status = {
        "phase": "Succeeded",
        "metrics": {"final_val_loss": 3.0, "perplexity": 20.0, "wall_time_s": 9.0},
        "progress": {"step": 50, "loss": 3.1, "tokensPerSecond": 900.0},
    }
    m = trial_metrics(status)
    assert m["valLoss"] == 3.0 and m["trainLoss"] == 3.1 and m["perplexity"] == 20.0
    assert m["tokensPerSecond"] == 900.0 and m["steps"] == 50 and m["timeSeconds"] == 9.0
    assert trial_metrics({"final_val_loss": float("nan"), "ok": True}) == {}


def test_trainingrun_objects_become_observations() -> None:
    oom = {
        "metadata": {"name": "s-000"},
        "status": {
            "phase": "Failed",
            "message": "pod s-000-worker-0 exited 67 (CUDA_OOM); not retried",
            "conditions": [
                {"type": "Running", "status": "False"},
                {"type": "Failed", "status": "True", "reason": "CudaOOM"},
            ],
            "metrics": {"peak_memory_bytes": 2.0e10},
        },
    }
    obs = observe_trainingrun(oom)
    assert (obs.name, obs.state, obs.reason) == ("s-000", "Failed", "CudaOOM")
    assert obs.metrics["peakMemoryBytes"] == 2.0e10
    spec = _spec(searchSpace=[{"path": "model.size", "values": ["tiny"]}], budget={"parallelTrials": 1})
    first = step("s", spec, ArchitectureSearchStatus(), {}, T0)
    d = step("s", spec, first.status, {"s-000": obs}, T0 + timedelta(seconds=1))
    assert [t.name for t in d.create] == ["s-001"] and d.status.trials[0].reason == "OOM"
    done = observe_trainingrun(
        {"metadata": {"name": "x"}, "status": {"phase": "Succeeded", "metrics": {"final_val_loss": 1.5}}}
    )
    assert done.state == "Succeeded" and done.metrics["valLoss"] == 1.5
    assert (
        observe_trainingrun({"metadata": {"name": "x"}, "status": {"phase": "Restarting"}}).state == "Running"
    )
    assert observe_trainingrun({"metadata": {"name": "x"}}).state == "Created"


ALGORITHMS = [
    {"name": "grid", "rungs": [5, 10]},
    {"name": "grid", "rungs": [5, 10, 20], "earlyStopping": {"minTrialsRequired": 2}},
    {"name": "random", "rungs": [5, 10], "earlyStopping": {"minTrialsRequired": 2}},
    {"name": "asha", "rungs": [5, 10, 20], "eta": 2},
    {"name": "tpe", "rungs": [5, 10], "nStartupTrials": 3},
]


@pytest.mark.parametrize("seed", range(40))
def test_random_outcomes_never_stall_duplicate_or_exceed_the_budget(seed: int) -> None:
    """Any mix of successes, failures and OOMs: the search ends, never runs more than parallelTrials,
    never creates a name twice, and while it runs something is running or being created."""
    import random

    rng = random.Random(seed)
    algorithm = ALGORITHMS[seed % len(ALGORITHMS)]
    space = [
        {"path": "model.size", "values": ["tiny", "small", "medium"]},
        {"path": "model.attention", "values": ["baseline", "rope_only"]},
    ]
    if algorithm["name"] in ("random", "tpe"):
        space[0] = {"path": "training.learningRate", "min": 1e-4, "max": 1e-2, "log": True}
    max_trials = rng.randint(2, 8)
    spec = _spec(
        trialTemplate={
            "model": {"architecture": "dense"},
            "training": {"batchSize": rng.choice([1, 8])},
            "resources": {"gpusPerNode": 0},
        },
        searchSpace=space,
        algorithm=algorithm,
        budget={
            "parallelTrials": rng.randint(1, min(4, max_trials)),
            "maxTrials": max_trials,
            "maxFailedTrials": rng.randint(0, 3),
        },
    )
    drv = Driver(spec)
    for _ in range(300):
        d = drv.step()
        assert len(drv.running()) <= spec.budget.parallel_trials
        # the premise of the status size bound (api.status_size_bound): records never outgrow it
        assert len(drv.status.trials) <= records_bound(spec)
        if drv.status.phase in ("Succeeded", "Failed"):
            break
        assert drv.running() or d.create, drv.status.message
        for name in drv.running():
            if rng.random() < 0.5:
                r = rng.random()
                if r < 0.1:
                    drv.fail(name, reason=rng.choice(["CudaOOM", "OOMKilled"]))
                elif r < 0.17:
                    drv.fail(name)
                else:
                    drv.finish(name, valLoss=rng.random())
    assert drv.status.phase in ("Succeeded", "Failed")
    assert len(drv.created) == len(set(drv.created))
    assert drv.max_running <= spec.budget.parallel_trials
    assert not any(t.state in ("Planned", "Created", "Running") for t in drv.status.trials)


def test_tpe_search_restarted_from_stored_status_proposes_what_an_uninterrupted_one_does() -> None:
    spec = _spec(
        searchSpace=[
            {"path": "training.learningRate", "min": 1e-4, "max": 1e-1, "log": True},
            {"path": "model.attention", "values": ["baseline", "rope_only", "bias_only"]},
        ],
        algorithm={"name": "tpe", "seed": 5, "nStartupTrials": 3},
        budget={"maxTrials": 10, "parallelTrials": 2},
    )

    def run(restart_every_step: bool) -> list[dict]:
        drv = Driver(spec)
        while drv.status.phase != "Succeeded":
            if restart_every_step:  # the operator died: its next incarnation reads the stored status
                stored = json.loads(drv.status.model_dump_json(by_alias=True))
                drv.status = ArchitectureSearchStatus.model_validate(stored)
            drv.step()
            for name in drv.running()[:1]:
                rec = drv.record(name)
                lr = rec.parameters["training.learningRate"]
                drv.finish(
                    name, valLoss=(math.log10(lr) + 2) ** 2 + len(rec.parameters["model.attention"]) / 10
                )
        return [t.parameters for t in sorted(drv.status.trials, key=lambda t: t.index)]

    uninterrupted = run(False)
    assert len(uninterrupted) == 10
    assert run(True) == uninterrupted
