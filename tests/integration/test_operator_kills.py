"""SIGKILLs of the operator, as regression tests of what issue 9's outside tester found held.

* 20 SIGKILLs at seeded random moments while 100 runs are created concurrently: every run ends
  with exactly its pods, Service and ConfigMap, owned by it, each created once, nothing else in
  the namespace, and a right status.
* 13 SIGKILLs, one at each stage of a group restart (a pod exits 137, the operator deletes the
  group and creates the next attempt): the operator kills itself at a named point
  (``KUBEARCH_CRASH_AT``, :mod:`kubearch_operator.crashpoint`), since most stages last too short a
  time for a kill timed from outside. Each time ``restartCount`` ends at exactly 1, exactly one new
  group is ever created, and the run reaches Running.

There is no kubelet: the tests write pod status themselves (as test_operator_integration.py), and
watch every pod, Service and ConfigMap of the namespace from the first moment, so an object
created twice, or deleted and created again, is seen even if the end state looks right.

Restarts use ``KUBEARCH_PEERING_LIFETIME=1``: after a SIGKILL, kopf pauses the new process until
the dead one's peering record expires (5 s in the other tests); one second keeps 32 restarts
affordable in CI and still makes every restart go through that pause.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import kubernetes
import pytest
import yaml
from controlplane import wait_for
from test_operator_integration import (
    GROUP,
    PLURAL,
    VERSION,
    cond,
    create_run,
    pods,
    run_status,
    set_pod,
    spec,
    wait_phase,
    wait_pods,
)

FAST = {"KUBEARCH_PEERING_LIFETIME": "1"}
ROOT_CA = "kube-root-ca.crt"  # the ConfigMap kube-controller-manager puts in every namespace


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def killable(operator) -> Iterator[Any]:
    """The session's operator, handed back afterwards as the other tests expect it: running,
    unarmed, with the default peering lifetime."""
    try:
        yield operator
    finally:
        operator.stop()
        operator.start()


class Recorder:
    """Every pod, Service and ConfigMap of a namespace, from watch streams opened before the test
    creates anything: which uids each name ever had, and which were deleted."""

    KINDS: ClassVar[dict[str, str]] = {
        "Pod": "list_namespaced_pod",
        "Service": "list_namespaced_service",
        "ConfigMap": "list_namespaced_config_map",
    }

    def __init__(self, kube: Any, namespace: str) -> None:
        self.uids: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.labels: dict[str, dict[str, str]] = {}
        self.deleted: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._watches: list[kubernetes.watch.Watch] = []
        for kind, method in self.KINDS.items():
            lister = getattr(kube.core, method)
            listed = lister(namespace)
            for obj in listed.items:
                self._record(kind, "ADDED", obj)
            watch = kubernetes.watch.Watch()
            self._watches.append(watch)
            threading.Thread(
                target=self._follow,
                args=(watch, kind, lister, namespace, listed.metadata.resource_version),
                daemon=True,
            ).start()

    def _follow(self, watch: Any, kind: str, lister: Any, namespace: str, rv: str) -> None:
        try:
            for event in watch.stream(lister, namespace, resource_version=rv, timeout_seconds=900):
                self._record(kind, event["type"], event["object"])
        except Exception:  # the control plane went away after the test (its teardown)
            return

    def _record(self, kind: str, type_: str, obj: Any) -> None:
        key, uid = (kind, obj.metadata.name), obj.metadata.uid
        with self._lock:
            if uid not in self.uids[key]:
                self.uids[key].append(uid)
                self.labels[uid] = dict(obj.metadata.labels or {})
            if type_ == "DELETED":
                self.deleted.append(key)

    def created(self, kind: str) -> dict[str, list[str]]:
        """name -> the uids it had, for one kind (the namespace's root CA ConfigMap left out)."""
        with self._lock:
            return {n: list(u) for (k, n), u in self.uids.items() if k == kind and n != ROOT_CA}

    def stop(self) -> None:
        for watch in self._watches:
            watch.stop()


def owner_uids(obj: Any) -> list[str]:
    return [o.uid for o in obj.metadata.owner_references or [] if o.controller]


def expected_pods(run: str, nodes: int) -> list[str]:
    return [f"{run}-master-0", *(f"{run}-worker-{i}" for i in range(1, nodes))]


# ------------------------------------------------------------------------------------------------
# 20 kills while 100 runs are created
# ------------------------------------------------------------------------------------------------
RUNS, KILLS, SEED = 100, 20, 9


def test_twenty_sigkills_while_a_hundred_runs_are_created_leave_no_duplicate_or_missing_child(
    installed, killable, namespace: str
) -> None:
    kube, ns, operator = installed, namespace, killable
    rng = random.Random(SEED)
    names = [f"burst-{i:03d}" for i in range(RUNS)]
    nodes = {n: 2 if i % 3 == 0 else 1 for i, n in enumerate(names)}  # partial groups are possible
    seen = Recorder(kube, ns)
    batch = RUNS // KILLS
    with ThreadPoolExecutor(max_workers=4) as creators:
        creations = []
        for k in range(KILLS):
            creations += [
                creators.submit(create_run, kube, ns, n, spec(nodes=nodes[n]))
                for n in names[k * batch : (k + 1) * batch]
            ]
            time.sleep(rng.uniform(0.0, 1.5))  # the kill's moment: random on purpose, not a wait
            operator.stop(signal.SIGKILL)
            operator.start(**FAST)
        for creation in creations:
            creation.result()
    uids = {
        n: kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, n)["metadata"]["uid"]
        for n in names
    }

    def settled() -> bool:
        for n in names:
            status = run_status(kube, ns, n)
            active = sum(r.get("active", 0) for r in (status.get("replicaStatuses") or {}).values())
            if status.get("phase") != "Created" or active != nodes[n] or len(pods(kube, ns, n)) != nodes[n]:
                return False
        return True

    wait_for(settled, timeout=90, interval=0.5, what="every run Created, its pods all there and counted")
    want_pods = {p: n for n in names for p in expected_pods(n, nodes[n])}
    wait_for(  # the recording has caught up with the end state, so "created once" below means it
        lambda: (
            set(seen.created("Pod")) >= set(want_pods)
            and set(seen.created("Service")) >= set(names)
            and set(seen.created("ConfigMap")) >= {f"{n}-config" for n in names}
        ),
        timeout=30,
        what="the watches to show every final object",
    )
    seen.stop()

    # Exactly the expected objects, each owned by its run (a pod of another run, a Service left
    # from nowhere, a second ConfigMap: all would show here).
    live_pods = kube.core.list_namespaced_pod(ns).items
    assert sorted(p.metadata.name for p in live_pods) == sorted(want_pods)
    for pod in live_pods:
        run = want_pods[pod.metadata.name]
        assert owner_uids(pod) == [uids[run]], pod.metadata.name
        assert pod.metadata.labels["kubearch.dev/attempt"] == "0", pod.metadata.name
    services = kube.core.list_namespaced_service(ns).items
    assert sorted(s.metadata.name for s in services) == names
    assert all(owner_uids(s) == [uids[s.metadata.name]] for s in services)
    configmaps = [c for c in kube.core.list_namespaced_config_map(ns).items if c.metadata.name != ROOT_CA]
    assert sorted(c.metadata.name for c in configmaps) == [f"{n}-config" for n in names]
    assert all(owner_uids(c) == [uids[c.metadata.name.removesuffix("-config")]] for c in configmaps)

    # Each created once: no name ever had a second uid, nothing was deleted on the way.
    for kind in ("Pod", "Service", "ConfigMap"):
        twice = {n: u for n, u in seen.created(kind).items() if len(u) != 1}
        assert not twice, f"{kind}s created more than once: {twice}"
    assert not seen.deleted, f"deleted on the way: {seen.deleted}"

    for n in names:
        status = run_status(kube, ns, n)
        assert status.get("restartCount", 0) == 0, (n, status)
        assert status["message"] == f"created {nodes[n]} pod(s)", (n, status)
        assert cond(status, "Created")["status"] == "True" and cond(status, "SpecValid")["status"] == "True"
        assert "startTime" in status, (n, status)


