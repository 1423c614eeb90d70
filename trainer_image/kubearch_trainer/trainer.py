"""The train loop: one function, top to bottom, for every architecture and task kind.

Shape (nanoGPT's): set up the process group -> seed -> build model and data -> optimizer ->
(resume) -> compile -> DDP -> loop {accumulate micro-batches, skip non-finite steps, clip, step,
log, evaluate, checkpoint} -> results.json.

Design choices worth knowing:

- **Stateless randomness.** The batch of a step is a pure function of ``(seed, step, micro, rank)``
  (see :mod:`kubearch_trainer.data`), and the torch RNG is re-seeded from ``(seed, step, rank)`` at
  the start of every step (dropout, diffusion noise, VAE sampling). So ``--resume`` is exact
  without replaying a data iterator: 10 steps == 5 steps + resume + 5 steps.
- **One host sync per step.** Losses accumulate on the device and are read every ``log_every``
  steps; the only per-step read is a single "was this step finite on every rank" flag (all-reduced
  so every rank takes the same decision), which skipping a step needs anyway (torch's GradScaler
  does the same).
- **Failures are results.** A non-finite streak, a CUDA OOM, bad data or a crash all end with a
  ``results.json`` (status + exit code) so the operator and ``kubearch compare`` can report them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from kubearch_trainer.config import ConfigError, TrainConfig
from kubearch_trainer.data import DataError, Dataset, build_datasets
from kubearch_trainer.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from kubearch_trainer.exit_codes import ExitCode
from kubearch_trainer.models import KubearchModel, build_model

CHECKPOINT_NAME = "checkpoint.pt"
RESULTS_NAME = "results.json"
TERMINATION_LOG_ENV = "KUBEARCH_TERMINATION_LOG"
_TERMINATION_LIMIT = 4000  # Kubernetes keeps at most 4096 bytes of a termination message.


#: 128 + SIGTERM: what a preempted pod exits with; the operator treats it as worth a restart.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class NanAbort(RuntimeError):
    """Too many non-finite losses in a row."""


class _SigtermFlag:
    """Turns SIGTERM (pod eviction, preemption, ``kubectl delete``) into "checkpoint, then exit 143".

    Kubernetes waits ``terminationGracePeriodSeconds`` after SIGTERM; finishing the current step
    and writing a checkpoint lets ``--resume`` lose nothing. Only the main thread may install
    signal handlers; elsewhere (e.g. a test runner's worker thread) this is a no-op.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> _SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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


# ------------------------------------------------------------------------------------ helpers
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio * peak`` at the last step."""
    t = cfg.training
    peak, total, warm = t.learning_rate, t.total_steps, t.warmup_steps
    if warm > 0 and step < warm:
        return peak * (step + 1) / (warm + 1)
    if total <= warm:
        return peak
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = peak * t.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the torch RNG for one step; distinct per rank so dropout masks differ across ranks."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


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


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not norms, biases or 1-d SSM parameters)."""
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]
    # Deduplicate tied weights (embedding == lm_head) while keeping a stable order.
    seen: set[int] = set()
    unique = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    decay = [p for p in unique if p.dim() >= 2]
    no_decay = [p for p in unique if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), **extra)


def _maybe_regulator(cfg: TrainConfig, model: KubearchModel, log: Callable[[str], None]) -> Any:
    if not cfg.training.regulation.enabled:
        return None
    try:
        from kubearch_trainer.regulation import build_regulator
    except ModuleNotFoundError as err:
        if err.name != "kubearch_trainer.regulation":
            raise
        log("warning: training.regulation.enabled but kubearch_trainer.regulation is not installed; ignored")
        return None
    return build_regulator(cfg.training.regulation, model, cfg.model.architecture)


