"""Hybrid: Mamba blocks for long-range context interleaved with local sliding-window attention.

Layer i (0-based) is a local-attention :class:`~kubearch_trainer.models.layers.TransformerBlock`
when ``(i + 1) % hybrid_attention_every == 0`` and a :class:`~kubearch_trainer.models.mamba.MambaBlock`
otherwise; with the default every=2 and 4 layers: Mamba, Attn, Mamba, Attn. The first layer is
always Mamba (unless every=1), so attention sees order already mixed in by the recurrence and the
model needs no position embeddings (RoPE is still applied if the attention variant asks for it).

Attention is restricted to a window w: token i sees token j iff ``i - w < j <= i``, computed by
:func:`~kubearch_trainer.models.layers.local_attention`. Two exact kernels, same result:

- FlexAttention with a cached block mask (compiled once per process): skips the 128×128 tiles
  outside the window, so attention costs O(T·w) time and memory. Chosen by default on CUDA from
  T = 2048 (on the H100 it loses to SDPA's flash kernel at 1K and wins from 4K);
- SDPA with a cached dense (T, T) boolean mask: O(T²) memory and work, runs everywhere (CPU,
  training on CPU, attention dropout, short sequences).

``KUBEARCH_LOCAL_ATTENTION=auto|sdpa|flex`` overrides the choice for the process.
"""

from __future__ import annotations

import torch
from torch import nn

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models.layers import CausalLM, TransformerBlock, init_gpt_weights, make_norm
from kubearch_trainer.models.mamba import MambaBlock, init_mamba_weights
from kubearch_trainer.models.registry import register


def is_attention_layer(layer: int, every: int) -> bool:
    return (layer + 1) % every == 0


@register("hybrid", task="lm")
class Hybrid(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d_model, n_layers = cfg.resolved("d_model"), cfg.resolved("n_layers")
        self.tok_emb = nn.Embedding(cfg.vocab_size, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg, window=cfg.hybrid_local_window)
            if is_attention_layer(i, cfg.hybrid_attention_every)
            else MambaBlock(cfg)
            for i in range(n_layers)
        )
        self.norm_f = make_norm(d_model, cfg.use_rmsnorm)
        self.lm_head = nn.Linear(d_model, cfg.vocab_size, bias=False)
        # Each kind keeps its own init: Mamba's (embedding, out_proj scaling; its dt_proj/A_log/D
        # set in MambaMixer) everywhere, then GPT's N(0, 0.02) on the attention blocks only.
        init_mamba_weights(self, n_layers)
        for block in self.blocks:
            if isinstance(block, TransformerBlock):
                init_gpt_weights(block, n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        return self.lm_head(self.norm_f(self.run_blocks(x)))
