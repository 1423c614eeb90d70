"""The ArchitectureSearch controller without a cluster: pure helpers, and one pass with fake clients.

The pass is tested against a stand-in for ``engine.step`` (the engine has its own tests): what is
checked here is the controller's side of the contract — status written before any trial exists,
deterministic names adopted on 409 only when the owner UID matches, nothing created for a refused
spec, stops limited to the search's own trials, and the status this process wrote preferred over
a lagging index.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from kubearch_operator import search_builders as sb
from kubearch_operator import search_handlers as sh
from kubearch_operator.search import engine
from kubearch_operator.search.api import (
    ArchitectureSearchStatus,
    LeaderboardEntry,
    TrialCounts,
    TrialRecord,
    parse_search_status,
)
from kubernetes.client.rest import ApiException

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
UID = "search-uid-1"
SPEC = {
    "trialTemplate": {"model": {"architecture": "dense"}, "training": {"stepsPerEpoch": 10}},
    "searchSpace": [{"path": "model.size", "values": ["tiny", "small"]}],
    "algorithm": {"name": "grid"},
}


def run(name: str, phase: str | None = None, owner: str = UID, **status: Any) -> dict[str, Any]:
    """A trial TrainingRun as the API server returns it."""
    body: dict[str, Any] = {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": {engine.SEARCH_LABEL: "s"},
            "ownerReferences": [{"uid": owner, "kind": "ArchitectureSearch", "name": "s"}],
        },
        "status": dict(status),
    }
    if phase:
        body["status"]["phase"] = phase
    return body


def failed(reason: str, message: str) -> dict[str, Any]:
    return {"conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": message}]}


# ------------------------------------------------------------------------------------------------
# observations
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record what observe_trial hands to engine.trial_metrics (its normalisation is search-core's)."""
    seen: list[dict[str, Any]] = []

    def fake(report: dict[str, Any]) -> dict[str, float]:
        seen.append(report)
        return {"seen": float(len(seen))}

    monkeypatch.setattr(sb, "trial_metrics", fake)
    return seen


@pytest.mark.parametrize(
    ("phase", "state"),
    [
        (None, "Created"),
        ("Pending", "Created"),
        ("Created", "Created"),
        ("Suspended", "Created"),
        ("Running", "Running"),
        ("Restarting", "Running"),
        ("Succeeded", "Succeeded"),
        ("Failed", "Failed"),
    ],
)
def test_trainingrun_phase_becomes_trial_state(reports: list, phase: str | None, state: str) -> None:
    assert sb.observe_trial(sb.trial_snapshot(run("s-0", phase))).state == state


@pytest.mark.parametrize(
    ("reason", "message", "expected", "code"),
    [
        ("CudaOOM", "pod s-0-master-0 exited 67 (CUDA_OOM); not retried", "OOM", 67),
        ("OOMKilled", "pod s-0-master-0 was OOMKilled (host memory); not retried", "OOM", None),
        ("ConfigError", "pod s-0-master-0 exited 64 (CONFIG_ERROR); not retried: bad", "ConfigError", 64),
        (
            "BackoffLimitExceeded",
            "pod x exited 1; retryable; backoffLimit (1) reached",
            "BackoffLimitExceeded",
            1,
        ),
    ],
)
def test_failure_reason_and_exit_code(
    reports: list, reason: str, message: str, expected: str, code: Any
) -> None:
    obs = sb.observe_trial(sb.trial_snapshot(run("s-0", "Failed", **failed(reason, message))))
    assert (obs.state, obs.reason, obs.exit_code, obs.message) == ("Failed", expected, code, message)


