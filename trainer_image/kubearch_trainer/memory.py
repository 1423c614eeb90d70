"""Training-memory estimator: bytes for weights, gradients, optimizer state and activations.

Why: the ArchitectureSearch controller must refuse (or shrink the batch of) a trial that cannot fit
its GPU *before* it occupies a node, and the benchmark reports estimated next to measured peaks.

Model (per process, data-parallel replicas hold everything in full):

- **weights** fp32 master copies, 4·P bytes; **gradients** fp32, 4·P; **AdamW** state ``exp_avg``
  and ``exp_avg_sq``, 8·P (fused or not); SGD with momentum 4·P.
- **autocast weight cache** (AMP only): bf16 copies of every matmul weight, 2·P_matmul, made once
  per forward and held (saved for backward) until the step's backward is done.
- **activations**: everything autograd saves for backward, per token, summed over layers (see the
  per-family functions below; each term names the op that saves it). Under AMP matmul inputs and
  outputs are bf16 (2 bytes) but the residual stream, norms, softplus/Δ and the loss stay fp32.
  With gradient checkpointing each block keeps only its input (the fp32 residual, 4·d) and one
  block's activations exist again while it is recomputed.
- **logits**: the loss's buffers, V·12 bytes per token whatever the precision. Op by op
  (``CausalLM.forward``): the LM head writes the logits (s·V); ``.float()`` copies them to fp32
  (4V; a no-op without AMP); ``cross_entropy`` is ``log_softmax`` (saves its fp32 output, 4V) then
  ``nll_loss`` (saves that same tensor). In training the forward returns no logits
  (``ModelOutput``'s rule), so when it returns both the head output and the fp32 copy are freed
  (nothing saves them: the linear saves its input, ``log_softmax`` its output): the forward's
  transient is (s + 8)·V, and the start of backward holds only the log-softmax, 4V. Backward then
  runs ``nll_loss`` backward (a dense fp32 gradient, 4V) and ``log_softmax`` backward (its fp32
  result, 4V) while the saved output is still alive: 4 + 4 + 4 = 12·V, the largest of the loss's
  moments (later ones hold the fp32 gradient and its bf16 cast, (4 + s)·V). Checked on CPU by
  :func:`measure_live_bytes`. (Before the rule, ``ModelOutput.logits`` kept the head output
  through backward: s·V more.)
- **peak**: the trainer sets gradients to None after each step, so they are allocated during the
  backward pass while activations are freed: the peak is weights + optimizer state + the larger of
  (autocast cache + activations + logits) at the loss's backward, the first nodes of the backward
  pass, and the gradients at its end.
  With gradient accumulation (``grads_persist``) gradients live through the forward pass and add.
  DDP keeps its own gradient buckets (4·P) unless ``gradient_as_bucket_view`` is set.

The per-token activation formulas were derived op by op from ``models/layers.py`` and
``models/mamba.py`` and checked on CPU against the bytes autograd actually saves
(:func:`measure_saved_bytes`, a ``saved_tensors_hooks`` count, deduplicated by storage); on a
GPU the benchmark compares the total with ``torch.cuda.max_memory_allocated``. Not modelled:
allocator fragmentation and caching slack, cuBLAS/cuDNN workspaces, NCCL buffers, CUDA context
(≈ 0.5 GiB outside PyTorch's allocator), LoRA adapters' extra activations. The model is eager
execution: under ``torch.compile`` the loss's fused kernels keep less (on CPU's inductor a bf16
step's whole peak was 3.2 bytes × V per token, against 12.85 eager), so compiled runs measure
below the estimate.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from kubearch_trainer.config import ModelConfig
from kubearch_trainer.flops import count_params, dt_rank, layer_kinds, swiglu_hidden

if TYPE_CHECKING:
    import torch
    from torch import nn

Optimizer = Literal["adamw", "sgd", "none"]
ScanImpl = Literal["fused", "torch"]
WindowKernel = Literal["auto", "sdpa", "flex"]
#: models/layers.py's rule for picking FlexAttention on CUDA (FLEX_MIN_SEQ_LEN, FLEX_BLOCK_SIZE,
#: FLEX_MIN_HEAD_DIM); mirrored here so the estimator stays importable without torch.
FLEX_MIN_SEQ_LEN, FLEX_BLOCK_SIZE, FLEX_MIN_HEAD_DIM = 2048, 128, 16
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "sgd": 4, "none": 0}
#: Time steps per stored state in the fused (Triton) scan's forward (kernels/scan_triton.py).
FUSED_SCAN_CHUNK = 64
#: Chunk of the PyTorch chunked scan (kernels/scan.DEFAULT_CHUNK, selective_scan_chunked's default).
TORCH_SCAN_CHUNK = 32


def torch_scan_floats_per_state(seq_len: int) -> float:
    """fp32 values the PyTorch chunked scan saves per (token, channel, state).

    Its autograd Function saves its inputs (already counted: u, Δ, the x_proj output holding B
    and C) plus the state entering each chunk, (B, ⌈L/chunk⌉, D, N) fp32: ⌈L/chunk⌉/L per token.
    """
    return math.ceil(seq_len / TORCH_SCAN_CHUNK) / seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by component; ``total`` is the predicted peak of allocated memory."""

    weights: int
    gradients: int
    optimizer: int
    autocast_cache: int
    activations: int
    logits: int
    ddp_buckets: int = 0
    grads_persist: bool = False  #: gradients alive during the forward pass (accumulation)

    @property
    def forward_peak(self) -> int:
        """What exists only between forward and backward: saved tensors and loss buffers."""
        return self.autocast_cache + self.activations + self.logits

    @property
    def total(self) -> int:
        state = self.weights + self.optimizer + self.ddp_buckets
        if self.grads_persist:
            return state + self.gradients + self.forward_peak
        return state + max(self.forward_peak, self.gradients)

    @property
    def saved_for_backward(self) -> int:
        """What :func:`measure_saved_bytes` counts: activations and the cached bf16 weights."""
        return self.activations + self.autocast_cache

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "forward_peak": self.forward_peak, "total": self.total}


