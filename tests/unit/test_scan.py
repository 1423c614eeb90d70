"""The PyTorch selective scan must equal the sequential recurrence (values and gradients), keep
only its inputs and per-chunk states for backward, and survive decays that overflow a log-space
scan."""

from __future__ import annotations

import math

import pytest
import torch
from kubearch_trainer.kernels.scan import selective_scan, selective_scan_chunked, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D")


def _inputs(batch: int, length: int, d: int, n: int, seed: int = 0, delta_scale: float = 1.0, dtype=None):
    dtype = dtype or torch.float64
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, d, generator=g, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, d, generator=g, dtype=dtype))
    delta = delta * delta_scale
    A = -torch.rand(d, n, generator=g, dtype=dtype) * n - 0.1  # strictly negative, up to -n
    B = torch.randn(batch, length, n, generator=g, dtype=dtype)
    C = torch.randn(batch, length, n, generator=g, dtype=dtype)
    D = torch.randn(d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D)]


def _grads(y: torch.Tensor, args: list[torch.Tensor], probe: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad((y * probe).sum(), [a for a in args if a is not None])


@pytest.mark.parametrize("with_skip", [True, False], ids=["D", "noD"])
@pytest.mark.parametrize(("length", "chunk"), [(7, 3), (6, 3), (5, 8)])  # ragged, exact, chunk > L
def test_gradcheck_float64(length: int, chunk: int, with_skip: bool) -> None:
    """The analytic backward against finite differences, every input including A and D."""
    args = _inputs(2, length, 3, 2, seed=length)
    if not with_skip:
        args[5] = None
    assert torch.autograd.gradcheck(lambda *a: selective_scan_chunked(*a, chunk_size=chunk), args)


@pytest.mark.parametrize(
    ("length", "chunk"),
    [(1, 8), (7, 8), (37, 8), (37, 16), (64, 16), (50, 64)],  # not divisible, divisible, chunk > L
)
def test_chunked_matches_reference_values_and_grads(length: int, chunk: int) -> None:
    args = _inputs(2, length, 6, 4, seed=length)
    y_ref = selective_scan_ref(*args)
    y = selective_scan_chunked(*args, chunk_size=chunk)
    assert y.shape == (2, length, 6)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)  # float64 throughout

    probe = torch.randn_like(y_ref)  # a random cotangent exercises every output position
    for name, g, g_ref in zip(NAMES, _grads(y, args, probe), _grads(y_ref, args, probe), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("length", [45, 100])  # not multiples of the chunk (16) or of the default (64)
def test_float32_matches_float64_reference(length: int) -> None:
    args64 = _inputs(2, length, 8, 4, seed=1)
    args32 = [a.detach().float().requires_grad_() for a in args64]
    probe = torch.randn(2, length, 8, dtype=torch.float64)
    y_ref = selective_scan_ref(*args64)
    grads_ref = _grads(y_ref, args64, probe)
    for chunk in (16, 64):
        y = selective_scan_chunked(*args32, chunk_size=chunk)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
        grads = _grads(y, args32, probe.float())
        for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
            assert g.dtype == torch.float32
            err = ((g.double() - g_ref).norm() / g_ref.norm()).item()
            assert err < 1e-5, f"chunk {chunk}: gradient of {name} relative error {err:.1e}"


def test_strong_decay_does_not_overflow() -> None:
    """Δ·A summed over one chunk far below -88: exp(-Σ Δ·A) would overflow float32."""
    args64 = _inputs(1, 48, 4, 16, seed=3, delta_scale=5.0)
    chunk_sums = (args64[1].detach()[..., None] * args64[2].detach()).view(1, 3, 16, 4, 16).sum(2)
    assert chunk_sums.min() < -88 * 10
    args = [a.detach().float().requires_grad_() for a in args64]
    y = selective_scan_chunked(*args, chunk_size=16)
    assert torch.isfinite(y).all()
    y_ref = selective_scan_ref(*args64)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    probe = torch.randn(y.shape, dtype=torch.float64)
    grads = _grads(y, args, probe.float())
    for name, g, g_ref in zip(NAMES, grads, _grads(y_ref, args64, probe), strict=True):
        assert torch.isfinite(g).all(), name
        err = ((g.double() - g_ref).norm() / g_ref.norm()).item()
        assert err < 1e-5, f"gradient of {name} relative error {err:.1e}"


def test_saves_only_inputs_and_chunk_states() -> None:
    """What autograd keeps: the inputs themselves (no copies) plus (B, ⌈L/c⌉, D, N) fp32 states."""
    batch, length, d, n, chunk = 2, 50, 8, 4, 16
    args = [a.detach().float().requires_grad_() for a in _inputs(batch, length, d, n)]
    inputs = {a.untyped_storage().data_ptr() for a in args}
    extra: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in inputs:
            extra.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan_chunked(*args, chunk_size=chunk)
    assert extra == [batch * math.ceil(length / chunk) * d * n * 4]
    y.sum().backward()  # and the saved set suffices for the backward
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args)


