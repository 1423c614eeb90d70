"""The search report from a status built by the engine: the seed's statistics per rung, top 5,
heatmap cells and files (expected numbers computed by hand)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from kubearch_operator.search.api import ArchitectureSearchStatus, parse_search_spec
from kubearch_operator.search.engine import TrialObservation, step
from kubearch_operator.search.report import build_report, render_markdown, write_report

SPEC = parse_search_spec(
    {
        "trialTemplate": {"model": {"architecture": "dense"}, "resources": {"gpusPerNode": 0}},
        "searchSpace": [
            {"path": "model.size", "values": ["tiny", "small"]},
            {"path": "model.attention", "values": ["baseline", "rope_only"]},
        ],
        "algorithm": {"name": "grid", "rungs": [10, 20]},
        "budget": {"parallelTrials": 4, "maxFailedTrials": 2},
    }
)
#: rung 0 and rung 1 objectives per configuration (tiny/baseline, tiny/rope_only, small/..., ...);
#: None: the trial fails.
VALUES = {0: (4.0, 3.5), 1: (3.0, 2.5), 2: (5.0, None), 3: (2.0, 1.5)}


def _status() -> ArchitectureSearchStatus:
    status, observed, t = ArchitectureSearchStatus(), {}, datetime(2026, 11, 29, tzinfo=UTC)
    for rung in (0, 1, 2):
        t += timedelta(minutes=1)
        d = step("r", SPEC, status, observed, t)
        status = d.status
        for trial in d.create:
            config = int(trial.labels["kubearch.dev/trial-config"])
            value = VALUES[config][rung]
            acc = {"valAccuracy": 0.1 * (rung + 1), "timeSeconds": 60.0 * (rung + 1)}
            if value is None:
                observed[trial.name] = TrialObservation(trial.name, "Failed", {}, "NaNAbort")
            else:
                observed[trial.name] = TrialObservation(trial.name, "Succeeded", {"valLoss": value, **acc})
    assert status.phase == "Succeeded"
    return status


def test_report_has_the_seeds_statistics_and_tables(tmp_path: Path) -> None:
    report = build_report("r", SPEC, _status(), None)
    r0, r1 = report["rungs"]
    assert (r0["steps"], r0["succeeded"], r0["failed"], r0["successRate"]) == (10, 4, 0, 1.0)
    assert (r1["steps"], r1["succeeded"], r1["failed"], r1["successRate"]) == (20, 3, 1, 0.75)
    assert [e["objective"] for e in r0["top"]] == [2.0, 3.0, 4.0, 5.0]
    assert [e["objective"] for e in r1["top"]] == [1.5, 2.5, 3.5]
    assert r1["metrics"]["timeSeconds"] == {"mean": 120.0, "std": 0.0}
    heat = report["heatmap"]
    assert (heat["y"], heat["x"]) == ("model.size", "model.attention")
    assert heat["panels"][0]["values"] == [[4.0, 3.0], [5.0, 2.0]]
    assert heat["panels"][1]["values"] == [[3.5, 2.5], [None, 1.5]]
    assert report["best"]["parameters"] == {"model.size": "small", "model.attention": "rope_only"}
    assert [c["valLossByRung"] for c in report["curves"][:1]] == [[[10, 2.0], [20, 1.5]]]
    md = render_markdown(report)
    assert "## Rung 0 (10 steps)" in md and "**Successful configurations**: 4/4 (100.0%)" in md
    assert "**valLoss**: 3.5000 ± 1.1180 (range: 2.0000-5.0000)" in md
    assert "**Successful configurations**: 3/4 (75.0%)" in md
    assert "**valLoss**: 2.5000 ± 0.8165 (range: 1.5000-3.5000)" in md
    assert "**Accuracy**: 0.2000 ± 0.0000" in md
    paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
