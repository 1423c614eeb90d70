"""Checkpoints: the run state that must survive a preemption, and atomic writes of it.

A checkpoint is written through a temporary file and a rename, so a node that dies mid-write leaves
the previous checkpoint intact; only rank 0 writes, so all ranks must see the same folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kubearch_trainer.config import ConfigError, TrainConfig
from kubearch_trainer.distributed import DistInfo, all_reduce_sum
from kubearch_trainer.models import KubearchModel

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class RunState:
    """Everything that changes during training and must survive a checkpoint."""

    step: int = 0
    tokens: int = 0
    nan_count: int = 0
    consecutive_nans: int = 0
    train_time_s: float = 0.0
    last_train_loss: float | None = None
    last_val: dict[str, float] | None = None
    history: list[dict[str, Any]] | None = None
    #: (loss sum, finite steps) of a log window cut by a stop, so the resumed run logs the same rows.
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.history is None:
            self.history = []


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def save_checkpoint(
    path: Path, model: KubearchModel, opt: torch.optim.Optimizer, state: RunState, cfg: TrainConfig, reg: Any
) -> None:
    ckpt = {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        # The schedule is a pure function of the step (lr_at); its state is the step itself.
        "scheduler": {"kind": "warmup_cosine", "step": state.step},
        "step": state.step,
        "tokens": state.tokens,
        "nan_count": state.nan_count,
        "consecutive_nans": state.consecutive_nans,
        "train_time_s": state.train_time_s,
        "last_train_loss": state.last_train_loss,
        "last_val": state.last_val,
        "history": state.history,
        "window": state.window,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "regulator": reg.state_dict() if reg is not None and hasattr(reg, "state_dict") else None,
        "config": cfg.dump(),
        "saved_at": datetime.now(UTC).isoformat(),
    }
    _atomic_write_bytes(path, lambda p: torch.save(ckpt, p))


def load_checkpoint(
    path: Path, model: KubearchModel, opt: torch.optim.Optimizer, cfg: TrainConfig, reg: Any
) -> RunState:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    saved_model = ckpt.get("config", {}).get("model")
    if saved_model is not None and saved_model != cfg.dump()["model"]:
        diff = sorted(k for k in saved_model if saved_model.get(k) != cfg.dump()["model"].get(k))
        raise ConfigError(
            f"training.resume: the checkpoint in {path.parent} was written for other model settings "
            f"(differs in model.{', model.'.join(diff)})"
        )
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if reg is not None and ckpt.get("regulator") is not None and hasattr(reg, "load_state_dict"):
        reg.load_state_dict(ckpt["regulator"])
    rng = ckpt.get("rng") or {}
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return RunState(
        step=int(ckpt["step"]),
        tokens=int(ckpt["tokens"]),
        nan_count=int(ckpt["nan_count"]),
        consecutive_nans=int(ckpt["consecutive_nans"]),
        train_time_s=float(ckpt["train_time_s"]),
        last_train_loss=ckpt.get("last_train_loss"),
        last_val=ckpt.get("last_val"),
        history=list(ckpt.get("history") or []),
        window=tuple(ckpt["window"]) if ckpt.get("window") else None,
    )


def check_checkpoint_agreement(found: bool, dist_info: DistInfo, out_dir: Path, device: torch.device) -> None:
    """Every rank must see the same checkpoint, or none: otherwise ranks silently diverge.

    Only rank 0 writes checkpoints, so a resume on several nodes needs ``training.output_dir`` on
    storage they all mount. With a node-local folder, rank 0 would resume at step N while the other
    nodes restart from step 0 with fresh weights. All ranks compute the same sum, so all raise.
    """
    if not dist_info.is_distributed:
        return
    flag = torch.tensor([float(found)], device=device)
    all_reduce_sum(flag)
    seen = int(flag.item())
    if 0 < seen < dist_info.world_size:
        raise ConfigError(
            f"training.output_dir: the checkpoint in {out_dir} is visible to {seen} of "
            f"{dist_info.world_size} ranks (this rank {dist_info.rank}: "
            f"{'found' if found else 'not found'}); with --resume the output directory must be on "
            "storage shared by all nodes, e.g. a ReadWriteMany PersistentVolumeClaim "
            "(spec.resources.checkpointClaim)"
        )
