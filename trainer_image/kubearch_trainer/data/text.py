"""Language-modelling data: a byte-level tokenizer over local text, folders or JSONL.

Why bytes: a 256-symbol vocabulary needs no download, no training and no merge table, handles any
language or code, and lets every architecture be compared on exactly the same token stream.

Sources (``data.path``, format auto-detected unless ``data.format`` says otherwise):

- a text file (``format: text``);
- a folder (``format: folder``): every ``*.txt`` / ``*.md`` below it, in sorted path order;
- JSONL (``format: jsonl``, ``*.jsonl`` / ``*.json``): one object per line, text in ``data.jsonl_field``;
- nothing: the generated offline corpus (:mod:`kubearch_trainer.data.corpus`).

Split: documents go to validation when a CRC32 of their content falls in the ``val_fraction``
bucket, which is stable across file order, machines and runs. With fewer than two usable documents
(one text file), the last ``val_fraction`` of the byte stream is held out instead.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from kubearch_trainer.config import TrainConfig
from kubearch_trainer.data import DataError
from kubearch_trainer.data.corpus import tiny_stories

#: Built-in corpora usable as ``data.dataset`` when no path is given.
TEXT_DATASETS = ("tiny_stories",)
_DOC_SEPARATOR = "\n\n"
_TEXT_SUFFIXES = (".txt", ".md")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``vocab_size`` 256, lossless for any input."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: np.ndarray | torch.Tensor | list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def detect_format(path: Path, fmt: str) -> str:
    """``auto`` → folder / jsonl / text from the path; anything else is taken as given."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    return "text"


def read_documents(path: str | Path, fmt: str = "auto", jsonl_field: str = "text") -> list[str]:
    """Documents of a text source, in a deterministic order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path: {str(p)!r} does not exist")
    kind = detect_format(p, fmt)
    if kind == "text":
        if p.is_dir():
            raise DataError(f"data.path: {str(p)!r} is a folder but data.format is 'text'")
        return [p.read_text(encoding="utf-8", errors="replace")]
    if kind == "folder":
        if not p.is_dir():
            raise DataError(f"data.path: {str(p)!r} is not a folder (data.format 'folder')")
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise DataError(f"data.path: folder {str(p)!r} holds no {'/'.join(_TEXT_SUFFIXES)} files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if kind == "jsonl":
        docs = []
        with p.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"data.path: {p}:{lineno} is not valid JSON ({err.msg})") from None
                if not isinstance(obj, dict) or jsonl_field not in obj:
                    raise DataError(f"data.jsonl_field: {p}:{lineno} has no field {jsonl_field!r}")
                docs.append(str(obj[jsonl_field]))
        return docs
    raise DataError(f"data.format: {kind!r} is not one of auto, text, folder, jsonl for language modelling")


def split_documents(docs: list[str], val_fraction: float) -> tuple[str, str]:
    """Deterministic train/validation split (see the module docstring)."""
    docs = [d for d in docs if d]
    if len(docs) >= 2:
        bucket = [(zlib.crc32(d.encode("utf-8")) % 10_000) / 10_000 < val_fraction for d in docs]
        train = [d for d, v in zip(docs, bucket, strict=True) if not v]
        val = [d for d, v in zip(docs, bucket, strict=True) if v]
        if train and val:
            return _DOC_SEPARATOR.join(train), _DOC_SEPARATOR.join(val)
    text = _DOC_SEPARATOR.join(docs)
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


class TextDataset:
    """Random windows of ``seq_len + 1`` bytes from the train split; fixed windows for validation."""

    task = "lm"

    def __init__(self, train: np.ndarray, val: np.ndarray, seq_len: int, seed: int, source: str) -> None:
        need = seq_len + 2
        for name, arr in (("train", train), ("validation", val)):
            if len(arr) < need:
                raise DataError(
                    f"data: the {name} split of {source} has {len(arr)} tokens, fewer than "
                    f"data.seq_len + 2 = {need}; use more text or a smaller data.seq_len"
                )
        self.train = torch.from_numpy(train)
        self.val = torch.from_numpy(val)
        self.seq_len = seq_len
        self.tokens_per_sample = seq_len
        self.seed = seed
        self.source = source
        self._arange = torch.arange(seq_len + 1)

    def describe(self) -> str:
        return (
            f"{self.source}: {len(self.train):,} train / {len(self.val):,} val bytes, seq_len {self.seq_len}"
        )

    def _windows(
        self, data: torch.Tensor, offsets: torch.Tensor, device: torch.device
    ) -> dict[str, torch.Tensor]:
        w = data[offsets[:, None] + self._arange].long()
        x, y = w[:, :-1], w[:, 1:]
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.contiguous(), y.contiguous()
        return {"input_ids": x, "targets": y}

    def global_offsets(self, step: int, micro: int, global_batch: int) -> torch.Tensor:
        """Window starts of the whole global batch at ``(step, micro)``: a pure function of them."""
        rng = np.random.default_rng([self.seed, step, micro])
        high = len(self.train) - self.seq_len - 1
        return torch.from_numpy(rng.integers(0, high, size=global_batch, dtype=np.int64))

    def get_batch(
        self, step: int, micro: int, rank: int, world: int, batch_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        offsets = self.global_offsets(step, micro, batch_size * world)[
            rank * batch_size : (rank + 1) * batch_size
        ]
        return self._windows(self.train, offsets, device)

    def eval_batches(self, n: int, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        # Evenly spaced windows over the whole validation split: deterministic and seed-free, so
        # every run (and every architecture in a comparison) is scored on the same text.
        high = len(self.val) - self.seq_len - 1
        offsets = torch.linspace(0, high, n * batch_size).long()
        return [
            self._windows(self.val, offsets[i * batch_size : (i + 1) * batch_size], device) for i in range(n)
        ]


def build_text_dataset(cfg: TrainConfig) -> TextDataset:
    """The LM data set described by ``cfg.data`` (generated corpus when ``data.path`` is unset)."""
    data = cfg.data
    if data.path:
        docs = read_documents(data.path, data.format, data.jsonl_field)
        source = data.path
    else:
        name = data.dataset or "tiny_stories"
        if name not in TEXT_DATASETS:
            raise DataError(f"data.dataset: {name!r} is not one of {', '.join(TEXT_DATASETS)} for text")
        # The corpus seed is fixed (not training.seed): every run sees the same text.
        text = tiny_stories(n_bytes=400_000, seed=0)
        docs = text.split(_DOC_SEPARATOR)
        source = f"generated {name}"
    if cfg.model.vocab_size < ByteTokenizer.vocab_size:
        raise DataError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the byte tokenizer's 256")
    train, val = split_documents(docs, data.val_fraction)
    tok = ByteTokenizer()
    return TextDataset(tok.encode(train), tok.encode(val), data.seq_len, cfg.training.seed, source)
