"""DDIM sampling: shape, range, determinism under a fixed generator, fewer steps than training."""

from __future__ import annotations

import pytest
import torch
from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models import build_model
from kubearch_trainer.models.diffusion import GaussianDiffusion, beta_schedule


def _ddpm(schedule: str = "linear"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        architecture="ddpm",
        image_size=16,
        d_model=8,
        diffusion_timesteps=100,
        ddim_steps=7,
        noise_schedule=schedule,
    )
    model = build_model(cfg).eval()
    with torch.no_grad():  # the output conv is zero-initialised; perturb it so ε̂ depends on x_t
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_sample_shape_range_and_determinism(schedule: str) -> None:
    model = _ddpm(schedule)
    a = model.sample(3, generator=torch.Generator().manual_seed(5))
    b = model.sample(3, generator=torch.Generator().manual_seed(5))
    c = model.sample(3, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 1, 16, 16)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddim_uses_fewer_steps_than_training() -> None:
    model = _ddpm()
    calls = []
    model.net.register_forward_hook(lambda m, i, o: calls.append(int(i[1][0])))
    model.sample(2, generator=torch.Generator().manual_seed(0))
    assert len(calls) == model.cfg.ddim_steps < model.cfg.diffusion_timesteps
    assert calls[0] == model.cfg.diffusion_timesteps - 1 and calls[-1] == 0
    assert calls == sorted(calls, reverse=True)
    calls.clear()
    model.sample(2, steps=3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3


def test_schedules_are_valid() -> None:
    for name in ("linear", "cosine"):
        betas = beta_schedule(name, 200)
        assert betas.shape == (200,) and bool((betas > 0).all()) and bool((betas < 1).all())
        abar = GaussianDiffusion(name, 200).alphas_cumprod
        assert bool((abar[1:] < abar[:-1]).all()) and float(abar[-1]) < 0.05
    with pytest.raises(ValueError, match="noise_schedule"):
        beta_schedule("quadratic", 10)


def test_ddim_with_a_perfect_denoiser_recovers_the_data() -> None:
    """If ε̂ is the true noise, deterministic DDIM from x_T lands on x_0: checks the update rule."""
    diffusion = GaussianDiffusion("linear", 100)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    gen = torch.Generator().manual_seed(3)

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = diffusion.alphas_cumprod[t[0]]
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    out = diffusion.ddim_sample(oracle, (2, 1, 4, 4), steps=10, generator=gen, device=torch.device("cpu"))
    assert torch.allclose(out, x0, atol=1e-4)


def test_validation_loss_is_deterministic_but_training_draws_are_not() -> None:
    model = _ddpm()
    batch = {"images": torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))}
    assert model(batch).loss.item() == model(batch).loss.item()  # eval: fixed-seed t and noise
    model.train()
    assert model(batch).loss.item() != model(batch).loss.item()


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = _ddpm().train()
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.rand(2, 1, 16, 16, generator=g),
        "timesteps": torch.tensor([3, 70]),
        "noise": torch.randn(2, 1, 16, 16, generator=g),
    }
    model(batch).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(batch).loss.backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)
