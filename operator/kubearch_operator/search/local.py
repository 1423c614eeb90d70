"""``kubearch search`` and ``kubearch report``: the ArchitectureSearch without Kubernetes, and its report.

``kubearch search -f SEARCH.yaml`` runs the same manifest the operator runs, with the same
:func:`~kubearch_operator.search.engine.step`: trials are local trainer processes (the runner
``kubearch compare`` uses), at most ``parallelTrials`` at once. The status is written to
``DIR/search.json`` before any trial it plans is started (the engine's contract), so the file
always says what is running. At the end the report (Markdown, JSON, PNG) is written and printed.

``kubearch report NAME`` reads the ArchitectureSearch through the Kubernetes API (kubeconfig or
in-cluster); ``kubearch report --file DIR/search.json`` reads a local run's file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubearch_trainer.config import ConfigError, load_yaml_mapping
from kubearch_trainer.exit_codes import ExitCode

from ..api import TrainingRunSpec
from .api import (
    API_VERSION,
    KIND,
    ArchitectureSearchSpec,
    ArchitectureSearchStatus,
    TrialRecord,
    parse_search_spec,
)
from .engine import TrialObservation, leaderboard, step, trial_metrics, trial_name, trial_spec
from .planner import plan_trial

POLL_SECONDS = 0.2
#: The trainer's checkpoint file (kubearch_trainer.checkpoint.CHECKPOINT_NAME; that module needs torch).
CHECKPOINT_FILE = "checkpoint.pt"


# ------------------------------------------------------------------------------------------ plan
def search_plan(name: str, spec: ArchitectureSearchSpec) -> list[dict[str, Any]]:
    """Every trial the search would start if all configurations ran all rungs, with its memory plan.

    For grid (and asha over a list space) that is the whole search; for random and tpe the first
    ``maxTrials`` configurations proposed from an empty history (tpe: its random startup)."""
    from . import algorithms

    points, _ = algorithms.propose(spec, [], spec.max_trials(), {})
    rows = []
    index = 0
    for config, params in enumerate(points):
        for rung, steps in enumerate(spec.rung_steps()):
            rec = TrialRecord(
                index=index,
                name=trial_name(name, index),
                config=config,
                rung=rung,
                steps=steps,
                parameters=params,
            )
            trial = TrainingRunSpec.model_validate(trial_spec(spec, rec))
            plan = plan_trial(trial, spec.planning)
            rows.append(
                {
                    "trial": rec.name,
                    "config": config,
                    "rung": rung,
                    "steps": steps,
                    "parameters": params,
                    "batchSize": trial.training.batch_size,
                    "gradientAccumulationSteps": trial.training.gradient_accumulation_steps,
                    "plan": plan.as_record(),
                }
            )
            index += 1
    return rows


def summarise_plan(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rung: trials, how many the estimator expects to run out of memory unplanned (estimate
    above the GPU's memory) and planned (above the planned limit), changed, refused, and whether
    every trial kept its effective batch."""
    out = []
    for rung in sorted({r["rung"] for r in rows}):
        rs = [r for r in rows if r["rung"] == rung]
        planned = [r for r in rs if r["plan"].get("planned")]
        gpu = [r["plan"]["gpuMemoryBytes"] for r in planned]
        out.append(
            {
                "rung": rung,
                "steps": rs[0]["steps"],
                "trials": len(rs),
                "planned": len(planned),
                "unplannedOOM": sum(
                    r["plan"]["unplannedBytes"] > g for r, g in zip(planned, gpu, strict=True)
                ),
                "plannedOOM": sum(
                    r["plan"]["fits"] and r["plan"]["estimatedBytes"] > g
                    for r, g in zip(planned, gpu, strict=True)
                ),
                "changed": sum(bool(r["plan"].get("changed")) for r in planned),
                "wontFit": sum(not r["plan"]["fits"] for r in planned),
                "effectiveBatchKept": all(
                    r["plan"]["batchSize"] * r["plan"]["gradientAccumulationSteps"]
                    == r["batchSize"] * r["gradientAccumulationSteps"]
                    for r in planned
                    if r["plan"]["fits"]
                ),
            }
        )
    return out


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def print_plan(name: str, spec: ArchitectureSearchSpec, out=None) -> None:
    out = out or sys.stdout
    rows = search_plan(name, spec)
    paths = [p.path for p in spec.search_space]
    print(f"kubearch search --dry-run: {name}, {spec.algorithm.name}, rungs {spec.rung_steps()}", file=out)
    print(
        "config | rung | steps | " + " | ".join(paths) + " | batch | est. GiB | planned | est. GiB | note",
        file=out,
    )
    for r in rows:
        p = r["plan"]
        planned = f"{p['batchSize']}x{p['gradientAccumulationSteps']}" if p.get("planned") else "-"
        if p.get("gradientCheckpointing") and p.get("changed"):
            planned += "+ckpt"
        note = "won't fit" if p.get("planned") and not p["fits"] else ("changed" if p.get("changed") else "")
        if not p.get("planned"):
            note = p["reason"]
        cells = [
            str(r["config"]),
            str(r["rung"]),
            str(r["steps"]),
            *(str(r["parameters"].get(k)) for k in paths),
            f"{r['batchSize']}x{r['gradientAccumulationSteps']}",
            _gib(p.get("unplannedBytes")),
            planned,
            _gib(p.get("estimatedBytes")),
            note,
        ]
        print(" | ".join(cells), file=out)
    for s in summarise_plan(rows):
        print(
            f"rung {s['rung']} ({s['steps']} steps): {s['trials']} trials; expected OOM without planning "
            f"{s['unplannedOOM']} ({100 * s['unplannedOOM'] / max(1, s['trials']):.0f}%), with planning "
            f"{s['plannedOOM']}; re-sliced {s['changed']}, won't fit {s['wontFit']}, effective batch kept: "
            f"{'yes' if s['effectiveBatchKept'] else 'NO'}",
            file=out,
        )