def _attention_block_bytes(cfg: ModelConfig, d: int, s: int, amp: bool, moe: bool = False) -> float:
    """Pre-norm attention + MLP block (models/layers.TransformerBlock), bytes per token.

    norm1 input (fp32 residual) 4d; qkv input (bf16 cast under AMP, else the norm output) s·d;
    qkv output holding q, k, v for SDPA 3·s·d; SDPA output s·d (laid out (B, T, H, hd), so the
    reshape fed to ``out`` is a view) and log-sum-exp 4·heads; norm2 input 4d; then the MLP.
    RoPE adds the rotated q, k and a rotation intermediate, ≈ 3·s·d (measured).
    With ``moe`` the MLP is the routed experts of :func:`_moe_mlp_bytes`.
    """
    heads = cfg.resolved("n_heads")
    attn = 4 * d + s * d + 3 * s * d + s * d + 4 * heads + 4 * d
    if cfg.use_rope or cfg.attention == "rope_only" or cfg.attention.startswith("enhanced"):
        attn += 3 * s * d
    if cfg.mlp == "swiglu":
        h = swiglu_hidden(cfg.resolved("d_ff"))
        # gate and up each cast the same fp32 input under AMP (two bf16 copies); fp32 shares one.
        mlp_in = 2 * s * d if amp else s * d
        mlp = mlp_in + 4 * s * h  # gate out, silu out, up out, product
    else:
        ff = cfg.resolved("d_ff")
        mlp = s * d + 2 * s * ff  # up input, up output (for GELU), GELU output
    return attn + (_moe_mlp_bytes(cfg, d, s, amp) if moe else mlp)


def _moe_mlp_bytes(cfg: ModelConfig, d: int, s: int, amp: bool) -> float:
    """Routed SwiGLU experts (models/moe.MoELayer, grouped-GEMM path), bytes per token.

    Router input s·d (under fp32 the norm output 4d); router logits, probabilities and the
    z-loss's logsumexp input, fp32, 8·E; per routed copy (k of them): the gathered fp32 input 4d,
    its bf16 cast for the grouped GEMM (AMP only) 2d, the SwiGLU internals 4·s·h, the expert
    output s·d kept for the gate product, the gated fp32 output that ``index_add_`` keeps 4d, and
    the gate/index bookkeeping 16 bytes.
    (CPU under AMP runs a per-expert loop that casts twice and writes fp32: ≈ k·4d more.)
    """
    k, h = cfg.expert_capacity, swiglu_hidden(cfg.resolved("d_ff"))
    per_copy = 8 * d + (2 * d if amp else 0) + 4 * s * h + s * d + 16
    return s * d + 8 * cfg.num_experts + k * per_copy


