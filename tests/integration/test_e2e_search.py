"""End to end: an ArchitectureSearch whose trials really train, in the cluster and locally, ranked alike.

The manifest is ``examples/search-cpu-small.yaml`` (a tiny dense transformer, dModel 32/64 x
attention baseline/rope_only) with the algorithm set to grid over two rungs of 10 and 30 steps. In
the cluster the operator (a real process) creates the trials as TrainingRuns, the TrainingRun
controller their pods, and :class:`process_kubelet.ProcessKubelet` runs each pod's torchrun + trainer
as local processes; the trainer's summary reaches the TrainingRun's status and the search's
leaderboard. Then the same manifest runs through ``kubearch search -f`` (local processes).

Why the two rankings must agree: both paths run the same ``engine.step`` on the same manifest, and
each trial's TrainingRun spec is the same pure function of the manifest and the trial's record
(``engine.trial_spec``); the trainer therefore gets the same model, data and training config (in
the cluster through the operator's ConfigMap, locally through the runner), the same seed and the
same built-in data, on CPU, in one process. Grid trains every configuration at every rung, so no
promotion depends on which trial happens to finish first (ASHA's asynchronous promotions would,
and the two paths schedule differently). What may differ is float noise from thread counts
(reduction order), orders of magnitude below the gaps between these configurations' losses; so
the orderings are compared, and the losses only loosely.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import REPO, wait_for
from process_kubelet import ProcessKubelet

GROUP, VERSION = "kubearch.dev", "v1alpha1"
NAME = "e2e-search"
SEARCH_TIMEOUT = 600  # seconds for 8 trials, 2 at a time, on a loaded 2-core machine


def manifest() -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "search-cpu-small.yaml").read_text())
    doc["metadata"]["name"] = NAME
    doc["spec"]["algorithm"] = {"name": "grid", "rungs": [10, 30], "seed": 0}
    doc["spec"]["budget"] = {"parallelTrials": 2, "maxFailedTrials": 0}
    return doc


def ranking(entries: list[dict[str, Any]]) -> list[tuple[tuple[str, Any], ...]]:
    return [tuple(sorted(e["parameters"].items())) for e in entries]


def by_rung(trials: list[dict[str, Any]], rung: int) -> list[dict[str, Any]]:
    """A rung's trials, best (lowest valLoss) first."""
    done = [t for t in trials if t["rung"] == rung and t.get("objective") is not None]
    return sorted(done, key=lambda t: t["objective"])


def trial_logs(workdir: Path) -> str:
    out = []
    for log in sorted(workdir.glob("*/trainer.log")):
        out.append(f"--- {log.parent.name} ---\n{log.read_text(errors='replace')[-1500:]}")
    return "\n".join(out)


def test_search_trains_in_the_cluster_and_locally_and_both_rank_alike(
    installed, operator, namespace: str, tmp_path: Path
) -> None:
    doc = manifest()
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(doc))
    kubelet_dir = tmp_path / "kubelet"
    kubelet = ProcessKubelet(
        installed.core, namespace, NAME, kubelet_dir, selector="kubearch.dev/run"
    ).start()
    try:
        installed.kubectl("apply", "-n", namespace, "-f", str(path))
        status = wait_for(
            lambda: (
                (s := installed.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, "architecturesearches", NAME
                ).get("status") or {}).get("phase") in ("Succeeded", "Failed") and s
            ),
            timeout=SEARCH_TIMEOUT,
            interval=1.0,
            what=f"search {NAME} to finish",
        )  # fmt: skip
    finally:
        kubelet.stop()
    assert status["phase"] == "Succeeded", f"{status.get('message')}\n{trial_logs(kubelet_dir)}"
    assert status["trialCounts"]["succeeded"] == 8  # 4 configurations x 2 rungs, every one trained
    table = installed.kubectl("get", "asearch", NAME, "-n", namespace).stdout
    print(f"\n{table}")
    assert table.splitlines()[1].split()[1:4] == ["grid", "8", "8"]

    local_dir = tmp_path / "local"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), str(REPO / "operator")])}
    kubearch = [sys.executable, "-c", "import sys; from kubearch_trainer.cli import main; main(sys.argv[1:])"]
    proc = subprocess.run(
        [
            *kubearch,
            "search",
            "-f",
            str(path),
            "--output-dir",
            str(local_dir),
            "--device",
            "cpu",
            "--no-plot",
        ],
        capture_output=True,
        text=True,
        timeout=SEARCH_TIMEOUT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    local = json.loads((local_dir / "search.json").read_text())
    assert local["status"]["phase"] == "Succeeded"

    cluster_board, local_board = status["leaderboard"], local["leaderboard"]
    for a, b in zip(cluster_board, local_board, strict=False):
        print(
            f"{a['rank']}. cluster {a['parameters']} {a['objective']:.6f}"
            f" | local {b['parameters']} {b['objective']:.6f}"
        )
    assert len(cluster_board) == len(local_board) == 4
    assert ranking(cluster_board) == ranking(local_board), (cluster_board, local_board)
    for rung in (0, 1):
        ours, theirs = by_rung(status["trials"], rung), by_rung(local["status"]["trials"], rung)
        assert [t["parameters"] for t in ours] == [t["parameters"] for t in theirs], rung
        for a, b in zip(ours, theirs, strict=True):  # the same training, up to float noise
            assert a["objective"] == pytest.approx(b["objective"], rel=1e-3), (a, b)
