"""``kubearch compare``: runs each architecture the same way and writes table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubearch_trainer.cli import run_kubearch
from kubearch_trainer.compare import markdown_table, row_from_results
from kubearch_trainer.exit_codes import ExitCode

HEADER = "| Architecture | Time | Memory | Final Loss | Tokens/sec | NaN count | Notes |"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_two_architectures_writes_table_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cmp"
    code = run_kubearch(
        [
            "compare",
            "--architectures",
            "dense,moe",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--seq-len",
            "16",
            "--device",
            "cpu",
            "--eval-batches",
            "2",
            "--output-dir",
            str(out),
            "--extra",
            "--d-model 32 --n-layers 1 --n-heads 2 --d-ff 64 --num-experts 4",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert HEADER in printed
    md = (out / "comparison.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Arch")]
    assert [r.split("|")[1].strip() for r in table_rows] == ["dense", "moe"]
    assert "baseline" in table_rows[0] and "active" in table_rows[1] and "vs dense" in table_rows[1]
    report = json.loads((out / "comparison.json").read_text())
    rows = report["rows"]
    assert [r["architecture"] for r in rows] == ["dense", "moe"]
    assert all(r["status"] == "completed" and r["steps"] == 4 and r["nan_count"] == 0 for r in rows)
    # Same protocol for every run: same tokens seen, same effective batch.
    assert rows[0]["tokens"] == rows[1]["tokens"] == 4 * 4 * 16
    assert report["protocol"]["effective_batch"] == 4
    assert rows[1]["params_active"] < rows[1]["params_total"]
    for r in rows:  # each row's loss is its own run's results.json
        res = json.loads((out / r["architecture"] / "results.json").read_text())
        assert r["final_val_loss"] == res["final_val_loss"] and f"{res['final_val_loss']:.4f}" in md
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_failed_runs_show_in_the_table() -> None:
    ok = row_from_results(
        "dense",
        {
            "status": "completed",
            "task": "lm",
            "train_time_s": 150.0,
            "peak_memory_bytes": 2_500_000_000,
            "peak_memory_kind": "cuda_max_allocated",
            "final_val_loss": 2.5,
            "tokens_per_second": 1000.0,
            "nan_count": 0,
            "parameters": {"total": 3_000_000, "active": 3_000_000},
        },
    )
    oom = row_from_results(
        "moe", {"status": "oom", "task": "lm", "error": "CUDA out of memory", "nan_count": 0}
    )
    fast = row_from_results(
        "mamba",
        {
            "status": "completed",
            "task": "lm",
            "train_time_s": 45.0,
            "peak_memory_bytes": 1_250_000_000,
            "peak_memory_kind": "cuda_max_allocated",
            "final_val_loss": 2.7,
            "tokens_per_second": 2000.0,
            "nan_count": 1,
            "parameters": {"total": 2_000_000, "active": 2_000_000},
        },
    )
    table = markdown_table([ok, oom, fast]).splitlines()
    assert table[0] == HEADER
    assert table[2] == "| dense | 2.5min | 2.50 GB | 2.5000 | 1,000 | 0 | 3.0M params, baseline |"
    assert table[3].startswith("| moe | - | - | - | - | 0 | OOM")
    assert (
        table[4] == "| mamba | 45.0s | 1.25 GB | 2.7000 | 2,000 | 1 | "
        "2.0M params, 2.00x speed, 0.50x memory vs dense |"
    )


def test_bad_architecture_fails_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = run_kubearch(
        ["compare", "--architectures", "dense,transformerxl", "--output-dir", str(tmp_path / "c")]
    )
    assert code == ExitCode.CONFIG_ERROR
    assert "model.architecture" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.timeout(120)
def test_image_tasks_get_their_own_columns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "img"
    code = run_kubearch(
        [
            "compare",
            "--architectures",
            "vae,cnn",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--eval-batches",
            "1",
            "--output-dir",
            str(out),
            "--extra",
            "--d-model 8 --n-layers 1 --image-size 16 --latent-dim 4",
        ]
    )
    assert code == 0
    md = (out / "comparison.md").read_text()
    headers = [line for line in md.splitlines() if line.startswith("| Architecture")]
    assert headers == [
        "| Architecture | Time | Memory | Final Loss | Tokens/sec | NaN count | Recon | KL | MIG | Notes |",
        "| Architecture | Time | Memory | Final Loss | Tokens/sec | NaN count | Accuracy | Notes |",
    ]
    rows = {r["architecture"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    vae = json.loads((out / "vae" / "results.json").read_text())["val_metrics"]
    vae_line = next(line for line in md.splitlines() if line.startswith("| vae |"))
    cells = [c.strip() for c in vae_line.split("|")[1:-1]]
    assert cells[6:9] == [f"{vae['recon_loss']:.2f}", f"{vae['kl']:.2f}", f"{vae['mig']:.3f}"]
    cnn_line = next(line for line in md.splitlines() if line.startswith("| cnn |"))
    assert f"| {rows['cnn']['val_accuracy']:.3f} |" in cnn_line
    assert "Task `image_recon`" in capsys.readouterr().out


def test_codebook_column_prefers_the_validation_perplexity() -> None:
    base = {"status": "completed", "task": "image_recon", "final_val_loss": 100.0, "nan_count": 0}
    vq = row_from_results(
        "vq_vae",
        base
        | {"val_metrics": {"recon_loss": 99.0, "codebook_perplexity": 3.0, "val_codebook_perplexity": 7.5}},
    )
    vae = row_from_results("vae", base | {"val_metrics": {"recon_loss": 90.0, "kl": 4.0}})
    table = markdown_table([vae, vq]).splitlines()
    assert table[0].endswith("| NaN count | Recon | KL | Codebook ppl | Notes |")
    assert "| 90.00 | 4.00 | - |" in table[2] and "| 99.00 | - | 7.5 |" in table[3]
    assert all(line.count("|") == table[0].count("|") for line in table)
