"""DDP on CPU/gloo: 2 torchrun processes x batch 4 reach the parameters of 1 process x batch 8."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ARGS = [
    "--architecture",
    "dense",
    "--d-model",
    "32",
    "--n-layers",
    "2",
    "--n-heads",
    "2",
    "--d-ff",
    "64",
    "--max-seq-len",
    "32",
    "--seq-len",
    "32",
    "--steps-per-epoch",
    "6",
    "--gradient-accumulation-steps",
    "2",
    "--learning-rate",
    "3e-3",
    "--warmup-steps",
    "1",
    "--log-every",
    "3",
    "--eval-every",
    "0",
    "--eval-batches",
    "2",
    "--device",
    "cpu",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    two = subprocess.run(
        [
            *launcher,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "kubearch_trainer",
            *ARGS,
            "--batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "ddp"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubearch_trainer",
            *ARGS,
            "--batch-size",
            "8",
            "--output-dir",
            str(tmp_path / "one"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    r2 = json.loads((tmp_path / "ddp" / "results.json").read_text())
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["tokens"] == r1["tokens"] == 6 * 2 * 8 * 32  # same global batch
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # Training moved the weights (so equality is not that of two untouched initialisations).
    assert abs(r1["final_train_loss"] - r2["final_train_loss"]) < 1e-4
    assert r1["loss_history"][0]["train_loss"] > r1["final_train_loss"]
    # Evaluation is sharded over ranks and all-reduced: same validation loss.
    assert r2["final_val_loss"] == pytest.approx(r1["final_val_loss"], abs=1e-4)
