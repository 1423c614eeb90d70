"""Numerics the reference implementations get right (defect 8 of issue 9).

* mamba-ssm excludes ``A_log``, ``D`` and the Δ bias from weight decay (``_no_weight_decay``);
  grouping parameters by dimension alone decayed the 2-D ``A_log``.
* A MoE router's logits are computed in fp32 (Switch Transformer, ST-MoE): bf16 logits round the
  small differences that decide the top-k.
* mamba-ssm adds the Δ bias in fp32 inside its scan (``delta_bias``), after the bf16 matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kubearch_trainer.config import ModelConfig, TrainConfig
from kubearch_trainer.models.mamba import MambaMixer
from kubearch_trainer.models.moe import MoELayer
from kubearch_trainer.models.registry import build_model
from kubearch_trainer.trainer import param_groups


def test_parameters_tagged_no_weight_decay_are_not_decayed() -> None:
    cfg = ModelConfig(architecture="mamba", d_model=32, n_layers=2, vocab_size=64, max_seq_len=64)
    model = build_model(cfg)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    a_logs = [p for n, p in model.named_parameters() if n.endswith("A_log")]
    assert a_logs and all(p.dim() == 2 for p in a_logs)  # 2-D: the dimension rule alone decays it
    for n, p in model.named_parameters():
        tagged = getattr(p, "_no_weight_decay", False)
        if tagged or p.dim() < 2:
            assert id(p) not in decayed, n
        else:
            assert id(p) in decayed, n
    # every parameter exactly once (tied embeddings are one parameter)
    all_ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(names)


def test_the_trainer_builds_its_optimizer_from_those_groups() -> None:
    from kubearch_trainer.trainer import _build_optimizer

    cfg = TrainConfig.model_validate({"model": {"architecture": "mamba", "dModel": 32, "nLayers": 1}})
    model = build_model(cfg.model)
    opt = _build_optimizer(model, cfg, torch.device("cpu"))
    a_log = next(p for n, p in model.named_parameters() if n.endswith("A_log"))
    (group,) = [g for g in opt.param_groups if any(p is a_log for p in g["params"])]
    assert group["weight_decay"] == 0.0


def test_router_logits_are_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    layer = MoELayer(d_model=64, d_ff=128, num_experts=8, top_k=2, n_layers=2)
    x = torch.randn(16, 64)
    reference = F.linear(x.double(), layer.router.weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(x)
    assert logits.dtype == torch.float32
    # fp32 accuracy, not bf16's ~3 significant digits
    assert torch.allclose(logits.double(), reference, rtol=1e-5, atol=1e-6)


def test_mamba_delta_bias_is_added_in_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    mixer = MambaMixer(d_model=32, state_size=4)
    with torch.no_grad():  # a bias bf16 cannot represent: 1 + 2^-12 rounds to 1 in bf16
        mixer.dt_proj.bias.fill_(1.0 + 2.0**-12)
    dt = torch.zeros(2, 3, mixer.dt_rank)  # the matmul contributes exactly 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = mixer.delta(dt)
    assert delta.dtype == torch.float32
    expected = F.softplus(torch.tensor(1.0 + 2.0**-12, dtype=torch.float32))
    assert torch.equal(delta, expected.expand_as(delta))
