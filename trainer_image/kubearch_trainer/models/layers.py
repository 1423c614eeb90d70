"""Building blocks shared by the sequence families (dense, moe, hybrid; mamba uses the LM base).

Read top to bottom: normalisation, positions (RoPE, learned, sinusoidal), feed-forward layers,
LoRA adapters, the search report's attention variants, causal self-attention (optionally
sliding-window), weight initialisation, and :class:`CausalLM`, the base class that turns a
family's ``logits(input_ids)`` into the trainer's ``ModelOutput`` and adds ``generate``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kubearch_trainer.config import ATTENTION_VARIANTS, LORA_RANKS, ModelConfig
from kubearch_trainer.models.base import KubearchModel, ModelOutput, token_accuracy

if TYPE_CHECKING:
    from torch import Tensor
    from torch.nn.attention.flex_attention import BlockMask

# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def make_norm(d_model: int, use_rmsnorm: bool) -> nn.Module:
    """RMSNorm (no mean subtraction, no bias: cheaper, LLaMA-style) or LayerNorm without bias."""
    if use_rmsnorm:
        return nn.RMSNorm(d_model, eps=1e-6)
    return nn.LayerNorm(d_model, bias=False)


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need": (max_len, d_model)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : d_model // 2]
    return table


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer). cos/sin tables are precomputed up to ``max_len``.

    The tables are non-persistent buffers: they follow ``.to(device)`` but stay out of
    checkpoints, since they are a pure function of the shape.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (B, H, T, hd) by its positions 0..T-1 (pairs of halves)."""
        t = x.shape[-2]
        cos = self.cos[:t].to(x.dtype)
        sin = self.sin[:t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# --------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------


def swiglu_hidden(d_ff: int) -> int:
    """SwiGLU width: 2/3 of ``d_ff`` rounded up to a multiple of 8.

    Why: SwiGLU has three matrices instead of two, so 2/3·d_ff keeps its parameter count equal
    to the GELU MLP with the same ``d_ff`` (the LLaMA convention), and the size table stays
    comparable across ``mlp: swiglu|gelu``. Multiples of 8 keep tensor cores happy.
    """
    return max(8, 8 * math.ceil(2 * d_ff / 3 / 8))


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = swiglu_hidden(d_ff)
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.residual_proj = True  # scaled init, see init_gpt_weights
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


class GeluMLP(nn.Module):
    """The GPT-2 MLP: down(GELU(up(x)))."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.down.residual_proj = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate="tanh")))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    d_model, d_ff = cfg.resolved("d_model"), cfg.resolved("d_ff")
    if cfg.mlp == "swiglu":
        return SwiGLU(d_model, d_ff, cfg.dropout)
    return GeluMLP(d_model, d_ff, cfg.dropout)


# --------------------------------------------------------------------------------------------
# LoRA and the attention variants
# --------------------------------------------------------------------------------------------


class LoRAAdapter(nn.Module):
    """Low-rank update ``x @ A.T @ B.T * (alpha / r)`` added to a (still trainable) projection.

    B starts at zero so a LoRA model is exactly the baseline at step 0; the variants then differ
    only in the extra low-rank capacity the search report compares. The scale is ``alpha / r``
    with a fixed ``alpha = 16`` (the LoRA paper's convention): under Adam each of the r directions
    moves by about lr per step, so dividing by r keeps the update of B·A, and hence the effective
    learning rate, independent of the rank. (With scale 1, rank 256 adapters made training
    visibly noisier than rank 32 ones at the same learning rate.)
    """

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.empty(d_out, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


@dataclass(frozen=True)
class AttentionSpec:
    """What an attention variant switches on.

    ``lora_ranks`` = (query/key rank, value/output rank) or None; ``rope`` = rotary positions
    (the model then drops absolute positions); ``bias`` = biases on the qkv and output projections.
    """

    lora_ranks: tuple[int, int] | None
    rope: bool
    bias: bool


def attention_spec(variant: str, use_rope: bool = False) -> AttentionSpec:
    """Map a search-report variant to its switches. ``use_rope`` turns RoPE on for any variant."""
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"model.attention: {variant!r} is not one of {', '.join(ATTENTION_VARIANTS)}")
    if variant.startswith("lora_"):
        return AttentionSpec(LORA_RANKS[variant], rope=use_rope, bias=False)
    if variant.startswith("enhanced_"):
        return AttentionSpec(LORA_RANKS[variant], rope=True, bias=True)
    if variant == "rope_only":
        return AttentionSpec(None, rope=True, bias=False)
    if variant == "bias_only":
        return AttentionSpec(None, rope=use_rope, bias=True)
    return AttentionSpec(None, rope=use_rope, bias=False)  # baseline


# --------------------------------------------------------------------------------------------
# Sliding-window (local) attention: SDPA with a dense mask, or FlexAttention with a block mask
# --------------------------------------------------------------------------------------------
#
# Token i sees key j iff ``i - w < j <= i``. SDPA has no window argument, so its path passes a
# dense (T, T) boolean mask: exact and available everywhere, but O(T²) memory for the mask and
# O(T²·hd) work, since the kernel still visits every (query, key) pair. FlexAttention takes a
# *block* mask instead: the (T/128)² table of which 128×128 tiles hold any visible pair; the
# compiled kernel skips the empty tiles, so a window costs O(T·w) work (about T/128 · (w/128 + 1)
# tiles) and the mask O((T/128)²) ints. On the lent H100 (bf16, B8 H8 hd64, w256, fwd+bwd) Flex
# was slower than SDPA's flash kernel at T=1024 (0.72 vs 0.49 ms) and faster from T=4096 on
# (1.21 vs 1.45 ms; 1.61 vs 4.71 ms at 8192), hence the "auto" threshold below.
#
# The choice is a process-wide policy, not a model hyperparameter: it changes speed, never the
# result (both paths compute the same softmax over the same keys), so it stays out of ModelConfig
# and of checkpoints. Set it with the environment variable KUBEARCH_LOCAL_ATTENTION (read once,
# at the first local-attention call) or with set_local_attention_backend().

LOCAL_ATTENTION_ENV = "KUBEARCH_LOCAL_ATTENTION"
LOCAL_ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
#: "auto" uses Flex from this length on (measured crossover between 1K and 4K, see above).
FLEX_MIN_SEQ_LEN = 2048
#: FlexAttention's default tile; "auto" also asks T to be a multiple of it (see resolve_local_backend).
FLEX_BLOCK_SIZE = 128
#: Flex's Triton (CUDA) kernel needs head dim >= 16 (tl.dot's minimum).
FLEX_MIN_HEAD_DIM = 16
_CACHE_ENTRIES = 8  # generate() grows T by one per step: keep the mask caches bounded

_policy: str | None = None  # None until first read from the environment
_dense_masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_block_masks: dict[tuple[int, int, torch.device], BlockMask] = {}
_compiled_flex: Callable[..., torch.Tensor] | None = None
_warned: set[str] = set()


def _check_backend(name: str, origin: str) -> str:
    if name not in LOCAL_ATTENTION_BACKENDS:
        raise ValueError(f"{origin}: {name!r} is not one of {', '.join(LOCAL_ATTENTION_BACKENDS)}")
    return name


def set_local_attention_backend(name: str | None) -> None:
    """Set the process-wide local-attention policy; ``None`` re-reads the environment next call."""
    global _policy
    _policy = None if name is None else _check_backend(name, "local attention backend")


def local_attention_backend() -> str:
    """The process-wide policy: "auto" (default), "sdpa" or "flex"."""
    global _policy
    if _policy is None:
        raw = os.environ.get(LOCAL_ATTENTION_ENV, "auto").strip().lower() or "auto"
        _policy = _check_backend(raw, f"environment variable {LOCAL_ATTENTION_ENV}")
    return _policy


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def resolve_local_backend(
    backend: str, device: torch.device, t: int, head_dim: int, needs_grad: bool, dropout_p: float = 0.0
) -> str:
    """The kernel that will actually run ("sdpa" or "flex") for one call.

    - "sdpa": always SDPA with the dense mask.
    - "auto": Flex on CUDA for training-shaped inputs (T >= FLEX_MIN_SEQ_LEN, T a multiple of the
      128 tile, head dim >= 16, no attention dropout), else SDPA. The multiple-of-128 condition keeps
      ``generate()``, whose T grows by one per step, on SDPA: Flex is compiled with static shapes
      and would recompile for every new length.
    - "flex": Flex wherever it can compute the same thing; it falls back to SDPA (warning once)
      where it cannot: attention dropout (Flex has none), head dims below 16 on CUDA (its Triton
      kernel's minimum) and autograd on CPU (torch <= 2.15 has no FlexAttention backward on CPU,
      only inference).
    """
    backend = _check_backend(backend, "local attention backend")
    if backend == "sdpa":
        return "sdpa"
    if backend == "auto":
        long_enough = t >= FLEX_MIN_SEQ_LEN and t % FLEX_BLOCK_SIZE == 0
        flex_ok = device.type == "cuda" and long_enough and head_dim >= FLEX_MIN_HEAD_DIM
        return "flex" if flex_ok and dropout_p == 0.0 else "sdpa"
    if dropout_p > 0.0:
        _warn_once("dropout", "local attention 'flex': FlexAttention has no dropout; using SDPA instead")
        return "sdpa"
    if device.type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM:
        _warn_once(
            "head-dim",
            f"local attention 'flex': FlexAttention on CUDA needs head dim >= {FLEX_MIN_HEAD_DIM}, "
            f"got {head_dim}; using SDPA instead",
        )
        return "sdpa"
    if device.type == "cpu" and needs_grad:
        _warn_once(
            "cpu-grad",
            "local attention 'flex': FlexAttention has no backward on CPU in this torch; using SDPA "
            "for calls that need gradients (inference still uses Flex)",
        )
        return "sdpa"
    return "flex"


def sliding_window_mask(t: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend key j: ``i - window < j <= i``."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & (j > i - window)


@torch.compiler.disable
def _store(cache: dict, key: tuple[int, int, torch.device], build: Callable[[], Any]) -> Any:
    """Build and cache a mask *outside* any torch.compile graph.

    Why the split between lookup (traceable) and build (compiler.disable): when a compiled model
    calls the lookup, the first trace misses and breaks the graph here once; the next call
    retraces, finds the entry and bakes the cached mask into a graph without breaks. Tracing the
    build instead would recompute the mask over all T² pairs inside the graph on every step.
    """
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()
    value = cache[key] = build()
    return value


def window_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """The dense (T, T) SDPA mask, cached per (T, window, device) and shared by every layer."""
    mask = _dense_masks.get((t, window, device))
    if mask is None:
        mask = _store(_dense_masks, (t, window, device), lambda: sliding_window_mask(t, window, device))
    return mask


def _sliding_block_mask(t: int, window: int, device: torch.device) -> BlockMask:
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:  # flex's mask_mod
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    # B=None, H=None: one mask broadcast over batch and heads.
    return create_block_mask(sliding, None, None, t, t, device=device, BLOCK_SIZE=FLEX_BLOCK_SIZE)


def window_block_mask(t: int, window: int, device: torch.device) -> BlockMask:
    """FlexAttention's block mask for the causal window, cached per (T, window, device).

    Building it evaluates the mask on all T² pairs once; the cache makes that a one-off cost.
    """
    mask = _block_masks.get((t, window, device))
    if mask is None:
        mask = _store(_block_masks, (t, window, device), lambda: _sliding_block_mask(t, window, device))
    return mask


def _flex() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)``, built once per process: uncompiled, Flex materialises
    the full score matrix (slower than SDPA and O(T²) memory)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    backend: str | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal sliding-window attention: query i attends keys j with ``i - window < j <= i``.

    ``q, k, v``: (B, H, T, hd). ``backend``: "auto" | "sdpa" | "flex", or None for the process
    policy (:func:`local_attention_backend`); see :func:`resolve_local_backend` for what each
    picks. A window at least T long is plain causal attention and always takes SDPA's
    ``is_causal`` path (flash kernel on GPU, no mask at all).
    """
    t = q.size(-2)
    if window >= t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    policy = backend or local_attention_backend()
    name = resolve_local_backend(policy, q.device, t, q.size(-1), needs_grad, dropout_p)
    if name == "flex":
        return _flex()(q, k, v, block_mask=window_block_mask(t, window, q.device))
    mask = window_mask(t, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Without a window (dense, MoE) this is SDPA with ``is_causal=True`` and no mask, the fastest
    path: SDPA can then pick the flash kernel on GPU. ``window`` (optional) limits each query to
    the last ``window`` keys (itself included); the hybrid family uses it for local attention,
    computed by :func:`local_attention` (SDPA with a dense mask, or FlexAttention with a block
    mask, per the process policy :func:`local_attention_backend`).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        spec: AttentionSpec,
        max_seq_len: int,
        dropout: float = 0.0,
        window: int | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.window = window
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=spec.bias)
        self.out = nn.Linear(d_model, d_model, bias=spec.bias)
        self.out.residual_proj = True
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = RotaryEmbedding(self.head_dim, max_seq_len) if spec.rope else None
        if spec.lora_ranks is not None:
            r_qk, r_vo = spec.lora_ranks
            self.lora_q = LoRAAdapter(d_model, d_model, r_qk)
            self.lora_k = LoRAAdapter(d_model, d_model, r_qk)
            self.lora_v = LoRAAdapter(d_model, d_model, r_vo)
            self.lora_o = LoRAAdapter(d_model, d_model, r_vo)
        else:
            self.lora_q = self.lora_k = self.lora_v = self.lora_o = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        if self.lora_q is not None:
            q = q + self.lora_q(x)
            k = k + self.lora_k(x)
            v = v + self.lora_v(x)
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        dropout_p = self.dropout if self.training else 0.0
        if self.window is not None:
            y = local_attention(q, k, v, self.window, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(b, t, d)
        out = self.out(y)
        if self.lora_o is not None:
            out = out + self.lora_o(y)
        return self.resid_dropout(out)


def make_attention(cfg: ModelConfig, window: int | None = None) -> CausalSelfAttention:
    return CausalSelfAttention(
        cfg.resolved("d_model"),
        cfg.resolved("n_heads"),
        attention_spec(cfg.attention, cfg.use_rope),
        cfg.max_seq_len,
        cfg.dropout,
        window,
    )


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    The submodule names ``norm1``, ``attn``, ``norm2``, ``mlp`` are part of the contract: the 2π
    regulariser hooks them by name.
    """

    def __init__(self, cfg: ModelConfig, mlp: nn.Module | None = None, window: int | None = None) -> None:
        super().__init__()
        d_model = cfg.resolved("d_model")
        self.norm1 = make_norm(d_model, cfg.use_rmsnorm)
        self.attn = make_attention(cfg, window)
        self.norm2 = make_norm(d_model, cfg.use_rmsnorm)
        self.mlp = mlp if mlp is not None else make_mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def init_gpt_weights(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """nanoGPT's init: N(0, 0.02) for linears and embeddings, zero biases, and residual output
    projections (marked ``residual_proj``) scaled by 1/sqrt(2·n_layers) so the residual stream's
    variance does not grow with depth. LoRA adapters are reset afterwards so B stays zero."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            proj_std = std / math.sqrt(2 * n_layers) if getattr(module, "residual_proj", False) else std
            nn.init.normal_(module.weight, mean=0.0, std=proj_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
    for module in model.modules():
        if isinstance(module, LoRAAdapter):
            module.reset_parameters()


# --------------------------------------------------------------------------------------------
# Language-model base class
# --------------------------------------------------------------------------------------------


class CausalLM(KubearchModel):
    """Shared LM plumbing: loss and metrics from ``logits``, auxiliary losses, sampling.

    A family implements :meth:`logits` (``input_ids`` [B, T] -> logits [B, T, V]) and, if it has
    auxiliary losses, :meth:`aux_losses` (weighted terms, added to the loss and reported).
    """

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Weighted auxiliary losses of the last forward (e.g. MoE load balancing)."""
        return {}

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``self.blocks`` in order; each recomputed in backward when gradient checkpointing is on."""
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        """``{"input_ids", "targets"?}`` -> loss = CE (+ aux), metrics ``ce_loss`` (+ ``accuracy``).

        Targets equal to -100 are ignored. Without targets the loss is a zero tensor and only the
        logits are meaningful (inference).

        Training with targets returns no logits and computes no accuracy (the
        :class:`~kubearch_trainer.models.base.ModelOutput` contract): a returned [B, T, V] tensor
        would stay allocated until the caller drops the output, i.e. through the whole backward
        pass (and under torch.compile it must be materialised as a graph output), and the argmax
        over the fp32 logits is a full extra pass over them that nothing reads during training.
        On the first GPU run (H200, 512d × 8L, 64 × 1024 tokens, V = 50,304) the trainer held
        13 GB more than a plain GPT because of them. In eval mode both are kept: validation
        exports the accuracy, and eval-time callers may want the logits.
        """
        input_ids = batch["input_ids"]
        logits = self.logits(input_ids)
        aux = self.aux_losses()
        targets = batch.get("targets")
        if targets is None:
            return ModelOutput(loss=logits.new_zeros(()), metrics={}, logits=logits)
        flat_logits = logits.float().view(-1, logits.size(-1))
        flat_targets = targets.reshape(-1)
        ce = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
        loss = ce
        for value in aux.values():
            loss = loss + value
        metrics = {"ce_loss": ce.detach()}
        if not self.training:
            metrics["accuracy"] = token_accuracy(flat_logits, flat_targets)
        metrics.update({name: value.detach() for name, value in aux.items()})
        return ModelOutput(loss=loss, metrics=metrics, logits=None if self.training else logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_length: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Sample until the sequences are ``max_length`` tokens long (prompt included).

        Each step re-runs the model on the last ``max_seq_len`` tokens (no KV cache: simple and
        the same for every family). ``temperature <= 0`` means greedy decoding; ``top_k`` keeps
        only the k most likely tokens before sampling.
        """
        was_training = self.training
        self.eval()
        ids = input_ids
        while ids.size(1) < max_length:
            context = ids[:, -self.cfg.max_seq_len :]
            logits = self.logits(context)[:, -1, :].float()
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            ids = torch.cat((ids, next_id), dim=1)
        self.train(was_training)
        return ids
