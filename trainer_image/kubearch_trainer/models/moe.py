"""Mixture of Experts: the dense transformer with each MLP replaced by a top-k router over experts.

Per MoE layer, for N tokens x (N, d), E experts, k = ``expert_capacity`` (the seed's name for top-k):

1. Router: logits = x W_r (N, E) in float32; p = softmax(logits); the k largest p per token are
   the token's experts, their gates renormalised to sum to 1.
2. Dispatch without a loop over tokens: the N·k (token, expert) pairs are sorted by expert id
   (argsort), so each expert's tokens form one contiguous slice of a (N·k, d) matrix.
3. Experts are SwiGLU MLPs whose weights are stacked tensors (nn.Linear layout (E, out, in)), so
   all experts run as ONE grouped GEMM (``grouped_mm``, offsets = cumulative counts) on CUDA in
   bf16; elsewhere a loop over the E experts' slices computes the same thing.
4. Combine: outputs × gates are scattered back (index_add) to their tokens.

Losses (added to the LM loss, averaged over layers, reported as metrics):

- Switch load balancing: ``aux_loss = α · E · Σ_i f_i · P_i`` with f_i the fraction of the N·k
  assignments that went to expert i and P_i the mean router probability of expert i. It is 1·α
  when routing is perfectly uniform and grows as the router collapses onto few experts.
- Router z-loss (ST-MoE): ``z_loss = β · mean(logsumexp(logits)²)`` keeps logits small so the
  float32 softmax stays well conditioned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models.dense import DenseGPT
from kubearch_trainer.models.layers import TransformerBlock, swiglu_hidden
from kubearch_trainer.models.registry import register


def _grouped_mm_fn():
    """``F.grouped_mm`` (torch >= 2.9) or the older private ``torch._grouped_mm``, if any."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class MoELayer(nn.Module):
    """Top-k router over SwiGLU experts. Returns a tensor (so 2π hooks see a plain MLP output) and
    leaves its auxiliary losses and per-expert counts in ``last_aux_loss``, ``last_z_loss`` and
    ``last_counts`` for the model to collect."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, n_layers: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        hidden = swiglu_hidden(d_ff)
        self.router = nn.Linear(d_model, num_experts, bias=False)
        # nn.Linear layout (E, out, in): grouped_mm then takes w.transpose(-2, -1), a
        # column-major (E, in, out) view, which is the layout its kernels require.
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        nn.init.normal_(self.w_gate, std=0.02)
        nn.init.normal_(self.w_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02 / math.sqrt(2 * n_layers))  # residual projection
        self.last_aux_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None

    def params_per_expert(self) -> int:
        return (self.w_gate.numel() + self.w_up.numel() + self.w_down.numel()) // self.num_experts

    def _experts_grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gmm = _grouped_mm_fn()
        w_gate, w_up, w_down = (
            w.to(x.dtype).transpose(-2, -1) for w in (self.w_gate, self.w_up, self.w_down)
        )
        hidden = F.silu(gmm(x, w_gate, offs=offsets)) * gmm(x, w_up, offs=offsets)
        return gmm(hidden, w_down, offs=offsets)

    def _experts_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # One host read of E counts; fine off the CUDA hot path (CPU, or GPUs without grouped_mm).
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                xs = x[start : start + n]
                hidden = F.silu(F.linear(xs, self.w_gate[e])) * F.linear(xs, self.w_up[e])
                out[start : start + n] = F.linear(hidden, self.w_down[e])
            start += n
        return out

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        """bf16 when x is bf16 or bf16 autocast is on (norms hand fp32 to us under autocast)."""
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            return torch.get_autocast_dtype("cuda")
        return x.dtype

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.compute_dtype(x) == torch.bfloat16 and _grouped_mm_fn() is not None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (Switch Transformer's "selective precision"), autocast or not.

        Under bf16 autocast ``self.router(x)`` would run in bf16 and ``.float()`` afterwards only
        widens already-rounded values; with 3 significant digits, near-tied experts swap and the
        z-loss is computed on rounded logits. Autocast is switched off and both operands widened.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = self.router.bias
            return F.linear(x.float(), self.router.weight.float(), None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        n_tokens = x.size(0)
        logits = self.router_logits(x)  # (N, E)
        probs = logits.softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        gates = gates / gates.sum(dim=-1, keepdim=True)

        # Sort the N·k assignments by expert so each expert's tokens are contiguous.
        flat_experts = experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k  # assignment a belongs to token a // k
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        x_sorted = x[token_of]
        if self.use_grouped_mm(x):
            offsets = counts.cumsum(0).to(torch.int32)
            y_sorted = self._experts_grouped(x_sorted.to(torch.bfloat16), offsets)
        else:
            y_sorted = self._experts_loop(x_sorted, counts)
        weighted = y_sorted * gates.reshape(-1)[order, None].to(y_sorted.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of, weighted.to(x.dtype))

        fraction = counts.float() / (n_tokens * self.top_k)  # f_i
        mean_prob = probs.mean(dim=0)  # P_i
        self.last_aux_loss = self.num_experts * (fraction * mean_prob).sum()
        self.last_z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        self.last_counts = counts.detach()
        return out.view(shape)


@register("moe", task="lm")
class MoEGPT(DenseGPT):
    """DenseGPT whose blocks use :class:`MoELayer` as their ``mlp``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        # Sum over layers of the last forward's per-expert assignment counts (metrics endpoint).
        self.register_buffer(
            "expert_tokens", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False
        )

    def make_block(self, cfg: ModelConfig, layer: int) -> nn.Module:
        moe = MoELayer(
            cfg.resolved("d_model"),
            cfg.resolved("d_ff"),
            cfg.num_experts,
            cfg.expert_capacity,
            cfg.resolved("n_layers"),
        )
        return TransformerBlock(cfg, mlp=moe)

    def moe_layers(self) -> list[MoELayer]:
        return [block.mlp for block in self.blocks]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        layers = self.moe_layers()
        aux = torch.stack([m.last_aux_loss for m in layers]).mean()
        z = torch.stack([m.last_z_loss for m in layers]).mean()
        with torch.no_grad():
            self.expert_tokens.copy_(torch.stack([m.last_counts for m in layers]).sum(dim=0))
        return {"aux_loss": self.cfg.moe_aux_loss_weight * aux, "z_loss": self.cfg.moe_z_loss_weight * z}

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"expert_tokens": self.expert_tokens.clone()}

    def active_params(self) -> int:
        """Parameters a token touches: all but the (E - k) experts it is not routed to."""
        unused = self.cfg.num_experts - self.cfg.expert_capacity
        return self.num_params() - sum(unused * m.params_per_expert() for m in self.moe_layers())
