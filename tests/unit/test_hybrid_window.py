"""Local attention in the hybrid family: a token sees exactly the last ``window`` tokens."""

from __future__ import annotations

import pytest
import torch
from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models.hybrid import Hybrid
from kubearch_trainer.models.layers import (
    AttentionSpec,
    CausalSelfAttention,
    TransformerBlock,
    sliding_window_mask,
)
from kubearch_trainer.models.mamba import MambaBlock
from kubearch_trainer.models.registry import build_model

T, WINDOW, J = 24, 5, 7


def _cfg(**kw) -> ModelConfig:
    base = dict(architecture="hybrid", d_model=32, n_layers=1, n_heads=4, d_ff=64, vocab_size=50)
    base.update(kw)
    return ModelConfig(max_seq_len=64, hybrid_local_window=WINDOW, **base)


def test_mask_matches_definition() -> None:
    mask = sliding_window_mask(T, WINDOW)
    for i in range(T):
        for j in range(T):
            assert bool(mask[i, j]) == (i - WINDOW < j <= i)


def _changed_positions(f, x: torch.Tensor, x_perturbed: torch.Tensor) -> set[int]:
    with torch.no_grad():
        diff = (f(x) - f(x_perturbed)).abs()[0].flatten(1).amax(dim=1)  # per position
    return {i for i in range(x.size(1)) if diff[i] > 1e-6}


def test_attention_layer_sees_only_the_window() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, AttentionSpec(None, rope=True, bias=False), 64, window=WINDOW).eval()
    x = torch.randn(1, T, 32)
    x2 = x.clone()
    x2[0, J] += 1.0
    assert _changed_positions(attn, x, x2) == set(range(J, J + WINDOW))


def test_one_layer_hybrid_model_respects_window_and_causality() -> None:
    # every=1 makes the single layer local attention, so the whole model's receptive field is w.
    torch.manual_seed(0)
    model = build_model(_cfg(hybrid_attention_every=1)).eval()
    assert isinstance(model.blocks[0], TransformerBlock)
    ids = torch.randint(0, 50, (1, T))
    ids2 = ids.clone()
    ids2[0, J] = (ids[0, J] + 1) % 50
    changed = _changed_positions(model.logits, ids, ids2)
    assert changed == set(range(J, J + WINDOW))  # i < j unchanged (causal), i >= j + w unchanged


def test_window_at_least_sequence_length_is_plain_causal() -> None:
    torch.manual_seed(0)
    spec = AttentionSpec(None, rope=False, bias=False)
    local = CausalSelfAttention(32, 4, spec, 64, window=T).eval()
    full = CausalSelfAttention(32, 4, spec, 64, window=None).eval()
    full.load_state_dict(local.state_dict())
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        torch.testing.assert_close(local(x), full(x))
        # and the masked path (window < T) at T-1 rows equals causal when the window covers them
        local.window = T - 1
        torch.testing.assert_close(local(x)[:, : T - 1], full(x)[:, : T - 1])


def test_layer_pattern_and_full_model_causality() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(n_layers=4, hybrid_attention_every=2)).eval()
    assert isinstance(model, Hybrid)
    kinds = [type(b) for b in model.blocks]
    assert kinds == [MambaBlock, TransformerBlock, MambaBlock, TransformerBlock]
    ids = torch.randint(0, 50, (1, T))
    ids2 = ids.clone()
    ids2[0, J] = (ids[0, J] + 1) % 50
    changed = _changed_positions(model.logits, ids, ids2)
    assert min(changed) == J  # nothing before j moves; Mamba carries j's influence past the window
    assert max(changed) > J + WINDOW


@pytest.mark.parametrize("every", [1, 3])
def test_attention_every(every: int) -> None:
    model = build_model(_cfg(n_layers=3, hybrid_attention_every=every))
    n_attn = sum(isinstance(b, TransformerBlock) for b in model.blocks)
    assert n_attn == 3 // every
