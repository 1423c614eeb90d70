"""DDP on 2 CPU processes for the image families whose forward talks to the other ranks.

The VQ-VAE all-reduces codebook usage and EMA statistics inside ``forward`` and broadcasts
restarted codes; a mismatch in those collectives would hang or crash here rather than in a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["vq_vae"])
def test_image_family_trains_on_two_ranks(arch: str, tmp_path: Path) -> None:
    config = {
        "model": {
            "architecture": arch,
            "imageSize": 16,
            "dModel": 8,
            "latentDim": 4,
            "codebookSize": 16,
            "deadCodeSteps": 2,
        },
        "training": {
            "stepsPerEpoch": 4,
            "batchSize": 4,
            "evalEvery": 0,
            "evalBatches": 2,
            "device": "cpu",
            "outputDir": str(tmp_path / "run"),
            "regulation": {"enabled": True},
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run(
        [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "kubearch_trainer", "--config", str(path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["world_size"] == 2
    assert results["steps"] == 4