def _expert_counts(model: KubearchModel) -> torch.Tensor | None:
    """Per-expert token counts of the last forward pass (summed over layers), if the model routes.

    Convention (MoE's ``extra_metrics``): a key containing ``expert`` holds counts of the *last*
    forward, shape ``[E]`` or ``[layers, E]``; the loop sums them on the device between log lines.
    """
    for key, value in model.extra_metrics().items():
        if "expert" in key and isinstance(value, torch.Tensor) and value.dim() >= 1:
            v = value.detach().float()
            return v.reshape(-1, v.shape[-1]).sum(0)
    return None


# ------------------------------------------------------------------------------------ checkpoints
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


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    dist_info: DistInfo,
    amp: contextlib.AbstractContextManager,
) -> dict[str, float]:
    """Mean of the model's metrics over ``eval_batches`` validation batches, sharded over ranks.

    ``val_loss`` is the main loss without auxiliary terms when the model reports it (``ce_loss``),
    so sparse and dense models are scored on the same quantity.
    """
    was_training = model.training
    model.eval()
    # Global eval batches (batch_size x world), as in training: the validation set is the same for
    # 1 process x batch 2B and 2 processes x batch B.
    global_batch = cfg.training.batch_size * dist_info.world_size
    batches = data.eval_batches(cfg.training.eval_batches, global_batch, dist_info.device)
    sums: dict[str, torch.Tensor] = {}
    # Shard the batches over ranks when each rank gets at least one (same metric keys everywhere).
    shard = dist_info.world_size > 1 and len(batches) >= dist_info.world_size
    for i, batch in enumerate(batches):
        if shard and i % dist_info.world_size != dist_info.rank:
            continue
        with amp:
            out = model(batch)
        values = {
            "loss": out.loss.detach().float(),
            **{k: v.detach().float() for k, v in out.metrics.items()},
        }
        for k, v in values.items():
            if v.dim() == 0:
                sums[k] = sums.get(k, torch.zeros((), device=dist_info.device)) + v
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys])
    if shard:
        all_reduce_sum(packed)
    n = float(len(batches))
    result = {k: float(packed[i]) / n for i, k in enumerate(keys)}
    result["val_loss"] = result.get("ce_loss", result["loss"])
    if "accuracy" in result:
        result["val_accuracy"] = result["accuracy"]
    if data.task == "lm":
        result["perplexity"] = math.exp(min(result["val_loss"], 50.0))
    model.train(was_training)
    return result


