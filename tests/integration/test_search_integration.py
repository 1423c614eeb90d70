"""ArchitectureSearch against a real kube-apiserver, with the operator as a real process.

The operator runs with the least-privilege ServiceAccount token (conftest), so every verb the
search controller uses is checked for real. Trials are real TrainingRuns that the TrainingRun
controller turns into pods; there is no kubelet, so the tests play it on the trial's master pod
(``set_pod``): Running, then Succeeded with the trainer's JSON summary as termination message (the
metrics the search ranks), or Failed with the trainer's exit code (64 config error, 67 CUDA OOM).
The expected rankings below are derived by hand from the losses the tests inject. Trials never
train: tiny CPU templates whose pods cannot be scheduled anywhere (``NEVER_SCHEDULE``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import REPO, wait_for
from kubernetes.client.rest import ApiException
from test_operator_integration import NEVER_SCHEDULE, gone, set_pod

GROUP, VERSION = "kubearch.dev", "v1alpha1"
SEARCHES, RUNS = "architecturesearches", "trainingruns"
SEARCH_LABEL = "kubearch.dev/search"
FINAL = ("Succeeded", "Failed")
#: Seconds of rest measured by the at-rest test (several of the TrainingRun controller's resyncs).
REST_WINDOW = 5.0


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def template(**training: Any) -> dict[str, Any]:
    """A one-pod CPU trial that no node ever runs (the test plays the kubelet)."""
    return {
        "model": {"architecture": "dense", "size": "tiny"},
        "data": {"seqLen": 64},
        "training": {"batchSize": 8, "gradientAccumulationSteps": 1, **training},
        "resources": {"nodes": 1, "gpusPerNode": 0, "nodeSelector": NEVER_SCHEDULE},
        "runPolicy": {"backoffLimit": 0},
    }


def search_body(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name},
        "spec": spec,
    }


def create_search(kube, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, SEARCHES, search_body(name, spec))


def get_search(kube, ns: str, name: str) -> dict[str, Any]:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, SEARCHES, name)


def search_status(kube, ns: str, name: str) -> dict[str, Any]:
    return get_search(kube, ns, name).get("status") or {}


def trials(kube, ns: str, search: str) -> list[dict[str, Any]]:
    """The search's trial TrainingRuns (not being deleted), by name."""
    items = kube.custom.list_namespaced_custom_object(
        GROUP, VERSION, ns, RUNS, label_selector=f"{SEARCH_LABEL}={search}"
    )["items"]
    live = [t for t in items if not t["metadata"].get("deletionTimestamp")]
    return sorted(live, key=lambda t: t["metadata"]["name"])


def phase_of(run: dict[str, Any]) -> str:
    return (run.get("status") or {}).get("phase") or "Pending"


def unfinished(kube, ns: str, search: str) -> list[dict[str, Any]]:
    return [t for t in trials(kube, ns, search) if phase_of(t) not in FINAL]


def wait_search_phase(kube, ns: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(
        lambda: (s := search_status(kube, ns, name)).get("phase") == phase and s,
        timeout=timeout,
        what=f"search {name} to reach phase {phase}",
    )


def wait_new_trial(kube, ns: str, search: str, known: set[str], timeout: float = 30) -> dict[str, Any]:
    """The next trial (by name) that is not in ``known``, once its master pod exists."""

    def fresh() -> dict[str, Any] | None:
        new = [t for t in unfinished(kube, ns, search) if t["metadata"]["name"] not in known]
        if not new:
            return None
        trial = new[0]
        kube.core.read_namespaced_pod(f"{trial['metadata']['name']}-master-0", ns)  # raises until there
        return trial

    return wait_for(fresh, timeout=timeout, what=f"a new trial of {search} (known: {sorted(known)})")


def finish(kube, ns: str, trial: str, code: int, summary: dict[str, Any] | None = None) -> None:
    """Play the kubelet: the trial's master pod runs, then exits ``code`` with ``summary``."""
    pod = f"{trial}-master-0"
    set_pod(kube, ns, pod, "Running")
    phase = "Succeeded" if code == 0 else "Failed"
    set_pod(kube, ns, pod, phase, code, json.dumps(summary or {"status": "failed", "exit_code": code}))
    wait_for(
        lambda: phase_of(kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, RUNS, trial)) == phase,
        timeout=30,
        what=f"trial {trial} to reach {phase}",
    )


