"""MIG: high when each factor lives in its own latent dimension, low for noise or entangled codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubearch_trainer.config import load_config
from kubearch_trainer.data.images import build_image_datasets
from kubearch_trainer.disentanglement import mig_score
from kubearch_trainer.models import build_model


def _factors(n: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(0, k, n) for k in (3, 6, 10, 8)], axis=1)


def test_latents_equal_to_factors_score_high() -> None:
    v = _factors()
    z = v.astype(float) + 0.01 * np.random.default_rng(1).standard_normal(v.shape)
    assert mig_score(z, v) > 0.9


def test_noise_scores_low() -> None:
    v = _factors()
    assert mig_score(np.random.default_rng(2).standard_normal((2000, 6)), v) < 0.05


def test_duplicated_and_mixed_codes_score_low() -> None:
    v = _factors().astype(float)
    duplicated = np.concatenate([v, v], axis=1)  # each factor in two dimensions: no gap
    assert mig_score(duplicated, v.astype(int)) < 0.05
    mixed = v @ np.random.default_rng(3).standard_normal((4, 4))  # rotated: every dim sees every factor
    assert mig_score(mixed, v.astype(int)) < mig_score(v, v.astype(int)) - 0.3


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="latents"):
        mig_score(np.zeros((10, 2)), np.zeros((9, 2), dtype=int))


def test_vae_evaluate_extra_reports_mig_on_shapes() -> None:
    cfg = load_config({"model": {"architecture": "beta_vae", "imageSize": 16, "dModel": 8, "latentDim": 4}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    extra = model.evaluate_extra(build_image_datasets(cfg, "image_recon"), n_batches=2, batch_size=32)
    assert 0.0 <= extra["mig"] <= 1.0 and "active_latents" in extra
    assert extra["sample_nn_distance"] > 0  # sample-quality proxies come along
    digits = load_config(
        {"model": {"architecture": "vae", "imageSize": 16, "dModel": 8}, "data": {"dataset": "digits"}}
    )
    extra = build_model(digits.model).evaluate_extra(build_image_datasets(digits, "image_recon"), n_batches=1)
    assert "mig" not in extra and "sample_std_gap" in extra  # no factors: no MIG, proxies still