def test_without_grad_saves_nothing_and_matches() -> None:
    args = [a.detach().float() for a in _inputs(2, 20, 3, 2)]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = selective_scan_chunked(*args, chunk_size=8)
    assert saved == []
    torch.testing.assert_close(y, selective_scan_ref(*args), rtol=1e-5, atol=1e-5)


def test_without_skip_and_dtype_preserved() -> None:
    u, delta, A, B, C, _ = (t.detach().float() for t in _inputs(2, 20, 3, 2))
    y = selective_scan_chunked(u, delta, A, B, C, None, chunk_size=8)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, selective_scan_ref(u, delta, A, B, C, None), rtol=1e-5, atol=1e-5)
    u16, B16 = (t.bfloat16().requires_grad_() for t in (u, B))
    y16 = selective_scan_chunked(u16, delta, A, B16, C, None, chunk_size=8)
    assert y16.dtype == torch.bfloat16
    y16.float().sum().backward()
    assert u16.grad.dtype == torch.bfloat16 and B16.grad.dtype == torch.bfloat16


def test_autocast_does_not_lower_the_scan_precision() -> None:
    """Under CPU bf16 autocast the C contraction must still run in fp32 (same result as without)."""
    args = [a.detach().float() for a in _inputs(2, 40, 16, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = selective_scan_chunked(*args)
    assert y_amp.dtype == torch.float32
    torch.testing.assert_close(y_amp, selective_scan_chunked(*args), rtol=1e-6, atol=1e-6)


def test_memory_estimator_uses_the_default_chunk() -> None:
    """memory.py (torch-free) mirrors the chunk that sets how many states the scan saves."""
    from kubearch_trainer.kernels.scan import DEFAULT_CHUNK
    from kubearch_trainer.memory import TORCH_SCAN_CHUNK

    assert TORCH_SCAN_CHUNK == DEFAULT_CHUNK


def test_bad_chunk_size_is_rejected() -> None:
    args = [a.detach().float() for a in _inputs(1, 4, 2, 2)]
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(*args, chunk_size=0)


def test_dispatcher_on_cpu_uses_the_pytorch_path() -> None:
    args = [t.detach().float() for t in _inputs(2, 33, 5, 3)]
    torch.testing.assert_close(selective_scan(*args), selective_scan_ref(*args), rtol=1e-5, atol=1e-5)


def test_compiled_mamba_matches_eager() -> None:
    """torch.compile of a mamba model still works: the scan is an opaque call inside the graph."""
    from kubearch_trainer.config import ModelConfig
    from kubearch_trainer.models.registry import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(architecture="mamba", d_model=32, n_layers=2, max_seq_len=64)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    losses, grads = [], []
    for fn in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        loss = fn(batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0])
    for g_c, g_e in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_dispatcher_on_cuda_matches_reference() -> None:
    args = [t.detach().float().cuda() for t in _inputs(2, 100, 16, 8)]
    y = selective_scan(*args)
    torch.testing.assert_close(y.cpu(), selective_scan_ref(*[a.cpu() for a in args]), rtol=1e-3, atol=1e-3)