def succeed(kube, ns: str, trial: str, steps: int, val_loss: float) -> None:
    summary = {"status": "completed", "exit_code": 0, "steps": steps, "final_train_loss": val_loss + 0.1}
    summary |= {"final_val_loss": val_loss, "val_accuracy": 0.5, "tokens_per_second": 1000.0}
    finish(kube, ns, trial, 0, summary)


def params(trial: dict[str, Any]) -> dict[str, Any]:
    return json.loads(trial["metadata"]["annotations"]["kubearch.dev/trial-parameters"])


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


# ------------------------------------------------------------------------------------------------
# the schema and the operator's validation
# ------------------------------------------------------------------------------------------------
GOOD = {"trialTemplate": template(), "searchSpace": [{"path": "model.size", "values": ["tiny", "small"]}]}
BAD_SEARCHES = [
    ({"algorithm": {"name": "bayes"}}, 'spec.algorithm.name: Unsupported value: "bayes"'),
    ({"algorithm": {"name": "asha", "rungs": [50]}}, "spec.algorithm.rungs: Invalid value"),
    ({"algorithm": {"name": "grid", "rungs": [200, 50]}}, "rungs must be increasing"),
    (
        {"algorithm": {"rungs": [50, 200], "rungOverrides": [{"training.batchSize": 8}]}},
        "spec.algorithm.rungOverrides: Invalid value",
    ),
    (
        {"searchSpace": [{"path": "training.learningRate", "values": [0.1], "min": 0.01, "max": 0.1}]},
        '"spec.searchSpace[0]" must validate one and only one schema (oneOf)',
    ),
    (
        {
            "searchSpace": [
                {"path": "model.size", "values": ["tiny"]},
                {"path": "model.size", "values": ["small"]},
            ]
        },
        'spec.searchSpace[1]: Duplicate value: {"path":"model.size"}',
    ),
    (
        {"searchSpace": [{"path": "model.colour", "values": ["blue"]}, {"path": "x.y", "values": [1]}]},
        "spec.searchSpace[1].path",
    ),
    ({"objective": {"metric": "bleu"}}, "spec.objective.goal: Invalid value"),
    ({"budget": {"parallelTrials": 0}}, "spec.budget.parallelTrials: Invalid value: 0"),
    (
        {"trialTemplate": {"model": {"size": "huge"}}},
        'spec.trialTemplate.model.size: Unsupported value: "huge"',
    ),
]


@pytest.mark.parametrize(("bad", "expected"), BAD_SEARCHES, ids=[e for _, e in BAD_SEARCHES])
def test_api_server_refuses_bad_searches_naming_the_field(
    installed, bad: dict[str, Any], expected: str
) -> None:
    doc = search_body("bad", {**GOOD, **bad})
    proc = installed.kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-", stdin=yaml.safe_dump(doc), check=False
    )
    assert proc.returncode != 0, proc.stdout
    assert expected in proc.stderr


def test_short_names_and_columns(installed, namespace: str) -> None:
    resources = installed.kubectl("api-resources", "--api-group=kubearch.dev").stdout
    line = next(row for row in resources.splitlines() if row.startswith("architecturesearches"))
    assert "asearch,asr" in line and "ArchitectureSearch" in line
    everything = installed.kubectl("api-resources").stdout.split()
    assert everything.count("asearch,asr") == 1  # no built-in resource claims either short name
    create_search(
        installed, namespace, "cols", {**GOOD, "trialTemplate": template(), "budget": {"maxTrials": 1}}
    )
    header = installed.kubectl("get", "asearch", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "ALGORITHM", "SUCCEEDED", "TRIALS", "BEST", "PHASE", "AGE"]


