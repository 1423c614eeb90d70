"""Training throughput of every sequence architecture: tokens/s, step time, peak memory, MFU.

Uses the trainer's own pieces — ``build_model`` (the real model classes), the text data set
(``data.build_datasets``: byte corpus, the same ``get_batch`` the train loop calls each step),
bf16 autocast, ``torch.compile`` and fused AdamW, gradient clipping — and times full optimizer
steps. Warm-up steps (compilation, autotuning, allocator growth) are excluded; the step time is
the median of the timed steps. No ``.item()`` inside the timed loop: the loss is read once at the
end, as the trainer reads metrics only every N steps.

MFU = tokens/s × FLOPs/token ÷ 989 TFLOP/s (``kubearch_trainer.flops``; the FLOP formula is in
that module's docstring). ``tokens_per_s`` uses the median step time; ``tokens_per_s_wall`` the
wall clock over all timed steps. GPU idle share = 1 − (Σ step times between CUDA events) ÷ (time
from the first step's start to the last step's end): the time the GPU stream waited for the host
*between* steps (data loading, Python), which is what "data loading never starves the GPU" asks;
gaps *inside* a step (launch overhead) need a profiler trace and are not in this number.

    python bench/train_throughput.py --device cuda                       # all archs × sizes × seqs
    python bench/train_throughput.py --device cuda --issue-shapes         # dense at issue 5's shapes
    python bench/train_throughput.py --quick                              # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from kubearch_trainer.config import SIZE_TABLE, load_config
from kubearch_trainer.data import build_datasets
from kubearch_trainer.flops import flops_per_token, mfu
from kubearch_trainer.memory import estimate_memory
from kubearch_trainer.models.registry import available_architectures, build_model

ARCHITECTURES = ("dense", "mamba", "moe", "hybrid")
#: Issue 5's reference shapes: (d_model, n_layers, batch, seq_len) at vocabulary 50,304.
ISSUE_SHAPES = ((512, 8, 64, 1024), (768, 10, 48, 1024), (1024, 24, 16, 1024), (2048, 16, 8, 2048))
#: The tiny shape of ``--quick``: seconds on two CPU cores.
QUICK_DIMS = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}

COLUMNS = (
    ("architecture", "Arch"),
    ("size", "Size"),
    ("seq_len", "Seq"),
    ("batch_size", "Batch"),
    ("params", "Params"),
    ("tokens_per_s", "Tokens/s"),
    ("step_time_s", "Step (s)"),
    ("mfu", "MFU"),
    ("peak_memory_bytes", "Peak mem (B)"),
    ("estimated_memory_bytes", "Est. mem (B)"),
    ("gpu_idle_share", "GPU idle"),
    ("status", "Status"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--device-label", default=None, help="Device name written to the results.")
    p.add_argument("--architectures", default=",".join(ARCHITECTURES))
    p.add_argument("--sizes", default="small,medium,large")
    p.add_argument("--seq-lens", default="1024,4096")
    p.add_argument("--tokens-per-batch", type=int, default=32768, help="Batch = this // seq_len.")
    p.add_argument("--batch-size", type=int, default=None, help="Fixed batch size (overrides tokens).")
    p.add_argument("--vocab-size", type=int, default=50304, help="50,304 as issue 5's GPT; 256 = bytes.")
    p.add_argument("--steps", type=int, default=20, help="Timed steps (median reported).")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--checkpointing", action="store_true", help="Gradient checkpointing on.")
    p.add_argument(
        "--ddp",
        action="store_true",
        help="Wrap in DDP, world size 1 (NCCL on CUDA, gloo on CPU), as the trainer does.",
    )
    p.add_argument("--issue-shapes", action="store_true", help="Dense at issue 5's four GPT shapes.")
    p.add_argument("--quick", action="store_true", help="CPU smoke run with tiny shapes.")
    p.add_argument("--tag", default="", help="Suffix of the result file names.")
    p.add_argument("--out-dir", type=Path, default=_common.RESULTS)
    p.add_argument("--peak-flops", type=float, default=989e12)
    args = p.parse_args(argv)
    if args.quick:
        args.device = "cpu" if args.device == "auto" else args.device
        args.sizes, args.seq_lens, args.batch_size = "tiny", "32", args.batch_size or 2
        args.steps, args.warmup, args.no_compile, args.vocab_size = min(args.steps, 3), 1, True, 256
    return args


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(architecture, size, seq_len, batch, dimension overrides) to measure."""
    if args.issue_shapes:
        return [
            {
                "architecture": "dense",
                "size": f"{d}d×{n}L",
                "seq_len": t,
                "batch_size": b,
                "dims": {"d_model": d, "n_layers": n, "n_heads": d // 64, "d_ff": 4 * d},
            }
            for d, n, b, t in ISSUE_SHAPES
        ]
    out = []
    for arch in args.architectures.split(","):
        for size in args.sizes.split(","):
            for seq in (int(s) for s in args.seq_lens.split(",")):
                batch = args.batch_size or max(1, args.tokens_per_batch // seq)
                dims = dict(QUICK_DIMS) if args.quick else dict(SIZE_TABLE[size])
                out.append(
                    {"architecture": arch, "size": size, "seq_len": seq, "batch_size": batch, "dims": dims}
                )
    return out


def ensure_process_group(device: torch.device) -> None:
    """A one-process group (rank 0 of 1) so DDP's overhead can be measured without torchrun.

    Rendezvous through a free local TCP port given explicitly, so no MASTER_* variable is left
    behind in the environment of the calling process.
    """
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def measure(conf: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build, warm up and time one configuration; returns its result row (without the stamp).

    The model, optimizer and compiled graph live only inside :func:`_measure`, so they are freed
    (and the CUDA cache emptied) before the next configuration is built.
    """
    try:
        return _measure(conf, args, device)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _measure(conf: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    arch, seq, batch = conf["architecture"], conf["seq_len"], conf["batch_size"]
    row: dict[str, Any] = {k: conf[k] for k in ("architecture", "size", "seq_len", "batch_size")}
    row.update(conf["dims"])
    row.update(
        amp=not args.no_amp, compile=not args.no_compile, checkpointing=args.checkpointing, ddp=args.ddp
    )
    if arch not in available_architectures():
        return {
            **row,
            "status": "unavailable (not registered)",
            "tokens_per_s": None,
            "mfu": None,
            "peak_memory_bytes": None,
        }
    _common.fresh_compile_state()
    cfg = load_config(
        {
            "model": {
                "architecture": arch,
                "size": conf["size"] if conf["size"] in SIZE_TABLE else "tiny",
                "vocab_size": args.vocab_size,
                "max_seq_len": max(seq, 8),
                **conf["dims"],
            },
            "data": {"seq_len": seq},
            "training": {"batch_size": batch, "use_amp": not args.no_amp, "use_compile": not args.no_compile},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    model.train()
    if args.checkpointing:
        model.set_gradient_checkpointing(True)
    dataset = build_datasets(cfg, model.task)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), **fused)
    fwd = torch.compile(model) if not args.no_compile else model
    if args.ddp:  # the trainer's order: compile, then DDP around the compiled module
        ensure_process_group(device)
        fwd = torch.nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if not args.no_amp else contextlib.nullcontext()
    state = {"step": 0, "loss": None}

    def step() -> None:
        b = dataset.get_batch(state["step"], 0, 0, 1, batch, device)
        with amp:
            out = fwd(b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["loss"] = out.loss.detach()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(args.warmup):
            step()
        _common.sync(device)
        times, span, wall = _common.timed_steps(step, device, args.steps)
    except torch.OutOfMemoryError:
        return {**row, "status": "oom", "tokens_per_s": None, "mfu": None, "peak_memory_bytes": None}
    step_time = _common.median(times)
    tokens_per_s = batch * seq / step_time
    f = flops_per_token(cfg.model, seq, model=model)
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        idle = max(0.0, 1.0 - sum(times) / span)
    else:
        peak, idle = None, None  # no allocator statistic on CPU; process RSS would include Python
    est = estimate_memory(
        cfg.model,
        batch,
        seq,
        amp=not args.no_amp,
        checkpointing=args.checkpointing,
        scan="fused" if device.type == "cuda" else "torch",
        n_params=model.num_params(),
        ddp=args.ddp,
        window_kernel="auto" if device.type == "cuda" else "sdpa",
    )
    row.update(
        status="ok",
        params=model.num_params(),
        active_params=model.active_params(),
        tokens_per_s=tokens_per_s,
        tokens_per_s_wall=batch * seq * args.steps / wall,
        step_time_s=step_time,
        step_time_min_s=min(times),
        step_time_max_s=max(times),
        flops_per_token=f.total,
        mfu=mfu(tokens_per_s, f.total, args.peak_flops),
        peak_memory_bytes=peak,
        estimated_memory_bytes=est.total,
        memory_estimate_ratio=(est.total / peak) if peak else None,
        gpu_idle_share=idle,
        final_loss=float(state["loss"]) if state["loss"] is not None else None,
    )
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("tokens_per_s")]
    labels = [f"{r['architecture']}\n{r['size']}\nT={r['seq_len']}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(ok)), 4))
    ax.bar(range(len(ok)), [r["tokens_per_s"] for r in ok], color="tab:blue")
    ax.set_xticks(range(len(ok)), labels, fontsize=7)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Training throughput — {rows[0]['device']}")
    for i, r in enumerate(ok):
        ax.annotate(f"{100 * r['mfu']:.0f}%", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = _common.pick_device(args.device)
    stamp = _common.stamp(device, args.device_label)
    rows = []
    for conf in configurations(args):
        row = {**measure(conf, args, device), **stamp}
        rows.append(row)
        tps = (
            f"{row['tokens_per_s']:,.0f} tok/s, MFU {100 * row['mfu']:.1f}%"
            if row.get("tokens_per_s")
            else ""
        )
        print(
            f"{row['architecture']:>7} {row['size']:>10} T={row['seq_len']:<5} B={row['batch_size']:<3} "
            f"{row['status']} {tps}",
            flush=True,
        )
    command = _common.command_line("train_throughput.py", argv)
    paths = _common.write_results(
        _common.result_name("train_throughput", args.tag),
        rows,
        COLUMNS,
        plot,
        args.out_dir,
        "Training throughput",
        command,
    )
    print("\n" + paths[1].read_text())
    print("wrote", *(str(p) for p in paths if p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
