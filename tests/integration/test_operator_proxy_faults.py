"""The operator behind a fault-injecting proxy (issue 9): 409/429/500/503 answers, cut watches.

The operator runs unchanged as a real process; its kubeconfig points at
:class:`fault_proxy.FaultProxy`, which forwards to the real kube-apiserver and injects the faults
the test sets. The session's own operator is stopped for this module (two operators would handle
the same runs) and started again afterwards. The safety resync is off (conftest): whatever the
operator does after a fault, it does because of a watch event or its own back-off, so a lost event
shows as a run that never gets its pods or status. No sleep stands in for a condition; the only
sleeps are the lengths of the faults themselves.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from controlplane import wait_for
from fault_proxy import FaultProxy
from test_operator_faults import children_owned_by, owner_uids, uid_of
from test_operator_integration import cond, create_run, pods, run_status, set_pod, spec, wait_phase, wait_pods
from test_search_integration import (
    create_search,
    params,
    succeed,
    template,
    trials,
    unfinished,
    wait_search_phase,
)


def log_size(op: Any) -> int:
    return len(op.log_path.read_text(errors="replace")) if op.log_path.exists() else 0


def log_since(op: Any, offset: int) -> str:
    return op.log_path.read_text(errors="replace")[offset:]


@pytest.fixture(scope="module")
def proxy(installed: Any) -> Iterator[FaultProxy]:
    plane = installed.local
    if plane is None:
        pytest.skip("the fault proxy serves the local control plane's certificate (not --cluster)")
    with FaultProxy(plane.server, plane.workdir / "pki", seed=9) as p:
        yield p


@pytest.fixture(scope="module")
def proxied(
    installed: Any, operator: Any, proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """conftest's operator class with a kubeconfig whose server is the proxy (same CA, same token;
    the class comes from the fixture: importing conftest by name could find another conftest)."""
    operator.stop()  # the session's operator would reconcile the same runs around the proxy
    op = type(operator)(installed, tmp_path_factory.mktemp("proxied-operator"))
    op.kubeconfig.write_text(op.kubeconfig.read_text().replace(installed.local.server, proxy.server))
    try:
        op.start()
        yield op
    finally:
        op.stop()
        print(f"\n--- proxied operator log (tail) ---\n{op.log_tail(40)}")
        operator.start()


@pytest.fixture
def faults(proxied: Any, proxy: FaultProxy) -> Iterator[FaultProxy]:
    proxy.clear()
    wait_for(proxy.open_watches, timeout=30, what="the operator's watch streams through the proxy")
    yield proxy
    proxy.clear()


def complete(kube: Any, ns: str, names: list[str], count: int) -> bool:
    """Every run has exactly ``count`` pods of attempt 0 (none being deleted, none extra), and its
    own Service and ConfigMap."""
    for n in names:
        uid = uid_of(kube, ns, n)
        found = pods(kube, ns, n, live=False)
        if len(found) != count or any(owner_uids(p) != [uid] for p in found):
            return False
        if any(p.metadata.labels["kubearch.dev/attempt"] != "0" for p in found):
            return False
        if not children_owned_by(kube, ns, n, uid):
            return False
    return True


def cut(faults: FaultProxy, path: str = "", **kwargs: Any) -> int:
    """Cut the operator's watch streams (matching ``path``) once all of them are open again (a
    cut while kopf is still reconnecting after the last one would cut nothing)."""
    streams = len(faults.watched_paths(path))
    wait_for(lambda: faults.open_watches(path) >= streams, timeout=30, what=f"{streams} watch stream(s) open")
    n = faults.drop_watches(path, **kwargs)
    assert n >= streams > 0, (n, streams)
    return n


def warnings(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if re.search(r"\b(WARNING|ERROR)\b", ln)]


# ------------------------------------------------------------------------------------------------
# 500 / 503 on pod creation
# ------------------------------------------------------------------------------------------------


def next_trial_with_pod(kube: Any, ns: str, search: str, done: set[str]) -> dict[str, Any]:
    """Wait for an unfinished trial of ``search``, not in ``done``, whose pod exists."""

    def ready() -> dict[str, Any] | None:
        for t in unfinished(kube, ns, search):
            trial = t["metadata"]["name"]
            if trial not in done and pods(kube, ns, trial):
                return t
        return None

    return wait_for(ready, timeout=30, what=f"a new trial with its pod (done: {sorted(done)})")


def test_pod_creation_failing_for_a_while_ends_with_exactly_the_runs_children(
    installed, proxied: Any, faults: FaultProxy, namespace: str
) -> None:
    """Eight 500s, then four 503s that come *after* the API server created the pod (the answer is
    lost): every run still ends with exactly its two pods, Service and ConfigMap."""
    kube, ns = installed, namespace
    offset = log_size(proxied)
    pods_path = rf"/namespaces/{ns}/pods$"
    refused = faults.inject("POST", pods_path, 500, times=8)
    lost = faults.inject("POST", pods_path, 503, times=4, after_forward=True)
    names = [f"flaky-{i}" for i in range(6)]
    for n in names:
        create_run(kube, ns, n, spec(nodes=2))
    wait_for(lambda: complete(kube, ns, names, 2), timeout=60, interval=0.5, what="2 pods + children per run")
    assert (refused.injected, lost.injected) == (8, 4)
    for n in names:
        roles = sorted(p.metadata.name.removeprefix(f"{n}-").split("-")[0] for p in pods(kube, ns, n))
        assert roles == ["master", "worker"]
        status = wait_phase(kube, ns, n, "Created")
        assert status.get("restartCount", 0) == 0
    creates = faults.requests("POST", pods_path)
    # A pod whose create was answered 503 after the fact is found (409, ours) and not made twice:
    # the API server created exactly the 12 pods, whatever the operator was told.
    assert sum(1 for s in creates if s.upstream == 201) == 12
    assert any(s.injected and s.upstream == 201 for s in creates)  # an answer really was lost
    log = log_since(proxied, offset)
    assert "Traceback" not in log, log[-3000:]
    failures = [ln for ln in warnings(log) if "reconcile failed" in ln]
    assert any(" 500 " in ln for ln in failures) and any(" 503 " in ln for ln in failures), failures
    assert len(failures) <= 12, "\n".join(failures)  # one line per failed pass, no storm


# ------------------------------------------------------------------------------------------------
# 409 on the status write
# ------------------------------------------------------------------------------------------------
def test_status_converges_after_conflicts_on_every_status_write(
    installed, proxied: Any, faults: FaultProxy, namespace: str
) -> None:
    kube, ns, run = installed, namespace, "contested"
    create_run(kube, ns, run, spec(nodes=1))
    (pod,) = wait_pods(kube, ns, run, 1)
    status_path = rf"/namespaces/{ns}/trainingruns/{run}/status$"
    since = time.monotonic()
    conflict = faults.inject("PATCH", status_path, 409)
    set_pod(kube, ns, pod.metadata.name, "Running")
    wait_for(lambda: conflict.injected >= 3, timeout=30, what="three refused status writes")
    assert run_status(kube, ns, run)["phase"] == "Created"  # the fault holds: nothing got through
    set_pod(kube, ns, pod.metadata.name, "Succeeded", 0, '{"status": "completed", "exit_code": 0}')
    wait_for(lambda: conflict.injected >= 5, timeout=30, what="two more refused status writes")
    faults.remove(conflict)
    window = time.monotonic() - since
    status = wait_phase(kube, ns, run, "Succeeded")
    assert status["conditions"][-1]["type"] == "Succeeded"
    assert cond(status, "Succeeded")["status"] == "True"
    assert cond(status, "Running")["status"] == "False"
    assert status.get("restartCount", 0) == 0
    assert [p.metadata.uid for p in pods(kube, ns, run)] == [pod.metadata.uid]  # no restart
    # Back-off, not a hot loop: exponential from 0.5 s makes a handful of tries in the window.
    tries = faults.count("PATCH", status_path, since=since)
    assert tries <= 4 + 2 * window, (tries, window)


# ------------------------------------------------------------------------------------------------
# 429 with Retry-After on creates
# ------------------------------------------------------------------------------------------------
THROTTLE_SECONDS = 6.0
RETRY_AFTER = 2


def test_throttled_creates_back_off_as_told_and_finish_afterwards(
    installed, proxied: Any, faults: FaultProxy, namespace: str
) -> None:
    kube, ns = installed, namespace
    creates = rf"/namespaces/{ns}/(pods|services|configmaps)$"
    names = [f"throttled-{i}" for i in range(4)]
    since = time.monotonic()
    throttle = faults.inject("POST", creates, 429, retry_after=RETRY_AFTER)
    for n in names:
        create_run(kube, ns, n, spec(nodes=1))
    wait_for(lambda: throttle.injected >= len(names), timeout=30, what="every run throttled once")
    time.sleep(THROTTLE_SECONDS)  # the length of the throttled window itself, not a wait for a state
    faults.remove(throttle)
    window = time.monotonic() - since
    wait_for(lambda: complete(kube, ns, names, 1), timeout=60, interval=0.5, what="pod + children per run")
    seen = [s for s in faults.requests("POST", creates, since=since) if s.injected]
    # Each run retries no sooner than Retry-After says: at most one try per run per RETRY_AFTER.
    assert len(seen) <= len(names) * (window / RETRY_AFTER + 1), (len(seen), window)
    for n in names:
        tries = [s.at for s in seen if s.name in (n, f"{n}-config", f"{n}-master-0")]
        gaps = [b - a for a, b in itertools.pairwise(tries)]
        assert tries and min(gaps, default=RETRY_AFTER) >= RETRY_AFTER - 0.1, (n, gaps)


# ------------------------------------------------------------------------------------------------
# dropped watch streams
# ------------------------------------------------------------------------------------------------
def test_no_event_is_lost_when_watch_streams_are_cut(
    installed, proxied: Any, faults: FaultProxy, namespace: str
) -> None:
    """Streams cut while runs are created and while their pods change phase, once refused for a
    while, once resumed only after a ``410 Gone`` (the operator must list again): every run gets
    exactly its children and follows its pods to the end."""
    kube, ns = installed, namespace
    names = [f"cut-{i}" for i in range(9)]
    cuts = 0
    for i, n in enumerate(names):
        create_run(kube, ns, n, spec(nodes=1))
        if i == 2:
            cuts += cut(faults)
        elif i == 5:
            cuts += cut(faults, refuse_for=2.0)
    cuts += cut(faults, expire=True)
    wait_for(lambda: complete(kube, ns, names, 1), timeout=60, interval=0.5, what="pod + children per run")
    for i, n in enumerate(names):
        set_pod(kube, ns, f"{n}-master-0", "Running")
        if i == 3:  # pod watches gone for 3 s; they resume with 410 and list again
            cuts += cut(faults, "/pods$", refuse_for=3.0, expire=True)
    for n in names:
        wait_phase(kube, ns, n, "Running")
    for i, n in enumerate(names):
        set_pod(kube, ns, f"{n}-master-0", "Succeeded", 0, '{"status": "completed", "exit_code": 0}')
        if i == 4:
            cuts += cut(faults, refuse_for=2.0)
    for n in names:
        status = wait_phase(kube, ns, n, "Succeeded")
        assert status.get("restartCount", 0) == 0
    assert complete(kube, ns, names, 1)  # nothing recreated after the run ended
    assert cuts >= 4 * 4 + 1  # run, pod, Service, ConfigMap streams (at least) in 4 cuts, + pods
    expired = [s for s in faults.requests("GET") if s.status == 410]
    assert expired, "no watch resumed into a 410: the relist path was not exercised"


def test_search_creates_each_trial_once_when_watch_streams_are_cut(
    installed, proxied: Any, faults: FaultProxy, namespace: str
) -> None:
    kube, ns, name = installed, namespace, "cut-search"
    values = [0.001, 0.002, 0.003, 0.004]
    spec_ = {
        "trialTemplate": template(),
        "searchSpace": [{"path": "training.learningRate", "values": values}],
        "budget": {"parallelTrials": 2},
    }
    create_search(kube, ns, name, spec_)
    cut(faults)  # while the first trials are created
    done: set[str] = set()
    while len(done) < len(values):
        trial = next_trial_with_pod(kube, ns, name, done)
        trial_name = trial["metadata"]["name"]
        if len(done) % 2:  # only the trials' stream, resumed into 410: the search must see the
            cut(faults, "/trainingruns$", refuse_for=1.0, expire=True)  # re-listing alone
        else:  # every stream, the search's too
            cut(faults, refuse_for=1.0)
        succeed(kube, ns, trial_name, 10, 1.0 + len(done))
        done.add(trial_name)
    status = wait_search_phase(kube, ns, name, "Succeeded")
    runs = trials(kube, ns, name)
    assert sorted(params(t)["training.learningRate"] for t in runs) == values
    assert {t["metadata"]["name"] for t in runs} == done
    assert status["trialCounts"]["total"] == len(values)
    creates = [s for s in faults.requests("POST", rf"/namespaces/{ns}/trainingruns$") if s.status == 201]
    assert len(creates) == len(values)


def test_a_child_deleted_while_its_watch_cannot_resume_is_recreated(
    installed, proxied: Any, faults: FaultProxy, namespace: str
) -> None:
    """Services and ConfigMaps deleted while their streams are down and can resume only into
    410: their DELETED events are gone for good, and kopf's re-listing does not drop them from its
    indexes. The operator must notice (a fresh LIST) and recreate them."""
    kube, ns = installed, namespace
    names = [f"ghost-{i}" for i in range(4)]
    for n in names:
        create_run(kube, ns, n, spec(nodes=1))
    wait_for(lambda: complete(kube, ns, names, 1), timeout=60, interval=0.5, what="pod + children per run")
    deleted = names[:3]  # ghost-3 keeps its children: the re-listing shows a known object
    old = {n: kube.core.read_namespaced_service(n, ns).metadata.uid for n in deleted}
    cut(faults, "/(services|configmaps)$", refuse_for=3.0, expire=True)
    for n in deleted:
        kube.core.delete_namespaced_service(n, ns)
        kube.core.delete_namespaced_config_map(f"{n}-config", ns)

    def recreated() -> bool:
        return all(kube.core.read_namespaced_service(n, ns).metadata.uid != old[n] for n in deleted)

    wait_for(recreated, timeout=30, interval=0.5, what="every deleted Service recreated")
    wait_for(lambda: complete(kube, ns, names, 1), timeout=30, interval=0.5, what="children owned again")
    assert [s for s in faults.requests("GET", "/(services|configmaps)$") if s.status == 410]


def test_search_creates_each_trial_once_when_creates_fail_or_their_answer_is_lost(
    installed, proxied: Any, faults: FaultProxy, namespace: str
) -> None:
    """Trial creates answered 500 (not created), then 503 after the API server created the trial
    (the answer is lost): every trial exists exactly once, with its own parameters."""
    kube, ns, name = installed, namespace, "flaky-search"
    values = [0.001, 0.002, 0.003]
    runs_path = rf"/namespaces/{ns}/trainingruns$"
    failed = faults.inject("POST", runs_path, 500, times=2)
    lost = faults.inject("POST", runs_path, 503, times=2, after_forward=True)
    spec_ = {
        "trialTemplate": template(),
        "searchSpace": [{"path": "training.learningRate", "values": values}],
        "budget": {"parallelTrials": 3},
    }
    create_search(kube, ns, name, spec_)
    done: set[str] = set()
    while len(done) < len(values):
        trial = next_trial_with_pod(kube, ns, name, done)
        succeed(kube, ns, trial["metadata"]["name"], 10, 1.0 + len(done))
        done.add(trial["metadata"]["name"])
    status = wait_search_phase(kube, ns, name, "Succeeded")
    assert (failed.injected, lost.injected) == (2, 2)
    runs = trials(kube, ns, name)
    assert sorted(params(t)["training.learningRate"] for t in runs) == values
    assert status["trialCounts"]["total"] == len(values)
    created = [s for s in faults.requests("POST", runs_path) if s.upstream == 201]
    assert len(created) == len(values)  # the API server made each trial once
