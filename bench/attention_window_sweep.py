"""Sliding-window vs full causal attention over sequence length: does the window cost O(T·w)?

Times one attention call forward + backward (bf16 on CUDA) for T = 1k, 2k, 4k, 8k:

- ``sdpa_causal``: full causal SDPA (flash) — the O(T²) reference;
- ``flex_window``: ``models.layers.local_attention(backend="flex")`` — FlexAttention with a cached
  sliding-window block mask, compiled — skips blocks outside the window, so time should grow
  ~linearly (the hybrid's default on CUDA from T = 2048);
- ``sdpa_window_mask``: ``local_attention(backend="sdpa")`` — SDPA with a dense (T, T) boolean
  mask; exact but O(T²) in time and memory (the hybrid's path below 2048 and on CPU).

The sweep decides whether ``FLEX_MIN_SEQ_LEN`` (2048) in ``models/layers.py`` is the right
cross-over. On CPU (``--quick``) FlexAttention is skipped (no backward there); the masked SDPA
stands in for it. ``ms_per_ktok`` (milliseconds per 1,000 query tokens) is flat for
an O(T·w) implementation and grows linearly with T for an O(T²) one.

    python bench/attention_window_sweep.py --device cuda
    python bench/attention_window_sweep.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from kubearch_trainer.flops import mfu

COLUMNS = (
    ("architecture", "Implementation"),
    ("seq_len", "T"),
    ("window", "Window"),
    ("ms", "fwd+bwd (ms)"),
    ("ms_per_ktok", "ms / 1k tokens"),
    ("tokens_per_s", "Tokens/s"),
    ("mfu", "MFU"),
    ("peak_memory_bytes", "Peak mem (B)"),
    ("status", "Status"),
)


def implementations(device: torch.device, window: int) -> dict[str, Any]:
    """name -> factory(T) returning attn(q, k, v), with any per-T setup (masks) done once.

    The windowed variants call the trainer's own ``models.layers.local_attention`` with its
    backend forced, so the sweep times exactly what the hybrid model runs.
    """
    from kubearch_trainer.models.layers import local_attention, window_block_mask, window_mask

    def causal(t: int):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_masked(t: int):
        window_mask(t, window, device)  # cached: built outside the timed region
        return lambda q, k, v: local_attention(q, k, v, window, backend="sdpa")

    impls: dict[str, Any] = {"sdpa_causal": causal, "sdpa_window_mask": sdpa_masked}
    if device.type == "cuda":  # FlexAttention has no backward on CPU

        def flex_window(t: int):
            window_block_mask(t, window, device)
            return lambda q, k, v: local_attention(q, k, v, window, backend="flex")

        impls["flex_window"] = flex_window
    return impls


def measure(
    name: str, factory: Any, t: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (args.batch, args.heads, t, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)
    row: dict[str, Any] = {
        "architecture": name,
        "size": f"B{args.batch}×H{args.heads}×hd{args.head_dim}",
        "seq_len": t,
        "batch_size": args.batch,
        "window": args.window,
    }
    try:
        attn = factory(t)

        def step() -> None:
            out = attn(q, k, v)
            out.backward(grad)
            q.grad = k.grad = v.grad = None

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = _common.time_fn(step, device, warmup=args.warmup, steps=args.steps)
    except (torch.OutOfMemoryError, RuntimeError) as err:  # e.g. a dense mask too large for the GPU
        return {
            **row,
            "status": f"failed: {type(err).__name__}",
            "tokens_per_s": None,
            "mfu": None,
            "peak_memory_bytes": None,
        }
    sec = _common.median(times)
    d = args.heads * args.head_dim
    t_eff = min(t, args.window) if name != "sdpa_causal" else t
    per_token = 12.0 * d * t_eff  # flops.py's attention term for one layer
    tps = args.batch * t / sec
    row.update(
        status="ok",
        ms=1e3 * sec,
        ms_per_ktok=1e3 * sec / (args.batch * t / 1000),
        tokens_per_s=tps,
        mfu=mfu(tps, per_token, args.peak_flops),
        peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    )
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["architecture"] for r in rows):
        pts = [(r["seq_len"], r["ms"]) for r in rows if r["architecture"] == name and r.get("ms")]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(f"Window {rows[0]['window']} vs full causal — {rows[0]['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--device-label", default=None)
    p.add_argument("--seq-lens", default="1024,2048,4096,8192")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="CPU smoke run with tiny shapes.")
    p.add_argument("--tag", default="", help="Suffix of the result file names.")
    p.add_argument("--out-dir", type=Path, default=_common.RESULTS)
    p.add_argument("--peak-flops", type=float, default=989e12)
    args = p.parse_args(argv)
    if args.quick:
        args.device = "cpu" if args.device == "auto" else args.device
        args.seq_lens, args.window, args.batch, args.heads, args.head_dim = "64,128,256", 32, 1, 2, 16
        args.steps, args.warmup = min(args.steps, 3), 1
    device = _common.pick_device(args.device)
    stamp = _common.stamp(device, args.device_label)
    rows = []
    for name, factory in implementations(device, args.window).items():
        for t in (int(s) for s in args.seq_lens.split(",")):
            row = {**measure(name, factory, t, args, device), **stamp}
            rows.append(row)
            print(f"{name:>17} T={t:<6} {row['status']} {row.get('ms', 0):.3f} ms", flush=True)
    command = _common.command_line("attention_window_sweep.py", argv)
    paths = _common.write_results(
        _common.result_name("attention_window_sweep", args.tag),
        rows,
        COLUMNS,
        plot,
        args.out_dir,
        "Sliding-window vs full causal attention",
        command,
    )
    print("\n" + paths[1].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
