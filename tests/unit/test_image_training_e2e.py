"""Every non-sequence family runs through the real train loop (with 2π regulation on) to results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubearch_trainer.config import load_config
from kubearch_trainer.trainer import train

EXPECTED_VAL = {
    "vae": {"recon_loss", "kl"},
    "beta_vae": {"recon_loss", "kl"},
    "vq_vae": {"recon_loss", "codebook_perplexity", "codebook_usage"},
    "hierarchical_vae": {"recon_loss", "kl", "kl_l1", "kl_l2"},
    "ddpm": {"mse"},
    "latent_diffusion": {"mse", "recon_loss"},
    "cnn": {"accuracy"},
    "lstm": {"accuracy"},
    "gru": {"accuracy"},
    "rnn": {"accuracy"},
}


@pytest.mark.parametrize("arch", list(EXPECTED_VAL))
def test_family_trains_end_to_end(arch: str, tmp_path: Path) -> None:
    model = {
        "architecture": arch,
        "d_model": 32 if arch in ("lstm", "gru", "rnn") else 8,
        "n_layers": 1,
        "image_size": 16,
        "latent_dim": 4,
        "codebook_size": 16,
        "diffusion_timesteps": 50,
        "ddim_steps": 4,
        "max_seq_len": 64,
    }
    training = {
        "steps_per_epoch": 3,
        "batch_size": 4,
        "eval_every": 0,
        "eval_batches": 1,
        "log_every": 1,
        "device": "cpu",
        "output_dir": str(tmp_path),
        "regulation": {"enabled": True, "warmup_steps": 0},
    }
    cfg = load_config({"model": model, "data": {"seq_len": 32}, "training": training})
    results = train(cfg, log=lambda _: None)
    assert results["status"] == "completed", results.get("error")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert EXPECTED_VAL[arch] <= set(on_disk["val_metrics"])
    assert on_disk["steps"] == 3


def test_vq_vae_resume_is_exact(tmp_path: Path) -> None:
    """Codebook buffers (EMA statistics, last-used steps) and the regulator's EMAs survive a resume."""

    def cfg(out: Path, resume: bool = False):
        return load_config(
            {
                "model": {
                    "architecture": "vq_vae",
                    "image_size": 16,
                    "d_model": 8,
                    "latent_dim": 4,
                    "codebook_size": 16,
                    "dead_code_steps": 2,
                },
                "training": {
                    "steps_per_epoch": 6,
                    "batch_size": 4,
                    "eval_every": 0,
                    "eval_batches": 1,
                    "device": "cpu",
                    "output_dir": str(out),
                    "resume": resume,
                    "regulation": {"enabled": True, "warmup_steps": 0},
                },
            }
        )

    straight = train(cfg(tmp_path / "a"), log=lambda _: None)
    train(cfg(tmp_path / "b"), stop_after=3, log=lambda _: None)
    resumed = train(cfg(tmp_path / "b", resume=True), log=lambda _: None)
    assert resumed["status"] == straight["status"] == "completed"
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert "codebook" in a and "code_last_used" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