def test_report_merges_metrics_and_progress_and_adds_the_trial_time(reports: list) -> None:
    status = {
        "metrics": {"final_val_loss": 1.5, "val_accuracy": 0.25, "bad": float("nan")},
        "progress": {"step": 40, "loss": 1.75, "tokensPerSecond": 900.0},
        "startTime": "2026-01-02T03:00:00Z",
        "completionTime": "2026-01-02T03:01:30Z",
    }
    obs = sb.observe_trial(sb.trial_snapshot(run("s-0", "Succeeded", **status)))
    assert reports == [
        {
            "final_val_loss": 1.5,
            "val_accuracy": 0.25,
            "step": 40,
            "loss": 1.75,
            "tokensPerSecond": 900.0,
            "timeSeconds": 90.0,
        }
    ]
    assert obs.metrics == {"seen": 1.0} and obs.reason == ""


def test_a_reported_time_is_not_overwritten() -> None:
    status = {"metrics": {"time_seconds": 12.0}, "startTime": "2026-01-02T03:00:00Z"}
    status["completionTime"] = "2026-01-02T03:05:00Z"
    assert sb.trial_report(status) == {"time_seconds": 12.0}


def test_only_the_searchs_own_trials_are_observed(reports: list) -> None:
    trials = [sb.trial_snapshot(run("s-0", "Running")), sb.trial_snapshot(run("s-1", "Running", owner="old"))]
    assert list(sb.observations(trials, UID)) == ["s-0"]


# ------------------------------------------------------------------------------------------------
# manifests, names, status
# ------------------------------------------------------------------------------------------------
def test_trial_manifest_is_owned_by_the_search_and_labelled() -> None:
    trial = engine.TrialToCreate(
        name="s-3",
        index=3,
        spec={"model": {"size": "small"}},
        labels={engine.SEARCH_LABEL: "s", engine.TRIAL_INDEX_LABEL: "3"},
        annotations={"kubearch.dev/plan": "batch 16 -> 8"},
    )
    body = sb.trial_manifest("s", "ns", UID, trial)
    assert (body["apiVersion"], body["kind"]) == ("kubearch.dev/v1alpha1", "TrainingRun")
    meta = body["metadata"]
    assert (meta["name"], meta["namespace"]) == ("s-3", "ns")
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubearch.dev/v1alpha1",
            "kind": "ArchitectureSearch",
            "name": "s",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["labels"] == {
        "app.kubernetes.io/name": "kubearch",
        engine.SEARCH_LABEL: "s",
        engine.TRIAL_INDEX_LABEL: "3",
    }
    assert meta["annotations"] == {"kubearch.dev/plan": "batch 16 -> 8"}
    body["spec"]["model"]["size"] = "large"
    assert trial.spec == {"model": {"size": "small"}}, "the manifest must not share the engine's dicts"


@pytest.mark.parametrize("name", ["a" * (sb.MAX_SEARCH_NAME_LENGTH + 1), "Upper", "9lives", "dot.ted"])
def test_search_names_that_cannot_prefix_trial_names_are_refused(name: str) -> None:
    with pytest.raises(Exception, match=r"metadata\.name"):
        sb.check_search_name(name)
    sb.check_search_name("a" * sb.MAX_SEARCH_NAME_LENGTH)  # the longest that fits


def test_status_as_the_api_server_stores_it_is_unchanged() -> None:
    status = ArchitectureSearchStatus(phase="Running", message="")
    stored = sb.status_dict(status)
    stored["trialCounts"] = {"total": 0}  # the API server fills defaults, drops nulls
    stored["message"] = ""
    assert not sb.status_changed(stored, status)
    assert sb.status_changed(stored, ArchitectureSearchStatus(phase="Succeeded"))
    assert sb.status_changed({}, status)


def test_invalid_spec_changes_only_the_condition_and_message() -> None:
    trial = TrialRecord(index=0, name="s-0", config=0, steps=10, state="Running")
    status = ArchitectureSearchStatus(phase="Running", trials=[trial])
    new = sb.invalid_spec(status, "spec.searchSpace[0] (model.size): 'huge' is not ...", NOW, 4)
    (cond,) = new.conditions
    assert (cond.type, cond.status, cond.reason) == ("SpecValid", "False", "InvalidSpec")
    assert "searchSpace[0]" in cond.message and "generation 4" in new.message
    assert new.phase == "Running" and new.trials == status.trials
    assert not status.conditions  # the input is not modified


