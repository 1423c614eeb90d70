"""Recurrent language models: ``lstm``, ``gru`` and ``rnn`` (task ``lm``, same batches as ``dense``).

Embedding → ``depth`` stacked recurrent layers (dropout ``model.dropout`` between them) → LayerNorm
→ output projection (tied to the embedding when ``tie_embeddings``). Hidden size = embedding size
per ``--model-size`` (the model guide: small 256/2, medium 512/4, large 1024/4 layers; tiny
128/2; ``--d-model`` / ``--n-layers`` override). Loss and metrics match the transformer's
(``ce_loss``, ``accuracy``; targets of -100 ignored), so the comparison table lines them up.

Unlike the transformer, the state is carried explicitly: ``forward(batch, hidden,
return_hidden=True)`` continues from a previous state (truncated BPTT over consecutive windows),
and :meth:`RecurrentLM.generate` feeds one token per step instead of re-reading the context.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models.base import KubearchModel, ModelOutput, token_accuracy
from kubearch_trainer.models.image_blocks import family_dims
from kubearch_trainer.models.registry import register

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RecurrentLM(KubearchModel):
    """Shared body of the three recurrent families; subclasses pick ``cell``."""

    task = "lm"
    cell: ClassVar[type[nn.RNNBase]] = nn.LSTM

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        hidden, depth = family_dims(cfg, "recurrent")
        self.hidden_size, self.depth = hidden, max(1, depth)
        self.arch_dims = {"hidden_size": hidden, "n_layers": self.depth}
        self.embed = nn.Embedding(cfg.vocab_size, hidden)
        self.rnn = self.cell(
            hidden,
            hidden,
            num_layers=self.depth,
            batch_first=True,
            dropout=cfg.dropout if self.depth > 1 else 0.0,
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)

    def run(
        self, input_ids: torch.Tensor, hidden: Hidden | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
        """(logits [B, T, V], last-layer outputs [B, T, H], new hidden state)."""
        out, new_hidden = self.rnn(self.embed(input_ids), hidden)
        return self.head(self.norm(out)), out, new_hidden

    def forward(
        self, batch: dict[str, torch.Tensor], hidden: Hidden | None = None, return_hidden: bool = False
    ) -> ModelOutput | tuple[ModelOutput, Hidden]:
        """``{"input_ids", "targets"?}`` -> ModelOutput; with ``return_hidden`` also the final state."""
        logits, outputs, new_hidden = self.run(batch["input_ids"], hidden)
        targets = batch.get("targets")
        if targets is None:
            result = ModelOutput(loss=logits.new_zeros(()), logits=logits, regulated={"hidden": outputs})
        else:
            flat_logits = logits.float().reshape(-1, logits.size(-1))
            flat_targets = targets.reshape(-1)
            ce = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
            metrics = {"ce_loss": ce.detach()}
            if not self.training:  # ModelOutput's rule: no logits, no accuracy while training
                metrics["accuracy"] = token_accuracy(flat_logits, flat_targets)
            result = ModelOutput(
                loss=ce,
                metrics=metrics,
                logits=None if self.training else logits,
                regulated={"hidden": outputs},
            )
        return (result, new_hidden) if return_hidden else result

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_length: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample until sequences are ``max_length`` tokens long (prompt included), as ``dense`` does.

        ``temperature <= 0`` is greedy; ``top_k`` keeps the k most likely tokens. The prompt is read
        once, then each new token advances the recurrent state by one step.
        """
        was_training = self.training
        self.eval()
        ids = input_ids
        try:
            if ids.size(1) >= max_length:
                return ids
            logits, _, hidden = self.run(ids)
            last = logits[:, -1].float()
            while ids.size(1) < max_length:
                if temperature <= 0:
                    next_id = last.argmax(-1, keepdim=True)
                else:
                    scaled = last / temperature
                    if top_k is not None:
                        kth = torch.topk(scaled, min(top_k, scaled.size(-1))).values[:, -1:]
                        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                    next_id = torch.multinomial(F.softmax(scaled, -1), 1, generator=generator)
                ids = torch.cat([ids, next_id], dim=1)
                logits, _, hidden = self.run(next_id, hidden)
                last = logits[:, -1].float()
        finally:
            self.train(was_training)
        return ids


@register("lstm", task="lm")
class LSTMLM(RecurrentLM):
    """LSTM language model (input/forget/output gates and a cell state)."""

    cell = nn.LSTM


@register("gru", task="lm")
class GRULM(RecurrentLM):
    """GRU language model (reset/update gates; fewer parameters than the LSTM)."""

    cell = nn.GRU


@register("rnn", task="lm")
class VanillaRNNLM(RecurrentLM):
    """Elman RNN language model (tanh), the baseline the gated cells improve on."""

    cell = nn.RNN