def _mamba_block_bytes(cfg: ModelConfig, d: int, s: int, amp: bool, scan: ScanImpl, seq_len: int) -> float:
    """Mamba block (models/mamba.MambaBlock), bytes per token.

    norm input 4d; in_proj input s·d; in_proj output (x, z) 2·s·di; contiguous conv output s·di;
    SiLU output s·di (the scan's u and x_proj's input); x_proj output s·(r + 2N) (dt, B and C are
    views of it); dt_proj output upcast to fp32 for softplus 4·di (under fp32 the same tensor) and
    Δ 4·di; scan output s·di; SiLU(z) s·di; gated product s·di. Plus the scan's own state: both
    scans save their inputs (counted above) and one (di·N) fp32 state per chunk of
    ``FUSED_SCAN_CHUNK`` / ``TORCH_SCAN_CHUNK`` steps; the fused one also contiguous B and C.
    """
    di, n, r = cfg.expand * d, cfg.state_size, dt_rank(d)
    dt_up = 4 * di if amp else 0  # under fp32 .float() is a no-op: softplus saves dt_proj's output
    dt_out = 0 if amp else 4 * di
    block = 4 * d + s * d + 2 * s * di + s * di + s * di + s * (r + 2 * n)
    block += dt_up + dt_out + 4 * di + s * di + s * di + s * di
    if scan == "fused":
        block += 4 * di * n / FUSED_SCAN_CHUNK + 2 * s * n  # state checkpoints, contiguous B and C
    else:
        block += 4 * torch_scan_floats_per_state(seq_len) * di * n
    return block


def activation_bytes_per_token(
    cfg: ModelConfig, seq_len: int, *, amp: bool, checkpointing: bool = False, scan: ScanImpl = "fused"
) -> float:
    """Activation bytes per token of one forward pass, all layers plus the LM head's input."""
    d, s = cfg.resolved("d_model"), 2 if amp else 4
    per_layer = []
    for kind in layer_kinds(cfg):
        if kind == "mamba":
            per_layer.append(_mamba_block_bytes(cfg, d, s, amp, scan, seq_len))
        elif kind == "moe":
            per_layer.append(_attention_block_bytes(cfg, d, s, amp, moe=True))
        else:
            per_layer.append(_attention_block_bytes(cfg, d, s, amp))
    head = 4 * d + s * d  # final norm input, LM-head input
    if checkpointing:  # block inputs kept, one block recomputed at a time during backward
        return len(per_layer) * 4 * d + max(per_layer) + head
    return sum(per_layer) + head


def _uses_flex(cfg: ModelConfig, seq_len: int, window_kernel: WindowKernel) -> bool:
    if window_kernel != "auto":
        return window_kernel == "flex"
    head_dim = cfg.resolved("d_model") // cfg.resolved("n_heads")
    return (
        seq_len >= FLEX_MIN_SEQ_LEN
        and seq_len % FLEX_BLOCK_SIZE == 0
        and head_dim >= FLEX_MIN_HEAD_DIM
        and cfg.dropout == 0.0
    )


