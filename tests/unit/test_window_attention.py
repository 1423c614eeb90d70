"""Sliding-window attention: FlexAttention's block mask and the dense-mask SDPA compute the same
window rule as an explicit softmax reference, and no token sees past its window."""

from __future__ import annotations

import math

import pytest
import torch
from kubearch_trainer.kernels.window_attention import sliding_window_attention


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    t = q.shape[-2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (j > i - window)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("t,window", [(40, 7), (128, 16), (33, 33), (20, 64)])
def test_matches_reference(backend: str, t: int, window: int) -> None:
    gen = torch.Generator().manual_seed(t * 100 + window)
    q, k, v = (torch.randn(2, 3, t, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
        q, k, v = q.float(), k.float(), v.float()  # FlexAttention's CPU path is float32
    out = sliding_window_attention(q, k, v, window, backend=backend)
    ref = _reference(q.double(), k.double(), v.double(), window)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-10 if backend == "sdpa" else 1e-5), err


def test_no_token_sees_past_its_window() -> None:
    """Changing a key/value more than ``window`` steps back leaves the output unchanged."""
    t, w = 48, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, t, 8, generator=gen) for _ in range(3))
    base = sliding_window_attention(q, k, v, w, backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[..., 10, :] += 5.0
    v2[..., 10, :] -= 5.0
    out = sliding_window_attention(q, k2, v2, w, backend="sdpa")
    changed = (out - base).abs().amax(dim=(0, 1, 3)) > 1e-6  # per query position
    assert changed.nonzero().flatten().tolist() == list(range(10, 10 + w))


def test_gradients_flow() -> None:
    q, k, v = (torch.randn(1, 2, 24, 8, requires_grad=True) for _ in range(3))
    sliding_window_attention(q, k, v, 5, backend="sdpa").square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_errors_name_the_argument() -> None:
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        sliding_window_attention(x, x, x, 0)
    with pytest.raises(ValueError, match="backend: 'xla' is not one of auto, flex, sdpa"):
        sliding_window_attention(x, x, x, 2, backend="xla")
