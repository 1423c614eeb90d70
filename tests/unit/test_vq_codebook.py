"""VQ-VAE codebook: the usage/perplexity metrics and the dead-code restart."""

from __future__ import annotations

import math

import pytest
import torch
from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models import build_model


def _model(dead_code_steps: int = 3, codebook_size: int = 16):
    torch.manual_seed(0)
    cfg = ModelConfig(
        architecture="vq_vae",
        image_size=16,
        d_model=8,
        latent_dim=4,
        codebook_size=codebook_size,
        dead_code_steps=dead_code_steps,
    )
    return build_model(cfg)


def _images(seed: int = 0) -> torch.Tensor:
    return (torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def test_first_training_batch_initialises_the_codebook_from_encoder_outputs() -> None:
    model = _model()
    assert bool(model.dead_codes().all())  # every code starts dead
    model({"images": _images()})
    z = model.encode_continuous(_images()).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    # every code is now (close to) one of the encoder outputs it was drawn from
    nearest = torch.cdist(model.codebook, z).min(dim=1).values
    assert float(nearest.max()) < 0.05
    assert int(model.restarts_total) == 16


def test_usage_and_perplexity_match_the_assignments() -> None:
    model = _model()
    model({"images": _images()})
    model.eval()
    out = model({"images": _images(1)})
    _, idx = model.quantize(model.encode_continuous(_images(1)))
    counts = torch.bincount(idx.flatten(), minlength=16).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    assert out.metrics["codebook_perplexity"].item() == pytest.approx(math.exp(entropy.item()), rel=1e-5)
    assert out.metrics["codebook_usage"].item() == (counts > 0).float().mean().item()
    assert 1.0 <= out.metrics["codebook_perplexity"].item() <= 16.0


def _train_with_exiled_codes(dead_code_steps: int) -> tuple[torch.nn.Module, torch.Tensor, list[float]]:
    model = _model(dead_code_steps=dead_code_steps)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = _images()
    model({"images": images})  # data-dependent init
    exiled = torch.arange(16) % 2 == 0
    with torch.no_grad():
        model.codebook[exiled] = 1e3  # far from every encoder output: never chosen again
        model.ema_embed_sum[exiled] = 1e3
        model.ema_cluster_size[exiled] = 1.0
    usage = []
    for _ in range(8):
        out = model({"images": images})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        usage.append(out.metrics["codebook_usage"].item())
    return model, exiled, usage


def test_dead_code_restart_revives_unused_codes() -> None:
    model, exiled, usage = _train_with_exiled_codes(dead_code_steps=3)
    assert float(model.codebook[exiled].abs().max()) < 100  # re-initialised from encoder outputs
    assert int(model.restarts_total) >= 16 + int(exiled.sum())
    assert max(usage[4:]) > max(usage[:2])  # revived codes get chosen again
    assert model.dead_codes().sum() < int(exiled.sum())


def test_without_restart_exiled_codes_stay_dead() -> None:
    model, exiled, usage = _train_with_exiled_codes(dead_code_steps=10_000)
    assert float(model.codebook[exiled].abs().min()) > 100
    assert max(usage) <= 0.5