# ------------------------------------------------------------------------------------------------
# 13 kills, one at each stage of a group restart
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """Where the operator dies, and what the API shows at that moment (checked after the kill, so
    the test knows the stage was really hit): the stored restartCount, how many pods of attempt 0
    and of attempt 1 exist."""

    crash_at: str
    restart_count: int
    old: int
    new: int
    new_running: bool = False  # the kill comes after the new group ran (the test runs it first)
    run_meanwhile: bool = False  # the kubelet starts the new pods while the operator is dead
    also: Callable[[Any, str, str], bool] | None = None


def _configmap_resumes(kube: Any, ns: str, run: str) -> bool:
    data = kube.core.read_namespaced_config_map(f"{run}-config", ns).data["config.yaml"]
    return yaml.safe_load(data)["training"]["resume"] is True


def _event(reason: str) -> Callable[[Any, str, str], bool]:
    def posted(kube: Any, ns: str, run: str) -> bool:
        events = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={run}").items
        return any(e.reason == reason for e in events)

    return posted


def _status_has_new_group(kube: Any, ns: str, run: str) -> bool:
    status = run_status(kube, ns, run)
    return status["replicaStatuses"]["Master"]["active"] == 1 and status["phase"] == "Restarting"


STAGES = [
    Stage("child-event#1", 0, 2, 0),  # the failure's watch event arrived; no pass yet
    Stage("status-write#1", 0, 2, 0),  # a pass decided the restart; nothing written yet
    Stage("status-written#1", 1, 2, 0),  # restartCount 1 stored; the old group untouched
    Stage("pod-deleted#1", 1, 1, 0),  # one old pod deleted, the other not
    Stage("pod-deleted#2", 1, 0, 0),  # the old group gone, the Restarting event not posted
    Stage("event-posted#1", 1, 0, 0, also=_event("Restarting")),  # the restart pass complete
    Stage("configmap-patched#1", 1, 0, 0, also=_configmap_resumes),  # config says resume; no pod
    Stage("pod-created#1", 1, 0, 1),  # one pod of the new group
    # ... and it starts running before the next operator comes: the missing pod was never
    # created, not lost (this one restarted the group again, or failed the run, before the fix)
    Stage("pod-created#1", 1, 0, 1, run_meanwhile=True),
    Stage("pod-created#2", 1, 0, 2),  # the new group created, not yet seen by the watch
    Stage("event-posted#2", 1, 0, 2, also=_event("RestartFromScratch")),  # that pass complete
    Stage("status-written#2", 1, 0, 2, also=_status_has_new_group),  # status counts the new group
    Stage("status-written#3", 1, 0, 2, new_running=True),  # the new group reported Running
]


