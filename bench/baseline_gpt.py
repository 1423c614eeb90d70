"""Issue 5's reference: a plain PyTorch GPT, to run side by side with ``train_throughput.py``.

Deliberately minimal and independent of the trainer — RMSNorm, SwiGLU (hidden 8/3·d rounded up
to 64), SDPA causal attention, untied LM head, vocabulary 50,304, random tokens, bf16 autocast,
``torch.compile`` and fused AdamW — so the trainer's numbers can be judged against what the
hardware gives a bare model on the same shapes. MFU follows the issue's convention exactly:
``(6·params + 12·L·d·T) · tokens/s ÷ 989 TFLOP/s`` with *all* parameters counted.

    python bench/baseline_gpt.py --device cuda            # the issue's four shapes
    python bench/baseline_gpt.py --device cuda --eager    # without torch.compile
    python bench/baseline_gpt.py --quick                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from kubearch_trainer.flops import gpt_flops_per_token, mfu

#: (d_model, n_layers, batch, seq_len, target tokens/s, target MFU) from issue 5 (compiled, H100).
ISSUE_SHAPES = (
    (512, 8, 64, 1024, 977e3, 0.50),
    (768, 10, 48, 1024, 569e3, 0.57),
    (1024, 24, 16, 1024, 154e3, 0.42),
    (2048, 16, 8, 2048, 80e3, 0.55),
)
VOCAB = 50304
#: ``--quick``'s CPU shape (no targets).
QUICK_SHAPE = (32, 2, 2, 32, None, None)

COLUMNS = (
    ("size", "Shape"),
    ("seq_len", "Seq"),
    ("batch_size", "Batch"),
    ("params", "Params"),
    ("tokens_per_s", "Tokens/s"),
    ("target_tokens_per_s", "Issue tokens/s"),
    ("mfu", "MFU"),
    ("target_mfu", "Issue MFU"),
    ("step_time_s", "Step (s)"),
    ("peak_memory_bytes", "Peak mem (B)"),
    ("compile", "Compiled"),
    ("status", "Status"),
)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        hidden = 64 * math.ceil(8 * d / 3 / 64)
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.w13 = nn.Linear(d, 2 * hidden, bias=False)  # gate and up in one matmul
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        gate, up = self.w13(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class GPT(nn.Module):
    def __init__(self, d: int, n_layers: int, vocab: int = VOCAB, max_len: int = 4096) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, max(1, d // 64)) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos.weight[: idx.size(1)]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def run_shape(
    d: int, n_layers: int, batch: int, seq: int, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    _common.fresh_compile_state()
    torch.manual_seed(0)
    model = GPT(d, n_layers, vocab=args.vocab_size, max_len=max(seq, 8)).to(device)
    params = sum(p.numel() for p in model.parameters())
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **fused)
    fwd = model if args.eager else torch.compile(model)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if not args.no_amp else contextlib.nullcontext()
    data = torch.randint(0, args.vocab_size, (args.batches, batch, seq + 1), device=device)
    it = {"i": 0}

    def step() -> None:
        tokens = data[it["i"] % args.batches]
        it["i"] += 1
        with amp:
            loss = fwd(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row: dict[str, Any] = {
        "architecture": "baseline_gpt",
        "size": f"{d}d×{n_layers}L",
        "seq_len": seq,
        "batch_size": batch,
        "d_model": d,
        "n_layers": n_layers,
        "params": params,
        "compile": not args.eager,
        "amp": not args.no_amp,
    }
    try:
        for _ in range(args.warmup):
            step()
        _common.sync(device)
        times, _, wall = _common.timed_steps(step, device, args.steps)
    except torch.OutOfMemoryError:
        return {**row, "status": "oom", "tokens_per_s": None, "mfu": None, "peak_memory_bytes": None}
    step_time = _common.median(times)
    tps = batch * seq / step_time
    per_token = gpt_flops_per_token(params, n_layers, d, seq)
    row.update(
        status="ok",
        tokens_per_s=tps,
        tokens_per_s_wall=batch * seq * args.steps / wall,
        step_time_s=step_time,
        flops_per_token=per_token,
        mfu=mfu(tps, per_token, args.peak_flops),
        peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    )
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r.get("tokens_per_s") or 0 for r in rows], 0.4, label="measured")
    ax.bar(
        [x + 0.2 for x in xs], [r.get("target_tokens_per_s") or 0 for r in rows], 0.4, label="issue 5 floor"
    )
    ax.set_xticks(list(xs), [f"{r['size']}\nB{r['batch_size']}×{r['seq_len']}" for r in rows], fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"Plain GPT baseline — {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[tuple[Any, ...]]]:
    """The flags and the shapes they select (``trainer_vs_baseline.py`` reuses both)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--device-label", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="Distinct random batches cycled through.")
    p.add_argument("--eager", action="store_true", help="No torch.compile.")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--vocab-size", type=int, default=VOCAB)
    p.add_argument("--shapes", default="all", help="Comma-separated indices into the issue's shapes (0-3).")
    p.add_argument("--quick", action="store_true", help="CPU smoke run, one tiny shape.")
    p.add_argument("--tag", default="", help="Suffix of the result file names.")
    p.add_argument("--out-dir", type=Path, default=_common.RESULTS)
    p.add_argument("--peak-flops", type=float, default=989e12)
    args = p.parse_args(argv)
    if args.quick:
        args.device = "cpu" if args.device == "auto" else args.device
        args.steps, args.warmup, args.eager, args.vocab_size = min(args.steps, 3), 1, True, 256
        return args, [QUICK_SHAPE]
    idx = range(len(ISSUE_SHAPES)) if args.shapes == "all" else [int(i) for i in args.shapes.split(",")]
    return args, [ISSUE_SHAPES[i] for i in idx]


def main(argv: list[str] | None = None) -> int:
    args, shapes = parse_args(argv)
    device = _common.pick_device(args.device)
    stamp = _common.stamp(device, args.device_label)
    rows = []
    for d, n, b, t, target_tps, target_mfu in shapes:
        row = {
            **run_shape(d, n, b, t, device, args),
            "target_tokens_per_s": target_tps,
            "target_mfu": target_mfu,
        }
        rows.append({**row, **stamp})
        print(
            f"{row['size']:>10} B={b} T={t}: {row['status']} "
            f"{(row['tokens_per_s'] or 0):,.0f} tok/s MFU {100 * (row['mfu'] or 0):.1f}%",
            flush=True,
        )
    command = _common.command_line("baseline_gpt.py", argv)
    paths = _common.write_results(
        _common.result_name("baseline_gpt", args.tag),
        rows,
        COLUMNS,
        plot,
        args.out_dir,
        "Plain GPT baseline",
        command,
    )
    print("\n" + paths[1].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