# ------------------------------------------------------------------------------------ main loop
def train(
    cfg: TrainConfig,
    *,
    stop_after: int | None = None,
    run_name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the results dict (also written to ``results.json``).

    ``stop_after`` ends the run after that many optimizer steps with a checkpoint, as a preemption
    would (tests use it to show that resume is exact). Never raises for training failures: the
    status and exit code are in the returned dict.
    """
    t_start = time.time()
    started_at = datetime.now(UTC).isoformat()
    out_dir = Path(cfg.training.output_dir)
    dist_info = DistInfo()
    state = RunState()
    info: dict[str, Any] = {}
    status, code, error = "completed", int(ExitCode.OK), None
    metrics = None
    progress: _ProgressLine | None = None

    def say(msg: str) -> None:
        if dist_info.is_main:
            if progress is not None:
                progress.clear()  # the log line replaces the status line, which comes back next step
            (log or _print)(msg)

    stack = contextlib.ExitStack()
    try:
        dist_info = init_distributed(cfg.training.device)
        device = dist_info.device
        if log is None and dist_info.is_main and _is_tty(sys.stdout):
            progress = _ProgressLine(sys.stdout)
        run_name = run_name or os.environ.get("KUBEARCH_RUN_NAME") or out_dir.name
        torch.manual_seed(cfg.training.seed)  # same initial weights on every rank
        info["baseline_rss_bytes"] = current_rss()  # runtime + libraries, before model and data
        try:
            model = build_model(cfg.model)
        except KeyError as err:
            raise ConfigError(str(err.args[0]) if err.args else str(err)) from None
        model.to(device)
        task = model.task
        data = build_datasets(cfg, task)
        n_total, n_active = model.num_params(), model.active_params()
        # Image families report their own geometry (channels, stages...); the transformer dims
        # of the size preset would describe a model that was never built.
        dims = dict(getattr(model, "arch_dims", None) or cfg.model.dims)
        info.update(
            task=task, parameters={"total": n_total, "active": n_active}, data=data.describe(), dims=dims
        )
        t = cfg.training
        total_steps = t.total_steps
        global_batch = t.batch_size * t.gradient_accumulation_steps * dist_info.world_size
        tokens_per_step = global_batch * data.tokens_per_sample
        unit = "tok" if task == "lm" else "samples"  # image tasks count images (tokens_per_sample 1)
        say(
            f"kubearch: {cfg.model.architecture} ({cfg.model.size}, {task}) dims {dims} | "
            f"parameters {n_total:,} total, {n_active:,} active | device {device} x{dist_info.world_size}"
        )
        say(
            f"kubearch: data {data.describe()} | global batch {global_batch} "
            f"({tokens_per_step:,} {'tokens' if task == 'lm' else 'samples'}/step)"
        )

        if t.use_gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        opt = _build_optimizer(model, cfg, device)
        reg = _maybe_regulator(cfg, model, say)

        ckpt_path = out_dir / CHECKPOINT_NAME
        _check_checkpoint_agreement(t.resume and ckpt_path.exists(), dist_info, out_dir, device)
        if t.resume and ckpt_path.exists():
            state = load_checkpoint(ckpt_path, model, opt, cfg, reg)
            say(f"kubearch: resumed from {ckpt_path} at step {state.step}")
        elif t.resume:
            say(f"kubearch: --resume given but no checkpoint in {out_dir}; starting from step 0")
        info["resumed_from_step"] = state.step if t.resume else None

        fwd_model: torch.nn.Module = model
        if t.use_compile:
            fwd_model = torch.compile(model)
        if dist_info.is_distributed:
            fwd_model = DDP(
                fwd_model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(getattr(model, "ddp_find_unused_parameters", False)),
            )
        eval_model = fwd_model.module if isinstance(fwd_model, DDP) else fwd_model
        use_amp = t.use_amp and device.type == "cuda"
        amp_ctx: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
        )

        if t.metrics_port is not None and (dist_info.is_main or t.metrics_all_ranks):
            from kubearch_trainer.metrics import TrainMetrics

            metrics = TrainMetrics(cfg.model.architecture, run_name)
            port = metrics.serve(t.metrics_port + (dist_info.local_rank if t.metrics_all_ranks else 0))
            say(f"kubearch: metrics on http://0.0.0.0:{port}/metrics")
            info["metrics_port"] = port

        params = [p for p in model.parameters() if p.requires_grad]
        accum = t.gradient_accumulation_steps
        window_loss = torch.zeros((), device=device)
        window_n = torch.zeros((), device=device)
        if state.window is not None:  # resuming inside a log window
            window_loss.fill_(state.window[0])
            window_n.fill_(state.window[1])
        window_t0, window_steps, window_tokens = time.perf_counter(), 0, 0
        last_grad_norm = torch.zeros((), device=device)
        last_metrics: dict[str, torch.Tensor] = {}
        expert_window: torch.Tensor | None = None
        loop_t0 = time.perf_counter()
        excluded_s = 0.0  # evaluation and checkpoint time: not training throughput
        train_time_before = state.train_time_s
        train_steps_before = state.step
        fwd_model.train()

        sigterm = stack.enter_context(_SigtermFlag())
        while state.step < total_steps:
            step_t0 = time.perf_counter()
            step = state.step
            torch.manual_seed(step_seed(t.seed, step, dist_info.rank))
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                batch = data.get_batch(
                    step, micro, dist_info.rank, dist_info.world_size, t.batch_size, device
                )
                sync = (
                    fwd_model.no_sync()
                    if isinstance(fwd_model, DDP) and micro < accum - 1
                    else contextlib.nullcontext()
                )
                with sync:
                    with amp_ctx():
                        out = fwd_model(batch)
                        loss = out.loss.float()
                        if reg is not None:
                            reg_loss, reg_metrics = reg(out, step)
                            loss = loss + reg_loss
                            out.metrics.update(
                                {
                                    f"reg_{k}" if not k.startswith("reg") else k: v
                                    for k, v in reg_metrics.items()
                                }
                            )
                    (loss / accum).backward()
                loss_sum += loss.detach()
                if metrics is not None:
                    counts = _expert_counts(model)
                    if counts is not None:
                        expert_window = counts if expert_window is None else expert_window + counts
            last_metrics = out.metrics
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, t.grad_clip if t.grad_clip > 0 else float("inf")
            )
            bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
            flags = torch.stack([bad, torch.tensor(float(sigterm.requested), device=device)])
            all_reduce_max(flags)  # every rank takes the same decisions
            is_bad, preempt = (bool(f) for f in flags.tolist())  # the one host sync per step
            if is_bad:
                opt.zero_grad(set_to_none=True)
                state.nan_count += 1
                state.consecutive_nans += 1
                if metrics:
                    metrics.add_nan_step()
                say(
                    f"kubearch: step {step + 1}: non-finite loss or gradient, step skipped "
                    f"({state.consecutive_nans}/{t.max_consecutive_nans} in a row)"
                )
                if state.consecutive_nans >= t.max_consecutive_nans:
                    state.step += 1  # the step was attempted (and its data consumed)
                    state.tokens += tokens_per_step
                    raise NanAbort(
                        f"{state.consecutive_nans} non-finite losses in a row at step {step + 1} "
                        f"(training.max_consecutive_nans = {t.max_consecutive_nans}); lower the learning "
                        f"rate, raise warmup or enable gradient clipping"
                    )
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
                state.consecutive_nans = 0
                window_loss += loss_sum / accum
                window_n += 1
                last_grad_norm = grad_norm.detach()
            state.step += 1
            state.tokens += tokens_per_step
            window_steps += 1
            window_tokens += tokens_per_step
            step_time = time.perf_counter() - step_t0
            if metrics:
                metrics.observe_step_time(step_time)
                metrics.add_tokens(tokens_per_step)

            last = state.step == total_steps
            stopping = state.step == stop_after or preempt
            if state.step % t.log_every == 0 or last:
                packed = torch.stack([window_loss, window_n])
                all_reduce_sum(packed)
                train_loss = float(packed[0] / packed[1]) if float(packed[1]) > 0 else float("nan")
                if math.isfinite(train_loss):
                    state.last_train_loss = train_loss
                now = time.perf_counter()
                elapsed = now - window_t0
                tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
                eta = (total_steps - state.step) * elapsed / max(1, window_steps)
                state.history.append({"step": state.step, "train_loss": train_loss})
                # The model's scalars of the last micro-batch (aux losses, KL, the regulator's
                # reg_* terms): results.json's train_metrics and the kubearch_model_metric gauge.
                info["train_metrics"] = _scalars(last_metrics)
                if metrics:
                    mem, _ = peak_memory(device)
                    metrics.update_step(
                        state.step, total_steps, train_loss, lr, float(last_grad_norm), tok_s, mem
                    )
                    metrics.update_model_metrics(info["train_metrics"])
                    if expert_window is not None:
                        metrics.add_expert_tokens(expert_window.tolist())
                        expert_window = None
                say(
                    f"step {state.step:>6}/{total_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                    f"{tok_s:,.0f} {unit}/s | {elapsed / max(1, window_steps):.3f} s/step | "
                    f"ETA {_fmt_duration(eta)}"
                )
                window_loss.zero_()
                window_n.zero_()
                window_t0, window_steps, window_tokens = time.perf_counter(), 0, 0

            # A stop inside a log window carries the window over, so the resumed run logs the same rows.
            state.window = (float(window_loss), float(window_n)) if stopping else None
            if (t.eval_every and state.step % t.eval_every == 0) or state.step == total_steps:
                eval_t0 = time.perf_counter()
                state.last_val = evaluate(eval_model, data, cfg, dist_info, amp_ctx())
                _record_val(state, state.last_val)
                v = state.last_val
                acc = f" | val acc {v['val_accuracy']:.4f}" if "val_accuracy" in v else ""
                ppl = f" | ppl {v['perplexity']:.2f}" if "perplexity" in v else ""
                if metrics:
                    metrics.update_eval(v["val_loss"], v.get("val_accuracy"))
                say(f"eval step {state.step:>6} | val loss {v['val_loss']:.4f}{acc}{ppl}")
                window_t0 = time.perf_counter()  # evaluation time is not training throughput
                excluded_s += window_t0 - eval_t0

            state.train_time_s = train_time_before + (time.perf_counter() - loop_t0 - excluded_s)
            if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or last or stopping:
                ckpt_t0 = time.perf_counter()
                if dist_info.is_main:
                    save_checkpoint(ckpt_path, model, opt, state, cfg, reg)
                barrier()
                excluded_s += time.perf_counter() - ckpt_t0
                window_t0 += time.perf_counter() - ckpt_t0
            if progress is not None:
                done = state.step - train_steps_before
                per_step = (time.perf_counter() - loop_t0 - excluded_s) / max(1, done)
                loss_txt = f"{state.last_train_loss:.4f}" if state.last_train_loss is not None else "-"
                progress.show(
                    f"step {state.step}/{total_steps} [{_bar(state.step / total_steps)}] | loss {loss_txt} | "
                    f"{per_step:.3f} s/step | ETA {_fmt_duration((total_steps - state.step) * per_step)}",
                    force=last or stopping,
                )
            if stopping:
                status = "preempted" if preempt else "stopped"
                if preempt:
                    code = PREEMPTED_EXIT_CODE
                    say(f"kubearch: SIGTERM: checkpointed at step {state.step}; exiting for a restart")
                break

        if state.last_val is None and state.step >= total_steps:
            state.last_val = evaluate(eval_model, data, cfg, dist_info, amp_ctx())
            _record_val(state, state.last_val)
        info["session_train_time_s"] = time.perf_counter() - loop_t0
        if state.step >= total_steps:
            _evaluate_extra(fwd_model, data, dist_info, info, metrics, say)
    except ConfigError as err:
        status, code, error = "config_error", ExitCode.CONFIG_ERROR, str(err)
    except DataError as err:
        status, code, error = "data_error", ExitCode.DATA_ERROR, str(err)
    except NanAbort as err:
        status, code, error = "nan_abort", ExitCode.NAN_ABORT, str(err)
    except torch.cuda.OutOfMemoryError as err:
        status, code, error = (
            "oom",
            ExitCode.CUDA_OOM,
            f"CUDA out of memory: {str(err).splitlines()[0] if str(err) else ''}",
        )
    except Exception as err:  # any crash becomes a result, then the CLI exits FAILED
        status, code, error = "failed", ExitCode.FAILED, f"{type(err).__name__}: {err}"
        if dist_info.is_main:
            traceback.print_exc()
    finally:
        stack.close()
        if progress is not None:
            progress.clear()
        if metrics is not None:
            metrics.close()

    results = _results(cfg, dist_info, state, info, status, code, error, t_start, started_at)
    if error:
        say(f"kubearch: {status}: {error}")
    if dist_info.is_main:
        write_json_atomic(out_dir / RESULTS_NAME, results)
    if dist_info.local_rank == 0:
        _write_termination_log(results)
    say(
        f"kubearch: {status} (exit {int(code)}) after {state.step} steps in {results['wall_time_s']:.1f} s; "
        f"results in {out_dir / RESULTS_NAME}"
    )
    shutdown_distributed()
    return results


def _scalars(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d tensors as floats with one device-to-host copy (not one sync per metric)."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
    if not keys:
        return {}
    packed = torch.stack([values[k].detach().float() for k in keys]).tolist()
    return dict(zip(keys, packed, strict=True))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model under DDP (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _evaluate_extra(
    fwd_model: torch.nn.Module,
    data: Dataset,
    dist_info: DistInfo,
    info: dict[str, Any],
    metrics: Any,
    say: Callable[[str], None],
) -> dict[str, float]:
    """The model's end-of-run extras (MIG, active latents, sample-quality proxies) on rank 0.

    Rank 0 only: the extras run no collectives and their numbers go to rank 0's results.json.
    A failure is recorded, not raised: the training itself finished and its results stand (and
    the other ranks, waiting at the barrier, must not hang on a rank that left the loop).
    """
    base = _unwrap(fwd_model)
    fn = getattr(base, "evaluate_extra", None)
    extra: dict[str, float] = {}
    if callable(fn) and dist_info.is_main:
        was_training = base.training
        base.eval()  # dropout off, VQ codebook frozen: extras must not change the trained model
        try:
            with torch.no_grad():
                raw = fn(data)
            extra = {
                str(k): float(v)
                for k, v in (raw or {}).items()
                if isinstance(v, int | float) or (isinstance(v, torch.Tensor) and v.numel() == 1)
            }
            info["extra_metrics"] = extra
            if metrics is not None:
                metrics.update_model_metrics(extra)  # kubearch_model_metric{name="mig"}, ...
            if extra:
                say("kubearch: extra metrics | " + " | ".join(f"{k} {v:.4g}" for k, v in extra.items()))
        except Exception as err:  # an add-on metric must not turn a finished run into a failure
            info["extra_metrics_error"] = f"{type(err).__name__}: {err}"
            say(f"kubearch: warning: evaluate_extra failed ({info['extra_metrics_error']})")
        finally:
            base.train(was_training)
    if callable(fn):
        barrier()
    return extra


def _check_checkpoint_agreement(
    found: bool, dist_info: DistInfo, out_dir: Path, device: torch.device
) -> None:
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


def _record_val(state: RunState, val: dict[str, float]) -> None:
    """Attach the evaluation to the history row of this step (adding one if there was no log line)."""
    row = state.history[-1] if state.history and state.history[-1]["step"] == state.step else None
    if row is None:
        row = {"step": state.step, "train_loss": None}
        state.history.append(row)
    row["val_loss"] = val["val_loss"]
    if "val_accuracy" in val:
        row["val_accuracy"] = val["val_accuracy"]


def _print(msg: str) -> None:
    print(msg, flush=True)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _bar(frac: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, frac)) * width)
    return "#" * filled + "." * (width - filled)


class _ProgressLine:
    """One self-overwriting status line on a terminal (``\\r`` + erase-line), between the log lines.

    Only on an interactive stdout: in a pod (kubectl logs) or a file, carriage returns would turn
    into thousands of lines, so there the regular ``log_every`` lines are all there is. Redraws
    are throttled to 10 per second; the loss shown is the last logged one (no extra host sync).
    """

    _ERASE = "\r\033[K"

    def __init__(self, stream: Any, min_interval_s: float = 0.1) -> None:
        self.stream = stream
        self.min_interval_s = min_interval_s
        self.active = False
        self._last = float("-inf")

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        import shutil

        width = shutil.get_terminal_size((100, 24)).columns
        self.stream.write(self._ERASE + text[: max(10, width - 1)])
        self.stream.flush()
        self.active = True

    def clear(self) -> None:
        if self.active:
            self.stream.write(self._ERASE)
            self.stream.flush()
            self.active = False


def _results(
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


def _write_termination_log(results: dict[str, Any]) -> None:
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
        "tokens_per_second",
        "peak_memory_bytes",
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
