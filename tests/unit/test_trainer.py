"""The train loop: learning, results.json, NaN skipping/abort, OOM exit, atomic checkpoints, exact resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from kubearch_trainer import trainer as trainer_mod
from kubearch_trainer.checkpoint import CHECKPOINT_NAME, RunState, save_checkpoint
from kubearch_trainer.cli import run_train
from kubearch_trainer.config import ModelConfig, load_config
from kubearch_trainer.exit_codes import ExitCode
from kubearch_trainer.models import KubearchModel, ModelOutput, register
from kubearch_trainer.results import RESULTS_NAME
from kubearch_trainer.trainer import train
from torch import nn

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 64}


def tiny_cfg(out: Path, model: dict[str, Any] | None = None, **training: Any):
    t = {
        "steps_per_epoch": 10,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "log_every": 2,
        "eval_every": 5,
        "eval_batches": 2,
        "device": "cpu",
        "output_dir": str(out),
    }
    t.update(training)
    return load_config(
        {"model": {"architecture": "dense", **TINY, **(model or {})}, "data": {"seq_len": 32}, "training": t}
    )


# --------------------------------------------------------------------------- plugin models
_NAN_CALLS: set[int] = set()


@register("test_nan_lm", task="lm")
class NanBigram(KubearchModel):
    """A bigram LM whose training forward returns NaN on the calls listed in ``_NAN_CALLS``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)
        self.calls = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        logits = self.table(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        if self.training:
            if self.calls in _NAN_CALLS or -1 in _NAN_CALLS:
                loss = loss * float("nan")
            self.calls += 1
        return ModelOutput(loss=loss, metrics={"ce_loss": loss.detach()})


@register("test_oom_lm", task="lm")
class OomModel(KubearchModel):
    """Raises CUDA's out-of-memory error (constructible without a GPU) on the first forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


_SIGTERM_SENT: list[bool] = []


@register("test_sigterm_lm", task="lm")
class SigtermBigram(NanBigram):
    """Receives SIGTERM (as an evicted pod does) during its 4th training forward."""

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        if self.training and self.calls == 3 and not _SIGTERM_SENT:
            _SIGTERM_SENT.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(batch)


# --------------------------------------------------------------------------- tests
def test_training_lowers_loss_and_writes_results(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path / "run", steps_per_epoch=30, log_every=5, eval_every=10)
    res = train(cfg)
    assert res["status"] == "completed" and res["exit_code"] == 0
    hist = [row["train_loss"] for row in res["loss_history"] if row.get("train_loss") is not None]
    assert hist[-1] < hist[0] - 0.3, hist
    vals = [row["val_loss"] for row in res["loss_history"] if "val_loss" in row]
    assert len(vals) == 3 and vals[-1] < vals[0]
    on_disk = json.loads((tmp_path / "run" / RESULTS_NAME).read_text())
    for key in (
        "architecture",
        "size",
        "dims",
        "parameters",
        "steps",
        "tokens",
        "wall_time_s",
        "tokens_per_second",
        "peak_memory_bytes",
        "final_train_loss",
        "final_val_loss",
        "val_accuracy",
        "perplexity",
        "nan_count",
        "status",
        "exit_code",
        "loss_history",
        "config",
        "world_size",
        "device",
        "torch_version",
    ):
        assert key in on_disk, key
    assert on_disk["steps"] == 30 and on_disk["tokens"] == 30 * 4 * 32
    assert on_disk["parameters"]["total"] == on_disk["parameters"]["active"] > 0
    assert on_disk["peak_memory_bytes"] > 10_000_000  # process RSS on CPU
    assert on_disk["perplexity"] == pytest.approx(
        torch.tensor(on_disk["final_val_loss"]).exp().item(), rel=1e-5
    )
    assert 0.0 <= on_disk["val_accuracy"] <= 1.0
    assert on_disk["dims"] == {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}


def test_validation_accuracy_is_exported_and_training_accuracy_is_not(tmp_path: Path) -> None:
    """The LM computes accuracy only in eval mode; the loop's val accuracy is still the share of
    right next-token argmaxes over the validation batches, recomputed here from the checkpoint."""
    from kubearch_trainer.data import build_datasets
    from kubearch_trainer.models import build_model

    cfg = tiny_cfg(tmp_path, steps_per_epoch=6, log_every=3, eval_every=6, eval_batches=3)
    res = train(cfg)
    assert res["status"] == "completed", res.get("error")
    on_disk = json.loads((tmp_path / RESULTS_NAME).read_text())
    assert "ce_loss" in on_disk["train_metrics"] and "accuracy" not in on_disk["train_metrics"]
    assert on_disk["val_metrics"]["accuracy"] == on_disk["val_accuracy"]
    # The weights evaluated at the last step are the ones checkpointed at it.
    model = build_model(cfg.model).eval()
    model.load_state_dict(torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["model"])
    batches = build_datasets(cfg, "lm").eval_batches(3, cfg.training.batch_size, torch.device("cpu"))
    per_batch = []
    with torch.no_grad():
        for batch in batches:
            predicted = model.logits(batch["input_ids"]).argmax(-1)
            valid = batch["targets"] != -100
            per_batch.append(((predicted == batch["targets"]) & valid).sum().item() / valid.sum().item())
    assert on_disk["val_accuracy"] == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-6)
    assert on_disk["val_accuracy"] > 0  # the tiny text is learnable: some argmaxes are right


def test_nan_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    _NAN_CALLS.clear()
    _NAN_CALLS.update({2, 3})
    cfg = tiny_cfg(tmp_path, {"architecture": "test_nan_lm"}, max_consecutive_nans=3)
    res = train(cfg)
    assert res["status"] == "completed" and res["nan_count"] == 2 and res["steps"] == 10
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    # The optimizer stepped only on the 8 finite steps, and the weights stayed finite.
    assert int(ckpt["optimizer"]["state"][0]["step"]) == 8
    assert torch.isfinite(ckpt["model"]["table.weight"]).all()


def test_nan_streak_aborts_with_exit_code(tmp_path: Path) -> None:
    _NAN_CALLS.clear()
    _NAN_CALLS.add(-1)  # every step
    code = run_train(
        [
            "--architecture",
            "test_nan_lm",
            "--device",
            "cpu",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps-per-epoch",
            "20",
            "--max-consecutive-nans",
            "3",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == ExitCode.NAN_ABORT
    res = json.loads((tmp_path / RESULTS_NAME).read_text())
    assert res["status"] == "nan_abort" and res["steps"] == 3 and res["nan_count"] == 3
    assert "max_consecutive_nans" in res["error"]


def test_cuda_oom_is_reported_with_its_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("KUBEARCH_TERMINATION_LOG", str(term))
    code = run_train(
        [
            "--architecture",
            "test_oom_lm",
            "--device",
            "cpu",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == ExitCode.CUDA_OOM
    res = json.loads((tmp_path / "out" / RESULTS_NAME).read_text())
    assert (
        res["status"] == "oom" and res["exit_code"] == ExitCode.CUDA_OOM and "out of memory" in res["error"]
    )
    summary = json.loads(term.read_text())
    assert summary["status"] == "oom" and len(term.read_bytes()) < 4096


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg(tmp_path, steps_per_epoch=4)
    train(cfg)
    path = tmp_path / CHECKPOINT_NAME
    before = path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, RESULTS_NAME]

    def torn_save(obj: Any, f: Any) -> None:  # writes half a file, then the node "dies"
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    model = nn.Linear(2, 2)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), RunState(step=99), cfg, None)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, RESULTS_NAME]  # no temp file left


@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path) -> None:
    # Dropout and accumulation on, so RNG and micro-batch handling are covered too.
    model = {"dropout": 0.1}
    extra = {"gradient_accumulation_steps": 2, "checkpoint_every": 3}
    full = train(tiny_cfg(tmp_path / "full", model, **extra))
    # Stop inside a log window (log_every 2): the window's partial loss must carry over.
    first = train(tiny_cfg(tmp_path / "split", model, **extra), stop_after=5)
    assert first["status"] == "stopped" and first["steps"] == 5
    second = train(tiny_cfg(tmp_path / "split", model, resume=True, **extra))
    assert second["status"] == "completed" and second["resumed_from_step"] == 5 and second["steps"] == 10
    a = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=False)
    b = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    assert full["loss_history"] == second["loss_history"]
    assert full["final_val_loss"] == second["final_val_loss"]
    assert second["tokens"] == full["tokens"]
    # Stopping on a log step (4) must not count that window twice.
    third = train(tiny_cfg(tmp_path / "split4", model, **extra), stop_after=4)
    assert third["steps"] == 4
    fourth = train(tiny_cfg(tmp_path / "split4", model, resume=True, **extra))
    assert fourth["loss_history"] == full["loss_history"]


def test_resume_refuses_other_model_settings(tmp_path: Path) -> None:
    train(tiny_cfg(tmp_path, steps_per_epoch=2))
    res = train(tiny_cfg(tmp_path, {"d_ff": 96}, steps_per_epoch=4, resume=True))
    assert res["exit_code"] == ExitCode.CONFIG_ERROR and "model.d_ff" in res["error"]


def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    cfg = load_config(
        {"training": {"learning_rate": 1e-3, "warmup_steps": 10, "steps_per_epoch": 110, "min_lr_ratio": 0.1}}
    )
    lrs = [trainer_mod.lr_at(s, cfg) for s in range(110)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1e-3  # warmup rises
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # cosine never rises
    assert trainer_mod.lr_at(110, cfg) == pytest.approx(1e-4)


def test_sigterm_checkpoints_and_exits_for_a_restart(tmp_path: Path) -> None:
    _NAN_CALLS.clear()
    before = signal.getsignal(signal.SIGTERM)
    res = train(tiny_cfg(tmp_path, {"architecture": "test_sigterm_lm"}))
    assert res["status"] == "preempted" and res["exit_code"] == 143 == trainer_mod.PREEMPTED_EXIT_CODE
    assert res["steps"] == 4  # the interrupted step finished, then the run stopped
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    again = train(tiny_cfg(tmp_path, {"architecture": "test_sigterm_lm"}, resume=True))
    assert again["status"] == "completed" and again["resumed_from_step"] == 4 and again["steps"] == 10


def test_image_run_reports_extras_family_dims_and_regulation_metrics(tmp_path: Path) -> None:
    """beta_vae on the shapes set: MIG from evaluate_extra, the VAE's own dims, reg_* terms, gauges."""
    import re
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    scraped: dict[str, dict[str, float]] = {}
    port: list[int] = []

    def log(msg: str) -> None:
        m = re.search(r"metrics on http://[^:]+:(\d+)/", msg)
        if m:
            port.append(int(m.group(1)))
        if msg.startswith("kubearch: extra metrics"):  # evaluate_extra has run; the gauges are set
            with urllib.request.urlopen(f"http://127.0.0.1:{port[0]}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            scraped.update(
                {
                    s.labels["name"]: s.value
                    for fam in text_string_to_metric_families(text)
                    if fam.name == "kubearch_model_metric"
                    for s in fam.samples
                }
            )

    cfg = load_config(
        {
            "model": {"architecture": "beta_vae", "image_size": 16, "d_model": 8, "n_layers": 1}
            | {"latent_dim": 4},
            "data": {"dataset": "shapes"},
            "training": {
                "steps_per_epoch": 3,
                "batch_size": 4,
                "log_every": 1,
                "eval_every": 0,
                "eval_batches": 1,
                "device": "cpu",
                "output_dir": str(tmp_path),
                "metrics_port": 0,
                "regulation": {"enabled": True, "warmup_steps": 0},
            },
        }
    )
    res = train(cfg, log=log)
    assert res["status"] == "completed", res["error"]
    on_disk = json.loads((tmp_path / RESULTS_NAME).read_text())
    assert "shapes" in on_disk["data"]
    mig = on_disk["val_metrics"]["mig"]
    assert isinstance(mig, float) and 0.0 <= mig <= 1.0
    assert on_disk["extra_metrics"]["mig"] == mig and on_disk["extra_metrics_error"] is None
    assert 0 <= on_disk["extra_metrics"]["active_latents"] <= 4
    # The VAE's geometry, not the size preset's transformer dims.
    assert on_disk["dims"] == {"base_channels": 8, "stages": 1, "latent_dim": 4}
    assert "d_model" not in on_disk["dims"]
    # The regulator's terms reach results.json and the generic gauge.
    reg = on_disk["train_metrics"]
    assert {"reg_loss", "reg_variance", "reg_rate"} <= set(reg) and reg["reg_variance"] > 0
    assert scraped["mig"] == pytest.approx(mig)
    assert scraped["reg_variance"] == pytest.approx(reg["reg_variance"])
    assert "kl" in scraped and "recon_loss" in scraped


def test_a_failing_evaluate_extra_is_recorded_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubearch_trainer.models import vae

    def broken(self: Any, val_dataset: Any) -> dict[str, float]:
        raise ValueError("no factors today")

    monkeypatch.setattr(vae._ImageVAEBase, "evaluate_extra", broken)
    cfg = load_config(
        {
            "model": {"architecture": "vae", "image_size": 16, "d_model": 8, "latent_dim": 4},
            "training": {"steps_per_epoch": 2, "batch_size": 4, "eval_batches": 1, "device": "cpu"}
            | {"output_dir": str(tmp_path)},
        }
    )
    res = train(cfg, log=lambda _: None)
    assert res["status"] == "completed" and res["exit_code"] == 0
    assert "no factors today" in res["extra_metrics_error"] and res["extra_metrics"] == {}


@pytest.mark.timeout(240)
def test_ranks_disagreeing_on_the_checkpoint_fail_with_a_config_error(tmp_path: Path) -> None:
    """Multi-node without shared storage: rank 0 finds the checkpoint, rank 1 (another "node") does not.

    Each process gets its own --output-dir, as node-local disks would be; resuming only rank 0
    would silently train diverged replicas, so both ranks must stop with CONFIG_ERROR instead.
    """
    import socket
    import subprocess
    import sys

    train(tiny_cfg(tmp_path / "rank0", steps_per_epoch=2), log=lambda _: None)
    assert (tmp_path / "rank0" / CHECKPOINT_NAME).exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", OMP_NUM_THREADS="1")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        argv = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-ff", "64", "--max-seq-len", "64"]
        argv += ["--seq-len", "32", "--batch-size", "4", "--steps-per-epoch", "4", "--device", "cpu"]
        argv += ["--resume", "--output-dir", str(tmp_path / f"rank{rank}")]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kubearch_trainer", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=200)[0] for p in procs]
    assert [p.returncode for p in procs] == [ExitCode.CONFIG_ERROR] * 2, outputs
    res = json.loads((tmp_path / "rank0" / RESULTS_NAME).read_text())
    assert res["status"] == "config_error" and res["steps"] == 0  # it did not resume alone
    assert "training.output_dir" in res["error"] and "1 of 2 ranks" in res["error"]
    assert "ReadWriteMany" in res["error"] and "spec.resources.checkpointClaim" in res["error"]
    assert "training.output_dir" in outputs[0]  # the reason is in rank 0's log, not only the JSON


def test_progress_line_only_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a TTY: one self-overwriting status line, erased before every regular log line."""
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stdout", term)
    train(tiny_cfg(tmp_path / "tty", steps_per_epoch=4, log_every=2, eval_every=0))
    text = term.getvalue()
    assert "\r\x1b[Kstep 4/4 [####################]" in text  # the forced final redraw
    lines = text.split("\n")
    logs = [line for line in lines if "| lr " in line]
    assert len(logs) == 2 and all(line.startswith(("step ", "\r\x1b[Kstep ")) for line in logs)
    assert all("[#" not in line.split("\r\x1b[K")[-1] for line in logs)  # a log line is never mixed in

    plain = io.StringIO()  # a pod's stdout (kubectl logs) or a file: log lines only
    monkeypatch.setattr("sys.stdout", plain)
    train(tiny_cfg(tmp_path / "file", steps_per_epoch=4, log_every=2, eval_every=0))
    assert "\r" not in plain.getvalue() and "step      4/4" in plain.getvalue()