def test_a_value_the_trainingrun_refuses_is_named_and_no_trial_is_created(
    installed, operator, namespace: str
) -> None:
    kube, ns = installed, namespace
    spec = {**GOOD, "searchSpace": [{"path": "model.size", "values": ["tiny", "huge"]}]}
    create_search(kube, ns, "typo", spec)
    status = wait_for(
        lambda: (s := search_status(kube, ns, "typo")).get("conditions") and s,
        what="the operator's verdict on the search",
    )
    valid = cond(status, "SpecValid")
    assert valid["status"] == "False"
    assert "spec.searchSpace[0].values[1]: 'huge'" in valid["message"]
    assert trials(kube, ns, "typo") == []
    events = kube.core.list_namespaced_event(ns, field_selector="involvedObject.name=typo").items
    assert [e.reason for e in events] == ["InvalidSpec"]


def test_a_trial_whose_creation_keeps_failing_fails_visibly_instead_of_staying_planned(
    installed, operator, namespace: str
) -> None:
    """A ResourceQuota of zero TrainingRuns: the API server answers 403 (not a refusal of the spec).
    Each attempt is counted on the trial and shown in TrialsCreated=False; after MAX_CREATE_ATTEMPTS
    the trial fails with reason CreateFailed and counts against maxFailedTrials (0 here: the search
    fails, naming the reason). Before, the trial stayed Planned forever with only a log line."""
    kube, ns, name = installed, namespace, "quota"
    resource = "count/trainingruns.kubearch.dev"
    kube.core.create_namespaced_resource_quota(
        ns, {"metadata": {"name": "no-runs"}, "spec": {"hard": {resource: "0"}}}
    )
    # No quota controller runs here: fill in the status it would write, so admission can decide.
    kube.core.patch_namespaced_resource_quota_status(
        "no-runs", ns, {"status": {"hard": {resource: "0"}, "used": {resource: "0"}}}
    )
    create_search(kube, ns, name, {**GOOD, "budget": {"maxTrials": 1, "maxFailedTrials": 0}})
    seen = wait_for(
        lambda: (
            (s := search_status(kube, ns, name)).get("trials")
            and s["trials"][0].get("createFailures", 0) >= 1
            and s
        ),
        timeout=30,
        what="the first failed creation counted on the trial",
    )
    first = seen["trials"][0]
    assert first["state"] == "Planned" and "403" in first["message"] and "exceeded quota" in first["message"]
    creating = cond(seen, "TrialsCreated")
    assert (creating["status"], creating["reason"]) == ("False", "CreateFailed")
    assert f"{name}-000" in creating["message"]
    status = wait_search_phase(kube, ns, name, "Failed", timeout=90)
    first = status["trials"][0]
    assert (first["state"], first["reason"], first["createFailures"]) == ("Failed", "CreateFailed", 5)
    assert "could not be created in 5 attempts" in first["message"]
    assert "CreateFailed: 1" in status["message"] and "maxFailedTrials (0)" in status["message"]
    assert trials(kube, ns, name) == []
    events = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    assert sum(e.reason == "TrialCreateFailed" for e in events) >= 5  # each attempt, then the failure


