"""The VAE family: ``vae``, ``beta_vae``, ``vq_vae`` and ``hierarchical_vae`` (task ``image_recon``).

All four share a convolutional encoder/decoder (:mod:`image_blocks`) sized by ``--model-size``
(or ``--d-model`` = base channels, ``--n-layers`` = down-sampling stages) and the same losses:

- reconstruction: Bernoulli negative log-likelihood (binary cross-entropy on logits) summed over
  pixels and averaged over the batch, so ``recon_loss`` reads "nats per image" as in the seed's
  "Recon < 30" targets;
- KL to the prior, also summed per image (``kl``); ``beta_vae`` multiplies it by ``model.beta``.

Each model puts the latent it wants the 2π regulariser to watch into ``ModelOutput.regulated``
(``latent`` or ``latent_l{i}`` per level) and implements ``evaluate_extra(val_dataset)``, which
the train loop calls at the end: it returns the MIG disentanglement score when the validation
batches carry known ``factors`` (the generated shapes data set) and FID-free sample-quality
proxies for the models that can sample from their prior.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models.base import KubearchModel, ModelOutput
from kubearch_trainer.models.image_blocks import (
    ConvDecoder,
    ConvEncoder,
    family_dims,
    max_downsamples,
    sample_quality,
    seeded_randn,
)
from kubearch_trainer.models.registry import register

_LOGVAR_RANGE = (-10.0, 10.0)  # keeps exp(logvar) finite early in training and under AMP


def recon_nll(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Bernoulli NLL summed over pixels, mean over the batch (nats per image)."""
    nll = F.binary_cross_entropy_with_logits(logits.float(), images.float(), reduction="none")
    return nll.flatten(1).sum(1).mean()


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(N(mu, e^logvar) || prior) summed over latent dims, mean over batch; prior N(0, I) if None."""
    if prior_mu is None or prior_logvar is None:
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    else:
        kl = 0.5 * (
            prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1.0
        )
    return kl.flatten(1).sum(1).mean()


class _ImageVAEBase(KubearchModel):
    """Shared geometry: encoder trunk, decoder trunk and the flattened feature size between them."""

    task = "image_recon"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        width, depth = family_dims(cfg, "vae")
        self.stages = max(1, min(depth, max_downsamples(cfg.image_size)))
        self.side = cfg.image_size // 2**self.stages
        self.encoder = ConvEncoder(cfg.image_channels, width, self.stages)
        self.decoder = ConvDecoder(cfg.image_channels, width, self.stages)
        self.feat_channels = self.encoder.out_channels
        self.feat_dim = self.feat_channels * self.side * self.side
        self.width = width
        #: What --model-size resolved to for this family (the transformer dims do not apply).
        self.arch_dims = {"base_channels": width, "stages": self.stages, "latent_dim": cfg.latent_dim}

    def _decode_features(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(h)
        size = self.cfg.image_size
        if logits.shape[-1] != size or logits.shape[-2] != size:  # odd sizes: exact halving stopped early
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        return logits

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Deterministic latent code [B, D] used for disentanglement scores."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate_extra(self, val_dataset: Any, n_batches: int = 8, batch_size: int = 64) -> dict[str, float]:
        """End-of-run extras for results.json (the train loop calls this once, after training).

        ``mig`` and ``active_latents`` (latent dims whose posterior mean varies, Var > 0.01) when
        the validation batches carry ``factors``; FID-free sample-quality proxies
        (:func:`~kubearch_trainer.models.image_blocks.sample_quality`) when the model can sample.
        """
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            out = self._mig_extra(val_dataset.eval_batches(n_batches, batch_size, device))
            sample = getattr(self, "sample", None)
            if callable(sample):
                samples = sample(batch_size, generator=torch.Generator().manual_seed(0))
                real = torch.cat([b["images"] for b in val_dataset.eval_batches(1, batch_size, device)])
                out.update(sample_quality(samples, real))
        finally:
            self.train(was_training)
        return out

    def _mig_extra(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        from kubearch_trainer.disentanglement import mig_score

        if not batches or any("factors" not in b for b in batches):
            return {}
        z = torch.cat([self.encode_mean(b["images"]).float().cpu() for b in batches])
        v = torch.cat([b["factors"].cpu() for b in batches]).numpy()
        active = float((z.var(0) > 1e-2).sum())
        return {"mig": mig_score(z.numpy(), v), "active_latents": active}


class _GaussianVAE(_ImageVAEBase):
    """A single dense Gaussian latent of ``latent_dim``; KL weight ``kl_weight``."""

    def __init__(self, cfg: ModelConfig, kl_weight: float) -> None:
        super().__init__(cfg)
        self.kl_weight = kl_weight
        self.to_stats = nn.Linear(self.feat_dim, 2 * cfg.latent_dim)
        self.from_latent = nn.Linear(cfg.latent_dim, self.feat_dim)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.encoder(images).flatten(1)).chunk(2, dim=-1)
        return mu, logvar.clamp(*_LOGVAR_RANGE)

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, D] -> image logits [B, C, H, W] (apply sigmoid for pixels)."""
        h = self.from_latent(z).view(-1, self.feat_channels, self.side, self.side)
        return self._decode_features(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        images = batch["images"]
        mu, logvar = self.encode(images)
        # Sample while training; the posterior mean in eval keeps validation numbers deterministic.
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        logits = self.decode(z)
        recon = recon_nll(logits, images)
        kl = gaussian_kl(mu, logvar)
        loss = recon + self.kl_weight * kl
        metrics = {"recon_loss": recon.detach(), "kl": kl.detach(), "neg_elbo": (recon + kl).detach()}
        return ModelOutput(
            loss=loss, metrics=metrics, logits=None if self.training else logits, regulated={"latent": z}
        )

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] decoded from prior samples."""
        device = next(self.parameters()).device
        z = seeded_randn((n, self.cfg.latent_dim), generator, device)
        return torch.sigmoid(self.decode(z))


@register("vae", task="image_recon")
class VAE(_GaussianVAE):
    """Standard VAE (Kingma & Welling): loss = recon + KL."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, kl_weight=1.0)


