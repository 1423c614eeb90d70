"""The train loop, top to bottom, for every architecture and task kind.

Shape (nanoGPT's), as ``train`` calls it: set up the process group -> seed -> ``_build`` (model,
data, optimizer) -> ``_maybe_resume`` -> ``_wrap_for_training`` (compile, DDP, autocast) ->
``_start_metrics`` -> ``_train_loop`` {``_forward_backward`` over micro-batches, skip non-finite
steps, clip, step, ``_log_window``, ``_evaluate_and_log``, checkpoint} -> ``_report``
(results.json). Checkpoints live in :mod:`kubearch_trainer.checkpoint`, the results in
:mod:`kubearch_trainer.results`, the terminal status line in :mod:`kubearch_trainer.progress`.

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
import math
import os
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

from kubearch_trainer.checkpoint import (
    CHECKPOINT_NAME,
    RunState,
    check_checkpoint_agreement,
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
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
from kubearch_trainer.progress import ProgressLine, bar, fmt_duration, is_tty, print_line
from kubearch_trainer.results import (
    RESULTS_NAME,
    build_results,
    current_rss,
    peak_memory,
    write_termination_log,
)

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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups: decay for matrices, none for vectors and ``_no_weight_decay`` tensors.

    The dimension rule (GPT-2/nanoGPT) spares norms and biases. mamba-ssm additionally tags
    ``A_log``, ``D`` and the Δ bias with ``_no_weight_decay``: ``A_log`` is 2-D, and decaying it
    pulls every state's decay rate towards exp(0) = 1, so the tag is honoured whatever the shape.
    """
    # model.parameters() yields a tied weight (embedding == lm_head) once, in a stable order.
    params = [p for p in model.parameters() if p.requires_grad]
    exempt = [p.dim() < 2 or bool(getattr(p, "_no_weight_decay", False)) for p in params]
    decay = [p for p, skip in zip(params, exempt, strict=True) if not skip]
    no_decay = [p for p, skip in zip(params, exempt, strict=True) if skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    t = cfg.training
    groups = param_groups(model, t.weight_decay)
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


def _record_val(state: RunState, val: dict[str, float]) -> None:
    """Attach the evaluation to the history row of this step (adding one if there was no log line)."""
    row = state.history[-1] if state.history and state.history[-1]["step"] == state.step else None
    if row is None:
        row = {"step": state.step, "train_loss": None}
        state.history.append(row)
    row["val_loss"] = val["val_loss"]
    if "val_accuracy" in val:
        row["val_accuracy"] = val["val_accuracy"]


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
    progress: ProgressLine | None = None

    def say(msg: str) -> None:
        if dist_info.is_main:
            if progress is not None:
                progress.clear()  # the log line replaces the status line, which comes back next step
            (log or print_line)(msg)

    stack = contextlib.ExitStack()
    try:
        dist_info = init_distributed(cfg.training.device)
        if log is None and dist_info.is_main and is_tty(sys.stdout):
            progress = ProgressLine(sys.stdout)
        run_name = run_name or os.environ.get("KUBEARCH_RUN_NAME") or out_dir.name
        torch.manual_seed(cfg.training.seed)  # same initial weights on every rank
        info["baseline_rss_bytes"] = current_rss()  # runtime + libraries, before model and data
        run = _build(cfg, dist_info, info, say)
        state = _maybe_resume(cfg, run, dist_info, out_dir, info, say)
        _wrap_for_training(cfg, run, dist_info)
        metrics = run.metrics = _start_metrics(cfg, dist_info, run_name, info, say)
        status, code = _train_loop(cfg, run, state, dist_info, stack, stop_after, info, say, progress)
        if state.step >= cfg.training.total_steps:
            _evaluate_extra(run.fwd_model, run.data, dist_info, info, metrics, say)
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

    results = build_results(cfg, dist_info, state, info, status, code, error, t_start, started_at)
    _report(results, dist_info, out_dir, state, say)
    shutdown_distributed()
    return results


@dataclass
class _Run:
    """What set-up builds and the step loop uses: the model in its wrappers, data, optimizer."""

    model: KubearchModel
    data: Dataset
    opt: torch.optim.AdamW
    reg: Any
    #: Samples (image tasks) or tokens (lm) consumed by one optimizer step over all ranks.
    tokens_per_step: int
    #: The throughput unit of the log lines: "tok" or "samples".
    unit: str
    #: The model as the loop calls it: compiled and/or DDP-wrapped (see ``_wrap_for_training``).
    fwd_model: torch.nn.Module
    #: ``fwd_model`` without DDP: evaluation shards batches itself and must not all-reduce grads.
    eval_model: torch.nn.Module
    device: torch.device
    amp_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    metrics: Any = None


def _build(cfg: TrainConfig, dist_info: DistInfo, info: dict[str, Any], say: Callable[[str], None]) -> _Run:
    """Model, data, optimizer and regulator; logs what was built (two lines)."""
    device = dist_info.device
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
    info.update(task=task, parameters={"total": n_total, "active": n_active}, data=data.describe(), dims=dims)
    t = cfg.training
    global_batch = t.batch_size * t.gradient_accumulation_steps * dist_info.world_size
    tokens_per_step = global_batch * data.tokens_per_sample
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
    return _Run(
        model=model,
        data=data,
        opt=opt,
        reg=reg,
        tokens_per_step=tokens_per_step,
        unit="tok" if task == "lm" else "samples",  # image tasks count images (tokens_per_sample 1)
        fwd_model=model,
        eval_model=model,
        device=device,
    )


def _maybe_resume(
    cfg: TrainConfig,
    run: _Run,
    dist_info: DistInfo,
    out_dir: Path,
    info: dict[str, Any],
    say: Callable[[str], None],
) -> RunState:
    """The checkpoint's state under ``--resume`` (weights, optimizer, RNG loaded), else a fresh one."""
    t = cfg.training
    ckpt_path = out_dir / CHECKPOINT_NAME
    state = RunState()
    check_checkpoint_agreement(t.resume and ckpt_path.exists(), dist_info, out_dir, dist_info.device)
    if t.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, run.model, run.opt, cfg, run.reg)
        say(f"kubearch: resumed from {ckpt_path} at step {state.step}")
    elif t.resume:
        say(f"kubearch: --resume given but no checkpoint in {out_dir}; starting from step 0")
    info["resumed_from_step"] = state.step if t.resume else None
    return state


