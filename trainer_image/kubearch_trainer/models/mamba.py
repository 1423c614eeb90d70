"""Mamba-1 (Gu & Dao, 2023): a selective state-space model, linear in sequence length.

embedding -> n_layers residual pre-norm blocks (norm -> :class:`MambaMixer`) -> final norm -> LM
head. No position embeddings: the causal convolution and the recurrence carry order.

A mixer::

    x, z = in_proj(h).chunk(2)                      # d_inner = expand · d_model each
    x = SiLU(causal_depthwise_conv1d(x))            # kernel conv_size, padding k-1 then slice
    dt, B, C = x_proj(x).split(dt_rank, N, N)       # input-dependent ("selective") parameters
    Δ = softplus(dt_proj(dt))                       # dt_proj.bias initialised so Δ ∈ [1e-3, 0.1]
    y = selective_scan(x, Δ, A = -exp(A_log), B, C, D)
    out = out_proj(y · SiLU(z))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.kernels.scan import selective_scan
from kubearch_trainer.models.layers import CausalLM, make_norm
from kubearch_trainer.models.registry import register


class MambaMixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        state_size: int = 16,
        conv_size: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.state_size = state_size
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, conv_size, groups=self.d_inner, padding=conv_size - 1, bias=True
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        # Paper's Δ init: weights U(±dt_rank^-0.5); bias = softplus^-1(dt) with dt log-uniform in
        # [dt_min, dt_max], so at step 0 each channel already has its own time scale.
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_weight_decay = True  # type: ignore[attr-defined]

        # S4D-real init: A[:, n] = -(n + 1), stored as log so A stays negative (a decay).
        a = torch.arange(1, state_size + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    def delta(self, dt: torch.Tensor) -> torch.Tensor:
        """Δ = softplus(W dt + b) with the bias added in fp32, as mamba-ssm's ``delta_bias`` is.

        The matmul may run in bf16 under autocast; the bias (softplus^-1 of time scales down to
        1e-3) is added after widening, so its small values are not rounded to bf16's 8 bits.
        """
        projected = F.linear(dt, self.dt_proj.weight).float()
        return F.softplus(projected + self.dt_proj.bias.float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        length = h.size(1)
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x = self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2)  # causal: drop the look-ahead
        # Contiguous before SiLU: x_proj would otherwise save its own contiguous copy of SiLU's
        # output next to the strided one the scan saves (one (B, L, d_inner) tensor more per layer).
        x = F.silu(x.contiguous())
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        delta = self.delta(dt)
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x, delta, A, B, C, self.D)
        return self.out_proj(y.to(z.dtype) * F.silu(z))


class MambaBlock(nn.Module):
    """Residual pre-norm block: x + mixer(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_model = cfg.resolved("d_model")
        self.norm = make_norm(d_model, cfg.use_rmsnorm)
        self.mixer = MambaMixer(d_model, cfg.state_size, cfg.conv_size, cfg.expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


def init_mamba_weights(model: nn.Module, n_layers: int) -> None:
    """Mamba's init: embeddings N(0, 0.02), linear biases zero except dt_proj's, PyTorch's default
    linear init otherwise, and out_proj rescaled by 1/sqrt(n_layers) (one residual add per block)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
            nn.init.zeros_(module.bias)
        if isinstance(module, MambaMixer):
            nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                module.out_proj.weight /= math.sqrt(n_layers)


@register("mamba", task="lm")
class Mamba(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d_model, n_layers = cfg.resolved("d_model"), cfg.resolved("n_layers")
        self.tok_emb = nn.Embedding(cfg.vocab_size, d_model)
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(n_layers))
        self.norm_f = make_norm(d_model, cfg.use_rmsnorm)
        self.lm_head = nn.Linear(d_model, cfg.vocab_size, bias=False)
        init_mamba_weights(self, n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        return self.lm_head(self.norm_f(self.run_blocks(x)))
