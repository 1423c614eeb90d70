"""The Triton selective scan equals the PyTorch reference, forward and backward (fp32 tolerance).

On CPU the kernels run under Triton's interpreter, which must be switched on before ``triton`` is
imported; other tests in the same process may already have imported it, so the comparison runs in
a fresh interpreter (subprocess) with ``TRITON_INTERPRET=1`` and reports relative errors as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

_CHECK = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from kubearch_trainer.kernels.scan_triton import selective_scan_triton
    try:
        from kubearch_trainer.kernels.scan import selective_scan_ref
    except ImportError:
        selective_scan_ref = None

    def local_ref(u, delta, A, B, C, D=None):  # the recurrence as written, float64
        h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]); ys = []
        for t in range(u.shape[1]):
            decay = torch.exp(delta[:, t, :, None] * A)
            h = decay * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1) + (0 if D is None else D * u[:, t]))
        return torch.stack(ys, 1)

    def rel(a, r):
        return ((a.double() - r.double()).norm() / r.double().norm()).item()

    out = {}
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    # (impl, batch, length, channels, state, chunk, block_d, tile, with D): ragged sizes (L not a
    # multiple of tile or chunk, channels not of block_d, state not a power of 2) hit every mask.
    cases = [
        ("sequential", 2, 37, 10, 5, 8, 8, 16, True),
        ("sequential", 1, 20, 33, 16, 64, 32, 16, False),
        ("tiled", 2, 21, 10, 5, 8, 8, 4, True),
        ("tiled", 1, 9, 4, 3, 4, 4, 4, False),
    ]
    for i, (impl, b, L, d, n, chunk, bd, tile, has_d) in enumerate(cases):
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        u, B, C = r(b, L, d), r(b, L, n), r(b, L, n)
        delta = torch.rand(b, L, d, generator=gen, dtype=torch.float64) * 0.5 + 0.05
        A = -torch.rand(d, n, generator=gen, dtype=torch.float64) * 2
        D = r(d) if has_d else None
        names = ["u", "delta", "A", "B", "C"] + (["D"] if has_d else [])
        fast_in = [z.float().requires_grad_() for z in (u, delta, A, B, C, D) if z is not None]
        ref_in = [z.clone().requires_grad_() for z in (u, delta, A, B, C, D) if z is not None]
        y = selective_scan_triton(*fast_in, impl=impl, chunk=chunk, block_d=bd, tile=tile)
        gy = r(*y.shape)
        (y.double() * gy).sum().backward()
        y_ref = local_ref(*ref_in)
        (y_ref * gy).sum().backward()
        case = {"y": rel(y, y_ref), "dtype": str(y.dtype)}
        case.update({"grad_" + k: rel(a.grad, b_.grad) for k, a, b_ in zip(names, fast_in, ref_in)})
        if selective_scan_ref is not None:  # the trainer's own reference, float32
            case["y_vs_trainer_ref"] = rel(y, selective_scan_ref(*[z.detach() for z in fast_in]))
        out[f"{i}-{impl}"] = case
    # bf16 inputs: computed in float32, returned in bf16, within bf16 rounding of the reference
    u, B, C = (torch.randn(1, 12, n_, generator=gen) for n_ in (6, 4, 4))
    delta = torch.rand(1, 12, 6, generator=gen) * 0.5 + 0.05
    A = -torch.rand(6, 4, generator=gen)
    yb = selective_scan_triton(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), tile=4)
    yr = local_ref(*(z.bfloat16().double() if z is not A else z.double() for z in (u, delta, A, B, C)))
    out["bf16"] = {"y": rel(yb, yr), "dtype": str(yb.dtype)}
    # inside torch.compile the kernels run as an opaque call (graph break); gradients unchanged
    ins = [torch.randn(1, 12, 4, generator=gen), torch.rand(1, 12, 4, generator=gen) * 0.3,
           -torch.rand(4, 3, generator=gen), torch.randn(1, 12, 3, generator=gen),
           torch.randn(1, 12, 3, generator=gen), torch.randn(4, generator=gen)]
    f = lambda *x: (selective_scan_triton(torch.sin(x[0]), *x[1:], tile=4, block_d=4) ** 2).sum()
    grads = [torch.autograd.grad(fn(*[z.requires_grad_() for z in ins]), ins)
             for fn in (f, torch.compile(f, backend="eager"))]
    out["compiled"] = {"max_grad_diff": max((a - b).abs().max().item() for a, b in zip(*grads))}
    print(json.dumps(out))
    """
)