# ------------------------------------------------------------------------------------------- run
_REASONS = {64: "ConfigError", 65: "DataError", 66: "NaNAbort", 67: "CudaOOM", 124: "Timeout"}


def _reason(code: int) -> str:
    if code < 0:
        return f"Signal{-code}"
    return _REASONS.get(code, f"ExitCode{code}")


def load_manifest(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(name, spec) of an ArchitectureSearch manifest file (a bare spec works too)."""
    p = Path(path)
    raw = load_yaml_mapping(p, "-f", "an ArchitectureSearch manifest")
    if "kind" in raw and raw["kind"] != KIND:
        raise ConfigError(f"kind: {raw['kind']!r} is not {KIND}")
    name = (raw.get("metadata") or {}).get("name") or p.stem.replace("_", "-").lower()
    spec = raw["spec"] if "spec" in raw else {k: v for k, v in raw.items() if k not in ("apiVersion", "kind")}
    return name, spec


class LocalSearch:
    """Drives engine.step with local trainer processes (see the module docstring)."""

    def __init__(
        self,
        name: str,
        spec: ArchitectureSearchSpec,
        out: Path,
        device: str = "auto",
        trial_timeout: float | None = None,
        log=print,
        keep_checkpoints: bool = False,
    ) -> None:
        self.name, self.spec, self.out, self.device = name, spec, out, device
        self.trial_timeout, self.log, self.keep_checkpoints = trial_timeout, log, keep_checkpoints
        self.status = ArchitectureSearchStatus()
        self.procs: dict[str, Any] = {}
        self.done: dict[str, TrialObservation] = {}
        self.t0 = time.time()

    def _observe(self) -> dict[str, TrialObservation]:
        observed = dict(self.done)
        for name, proc in self.procs.items():
            if name in self.done:
                continue
            code = proc.poll()
            if code is None:
                observed[name] = TrialObservation(name, "Running")
                continue
            res = proc.results()
            metrics = trial_metrics(res)
            if "timeSeconds" not in metrics and proc.wall_time is not None:
                metrics["timeSeconds"] = proc.wall_time
            if code == 0:
                obs = TrialObservation(name, "Succeeded", metrics, exit_code=0)
            else:
                err = str(res.get("error") or f"exit code {code}")
                obs = TrialObservation(name, "Failed", metrics, _reason(code), err[:500], code)
            self.done[name] = observed[name] = obs
            if not self.keep_checkpoints:
                # A trial always trains from scratch: its checkpoint (weights + AdamW state, GBs for
                # the seed's large model) is of no further use, and 72 of them would fill a disk.
                (proc.out / CHECKPOINT_FILE).unlink(missing_ok=True)
        return observed

    def _start(self, trial) -> None:
        from kubearch_trainer.runner import TrialProcess

        tdir = self.out / "trials" / trial.name
        tdir.mkdir(parents=True, exist_ok=True)
        config = {k: trial.spec.get(k, {}) for k in ("model", "data", "training")}
        config["training"] = {**config["training"], "outputDir": str(tdir), "device": self.device}
        (tdir / "trial.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        nproc = (trial.spec.get("resources") or {}).get("nprocPerNode") or 1
        proc = TrialProcess(["--config", str(tdir / "trial.yaml")], tdir, nproc, timeout=self.trial_timeout)
        proc.start()
        self.procs[trial.name] = proc
        rec = next(t for t in self.status.trials if t.name == trial.name)
        params = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.parameters.items()
        )
        tr = trial.spec["training"]
        plan = f"; planned: {rec.plan['reason']}" if rec.plan.get("changed") else ""
        self.log(
            f"[{self._clock()}] {trial.name} started: {params}, rung {rec.rung} ({rec.steps} steps), "
            f"batch {tr.get('batchSize', 16)}x{tr.get('gradientAccumulationSteps', 1)}{plan}"
        )

    def _clock(self) -> str:
        return f"{time.time() - self.t0:6.1f}s"

    def _write(self) -> None:
        write_search_json(self.out, self.name, self.spec, self.status)

    def _log_changes(self, before: dict[str, str]) -> None:
        metric = self.spec.objective.metric
        for t in self.status.trials:
            if before.get(t.name) == t.state or t.state in ("Planned", "Created", "Running"):
                continue
            if t.state == "Succeeded":
                took = t.metrics.get("timeSeconds")
                self.log(
                    f"[{self._clock()}] {t.name} succeeded: {metric} {t.objective:.4f}"
                    + (f" ({took:.1f} s)" if took else "")
                )
            elif t.state == "Failed":
                self.log(f"[{self._clock()}] {t.name} failed ({t.reason}): {t.message[:160]}")
            elif t.state == "Stopped":
                self.log(f"[{self._clock()}] {t.name} stopped ({t.reason}) {t.message[:120]}".rstrip())

    def run(self) -> ArchitectureSearchStatus:
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            while True:
                before = {t.name: t.state for t in self.status.trials}
                decision = step(self.name, self.spec, self.status, self._observe(), datetime.now(UTC))
                self.status = decision.status
                self._write()  # the intent is on disk before any trial starts
                self._log_changes(before)
                for name in decision.stop:
                    if name in self.procs:
                        self.procs[name].stop()
                for trial in decision.create:
                    if trial.name not in self.procs:
                        self._start(trial)
                running = [p for n, p in self.procs.items() if n not in self.done and p.running]
                if self.status.phase in ("Succeeded", "Failed"):
                    for p in running:
                        p.stop()
                    break
                if not running and not decision.create:
                    raise RuntimeError(f"search stalled: {self.status.message}")  # an engine bug
                self._wait(running)
                c = self.status.trial_counts
                self.log(
                    f"[{self._clock()}] {c.succeeded} succeeded, {c.failed} failed, {c.stopped} stopped, "
                    f"{c.running + c.created + c.planned} running; {self.status.message.split('; best ')[-1]}"
                    if " best " in self.status.message
                    else f"[{self._clock()}] {self.status.message}"
                )
        except KeyboardInterrupt:
            for p in self.procs.values():
                p.stop()
            raise
        return self.status

    def _wait(self, running: list[Any]) -> None:
        """Until one running trial ends (polling: the processes are our children, no events)."""
        while running and all(p.poll() is None for p in running):
            time.sleep(POLL_SECONDS)

    def histories(self) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for name, proc in self.procs.items():
            hist = proc.results().get("loss_history")
            if isinstance(hist, list):
                out[name] = hist
        return out


def search_object(
    name: str, spec: ArchitectureSearchSpec, status: ArchitectureSearchStatus
) -> dict[str, Any]:
    """The search as an ArchitectureSearch object, plus the full ``leaderboard`` at the top level."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "status": status.model_dump(mode="json", by_alias=True),
        "leaderboard": [
            e.model_dump(mode="json", by_alias=True) for e in leaderboard(spec, status.trials, None)
        ],
    }