def _wrap_for_training(cfg: TrainConfig, run: _Run, dist_info: DistInfo) -> None:
    """torch.compile, then DDP, then bf16 autocast on CUDA; after resume, so weights load unwrapped."""
    t = cfg.training
    device = dist_info.device
    fwd_model: torch.nn.Module = run.model
    if t.use_compile:
        fwd_model = torch.compile(run.model)
    if dist_info.is_distributed:
        fwd_model = DDP(
            fwd_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(run.model, "ddp_find_unused_parameters", False)),
        )
    run.fwd_model = fwd_model
    run.eval_model = fwd_model.module if isinstance(fwd_model, DDP) else fwd_model
    if t.use_amp and device.type == "cuda":
        run.amp_ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16)


def _start_metrics(
    cfg: TrainConfig, dist_info: DistInfo, run_name: str, info: dict[str, Any], say: Callable[[str], None]
) -> Any:
    """The Prometheus endpoint (``training.metrics_port``) on rank 0, or on every rank if asked."""
    t = cfg.training
    if t.metrics_port is None or not (dist_info.is_main or t.metrics_all_ranks):
        return None
    from kubearch_trainer.metrics import TrainMetrics

    metrics = TrainMetrics(cfg.model.architecture, run_name)
    try:
        port = metrics.serve(t.metrics_port + (dist_info.local_rank if t.metrics_all_ranks else 0))
    except BaseException:
        metrics.close()
        raise
    say(f"kubearch: metrics on http://0.0.0.0:{port}/metrics")
    info["metrics_port"] = port
    return metrics


@dataclass
class _LogWindow:
    """Training loss and throughput since the last log line, kept on the device between log lines."""

    loss: torch.Tensor
    n: torch.Tensor
    t0: float
    steps: int = 0
    tokens: int = 0
    #: Per-expert token counts (MoE), summed on the device; only while metrics are served.
    experts: torch.Tensor | None = None

    def reset(self) -> None:
        self.loss.zero_()
        self.n.zero_()
        self.t0, self.steps, self.tokens = time.perf_counter(), 0, 0


