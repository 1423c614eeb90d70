"""Load benchmark of the operator: N TrainingRuns created at once against a real control plane.

A script, not a timed test: it prints and records figures, it asserts nothing. It starts the
project's local control plane (``tests/integration/controlplane.py``: etcd, kube-apiserver,
kube-controller-manager; with ``--kwok`` also kube-scheduler and KWOK fake nodes, so pods are
bound and reach Running), runs the operator as a real process (``python -m kubearch_operator``,
with peering, as deployed) and then:

1. creates ``--runs`` one-pod TrainingRuns at once (``--create-threads`` client threads);
2. measures the time until every run's pod exists (a pod watch, not polling) and, with
   ``--kwok``, until every run is ``Running``;
3. reads the reconcile-duration histogram from the operator's ``/metrics`` (p50/p99 bucket
   bounds: the work of a pass, not a wait for a thread);
4. waits until nothing changes, then measures 60 s at rest: API requests/s from the API
   server's own ``apiserver_request_total`` (``/metrics`` with the admin token; the two scrapes
   themselves are subtracted), the operator's CPU (``/proc/<pid>/stat``) and RSS;
5. with ``--restarts F`` fails the pods of a fraction F of the runs (exit 137: retryable) and
   measures until each of those runs has restarted its group (and, with KWOK, runs again);
6. accounts for every run: phase counts, pods, Services and ConfigMaps.

``--operator-src DIR`` runs another checkout's operator package (e.g. main's, for BEFORE figures)
against the same script. Results: ``bench/results/operator_load-<tag>-<date>.json`` and ``.md``.

    python bench/operator_load.py --runs 1000 --tag after
    python bench/operator_load.py --runs 1000 --kwok --restarts 0.1 --tag after-kwok
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import kubernetes  # noqa: E402
from controlplane import ControlPlane, free_port, missing_binaries, wait_for  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

GROUP, VERSION, PLURAL = "kubearch.dev", "v1alpha1", "trainingruns"
NAMESPACE = "load"
RESULTS = ROOT / "bench" / "results"


def run_spec(kwok: bool) -> dict[str, Any]:
    resources: dict[str, Any] = {"nodes": 1, "gpusPerNode": 0, "cpu": "10m", "memory": "16Mi"}
    if not kwok:  # no scheduler runs: pods stay Pending
        resources["nodeSelector"] = {"kubearch.dev/test-only": "never-schedule"}
    return {
        "model": {"architecture": "dense", "size": "tiny"},
        "training": {"stepsPerEpoch": 10, "device": "cpu"},
        "resources": resources,
        "runPolicy": {"backoffLimit": 3},
    }


def fake_node(name: str) -> dict[str, Any]:
    capacity = {"cpu": "1000", "memory": "4000Gi", "pods": "2000"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
        },
        "status": {"allocatable": capacity, "capacity": capacity, "phase": "Running"},
    }


class Metrics:
    """Scrapes the API server's and the operator's Prometheus text."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.ctx = ssl.create_default_context(cafile=str(plane.workdir / "pki" / "ca.crt"))

    def apiserver(self) -> str:
        req = urllib.request.Request(
            f"{self.plane.server}/metrics", headers={"Authorization": f"Bearer {self.plane.token}"}
        )
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
            return r.read().decode()

    @staticmethod
    def requests_by(text: str) -> dict[tuple[str, str], float]:
        """apiserver_request_total summed by (verb, resource)."""
        out: dict[tuple[str, str], float] = {}
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            value = float(line.rsplit(" ", 1)[1])
            k = (labels.get("verb", ""), labels.get("resource", ""))
            out[k] = out.get(k, 0.0) + value
        return out


def histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets [(le, count)], sum, count) of a prometheus histogram."""
    buckets, total, count = [], 0.0, 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = re.search(r'le="([^"]+)"', line).group(1)  # type: ignore[union-attr]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(f"{name}_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
    return sorted(buckets), total, count


def quantile_bound(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding quantile q (what a histogram can honestly say)."""
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    target = q * buckets[-1][1]
    return next(le for le, c in buckets if c >= target)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Watcher(threading.Thread):
    """Counts, from one watch stream, the first moment each run has a pod / is in a phase.

    Events stay plain dicts (``Watch(return_type="object")``): deserialising every pod into the
    client's ``V1Pod`` model cost the benchmark itself CPU on the two cores the operator and the
    API server are measured on (``bench_cpu_s_until_all_pods`` records what is left).
    """

    def __init__(self, list_fn: Any, key: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.list_fn, self.key, self.args, self.kwargs = list_fn, key, args, kwargs
        self.first: dict[str, float] = {}
        self.latest: dict[str, Any] = {}
        self.stop_flag = False

    def run(self) -> None:
        rv = None
        while not self.stop_flag:
            w = kubernetes.watch.Watch(return_type="object")
            try:
                kwargs = dict(self.kwargs, timeout_seconds=60, allow_watch_bookmarks=False)
                if rv:
                    kwargs["resource_version"] = rv
                for ev in w.stream(self.list_fn, *self.args, **kwargs):
                    obj = ev["object"]
                    rv = obj["metadata"].get("resourceVersion") or rv
                    for k, v in self.key(ev["type"], obj).items():
                        self.latest[k] = v
                        if v and k not in self.first:
                            self.first[k] = time.monotonic()
                    if self.stop_flag:
                        break
            except ApiException as err:
                if err.status == 410:
                    rv = None
            except Exception:
                time.sleep(0.5)


def start_operator(
    plane: ControlPlane, src: Path, workdir: Path, resync: str | None
) -> tuple[subprocess.Popen, int]:
    metrics_port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(plane.kubeconfig),
        "PYTHONPATH": f"{ROOT / 'trainer_image'}:{src}",
        "KUBEARCH_OPERATOR_METRICS_PORT": str(metrics_port),
    }
    if resync is not None:
        env["KUBEARCH_RESYNC_SECONDS"] = resync
    log = open(workdir / "operator.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubearch_operator",
            "--peering=kubearch",
            f"--liveness=http://127.0.0.1:{free_port()}/healthz",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=workdir,
    )
    return proc, metrics_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return r.read().decode()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--kwok", action="store_true", help="fake nodes: pods are bound and reach Running")
    parser.add_argument("--kwok-nodes", type=int, default=10)
    parser.add_argument("--restarts", type=float, default=0.0, help="fraction of runs whose pod fails (137)")
    parser.add_argument("--rest-seconds", type=float, default=60.0)
    parser.add_argument("--create-threads", type=int, default=16)
    parser.add_argument(
        "--operator-src", type=Path, default=ROOT / "operator", help="dir holding kubearch_operator/"
    )
    parser.add_argument(
        "--resync", default=None, help="KUBEARCH_RESYNC_SECONDS for the operator (its default if unset)"
    )
    parser.add_argument("--tag", default="after")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up waiting after this long")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    missing = missing_binaries()
    if missing:
        raise SystemExit(f"missing control-plane binaries {missing}: bash tests/controlplane/build.sh")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kubearch-load-"))
    plane = ControlPlane(workdir / "cp")
    result: dict[str, Any] = {
        "tag": args.tag,
        "runs": args.runs,
        "kwok": args.kwok,
        "restarts_fraction": args.restarts,
        "operator_src": str(args.operator_src),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": shlex.join(
            ["python", "bench/operator_load.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # The machine is shared: the load average says how much else ran meanwhile.
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    proc = None
    try:
        plane.start()

        def kubectl(*a: str) -> subprocess.CompletedProcess:
            cmd = [plane.kubectl, f"--kubeconfig={plane.kubeconfig}", *a]
            return subprocess.run(cmd, check=True, capture_output=True, text=True)

        for name in ("crd-trainingrun.yaml", "namespace.yaml", "rbac.yaml"):
            kubectl("apply", "-f", str(ROOT / "manifests" / name))
        kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/trainingruns.kubearch.dev")
        subprocess.run(
            [
                plane.kubectl,
                f"--kubeconfig={plane.kubeconfig}",
                "apply",
                "-f",
                str(ROOT / "manifests" / "peering.yaml"),
            ],
            capture_output=True,
        )
        kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/clusterkopfpeerings.kopf.dev")
        kubectl("apply", "-f", str(ROOT / "manifests" / "peering.yaml"))
        plane.start_controller_manager()
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=cfg)
        cfg.connection_pool_maxsize = args.create_threads * 2
        api = kubernetes.client.ApiClient(cfg)
        core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        wait_for(
            lambda: core.read_namespaced_service_account("default", NAMESPACE), timeout=60, what="default SA"
        )
        if args.kwok:
            plane.start_scheduler()
            plane.start_kwok()
            nodes = [f"kwok-{i}" for i in range(args.kwok_nodes)]
            for n in nodes:
                core.create_node(fake_node(n))
            wait_for(
                lambda: all(
                    any(
                        c.type == "Ready" and c.status == "True"
                        for c in core.read_node(n).status.conditions or []
                    )
                    for n in nodes
                ),
                timeout=120,
                what="KWOK nodes Ready",
            )
        metrics = Metrics(plane)

        proc, op_port = start_operator(plane, args.operator_src, workdir, args.resync)
        wait_for(lambda: scrape(op_port), timeout=120, what="operator metrics endpoint")
        time.sleep(5)  # peering: the operator announces itself before it handles resources

        def pod_key(_type: str, pod: Any) -> dict[str, Any]:
            run = (pod["metadata"].get("labels") or {}).get("kubearch.dev/run")
            return {run: True} if run and _type != "DELETED" else {}

        def run_key(_type: str, run: dict[str, Any]) -> dict[str, Any]:
            st = run.get("status") or {}
            seen = bool(st.get("replicaStatuses"))
            return {run["metadata"]["name"]: (st.get("phase"), st.get("restartCount", 0), seen)}

        pod_watch = Watcher(
            core.list_namespaced_pod, pod_key, NAMESPACE, label_selector="app.kubernetes.io/name=kubearch"
        )
        run_watch = Watcher(custom.list_namespaced_custom_object, run_key, GROUP, VERSION, NAMESPACE, PLURAL)
        pod_watch.start()
        run_watch.start()
        time.sleep(1)

        names = [f"load-{i:05d}" for i in range(args.runs)]
        spec = run_spec(args.kwok)
        t0, bench_cpu0 = time.monotonic(), time.process_time()

        def create(name: str) -> None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "TrainingRun",
                "metadata": {"name": name},
                "spec": spec,
            }
            for _ in range(20):
                try:
                    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
                    return
                except ApiException as err:
                    if err.status == 409:
                        return
                    time.sleep(1)

        with ThreadPoolExecutor(args.create_threads) as pool:
            list(pool.map(create, names))
        result["create_s"] = round(time.monotonic() - t0, 1)
        print(f"created {args.runs} runs in {result['create_s']} s", flush=True)

        deadline = t0 + args.timeout

        def wait_until(cond: Any, what: str) -> float | None:
            while time.monotonic() < deadline:
                if cond():
                    return round(time.monotonic() - t0, 1)
                time.sleep(0.5)
            print(f"timed out waiting for {what}", flush=True)
            return None

        result["all_pods_s"] = wait_until(lambda: all(n in pod_watch.first for n in names), "all pods")
        # Who was busy: CPU seconds of the operator and of kube-apiserver until then.
        result["operator_cpu_s_until_all_pods"] = round(proc_cpu_seconds(proc.pid), 1)
        result["apiserver_cpu_s_until_all_pods"] = round(
            proc_cpu_seconds(plane.procs["kube-apiserver"].pid), 1
        )
        # The harness shares the two cores: its own CPU (creating runs, parsing two watch streams).
        result["bench_cpu_s_until_all_pods"] = round(time.process_time() - bench_cpu0, 1)
        print(f"all pods after {result['all_pods_s']} s", flush=True)
        if args.kwok:
            result["all_running_s"] = wait_until(
                lambda: all((run_watch.latest.get(n) or (None,))[0] == "Running" for n in names),
                "all Running",
            )
            print(f"all Running after {result['all_running_s']} s", flush=True)
        # Settled: every run's status shows its pod (replicaStatuses), i.e. the operator has
        # handled the pod events too, not only written the first status.
        want = "Running" if args.kwok else "Created"

        def settled() -> bool:
            return all(
                (run_watch.latest.get(n) or (None, 0, False))[0] == want and run_watch.latest[n][2]
                for n in names
            )

        result["settled_s"] = wait_until(settled, "all statuses to show their pods")
        print(f"settled after {result['settled_s']} s", flush=True)
        text = scrape(op_port)
        buckets, total, count = histogram(text, "kubearch_operator_reconcile_duration_seconds")
        result["reconcile_passes"] = int(count)
        result["reconcile_mean_s"] = round(total / count, 4) if count else None
        result["reconcile_p50_le_s"] = quantile_bound(buckets, 0.5)
        result["reconcile_p99_le_s"] = quantile_bound(buckets, 0.99)
        cpu_buckets, cpu_total, cpu_count = histogram(text, "kubearch_operator_reconcile_cpu_seconds")
        if cpu_count:  # the operator's own CPU work per pass (AFTER only: BEFORE has no such metric)
            result["reconcile_cpu_mean_s"] = round(cpu_total / cpu_count, 4)
            result["reconcile_cpu_p50_le_s"] = quantile_bound(cpu_buckets, 0.5)
            result["reconcile_cpu_p99_le_s"] = quantile_bound(cpu_buckets, 0.99)
        _, qt, qc = histogram(text, "kubearch_operator_queue_wait_seconds")
        if qc:
            result["queue_wait_mean_s"] = round(qt / qc, 3)

        if args.restarts > 0:
            victims = names[: max(1, int(args.runs * args.restarts))]
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            status = {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "x",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": 137,
                                "reason": "Error",
                                "startedAt": now,
                                "finishedAt": now,
                            }
                        },
                    }
                ],
            }
            t1 = time.monotonic()
            with ThreadPoolExecutor(args.create_threads) as pool:
                list(
                    pool.map(
                        lambda n: core.patch_namespaced_pod_status(
                            f"{n}-master-0", NAMESPACE, {"status": status}
                        ),
                        victims,
                    )
                )
            want = "Running" if args.kwok else "Created"
            done = None
            while time.monotonic() < deadline:
                if all(
                    (run_watch.latest.get(n) or (None, 0, False))[1] >= 1 and run_watch.latest[n][0] == want
                    for n in victims
                ):
                    done = round(time.monotonic() - t1, 1)
                    break
                time.sleep(0.5)
            result["restarted_runs"] = len(victims)
            result["restart_all_back_s"] = done
            print(f"{len(victims)} group restarts back to {want} after {done} s", flush=True)
            text = scrape(op_port)
            buckets, total, count = histogram(text, "kubearch_operator_reconcile_duration_seconds")
            result["reconcile_p99_le_s_incl_restarts"] = quantile_bound(buckets, 0.99)

        # At rest: let the last events drain, then 60 s of nothing happening.
        time.sleep(15)
        pod_watch.stop_flag = run_watch.stop_flag = True
        time.sleep(1)
        r0, c0 = Metrics.requests_by(metrics.apiserver()), proc_cpu_seconds(proc.pid)
        time.sleep(args.rest_seconds)
        r1, c1 = Metrics.requests_by(metrics.apiserver()), proc_cpu_seconds(proc.pid)
        delta = {k: r1.get(k, 0) - r0.get(k, 0) for k in r1}
        scrapes = 1.0  # the second scrape is counted; the first one was before r0 was read
        total_req = sum(delta.values()) - scrapes
        result["rest_requests_per_s"] = round(total_req / args.rest_seconds, 3)
        ours = {
            k: v
            for k, v in delta.items()
            if k[1]
            in (
                "trainingruns",
                "pods",
                "services",
                "configmaps",
                "events",
                "clusterkopfpeerings",
                "kopfpeerings",
            )
            and v > 0
        }
        result["rest_requests_by_resource"] = {f"{v} {r}": n for (v, r), n in sorted(ours.items())}
        result["rest_operator_requests_per_s"] = round(sum(ours.values()) / args.rest_seconds, 3)
        result["rest_operator_cpu_pct"] = round(100 * (c1 - c0) / args.rest_seconds, 1)
        result["operator_rss_mb"] = round(proc_rss_mb(proc.pid), 1)
        result["loadavg_1m_at_rest"] = round(os.getloadavg()[0], 2)
        print(
            f"at rest: {result['rest_requests_per_s']} req/s total, "
            f"{result['rest_operator_requests_per_s']} operator req/s, "
            f"CPU {result['rest_operator_cpu_pct']}%, RSS {result['operator_rss_mb']} MB",
            flush=True,
        )

        # Every run accounted for.
        runs = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
        phases: dict[str, int] = {}
        for r in runs:
            p = (r.get("status") or {}).get("phase") or "none"
            phases[p] = phases.get(p, 0) + 1
        pods = core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/name=kubearch").items
        svcs = core.list_namespaced_service(NAMESPACE, label_selector="app.kubernetes.io/name=kubearch").items
        cms = core.list_namespaced_config_map(
            NAMESPACE, label_selector="app.kubernetes.io/name=kubearch"
        ).items
        live_pods = [p for p in pods if not p.metadata.deletion_timestamp]
        result["accounted"] = {
            "runs": len(runs),
            "phases": phases,
            "runs_with_a_live_pod": len({p.metadata.labels["kubearch.dev/run"] for p in live_pods}),
            "pods": len(pods),
            "services": len(svcs),
            "configmaps": len(cms),
        }
        print(json.dumps(result["accounted"]), flush=True)
        log_text = (workdir / "operator.log").read_text(errors="replace")
        result["operator_log_lines"] = log_text.count("\n")
        result["operator_log_tracebacks"] = log_text.count("Traceback")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        plane.stop()
    write(result)
    return result


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = result["date"][:10]
    stem = (
        RESULTS / f"operator_load-{result['tag']}-{result['runs']}{'-kwok' if result['kwok'] else ''}-{day}"
    )
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [(k, v) for k, v in result.items() if k not in ("command",)]
    md = [
        f"# operator_load {result['tag']} ({result['runs']} runs)",
        "",
        f"`{result['command']}`",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    md += [f"| {k} | {json.dumps(v) if isinstance(v, dict) else v} |" for k, v in rows]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json/.md", flush=True)


if __name__ == "__main__":
    main()
