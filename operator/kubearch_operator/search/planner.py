"""Out-of-memory planned away: fit every trial to its GPU before it is created.

The seed's search lost 22% (50 steps, batch 16) and 57% (200 steps, batch 32) of its trials to
CUDA out-of-memory on a 24 GB GPU. Each of those was knowable in advance: the trainer's memory
model (:mod:`kubearch_trainer.memory`, torch-free, checked against the bytes autograd saves)
predicts a trial's peak from its configuration. Before a trial exists the planner

1. looks up the memory of the GPU the trial will get: ``spec.planning.gpuMemory`` if given, else
   ``trialTemplate.resources.gpuType`` in a small table of common GPUs;
2. if the estimate exceeds ``(1 - safetyMargin)`` of it, picks the largest micro-batch ``b'`` that
   fits with ``b' * accumulation' == b * accumulation`` (the same effective batch: the same
   optimisation, only sliced differently);
3. failing that (not even ``b' = 1`` fits), turns on gradient checkpointing and tries again;
4. failing that, the trial is not created (``WontFit``), with the bytes in its message.

What was changed and why goes into the trial's record (``TrialRecord.plan``) and message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kubearch_trainer.config import SEQUENCE_ARCHITECTURES

from ..api import TrainingRunSpec
from .api import Planning

GiB = 2**30
#: GPU memory by model, matched against ``resources.gpuType`` (the node label value, e.g.
#: ``NVIDIA-GeForce-RTX-4090`` or ``NVIDIA-A100-SXM4-80GB``). First match wins, so the specific
#: spellings (memory sizes in the name) come before the family defaults.
GPU_MEMORY: tuple[tuple[str, int], ...] = (
    (r"H200", 141 * 10**9),
    (r"H100.*NVL", 94 * GiB),
    (r"H100|H800", 80 * GiB),
    (r"GH200", 96 * GiB),
    (r"A100.*80", 80 * GiB),
    (r"A100", 40 * GiB),
    (r"A800.*80", 80 * GiB),
    (r"V100.*32", 32 * GiB),
    (r"V100", 16 * GiB),
    (r"L40S|L40|A40|A6000|RTX.?6000", 48 * GiB),
    (r"A10G|A10\b|L4\b|RTX.?4090|RTX.?3090|A5000", 24 * GiB),
    (r"RTX.?4080|RTX.?A4000|T4|P100|RTX.?4070.*TI.*SUPER", 16 * GiB),
    (r"MI300X", 192 * GiB),
    (r"MI250", 128 * GiB),
)


def gpu_memory_for_type(gpu_type: str | None) -> int | None:
    """Bytes of one GPU of ``gpu_type`` from :data:`GPU_MEMORY`; None when it is not in the table."""
    if not gpu_type:
        return None
    name = gpu_type.upper().replace("_", "-")
    for pattern, size in GPU_MEMORY:
        if re.search(pattern, name):
            return size
    return None


@dataclass(frozen=True)
class MemoryPlan:
    """The planner's verdict for one trial (see the module docstring)."""

    planned: bool  #: False: nothing to plan against (CPU trial, unknown GPU, unmodelled family)
    fits: bool
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    reason: str
    original_batch_size: int = 0
    original_accumulation: int = 0
    original_checkpointing: bool = False
    estimated_bytes: int | None = None
    unplanned_bytes: int | None = None
    limit_bytes: int | None = None
    gpu_memory_bytes: int | None = None

    @property
    def changed(self) -> bool:
        return self.planned and (
            self.batch_size != self.original_batch_size
            or self.gradient_accumulation_steps != self.original_accumulation
            or (self.gradient_checkpointing and not self.original_checkpointing)
        )

    def as_record(self) -> dict[str, Any]:
        """camelCase dict for ``TrialRecord.plan``."""
        if not self.planned:  # the batch is recorded anyway: an OOM retry halves it
            return {
                "planned": False,
                "batchSize": self.batch_size,
                "gradientAccumulationSteps": self.gradient_accumulation_steps,
                "reason": self.reason,
            }
        return {
            "planned": True,
            "fits": self.fits,
            "changed": self.changed,
            "batchSize": self.batch_size,
            "gradientAccumulationSteps": self.gradient_accumulation_steps,
            "gradientCheckpointing": self.gradient_checkpointing,
            "originalBatchSize": self.original_batch_size,
            "originalGradientAccumulationSteps": self.original_accumulation,
            "estimatedBytes": self.estimated_bytes,
            "unplannedBytes": self.unplanned_bytes,
            "limitBytes": self.limit_bytes,
            "gpuMemoryBytes": self.gpu_memory_bytes,
            "reason": self.reason,
        }


def trial_gpus(spec: TrainingRunSpec) -> int:
    """GPUs a trial occupies: nodes x gpusPerNode (1 x 1 unless set; ``auto`` counts as 1)."""
    r = spec.resources
    gpn = 1 if r.gpus_per_node is None else r.gpus_per_node
    return (r.nodes or 1) * gpn


