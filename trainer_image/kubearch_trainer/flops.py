"""Model FLOPs per token, from the configuration, and MFU.

Why a formula and not a profiler: MFU (model FLOPs utilisation) compares the work the *model*
needs with what the chip could do, so it must not credit recomputation (gradient checkpointing)
or penalise a fused kernel that skips work. The convention is the one of issue 5's targets (and
nanoGPT / PaLM): a training step (forward + backward) costs

    6 · N_matmul  +  12 · L_attn · d · T_attn            FLOPs per token

- ``6 · N_matmul``: every weight takes part in one multiply-add per token in the forward pass
  (2 FLOPs) and two in the backward pass (4 FLOPs). ``N_matmul`` is every parameter except pure
  lookup tables (position embeddings; the input token embedding when it is *not* tied to the
  output head). With tied embeddings the shared matrix is counted once, for the output head.
  Norm weights, biases and Mamba's ``A_log``/``D`` are tiny and counted too (the convention's
  "6·params"); for MoE only the *active* parameters count (shared + top-k experts + router).
- ``12 · L_attn · d · T_attn``: attention scores ``QKᵀ`` and ``P·V`` cost ``2·T·d`` each per
  token in the forward pass, times 3 for forward + backward. As in the convention, causal
  masking is *not* halved. ``T_attn`` is the sequence length for full attention and
  ``min(T, window)`` for the hybrid's sliding-window attention (a token sees at most ``window``
  keys, so the term stops growing with T).
- Mamba's selective scan is no matmul: per token, channel and state it does ``exp(δ·A)``, ``δ·u·B``,
  ``a·h + b`` and ``C·h`` (7 FLOPs forward, counting ``exp`` as one) and about twice that
  backward, so ``3 · 7 · d_inner · N`` per Mamba layer. The depthwise conv and all projections are
  weights, hence already in ``6 · N``.

The analytic parameter count below mirrors the trainer's model classes (``models/*.py``); when a
built model is at hand, pass it (``model=``) and its real (active) parameter count is used instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from kubearch_trainer.config import LORA_RANKS, ModelConfig, family_dims

if TYPE_CHECKING:  # torch is only needed when a built model is passed
    from torch import nn

#: H100 SXM dense bf16 peak (no sparsity), the denominator issue 5 prescribes.
H100_BF16_PEAK_FLOPS = 989e12
#: Forward FLOPs of the selective scan per (token, channel, state): exp(δA), δuB, a·h+b, C·h.
SCAN_FWD_FLOPS_PER_STATE = 7
#: Forward + backward multiplier used for every term (backward ≈ 2 × forward).
FWD_BWD = 3


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a sequence model (analytic or measured)."""

    total: int
    active: int  #: used per token (differs from ``total`` only for MoE)
    lookup_only: int  #: embedding tables that do no matmul (positions, untied input embedding)

    @property
    def matmul_active(self) -> int:
        """The ``N`` of ``6·N``: active parameters minus pure lookup tables."""
        return self.active - self.lookup_only


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token (forward + backward), by term."""

    params_term: float  #: 6 · N_matmul
    attention_term: float  #: 12 · L_attn · d · T_attn
    scan_term: float  #: 3 · 7 · d_inner · N · L_mamba
    matmul_params: int

    @property
    def total(self) -> float:
        return self.params_term + self.attention_term + self.scan_term

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def dt_rank(d_model: int) -> int:
    """Mamba's Δ projection rank, ``ceil(d_model / 16)`` as in the Mamba paper."""
    return math.ceil(d_model / 16)


def layer_kinds(cfg: ModelConfig) -> list[str]:
    """Mixer of each layer: ``attention``, ``moe`` (attention + routed experts) or ``mamba``.

    The hybrid makes every ``hybrid_attention_every``-th layer (1-based) local attention.
    """
    n = cfg.resolved("n_layers")
    if cfg.architecture == "dense":
        return ["attention"] * n
    if cfg.architecture == "moe":
        return ["moe"] * n
    if cfg.architecture == "mamba":
        return ["mamba"] * n
    if cfg.architecture == "hybrid":
        k = cfg.hybrid_attention_every
        return ["attention" if (i + 1) % k == 0 else "mamba" for i in range(n)]
    raise ValueError(
        f"model.architecture: FLOPs are defined for dense, mamba, moe, hybrid, not {cfg.architecture!r}"
    )


