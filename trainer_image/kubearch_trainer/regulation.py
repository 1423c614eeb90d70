"""The seeds' "2π regulation": keep the variance of chosen tensors under a threshold and slow its drift.

The seeds name the knobs but never the formula, so this module defines it (the README repeats it).
For every regulated term k with tensor x_k at optimizer step s:

    v_k      = Var(x_k)                       (statistic per family, see below)
    m_k      = EMA of v_k before this step   (m_k ← μ·m_k + (1−μ)·v_k after the step, μ = 0.99,
                                              initialised to the first v_k, no gradient)
    a_k      = clamp(m_k / τ_k, 1, 10)        if adaptive_schedule else 1
    w(s)     = min(1, s / warmup_steps)      (1 when warmup_steps = 0)
    L_var,k  = relu(v_k − τ_k)²
    L_rate,k = (v_k − m_k)²
    L_2π     = w(s) · 1/K · Σ_k [ λ_var · a_k · L_var,k + λ_rate · L_rate,k ]

τ = ``variance_threshold``, λ_var = ``lambda_variance``, λ_rate = ``lambda_rate``. The variance term
only acts above the threshold; the rate term pulls the variance toward its own recent average, so
it limits how fast it changes without pinning its level; the adaptive factor strengthens the
variance term while the smoothed variance sits above the threshold and relaxes back to 1 once it
is under it.

What is regulated (v_k) per family:

- VAE family: each entry of ``ModelOutput.regulated`` (``latent`` or ``latent_l{i}`` per level of
  the hierarchical VAE, the pre-quantisation encoder outputs of the VQ-VAE): the per-dimension
  variance over the batch, averaged over dimensions. One term per entry (layer-wise regulation).
- Sequence models (dense, moe, hybrid, mamba): forward hooks on the token mixer of each block,
  ``blocks[i].attn`` (or a Mamba block's ``blocks[i].mixer``), if ``regulate_attention``, and on
  ``blocks[i].mlp`` if ``regulate_ffn``; a block with none of these is hooked whole. The
  statistic is the per-token variance over features, averaged over tokens — the quantity LayerNorm
  divides by. ``layer_specific``: one term (and EMA) per hooked module; otherwise one term on
  their mean.
- Diffusion: the per-sample variance of the predicted noise ε̂ with a per-sample threshold
  τ(t) = τ + max_variance·g(t/T), g = t/T (``linear``), (1 − cos(π t/T))/2 (``cosine``) or 1
  (``constant``) when ``timestep_dependent`` (else g = 1): the target noise has unit variance, and
  the prediction may exceed it by at most ``max_variance``, more at noisier steps. The variance
  term averages relu(v_b − τ(t_b))² over the batch; the rate term uses the batch mean of v_b.
  ``regulate_noise: false`` turns the term off.
- Anything else (CNN, recurrent, plugins): every entry of ``ModelOutput.regulated``, as for VAEs.

Defaults when a value is None (the seed's hyperparameter table): small VAE (tiny/small sizes)
λ_var 1.0, λ_rate 10, τ 1.0, no warmup; large VAE (medium/large) 2.0 / 20 / 0.5 / 500 steps;
transformer (sequence models) 0.5 / 30 / 2.0 / 1000; diffusion 1.5 / 15 / τ 1.0 ("variable" in
the seed: the base of τ(t)) / 2000; other families use the small-VAE row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kubearch_trainer.config import (
    DIFFUSION_ARCHITECTURES,
    SEQUENCE_ARCHITECTURES,
    VAE_ARCHITECTURES,
    RegulationConfig,
)
from kubearch_trainer.models.base import ModelOutput

EMA_MOMENTUM = 0.99
ADAPTIVE_MAX = 10.0


@dataclass(frozen=True)
class RegulationDefaults:
    """One row of the seed's hyperparameter table."""

    lambda_variance: float
    lambda_rate: float
    variance_threshold: float
    warmup_steps: int


