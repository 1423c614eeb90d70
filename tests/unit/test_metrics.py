"""The Prometheus endpoint: served during training, scraped over HTTP, parsed with prometheus_client."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from kubearch_trainer.config import load_config
from kubearch_trainer.metrics import TrainMetrics
from kubearch_trainer.trainer import train
from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def value(families: dict[str, list], sample_name: str, **labels: str) -> float:
    for fams in families.values():
        for s in fams:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{sample_name} {labels} not exported")


def test_metrics_object_serves_its_own_registry() -> None:
    a, b = TrainMetrics("dense", "run-a"), TrainMetrics("dense", "run-b")  # no name clash between runs
    port = a.serve(0)
    try:
        a.update_step(3, 10, loss=2.5, lr=1e-3, grad_norm=0.7, tokens_per_second=1234.0, peak_memory_bytes=42)
        a.update_model_metrics({"kl": 0.25, "bad": float("nan")})
        a.add_expert_tokens([5.0, 0.0, 7.0])
        a.add_nan_step()
        fams = scrape(port)
        assert value(fams, "kubearch_train_step", run="run-a") == 3
        assert value(fams, "kubearch_train_loss") == 2.5
        assert value(fams, "kubearch_model_metric", name="kl") == 0.25
        assert value(fams, "kubearch_moe_expert_tokens_total", expert="2") == 7.0
        assert value(fams, "kubearch_nan_steps_total") == 1
        assert "kubearch_model_metric" in fams and all(
            s.labels.get("name") != "bad" for s in fams["kubearch_model_metric"]
        )
    finally:
        a.close()
    assert b.port is None


def test_trainer_exports_metrics_while_training(tmp_path: Path) -> None:
    """Scrape from inside the run: the log hook fires after the final evaluation updated the gauges."""
    scraped: dict[str, dict] = {}
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        m = re.search(r"metrics on http://[^:]+:(\d+)/metrics", msg)
        if m:
            scraped["port"] = {"port": int(m.group(1))}
        if msg.startswith("eval step") and " 8 " in msg + " ":
            scraped["final"] = scrape(scraped["port"]["port"])

    cfg = load_config(
        {
            "model": {
                "architecture": "moe",
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 2,
                "d_ff": 64,
                "num_experts": 4,
                "expert_capacity": 2,
                "max_seq_len": 32,
            },
            "data": {"seq_len": 16},
            "training": {
                "steps_per_epoch": 8,
                "batch_size": 4,
                "log_every": 4,
                "eval_every": 0,
                "eval_batches": 2,
                "device": "cpu",
                "output_dir": str(tmp_path),
                "metrics_port": 0,
            },
        }
    )
    res = train(cfg, log=log)
    assert res["status"] == "completed"
    fams = scraped["final"]
    assert value(fams, "kubearch_train_step", architecture="moe", run=tmp_path.name) == 8
    assert abs(value(fams, "kubearch_train_loss") - res["final_train_loss"]) < 1e-6
    assert abs(value(fams, "kubearch_val_loss") - res["final_val_loss"]) < 1e-6
    assert value(fams, "kubearch_tokens_total") == 8 * 4 * 16
    assert value(fams, "kubearch_step_duration_seconds_count") == 8
    assert value(fams, "kubearch_learning_rate") > 0 and value(fams, "kubearch_grad_norm") > 0
    assert value(fams, "kubearch_tokens_per_second") > 0 and value(fams, "kubearch_peak_memory_bytes") > 0
    assert value(fams, "kubearch_nan_steps_total") == 0
    # Every token goes to k=2 experts in each of the 2 MoE layers: counts add up to 8 steps x 64 x 2 x 2.
    experts = [
        value(fams, "kubearch_moe_expert_tokens_total", expert=str(i))
        for i in range(4)
        if any(s.labels.get("expert") == str(i) for s in fams["kubearch_moe_expert_tokens"])
    ]
    assert sum(experts) == 8 * 4 * 16 * 2 * 2
    assert value(fams, "kubearch_model_metric", name="aux_loss") > 0