def _forward_backward(
    cfg: TrainConfig, run: _Run, step: int, dist_info: DistInfo, window: _LogWindow
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate ``gradient_accumulation_steps`` micro-batches; the loss sum stays on the device.

    Returns the summed loss (regulator terms included) and the last micro-batch's model metrics.
    """
    t = cfg.training
    device = dist_info.device
    accum = t.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        batch = run.data.get_batch(step, micro, dist_info.rank, dist_info.world_size, t.batch_size, device)
        sync = (
            run.fwd_model.no_sync()
            if isinstance(run.fwd_model, DDP) and micro < accum - 1
            else contextlib.nullcontext()
        )
        with sync:
            with run.amp_ctx():
                out = run.fwd_model(batch)
                loss = out.loss.float()
                if run.reg is not None:
                    reg_loss, reg_metrics = run.reg(out, step)
                    loss = loss + reg_loss
                    out.metrics.update(
                        {f"reg_{k}" if not k.startswith("reg") else k: v for k, v in reg_metrics.items()}
                    )
            (loss / accum).backward()
        loss_sum += loss.detach()
        if run.metrics is not None:
            counts = _expert_counts(run.model)
            if counts is not None:
                window.experts = counts if window.experts is None else window.experts + counts
    return loss_sum, out.metrics


def _skip_step(cfg: TrainConfig, run: _Run, state: RunState, step: int, say: Callable[[str], None]) -> None:
    """A non-finite step: drop its gradients, count it, and abort after too many in a row."""
    t = cfg.training
    run.opt.zero_grad(set_to_none=True)
    state.nan_count += 1
    state.consecutive_nans += 1
    if run.metrics:
        run.metrics.add_nan_step()
    say(
        f"kubearch: step {step + 1}: non-finite loss or gradient, step skipped "
        f"({state.consecutive_nans}/{t.max_consecutive_nans} in a row)"
    )
    if state.consecutive_nans >= t.max_consecutive_nans:
        state.step += 1  # the step was attempted (and its data consumed)
        state.tokens += run.tokens_per_step
        raise NanAbort(
            f"{state.consecutive_nans} non-finite losses in a row at step {step + 1} "
            f"(training.max_consecutive_nans = {t.max_consecutive_nans}); lower the learning "
            f"rate, raise warmup or enable gradient clipping"
        )


def _log_window(
    cfg: TrainConfig,
    run: _Run,
    state: RunState,
    window: _LogWindow,
    lr: float,
    grad_norm: torch.Tensor,
    last_metrics: dict[str, torch.Tensor],
    info: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """The log line: the window's mean loss over all ranks (the host sync of every ``log_every``)."""
    total_steps = cfg.training.total_steps
    packed = torch.stack([window.loss, window.n])
    all_reduce_sum(packed)
    train_loss = float(packed[0] / packed[1]) if float(packed[1]) > 0 else float("nan")
    if math.isfinite(train_loss):
        state.last_train_loss = train_loss
    now = time.perf_counter()
    elapsed = now - window.t0
    tok_s = window.tokens / elapsed if elapsed > 0 else 0.0
    eta = (total_steps - state.step) * elapsed / max(1, window.steps)
    state.history.append({"step": state.step, "train_loss": train_loss})
    # The model's scalars of the last micro-batch (aux losses, KL, the regulator's
    # reg_* terms): results.json's train_metrics and the kubearch_model_metric gauge.
    info["train_metrics"] = _scalars(last_metrics)
    metrics = run.metrics
    if metrics:
        mem, _ = peak_memory(run.device)
        metrics.update_step(state.step, total_steps, train_loss, lr, float(grad_norm), tok_s, mem)
        metrics.update_model_metrics(info["train_metrics"])
        if window.experts is not None:
            metrics.add_expert_tokens(window.experts.tolist())
            window.experts = None
    say(
        f"step {state.step:>6}/{total_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
        f"{tok_s:,.0f} {run.unit}/s | {elapsed / max(1, window.steps):.3f} s/step | "
        f"ETA {fmt_duration(eta)}"
    )
    window.reset()


def _evaluate_and_log(
    cfg: TrainConfig, run: _Run, state: RunState, dist_info: DistInfo, say: Callable[[str], None]
) -> None:
    state.last_val = evaluate(run.eval_model, run.data, cfg, dist_info, run.amp_ctx())
    _record_val(state, state.last_val)
    v = state.last_val
    acc = f" | val acc {v['val_accuracy']:.4f}" if "val_accuracy" in v else ""
    ppl = f" | ppl {v['perplexity']:.2f}" if "perplexity" in v else ""
    if run.metrics:
        run.metrics.update_eval(v["val_loss"], v.get("val_accuracy"))
    say(f"eval step {state.step:>6} | val loss {v['val_loss']:.4f}{acc}{ppl}")


def _train_loop(
    cfg: TrainConfig,
    run: _Run,
    state: RunState,
    dist_info: DistInfo,
    stack: contextlib.ExitStack,
    stop_after: int | None,
    info: dict[str, Any],
    say: Callable[[str], None],
    progress: ProgressLine | None,
) -> tuple[str, int]:
    """Steps until ``total_steps``, a stop or a SIGTERM; returns (status, exit code).

    Each step: re-seed, set the LR, accumulate micro-batches, one all-reduced "finite? SIGTERM?"
    flag (the only per-step host sync), then step or skip; every ``log_every`` steps a log line,
    every ``eval_every`` an evaluation, every ``checkpoint_every`` (and on a stop) a checkpoint.
    """
    t = cfg.training
    device = dist_info.device
    total_steps = t.total_steps
    ckpt_path = Path(t.output_dir) / CHECKPOINT_NAME
    status, code = "completed", int(ExitCode.OK)
    params = [p for p in run.model.parameters() if p.requires_grad]
    window = _LogWindow(torch.zeros((), device=device), torch.zeros((), device=device), time.perf_counter())
    if state.window is not None:  # resuming inside a log window
        window.loss.fill_(state.window[0])
        window.n.fill_(state.window[1])
    last_grad_norm = torch.zeros((), device=device)
    loop_t0 = time.perf_counter()
    excluded_s = 0.0  # evaluation and checkpoint time: not training throughput
    train_time_before = state.train_time_s
    train_steps_before = state.step
    run.fwd_model.train()

    sigterm = stack.enter_context(_SigtermFlag())
    while state.step < total_steps:
        step_t0 = time.perf_counter()
        step = state.step
        torch.manual_seed(step_seed(t.seed, step, dist_info.rank))
        lr = lr_at(step, cfg)
        for group in run.opt.param_groups:
            group["lr"] = lr
        loss_sum, last_metrics = _forward_backward(cfg, run, step, dist_info, window)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
        flags = torch.stack([bad, torch.tensor(float(sigterm.requested), device=device)])
        all_reduce_max(flags)  # every rank takes the same decisions
        is_bad, preempt = (bool(f) for f in flags.tolist())  # the one host sync per step
        if is_bad:
            _skip_step(cfg, run, state, step, say)
        else:
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            state.consecutive_nans = 0
            window.loss += loss_sum / t.gradient_accumulation_steps
            window.n += 1
            last_grad_norm = grad_norm.detach()
        state.step += 1
        state.tokens += run.tokens_per_step
        window.steps += 1
        window.tokens += run.tokens_per_step
        step_time = time.perf_counter() - step_t0
        if run.metrics:
            run.metrics.observe_step_time(step_time)
            run.metrics.add_tokens(run.tokens_per_step)

        last = state.step == total_steps
        stopping = state.step == stop_after or preempt
        if state.step % t.log_every == 0 or last:
            _log_window(cfg, run, state, window, lr, last_grad_norm, last_metrics, info, say)

        # A stop inside a log window carries the window over, so the resumed run logs the same rows.
        state.window = (float(window.loss), float(window.n)) if stopping else None
        if (t.eval_every and state.step % t.eval_every == 0) or state.step == total_steps:
            eval_t0 = time.perf_counter()
            _evaluate_and_log(cfg, run, state, dist_info, say)
            window.t0 = time.perf_counter()  # evaluation time is not training throughput
            excluded_s += window.t0 - eval_t0

        state.train_time_s = train_time_before + (time.perf_counter() - loop_t0 - excluded_s)
        if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or last or stopping:
            ckpt_t0 = time.perf_counter()
            if dist_info.is_main:
                save_checkpoint(ckpt_path, run.model, run.opt, state, cfg, run.reg)
            barrier()
            excluded_s += time.perf_counter() - ckpt_t0
            window.t0 += time.perf_counter() - ckpt_t0
        if progress is not None:
            done = state.step - train_steps_before
            per_step = (time.perf_counter() - loop_t0 - excluded_s) / max(1, done)
            loss_txt = f"{state.last_train_loss:.4f}" if state.last_train_loss is not None else "-"
            progress.show(
                f"step {state.step}/{total_steps} [{bar(state.step / total_steps)}] | loss {loss_txt} | "
                f"{per_step:.3f} s/step | ETA {fmt_duration((total_steps - state.step) * per_step)}",
                force=last or stopping,
            )
        if stopping:
            status = "preempted" if preempt else "stopped"
            if preempt:
                code = PREEMPTED_EXIT_CODE
                say(f"kubearch: SIGTERM: checkpointed at step {state.step}; exiting for a restart")
            break

    if state.last_val is None and state.step >= total_steps:
        state.last_val = evaluate(run.eval_model, run.data, cfg, dist_info, run.amp_ctx())
        _record_val(state, state.last_val)
    info["session_train_time_s"] = time.perf_counter() - loop_t0
    return status, code


def _report(
    results: dict[str, Any], dist_info: DistInfo, out_dir: Path, state: RunState, say: Callable[[str], None]
) -> None:
    """results.json (rank 0), the termination message (one per node) and the closing log line."""
    if results["error"]:
        say(f"kubearch: {results['status']}: {results['error']}")
    if dist_info.is_main:
        write_json_atomic(out_dir / RESULTS_NAME, results)
    if dist_info.local_rank == 0:
        write_termination_log(results)
    say(
        f"kubearch: {results['status']} (exit {results['exit_code']}) after {state.step} steps in "
        f"{results['wall_time_s']:.1f} s; results in {out_dir / RESULTS_NAME}"
    )
