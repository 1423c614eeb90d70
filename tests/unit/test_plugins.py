"""Plugins: a user architecture registered by name builds, validates, trains; duplicates are refused."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from kubearch_trainer.config import PLUGIN_ARCHITECTURES, ConfigError, ModelConfig, load_config
from kubearch_trainer.models import (
    KubearchModel,
    ModelOutput,
    available_architectures,
    build_model,
    register,
    registry,
)
from torch import nn


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        registry._REGISTRY.pop(name, None)
        PLUGIN_ARCHITECTURES.discard(name)


def _define(name: str) -> type[KubearchModel]:
    @register(name, task="lm")
    class BigramLM(KubearchModel):
        """The smallest useful LM: a learned next-token table (the seed's "Custom Architectures")."""

        def __init__(self, cfg: ModelConfig) -> None:
            super().__init__(cfg)
            self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)

        def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
            logits = self.table(batch["input_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
            return ModelOutput(loss=loss, metrics={"ce_loss": loss.detach()}, logits=logits)

    return BigramLM


def test_unknown_architecture_is_refused_before_registration() -> None:
    with pytest.raises(ConfigError, match="my_bigram_x"):
        load_config({"model": {"architecture": "my_bigram_x"}})


def test_registered_plugin_builds_validates_and_learns(cleanup: list[str]) -> None:
    cleanup.append("my_bigram")
    cls = _define("my_bigram")
    assert "my_bigram" in available_architectures()
    cfg = load_config({"model": {"architecture": "my_bigram", "vocabSize": 16}})  # the validator accepts it
    model = build_model(cfg.model)
    assert isinstance(model, cls) and model.task == "lm"
    ids = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    first = model(batch).loss.item()
    for _ in range(10):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(batch).loss.item() < first


def test_duplicate_name_is_refused(cleanup: list[str]) -> None:
    cleanup.append("my_dup")
    assert "vae" in available_architectures()  # built-ins loaded
    _define("my_dup")
    with pytest.raises(ValueError, match="already registered"):
        _define("my_dup")
    with pytest.raises(ValueError, match="already registered"):
        _define("vae")  # a built-in name cannot be taken over either


def test_register_requires_a_kubearch_model(cleanup: list[str]) -> None:
    cleanup.append("not_a_model")
    with pytest.raises(TypeError, match="KubearchModel"):
        register("not_a_model")(nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task"):

        @register("not_a_model", task="speech")
        class Bad(KubearchModel):
            pass
