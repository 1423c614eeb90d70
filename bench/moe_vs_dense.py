"""MoE (8 experts, top-2) against a dense model with the same *active* parameters.

Issue 5's target: the MoE reaches ≥ 0.8× the dense model's tokens/s. Both run through the same
harness as ``train_throughput.py`` (trainer model classes, data path, bf16, compile, fused AdamW).
The dense twin keeps d_model and depth and widens its SwiGLU to k × an expert's width, so its MLP
has the parameters of the k experts a token is routed to (the router's d·E weights are the only
difference).

    python bench/moe_vs_dense.py --device cuda --sizes small,medium --seq-lens 1024
    python bench/moe_vs_dense.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import train_throughput as tt
from kubearch_trainer.config import SIZE_TABLE
from kubearch_trainer.flops import swiglu_hidden

COLUMNS = (
    ("architecture", "Model"),
    ("size", "Size"),
    ("seq_len", "Seq"),
    ("batch_size", "Batch"),
    ("active_params", "Active params"),
    ("params", "Total params"),
    ("tokens_per_s", "Tokens/s"),
    ("moe_over_dense", "MoE / dense"),
    ("mfu", "MFU"),
    ("peak_memory_bytes", "Peak mem (B)"),
    ("status", "Status"),
)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["size"], r["seq_len"]) for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for off, arch in ((-0.2, "dense_same_active"), (0.2, "moe")):
        vals = [
            next(
                (
                    r.get("tokens_per_s") or 0
                    for r in rows
                    if (r["size"], r["seq_len"]) == k and r["architecture"] == arch
                ),
                0,
            )
            for k in keys
        ]
        ax.bar([i + off for i in range(len(keys))], vals, 0.4, label=arch)
    ax.set_xticks(range(len(keys)), [f"{s}\nT={t}" for s, t in keys])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"MoE 8×top-2 vs dense, equal active params — {rows[0]['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    known, rest = p.parse_known_args(argv)
    args = tt.parse_args(rest)  # the harness's flags: --device, --sizes, --seq-lens, --quick, ...
    device = _common.pick_device(args.device)
    stamp = _common.stamp(device, args.device_label)
    rows = []
    for size in args.sizes.split(","):
        base = dict(tt.QUICK_DIMS) if args.quick else dict(SIZE_TABLE[size])
        for seq in (int(s) for s in args.seq_lens.split(",")):
            batch = args.batch_size or max(1, args.tokens_per_batch // seq)
            moe_dims = {**base, "num_experts": known.num_experts, "expert_capacity": known.top_k}
            # SwiGLU width of the twin = k × an expert's width (swiglu_hidden(d_ff) = 8·⌈2·d_ff/24⌉)
            twin_ff = math.ceil(3 * known.top_k * swiglu_hidden(base["d_ff"]) / 2)
            dense_dims = {**base, "d_ff": twin_ff}
            pair = {}
            for name, arch, dims in (("dense_same_active", "dense", dense_dims), ("moe", "moe", moe_dims)):
                conf = {"architecture": arch, "size": size, "seq_len": seq, "batch_size": batch, "dims": dims}
                pair[name] = {**tt.measure(conf, args, device), "architecture": name, **stamp}
            dense_tps, moe_tps = (
                pair["dense_same_active"].get("tokens_per_s"),
                pair["moe"].get("tokens_per_s"),
            )
            ratio = moe_tps / dense_tps if dense_tps and moe_tps else None
            for row in pair.values():
                rows.append({**row, "moe_over_dense": ratio})
            print(
                f"{size} T={seq}: dense {dense_tps or 0:,.0f} tok/s, moe {moe_tps or 0:,.0f} tok/s, "
                f"ratio {ratio if ratio is None else round(ratio, 3)}",
                flush=True,
            )
    command = _common.command_line("moe_vs_dense.py", argv)
    paths = _common.write_results(
        _common.result_name("moe_vs_dense", args.tag),
        rows,
        COLUMNS,
        plot,
        args.out_dir,
        "MoE vs dense at equal active parameters",
        command,
    )
    print("\n" + paths[1].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