def _run_check(seed: int) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, str(seed)], capture_output=True, text=True, env=env, timeout=120
    )
    if proc.returncode != 0:
        if "interpret" in proc.stderr.lower() and "not supported" in proc.stderr.lower():
            pytest.skip(f"Triton's interpreter is unavailable: {proc.stderr.strip().splitlines()[-1]}")
        raise AssertionError(f"interpreter run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_scan_matches_reference_forward_and_backward() -> None:
    result = _run_check(seed=1234)
    assert result.pop("compiled")["max_grad_diff"] < 1e-6
    for name, case in result.items():
        if name == "bf16":
            continue
        assert case["dtype"] == "torch.float32"
        for key, err in case.items():
            if key == "dtype":
                continue
            assert err < 1e-5, f"case {name}: {key} relative error {err:.2e}"
    assert {k.split("-")[1] for k in result if k != "bf16"} == {"sequential", "tiled"}
    assert result["bf16"]["dtype"] == "torch.bfloat16"
    assert result["bf16"]["y"] < 1e-2  # bf16 output rounding (8-bit mantissa)


def test_refuses_cpu_without_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        pytest.skip("this process runs with TRITON_INTERPRET set")
    import torch
    from kubearch_trainer.kernels.scan_triton import selective_scan_triton, triton_scan_available

    assert not triton_scan_available("cpu")
    x = torch.zeros(1, 4, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        selective_scan_triton(x, x, torch.zeros(2, 3), torch.zeros(1, 4, 3), torch.zeros(1, 4, 3))


def test_shape_errors_name_the_argument() -> None:
    import torch
    from kubearch_trainer.kernels.scan_triton import _check_shapes

    u = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match=r"A must be \(D=3, N\)"):
        _check_shapes(u, u, torch.zeros(4, 2), torch.zeros(2, 5, 2), torch.zeros(2, 5, 2), None)
    with pytest.raises(ValueError, match="B must be"):
        _check_shapes(u, u, torch.zeros(3, 2), torch.zeros(2, 5, 3), torch.zeros(2, 5, 2), None)
    from kubearch_trainer.kernels.scan_triton import selective_scan_triton

    ok = (u, u, torch.zeros(3, 2), torch.zeros(2, 5, 2), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match="impl: 'fast' is not one of tiled, sequential"):
        selective_scan_triton(*ok, impl="fast")
    with pytest.raises(ValueError, match="powers of two"):
        selective_scan_triton(*ok, tile=12)
    with pytest.raises(ValueError, match="D must be"):
        _check_shapes(u, u, torch.zeros(3, 2), torch.zeros(2, 5, 2), torch.zeros(2, 5, 2), torch.zeros(2))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["tiled", "sequential"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_triton_scan_on_cuda_matches_reference(dtype: str, tol: float, impl: str) -> None:
    """Issue 5: the fused scan checked against the PyTorch reference on the GPU (bf16 tolerance)."""
    import torch
    from kubearch_trainer.kernels.scan import selective_scan_chunked, selective_scan_ref
    from kubearch_trainer.kernels.scan_triton import selective_scan_triton

    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(7)
    b, length, d, n = 2, 300, 96, 16  # L not a multiple of the chunk, D not of the block
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    ins = [
        r(b, length, d).to(dt),
        torch.rand(b, length, d, device="cuda", generator=gen) * 0.1 + 1e-3,
        -torch.rand(d, n, device="cuda", generator=gen) * n,
        r(b, length, n).to(dt),
        r(b, length, n).to(dt),
        r(d),
    ]
    ins = [x.requires_grad_() for x in ins]
    ref_ins = [x.detach().double().requires_grad_() for x in ins]
    gy = r(b, length, d).to(dt)
    y = selective_scan_triton(*ins, impl=impl)
    grads = torch.autograd.grad(y, ins, gy)
    y_ref = selective_scan_ref(*ref_ins)
    grads_ref = torch.autograd.grad(y_ref, ref_ins, gy.double())
    for name, a, ref in zip(
        ("y", "u", "delta", "A", "B", "C", "D"), (y, *grads), (y_ref, *grads_ref), strict=True
    ):
        err = ((a.double() - ref).norm() / ref.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"
    # and the chunked PyTorch scan agrees at a long sequence (the reference loop would be slow)
    long_ins = [
        r(1, 4096, d),
        torch.rand(1, 4096, d, device="cuda", generator=gen) * 0.1,
        ins[2].detach(),
        r(1, 4096, n),
        r(1, 4096, n),
        ins[5].detach(),
    ]
    y_fast, y_chunk = selective_scan_triton(*long_ins, impl=impl), selective_scan_chunked(*long_ins)
    assert ((y_fast - y_chunk).norm() / y_chunk.norm()).item() < 1e-4
