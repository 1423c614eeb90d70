"""The contract every architecture implements, so one train loop serves all families.

A model takes a batch dict and returns a :class:`ModelOutput`: the loss to backpropagate and a
few detached scalar metrics. The train loop never looks inside; a new family (or a user plugin)
only has to subclass :class:`KubearchModel` and register a name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from kubearch_trainer.config import ModelConfig

#: Task kinds; the data layer builds a matching data set for each.
TASKS = ("lm", "image_recon", "image_gen", "image_cls")


@dataclass
class ModelOutput:
    """What a forward pass returns.

    ``loss`` is the scalar that training backpropagates (main loss plus auxiliary terms).
    ``metrics`` holds detached 0-d tensors (e.g. ``ce_loss``, ``accuracy``, ``aux_loss``); the
    loop averages them over eval batches and exports them. Keep them tensors: reading them with
    ``.item()`` every step would synchronise the GPU.

    ``logits`` is the model's output before the loss ([B, T, V] for language models, [B, classes]
    for classifiers, image logits for VAEs). Every built-in family (and a plugin should too) leaves
    it ``None`` in training mode whenever a loss is computed (targets, labels or images given):
    anything the output holds stays allocated until the train loop drops it after backward, and
    for an LM that is B·T·V values, often the largest tensor of the step. Likewise ``accuracy``
    (an argmax over those logits) is computed only outside training mode: the accuracy the loop
    exports is the validation one. In eval mode, and for inference without targets, ``logits``
    is set.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    #: Tensors (with grad) the model offers to the 2π regulariser, e.g. ``{"latent_logvar": ...}``
    #: for VAEs or ``{"noise_pred": ...}`` for diffusion. Transformers are regulated through hooks.
    regulated: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def token_accuracy(flat_logits: torch.Tensor, flat_targets: torch.Tensor) -> torch.Tensor:
    """Share of non-ignored targets (!= -100) whose argmax prediction is right (a 0-d tensor).

    The sequence families' ``accuracy`` metric (eval mode only, see :class:`ModelOutput`)."""
    valid = flat_targets != -100
    correct = (flat_logits.argmax(dim=-1) == flat_targets) & valid
    return correct.sum().float() / valid.sum().clamp(min=1).float()


class KubearchModel(nn.Module):
    """Base class of every architecture.

    Subclasses set ``task`` and implement ``forward(batch) -> ModelOutput``. Batches per task:

    - ``lm``: ``{"input_ids": LongTensor[B, T], "targets": LongTensor[B, T]}``
    - ``image_recon`` / ``image_gen``: ``{"images": FloatTensor[B, C, H, W]}`` in [0, 1]
      (optionally ``"labels"`` and ``"factors"``)
    - ``image_cls``: ``{"images": ..., "labels": LongTensor[B]}``
    """

    task: ClassVar[str] = "lm"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_params(self) -> int:
        """All parameters (embeddings included)."""
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters used per token; differs from :meth:`num_params` only for sparse models (MoE)."""
        return self.num_params()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations of each block in backward (families honour the flag in forward)."""
        self.gradient_checkpointing = enabled

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """Model-specific state the metrics endpoint exports (e.g. MoE per-expert token counts)."""
        return {}