@register("beta_vae", task="image_recon")
class BetaVAE(_GaussianVAE):
    """β-VAE (Higgins et al.): loss = recon + β·KL with β = ``model.beta`` (β > 1 favours disentangling)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, kl_weight=cfg.beta)


@register("vq_vae", task="image_recon")
class VQVAE(_ImageVAEBase):
    """VQ-VAE (van den Oord et al., 2017): a spatial grid of discrete codes from a learned codebook.

    loss = recon + commitment_cost·||z_e − sg(e)||² (sum per image), with the straight-through
    estimator z_q = z_e + sg(e − z_e) carrying the decoder's gradient to the encoder. The codebook
    itself is learned by exponential moving averages of the encoder outputs assigned to each code
    (the paper's appendix variant, decay ``ema_decay``): with a gradient-learned codebook the
    encoder outputs outran the codes in our runs and the commitment term grew without bound.

    A code no batch has chosen for ``dead_code_steps`` training steps is re-initialised from a
    random encoder output of the current batch ("dead-code restart"); every code starts dead, so
    the first training batch initialises the codebook from data. Under DDP the usage counts and EMA
    statistics are summed over ranks and rank 0's restarted codes are broadcast, so replicas agree.
    """

    ema_decay = 0.99

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d, k = cfg.latent_dim, cfg.codebook_size
        self.dead_code_steps = cfg.dead_code_steps
        self.arch_dims["codebook_size"] = k
        self.pre_quant = nn.Conv2d(self.feat_channels, d, 1)
        self.post_quant = nn.Conv2d(d, self.feat_channels, 1)
        self.register_buffer("codebook", torch.randn(k, d) / math.sqrt(d))
        self.register_buffer("ema_cluster_size", torch.ones(k))
        self.register_buffer("ema_embed_sum", self.codebook.clone())
        self.register_buffer("code_last_used", torch.full((k,), -self.dead_code_steps, dtype=torch.long))
        self.register_buffer("vq_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts_total", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def encode_continuous(self, images: torch.Tensor) -> torch.Tensor:
        """z_e [B, D, h, w] before quantisation."""
        return self.pre_quant(self.encoder(images))

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codebook entry per position: (codes [B, D, h, w], indices [B, h, w])."""
        b, d, h, w = z_e.shape
        with torch.no_grad():
            f = z_e.detach().permute(0, 2, 3, 1).reshape(-1, d).float()
            dist = (
                f.pow(2).sum(1, keepdim=True) - 2 * f @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]
            )
            idx = dist.argmin(1)
            e = self.codebook[idx].view(b, h, w, d).permute(0, 3, 1, 2).to(z_e.dtype)
        return e, idx.view(b, h, w)

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_continuous(images).flatten(1)

    def dead_codes(self) -> torch.Tensor:
        """Bool mask of codes unused for at least ``dead_code_steps`` training steps."""
        return (self.vq_step - self.code_last_used) >= self.dead_code_steps

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.dead_codes()
        n_dead = int(dead.sum())
        if n_dead == 0 or flat.shape[0] == 0:
            return
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = flat[pick].float() + 1e-3 * torch.randn(n_dead, flat.shape[1], device=flat.device)
        if self._distributed():
            full = self.codebook.clone()
            full[dead] = new
            torch.distributed.broadcast(full, src=0)
            new = full[dead]
        self.codebook[dead] = new
        self.ema_embed_sum[dead] = new
        self.ema_cluster_size[dead] = 1.0
        self.code_last_used[dead] = self.vq_step
        self.restarts_total += n_dead

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Usage counts of this batch; while training also the EMA codebook update and step count."""
        k = self.cfg.codebook_size
        counts = torch.bincount(idx, minlength=k).float()
        if not self.training:
            return counts
        sums = torch.zeros_like(self.codebook).index_add_(0, idx, flat.float())
        if self._distributed():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])
        self.code_last_used[counts > 0] = self.vq_step
        self.vq_step += 1
        return counts

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        images = batch["images"]
        z_e = self.encode_continuous(images)
        d = z_e.shape[1]
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training:
            self._restart_dead_codes(flat.detach())
        e, idx = self.quantize(z_e)
        counts = self._update_codebook(flat.detach(), idx.flatten())
        z_q = z_e + (e - z_e).detach()  # straight-through estimator
        logits = self._decode_features(self.post_quant(z_q))
        recon = recon_nll(logits, images)
        commitment = (z_e - e).pow(2).flatten(1).sum(1).mean()
        loss = recon + self.cfg.commitment_cost * commitment
        p = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        metrics = {
            "recon_loss": recon.detach(),
            "commitment_loss": commitment.detach(),
            "codebook_perplexity": perplexity,
            "codebook_usage": (counts > 0).float().mean(),
            "codebook_dead": self.dead_codes().float().sum(),
        }
        return ModelOutput(
            loss=loss, metrics=metrics, logits=None if self.training else logits, regulated={"latent": flat}
        )

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"codebook_restarts_total": self.restarts_total.float()}

    def evaluate_extra(self, val_dataset: Any, n_batches: int = 8, batch_size: int = 64) -> dict[str, float]:
        """VQ codes are discrete grids: report codebook usage over the validation set, plus MIG."""
        out = super().evaluate_extra(val_dataset, n_batches, batch_size)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        counts = torch.zeros(self.cfg.codebook_size, device=device)
        with torch.no_grad():
            for batch in val_dataset.eval_batches(n_batches, batch_size, device):
                _, idx = self.quantize(self.encode_continuous(batch["images"]))
                counts += torch.bincount(idx.flatten(), minlength=self.cfg.codebook_size).float()
        self.train(was_training)
        p = counts / counts.sum().clamp_min(1)
        out["val_codebook_perplexity"] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()))
        out["val_codebook_usage"] = float((counts > 0).float().mean())
        return out


@register("hierarchical_vae", task="image_recon")
class HierarchicalVAE(_ImageVAEBase):
    """Ladder VAE (Sønderby et al., 2016) with ``levels`` Gaussian latents of ``latent_dim`` each.

    Bottom-up, deterministic features d_1 … d_L come from the conv trunk. Top-down, z_L ~ q(z_L|d_L)
    against a N(0, I) prior; each lower z_l has a learned prior p(z_l | z_{l+1}) and a posterior
    q(z_l | d_l, z_{l+1}); the decoder reconstructs from z_1. KL = Σ_l KL_l, each reported as
    ``kl_l{l}``; every level is exposed to the 2π regulariser as ``latent_l{l}`` (layer-wise
    regulation). Two levels for tiny/small, three for medium/large.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.levels = 2 if cfg.size in ("tiny", "small") else 3
        self.arch_dims["levels"] = self.levels
        d = cfg.latent_dim
        hidden = max(64, 4 * d)
        self.bottom_up = nn.ModuleList(
            [nn.Linear(self.feat_dim if i == 0 else hidden, hidden) for i in range(self.levels)]
        )
        self.top_posterior = nn.Linear(hidden, 2 * d)
        # index i handles level i+1 (1-based level numbers in metrics), conditioned on level i+2
        self.context = nn.ModuleList([nn.Linear(d, hidden) for _ in range(self.levels - 1)])
        self.prior = nn.ModuleList([nn.Linear(hidden, 2 * d) for _ in range(self.levels - 1)])
        self.posterior = nn.ModuleList([nn.Linear(2 * hidden, 2 * d) for _ in range(self.levels - 1)])
        self.from_latent = nn.Linear(d, self.feat_dim)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = self.encoder(images).flatten(1)
        feats = []
        for layer in self.bottom_up:
            h = F.silu(layer(h))
            feats.append(h)
        return feats

    @staticmethod
    def _split(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = stats.chunk(2, dim=-1)
        return mu, logvar.clamp(*_LOGVAR_RANGE)

    def _sample(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu

    def infer(
        self, images: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Top-down pass: (z per level, KL per level, posterior mean per level), index 0 = level 1."""
        feats = self._features(images)
        L = self.levels
        zs: list[torch.Tensor] = [torch.empty(0)] * L
        kls: list[torch.Tensor] = [torch.empty(0)] * L
        means: list[torch.Tensor] = [torch.empty(0)] * L
        mu, logvar = self._split(self.top_posterior(feats[-1]))
        zs[-1], kls[-1], means[-1] = self._sample(mu, logvar), gaussian_kl(mu, logvar), mu
        for i in range(L - 2, -1, -1):
            ctx = F.silu(self.context[i](zs[i + 1]))
            p_mu, p_logvar = self._split(self.prior[i](ctx))
            q_mu, q_logvar = self._split(self.posterior[i](torch.cat([feats[i], ctx], dim=-1)))
            zs[i] = self._sample(q_mu, q_logvar)
            kls[i] = gaussian_kl(q_mu, q_logvar, p_mu, p_logvar)
            means[i] = q_mu
        return zs, kls, means

    def decode(self, z1: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z1).view(-1, self.feat_channels, self.side, self.side)
        return self._decode_features(h)

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.infer(images)[2], dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        images = batch["images"]
        zs, kls, _ = self.infer(images)
        logits = self.decode(zs[0])
        recon = recon_nll(logits, images)
        kl = torch.stack(kls).sum()
        metrics = {"recon_loss": recon.detach(), "kl": kl.detach(), "neg_elbo": (recon + kl).detach()}
        for i, k in enumerate(kls):
            metrics[f"kl_l{i + 1}"] = k.detach()
        regulated = {f"latent_l{i + 1}": z for i, z in enumerate(zs)}
        return ModelOutput(
            loss=recon + kl, metrics=metrics, logits=None if self.training else logits, regulated=regulated
        )

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sample through the learned top-down priors; images in [0, 1]."""
        device = next(self.parameters()).device
        z = seeded_randn((n, self.cfg.latent_dim), generator, device)
        for i in range(self.levels - 2, -1, -1):
            p_mu, p_logvar = self._split(self.prior[i](F.silu(self.context[i](z))))
            eps = seeded_randn(tuple(p_mu.shape), generator, device)
            z = p_mu + eps * (0.5 * p_logvar).exp()
        return torch.sigmoid(self.decode(z))