def write_search_json(
    out: Path, name: str, spec: ArchitectureSearchSpec, status: ArchitectureSearchStatus
) -> Path:
    path = out / "search.json"
    tmp = path.with_name(f".search.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(search_object(name, spec, status), indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------- CLI
def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", required=True, metavar="SEARCH.yaml", help="ArchitectureSearch manifest")
    p.add_argument("--output-dir", default=None, help="default runs/search/<name>")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="trials' training.device"
    )
    p.add_argument("--dry-run", action="store_true", help="print every trial's memory plan and exit")
    p.add_argument("--trial-timeout", type=float, default=None, help="seconds per trial before it is stopped")
    p.add_argument("--no-plot", action="store_true", help="skip report.png (no matplotlib needed)")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each finished trial's checkpoint.pt (deleted by default)",
    )


def run_search_from_args(ns: argparse.Namespace) -> int:
    try:
        name, raw = load_manifest(ns.file)
        spec = parse_search_spec(raw)
    except ConfigError as err:
        print("kubearch search: config error:\n  " + str(err).replace("\n", "\n  "), file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
    if ns.dry_run:
        print_plan(name, spec)
        return 0
    from .report import build_report, render_markdown, write_report

    out = Path(ns.output_dir or f"runs/search/{name}")
    print(
        f"kubearch search: {name}: {spec.algorithm.name}, rungs {spec.rung_steps()} steps, up to "
        f"{spec.max_trials()} configurations, {spec.budget.parallel_trials} at once; writing {out}",
        flush=True,
    )
    search = LocalSearch(
        name,
        spec,
        out,
        ns.device,
        ns.trial_timeout,
        log=lambda m: print(m, flush=True),
        keep_checkpoints=ns.keep_checkpoints,
    )
    try:
        status = search.run()
    except KeyboardInterrupt:
        print(
            f"\nkubearch search: interrupted; trials stopped, {out / 'search.json'} holds the state",
            flush=True,
        )
        return 130
    report = build_report(name, spec, status, search.histories())
    paths = write_report(report, out, plot=not ns.no_plot)
    print("\n" + render_markdown(report))
    print(f"kubearch search: wrote {out / 'search.json'}, " + ", ".join(str(p) for p in paths))
    return 0 if status.phase == "Succeeded" else int(ExitCode.FAILED)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="ArchitectureSearch name (read through the Kubernetes API)")
    p.add_argument("-n", "--namespace", default=None, help="default: the kubeconfig context's, else default")
    p.add_argument(
        "--file", default=None, metavar="search.json", help="read a kubearch search output instead"
    )
    p.add_argument("--output-dir", default=None, help="write report.json/.md/.png here")
    p.add_argument("--top", type=int, default=10, help="leaderboard rows to print")
    p.add_argument("--no-plot", action="store_true", help="skip report.png")


