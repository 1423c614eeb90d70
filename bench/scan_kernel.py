"""Selective scan: the Triton kernel against the PyTorch scans — correctness, then speed.

1. Correctness: relative error of y and of every gradient against ``selective_scan_ref``
   (float32 inputs: < 1e-5 expected; bf16 inputs: < 1e-2), fresh random inputs per check.
2. Speed: forward + backward time of ``selective_scan_triton``, the chunked PyTorch scan
   (eager and ``torch.compile``d) and mamba-ssm's CUDA kernel when importable, at Mamba shapes
   (B, L, d_inner, N) = (8, 1024/4096, 1024, 16) — d_inner 1024 is the ``medium`` model's.
   The two numbers that bound it (METHOD.md): bytes — the scan must read u, Δ (B·L·D) and B, C
   (B·L·N) and write y, ≈ 3·B·L·D·2 bytes in bf16 forward; FLOPs ≈ 7·B·L·D·N forward.

    python bench/scan_kernel.py --device cuda
    python bench/scan_kernel.py --quick          # CPU, Triton interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

#: (dtype name, tolerance on the relative error of y and every gradient) — METHOD.md's bands.
CHECK_DTYPES_NAMES = (("float32", 1e-5), ("bfloat16", 1e-2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--device-label", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-lens", default="1024,4096")
    p.add_argument("--d-inner", type=int, default=1024)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--block-d", type=int, default=32, help="Channels per program (sequential kernel).")
    p.add_argument("--tile", type=int, default=16, help="Steps per parallel scan (tiled kernel).")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="Also time the tiled kernel over tile × block_d × num_warps (first --seq-lens value).",
    )
    p.add_argument("--tag", default="", help="Suffix of the result file names.")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.device = "cpu"
        args.batch, args.seq_lens, args.d_inner, args.state = 1, "16", 8, 4
        args.steps, args.warmup, args.block_d, args.chunk, args.tile = 1, 0, 8, 8, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # the interpreter must be on before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common
    from kubearch_trainer.kernels import scan as torch_scan
    from kubearch_trainer.kernels.scan_triton import selective_scan_triton

    CHECK_DTYPES = [(getattr(torch, name), tol) for name, tol in CHECK_DTYPES_NAMES]
    device = _common.pick_device(args.device)
    stamp = _common.stamp(device, args.device_label)
    gen = torch.Generator(device=device).manual_seed(0)

    def inputs(b: int, length: int, dtype: torch.dtype) -> list[torch.Tensor]:
        d, n = args.d_inner, args.state
        r = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
        u, bm, cm = r(b, length, d), r(b, length, n), r(b, length, n)
        delta = torch.rand(b, length, d, device=device, generator=gen) * 0.1 + 1e-3
        a = -torch.rand(d, n, device=device, generator=gen) * n
        dd = r(d)
        return [
            u.to(dtype).requires_grad_(),
            delta.requires_grad_(),  # Δ stays fp32, as in models/mamba.py (softplus in fp32)
            a.requires_grad_(),
            bm.to(dtype).requires_grad_(),
            cm.to(dtype).requires_grad_(),
            dd.requires_grad_(),
        ]

    def fwd_bwd(
        fn: Any, ins: list[torch.Tensor], gy: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y = fn(*ins)
        grads = torch.autograd.grad(y, ins, gy)
        return y, list(grads)

    rows: list[dict[str, Any]] = []
    names = ["u", "delta", "A", "B", "C", "D"]
    # 1) correctness against the sequential reference (short L: the reference loops in Python)
    checks = [(impl, dt, tol) for impl in ("tiled", "sequential") for dt, tol in CHECK_DTYPES]
    for impl, dtype, tol in checks:
        ins = inputs(2, 130 if not args.quick else 14, dtype)  # not a multiple of tile or chunk
        gy = torch.randn(ins[0].shape, device=device, generator=gen).to(dtype)
        opts = {"chunk": args.chunk, "tile": args.tile} if impl == "tiled" else {"block_d": args.block_d}
        y, g = fwd_bwd(lambda *x, impl=impl, opts=opts: selective_scan_triton(*x, impl=impl, **opts), ins, gy)
        ref_ins = [x.detach().double().requires_grad_() for x in ins]
        y_ref, g_ref = fwd_bwd(torch_scan.selective_scan_ref, ref_ins, gy.double())
        errs = {"y": ((y.double() - y_ref).norm() / y_ref.norm()).item()}
        errs.update(
            {
                f"grad_{k}": ((a.double() - b).norm() / b.norm()).item()
                for k, a, b in zip(names, g, g_ref, strict=True)
            }
        )
        worst = max(errs.values())
        rows.append(
            {
                "architecture": f"check_{impl}",
                "size": str(dtype).replace("torch.", ""),
                "seq_len": ins[0].shape[1],
                "batch_size": 2,
                "max_rel_error": worst,
                "tolerance": tol,
                "status": "ok" if worst < tol else "FAIL",
                "tokens_per_s": None,
                "mfu": None,
                "peak_memory_bytes": None,
                **{f"err_{k}": v for k, v in errs.items()},
                **stamp,
            }
        )
        print(f"check {impl} {dtype}: worst relative error {worst:.2e} (tolerance {tol:g})", flush=True)

    # 2) speed
    impls: dict[str, Any] = {
        "triton_tiled": lambda *x: selective_scan_triton(*x, impl="tiled", chunk=args.chunk, tile=args.tile),
        "triton_sequential": lambda *x: selective_scan_triton(
            *x, impl="sequential", chunk=args.chunk, block_d=args.block_d
        ),
        "torch_chunked": torch_scan.selective_scan_chunked,
    }
    if device.type == "cuda":
        impls["torch_chunked_compiled"] = torch.compile(torch_scan.selective_scan_chunked)
        mamba = torch_scan._mamba_ssm_scan()
        if mamba is not None:
            impls["mamba_ssm"] = lambda u, dl, a, b, c, d: mamba(
                u.transpose(1, 2).contiguous(),
                dl.transpose(1, 2).contiguous(),
                a.float(),
                b.transpose(1, 2).contiguous(),
                c.transpose(1, 2).contiguous(),
                d.float(),
                delta_softplus=False,
            ).transpose(1, 2)
    for length in (int(s) for s in args.seq_lens.split(",")):
        ins = inputs(args.batch, length, torch.bfloat16 if device.type == "cuda" else torch.float32)
        gy = torch.randn(ins[0].shape, device=device, generator=gen).to(ins[0].dtype)
        for name, fn in impls.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                times = _common.time_fn(
                    lambda fn=fn, ins=ins, gy=gy: fwd_bwd(fn, ins, gy), device, args.warmup, args.steps
                )
            except (RuntimeError, torch.OutOfMemoryError) as err:
                rows.append(
                    {
                        "architecture": name,
                        "size": f"D{args.d_inner}N{args.state}",
                        "seq_len": length,
                        "batch_size": args.batch,
                        "status": f"failed: {err}"[:200],
                        "tokens_per_s": None,
                        "mfu": None,
                        "peak_memory_bytes": None,
                        **stamp,
                    }
                )
                continue
            sec = _common.median(times)
            peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
            rows.append(
                {
                    "architecture": name,
                    "size": f"D{args.d_inner}N{args.state}",
                    "seq_len": length,
                    "batch_size": args.batch,
                    "ms": 1e3 * sec,
                    "tokens_per_s": args.batch * length / sec,
                    "mfu": None,
                    "peak_memory_bytes": peak,
                    "status": "ok",
                    **stamp,
                }
            )
            print(f"{name:>24} L={length:<6} {1e3 * sec:8.3f} ms fwd+bwd", flush=True)

    if args.sweep:  # tuning grid for the tiled kernel; the fastest goes into the defaults
        length = int(args.seq_lens.split(",")[0])
        ins = inputs(args.batch, length, torch.bfloat16 if device.type == "cuda" else torch.float32)
        gy = torch.randn(ins[0].shape, device=device, generator=gen).to(ins[0].dtype)
        grid = [(t, bd, w) for t in (8, 16, 32) for bd in (8, 16, 32) for w in (2, 4, 8)]
        for tile, bd, warps in grid if not args.quick else grid[:2]:
            fn = lambda *x, t=tile, b=bd, w=warps: selective_scan_triton(  # noqa: E731
                *x, impl="tiled", chunk=max(args.chunk, t), tile=t, block_d=b, num_warps=w
            )
            name = f"tiled_t{tile}_d{bd}_w{warps}"
            try:
                sec = _common.median(
                    _common.time_fn(lambda fn=fn: fwd_bwd(fn, ins, gy), device, args.warmup, args.steps)
                )
            except Exception as err:
                rows.append(
                    {
                        "architecture": name,
                        "size": f"D{args.d_inner}N{args.state}",
                        "seq_len": length,
                        "batch_size": args.batch,
                        "status": f"failed: {type(err).__name__}",
                        "tokens_per_s": None,
                        "mfu": None,
                        "peak_memory_bytes": None,
                        **stamp,
                    }
                )
                continue
            rows.append(
                {
                    "architecture": name,
                    "size": f"D{args.d_inner}N{args.state}",
                    "seq_len": length,
                    "batch_size": args.batch,
                    "ms": 1e3 * sec,
                    "tokens_per_s": args.batch * length / sec,
                    "mfu": None,
                    "peak_memory_bytes": None,
                    "status": "ok",
                    **stamp,
                }
            )
            print(f"{name:>24} L={length:<6} {1e3 * sec:8.3f} ms fwd+bwd", flush=True)

    columns = (
        ("architecture", "Implementation"),
        ("size", "Shape"),
        ("seq_len", "L"),
        ("batch_size", "B"),
        ("ms", "fwd+bwd (ms)"),
        ("tokens_per_s", "Tokens/s"),
        ("max_rel_error", "Max rel. error"),
        ("peak_memory_bytes", "Peak mem (B)"),
        ("status", "Status"),
    )
    out_dir = args.out_dir or _common.RESULTS
    paths = _common.write_results(
        _common.result_name("scan_kernel", args.tag),
        rows,
        columns,
        None,
        out_dir,
        "Selective scan kernels",
        _common.command_line("scan_kernel.py", argv),
    )
    print("\n" + paths[1].read_text())
    return 0 if all(r["status"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
