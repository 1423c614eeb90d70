"""Sliding-window causal attention that costs O(T·w) on the GPU: FlexAttention with a block mask.

Token i attends token j iff ``i - window < j <= i`` (the same rule as
``models.layers.sliding_window_mask``). SDPA has no window argument: a dense (T, T) boolean mask
is exact but computes and stores every score, O(T²). FlexAttention's block mask lets its Triton
kernel skip every key block outside the window, so time and memory grow linearly in T (measured
on the H100: 0.72 / 1.21 / 1.61 ms at T = 1k / 4k / 8k against SDPA-causal's 0.49 / 1.45 / 4.71,
``/work/shared/NOTES-gpu.md``). It is slower than flash SDPA at short T, so ``window >= T`` stays
on SDPA's causal path.

``flex_attention`` must run compiled to be fast (uncompiled it materialises the scores), and the
block mask should be built once per (T, window, device): both are cached here. On CPU, or where
FlexAttention is missing, the dense-mask SDPA is used (exact, O(T²)).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

#: Set ``KUBEARCH_WINDOW_ATTENTION=sdpa`` to force the dense-mask path (for A/B timing).
_FORCE = os.environ.get("KUBEARCH_WINDOW_ATTENTION", "auto")


@functools.cache
def _flex_fns():
    """(flex_attention compiled, create_block_mask) or None when FlexAttention is unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def _window_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return mask_mod


@functools.lru_cache(maxsize=32)
def window_block_mask(t: int, window: int, device: str):
    """The FlexAttention block mask for length ``t`` (cached: building it costs a kernel launch)."""
    fns = _flex_fns()
    if fns is None:
        raise RuntimeError("torch.nn.attention.flex_attention is not available in this torch")
    return fns[1](_window_mod(window), None, None, t, t, device=device)


@functools.lru_cache(maxsize=32)
def _dense_mask(t: int, window: int, device: str) -> torch.Tensor:
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & (j > i - window)


def use_flex(q: torch.Tensor) -> bool:
    """FlexAttention on CUDA tensors when available (and not forced off)."""
    return q.is_cuda and _FORCE != "sdpa" and _flex_fns() is not None


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *, backend: str = "auto"
) -> torch.Tensor:
    """Causal attention over the last ``window`` keys; q, k, v are (B, H, T, head_dim).

    ``backend``: ``auto`` (FlexAttention on CUDA, dense-mask SDPA elsewhere), ``flex`` or ``sdpa``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if backend not in ("auto", "flex", "sdpa"):
        raise ValueError(f"backend: {backend!r} is not one of auto, flex, sdpa")
    t = q.shape[-2]
    if window >= t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend == "flex" or (backend == "auto" and use_flex(q)):
        fns = _flex_fns()
        if fns is None:
            raise RuntimeError("backend 'flex' needs torch.nn.attention.flex_attention")
        block_mask = window_block_mask(t, window, str(q.device))
        # compiled on CUDA; on CPU (tests) the eager reference implementation is enough
        if q.is_cuda:
            return fns[0](q, k, v, block_mask=block_mask)
        with warnings.catch_warnings():  # CPU (tests): the unfused reference is what we want
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return _eager_flex()(q, k, v, block_mask=block_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(t, window, str(q.device)))


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention
