"""``kubearch search -f`` end to end on CPU (real trainer processes), ``kubearch report --file``,
``--dry-run`` and a bad manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubearch_trainer.cli import run_kubearch
from kubearch_trainer.exit_codes import ExitCode

TINY = {
    "apiVersion": "kubearch.dev/v1alpha1",
    "kind": "ArchitectureSearch",
    "metadata": {"name": "tiny"},
    "spec": {
        "trialTemplate": {
            "model": {"architecture": "dense", "dModel": 32, "nHeads": 2, "dFf": 64, "maxSeqLen": 32},
            "data": {"seqLen": 32},
            "training": {
                "batchSize": 4,
                "learningRate": 0.003,
                "warmupSteps": 2,
                "evalBatches": 2,
                "logEvery": 2,
            },
            "resources": {"gpusPerNode": 0},
        },
        "searchSpace": [
            {"path": "model.nLayers", "values": [1, 2]},
            {"path": "model.attention", "values": ["baseline", "rope_only"]},
        ],
        "algorithm": {
            "name": "grid",
            "rungs": [4, 8],
            "rungOverrides": [{"training.evalEvery": 2}, {"training.evalEvery": 4}],
        },
        "budget": {"parallelTrials": 2},
    },
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_search_runs_trials_and_writes_a_sorted_leaderboard(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    code = run_kubearch(["search", "-f", str(manifest), "--output-dir", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    search = json.loads((out / "search.json").read_text())
    assert search["kind"] == "ArchitectureSearch" and search["status"]["phase"] == "Succeeded"
    board = search["leaderboard"]
    assert len(board) == 4  # every configuration, at the last rung
    objectives = [e["objective"] for e in board]
    assert objectives == sorted(objectives)
    assert {(e["parameters"]["model.nLayers"], e["parameters"]["model.attention"]) for e in board} == {
        (1, "baseline"),
        (1, "rope_only"),
        (2, "baseline"),
        (2, "rope_only"),
    }
    trials = search["status"]["trials"]
    assert len(trials) == 8 and all(t["state"] == "Succeeded" for t in trials)
    for entry in board:  # each objective is its own trial's final validation loss
        trial_dir = out / "trials" / entry["trial"]
        res = json.loads((trial_dir / "results.json").read_text())
        assert entry["objective"] == res["final_val_loss"] and res["steps"] == entry["steps"] == 8
        assert json.loads((trial_dir / "trial.yaml").read_text())["training"]["stepsPerEpoch"] == 8
        assert not (trial_dir / "checkpoint.pt").exists()  # a finished trial's checkpoint is removed
    rung0 = [t for t in trials if t["rung"] == 0]
    assert all(
        json.loads((out / "trials" / t["name"] / "results.json").read_text())["steps"] == 4 for t in rung0
    )
    stats = search["status"]["rungStatistics"]
    assert [s["steps"] for s in stats] == [4, 8] and all(s["successRate"] == 1.0 for s in stats)
    for name in ("report.md", "report.json"):
        assert (out / name).stat().st_size > 0
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "## Rung 0 (4 steps)" in printed and "## Leaderboard" in printed
    assert f"{board[0]['trial']} started" in printed and f"{board[0]['trial']} succeeded" in printed

    # the offline report reads the same file and ranks the same way
    code = run_kubearch(["report", "--file", str(out / "search.json"), "--output-dir", str(tmp_path / "rep")])
    assert code == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [e["trial"] for e in report["leaderboard"]] == [e["trial"] for e in board]
    assert all(c["history"] for c in report["curves"])  # per-step losses from the trials' results.json


def test_dry_run_prints_the_memory_plan(capsys: pytest.CaptureFixture) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "search-seed-36.yaml"
    assert run_kubearch(["search", "-f", str(example), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "rung 0 (50 steps): 36 trials" in printed and "rung 1 (200 steps): 36 trials" in printed
    # every trial expected to run out of memory (the 9 large ones at batch 32) is re-sliced
    assert "expected OOM without planning 9 (25%), with planning 0" in printed
    changed = [line for line in printed.splitlines() if line.endswith("| changed")]
    assert len(changed) >= 9 and all("| 32x1 |" in line and "| 16x2 |" in line for line in changed)
    assert sum("| large |" in line for line in changed) == 9
    assert "effective batch kept: yes" in printed


def test_bad_manifest_is_refused_with_the_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = json.loads(json.dumps(TINY))
    bad["spec"]["searchSpace"][0]["path"] = "model.nLayer"
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(bad))
    assert run_kubearch(["search", "-f", str(manifest)]) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert "spec.searchSpace[0].path: 'model.nLayer' is not a field" in err and "nLayers" in err