def _norm_params(cfg: ModelConfig, d: int) -> int:
    return d  # RMSNorm, or LayerNorm without bias (models/layers.make_norm)


def swiglu_hidden(d_ff: int) -> int:
    """SwiGLU width used by ``models/layers.SwiGLU``: 2/3·d_ff rounded up to a multiple of 8."""
    return max(8, 8 * math.ceil(2 * d_ff / 3 / 8))


def _mlp_params(cfg: ModelConfig, d: int, ff: int) -> int:
    return 3 * d * swiglu_hidden(ff) if cfg.mlp == "swiglu" else 2 * d * ff


def _attention_params(cfg: ModelConfig, d: int) -> int:
    params = 4 * d * d
    if cfg.attention in LORA_RANKS:  # LoRA adapters A (d×r) and B (r×d) on q, k (rank r_qk) and v, o
        r_qk, r_vo = LORA_RANKS[cfg.attention]
        params += 2 * (2 * d * r_qk) + 2 * (2 * d * r_vo)
    if cfg.attention == "bias_only" or cfg.attention.startswith("enhanced"):
        params += 4 * d
    return params


def mamba_mixer_params(d: int, d_state: int, d_conv: int, expand: int) -> int:
    """Mamba-1 block: in_proj (x, z), depthwise conv, x_proj (Δ, B, C), dt_proj, A_log, D, out_proj."""
    di, r = expand * d, dt_rank(d)
    return (
        d * 2 * di  # in_proj
        + di * d_conv
        + di  # conv weight + bias
        + di * (r + 2 * d_state)  # x_proj
        + r * di
        + di  # dt_proj weight + bias
        + di * d_state
        + di  # A_log, D
        + di * d  # out_proj
    )


def _uses_rope(cfg: ModelConfig) -> bool:
    return cfg.use_rope or cfg.attention == "rope_only" or cfg.attention.startswith("enhanced")


#: Gates per recurrent cell (nn.LSTM 4, nn.GRU 3, nn.RNN 1).
RECURRENT_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _recurrent_params(cfg: ModelConfig) -> ParamCount:
    """``models/recurrent.py``: embedding, ``depth`` cells (weight_ih, weight_hh, two biases per
    gate), LayerNorm, head (tied to the embedding unless ``tie_embeddings`` is off)."""
    h, depth = family_dims(cfg, "recurrent")
    depth = max(1, depth)
    cells = depth * RECURRENT_GATES[cfg.architecture] * (2 * h * h + 2 * h)
    total = cfg.vocab_size * h + cells + 2 * h
    lookup = 0
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * h
        lookup = cfg.vocab_size * h
    return ParamCount(total=total, active=total, lookup_only=lookup)


