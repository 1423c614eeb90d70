"""What held in issue 9's outside probe, kept as regression tests: a long API-server outage, an
etcd outage under a running API server, and a mass deletion.

Each runs the real operator process against the local control plane. The only sleeps are the
outages' own lengths (inside ``ControlPlane.restart_*``); everything else waits on a condition.
The figures the README quotes come from the ``print`` lines (``pytest -s``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from controlplane import wait_for
from kubernetes.client.rest import ApiException
from test_operator_integration import GROUP, PLURAL, VERSION, create_run, pods, spec, wait_pods

#: kopf's client retrying a request (its watch streams, the peering keep-alive) while the API
#: server is away: one line per attempt, from kopf's logger.
KOPF_RETRY = re.compile(r"Request attempt #\d+ failed; will retry")


def _plane(kube):
    if kube.local is None:
        pytest.skip("stopping the API server or etcd needs the local control plane (not --cluster)")
    return kube.local


def _ride_out(
    kube, operator, ns: str, prefix: str, runs: int, outage: Callable[[], None], what: str
) -> list[str]:
    """``runs`` runs with their pods, then ``outage()``; afterwards the operator must be alive, a
    new run must get its pod, the old runs must keep exactly theirs, and the operator's log must
    hold no traceback and nothing about the old runs. Returns its WARNING/ERROR lines."""
    for i in range(runs):
        create_run(kube, ns, f"{prefix}-{i}", spec(nodes=1))
    for i in range(runs):
        wait_pods(kube, ns, f"{prefix}-{i}", 1)
    before = operator.log_path.read_text(errors="replace")
    outage()
    back = time.monotonic()
    create_run(kube, ns, "after-outage", spec(nodes=1))
    wait_pods(kube, ns, "after-outage", 1, timeout=90)
    print(f"\n{what}: a new run had its pod {time.monotonic() - back:.1f} s after the return")
    assert operator.proc is not None and operator.proc.poll() is None, "the operator died"
    during = operator.log_path.read_text(errors="replace")[len(before) :]
    assert "Traceback" not in during, during[-3000:]
    lines = [ln for ln in during.splitlines() if re.search(r"ERROR|WARNING", ln)]
    assert not any(f"{prefix}-" in ln for ln in lines), "\n".join(ln for ln in lines if f"{prefix}-" in ln)
    for i in range(runs):  # left alone: still exactly their one pod
        assert len(pods(kube, ns, f"{prefix}-{i}")) == 1
    return lines


def test_a_90_second_api_server_outage_the_operator_rides_out(installed, operator, namespace: str) -> None:
    """90 s without an API server (kopf's watches exhaust their first back-offs): the operator
    stays up, logs nothing per idle run and no traceback, and a new run gets its pod."""
    plane = _plane(installed)
    lines = _ride_out(
        installed, operator, namespace, "idle", 10, lambda: plane.restart_apiserver(down_seconds=90),
        "90 s API-server outage",
    )  # fmt: skip
    # All that is logged is kopf's own retrying of its few streams (one line per stream per
    # attempt, with back-off): idle runs make no request, so no reconcile pass has anything to say.
    others = [ln for ln in lines if not KOPF_RETRY.search(ln)]
    assert not others, "\n".join(others[-40:])
    assert lines, "kopf's watch streams retried silently: is the operator's log captured?"


def test_an_etcd_outage_under_a_running_api_server(installed, operator, namespace: str) -> None:
    """etcd down 20 s while kube-apiserver keeps serving (errors, stalled watch caches): the
    operator stays up, its runs are untouched, and a run created afterwards gets its pod."""
    plane = _plane(installed)
    _ride_out(
        installed, operator, namespace, "held", 5, lambda: plane.restart_etcd(down_seconds=20),
        "20 s etcd outage",
    )  # fmt: skip


def test_fifty_runs_deleted_at_once_leave_no_child(installed, operator, namespace: str) -> None:
    """50 runs (a pod, Service and ConfigMap each) deleted together: every child is garbage
    collected through its ownerReference — no finalizer holds a run, nothing is left behind."""
    kube, ns = installed, namespace
    names = [f"mass-{i:02d}" for i in range(50)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: create_run(kube, ns, n, spec(nodes=1)), names))
    selector = "app.kubernetes.io/name=kubearch"

    def children() -> tuple[int, int, int]:
        return (
            len(kube.core.list_namespaced_pod(ns, label_selector=selector).items),
            len(kube.core.list_namespaced_service(ns, label_selector=selector).items),
            len(kube.core.list_namespaced_config_map(ns, label_selector=selector).items),
        )

    wait_for(lambda: children() == (50, 50, 50), timeout=120, interval=0.5, what="50 runs' children")
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda n: kube.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, n, propagation_policy="Background"
                ),
                names,
            )
        )
    wait_for(
        lambda: not kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"],
        timeout=60,
        interval=0.5,
        what="the 50 runs gone",
    )
    wait_for(lambda: children() == (0, 0, 0), timeout=120, interval=0.5, what="every child collected")
    took = time.monotonic() - started
    print(f"\n50 runs deleted at once: every pod, Service and ConfigMap gone {took:.1f} s later")


def test_deleting_a_namespace_with_runs_logs_no_retries(installed, operator, namespace: str) -> None:
    """The namespace controller deletes a namespace's children before its runs; a run's pass that
    recreates a Service in the terminating namespace gets 403 NamespaceTerminating. That is the
    end of the run, not an error to retry and warn about every back-off step."""
    kube, ns = installed, namespace
    names = [f"ns-gone-{i}" for i in range(5)]
    for n in names:
        create_run(kube, ns, n, spec(nodes=1))
    for n in names:
        wait_pods(kube, ns, n, 1)
    before = operator.log_path.read_text(errors="replace")
    kube.core.delete_namespace(ns)

    def namespace_gone() -> bool:
        try:
            kube.core.read_namespace(ns)
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(namespace_gone, timeout=120, interval=0.5, what=f"namespace {ns} deleted")
    during = operator.log_path.read_text(errors="replace")[len(before) :]
    noisy = [ln for ln in during.splitlines() if "ns-gone-" in ln and re.search(r"WARNING|ERROR", ln)]
    assert not noisy, "\n".join(noisy[:20])
