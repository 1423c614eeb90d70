"""Data sets for every task kind, behind one small protocol the train loop relies on.

The protocol (text here, images in :mod:`kubearch_trainer.data.images`) is deliberately
stateless: a batch is a pure function of ``(seed, step, micro, rank, world)``. That is what makes
``--resume`` exact (no iterator state to checkpoint) and lets DDP ranks draw disjoint shards of
one *global* batch: a data set draws ``world * batch_size`` samples for ``(step, micro)`` and rank
``r`` keeps rows ``[r*batch_size, (r+1)*batch_size)``. So 2 ranks x batch 4 see exactly the rows
that 1 rank x batch 8 sees, and their training is the same up to float reduction order.

A data set implements::

    task: str                 # "lm", "image_recon", "image_gen" or "image_cls"
    tokens_per_sample: int    # throughput unit per sample: seq_len for text, 1 (an image) otherwise
    def get_batch(step: int, micro: int, rank: int, world: int, batch_size: int,
                  device: torch.device) -> dict[str, torch.Tensor]   # training split
    def eval_batches(n: int, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]
        # n validation batches, the same on every call (deterministic, independent of the seed)
    def describe() -> str     # one line for the log: source and split sizes

and the batch dict keys are those of :class:`kubearch_trainer.models.base.KubearchModel`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from kubearch_trainer.config import TrainConfig


class DataError(RuntimeError):
    """The data could not be read or is unusable (too short, wrong field); exit code DATA_ERROR."""


@runtime_checkable
class Dataset(Protocol):
    task: str
    tokens_per_sample: int

    def get_batch(
        self, step: int, micro: int, rank: int, world: int, batch_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]: ...

    def eval_batches(
        self, n: int, batch_size: int, device: torch.device
    ) -> list[dict[str, torch.Tensor]]: ...

    def describe(self) -> str: ...


def build_datasets(cfg: TrainConfig, task: str) -> Dataset:
    """The data set for ``task`` (the model class's task kind) as configured by ``cfg.data``."""
    if task == "lm":
        from kubearch_trainer.data.text import build_text_dataset

        return build_text_dataset(cfg)
    if task.startswith("image"):
        # Imported lazily: the image families live in their own module (and may be absent).
        try:
            from kubearch_trainer.data.images import build_image_datasets
        except ModuleNotFoundError as err:  # pragma: no cover - depends on what is installed
            raise DataError(f"task {task!r}: image data sets are not available ({err})") from None
        return build_image_datasets(cfg, task)
    raise DataError(f"task {task!r} is not one of lm, image_recon, image_gen, image_cls")


__all__ = ["DataError", "Dataset", "build_datasets"]