# ------------------------------------------------------------------------------------------------
# trials
# ------------------------------------------------------------------------------------------------
def test_grid_trials_get_their_parameters_and_rungs_within_parallel_trials_and_are_ranked(
    installed, operator, namespace: str, tmp_path: Path
) -> None:
    kube, ns, name = installed, namespace, "grid"
    spec = {
        "trialTemplate": template(),
        "searchSpace": [
            {"path": "model.size", "values": ["tiny", "small"]},
            {"path": "training.learningRate", "values": [0.001, 0.003]},
        ],
        "objective": {"metric": "valLoss"},
        "algorithm": {"name": "grid", "rungs": [4, 8]},
        "budget": {"parallelTrials": 2},
    }
    uid = create_search(kube, ns, name, spec)["metadata"]["uid"]
    # Hand-chosen val losses per (size, learningRate, rung).
    losses = {
        ("tiny", 0.001, 4): 3.0, ("tiny", 0.001, 8): 2.5,
        ("tiny", 0.003, 4): 2.8, ("tiny", 0.003, 8): 2.1,
        ("small", 0.001, 4): 2.9, ("small", 0.001, 8): 1.9,
        ("small", 0.003, 4): 2.7, ("small", 0.003, 8): 2.3,
    }  # fmt: skip
    seen: dict[str, dict[str, Any]] = {}
    while len(seen) < 8:
        trial = wait_new_trial(kube, ns, name, set(seen))
        seen[trial["metadata"]["name"]] = trial
        running = unfinished(kube, ns, name)
        assert len(running) <= 2, [t["metadata"]["name"] for t in running]
        counts = search_status(kube, ns, name).get("trialCounts", {})
        assert counts.get("planned", 0) + counts.get("created", 0) + counts.get("running", 0) <= 2, counts
        # Finish the oldest unfinished trial, so that two run at once most of the time.
        oldest = running[0]
        p, steps = params(oldest), oldest["spec"]["training"]["stepsPerEpoch"]
        succeed(
            kube,
            ns,
            oldest["metadata"]["name"],
            steps,
            losses[(p["model.size"], p["training.learningRate"], steps)],
        )
    for trial in unfinished(kube, ns, name):
        p, steps = params(trial), trial["spec"]["training"]["stepsPerEpoch"]
        succeed(
            kube,
            ns,
            trial["metadata"]["name"],
            steps,
            losses[(p["model.size"], p["training.learningRate"], steps)],
        )

    status = wait_search_phase(kube, ns, name, "Succeeded")
    assert len(seen) == 8 and len(trials(kube, ns, name)) == 8  # 4 configurations x 2 rungs, none twice
    configs = {
        (params(t)["model.size"], params(t)["training.learningRate"], t["spec"]["training"]["stepsPerEpoch"])
        for t in seen.values()
    }
    assert configs == set(losses)
    for t in seen.values():
        s = t["spec"]
        p = params(t)
        assert (
            s["model"]["size"] == p["model.size"]
            and s["training"]["learningRate"] == p["training.learningRate"]
        )
        assert s["training"]["numEpochs"] == 1 and s["training"]["stepsPerEpoch"] in (4, 8)
        assert s["resources"]["nodeSelector"] == NEVER_SCHEDULE  # the template's other fields are kept
        (owner,) = t["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"], owner["blockOwnerDeletion"]) == (
            "ArchitectureSearch", uid, True, True,
        )  # fmt: skip
    # Leaderboard: every configuration at its last rung (8 steps), lowest val loss first.
    board = [
        (e["parameters"]["model.size"], e["parameters"]["training.learningRate"], e["objective"])
        for e in status["leaderboard"]
    ]
    assert board == [("small", 0.001, 1.9), ("tiny", 0.003, 2.1), ("small", 0.003, 2.3), ("tiny", 0.001, 2.5)]
    assert status["bestTrial"]["objective"] == 1.9 and status["trialCounts"]["succeeded"] == 8
    table = kube.kubectl("get", "asearch", name, "-n", ns).stdout
    assert table.split("\n")[1].split()[1:6] == ["grid", "8", "8", "1.9", "Succeeded"]
    # `kubearch report NAME` reads the search through the API and ranks it the same way.
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
    kubearch = [sys.executable, "-c", "import sys; from kubearch_trainer.cli import main; main(sys.argv[1:])"]
    proc = subprocess.run(
        [*kubearch, "report", name, "-n", ns, "--output-dir", str(tmp_path), "--no-plot"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [e["trial"] for e in report["leaderboard"]] == [e["trial"] for e in status["leaderboard"]]
    assert "Rung 1 (8 steps)" in proc.stdout
    metrics = operator.metrics()
    assert (
        f'kubearch_operator_search_best_objective{{metric="valLoss",namespace="{ns}",search="{name}"}} 1.9'
        in metrics
    )
    assert (
        f'kubearch_operator_search_trials{{namespace="{ns}",search="{name}",state="succeeded"}} 8.0'
        in metrics
    )


def test_failed_trials_are_replaced_until_max_failed_trials_then_the_search_fails(
    installed, operator, namespace: str
) -> None:
    kube, ns, name = installed, namespace, "flaky"
    spec = {
        "trialTemplate": template(),
        "searchSpace": [{"path": "training.learningRate", "min": 1e-4, "max": 1e-2, "log": True}],
        "algorithm": {"name": "random", "seed": 7},
        "budget": {"maxTrials": 3, "parallelTrials": 1, "maxFailedTrials": 1},
    }
    create_search(kube, ns, name, spec)
    first = wait_new_trial(kube, ns, name, set())
    finish(kube, ns, first["metadata"]["name"], 64)  # CONFIG_ERROR: the trial fails for good
    second = wait_new_trial(kube, ns, name, {first["metadata"]["name"]})
    assert params(second) != params(first)  # a new configuration replaces the failed one
    status = search_status(kube, ns, name)
    assert status["phase"] == "Running" and status["trialCounts"]["failed"] == 1
    finish(kube, ns, second["metadata"]["name"], 64)
    status = wait_search_phase(kube, ns, name, "Failed")
    assert cond(status, "Failed")["reason"] == "MaxFailedTrialsExceeded"
    assert status["trialCounts"]["failed"] == 2
    assert [t["metadata"]["name"] for t in trials(kube, ns, name)] == [
        first["metadata"]["name"],
        second["metadata"]["name"],
    ]  # nothing was created after the budget was spent
    failed = {t["name"]: t for t in status["trials"]}
    assert failed[first["metadata"]["name"]]["reason"] == "ConfigError"


def test_an_oom_trial_is_retried_once_with_half_the_micro_batch(installed, operator, namespace: str) -> None:
    kube, ns, name = installed, namespace, "oom"
    spec = {
        "trialTemplate": template(batchSize=8, gradientAccumulationSteps=2),
        "searchSpace": [{"path": "model.size", "values": ["small"]}],
        "budget": {"parallelTrials": 1, "maxFailedTrials": 0},
    }
    create_search(kube, ns, name, spec)
    first = wait_new_trial(kube, ns, name, set())
    finish(kube, ns, first["metadata"]["name"], 67)  # the trainer's CUDA out-of-memory exit
    retry = wait_new_trial(kube, ns, name, {first["metadata"]["name"]})
    assert (
        retry["spec"]["training"]["batchSize"],
        retry["spec"]["training"]["gradientAccumulationSteps"],
    ) == (4, 4)
    assert params(retry) == params(first) and retry["spec"]["model"]["size"] == "small"
    plan = json.loads(retry["metadata"]["annotations"]["kubearch.dev/trial-plan"])
    assert plan["oomRetryOf"] == first["metadata"]["name"]
    assert search_status(kube, ns, name)["phase"] == "Running"  # a retried OOM is not a failure yet
    finish(kube, ns, retry["metadata"]["name"], 67)  # out of memory again: counted as failed, OOM
    status = wait_search_phase(kube, ns, name, "Failed")
    records = {t["name"]: t for t in status["trials"]}
    assert records[retry["metadata"]["name"]]["reason"] == "OOM"
    assert len(trials(kube, ns, name)) == 2  # one retry, no third attempt
    events = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    assert "TrialOOMRetry" in {e.reason for e in events}


def test_operator_sigkill_mid_search_creates_no_duplicate_trial(installed, operator, namespace: str) -> None:
    kube, ns, name = installed, namespace, "survivor"
    spec = {
        "trialTemplate": template(),
        "searchSpace": [{"path": "training.learningRate", "values": [0.001, 0.002, 0.003, 0.004]}],
        "budget": {"parallelTrials": 2},
    }
    create_search(kube, ns, name, spec)
    a = wait_new_trial(kube, ns, name, set())
    b = wait_new_trial(kube, ns, name, {a["metadata"]["name"]})
    succeed(kube, ns, a["metadata"]["name"], 10, 2.0)
    operator.stop(signal.SIGKILL)  # a crash while the search reacts to the finished trial
    operator.start()
    done = {a["metadata"]["name"]}
    while len(done) < 4:
        pending = [t for t in unfinished(kube, ns, name) if t["metadata"]["name"] not in done]
        trial = pending[0] if pending else wait_new_trial(kube, ns, name, done)
        wait_for(
            lambda t=trial: kube.core.read_namespaced_pod(f"{t['metadata']['name']}-master-0", ns), what="pod"
        )
        succeed(kube, ns, trial["metadata"]["name"], 10, 1.0 + len(done))
        done.add(trial["metadata"]["name"])
    status = wait_search_phase(kube, ns, name, "Succeeded")
    runs = trials(kube, ns, name)
    assert len(runs) == 4 and b["metadata"]["name"] in done
    assert sorted(params(t)["training.learningRate"] for t in runs) == [0.001, 0.002, 0.003, 0.004]
    assert status["trialCounts"]["total"] == 4


def test_deleting_the_search_deletes_its_trials(installed, operator, namespace: str) -> None:
    kube, ns, name = installed, namespace, "doomed"
    spec = {**GOOD, "budget": {"parallelTrials": 2}}
    create_search(kube, ns, name, spec)
    wait_for(lambda: len(trials(kube, ns, name)) == 2, what="two trials")
    pods = wait_for(
        lambda: (
            (p := kube.core.list_namespaced_pod(ns, label_selector="kubearch.dev/run").items)
            and len(p) == 2
            and p
        ),
        what="the trials' pods",
    )
    kube.kubectl("delete", "asearch", name, "-n", ns, "--wait=false")
    wait_for(lambda: gone(get_search, kube, ns, name), timeout=40, what="the search deleted")
    wait_for(
        lambda: not kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, RUNS)["items"],
        timeout=60,
        what="trials garbage-collected",
    )
    wait_for(
        lambda: all(gone(kube.core.read_namespaced_pod, p.metadata.name, ns) for p in pods),
        timeout=60,
        what="the trials' pods garbage-collected",
    )
    metrics = operator.metrics()
    assert f'search="{name}"' not in metrics  # the search's series went with it


def request_counts(kube, resource: str) -> dict[str, float]:
    """The API server's own count of completed requests on ``resource``, by verb (all clients)."""
    counts: dict[str, float] = {}
    for line in kube.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if line.startswith("apiserver_request_total{") and f'resource="{resource}"' in line:
            verb = line.split('verb="', 1)[1].split('"', 1)[0]
            counts[verb] = counts.get(verb, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_a_search_at_rest_makes_no_requests(installed, operator, namespace: str) -> None:
    """Watch-driven: with nothing changing, the search controller reads nothing and writes nothing.

    The window below is a measurement of rest (how many requests happen while nothing changes), not
    a wait for a condition; before it, the test waits until the search has settled.
    """
    kube, ns, name = installed, namespace, "idle"
    create_search(kube, ns, name, {**GOOD, "budget": {"parallelTrials": 2}})
    wait_for(lambda: len(trials(kube, ns, name)) == 2, what="two trials")
    wait_for(
        lambda: search_status(kube, ns, name).get("trialCounts", {}).get("created") == 2,
        what="the search to record both trials as created",
    )
    # The namespace controller LISTs and DELETEs every resource of a namespace it empties: wait
    # until earlier tests' namespaces are gone, so that the counts below are the operator's. Pods
    # bound to a node whose kubelet stand-in has stopped (KWOK, the process kubelet) would stay
    # Terminating, and their namespaces with them: remove those pods outright first.
    for other in kube.core.list_namespace(label_selector="kubearch.dev/test").items:
        if other.metadata.name == ns:
            continue
        for pod in kube.core.list_namespaced_pod(other.metadata.name).items:
            with contextlib.suppress(ApiException):
                kube.core.delete_namespaced_pod(
                    pod.metadata.name, other.metadata.name, grace_period_seconds=0
                )
    wait_for(
        lambda: (
            [n.metadata.name for n in kube.core.list_namespace(label_selector="kubearch.dev/test").items]
            == [ns]
        ),
        timeout=120,
        what="earlier test namespaces to be deleted",
    )
    before = (request_counts(kube, SEARCHES), request_counts(kube, RUNS))
    time.sleep(REST_WINDOW)
    after = (request_counts(kube, SEARCHES), request_counts(kube, RUNS))
    search_requests = {v: n - before[0].get(v, 0) for v, n in after[0].items() if v != "WATCH"}
    assert not any(search_requests.values()), search_requests
    run_writes = {v: after[1].get(v, 0) - before[1].get(v, 0) for v in ("POST", "DELETE")}
    assert not any(run_writes.values()), run_writes


def test_updates_apply_and_a_refused_update_leaves_running_trials_alone(
    installed, operator, namespace: str
) -> None:
    kube, ns, name = installed, namespace, "edited"
    space = [{"path": "training.learningRate", "values": [0.001, 0.002, 0.003]}]
    create_search(kube, ns, name, {"trialTemplate": template(), "searchSpace": space})
    first = wait_new_trial(kube, ns, name, set())
    set_pod(kube, ns, f"{first['metadata']['name']}-master-0", "Running")

    bad = [{"path": "training.learningRate", "values": [0.001, -1.0]}]  # a TrainingRun refuses lr <= 0
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, SEARCHES, name, {"spec": {"searchSpace": bad}}
    )
    status = wait_for(
        lambda: (s := search_status(kube, ns, name)) and cond(s, "SpecValid")["status"] == "False" and s,
        what="SpecValid=False after the update",
    )
    assert "spec.searchSpace[0].values[1]" in cond(status, "SpecValid")["message"]
    (still,) = trials(kube, ns, name)
    assert still["metadata"]["uid"] == first["metadata"]["uid"]  # the running trial was left alone

    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, SEARCHES, name, {"spec": {"searchSpace": space, "budget": {"parallelTrials": 2}}}
    )
    second = wait_new_trial(kube, ns, name, {first["metadata"]["name"]})  # the wider budget applies
    assert params(second) != params(first)
    status = search_status(kube, ns, name)
    assert cond(status, "SpecValid")["status"] == "True"
    assert len(unfinished(kube, ns, name)) == 2