def _cnn_params(cfg: ModelConfig) -> ParamCount:
    """``models/cnn.py``: stem conv + BN, ``depth`` basic blocks in up to four stages (same stride
    and channel rule as the model), and the classifier."""
    width, depth = family_dims(cfg, "cnn")
    depth = max(1, depth)
    stages = min(4, max(1, (depth + 1) // 2))
    total = cfg.image_channels * width * 9 + 2 * width
    ch, side, stage = width, cfg.image_size, 0
    for i in range(depth):
        s = i * stages // depth
        stride = 1
        if s != stage:
            stage = s
            if side >= 4:
                stride, side = 2, (side + 1) // 2
        out = width * min(2**s, 4)
        total += ch * out * 9 + 2 * out + out * out * 9 + 2 * out  # conv1, bn1, conv2, bn2
        if stride != 1 or ch != out:
            total += ch * out + 2 * out  # 1x1 projection shortcut + BN
        ch = out
    total += ch * cfg.num_classes + cfg.num_classes
    return ParamCount(total=total, active=total, lookup_only=0)


def count_params(cfg: ModelConfig) -> ParamCount:
    """Analytic parameter count of the trainer's sequence, recurrent and CNN models.

    Exact (the tests compare it with built models); the operator's GPU matrix sizes runs with it.
    The VAE and diffusion families are sized by name in the matrix and are not counted here.
    """
    if cfg.architecture in RECURRENT_GATES:
        return _recurrent_params(cfg)
    if cfg.architecture == "cnn":
        return _cnn_params(cfg)
    d, ff, v = cfg.resolved("d_model"), cfg.resolved("d_ff"), cfg.vocab_size
    total = active = 0
    for kind in layer_kinds(cfg):
        if kind == "mamba":
            block = _norm_params(cfg, d) + mamba_mixer_params(d, cfg.state_size, cfg.conv_size, cfg.expand)
            total, active = total + block, active + block
        elif kind == "attention":
            block = 2 * _norm_params(cfg, d) + _attention_params(cfg, d) + _mlp_params(cfg, d, ff)
            total, active = total + block, active + block
        else:  # moe: attention + router + experts, of which top-k are active
            shared = 2 * _norm_params(cfg, d) + _attention_params(cfg, d) + d * cfg.num_experts
            expert = _mlp_params(cfg, d, ff)
            total += shared + cfg.num_experts * expert
            active += shared + cfg.expert_capacity * expert
    head = _norm_params(cfg, d) + v * d  # final norm + token embedding (tied head)
    lookup = 0
    if not cfg.tie_embeddings:
        head += v * d
        lookup += v * d
    if cfg.architecture in ("dense", "moe") and not _uses_rope(cfg) and cfg.position_embedding == "learned":
        head += cfg.max_seq_len * d
        lookup += cfg.max_seq_len * d
    return ParamCount(total=total + head, active=active + head, lookup_only=lookup)


def measured_params(model: nn.Module) -> ParamCount:
    """The same counts read off a built model.

    ``lookup_only`` is every ``nn.Embedding`` weight that no ``nn.Linear`` shares (a tied head
    shares the token embedding, which then counts as a matmul weight).
    """
    from torch import nn

    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    lookup = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Embedding) and id(m.weight) not in linear_ids
    )
    total = sum(p.numel() for p in model.parameters())
    active_fn = getattr(model, "active_params", None)
    active = int(active_fn()) if callable(active_fn) else total
    return ParamCount(total=total, active=active, lookup_only=lookup)


def flops_per_token(cfg: ModelConfig, seq_len: int, model: nn.Module | None = None) -> FlopsPerToken:
    """Training FLOPs per token of ``cfg`` at sequence length ``seq_len`` (forward + backward).

    With ``model`` the parameter term uses the built model's real active count.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    params = measured_params(model) if model is not None else count_params(cfg)
    d = cfg.resolved("d_model")
    kinds = layer_kinds(cfg)
    t_attn = min(seq_len, cfg.hybrid_local_window) if cfg.architecture == "hybrid" else seq_len
    n_attn = sum(k in ("attention", "moe") for k in kinds)
    n_mamba = sum(k == "mamba" for k in kinds)
    return FlopsPerToken(
        params_term=6.0 * params.matmul_active,
        attention_term=12.0 * n_attn * d * t_attn,
        scan_term=float(FWD_BWD * SCAN_FWD_FLOPS_PER_STATE * cfg.expand * d * cfg.state_size * n_mamba),
        matmul_params=params.matmul_active,
    )


def gpt_flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Issue 5's convention verbatim: ``6·params + 12·L·d·T`` (used for the plain GPT baseline)."""
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation as a fraction: achieved model FLOP/s over the chip's peak."""
    if peak <= 0:
        raise ValueError(f"peak must be > 0 FLOP/s, got {peak}")
    return tokens_per_s * flops_per_token / peak
