"""The vectorised selective scan must equal the sequential recurrence, values and gradients."""

from __future__ import annotations

import pytest
import torch
from kubearch_trainer.kernels.scan import selective_scan, selective_scan_chunked, selective_scan_ref


def _inputs(batch: int, length: int, d: int, n: int, seed: int = 0, delta_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, d, generator=g, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, d, generator=g, dtype=torch.float64))
    delta = delta * delta_scale
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * n - 0.1  # strictly negative, up to -n
    B = torch.randn(batch, length, n, generator=g, dtype=torch.float64)
    C = torch.randn(batch, length, n, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D)]


@pytest.mark.parametrize(
    ("length", "chunk"),
    [(1, 8), (7, 8), (37, 8), (37, 16), (64, 16), (50, 64)],  # not divisible, divisible, chunk > L
)
def test_chunked_matches_reference_values_and_grads(length: int, chunk: int) -> None:
    args = _inputs(2, length, 6, 4, seed=length)
    y_ref = selective_scan_ref(*args)
    y = selective_scan_chunked(*args, chunk_size=chunk)
    assert y.shape == (2, length, 6)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

    probe = torch.randn_like(y_ref)  # a random cotangent exercises every output position
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), args)
    grads = torch.autograd.grad((y * probe).sum(), args)
    for name, g, g_ref in zip(("u", "delta", "A", "B", "C", "D"), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=f"gradient of {name} differs")


def test_strong_decay_does_not_overflow() -> None:
    # Δ·A down to about -80 per step: a log-space cumsum over a chunk would overflow float32.
    args = _inputs(1, 48, 4, 16, seed=3, delta_scale=5.0)
    y_ref = selective_scan_ref(*args)
    y = selective_scan_chunked(*args, chunk_size=16)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_without_skip_and_dtype_preserved() -> None:
    u, delta, A, B, C, _ = (t.detach().float() for t in _inputs(2, 20, 3, 2))
    y = selective_scan_chunked(u, delta, A, B, C, None, chunk_size=8)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, selective_scan_ref(u, delta, A, B, C, None), rtol=1e-5, atol=1e-5)
    y16 = selective_scan_chunked(u.bfloat16(), delta, A, B, C, None, chunk_size=8)
    assert y16.dtype == torch.bfloat16


def test_dispatcher_on_cpu_uses_the_pytorch_path() -> None:
    args = [t.detach().float() for t in _inputs(2, 33, 5, 3)]
    torch.testing.assert_close(selective_scan(*args), selective_scan_ref(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_dispatcher_on_cuda_matches_reference() -> None:
    args = [t.detach().float().cuda() for t in _inputs(2, 100, 16, 8)]
    y = selective_scan(*args)
    torch.testing.assert_close(y.cpu(), selective_scan_ref(*[a.cpu() for a in args]), rtol=1e-3, atol=1e-3)
