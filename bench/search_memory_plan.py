"""The memory planner's estimates for the seed's search, against measured peaks.

The ArchitectureSearch planner (operator/kubearch_operator/search/planner.py) decides, from
``kubearch_trainer.memory.estimate_memory``, which of the seed's trials would run out of memory on a
24 GiB GPU and re-slices them. This bench measures what those trials really take:

* on CUDA: each seed configuration (size × attention) trains a few steps the way the trainer does
  (fp32 unless --amp, fused AdamW, gradients set to None) at the seed's batch and sequence length,
  and ``torch.cuda.max_memory_allocated`` is compared with the estimate's total. A GPU larger than
  24 GiB (H100/H200) measures the trials the seed lost to OOM, so the "would OOM on 24 GiB" verdicts
  are checked directly (``measured_over_24gib``);
* on CPU (``--quick``): seed-like models with a GPT-2 vocabulary but small widths, where the bytes
  autograd keeps for backward (``measure_saved_bytes``) are compared with the estimate's
  activations + autocast cache + the loss's saved log-softmax.

    python bench/search_memory_plan.py --device cuda                    # seed shapes: T 768, vocab 50257
    python bench/search_memory_plan.py --device cuda --batch-sizes 16,32 --attentions baseline,enhanced_large
    python bench/search_memory_plan.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import torch
from kubearch_trainer.config import ModelConfig
from kubearch_trainer.memory import estimate_memory, measure_saved_bytes
from kubearch_trainer.models.registry import build_model

GIB = 2**30
COLUMNS = (
    ("size", "Size"),
    ("attention", "Attention"),
    ("seq_len", "Seq"),
    ("batch_size", "Batch"),
    ("estimated_bytes", "Estimated (B)"),
    ("measured_bytes", "Measured (B)"),
    ("measured_over_estimated", "Measured / est."),
    ("estimated_over_24gib", "Est. > 24 GiB"),
    ("measured_over_24gib", "Meas. > 24 GiB"),
    ("kind", "Measured as"),
    ("status", "Status"),
)


def _batch(cfg: ModelConfig, b: int, t: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), device=device)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


def measure_cuda(cfg: ModelConfig, b: int, t: int, amp: bool, device: torch.device, steps: int = 3) -> int:
    """Peak allocated bytes of ``steps`` training steps as the trainer runs them."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(steps):
            batch = _batch(cfg, b, t, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = model(batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    finally:
        del model, opt
        torch.cuda.empty_cache()


def run(ns: argparse.Namespace) -> list[dict[str, Any]]:
    device = _common.pick_device(ns.device)
    env = _common.stamp(device, ns.device_label)
    rows = []
    for size in ns.sizes.split(","):
        for attention in ns.attentions.split(","):
            for b in (int(x) for x in ns.batch_sizes.split(",")):
                dims = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256} if ns.quick else {}
                cfg = ModelConfig(
                    architecture="dense",
                    size=size,
                    attention=attention,
                    vocab_size=ns.vocab,
                    max_seq_len=max(ns.seq_len, 1024),
                    **dims,
                )
                est = estimate_memory(cfg, b, ns.seq_len, amp=ns.amp)
                row: dict[str, Any] = {
                    "architecture": "dense",
                    "size": size if not ns.quick else f"{size} (d64 L2)",
                    "attention": attention,
                    "seq_len": ns.seq_len,
                    "batch_size": b,
                    "amp": ns.amp,
                    "tokens_per_s": None,
                    "mfu": None,
                    "estimated_over_24gib": est.total > 24 * GIB,
                    **env,
                }
                try:
                    if device.type == "cuda":
                        measured = measure_cuda(cfg, b, ns.seq_len, ns.amp, device)
                        row.update(estimated_bytes=est.total, kind="cuda_max_allocated")
                        row["measured_over_24gib"] = measured > 24 * GIB
                    else:
                        torch.manual_seed(0)
                        model = build_model(cfg)
                        measured = measure_saved_bytes(model, _batch(cfg, b, ns.seq_len, device), amp=ns.amp)
                        predicted = est.saved_for_backward + 4 * cfg.vocab_size * b * ns.seq_len
                        row.update(estimated_bytes=predicted, kind="autograd_saved_bytes")
                        row["measured_over_24gib"] = None
                    row.update(
                        measured_bytes=measured,
                        peak_memory_bytes=measured,
                        measured_over_estimated=measured / row["estimated_bytes"],
                        status="ok",
                    )
                except torch.cuda.OutOfMemoryError:
                    row.update(
                        estimated_bytes=est.total, status="oom", measured_bytes=None, peak_memory_bytes=None
                    )
                rows.append(row)
                print(
                    f"{row['size']:>14} {attention:>15} b{b:<3} est {row['estimated_bytes'] / GIB:6.2f} GiB "
                    f"measured {(row['measured_bytes'] or 0) / GIB:6.2f} GiB ({row['status']})",
                    flush=True,
                )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("measured_over_estimated")]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(ok)), 4))
    ax.bar(range(len(ok)), [r["measured_over_estimated"] for r in ok])
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks(
        range(len(ok)),
        [f"{r['size']}/{r['attention']}/b{r['batch_size']}" for r in ok],
        rotation=90,
        fontsize=7,
    )
    ax.set_ylabel("measured / estimated")
    ax.set_title("Memory estimator vs measurement (seed search shapes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--device-label", default=None)
    p.add_argument("--sizes", default="tiny,small,medium,large")
    p.add_argument("--attentions", default="baseline,lora_large,enhanced_large,bias_only")
    p.add_argument("--batch-sizes", default="16,32")
    p.add_argument("--seq-len", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (the seed example runs fp32)")
    p.add_argument("--quick", action="store_true", help="CPU, small widths, short sequences: seconds")
    p.add_argument("--out-dir", default=str(_common.RESULTS))
    ns = p.parse_args(argv)
    if ns.quick:
        ns.device, ns.sizes, ns.attentions, ns.batch_sizes, ns.seq_len = (
            "cpu",
            "tiny",
            "baseline,lora_small",
            "2",
            32,
        )
    rows = run(ns)
    paths = _common.write_results(
        "search_memory_plan",
        rows,
        COLUMNS,
        plot,
        Path(ns.out_dir),
        "Memory planner: estimated vs measured (seed search)",
        _common.command_line("search_memory_plan.py", argv),
    )
    print("wrote " + ", ".join(str(x) for x in paths if x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
