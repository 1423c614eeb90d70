"""Diffusion: ``ddpm`` (pixel space) and ``latent_diffusion`` (on a jointly trained VAE's latents).

``ddpm`` (Ho et al., 2020) trains a small U-Net to predict the noise ε added at a random step t of
a ``linear`` (β from 1e-4 to 0.02, rescaled for T ≠ 1000) or ``cosine`` (Nichol & Dhariwal, 2021)
schedule with ``diffusion_timesteps`` = T steps: loss = ‖ε − ε̂(x_t, t)‖² (mean over pixels).
Images are mapped from [0, 1] to [−1, 1]. :meth:`DDPM.sample` runs deterministic DDIM (Song et al.,
2021, η = 0) over ``ddim_steps`` evenly spaced steps, far fewer than T.

Batches may carry ``timesteps`` [B] and ``noise`` [B, C, H, W] to fix the otherwise random draws
(tests use this to train on a truly fixed batch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models.base import KubearchModel, ModelOutput
from kubearch_trainer.models.image_blocks import (
    family_dims,
    groups_for,
    max_downsamples,
    sample_quality,
    seeded_randn,
)
from kubearch_trainer.models.registry import register

EVAL_SEED = 1234


def beta_schedule(name: str, timesteps: int) -> torch.Tensor:
    """β_t for t = 0..T−1 (float64 for accurate cumulative products)."""
    if name == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), timesteps, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
        abar = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
        abar = abar / abar[0]
        return (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)
    raise ValueError(f"model.noise_schedule: {name!r} is not one of linear, cosine")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer steps, [B] -> [B, dim] (as in the transformer's positions)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between (the DDPM U-Net block)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups_for(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups_for(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A small U-Net: ``levels`` resolutions (channels ``width·(1, 2, 2, 4…)``).

    One residual block per level on the way down, two on the way up (each taking one skip
    connection), a two-block middle, and a sinusoidal time embedding through an MLP. No attention:
    at 32×32 and CI sizes it costs more than it gives.
    """

    def __init__(self, channels: int, width: int, levels: int) -> None:
        super().__init__()
        mults = [1, 2, 2, 4, 4, 8][:levels]
        emb_dim = 4 * width
        self.width = width
        #: Recompute each residual block in backward (set by the owning model's flag).
        self.checkpointing = False
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = width
        skips = [ch]
        for i, m in enumerate(mults):
            self.down.append(ResBlock(ch, width * m, emb_dim))
            ch = width * m
            skips.append(ch)
            is_last = i == len(mults) - 1
            self.downsample.append(nn.Identity() if is_last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not is_last:
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim)
        self.mid2 = ResBlock(ch, ch, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            blocks = nn.ModuleList()
            for _ in range(2):
                blocks.append(ResBlock(ch + skips.pop(), width * m, emb_dim))
                ch = width * m
            self.up.append(blocks)
            self.upsample.append(nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity())
        self.out = nn.Sequential(
            nn.GroupNorm(groups_for(ch), ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _block(self, block: ResBlock, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.width))
        h = self.stem(x)
        hs = [h]
        for i, (block, down) in enumerate(zip(self.down, self.downsample, strict=True)):
            h = self._block(block, h, emb)
            hs.append(h)
            if i < len(self.down) - 1:
                h = down(h)
                hs.append(h)
        h = self._block(self.mid2, self._block(self.mid1, h, emb), emb)
        for blocks, up in zip(self.up, self.upsample, strict=True):
            for block in blocks:
                h = self._block(block, torch.cat([h, hs.pop()], dim=1), emb)
            h = up(h)
        return self.out(h)


class GaussianDiffusion(nn.Module):
    """The forward process and DDIM sampling around an ε-predicting network ``net(x_t, t)``."""

    def __init__(self, schedule: str, timesteps: int) -> None:
        super().__init__()
        betas = beta_schedule(schedule, timesteps)
        abar = torch.cumprod(1 - betas, dim=0)
        self.timesteps = timesteps
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` evenly spaced steps from T−1 down to 0 (distinct, descending)."""
        steps = max(1, min(steps, self.timesteps))
        ts = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        return list(dict.fromkeys(ts))

    @torch.no_grad()
    def ddim_sample(
        self,
        net: Any,
        shape: tuple[int, ...],
        steps: int,
        generator: torch.Generator | None,
        device: torch.device,
        clip: float | None = 1.0,
    ) -> torch.Tensor:
        """Deterministic DDIM (η = 0): x_{t'} = √ā_{t'}·x̂_0 + √(1−ā_{t'})·ε̂; returns x̂_0 at t = 0."""
        x = seeded_randn(shape, generator, device)
        ts = self.ddim_timesteps(steps)
        for i, t in enumerate(ts):
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            eps = net(x, tt).float()
            abar = self.alphas_cumprod[t]
            x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            if i == len(ts) - 1:
                return x0
            abar_prev = self.alphas_cumprod[ts[i + 1]]
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        return x


def _draws(
    batch: dict[str, torch.Tensor], x0: torch.Tensor, timesteps: int, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, ε) for a forward pass: from the batch if given, else random.

    In eval mode the draws come from a fixed-seed generator, so validation losses are the same on
    every evaluation and comparable between runs and checkpoints.
    """
    b = x0.shape[0]
    t = batch.get("timesteps")
    noise = batch.get("noise")
    if training:
        t = torch.randint(0, timesteps, (b,), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
    else:
        gen = torch.Generator().manual_seed(EVAL_SEED)
        t = torch.randint(0, timesteps, (b,), generator=gen) if t is None else t
        noise = torch.randn(x0.shape, generator=gen) if noise is None else noise
    return t.to(x0.device).long(), noise.to(x0)


@register("ddpm", task="image_gen")
class DDPM(KubearchModel):
    """Pixel-space DDPM with a U-Net sized by ``--model-size`` (width = base channels, depth = levels)."""

    task = "image_gen"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        width, depth = family_dims(cfg, "diffusion")
        # Fewer levels for small or odd image sizes: each down-sampling must halve the side exactly
        # so the up path's skip connections line up (e.g. 28 -> 14 -> 7 allows three levels).
        levels = max(1, min(depth, max_downsamples(cfg.image_size, min_side=2) + 1))
        self.net = UNet(cfg.image_channels, width, levels)
        self.arch_dims = {"base_channels": width, "levels": levels, "timesteps": cfg.diffusion_timesteps}
        self.diffusion = GaussianDiffusion(cfg.noise_schedule, cfg.diffusion_timesteps)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        x0 = batch["images"] * 2 - 1
        t, noise = _draws(batch, x0, self.diffusion.timesteps, self.training)
        x_t = self.diffusion.q_sample(x0, t, noise)
        self.net.checkpointing = self.gradient_checkpointing and self.training
        pred = self.net(x_t, t)
        loss = F.mse_loss(pred.float(), noise.float())
        return ModelOutput(
            loss=loss,
            metrics={"mse": loss.detach(), "noise_pred_var": pred.detach().float().var()},
            regulated={"noise_pred": pred, "timesteps": t},
        )

    @torch.no_grad()
    def sample(
        self, n: int, steps: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` images in [0, 1] by DDIM (η = 0) with ``steps`` (default ``model.ddim_steps``) steps."""
        device = next(self.parameters()).device
        c, s = self.cfg.image_channels, self.cfg.image_size
        x0 = self.diffusion.ddim_sample(
            self.net, (n, c, s, s), steps or self.cfg.ddim_steps, generator, device
        )
        return ((x0 + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def evaluate_extra(self, val_dataset: Any, n_samples: int = 64) -> dict[str, float]:
        """FID-free sample-quality proxies of ``n_samples`` DDIM samples (see ``sample_quality``)."""
        return _sample_extra(self, val_dataset, n_samples)


def _sample_extra(model: Any, val_dataset: Any, n_samples: int) -> dict[str, float]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        samples = model.sample(n_samples, generator=torch.Generator().manual_seed(0))
    finally:
        model.train(was_training)
    real = torch.cat([b["images"] for b in val_dataset.eval_batches(1, n_samples, device)])
    return sample_quality(samples, real)


class _LatentDenoiser(nn.Module):
    """ε-prediction MLP for vector latents: [z_t, time embedding] -> ε̂ (residual SiLU MLP)."""

    def __init__(self, dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU()) for _ in range(depth)]
        )
        self.out = nn.Linear(hidden, dim)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(z) + self.time(timestep_embedding(t, self.hidden))
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)


@register("latent_diffusion", task="image_gen")
class LatentDiffusion(KubearchModel):
    """Diffusion on a VAE's latents (Rombach et al., 2022, in miniature), trained in one run.

    loss = VAE loss (recon + KL) + diffusion loss on the stop-gradient posterior means, so the
    denoiser follows the VAE's latent space as it forms without pulling it toward easy-to-denoise
    codes. Sampling: DDIM in latent space, then the VAE decoder.
    """

    task = "image_gen"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        from kubearch_trainer.models.vae import VAE

        self.vae = VAE(cfg)
        width, depth = family_dims(cfg, "diffusion")
        self.denoiser = _LatentDenoiser(cfg.latent_dim, 8 * width, 2 * depth)
        self.arch_dims = {**self.vae.arch_dims, "denoiser_hidden": 8 * width, "denoiser_layers": 2 * depth}
        self.diffusion = GaussianDiffusion(cfg.noise_schedule, cfg.diffusion_timesteps)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        vae_out = self.vae(batch)
        with torch.no_grad():
            z0 = self.vae.encode(batch["images"])[0]
        # a "noise" entry in the batch is pixel noise for ddpm; latent noise is always drawn here
        latent_batch = {k: v for k, v in batch.items() if k != "noise"}
        t, noise = _draws(latent_batch, z0, self.diffusion.timesteps, self.training)
        pred = self.denoiser(self.diffusion.q_sample(z0, t, noise), t)
        mse = F.mse_loss(pred.float(), noise.float())
        metrics = dict(vae_out.metrics)
        metrics["mse"] = mse.detach()
        return ModelOutput(
            loss=vae_out.loss + mse,
            metrics=metrics,
            logits=vae_out.logits,
            regulated={"noise_pred": pred, "timesteps": t},
        )

    @torch.no_grad()
    def sample(
        self, n: int, steps: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        device = next(self.parameters()).device
        z = self.diffusion.ddim_sample(
            self.denoiser,
            (n, self.cfg.latent_dim),
            steps or self.cfg.ddim_steps,
            generator,
            device,
            clip=None,
        )
        return torch.sigmoid(self.vae.decode(z))

    @torch.no_grad()
    def evaluate_extra(self, val_dataset: Any, n_samples: int = 64) -> dict[str, float]:
        """Sample-quality proxies of latent-DDIM samples, plus the VAE's extras (MIG on shapes)."""
        return {**self.vae.evaluate_extra(val_dataset), **_sample_extra(self, val_dataset, n_samples)}
