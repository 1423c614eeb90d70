"""DDP scaling on CPU: 1 process against 2 gloo processes under torchrun (issue 5's CPU proxy).

Issue 5 asks that, until several GPUs are lent, 2 gloo processes reach ≥ 1.7× one process's
samples/s on the ``tiny`` model. This runs the real trainer (``python -m kubearch_trainer``) under
``torchrun --standalone --nproc-per-node N`` with the same per-process batch (weak scaling, as DDP
is used), each process limited to ``--threads`` intra-op threads so N processes never oversubscribe
the cores, and reads samples/s from each run's results.json.

    python bench/ddp_cpu_scaling.py                      # tiny, 1 vs 2 processes, 1 thread each
    python bench/ddp_cpu_scaling.py --quick              # a seconds-long smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import torch
from kubearch_trainer.runner import trainer_command

COLUMNS = (
    ("architecture", "Model"),
    ("size", "Size"),
    ("nproc", "Processes"),
    ("threads_per_process", "Threads/proc"),
    ("batch_size", "Global batch"),
    ("seq_len", "Seq"),
    ("samples_per_s", "Samples/s"),
    ("tokens_per_s", "Tokens/s"),
    ("speedup", "Speedup vs 1 proc"),
    ("final_loss", "Final train loss"),
)


def run_trainer(nproc: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One torchrun launch of the trainer; returns its results.json."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    trainer_args = [
        "--architecture",
        args.architecture,
        "--model-size",
        args.size,
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--steps-per-epoch",
        str(args.steps),
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--log-every",
        str(max(1, args.steps // 4)),
        "--device",
        "cpu",
        "--output-dir",
        str(out),
    ]
    # The 1-process baseline runs under torchrun too, so both pay the same launcher and gloo set-up.
    cmd = trainer_command(trainer_args, nproc, torchrun=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(
            f"trainer with {nproc} process(es) failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads((out / "results.json").read_text())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["nproc"] for r in rows]
    ax.bar([str(x) for x in xs], [r["samples_per_s"] for r in rows], color="#4c72b0")
    ideal = rows[0]["samples_per_s"]
    ax.plot([str(x) for x in xs], [ideal * x for x in xs], "k--", label="linear")
    ax.axhline(ideal * 1.7, color="#c44e52", lw=1, label="1.7x target")
    ax.set_xlabel("gloo processes")
    ax.set_ylabel("samples / s")
    ax.set_title(f"DDP on CPU: {rows[0]['architecture']} {rows[0]['size']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--architecture", default="dense")
    p.add_argument("--size", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="per process (weak scaling)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps (CI smoke run)")
    p.add_argument("--device-label", default=None)
    p.add_argument("--tag", default="")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--out-dir", type=Path, default=_common.ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.batch_size, args.steps = 32, 2, 4

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (int(n) for n in args.nprocs.split(",")):
            res = run_trainer(nproc, args, Path(tmp) / f"n{nproc}")
            global_batch = args.batch_size * nproc
            tokens_per_s = float(res["tokens_per_second"])
            rows.append(
                {
                    "architecture": args.architecture,
                    "size": args.size,
                    "seq_len": args.seq_len,
                    "batch_size": global_batch,
                    "nproc": nproc,
                    "threads_per_process": args.threads,
                    "tokens_per_s": tokens_per_s,
                    "samples_per_s": tokens_per_s / args.seq_len,
                    "mfu": None,
                    "peak_memory_bytes": res.get("peak_memory_bytes"),
                    "final_loss": res.get("final_train_loss"),
                    "world_size": res.get("world_size"),
                    **_common.stamp(torch.device("cpu"), args.device_label),
                }
            )
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base
        print(f"{r['nproc']} process(es): {r['samples_per_s']:.1f} samples/s, speedup {r['speedup']:.2f}x")
    paths = _common.write_results(
        _common.result_name("ddp_cpu_scaling", args.tag),
        rows,
        COLUMNS,
        plot,
        args.out_dir,
        "DDP scaling on CPU (gloo, torchrun, the trainer end to end)",
        _common.command_line("ddp_cpu_scaling.py", argv),
    )
    print("wrote", *[str(x) for x in paths if x])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
