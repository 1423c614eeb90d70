"""``kubearch compare``: the seed's benchmarking protocol, run and tabulated.

Protocol (Architecture Comparison Guide, "Benchmarking Protocol"): every architecture gets the same
task and data, the same model size, the same number of steps, the same effective batch
(``batch_size x gradient_accumulation_steps``), the same optimisations and the same seed; we then
track training time, peak memory, final validation loss, tokens/s and NaN count.

Each architecture runs in its own subprocess (the runner shared with ``kubearch search``,
:mod:`kubearch_trainer.runner`), one after the other. Why not in-process: peak
memory on CPU is the process's peak RSS, which only ever grows, so a shared process would report
the largest model's memory for every later row; a subprocess also isolates a crash or OOM to its
row. With ``--nproc-per-node N > 1`` each run goes through ``torchrun``.

Outputs in ``--output-dir``: ``comparison.md`` (the seed's table), ``comparison.json`` (rows and
protocol), ``loss_curves.png`` and one sub-folder per architecture with its ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubearch_trainer.exit_codes import ExitCode
from kubearch_trainer.runner import check_trainer_argv, run_trainer, trainer_command  # noqa: F401

# ``trainer_command`` is re-exported: bench scripts and older callers import it from here.

DEFAULT_ARCHITECTURES = "dense,mamba,moe,hybrid"
#: Defaults sized so that the four tiny models finish in a few minutes on 2 CPU cores while their
#: losses visibly separate; on a GPU raise --steps, --seq-len and --batch-size.
DEFAULTS = {
    "model_size": "tiny",
    "steps": 40,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "seq_len": 64,
    "learning_rate": 1e-3,
    "warmup_steps": 5,
    "eval_batches": 4,
    "output_dir": "runs/compare",
}
_STATUS_NOTES = {
    "oom": "OOM",
    "nan_abort": "NaN abort",
    "failed": "failed",
    "config_error": "config error",
    "data_error": "data error",
}


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument(
        "--architectures",
        default=DEFAULT_ARCHITECTURES,
        help=f"comma-separated architectures (default {DEFAULT_ARCHITECTURES})",
    )
    p.add_argument("--model-size", default=d["model_size"], help="size preset for every run (default tiny)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="micro-batch per process")
    p.add_argument("--gradient-accumulation-steps", type=int, default=d["gradient_accumulation_steps"])
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--learning-rate", type=float, default=d["learning_rate"])
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    p.add_argument("--eval-batches", type=int, default=d["eval_batches"])
    p.add_argument("--eval-every", type=int, default=None, help="default: 5 evaluations per run")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--nproc-per-node", type=int, default=1, help=">1 launches each run with torchrun")
    p.add_argument("--output-dir", default=d["output_dir"])
    p.add_argument(
        "--extra", default="", help='further trainer flags for every run, e.g. "--use-rmsnorm --data x.txt"'
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")


def run_compare_from_args(ns: argparse.Namespace) -> int:
    archs = [a.strip() for a in ns.architectures.split(",") if a.strip()]
    if not archs:
        print("kubearch compare: config error: --architectures is empty", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
    # Validate every run's configuration before starting any (a typo must not cost three runs).
    from kubearch_trainer.config import ConfigError

    out = Path(ns.output_dir)
    runs: list[tuple[str, list[str]]] = []
    for arch in archs:
        argv = trainer_argv(ns, arch, out / arch)
        try:
            check_trainer_argv(argv, prog="kubearch compare")
        except ConfigError as err:
            print(
                f"kubearch compare: config error ({arch}):\n  " + str(err).replace("\n", "\n  "),
                file=sys.stderr,
            )
            return int(ExitCode.CONFIG_ERROR)
        runs.append((arch, argv))
    rows = []
    t0 = time.time()
    for arch, argv in runs:
        print(f"\n=== kubearch compare: {arch} ({len(rows) + 1}/{len(runs)}) ===", flush=True)
        rows.append(run_one(arch, argv, out / arch, ns.nproc_per_node, ns.timeout))
    report = build_report(
        rows,
        ns,
        command=shlex.join(["kubearch", *getattr(ns, "argv", ["compare"])]),
        total_s=time.time() - t0,
    )
    write_outputs(report, out)
    print("\n" + report["markdown_table"])
    print(
        f"\nkubearch compare: {len(rows)} runs in {report['total_wall_time_s']:.0f} s; "
        f"wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'loss_curves.png'}"
    )
    return 0 if all(r["status"] == "completed" for r in rows) else int(ExitCode.FAILED)


def trainer_argv(ns: argparse.Namespace, arch: str, out: Path) -> list[str]:
    """The trainer flags of one run: identical for every architecture except ``--architecture``."""
    eval_every = ns.eval_every if ns.eval_every is not None else max(1, ns.steps // 5)
    argv = [
        "--architecture",
        arch,
        "--model-size",
        ns.model_size,
        "--num-epochs",
        "1",
        "--steps-per-epoch",
        str(ns.steps),
        "--batch-size",
        str(ns.batch_size),
        "--gradient-accumulation-steps",
        str(ns.gradient_accumulation_steps),
        "--seq-len",
        str(ns.seq_len),
        "--learning-rate",
        str(ns.learning_rate),
        "--warmup-steps",
        str(ns.warmup_steps),
        "--eval-every",
        str(eval_every),
        "--eval-batches",
        str(ns.eval_batches),
        "--log-every",
        str(max(1, min(10, ns.steps // 8))),
        "--seed",
        str(ns.seed),
        "--device",
        ns.device,
        "--output-dir",
        str(out),
    ]
    extra = shlex.split(ns.extra)
    if "--max-seq-len" not in extra:
        # Position tables as long as the sequences: otherwise a learned table sized for 4096
        # positions would dominate a tiny dense model's parameter count.
        argv += ["--max-seq-len", str(max(ns.seq_len, 8))]
    return argv + extra


def run_one(arch: str, argv: list[str], out: Path, nproc: int, timeout: float | None) -> dict[str, Any]:
    """Run one trainer subprocess (the shared runner) and turn its results.json into a table row."""
    res, wall = run_trainer(argv, out, nproc, timeout)
    return row_from_results(arch, res, wall)


def row_from_results(arch: str, res: dict[str, Any], wall: float | None = None) -> dict[str, Any]:
    params = res.get("parameters") or {}
    return {
        "architecture": arch,
        "task": res.get("task") or "unknown",
        "status": res.get("status", "failed"),
        "exit_code": res.get("exit_code"),
        "error": res.get("error"),
        "time_s": res.get("train_time_s"),
        "wall_time_s": res.get("wall_time_s", wall),
        "peak_memory_bytes": res.get("peak_memory_bytes"),
        "peak_memory_above_baseline_bytes": res.get("peak_memory_above_baseline_bytes"),
        "peak_memory_kind": res.get("peak_memory_kind"),
        "final_val_loss": res.get("final_val_loss"),
        "final_train_loss": res.get("final_train_loss"),
        "val_accuracy": res.get("val_accuracy"),
        "perplexity": res.get("perplexity"),
        "tokens_per_second": res.get("tokens_per_second"),
        "nan_count": res.get("nan_count"),
        "params_total": params.get("total"),
        "params_active": params.get("active"),
        "steps": res.get("steps"),
        "tokens": res.get("tokens"),
        "loss_history": res.get("loss_history") or [],
        "device": res.get("device"),
        # Final evaluation plus the model's end-of-run extras (MIG, codebook usage...).
        "val_metrics": res.get("val_metrics") or {},
    }


# ------------------------------------------------------------------------------------ formatting
def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"


def fmt_bytes(b: float | None) -> str:
    if not b:
        return "-"
    if b >= 1e9:
        return f"{b / 1e9:.2f} GB"
    return f"{b / 1e6:.0f} MB"


def fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.0f}K"


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def memory_of(row: dict[str, Any]) -> float | None:
    """The Memory column: CUDA peak on GPU; on CPU the peak RSS above the pre-model baseline."""
    if row.get("peak_memory_kind") == "process_peak_rss" and row.get("peak_memory_above_baseline_bytes"):
        return row["peak_memory_above_baseline_bytes"]
    return row.get("peak_memory_bytes")


def notes_for(row: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Params (active for sparse models), and speed/memory relative to the task's first good row."""
    if row["status"] != "completed":
        note = _STATUS_NOTES.get(row["status"], row["status"])
        return f"{note}: {(row.get('error') or '')[:80]}".rstrip(": ")
    parts = [f"{fmt_params(row['params_total'])} params"]
    if row["params_active"] and row["params_total"] and row["params_active"] != row["params_total"]:
        parts[0] += f" ({fmt_params(row['params_active'])} active)"
    if base is not None and base is not row:
        tps, btps = _num(row["tokens_per_second"]), _num(base["tokens_per_second"])
        if tps and btps:
            parts.append(f"{tps / btps:.2f}x speed")
        mem, bmem = _num(memory_of(row)), _num(memory_of(base))
        if mem and bmem:
            parts.append(f"{mem / bmem:.2f}x memory")
        parts[-1] += f" vs {base['architecture']}"
    elif base is row:
        parts.append("baseline")
    return ", ".join(parts)