SEED_DEFAULTS: dict[str, RegulationDefaults] = {
    "small_vae": RegulationDefaults(1.0, 10.0, 1.0, 0),
    "large_vae": RegulationDefaults(2.0, 20.0, 0.5, 500),
    "transformer": RegulationDefaults(0.5, 30.0, 2.0, 1000),
    "diffusion": RegulationDefaults(1.5, 15.0, 1.0, 2000),
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The user model under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def family_of(architecture: str, model: nn.Module | None = None) -> str:
    """Which regulation strategy (and default row) an architecture gets."""
    if architecture in VAE_ARCHITECTURES:
        size = getattr(getattr(model, "cfg", None), "size", "tiny")
        return "large_vae" if size in ("medium", "large") else "small_vae"
    if architecture in DIFFUSION_ARCHITECTURES:
        return "diffusion"
    if architecture in SEQUENCE_ARCHITECTURES:
        return "transformer"
    return "generic"


def resolve(reg_cfg: RegulationConfig, family: str) -> tuple[float, float, float, int]:
    """(λ_var, λ_rate, τ, warmup) with None replaced by the family's seed default."""
    row = SEED_DEFAULTS.get(family, SEED_DEFAULTS["small_vae"])
    lam_var = row.lambda_variance if reg_cfg.lambda_variance is None else reg_cfg.lambda_variance
    lam_rate = row.lambda_rate if reg_cfg.lambda_rate is None else reg_cfg.lambda_rate
    thr = row.variance_threshold if reg_cfg.variance_threshold is None else reg_cfg.variance_threshold
    warm = row.warmup_steps if reg_cfg.warmup_steps is None else reg_cfg.warmup_steps
    return float(lam_var), float(lam_rate), float(thr), int(warm)


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """Per-feature variance over the batch (all leading dims), averaged over features."""
    x = x.float().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.float()[:, None]
    if x.shape[0] < 2:
        return x.new_zeros(())
    return x.var(dim=0, unbiased=False).mean()


def token_variance(x: torch.Tensor) -> torch.Tensor:
    """Per-token variance over the feature dim, averaged over tokens (what LayerNorm normalises)."""
    return x.float().var(dim=-1, unbiased=False).mean()


def schedule_fraction(name: str, frac: torch.Tensor) -> torch.Tensor:
    """g(t/T) of the diffusion threshold, in [0, 1]."""
    if name == "linear":
        return frac
    if name == "cosine":
        return 0.5 * (1.0 - torch.cos(torch.pi * frac))
    return torch.ones_like(frac)


class Regulator:
    """Callable returned by :func:`build_regulator`: ``reg(output, step) -> (loss, metrics)``.

    Holds the per-term EMAs (saved in checkpoints through :meth:`state_dict`) and, for sequence
    models, the forward hooks that capture block outputs during the training forward pass.
    """

    def __init__(self, reg_cfg: RegulationConfig, model: nn.Module, architecture: str) -> None:
        self.cfg = reg_cfg
        self.model = _unwrap(model)
        self.architecture = architecture
        self.family = family_of(architecture, self.model)
        self.lambda_variance, self.lambda_rate, self.threshold, self.warmup_steps = resolve(
            reg_cfg, self.family
        )
        self.ema: dict[str, torch.Tensor] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.timesteps_total = int(getattr(getattr(self.model, "cfg", None), "diffusion_timesteps", 1000))
        if self.family == "transformer":
            self._install_hooks()

    # ----------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        blocks = getattr(self.model, "blocks", None)
        if blocks is None:
            return
        for i, block in enumerate(blocks):
            targets: list[tuple[str, nn.Module]] = []
            known = [n for n in ("attn", "mixer", "mlp") if isinstance(getattr(block, n, None), nn.Module)]
            for n in known:
                wanted = self.cfg.regulate_ffn if n == "mlp" else self.cfg.regulate_attention
                if wanted:
                    targets.append((f"{n}{i}", getattr(block, n)))
            if not known:
                targets.append((f"block{i}", block))
            for name, module in targets:
                self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            # Only training forwards feed the loss; eval/generation must not keep activations alive.
            if not (module.training and torch.is_grad_enabled()):
                return
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                self._captured[name] = out

        return hook

    def remove(self) -> None:
        """Detach the hooks (the regulator is no longer used)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._captured.clear()

    # ----------------------------------------------------------------------------- terms
    def _terms(self, output: ModelOutput) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, variance statistic for the rate term, variance-term value or None) per term."""
        if self.family == "transformer":
            captured, self._captured = self._captured, {}
            if not captured:
                return []
            if self.cfg.layer_specific:
                return [(n, token_variance(t), None) for n, t in captured.items()]
            return [("all", torch.stack([token_variance(t) for t in captured.values()]).mean(), None)]
        if self.family == "diffusion":
            pred = output.regulated.get("noise_pred")
            if pred is None or not self.cfg.regulate_noise:
                return []
            per_sample = pred.float().flatten(1).var(dim=1, unbiased=False)
            t = output.regulated.get("timesteps")
            if self.cfg.timestep_dependent and t is not None:
                frac = t.float().to(per_sample.device) / max(self.timesteps_total - 1, 1)
                g = schedule_fraction(self.cfg.variance_schedule, frac)
            else:
                g = torch.ones_like(per_sample)
            thr = self.threshold + self.cfg.max_variance * g
            var_term = torch.relu(per_sample - thr).pow(2).mean()
            return [("noise", per_sample.mean(), var_term)]
        return [(name, batch_variance(x), None) for name, x in output.regulated.items() if x.numel() > 1]

    def __call__(self, output: ModelOutput, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self._terms(output)
        device = output.loss.device
        if not terms:
            zero = torch.zeros((), device=device)
            return zero, {"reg_loss": zero, "reg_variance": zero, "reg_rate": zero}
        warm = 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)
        total = torch.zeros((), device=device)
        variances, rates, adapt = [], [], []
        for name, v, var_term in terms:
            ema = self.ema.get(name)
            if ema is None:
                ema = v.detach().clone()
            ema = ema.to(v.device)
            if var_term is None:
                var_term = torch.relu(v - self.threshold).pow(2)
            a = (
                (ema / self.threshold).clamp(1.0, ADAPTIVE_MAX)
                if self.cfg.adaptive_schedule
                else ema.new_ones(())
            )
            rate = v - ema
            total = total + self.lambda_variance * a * var_term + self.lambda_rate * rate.pow(2)
            self.ema[name] = EMA_MOMENTUM * ema + (1 - EMA_MOMENTUM) * v.detach()
            variances.append(v.detach())
            rates.append(rate.detach().abs())
            adapt.append(a.detach())
        loss = warm * total / len(terms)
        metrics = {
            "reg_loss": loss.detach(),
            "reg_variance": torch.stack(variances).mean(),
            "reg_variance_max": torch.stack(variances).max(),
            "reg_rate": torch.stack(rates).mean(),
            "reg_adaptive_factor": torch.stack(adapt).mean(),
            "reg_warmup": torch.tensor(warm, device=device),
        }
        return loss, metrics

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: v.detach().cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = {k: torch.as_tensor(v) for k, v in state.get("ema", {}).items()}


def build_regulator(reg_cfg: RegulationConfig, model: nn.Module, architecture: str) -> Regulator:
    """The 2π regulariser for ``model`` (call only when ``reg_cfg.enabled``; the loop decides)."""
    return Regulator(reg_cfg, model, architecture)
