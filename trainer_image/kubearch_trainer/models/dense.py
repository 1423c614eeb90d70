"""Dense decoder-only transformer (GPT), the baseline every other family is compared with.

token embedding (+ learned or sinusoidal positions unless the attention variant uses RoPE)
-> n_layers pre-norm :class:`~kubearch_trainer.models.layers.TransformerBlock`
-> final norm -> LM head (tied to the embedding when ``tie_embeddings``).
"""

from __future__ import annotations

import torch
from torch import nn

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models.layers import (
    CausalLM,
    TransformerBlock,
    attention_spec,
    init_gpt_weights,
    make_norm,
    sinusoidal_table,
)
from kubearch_trainer.models.registry import register


@register("dense", task="lm")
class DenseGPT(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d_model, n_layers = cfg.resolved("d_model"), cfg.resolved("n_layers")
        self.tok_emb = nn.Embedding(cfg.vocab_size, d_model)
        # RoPE (from use_rope or the variant) replaces absolute positions entirely.
        self.uses_rope = attention_spec(cfg.attention, cfg.use_rope).rope
        self.pos_emb: nn.Embedding | None = None
        if not self.uses_rope:
            if cfg.position_embedding == "learned":
                self.pos_emb = nn.Embedding(cfg.max_seq_len, d_model)
            else:
                self.register_buffer(
                    "pos_table", sinusoidal_table(cfg.max_seq_len, d_model), persistent=False
                )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(self.make_block(cfg, i) for i in range(n_layers))
        self.norm_f = make_norm(d_model, cfg.use_rmsnorm)
        self.lm_head = nn.Linear(d_model, cfg.vocab_size, bias=False)
        init_gpt_weights(self, n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def make_block(self, cfg: ModelConfig, layer: int) -> nn.Module:
        """One block; the MoE family overrides this to swap the MLP for a router over experts."""
        return TransformerBlock(cfg)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.size(1)
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:t]
        elif not self.uses_rope:
            x = x + self.pos_table[:t].to(x.dtype)
        return self.drop(x)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        return self.lm_head(self.norm_f(self.run_blocks(x)))
