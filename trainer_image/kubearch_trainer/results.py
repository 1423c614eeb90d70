"""What a run reports: ``results.json`` and the pod's termination message.

Every run ends here, failed ones included, so the operator and ``kubearch compare`` read the same
keys whatever happened; memory is measured the same way on every device kind it can be.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kubearch_trainer.checkpoint import RunState
from kubearch_trainer.config import TrainConfig
from kubearch_trainer.distributed import DistInfo

RESULTS_NAME = "results.json"
TERMINATION_LOG_ENV = "KUBEARCH_TERMINATION_LOG"
_TERMINATION_LIMIT = 4000  # Kubernetes keeps at most 4096 bytes of a termination message.


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak CUDA allocation on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is kilobytes on Linux, bytes on macOS.
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


def current_rss() -> int | None:
    """Resident set size now (Linux); the baseline that CPU peak memory is compared against."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def build_results(
    cfg: TrainConfig,
    dist_info: DistInfo,
    state: RunState,
    info: dict[str, Any],
    status: str,
    code: int,
    error: str | None,
    t_start: float,
    started_at: str,
) -> dict[str, Any]:
    mem, mem_kind = peak_memory(dist_info.device)
    extra = info.get("extra_metrics") or {}
    val = {**(state.last_val or {}), **extra}
    train_time = state.train_time_s
    return {
        "status": status,
        "exit_code": int(code),
        "error": error,
        "architecture": cfg.model.architecture,
        "size": cfg.model.size,
        "attention": cfg.model.attention,
        "task": info.get("task"),
        "dims": info.get("dims", cfg.model.dims),
        "parameters": info.get("parameters", {"total": None, "active": None}),
        "steps": state.step,
        "total_steps": cfg.training.total_steps,
        "tokens": state.tokens,
        "wall_time_s": time.time() - t_start,
        "train_time_s": train_time,
        "tokens_per_second": state.tokens / train_time if train_time > 0 else 0.0,
        "peak_memory_bytes": mem,
        "peak_memory_kind": mem_kind,
        # On CPU the RSS includes the Python/torch runtime (~0.5 GB); this is the part training added.
        "peak_memory_above_baseline_bytes": mem - info["baseline_rss_bytes"]
        if mem_kind == "process_peak_rss" and info.get("baseline_rss_bytes")
        else mem,
        "final_train_loss": state.last_train_loss,
        "final_val_loss": val.get("val_loss"),
        "val_accuracy": val.get("val_accuracy"),
        "perplexity": val.get("perplexity"),
        "val_metrics": val,
        # evaluate_extra's end-of-run numbers (also merged into val_metrics above).
        "extra_metrics": extra,
        "extra_metrics_error": info.get("extra_metrics_error"),
        # Last logged training step's model scalars, including the 2π regulator's reg_* terms.
        "train_metrics": info.get("train_metrics", {}),
        "nan_count": state.nan_count,
        "loss_history": state.history,
        "resumed_from_step": info.get("resumed_from_step"),
        "data": info.get("data"),
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
        "device_name": torch.cuda.get_device_name(dist_info.device)
        if dist_info.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(),
        "config": cfg.dump(),
    }


def write_termination_log(results: dict[str, Any]) -> None:
    """A short JSON summary where Kubernetes reads the pod's termination message (< 4 KB)."""
    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    keys = (
        "status",
        "exit_code",
        "architecture",
        "size",
        "steps",
        "tokens",
        "final_train_loss",
        "final_val_loss",
        "val_accuracy",
        "perplexity",
        "tokens_per_second",
        "peak_memory_bytes",
        "train_time_s",
        "wall_time_s",
        "nan_count",
    )
    summary = {k: results.get(k) for k in keys}
    if results.get("error"):
        summary["error"] = str(results["error"])[:1000]
    text = json.dumps(summary, default=str)
    if len(text) > _TERMINATION_LIMIT:
        summary.pop("error", None)
        text = json.dumps(summary, default=str)
    with contextlib.suppress(OSError):
        Path(path).write_text(text[:_TERMINATION_LIMIT])
