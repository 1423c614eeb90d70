"""``cnn``: an image classifier of residual conv blocks with batch norm (task ``image_cls``).

Layout (the model guide's "Conv Block → N × [Conv/Residual Blocks] → Global Pooling →
Classifier"): a 3×3 conv stem, ``depth`` basic residual blocks (two 3×3 conv + BatchNorm + ReLU,
identity or 1×1 projection shortcut) grouped into up to four stages (two blocks each) that double
the channels (capped at 4× the base) and halve the resolution, global average pooling, dropout,
and a linear classifier over ``model.num_classes``. Width/depth per ``--model-size``: tiny 16ch/2,
small 64ch/4, medium 128ch/6, large 256ch/8 blocks (``--d-model`` / ``--n-layers`` override).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models.base import KubearchModel, ModelOutput
from kubearch_trainer.models.image_blocks import family_dims
from kubearch_trainer.models.registry import register


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(self.drop(h)))
        return F.relu(h + self.shortcut(x))


@register("cnn", task="image_cls")
class CNNClassifier(KubearchModel):
    """Residual CNN classifier; :meth:`extract_features` gives the pooled feature vector.

    ``--use-gradient-checkpointing`` is ignored here: recomputing a block in backward would apply
    BatchNorm's running-statistics update twice, and the blocks are small anyway.
    """

    task = "image_cls"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        width, depth = family_dims(cfg, "cnn")
        depth = max(1, depth)
        stages = min(4, max(1, (depth + 1) // 2))
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.image_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks, ch, side, stage = [], width, cfg.image_size, 0
        for i in range(depth):
            s = i * stages // depth
            stride = 1
            if s != stage:
                stage = s
                if side >= 4:
                    stride, side = 2, (side + 1) // 2
            out = width * min(2**s, 4)
            blocks.append(BasicBlock(ch, out, stride, cfg.dropout))
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = ch
        self.arch_dims = {"base_channels": width, "blocks": depth, "stages": stages, "feature_dim": ch}
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(ch, cfg.num_classes)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features [B, feature_dim] (for probes, retrieval, transfer)."""
        return self.blocks(self.stem(images)).mean(dim=(2, 3))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        features = self.extract_features(batch["images"])
        logits = self.classifier(self.dropout(features))
        labels = batch.get("labels")
        if labels is None:
            return ModelOutput(loss=logits.new_zeros(()), logits=logits, regulated={"features": features})
        ce = F.cross_entropy(logits.float(), labels)
        metrics = {"ce_loss": ce.detach()}
        if not self.training:  # ModelOutput's rule: no logits, no accuracy while training
            metrics["accuracy"] = (logits.detach().argmax(-1) == labels).float().mean()
        return ModelOutput(
            loss=ce,
            metrics=metrics,
            logits=None if self.training else logits,
            regulated={"features": features},
        )
