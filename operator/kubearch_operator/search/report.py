"""The search report: the seed's tables and statistics from an ArchitectureSearch's status.

:func:`build_report` (pure) turns (name, spec, status) into a JSON-able dict: the leaderboard (every
configuration at the highest rung it finished, best first), the best trial, and per rung the seed's
statistics (mean ± std and range of the objective, success rate) and its top 5.
:func:`render_markdown` prints it; :func:`write_report` writes ``report.json``, ``report.md`` and
``report.png`` (heatmap of the objective by size x attention, or the first two parameters, one
panel per rung; and the loss curves of the leaders). ``kubearch report`` reads the status from the
Kubernetes API or from ``search.json``; ``kubearch search`` calls the same functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .api import ArchitectureSearchSpec, ArchitectureSearchStatus, TrialRecord
from .engine import leaderboard

TOP_PER_RUNG = 5
CURVE_LEADERS = 5


def _entry(t: TrialRecord) -> dict[str, Any]:
    m = t.metrics
    return {
        "trial": t.name,
        "config": t.config,
        "rung": t.rung,
        "steps": t.steps,
        "parameters": dict(t.parameters),
        "objective": t.objective,
        "valAccuracy": m.get("valAccuracy"),
        "timeSeconds": m.get("timeSeconds"),
        "peakMemoryBytes": m.get("peakMemoryBytes"),
        "tokensPerSecond": m.get("tokensPerSecond"),
        "state": t.state,
        "plan": t.plan.get("reason") if t.plan.get("changed") else None,
    }


#: The seed's per-mode statistics besides the objective's: accuracy, time and memory, mean ± std.
_SEED_STATS = ("valAccuracy", "timeSeconds", "peakMemoryBytes")


def _mean_std(values: list[float | None]) -> dict[str, float] | None:
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    return {"mean": mean, "std": math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))}


def _heat_axes(spec: ArchitectureSearchSpec) -> tuple[str, str] | None:
    paths = [p.path for p in spec.search_space]
    if "model.size" in paths and "model.attention" in paths:
        return "model.size", "model.attention"
    return (paths[0], paths[1]) if len(paths) >= 2 else None


def _axis_values(spec: ArchitectureSearchSpec, path: str, trials: list[TrialRecord]) -> list[Any]:
    param = next(p for p in spec.search_space if p.path == path)
    if param.values is not None:
        return list(param.values)
    return sorted({t.parameters.get(path) for t in trials if path in t.parameters}, key=str)


def build_report(
    name: str,
    spec: ArchitectureSearchSpec,
    status: ArchitectureSearchStatus,
    histories: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Everything the report shows, as plain data (``histories``: trial -> results.json loss_history)."""
    minimize = spec.objective.minimize
    latest: dict[tuple[int, int], TrialRecord] = {}
    for t in sorted(status.trials, key=lambda t: t.index):
        latest[(t.config, t.rung)] = t  # an OOM retry replaces the trial it retries
    sign = 1.0 if minimize else -1.0
    rungs = []
    for stats in status.rung_statistics:
        done = [t for (c, r), t in latest.items() if r == stats.rung and t.objective is not None]
        done.sort(key=lambda t: (sign * t.objective, t.config))  # type: ignore[operator]
        rungs.append(
            {
                **stats.model_dump(mode="json", by_alias=True),
                "metrics": {k: _mean_std([t.metrics.get(k) for t in done]) for k in _SEED_STATS},
                "top": [_entry(t) for t in done[:TOP_PER_RUNG]],
            }
        )
    board = [e.model_dump(mode="json", by_alias=True) for e in leaderboard(spec, status.trials, None)]
    heat = None
    axes = _heat_axes(spec)
    if axes:
        xs, ys = _axis_values(spec, axes[1], status.trials), _axis_values(spec, axes[0], status.trials)
        panels = []
        for stats in status.rung_statistics:
            grid: list[list[float | None]] = [[None] * len(xs) for _ in ys]
            for (_, r), t in latest.items():
                if r != stats.rung or t.objective is None:
                    continue
                y, x = t.parameters.get(axes[0]), t.parameters.get(axes[1])
                if y in ys and x in xs:
                    i, j = ys.index(y), xs.index(x)
                    old = grid[i][j]
                    if old is None or sign * t.objective < sign * old:
                        grid[i][j] = t.objective
            panels.append({"rung": stats.rung, "steps": stats.steps, "values": grid})
        heat = {"y": axes[0], "x": axes[1], "yValues": ys, "xValues": xs, "panels": panels}
    leaders = [e["config"] for e in board[:CURVE_LEADERS]]
    curves = []
    for rank, config in enumerate(leaders, start=1):
        trials = sorted((t for (c, _), t in latest.items() if c == config), key=lambda t: t.rung)
        curves.append(
            {
                "rank": rank,
                "config": config,
                "parameters": trials[0].parameters if trials else {},
                "valLossByRung": [
                    [t.steps, t.metrics.get("valLoss")]
                    for t in trials
                    if t.metrics.get("valLoss") is not None
                ],
                "history": {t.name: (histories or {}).get(t.name, []) for t in trials if histories},
            }
        )
    planned = [t for t in status.trials if t.plan.get("changed") and not t.plan.get("oomRetryOf")]
    return {
        "name": name,
        "phase": status.phase,
        "message": status.message,
        "algorithm": spec.algorithm.name,
        "objective": {"metric": spec.objective.metric, "goal": spec.objective.goal},
        "searchSpace": [p.path for p in spec.search_space],
        "configurations": status.configurations,
        "trialCounts": status.trial_counts.model_dump(mode="json", by_alias=True),
        "best": board[0] if board else None,
        "leaderboard": board,
        "rungs": rungs,
        "heatmap": heat,
        "curves": curves,
        "memoryPlan": {
            "changed": len(planned),
            "wontFit": sum(t.reason == "WontFit" for t in status.trials),
            "oomRetries": sum(t.oom_retries > 0 for t in status.trials),
            "oomFailures": sum(t.state == "Failed" and t.reason == "OOM" for t in status.trials),
            "examples": sorted({t.plan["reason"].split(": ", 1)[-1] for t in planned})[:5],
        },
    }


# ------------------------------------------------------------------------------------- rendering
def _fmt(value: Any, kind: str = "num") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "time":
        return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}min"
    if kind == "bytes":
        return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.0f} MB"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "acc":
        return f"{value:.4f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _param_cell(params: dict[str, Any], path: str) -> str:
    value = params.get(path)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict[str, Any]], paths: list[str], metric: str, with_rung: bool) -> list[str]:
    head = [
        "#",
        "Trial",
        *(["Steps"] if with_rung else []),
        *paths,
        metric,
        "Acc",
        "Time",
        "Memory",
        "Tokens/s",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, e in enumerate(rows, start=1):
        cells = [
            str(e.get("rank", i)),
            e["trial"],
            *([str(e["steps"])] if with_rung else []),
            *(_param_cell(e["parameters"], p) for p in paths),
            _fmt(e["objective"]),
            _fmt(e.get("valAccuracy"), "acc"),
            _fmt(e.get("timeSeconds"), "time"),
            _fmt(e.get("peakMemoryBytes"), "bytes"),
            _fmt(e.get("tokensPerSecond"), "rate"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def render_markdown(report: dict[str, Any], top: int = 10) -> str:
    """The seed's report: summary, best trial, per rung statistics and top 5, the leaderboard."""
    metric = report["objective"]["metric"]
    paths = report["searchSpace"]
    c = report["trialCounts"]
    lines = [
        f"# Architecture search `{report['name']}` — {report['phase']}",
        "",
        f"**Algorithm**: {report['algorithm']} over {' × '.join(paths)}; objective {metric} "
        f"({report['objective']['goal']}); {report['configurations']} configurations, {c['total']} trials "
        f"({c['succeeded']} succeeded, {c['failed']} failed, {c['stopped']} stopped, "
        f"{c['running'] + c['created'] + c['planned']} not finished)",
    ]
    if report["message"]:
        lines.append(f"**Status**: {report['message']}")
    best = report["best"]
    if best:
        params = ", ".join(
            f"{k}={_param_cell(best['parameters'], k)}" for k in paths if k in best["parameters"]
        )
        lines.append(
            f"**Best**: {best['trial']} ({params}): {metric} {best['objective']:.4f} "
            f"after {best['steps']} steps"
        )
    mp = report["memoryPlan"]
    lines.append(
        f"**Memory plan**: {mp['changed']} trials re-sliced or checkpointed before they ran, {mp['wontFit']} "
        f"refused (won't fit), {mp['oomRetries']} OOM retries, {mp['oomFailures']} trials failed with OOM"
    )
    for example in mp["examples"][:2]:
        lines.append(f"  - e.g. {example}")
    for rung in report["rungs"]:
        lines += ["", f"## Rung {rung['rung']} ({rung['steps']} steps)", ""]
        finished = rung["succeeded"] + rung["failed"]
        rate = f" ({100 * rung['successRate']:.1f}%)" if rung.get("successRate") is not None else ""
        lines.append(
            f"**Successful configurations**: {rung['succeeded']}/{finished}{rate}; failed {rung['failed']}, "
            f"stopped {rung['stopped']}, trials at this rung {rung['trials']}"
        )
        if rung.get("mean") is not None:
            lines.append(
                f"**{metric}**: {rung['mean']:.4f} ± {rung['std']:.4f} "
                f"(range: {rung['min']:.4f}-{rung['max']:.4f})"
            )
        extra = []
        for key, label, kind in (("valAccuracy", "Accuracy", "acc"), ("timeSeconds", "Time", "time")):
            ms = rung["metrics"].get(key)
            if ms:
                extra.append(f"**{label}**: {_fmt(ms['mean'], kind)} ± {_fmt(ms['std'], kind)}")
        ms = rung["metrics"].get("peakMemoryBytes")
        if ms:
            extra.append(f"**Memory**: {_fmt(ms['mean'], 'bytes')} ± {_fmt(ms['std'], 'bytes')}")
        if extra:
            lines.append("; ".join(extra))
        if rung["top"]:
            lines += [
                "",
                f"Top {len(rung['top'])} by {metric}:",
                "",
                *_table(rung["top"], paths, metric, False),
            ]
    if report["leaderboard"]:
        lines += ["", f"## Leaderboard (top {min(top, len(report['leaderboard']))})", ""]
        lines += _table(report["leaderboard"][:top], paths, metric, True)
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Heatmap(s) of the objective (one panel per rung) and the leaders' loss curves, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = report["heatmap"]
    panels = heat["panels"] if heat else []
    n = len(panels) + 1
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5), squeeze=False)
    metric = report["objective"]["metric"]
    for ax, panel in zip(axes[0], panels, strict=False):
        values = [[math.nan if v is None else v for v in row] for row in panel["values"]]
        cmap = "viridis_r" if report["objective"]["goal"] == "minimize" else "viridis"
        im = ax.imshow(values, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(heat["xValues"])), [str(x) for x in heat["xValues"]], rotation=45, ha="right")
        ax.set_yticks(range(len(heat["yValues"])), [str(y) for y in heat["yValues"]])
        ax.set_xlabel(heat["x"])
        ax.set_ylabel(heat["y"])
        ax.set_title(f"{metric} at rung {panel['rung']} ({panel['steps']} steps); blank: failed/not run")
        dark_high = cmap == "viridis_r"  # viridis is dark at its low end; reversed, at its high end
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    dark = (im.norm(v) > 0.5) == dark_high
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k"
                    )
        fig.colorbar(im, ax=ax)
    ax = axes[0][-1]
    for curve in report["curves"]:
        color = f"C{curve['rank'] - 1}"
        label = ", ".join(_param_cell(curve["parameters"], k) for k in report["searchSpace"])
        for trial, hist in (curve.get("history") or {}).items():
            tr = [(h["step"], h["train_loss"]) for h in hist if isinstance(h.get("train_loss"), int | float)]
            if tr:
                ax.plot(*zip(*tr, strict=True), color=color, alpha=0.35, linewidth=1)
            va = [(h["step"], h["val_loss"]) for h in hist if isinstance(h.get("val_loss"), int | float)]
            if va:
                ax.plot(*zip(*va, strict=True), ".", color=color, alpha=0.6)
            del trial
        pts = curve["valLossByRung"]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=color, label=f"#{curve['rank']} {label}")
    ax.set_xlabel("training steps (rung)")
    ax.set_ylabel("val loss")
    ax.set_title("Loss curves of the leaders (lines: train loss per step, markers: val loss)")
    ax.grid(alpha=0.3)
    if report["curves"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path, *, plot: bool = True) -> list[Path]:
    """``report.json``, ``report.md`` and ``report.png`` in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths[1].write_text(render_markdown(report))
    if plot:
        paths.append(out / "report.png")
        plot_report(report, paths[-1])
    return paths


def search_from_object(obj: dict[str, Any]) -> tuple[str, ArchitectureSearchSpec, ArchitectureSearchStatus]:
    """(name, spec, status) of an ArchitectureSearch object (from the API or ``search.json``)."""
    from .api import parse_search_spec, parse_search_status

    name = (obj.get("metadata") or {}).get("name") or "search"
    return name, parse_search_spec(obj.get("spec")), parse_search_status(obj.get("status"))