def test_trial_counts_always_name_every_state() -> None:
    counts = sb.trial_counts(ArchitectureSearchStatus())
    assert set(counts) == {"planned", "created", "running", "succeeded", "failed", "stopped"}


# ------------------------------------------------------------------------------------------------
# one pass, with fake API clients and a stand-in engine
# ------------------------------------------------------------------------------------------------
class FakeCustom:
    def __init__(self, calls: list[tuple[str, Any]], existing: dict[str, dict[str, Any]]) -> None:
        self.calls, self.existing = calls, existing
        self.refuse: dict[str, str] = {}  # name -> the API server's message (422)

    def patch_namespaced_custom_object_status(self, g, v, ns, plural, name, body, **kw) -> None:
        assert kw["_content_type"] == "application/json-patch+json"
        self.calls.append(("status", body[0]["value"]))

    def create_namespaced_custom_object(self, g, v, ns, plural, body) -> None:
        self.calls.append(("create", body))
        if body["metadata"]["name"] in self.existing:
            raise ApiException(status=409, reason="AlreadyExists")
        if body["metadata"]["name"] in self.refuse:
            err = ApiException(status=422, reason="Unprocessable Entity")
            err.body = json.dumps({"kind": "Status", "message": self.refuse[body["metadata"]["name"]]})
            raise err

    def get_namespaced_custom_object(self, g, v, ns, plural, name) -> dict[str, Any]:
        self.calls.append(("get", name))
        return self.existing[name]

    def delete_namespaced_custom_object(self, g, v, ns, plural, name, **kw) -> None:
        self.calls.append(("delete", name))