def test_the_seed_search_plans_large_models_to_fit_before_the_trial_exists(
    installed, operator, namespace: str
) -> None:
    """The seed's manifest narrowed to its large model: the medium mode's batch 32 does not fit a
    24 GB GPU by the trainer's memory model, so the trial is created with a smaller micro-batch and
    more accumulation (the same effective batch), and says so."""
    kube, ns = installed, namespace
    doc = yaml.safe_load((REPO / "examples" / "search-seed-36.yaml").read_text())
    spec = doc["spec"]
    spec["searchSpace"] = [
        {"path": "model.size", "values": ["large"]},
        {"path": "model.attention", "values": ["baseline"]},
    ]
    name = "seed-large"
    create_search(kube, ns, name, spec)
    fast = wait_new_trial(kube, ns, name, set())
    assert fast["spec"]["training"]["batchSize"] == 16 and fast["spec"]["training"]["stepsPerEpoch"] == 50
    succeed(kube, ns, fast["metadata"]["name"], 50, 5.0)
    medium = wait_new_trial(kube, ns, name, {fast["metadata"]["name"]})
    training = medium["spec"]["training"]
    assert training["stepsPerEpoch"] == 200
    assert training["batchSize"] < 32 and training["batchSize"] * training["gradientAccumulationSteps"] == 32
    plan = json.loads(medium["metadata"]["annotations"]["kubearch.dev/trial-plan"])
    assert "effective batch 32 kept" in plan["reason"]
    record = next(
        t for t in search_status(kube, ns, name)["trials"] if t["name"] == medium["metadata"]["name"]
    )
    assert record["message"].startswith("planned:") and record["plan"]["changed"] is True
