"""The images `make images` builds really work: run them with docker, no cluster involved."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def test_operator_image_imports_its_handlers_as_a_non_root_user(images) -> None:
    proc = images.run(
        "--entrypoint", "python", images.operator, "-c",
        "import os, kopf, kubearch_operator.handlers; print(os.getuid())",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "65532"
    # The entrypoint is kopf's CLI with the operator's defaults.
    help_text = images.run(images.operator, "--help")
    assert help_text.returncode == 0 and "--peering" in help_text.stdout, help_text.stderr


def test_operator_image_carries_no_torch(images) -> None:
    proc = images.run("--entrypoint", "python", images.operator, "-c", "import torch")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


def test_trainer_image_prints_its_help(images) -> None:
    proc = images.run(images.trainer, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout


def test_trainer_image_trains_a_tiny_model_for_a_few_steps(images, tmp_path: Path) -> None:
    config = {
        "model": {"architecture": "dense", "dModel": 32, "nLayers": 1, "nHeads": 2, "dFf": 64,
                  "maxSeqLen": 32},
        "data": {"seqLen": 32},
        "training": {
            "stepsPerEpoch": 4, "batchSize": 2, "warmupSteps": 1, "evalEvery": 0, "evalBatches": 1,
            "logEvery": 1, "device": "cpu", "outputDir": "/out",
        },
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image runs as uid 65532
    proc = images.run(
        "-v", f"{tmp_path / 'config.yaml'}:/etc/kubearch/config.yaml:ro", "-v", f"{out}:/out",
        images.trainer, "--config", "/etc/kubearch/config.yaml",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 4
    assert results["final_train_loss"] > 0
