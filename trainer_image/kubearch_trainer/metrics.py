"""Prometheus metrics of a training run (``--metrics-port``), scraped by a PodMonitor.

Why an own :class:`CollectorRegistry`: the default registry is process-global, so two trainers in
one process (tests, ``kubearch compare`` in-process) would collide on metric names. Names carry the
``kubearch_`` prefix and base units; counters end in ``_total``. Every series has the labels
``architecture`` and ``run`` so one Grafana dashboard can overlay runs.

Only rank 0 serves by default (its numbers are already global after DDP's all-reduce); with
``metrics_all_ranks`` every rank serves on ``port + local_rank``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TrainMetrics:
    """The run's metric families; ``update_*`` methods take plain Python numbers."""

    def __init__(self, architecture: str, run: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"architecture": architecture, "run": run}
        names = list(self.labels)
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*names, *extra], registry=r)

        self.step = gauge("kubearch_train_step", "Optimizer steps completed.")
        self.total_steps = gauge("kubearch_train_total_steps", "Optimizer steps planned for the run.")
        self.loss = gauge("kubearch_train_loss", "Mean training loss over the last logging window.")
        self.val_loss = gauge("kubearch_val_loss", "Validation loss at the last evaluation.")
        self.val_accuracy = gauge(
            "kubearch_val_accuracy", "Validation accuracy (fraction) at the last evaluation."
        )
        self.tokens_per_second = gauge(
            "kubearch_tokens_per_second", "Training throughput (tokens/s, all ranks)."
        )
        self.learning_rate = gauge("kubearch_learning_rate", "Current learning rate.")
        self.grad_norm = gauge("kubearch_grad_norm", "Global gradient norm before clipping.")
        self.peak_memory = gauge("kubearch_peak_memory_bytes", "Peak memory (CUDA allocated or process RSS).")
        self.model_metric = gauge(
            "kubearch_model_metric", "Model-specific scalar (aux losses, KL, regulation terms...).", ("name",)
        )
        self.step_duration = Histogram(
            "kubearch_step_duration_seconds",
            "Wall time of one optimizer step.",
            names,
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.nan_steps = Counter(
            "kubearch_nan_steps", "Steps skipped because the loss was not finite.", names, registry=r
        )
        self.tokens = Counter("kubearch_tokens", "Training tokens processed (all ranks).", names, registry=r)
        self.expert_tokens = Counter(
            "kubearch_moe_expert_tokens", "Tokens routed to each MoE expert.", [*names, "expert"], registry=r
        )
        # Export zeros from the start: "no NaN so far" must read 0, not "absent" (alerts rely on it).
        for family in (self.nan_steps, self.tokens, self.step, self.total_steps):
            family.labels(**self.labels)
        self.port: int | None = None
        self._server = None

    # ---------------------------------------------------------------- serving
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the HTTP endpoint; ``port`` 0 picks a free port. Returns the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---------------------------------------------------------------- updates
    def update_step(
        self,
        step: int,
        total_steps: int,
        loss: float | None = None,
        lr: float | None = None,
        grad_norm: float | None = None,
        tokens_per_second: float | None = None,
        peak_memory_bytes: int | None = None,
    ) -> None:
        lab = self.labels
        self.step.labels(**lab).set(step)
        self.total_steps.labels(**lab).set(total_steps)
        for g, v in (
            (self.loss, loss),
            (self.learning_rate, lr),
            (self.grad_norm, grad_norm),
            (self.tokens_per_second, tokens_per_second),
            (self.peak_memory, peak_memory_bytes),
        ):
            if v is not None and math.isfinite(v):
                g.labels(**lab).set(v)

    def observe_step_time(self, seconds: float) -> None:
        self.step_duration.labels(**self.labels).observe(seconds)

    def add_tokens(self, n: int) -> None:
        self.tokens.labels(**self.labels).inc(n)

    def add_nan_step(self) -> None:
        self.nan_steps.labels(**self.labels).inc()

    def update_eval(self, val_loss: float, accuracy: float | None = None) -> None:
        self.val_loss.labels(**self.labels).set(val_loss)
        if accuracy is not None:
            self.val_accuracy.labels(**self.labels).set(accuracy)

    def update_model_metrics(self, values: Mapping[str, float]) -> None:
        """Generic scalars (``kubearch_model_metric{name=...}``): new model terms need no new code."""
        for name, v in values.items():
            if math.isfinite(v):
                self.model_metric.labels(**self.labels, name=name).set(v)

    def add_expert_tokens(self, counts: list[float]) -> None:
        for i, c in enumerate(counts):
            if c > 0:
                self.expert_tokens.labels(**self.labels, expert=str(i)).inc(c)