class FakeCore:
    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def create_namespaced_event(self, ns, body) -> None:
        self.calls.append(("event", (body["reason"], body["message"])))


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, Any]], dict[str, dict[str, Any]]]:
    calls: list[tuple[str, Any]] = []
    existing: dict[str, dict[str, Any]] = {}
    monkeypatch.setattr(sh, "_clients", {"custom": FakeCustom(calls, existing), "core": FakeCore(calls)})
    monkeypatch.setattr(sb, "trial_metrics", lambda report: {})
    return calls, existing


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A stand-in engine: plans trial <search>-0 (status first), stops what ``stop`` says."""
    seen: list[dict[str, Any]] = []

    def fake_step(name, spec, status, observed, now, *, generation=None):
        seen.append({"status": status, "observed": dict(observed), "generation": generation})
        st = status.model_copy(deep=True)
        if not st.trials:
            st.trials = [TrialRecord(index=0, name=f"{name}-0", config=0, steps=10)]
        st.phase = "Running"
        planned = [t for t in st.trials if t.state == "Planned" and t.name not in observed]
        create = [
            engine.TrialToCreate(t.name, t.index, {"model": {"size": "tiny"}}, {engine.SEARCH_LABEL: name})
            for t in planned
        ]
        return engine.SearchDecision(status=st, create=create, stop=list(fake_step.stop))

    fake_step.stop = []  # type: ignore[attr-defined]  # names the next decision stops
    monkeypatch.setattr(engine, "step", fake_step)
    return seen


def search(spec: dict[str, Any] | None = None, status: dict | None = None, name: str = "s") -> dict[str, Any]:
    body = {
        "metadata": {"name": name, "namespace": "ns", "uid": UID, "generation": 2},
        "spec": spec if spec is not None else SPEC,
        "status": status or {},
    }
    return sb.search_snapshot(body)


def test_status_is_written_before_the_trial_is_created(api, steps) -> None:
    calls, _ = api
    state = sh._SearchState()
    exported = sh.reconcile_search(search(), [], state)
    assert [c[0] for c in calls] == ["status", "create"]
    written, body = calls[0][1], calls[1][1]
    assert [(t["name"], t["state"]) for t in written["trials"]] == [("s-0", "Planned")]
    assert body["metadata"]["name"] == "s-0" and body["metadata"]["ownerReferences"][0]["uid"] == UID
    spec_valid = next(c for c in written["conditions"] if c["type"] == "SpecValid")
    assert spec_valid["status"] == "True"
    assert exported is not None and exported.phase == "Running"
    assert steps[0]["generation"] == 2


def test_the_written_status_is_used_while_the_index_lags(api, steps) -> None:
    calls, _ = api
    state = sh._SearchState()
    sh.reconcile_search(search(), [], state)
    calls.clear()
    # The trial's ADDED event came first: the index shows the trial but still the old (empty) status.
    sh.reconcile_search(search(status={}), [sb.trial_snapshot(run("s-0", "Created"))], state)
    assert [t.name for t in steps[-1]["status"].trials] == ["s-0"]
    assert "s-0" in steps[-1]["observed"]
    assert calls == []  # nothing changed: no write, no second create


def test_a_planned_trial_is_created_once_until_the_index_shows_it(api, steps) -> None:
    calls, _ = api
    state = sh._SearchState()
    sh.reconcile_search(search(), [], state)
    calls.clear()
    sh.reconcile_search(search(spec={**SPEC, "budget": {"parallelTrials": 2}}), [], state)
    assert not [c for c in calls if c[0] == "create"]


def test_conflict_with_our_own_trial_is_adopted(api, steps) -> None:
    calls, existing = api
    existing["s-0"] = run("s-0")
    sh.reconcile_search(search(), [], sh._SearchState())
    assert [c[0] for c in calls] == ["status", "create", "get"]


def test_conflict_with_a_stranger_is_an_error_and_an_event(api, steps) -> None:
    calls, existing = api
    existing["s-0"] = run("s-0", owner="a-deleted-search")
    with pytest.raises(sh.CreateFailed, match="belongs to something else"):
        sh.reconcile_search(search(), [], sh._SearchState())
    assert (
        "event",
        ("TrialNameTaken", "trial s-0: a TrainingRun of that name exists and belongs to something else"),
    ) in calls


def test_refused_spec_writes_spec_valid_false_and_creates_nothing(api, steps) -> None:
    calls, _ = api
    bad = {**SPEC, "searchSpace": [{"path": "model.size", "values": ["tiny", "huge"]}]}
    running = sb.status_dict(
        ArchitectureSearchStatus(
            phase="Running", trials=[TrialRecord(index=0, name="s-0", config=0, steps=10)]
        )
    )
    sh.reconcile_search(
        search(spec=bad, status=running), [sb.trial_snapshot(run("s-0", "Running"))], sh._SearchState()
    )
    assert steps == []  # the engine is not asked
    assert [c[0] for c in calls] == ["status", "event"]
    written = calls[0][1]
    cond = next(c for c in written["conditions"] if c["type"] == "SpecValid")
    assert cond["status"] == "False" and "searchSpace[0]" in cond["message"] and "huge" in cond["message"]
    assert written["phase"] == "Running" and [t["name"] for t in written["trials"]] == ["s-0"]
    assert calls[1][1][0] == "InvalidSpec"


def test_a_name_too_long_for_trial_names_is_refused(api, steps) -> None:
    calls, _ = api
    sh.reconcile_search(search(name="x" * 50), [], sh._SearchState())
    cond = next(c for c in calls[0][1]["conditions"] if c["type"] == "SpecValid")
    assert cond["status"] == "False" and "metadata.name" in cond["message"]
    assert not [c for c in calls if c[0] == "create"]


def test_stop_deletes_only_the_searchs_own_live_trials(api, steps) -> None:
    calls, _ = api
    engine.step.stop = ["s-0", "s-1", "s-2"]  # type: ignore[attr-defined]
    trials = [
        sb.trial_snapshot(run("s-0", "Running")),
        sb.trial_snapshot(run("s-1", "Running", owner="someone-else")),
    ]
    status = sb.status_dict(
        ArchitectureSearchStatus(
            trials=[TrialRecord(index=0, name="s-0", config=0, steps=10, state="Running")]
        )
    )
    sh.reconcile_search(search(status=status), trials, sh._SearchState())
    assert [c for c in calls if c[0] == "delete"] == [("delete", "s-0")]


def test_an_unchanged_pass_is_skipped_without_calling_the_engine(api, steps) -> None:
    state = sh._SearchState()
    trials = [sb.trial_snapshot(run("s-0", "Running"))]
    sh.reconcile_search(search(), trials, state)
    before = len(steps)
    assert sh.reconcile_search(search(), trials, state) is None
    assert len(steps) == before


def test_a_recreated_search_starts_from_its_own_status(api, steps) -> None:
    state = sh._SearchState()
    sh.reconcile_search(search(), [], state)
    fresh = search()
    fresh["uid"] = "another-uid"
    sh.reconcile_search(fresh, [], state)
    assert steps[-1]["status"] == parse_search_status({})  # not the deleted namesake's status


def test_a_trial_the_api_server_refuses_fails_with_its_message_instead_of_retrying(api, steps) -> None:
    calls, _ = api
    why = 'TrainingRun.kubearch.dev "s-0" is invalid: spec.resources.gpuType: Invalid value: "a b"'
    sh._clients["custom"].refuse["s-0"] = why
    state = sh._SearchState()
    sh.reconcile_search(search(), [], state)  # no exception: nothing to retry
    assert ("event", ("TrialRefused", f"the API server refused TrainingRun s-0: {why}")) in calls
    assert state.dirty, "the refusal is folded in by another pass at once"
    sh.reconcile_search(search(), [], state)
    refused = steps[-1]["observed"]["s-0"]
    assert (refused.state, refused.reason) == ("Failed", "TrialRefused") and why in refused.message
    assert len([c for c in calls if c[0] == "create"]) == 1


def test_a_creation_that_keeps_failing_is_counted_visible_and_bounded(
    api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 403 (a quota), not a refusal: each attempt is counted on the trial and shown in the
    TrialsCreated condition; after MAX_CREATE_ATTEMPTS the trial fails (CreateFailed) and a new
    configuration takes its place, instead of the trial staying Planned forever. The real engine."""
    calls, _ = api
    custom = sh._clients["custom"]
    forbidden = {"kind": "Status", "message": 'trainingruns "s-000" is forbidden: exceeded quota: runs'}

    def create(g, v, ns, plural, body) -> None:
        calls.append(("create", body))
        err = ApiException(status=403, reason="Forbidden")
        err.body = json.dumps(forbidden)
        raise err

    monkeypatch.setattr(custom, "create_namespaced_custom_object", create)
    spec = {
        "trialTemplate": {"resources": {"gpusPerNode": 0}},
        "searchSpace": [{"path": "model.size", "values": ["tiny", "small"]}],
        "budget": {"maxFailedTrials": 3},
    }
    state = sh._SearchState()
    for attempt in range(1, engine.MAX_CREATE_ATTEMPTS + 1):
        with pytest.raises(sh.CreateFailed, match=r"403 Forbidden: .*exceeded quota"):
            sh.reconcile_search(search(spec=spec, status=state.status), [], state)
        written = state.status
        first = written["trials"][0]
        assert (first["name"], first["state"], first["createFailures"]) == ("s-000", "Planned", attempt)
        assert f"({attempt}/{engine.MAX_CREATE_ATTEMPTS})" in first["message"]
        cond = next(c for c in written["conditions"] if c["type"] == "TrialsCreated")
        assert (cond["status"], cond["reason"]) == ("False", "CreateFailed")
        assert "s-000" in cond["message"] and "exceeded quota" in cond["message"]
    creates = [c for c in calls if c[0] == "create"]
    assert len(creates) == engine.MAX_CREATE_ATTEMPTS
    # The next pass fails the trial and plans the next configuration in its place.
    monkeypatch.setattr(custom, "create_namespaced_custom_object", lambda *a, **k: calls.append(("ok", a[4])))
    sh.reconcile_search(search(spec=spec, status=state.status), [], state)
    trials = {t["name"]: t for t in state.status["trials"]}
    assert (trials["s-000"]["state"], trials["s-000"]["reason"]) == ("Failed", "CreateFailed")
    assert [c[1]["metadata"]["name"] for c in calls if c[0] == "ok"] == ["s-001"]
    cond = next(c for c in state.status["conditions"] if c["type"] == "TrialsCreated")
    assert cond["status"] == "True"
    assert ("event", ("TrialCreateFailed", "trial s-000: " + trials["s-000"]["message"])) in calls


