"""The smallest useful language model, as a plugin: a learned next-token table.

Import it with ``kubearch-train --plugin my_pkg.bigram`` (or ``model.plugin: my_pkg.bigram`` in the
config / a TrainingRun's spec) from a directory where ``my_pkg`` is importable; it registers the
architecture ``bigram``. A cluster needs the package inside the trainer image (e.g. a
``COPY my_pkg /app/my_pkg`` layer on top of kubearch's image, with ``PYTHONPATH`` covering it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models import KubearchModel, ModelOutput, register
from torch import nn


@register("bigram", task="lm")  # task: lm | image_recon | image_gen | image_cls
class Bigram(KubearchModel):
    """Logits for the next token from the current one alone."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        logits = self.table(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        # No logits while training (ModelOutput's rule): the train loop would hold them through backward.
        return ModelOutput(
            loss=loss, metrics={"ce_loss": loss.detach()}, logits=None if self.training else logits
        )
