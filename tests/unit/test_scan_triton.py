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
            h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1) + (0 if D is None else D * u[:, t]))
        return torch.stack(ys, 1)

    def rel(a, r):
        return ((a.double() - r.double()).norm() / r.double().norm()).item()

    out = {}
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    # (batch, length, channels, state, chunk, block_d, with D): ragged sizes exercise every mask.
    cases = [(2, 37, 10, 5, 8, 8, True), (1, 20, 33, 16, 64, 32, False), (1, 9, 4, 3, 4, 4, True)]
    for i, (b, L, d, n, chunk, bd, has_d) in enumerate(cases):
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        u, B, C = r(b, L, d), r(b, L, n), r(b, L, n)
        delta = torch.rand(b, L, d, generator=gen, dtype=torch.float64) * 0.5 + 0.05
        A = -torch.rand(d, n, generator=gen, dtype=torch.float64) * 2
        D = r(d) if has_d else None
        names = ["u", "delta", "A", "B", "C"] + (["D"] if has_d else [])
        fast_in = [z.float().requires_grad_() for z in (u, delta, A, B, C, D) if z is not None]
        ref_in = [z.clone().requires_grad_() for z in (u, delta, A, B, C, D) if z is not None]
        y = selective_scan_triton(*fast_in, chunk=chunk, block_d=bd)
        gy = r(*y.shape)
        (y.double() * gy).sum().backward()
        y_ref = local_ref(*ref_in)
        (y_ref * gy).sum().backward()
        case = {"y": rel(y, y_ref), "dtype": str(y.dtype)}
        case.update({"grad_" + k: rel(a.grad, b_.grad) for k, a, b_ in zip(names, fast_in, ref_in)})
        if selective_scan_ref is not None:  # the trainer's own reference, float32
            case["y_vs_trainer_ref"] = rel(y, selective_scan_ref(*[z.detach() for z in fast_in]))
        out[str(i)] = case
    # bf16 inputs: computed in float32, returned in bf16, within bf16 rounding of the reference
    u, B, C = (torch.randn(1, 12, n_, generator=gen) for n_ in (6, 4, 4))
    delta = torch.rand(1, 12, 6, generator=gen) * 0.5 + 0.05
    A = -torch.rand(6, 4, generator=gen)
    yb = selective_scan_triton(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16())
    yr = local_ref(*(z.bfloat16().double() if z is not A else z.double() for z in (u, delta, A, B, C)))
    out["bf16"] = {"y": rel(yb, yr), "dtype": str(yb.dtype)}
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
    for name, case in result.items():
        if name == "bf16":
            continue
        assert case["dtype"] == "torch.float32"
        for key, err in case.items():
            if key == "dtype":
                continue
            assert err < 1e-5, f"case {name}: {key} relative error {err:.2e}"
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
    with pytest.raises(ValueError, match="D must be"):
        _check_shapes(u, u, torch.zeros(3, 2), torch.zeros(2, 5, 2), torch.zeros(2, 5, 2), torch.zeros(2))