def _passes(operator: Any) -> float:
    """Reconcile passes of the operator process now running (its own metrics endpoint)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in operator.metrics().splitlines()
        if line.startswith("kubearch_operator_reconcile_total{")
    )


def _start_watching(operator: Any, **env: str) -> None:
    """Start the operator and wait for its first pass: kopf runs none before its pod index is
    filled, so the pod watch is live and the test's next pod change arrives as a watch event
    (``child-event``), not folded into the initial listing."""
    operator.start(**env, **FAST)
    wait_for(lambda: _passes(operator) > 0, timeout=30, what="the operator's first reconcile pass")


def _attempt_pods(kube: Any, ns: str, run: str, attempt: int) -> list[Any]:
    return [p for p in pods(kube, ns, run) if p.metadata.labels["kubearch.dev/attempt"] == str(attempt)]


def _run_group(kube: Any, ns: str, run: str, attempt: int) -> None:
    for pod in wait_pods(kube, ns, run, 2, attempt=attempt):
        set_pod(kube, ns, pod.metadata.name, "Running")


def test_a_sigkill_at_every_stage_of_a_group_restart_restarts_the_group_exactly_once(
    installed, killable, namespace: str
) -> None:
    kube, ns, operator = installed, namespace, killable
    runs = [f"stage-{i:02d}" for i in range(len(STAGES))]
    seen = Recorder(kube, ns)
    # Every run steady (both pods Running) before any is armed: creating a group passes through
    # the same points, and only the restart may reach them.
    for run in runs:
        create_run(kube, ns, run, spec(nodes=2))
    for run in runs:
        _run_group(kube, ns, run, 0)
    for run in runs:
        wait_phase(kube, ns, run, "Running")

    def armed(i: int) -> dict[str, str]:
        """The crash point of stage ``i`` for its own run; the other runs reach no point meanwhile
        (steady, or restarted already and merely recovering)."""
        return {"KUBEARCH_CRASH_AT": f"{STAGES[i].crash_at}@{ns}/{runs[i]}"} if i < len(runs) else {}

    operator.stop()  # graceful: the kills below are the crash points, no other
    _start_watching(operator, **armed(0))
    for i, (run, stage) in enumerate(zip(runs, STAGES, strict=True)):
        set_pod(kube, ns, f"{run}-worker-1", "Failed", 137)  # SIGKILL'd: retryable
        if stage.new_running:
            _run_group(kube, ns, run, 1)
        proc = operator.proc
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the operator did not reach {stage.crash_at} for {run}:\n{operator.log_tail()}")
        assert proc.returncode == -signal.SIGKILL
        assert f"crash point {stage.crash_at} reached for {ns}/{run}: SIGKILL" in operator.log_tail(20)
        # The API shows the stage: nothing runs while the operator is dead.
        stored = run_status(kube, ns, run).get("restartCount", 0)
        counts = (len(_attempt_pods(kube, ns, run, 0)), len(_attempt_pods(kube, ns, run, 1)))
        assert (stored, *counts) == (stage.restart_count, stage.old, stage.new), stage
        assert stage.also is None or stage.also(kube, ns, run), stage
        if stage.run_meanwhile:
            for pod in _attempt_pods(kube, ns, run, 1):
                set_pod(kube, ns, pod.metadata.name, "Running")
        _start_watching(operator, **armed(i + 1))  # recovers this run; armed for the next one
        if not stage.new_running:
            _run_group(kube, ns, run, 1)  # (a pod already running is set Running again: no change)
        wait_phase(kube, ns, run, "Running", timeout=30)
    seen.stop()

    for run in runs:
        status = run_status(kube, ns, run)
        assert status["restartCount"] == 1, (run, status)
        announced = [
            e
            for e in kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={run}").items
            if e.reason == "Restarting"
        ]  # none when the kill lost the pass's event (stages 1-5), never two restarts
        assert len(announced) <= 1 and all("exited 137" in e.message for e in announced), (run, announced)
        created = {n: u for n, u in seen.created("Pod").items() if n.startswith(f"{run}-")}
        by_attempt: dict[str, int] = defaultdict(int)
        for uid in (u for uids in created.values() for u in uids):
            by_attempt[seen.labels[uid]["kubearch.dev/attempt"]] += 1
        assert dict(by_attempt) == {"0": 2, "1": 2}, (run, created)  # one first group, one new group
        assert {p.metadata.name for p in _attempt_pods(kube, ns, run, 1)} == set(expected_pods(run, 2))