def _world_size(spec: TrainingRunSpec) -> int:
    r = spec.resources
    nproc = r.nproc_per_node or (r.gpus_per_node or 1)
    return (r.nodes or 1) * nproc


def estimate_bytes(spec: TrainingRunSpec, batch: int, accumulation: int, checkpointing: bool) -> int:
    """Peak bytes of one trial process by the trainer's memory model (AdamW, the trial's AMP)."""
    from kubearch_trainer.memory import estimate_memory

    return estimate_memory(
        spec.model,
        batch,
        spec.data.seq_len,
        amp=spec.training.use_amp,
        checkpointing=checkpointing,
        grads_persist=accumulation > 1,
        ddp=_world_size(spec) > 1,
    ).total


def _fmt(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


def gpu_memory(spec: TrainingRunSpec, planning: Planning) -> int | None:
    return planning.gpu_memory_bytes() or gpu_memory_for_type(spec.resources.gpu_type)


def plan_trial(spec: TrainingRunSpec, planning: Planning) -> MemoryPlan:
    """Fit ``spec`` (a trial's TrainingRun spec) to its GPU; see the module docstring."""
    t = spec.training
    b, a, ckpt = t.batch_size, t.gradient_accumulation_steps, t.use_gradient_checkpointing
    base = {
        "batch_size": b,
        "gradient_accumulation_steps": a,
        "gradient_checkpointing": ckpt,
        "original_batch_size": b,
        "original_accumulation": a,
        "original_checkpointing": ckpt,
    }
    if not planning.enabled:
        return MemoryPlan(planned=False, fits=True, reason="planning disabled", **base)
    if trial_gpus(spec) == 0:
        return MemoryPlan(planned=False, fits=True, reason="CPU trial (gpusPerNode: 0)", **base)
    if spec.model.architecture not in SEQUENCE_ARCHITECTURES:
        return MemoryPlan(
            planned=False, fits=True, reason=f"no memory model for {spec.model.architecture}", **base
        )
    gpu = gpu_memory(spec, planning)
    if gpu is None:
        return MemoryPlan(
            planned=False,
            fits=True,
            reason="GPU memory unknown: set spec.planning.gpuMemory or a trialTemplate.resources.gpuType "
            "from the planner's table",
            **base,
        )
    limit = int((1.0 - planning.safety_margin) * gpu)
    unplanned = estimate_bytes(spec, b, a, ckpt)
    where = f"{_fmt(limit)} usable of {_fmt(gpu)} (safety margin {planning.safety_margin:.0%})"
    common = {"unplanned_bytes": unplanned, "limit_bytes": limit, "gpu_memory_bytes": gpu}
    if unplanned <= limit:
        return MemoryPlan(
            planned=True,
            fits=True,
            reason=f"fits: estimated {_fmt(unplanned)} <= {where}",
            estimated_bytes=unplanned,
            **common,
            **base,
        )
    effective = b * a
    candidates = [d for d in range(b, 0, -1) if effective % d == 0]
    for checkpointing in (ckpt, True) if not ckpt else (True,):
        for micro in candidates:
            accum = effective // micro
            est = estimate_bytes(spec, micro, accum, checkpointing)
            if est <= limit:
                if micro == b:
                    how = f"gradient checkpointing on at micro-batch {b}x{a}"
                else:
                    how = f"micro-batch {b}x{a} -> {micro}x{accum} (effective batch {effective} kept)"
                    if checkpointing and not ckpt:
                        how += ", gradient checkpointing on"
                return MemoryPlan(
                    planned=True,
                    fits=True,
                    batch_size=micro,
                    gradient_accumulation_steps=accum,
                    gradient_checkpointing=checkpointing,
                    reason=f"estimated {_fmt(unplanned)} > {where}: {how}, estimated {_fmt(est)}",
                    estimated_bytes=est,
                    original_batch_size=b,
                    original_accumulation=a,
                    original_checkpointing=ckpt,
                    **common,
                )
    smallest = estimate_bytes(spec, 1, effective, True)
    return MemoryPlan(
        planned=True,
        fits=False,
        reason=f"won't fit: estimated {unplanned} bytes ({_fmt(unplanned)}) at micro-batch {b}, still "
        f"{smallest} bytes ({_fmt(smallest)}) at micro-batch 1 with gradient checkpointing; {where}",
        estimated_bytes=smallest,
        **common,
        **base,
    )


def apply_plan(spec: dict[str, Any], plan: MemoryPlan) -> dict[str, Any]:
    """The trial spec (camelCase dict) with the planned micro-batch, accumulation and checkpointing."""
    if not plan.planned or not plan.changed:
        return spec
    training = dict(spec.get("training") or {})
    training["batchSize"] = plan.batch_size
    training["gradientAccumulationSteps"] = plan.gradient_accumulation_steps
    if plan.gradient_checkpointing:
        training["useGradientCheckpointing"] = True
    return {**spec, "training": training}