#: Extra columns of image-task tables: (header, val_metrics keys in order of preference, format).
#: A column appears only when some row of the table has a value for it.
IMAGE_COLUMNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Recon", ("recon_loss",), "{:.2f}"),
    ("KL", ("kl",), "{:.2f}"),
    ("Codebook ppl", ("val_codebook_perplexity", "codebook_perplexity"), "{:.1f}"),
    ("MIG", ("mig",), "{:.3f}"),
    ("Accuracy", ("val_accuracy", "accuracy"), "{:.3f}"),
)


def metric_of(row: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    """The first finite value of ``keys`` in the row's val_metrics (None when absent)."""
    vm = row.get("val_metrics") or {}
    for k in keys:
        v = _num(vm.get(k))
        if v is not None:
            return v
    return None


def image_columns(rows: list[dict[str, Any]]) -> list[tuple[str, tuple[str, ...], str]]:
    """The image columns this table needs: none for text tasks, so the seed's table stays as is."""
    if not any(str(r.get("task", "")).startswith("image") for r in rows):
        return []
    return [c for c in IMAGE_COLUMNS if any(metric_of(r, c[1]) is not None for r in rows)]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The seed's columns; image tasks add Recon / KL / Codebook ppl / MIG / Accuracy before Notes."""
    extra = image_columns(rows)
    head = ["Architecture", "Time", "Memory", "Final Loss", "Tokens/sec", "NaN count"]
    head += [c[0] for c in extra] + ["Notes"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|-------------|------|--------|------------|------------|-----------|"
        + "".join("-" * (len(c[0]) + 2) + "|" for c in extra)
        + "-------|",
    ]
    base = next((r for r in rows if r["status"] == "completed"), None)
    for r in rows:
        loss = _num(r["final_val_loss"])
        tps = _num(r["tokens_per_second"])
        cells = [
            r["architecture"],
            fmt_time(r["time_s"]),
            fmt_bytes(memory_of(r)),
            f"{loss:.4f}" if loss is not None else "-",
            f"{tps:,.0f}" if tps else "-",
            str(r["nan_count"]) if r["nan_count"] is not None else "-",
        ]
        for _, keys, fmt in extra:
            v = metric_of(r, keys)
            cells.append(fmt.format(v) if v is not None else "-")
        cells.append(notes_for(r, base))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _winners(rows: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if r["status"] == "completed"]
    if not ok:
        return "no run completed"
    parts = []
    for label, key, pick in (
        ("quality (lowest val loss)", "final_val_loss", min),
        ("speed (tokens/s)", "tokens_per_second", max),
        ("memory", "memory", min),
    ):
        value = memory_of if key == "memory" else (lambda r, k=key: r[k])
        cands = [r for r in ok if _num(value(r)) is not None]
        if cands:
            parts.append(f"{pick(cands, key=value)['architecture']} for {label}")
    for label, keys in (("disentanglement (highest MIG)", ("mig",)), ("accuracy", ("val_accuracy",))):
        cands = [r for r in ok if metric_of(r, keys) is not None]
        if len(cands) > 1 and str(cands[0].get("task", "")).startswith("image"):
            best = max(cands, key=lambda r, k=keys: metric_of(r, k) or 0.0)
            parts.append(f"{best['architecture']} for {label}")
    return "; ".join(parts)


def build_report(
    rows: list[dict[str, Any]], ns: argparse.Namespace, command: str, total_s: float
) -> dict[str, Any]:
    tasks: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        tasks.setdefault(r["task"], []).append(r)
    device = next((r["device"] for r in rows if r.get("device")), ns.device)
    protocol = {
        "model_size": ns.model_size,
        "steps": ns.steps,
        "batch_size": ns.batch_size,
        "gradient_accumulation_steps": ns.gradient_accumulation_steps,
        "nproc_per_node": ns.nproc_per_node,
        "effective_batch": ns.batch_size * ns.gradient_accumulation_steps * ns.nproc_per_node,
        "seq_len": ns.seq_len,
        "learning_rate": ns.learning_rate,
        "warmup_steps": ns.warmup_steps,
        "seed": ns.seed,
        "extra": ns.extra,
    }
    sections, tables = [], []
    for task, task_rows in tasks.items():
        table = markdown_table(task_rows)
        tables.append(table if len(tasks) == 1 else f"Task `{task}`\n\n{table}")
        sections.append(f"### Task `{task}`\n\n{table}\n\n**Winner**: {_winners(task_rows)}\n")
    hardware = f"{platform.machine()} {platform.processor() or ''}".strip()
    if device and str(device).startswith("cuda"):
        try:
            import torch

            hardware = torch.cuda.get_device_name(0)
        except Exception:  # cosmetic only: keep the CPU description
            pass
    md = "\n".join(
        [
            "## Benchmark Results",
            "",
            f"**Hardware**: {hardware} ({device}, {os.cpu_count()} CPUs)",
            f"**Date**: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"**Command**: `{command}`",
            f"**Protocol**: size `{ns.model_size}`, {ns.steps} steps, effective batch "
            f"{protocol['effective_batch']} x {ns.seq_len} tokens, lr {ns.learning_rate}, "
            f"warmup {ns.warmup_steps}, "
            f"seed {ns.seed}, same data for every run",
            "",
            "Time: training time (evaluation excluded); Memory: peak CUDA allocation on GPU; on CPU the "
            "process's peak RSS above its RSS before the model was built; Final Loss: validation loss "
            "(main loss, auxiliary losses excluded). Image tasks: Tokens/sec counts images; Recon: "
            "reconstruction NLL (nats per image); KL: KL to the prior; Codebook ppl: perplexity of the "
            "VQ codes over the validation set; MIG: mutual information gap (0-1, needs a data set with "
            "known factors, e.g. shapes); Accuracy: validation accuracy.",
            "",
            *sections,
        ]
    )
    return {
        "rows": rows,
        "protocol": protocol,
        "command": command,
        "total_wall_time_s": total_s,
        "markdown": md,
        "markdown_table": "\n\n".join(tables),
        "date": datetime.now(UTC).isoformat(),
    }


def plot_loss_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Train loss (lines) and validation loss (markers) per architecture, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, r in enumerate(x for x in rows if x["task"] == task):
            color = f"C{i}"
            hist = r["loss_history"]
            tr = [(h["step"], h["train_loss"]) for h in hist if _num(h.get("train_loss")) is not None]
            va = [(h["step"], h["val_loss"]) for h in hist if _num(h.get("val_loss")) is not None]
            if tr:
                ax.plot(*zip(*tr, strict=True), color=color, label=f"{r['architecture']} train")
            if va:
                ax.plot(
                    *zip(*va, strict=True), "o--", color=color, alpha=0.7, label=f"{r['architecture']} val"
                )
        ax.set_title(f"kubearch compare — task {task}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(report["markdown"])
    payload = {k: v for k, v in report.items() if k not in ("markdown", "markdown_table")}
    (out / "comparison.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot_loss_curves(report["rows"], out / "loss_curves.png")
