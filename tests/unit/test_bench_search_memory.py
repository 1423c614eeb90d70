"""bench/search_memory_plan.py in --quick mode on CPU: result files, and estimate within 2% of the
bytes autograd saves for a seed-like model with the GPT-2 vocabulary."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_search_memory_plan_quick(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        bench = importlib.import_module("search_memory_plan")
        assert bench.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    finally:
        sys.path.remove(str(BENCH))
    (json_path,) = tmp_path.glob("search_memory_plan-*.json")
    rows = json.loads(json_path.read_text())
    assert [r["attention"] for r in rows] == ["baseline", "lora_small"]
    for r in rows:
        assert r["status"] == "ok" and r["kind"] == "autograd_saved_bytes"
        assert 0.98 <= r["measured_over_estimated"] <= 1.02, r
        assert r["estimated_over_24gib"] is False
    assert json_path.with_suffix(".md").exists()
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