def fetch_search(name: str, namespace: str | None) -> dict[str, Any]:
    """The ArchitectureSearch object from the API server (kubeconfig, else in-cluster config)."""
    from kubernetes import client, config

    from ..api import GROUP, VERSION
    from .api import PLURAL

    try:
        config.load_kube_config()
        if namespace is None:
            _, active = config.list_kube_config_contexts()
            namespace = (active or {}).get("context", {}).get("namespace")
    except config.ConfigException:
        config.load_incluster_config()
    return client.CustomObjectsApi().get_namespaced_custom_object(
        GROUP, VERSION, namespace or "default", PLURAL, name
    )


def run_report_from_args(ns: argparse.Namespace) -> int:
    from .report import build_report, render_markdown, search_from_object, write_report

    if not ns.file and not ns.name:
        print(
            "kubearch report: config error: give NAME (from the cluster) or --file search.json",
            file=sys.stderr,
        )
        return int(ExitCode.CONFIG_ERROR)
    try:
        obj = json.loads(Path(ns.file).read_text()) if ns.file else fetch_search(ns.name, ns.namespace)
        name, spec, status = search_from_object(obj)
    except (OSError, ValueError) as err:
        print(f"kubearch report: {err}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
    except Exception as err:  # kubernetes ApiException and friends: say what went wrong, no traceback
        why = str(err)
        body = getattr(err, "body", None)
        if getattr(err, "status", None) is not None:
            try:
                why = f"{err.status} {json.loads(body or '{}').get('message') or err.reason}"  # type: ignore[attr-defined]
            except ValueError:
                why = f"{err.status} {err.reason}"  # type: ignore[attr-defined]
        print(f"kubearch report: cannot read ArchitectureSearch {ns.name!r}: {why}", file=sys.stderr)
        return int(ExitCode.FAILED)
    histories = {}
    if ns.file:  # a local search: the trials' results.json lie next to search.json
        for t in status.trials:
            res = Path(ns.file).parent / "trials" / t.name / "results.json"
            if res.exists():
                hist = json.loads(res.read_text()).get("loss_history")
                if isinstance(hist, list):
                    histories[t.name] = hist
    report = build_report(name, spec, status, histories or None)
    print(render_markdown(report, top=ns.top))
    if ns.output_dir:
        paths = write_report(report, Path(ns.output_dir), plot=not ns.no_plot)
        print("kubearch report: wrote " + ", ".join(str(p) for p in paths))
    return 0