def estimate_memory(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    *,
    amp: bool = True,
    checkpointing: bool = False,
    optimizer: Optimizer = "adamw",
    scan: ScanImpl = "fused",
    n_params: int | None = None,
    grads_persist: bool = False,
    ddp: bool = False,
    window_kernel: WindowKernel = "auto",
) -> MemoryEstimate:
    """Predicted peak training memory of one process for ``batch_size`` × ``seq_len`` tokens.

    ``n_params`` overrides the analytic parameter count (pass ``model.num_params()``).
    ``scan`` is the selective-scan implementation the Mamba layers will use: ``fused`` (mamba-ssm
    or the Triton kernel, on CUDA) or ``torch`` (the chunked PyTorch scan, CPU fallback).
    ``grads_persist``: gradient accumulation over micro-batches; ``ddp``: a DDP wrapper's buckets.
    ``window_kernel``: the hybrid's local-attention kernel; ``auto`` follows
    ``models.layers.resolve_local_backend`` on a GPU (FlexAttention for T >= 2048, T a multiple of
    128, head dim >= 16, no dropout; otherwise SDPA with a dense mask). Use ``sdpa`` for CPU runs.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if optimizer not in OPTIMIZER_BYTES_PER_PARAM:
        raise ValueError(f"optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZER_BYTES_PER_PARAM)}")
    counts = count_params(cfg)
    p = n_params if n_params is not None else counts.total
    tokens = batch_size * seq_len
    s = 2 if amp else 4
    per_token = activation_bytes_per_token(cfg, seq_len, amp=amp, checkpointing=checkpointing, scan=scan)
    v = cfg.vocab_size
    logits = v * (4 + 4 + 4)  # saved log-softmax, its gradient in and out (see the module doc)
    matmul_weights = counts.total - counts.lookup_only
    # The hybrid's window on the SDPA path is a (T, T) boolean mask (cached per layer) that SDPA
    # turns into an additive float bias per call and keeps for backward: per batch, not per token.
    # FlexAttention's block mask is (T/128)² integers: nothing.
    window_layers = layer_kinds(cfg).count("attention") if cfg.architecture == "hybrid" else 0
    dense_mask = cfg.hybrid_local_window < seq_len and not _uses_flex(cfg, seq_len, window_kernel)
    mask = window_layers * (s + 1) * seq_len * seq_len if dense_mask else 0
    return MemoryEstimate(
        weights=4 * p,
        gradients=4 * p,
        optimizer=OPTIMIZER_BYTES_PER_PARAM[optimizer] * p,
        autocast_cache=2 * matmul_weights if amp else 0,
        activations=int(per_token * tokens + mask),
        logits=int(logits * tokens),
        ddp_buckets=4 * p if ddp else 0,
        grads_persist=grads_persist,
    )


def max_batch_size(
    cfg: ModelConfig, seq_len: int, budget_bytes: int, *, headroom: float = 0.9, **kwargs: object
) -> int:
    """Largest batch whose estimate fits ``headroom`` × ``budget_bytes``; 0 if not even one fits.

    The search controller uses it to size (or refuse) a trial for a GPU of known memory.
    """
    limit = headroom * budget_bytes
    if estimate_memory(cfg, 1, seq_len, **kwargs).total > limit:  # type: ignore[arg-type]
        return 0
    lo, hi = 1, 2
    while estimate_memory(cfg, hi, seq_len, **kwargs).total <= limit:  # type: ignore[arg-type]
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_memory(cfg, mid, seq_len, **kwargs).total <= limit:  # type: ignore[arg-type]
            lo = mid
        else:
            hi = mid
    return lo


def measure_saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor], *, amp: bool = False) -> int:
    """Bytes autograd saves for backward in one forward pass of ``model`` (parameters excluded).

    Counts each storage once (q, k, v views of one qkv output are one allocation), so it measures
    what stays allocated between forward and backward. Works on any device, including CPU; under
    ``amp`` it includes autocast's bf16 weight copies, i.e. ``MemoryEstimate.saved_for_backward``.
    """
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes() > 0:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    device_type = next(model.parameters()).device.type
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = model(batch)
    del out
    return sum(seen.values())


@dataclass(frozen=True)
class LiveBytes:
    """Bytes of tensors made during one training step (parameters and the batch excluded).

    ``at_backward`` is what is alive between forward and backward (the output included, as the
    train loop holds it); ``peak`` the most alive at once from the forward's start to the end of
    backward; ``after_backward`` what is left then (the gradients, with the output if still held).
    """

    at_backward: int
    peak: int
    after_backward: int


def measure_live_bytes(model: nn.Module, batch: dict[str, torch.Tensor], *, amp: bool = False) -> LiveBytes:
    """Allocated bytes over one forward + backward of ``model``, on any device, including CPU.

    Why: CPU has no ``max_memory_allocated``, and :func:`measure_saved_bytes` sees only what
    autograd saves, not the tensors the forward returns nor the buffers backward allocates (the
    loss's gradients, the ``logits`` term). A ``TorchDispatchMode`` sees the result of every op
    below autograd, forward and backward; it keeps a weak reference to each new storage, so the
    live total after each op is the sum over storages not yet freed. The train loop's order is
    kept: forward under autocast, autocast left (its weight cache then lives only in saved tensors),
    then backward with the output still referenced. Not seen: kernels' internal workspaces.
    """
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    # Views of what existed before (a weight's transpose, a slice of the batch) share its storage.
    before = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    before |= {t.untyped_storage().data_ptr() for t in batch.values()}
    live: dict[int, tuple[StorageWeakRef, int]] = {}
    peak = 0

    def alive() -> int:
        for key in [k for k, (ref, _) in live.items() if ref.expired()]:
            del live[key]
        return sum(n for _, n in live.values())

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            nonlocal peak
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    known = live.get(key)
                    fresh = known is None or known[0].expired()
                    if storage.nbytes() > 0 and key not in before and fresh:
                        live[key] = (StorageWeakRef(storage), storage.nbytes())
            peak = max(peak, alive())
            return out

    device_type = next(model.parameters()).device.type
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with Track():
        with ctx:
            out = model(batch)
        at_backward = alive()
        out.loss.backward()
        after = alive()
    del out
    return LiveBytes(at_backward=at_backward, peak=peak, after_backward=after)
