"""The benchmark harness end to end in ``--quick`` mode on CPU: JSON schema, Markdown table, plot.

Proves the result format on every CI run, so the H100 run (which CI never sees) only has to
change the device flag.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        yield {
            name: importlib.import_module(name)
            for name in ("_common", "train_throughput", "attention_window_sweep")
        }
    finally:
        sys.path.remove(str(BENCH))


def _outputs(out_dir: Path, name: str) -> tuple[list[dict], str, Path]:
    (json_path,) = out_dir.glob(f"{name}-*.json")
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    assert md_path.exists() and png_path.exists()
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(json_path.read_text()), md_path.read_text(), json_path


def test_train_throughput_quick(tmp_path: Path, bench_modules, capsys) -> None:
    tt, common = bench_modules["train_throughput"], bench_modules["_common"]
    argv = ["--quick", "--architectures", "dense,moe", "--steps", "2", "--out-dir", str(tmp_path),
            "--device-label", "cpu (test)"]  # fmt: skip
    assert tt.main(argv) == 0
    rows, md, json_path = _outputs(tmp_path, "train_throughput")
    assert "cpu-test" in json_path.name
    assert [r["architecture"] for r in rows] == ["dense", "moe"]
    for row in rows:
        missing = [f for f in common.REQUIRED_FIELDS if f not in row]
        assert not missing, missing
        assert row["status"] == "ok"
        assert row["device"] == "cpu (test)" and row["seq_len"] == 32 and row["batch_size"] == 2
        assert row["tokens_per_s"] == pytest.approx(64 / row["step_time_s"])
        assert 0 < row["mfu"] < 1e-3  # a CPU against the H100's peak
        assert row["estimated_memory_bytes"] > 12 * row["params"]  # weights + grads + AdamW at least
        assert row["flops_per_token"] > 6 * row["active_params"] * 0.5  # 6·N_active minus position table
        assert row["date"][:4].isdigit() and row["torch"] and row["commit"]
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| Arch | Size | Seq | Batch |")
    assert len(lines) == 2 + len(rows)
    assert "python bench/train_throughput.py --quick" in md


def test_attention_sweep_quick(tmp_path: Path, bench_modules) -> None:
    sweep = bench_modules["attention_window_sweep"]
    assert sweep.main(["--quick", "--steps", "2", "--out-dir", str(tmp_path)]) == 0
    rows, md, _ = _outputs(tmp_path, "attention_window_sweep")
    impls = {r["architecture"] for r in rows}
    assert impls == {"sdpa_causal", "sdpa_window_mask"}  # FlexAttention only on CUDA
    assert {r["seq_len"] for r in rows} == {64, 128, 256}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    assert md.count("\n| sdpa_") == len(rows)


def test_ddp_world_size_one_runs_on_gloo(tmp_path: Path, bench_modules) -> None:
    import torch.distributed as dist

    tt = bench_modules["train_throughput"]
    argv = ["--quick", "--architectures", "dense", "--steps", "2", "--ddp", "--out-dir", str(tmp_path)]
    try:
        assert tt.main(argv) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    rows, _, _ = _outputs(tmp_path, "train_throughput")
    assert rows[0]["ddp"] is True and rows[0]["status"] == "ok"


def test_unregistered_architecture_is_reported_not_fatal(bench_modules) -> None:
    tt = bench_modules["train_throughput"]
    args = tt.parse_args(["--quick"])
    conf = {"architecture": "no_such_arch", "size": "tiny", "seq_len": 32, "batch_size": 2, "dims": {}}
    row = tt.measure(conf, args, __import__("torch").device("cpu"))
    assert row["status"].startswith("unavailable") and row["tokens_per_s"] is None


def test_markdown_formatting(bench_modules) -> None:
    common = bench_modules["_common"]
    table = common.markdown_table(
        [{"a": 1234567, "b": 0.5123, "c": None, "d": 2.5e-9}],
        [("a", "A"), ("b", "B"), ("c", "C"), ("d", "D")],
    )
    assert table.splitlines()[2] == "| 1,234,567 | 0.512 | – | 2.5e-09 |"


@pytest.mark.slow
def test_ddp_cpu_scaling_quick_runs_the_trainer_under_torchrun(tmp_path: Path, bench_modules) -> None:
    common = bench_modules["_common"]
    scaling = importlib.import_module("ddp_cpu_scaling")
    assert scaling.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    rows, md, _ = _outputs(tmp_path, "ddp_cpu_scaling")
    assert [r["nproc"] for r in rows] == [1, 2]
    assert [r["world_size"] for r in rows] == [1, 2]  # read back from the trainer's results.json
    assert [r["batch_size"] for r in rows] == [2, 4]  # weak scaling: per-process batch kept
    for row in rows:
        assert not [f for f in common.REQUIRED_FIELDS if f not in row]
        assert row["samples_per_s"] == pytest.approx(row["tokens_per_s"] / row["seq_len"])
    assert rows[0]["speedup"] == 1.0
    assert "| Model | Size | Processes |" in md