def test_api_message_reads_a_status_body() -> None:
    assert (
        sb.api_message(b'{"kind": "Status", "message": "spec.x: Invalid value"}') == "spec.x: Invalid value"
    )
    assert sb.api_message("not json") == "not json"
    assert sb.api_message(None) == ""


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def samples(search_name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the search gauges that carries ``search=search_name``."""
    out = {}
    for gauge in (sh.SEARCH_TRIALS, sh.SEARCH_BEST, sh.SEARCH_TRIAL_OBJECTIVE, sh.SEARCH_LEADERBOARD):
        for family in gauge.collect():
            for s in family.samples:
                if s.labels.get("search") == search_name:
                    labels = tuple(
                        sorted((k, v) for k, v in s.labels.items() if k not in ("search", "namespace"))
                    )
                    out[(s.name, labels)] = s.value
    return out


def finished(index: int, objective: float, rung: int = 0) -> TrialRecord:
    return TrialRecord(
        index=index,
        name=f"m-{index:03d}",
        config=index,
        rung=rung,
        steps=10,
        state="Succeeded",
        objective=objective,
    )


def entry(rank: int, index: int, objective: float) -> LeaderboardEntry:
    return LeaderboardEntry(
        rank=rank, trial=f"m-{index:03d}", config=index, rung=0, steps=10, objective=objective
    )


def test_gauges_follow_the_status_and_leave_with_the_search() -> None:
    key = ("ns", "m")
    state = sh._states.setdefault(key, sh._SearchState())
    snap = search(name="m", spec={**SPEC, "objective": {"metric": "valLoss"}})
    board = [entry(1, 1, 1.5), entry(2, 0, 2.0)]
    status = ArchitectureSearchStatus(
        phase="Running",
        trials=[finished(0, 2.0), finished(1, 1.5), TrialRecord(index=2, name="m-002", config=2, steps=10)],
        trial_counts=TrialCounts(total=3, succeeded=2, planned=1),
        leaderboard=board,
        best_trial=board[0],
    )
    try:
        sh._export(snap, status, state)
        got = samples("m")
        assert got[("kubearch_operator_search_trials", (("state", "succeeded"),))] == 2
        assert got[("kubearch_operator_search_trials", (("state", "failed"),))] == 0
        assert got[("kubearch_operator_search_best_objective", (("metric", "valLoss"),))] == 1.5
        objectives = {dict(k[1])["trial"]: v for k, v in got.items() if k[0].endswith("trial_objective")}
        assert objectives == {"m-000": 2.0, "m-001": 1.5}  # the planned trial has no objective yet
        ranks = {dict(k[1])["rank"]: dict(k[1])["trial"] for k in got if "leaderboard" in k[0]}
        assert ranks == {"1": "m-001", "2": "m-000"}

        status.leaderboard = [entry(1, 1, 1.5)]
        status.trials = status.trials[1:]
        sh._export(snap, status, state)
        got = samples("m")
        assert {dict(k[1])["trial"] for k in got if k[0].endswith("trial_objective")} == {"m-001"}
        assert {dict(k[1])["rank"] for k in got if "leaderboard" in k[0]} == {"1"}
    finally:
        sh._forget(key)
    assert samples("m") == {}
    assert key not in sh._states
