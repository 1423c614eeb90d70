"""Shared plumbing of the benchmark scripts: environment stamp, timing, result files, plots.

Every bench writes ``bench/results/<name>-<device>-<date>.json`` (a list of one object per
measured configuration), a Markdown table ``.md`` and a plot ``.png`` beside it, so runs on
different machines never overwrite each other and the README can quote the latest table.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: Fields every result row carries (DESIGN.md, "Benchmarks").
REQUIRED_FIELDS = (
    "architecture",
    "size",
    "seq_len",
    "batch_size",
    "tokens_per_s",
    "mfu",
    "peak_memory_bytes",
    "device",
    "torch",
    "commit",
    "date",
)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run, quoted for a shell (goes into the Markdown)."""
    import sys

    args = list(argv) if argv is not None else sys.argv[1:]
    return shlex.join(["python", f"bench/{script}", *args])


def result_name(name: str, tag: str = "") -> str:
    """``name`` or ``name-tag``: runs of one bench with different flags on one day stay apart."""
    return f"{name}-{_slug(tag)}" if tag else name


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


def device_label(device: torch.device, override: str | None = None) -> str:
    if override:
        return override
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        sha = out.stdout.strip() or "unknown"
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp(device: torch.device, label: str | None) -> dict[str, Any]:
    """The environment fields every row carries."""
    return {
        "device": device_label(device, label),
        "torch": torch.__version__,
        "commit": commit(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def fresh_compile_state() -> None:
    """Forget every graph ``torch.compile`` made for an earlier configuration of this process.

    Why: dynamo keys its cache on the code object, not the module instance, so a second model of
    the same class with other sizes recompiles — and after one such recompile "automatic dynamic
    shapes" marks the sizes dynamic, compiling slower shape-generic kernels for every later
    configuration (and the cache limit of 8 can fall back to eager). Each measured configuration
    must get the static-shape graph a one-configuration training run gets.
    """
    import torch._dynamo

    torch._dynamo.reset()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per call (after ``warmup`` calls), with CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def timed_steps(step: Any, device: torch.device, n: int) -> tuple[list[float], float, float]:
    """Run ``n`` steps back to back; returns (seconds per step, first-start-to-last-end, wall).

    On CUDA each step is bracketed by events and nothing synchronises until the end, so the host
    can run ahead as in training; a step's event time is what the GPU stream spent on it, and the
    gaps between one step's end and the next one's start are GPU idle time.
    """
    if device.type != "cuda":
        times = []
        t0 = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        return times, wall, wall
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    t0 = time.perf_counter()
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    times = [start.elapsed_time(end) / 1e3 for start, end in events]
    return times, events[0][0].elapsed_time(events[-1][1]) / 1e3, wall


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "device"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub table; ``columns`` are (key, header) pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    plot: Callable[[list[dict[str, Any]], Path], None] | None,
    out_dir: Path,
    title: str,
    command: str,
) -> tuple[Path, Path, Path | None]:
    """Write ``<name>-<device>-<date>.json`` / ``.md`` / ``.png``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = rows[0]["device"] if rows else "unknown"
    day = (rows[0]["date"] if rows else _dt.date.today().isoformat())[:10]
    base = out_dir / f"{name}-{_slug(device)}-{day}"
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    meta = rows[0] if rows else {}
    md = [
        f"# {title}",
        "",
        f"Device: {meta.get('device')} · torch {meta.get('torch')} · commit {meta.get('commit')} · "
        f"{meta.get('date')}",
        "",
        f"Command: `{command}`",
        "",
        markdown_table(rows, columns),
    ]
    md_path.write_text("\n".join(md))
    png_path = None
    if plot is not None and rows:
        import matplotlib

        matplotlib.use("Agg")
        png_path = base.with_suffix(".png")
        plot(rows, png_path)
    return json_path, md_path, png_path
