"""Issue 5's side by side: the trainer's dense model beside the plain PyTorch GPT, shape by shape.

For each of the issue's four GPT shapes this runs ``baseline_gpt.run_shape`` (the bare model) and
then ``train_throughput.measure`` (the trainer's ``build_model``, data set ``get_batch``, grad
clipping) at the same d_model × layers × batch × seq (vocabulary 50,304, bf16, compile, fused
AdamW), in one process so the device's one lease pays for one torch import, and writes the pair
after *each* shape: a lease that ends early still leaves every finished pair on disk.

The trainer's dense block uses the same SwiGLU width (2/3 · 4d, rounded) as the baseline, so the
two parameter counts differ only by rounding and the trainer's tied embedding; MFU uses each
model's own FLOPs per token (the baseline by the issue's formula with all parameters).

    python bench/trainer_vs_baseline.py --device cuda       # the four shapes, ~1 min each on an H100/H200
    python bench/trainer_vs_baseline.py --quick             # CPU smoke run (format only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import baseline_gpt
import train_throughput

COLUMNS = (
    ("size", "Shape"),
    ("batch_size", "Batch"),
    ("seq_len", "Seq"),
    ("baseline_tokens_per_s", "Plain GPT tok/s"),
    ("trainer_tokens_per_s", "Trainer tok/s"),
    ("trainer_over_baseline", "Trainer ÷ plain"),
    ("target_tokens_per_s", "Issue floor tok/s"),
    ("baseline_mfu", "Plain MFU"),
    ("trainer_mfu", "Trainer MFU"),
    ("target_mfu", "Issue MFU"),
    ("baseline_peak_memory_bytes", "Plain peak (B)"),
    ("trainer_peak_memory_bytes", "Trainer peak (B)"),
    ("trainer_gpu_idle_share", "Trainer GPU idle"),
    ("status", "Status"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--device-label", default=None)
    p.add_argument("--shapes", default="all", help="Comma-separated indices into the issue's shapes (0-3).")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ddp", action="store_true", help="Trainer side wrapped in DDP (world size 1).")
    p.add_argument("--quick", action="store_true", help="CPU smoke run, one tiny shape, no compile.")
    p.add_argument("--tag", default="", help="Suffix of the result file names.")
    p.add_argument("--out-dir", type=Path, default=_common.RESULTS)
    return p.parse_args(argv)


def pair_row(shape: tuple[Any, ...], base: dict[str, Any], trainer: dict[str, Any]) -> dict[str, Any]:
    """One comparison row from the two scripts' result rows (their own fields kept, prefixed)."""
    d, n, batch, seq, target_tps, target_mfu = shape
    row: dict[str, Any] = {
        "architecture": "dense",
        "size": f"{d}d×{n}L",
        "d_model": d,
        "n_layers": n,
        "batch_size": batch,
        "seq_len": seq,
        "target_tokens_per_s": target_tps,
        "target_mfu": target_mfu,
    }
    for prefix, src in (("baseline", base), ("trainer", trainer)):
        for key in ("status", "params", "tokens_per_s", "mfu", "step_time_s", "peak_memory_bytes"):
            row[f"{prefix}_{key}"] = src.get(key)
    row["trainer_gpu_idle_share"] = trainer.get("gpu_idle_share")
    row["trainer_final_loss"] = trainer.get("final_loss")
    tb, tt = base.get("tokens_per_s"), trainer.get("tokens_per_s")
    row["trainer_over_baseline"] = (tt / tb) if tb and tt else None
    # The fields every result row carries: the trainer's side is the product's number.
    row["tokens_per_s"], row["mfu"] = tt, trainer.get("mfu")
    row["peak_memory_bytes"] = trainer.get("peak_memory_bytes")
    row["status"] = (
        "ok"
        if base.get("status") == trainer.get("status") == "ok"
        else (f"plain {base.get('status')}, trainer {trainer.get('status')}")
    )
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    for off, key, label in (
        (-0.27, "baseline_tokens_per_s", "plain GPT"),
        (0.0, "trainer_tokens_per_s", "kubearch trainer"),
        (0.27, "target_tokens_per_s", "issue 5 floor (H100)"),
    ):
        ax.bar([x + off for x in xs], [r.get(key) or 0 for r in rows], 0.27, label=label)
    ax.set_xticks(list(xs), [f"{r['size']}\nB{r['batch_size']}×{r['seq_len']}" for r in rows], fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"Trainer vs plain GPT — {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    bargs, shapes = baseline_gpt.parse_args(
        [*common, "--shapes", args.shapes, *(["--quick"] if args.quick else [])]
    )
    targs = train_throughput.parse_args(
        [*common, "--issue-shapes", *(["--ddp"] if args.ddp else []), *(["--quick"] if args.quick else [])]
    )
    device = _common.pick_device(bargs.device)
    stamp = _common.stamp(device, args.device_label)
    command = _common.command_line("trainer_vs_baseline.py", argv)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        d, n, batch, seq = shape[:4]
        conf = {
            "architecture": "dense",
            "size": f"{d}d×{n}L",
            "seq_len": seq,
            "batch_size": batch,
            "dims": {"d_model": d, "n_layers": n, "n_heads": max(1, d // 64), "d_ff": 4 * d},
        }
        base = baseline_gpt.run_shape(d, n, batch, seq, device, bargs)
        trainer = train_throughput.measure(conf, targs, device)
        row = {**pair_row(shape, base, trainer), **stamp}
        rows.append(row)
        plain, ours = row["baseline_tokens_per_s"] or 0, row["trainer_tokens_per_s"] or 0
        print(
            f"{row['size']:>10} B={batch} T={seq}: plain {plain:,.0f} tok/s "
            f"(MFU {100 * (row['baseline_mfu'] or 0):.1f}%), trainer {ours:,.0f} "
            f"tok/s (MFU {100 * (row['trainer_mfu'] or 0):.1f}%) — {row['status']}",
            flush=True,
        )
        # Written after every shape: an interrupted lease keeps what it measured.
        paths = _common.write_results(
            _common.result_name("trainer_vs_baseline", args.tag),
            rows,
            COLUMNS,
            plot,
            args.out_dir,
            "Trainer vs plain PyTorch GPT (issue 5's shapes)",
            command,
        )
    print("\n" + paths[1].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
