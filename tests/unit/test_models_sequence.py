"""The four sequence families and the attention variants: build, shapes, learning, MoE routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kubearch_trainer.config import ATTENTION_VARIANTS, LORA_RANKS, ModelConfig
from kubearch_trainer.models.layers import LoRAAdapter
from kubearch_trainer.models.registry import build_model

VOCAB, BATCH, SEQ = 64, 4, 32
ARCHS = ("dense", "mamba", "moe", "hybrid")


def tiny_cfg(architecture: str = "dense", **kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=VOCAB, max_seq_len=64)
    base.update(kw)
    return ModelConfig(
        architecture=architecture, num_experts=4, expert_capacity=2, hybrid_local_window=8, **base
    )


def fixed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


def train_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 8) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_metrics_and_learning(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch))
    batch = fixed_batch()
    out = model(batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert "ce_loss" in out.metrics
    assert all(not v.requires_grad for v in out.metrics.values())
    # Training returns no [B, T, V] logits (they would live through backward) and no accuracy.
    assert out.logits is None and "accuracy" not in out.metrics
    model.eval()
    with torch.no_grad():
        evaluated = model(batch)
    model.train()
    assert evaluated.logits.shape == (BATCH, SEQ, VOCAB)
    assert {"ce_loss", "accuracy"} <= set(evaluated.metrics)
    torch.testing.assert_close(evaluated.metrics["ce_loss"], out.metrics["ce_loss"])  # no dropout
    # An untrained model is near uniform: CE close to log(V).
    assert abs(out.metrics["ce_loss"].item() - torch.log(torch.tensor(VOCAB)).item()) < 0.5
    losses = train_steps(model, batch)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_without_targets_and_accuracy_definition(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch)).eval()
    batch = fixed_batch()
    out = model({"input_ids": batch["input_ids"]})
    assert out.logits.shape == (BATCH, SEQ, VOCAB) and out.metrics == {}
    targets = out.logits.argmax(-1)
    targets[:, ::2] = -100  # ignored positions do not count
    acc = model({"input_ids": batch["input_ids"], "targets": targets}).metrics["accuracy"]
    assert acc.item() == pytest.approx(1.0)


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_attention_variants(variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(attention=variant))
    attn = model.blocks[0].attn
    has_lora = variant.startswith(("lora_", "enhanced_"))
    assert (attn.lora_q is not None) == has_lora
    if has_lora:
        r_qk, r_vo = LORA_RANKS[variant]
        assert (attn.lora_q.rank, attn.lora_k.rank, attn.lora_v.rank, attn.lora_o.rank) == (
            r_qk,
            r_qk,
            r_vo,
            r_vo,
        )
    assert (attn.qkv.bias is not None) == (variant.startswith("enhanced_") or variant == "bias_only")
    uses_rope = variant.startswith("enhanced_") or variant == "rope_only"
    assert (attn.rotary is not None) == uses_rope
    assert (model.pos_emb is None) == uses_rope  # RoPE replaces absolute positions
    losses = train_steps(model, fixed_batch(), steps=6)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("variant", ["lora_small", "lora_large"])
def test_lora_starts_equal_to_baseline(variant: str) -> None:
    torch.manual_seed(0)
    baseline = build_model(tiny_cfg()).eval()
    lora = build_model(tiny_cfg(attention=variant)).eval()
    missing, unexpected = lora.load_state_dict(baseline.state_dict(), strict=False)
    assert missing and all("lora_" in k for k in missing) and not unexpected
    batch = fixed_batch()
    with torch.no_grad():
        torch.testing.assert_close(lora.logits(batch["input_ids"]), baseline.logits(batch["input_ids"]))
    # ... and the adapters do train: B leaves zero after a step.
    lora.train()
    train_steps(lora, batch, steps=1)
    adapters = [m for m in lora.modules() if isinstance(m, LoRAAdapter)]
    assert adapters and all(m.lora_B.abs().sum() > 0 for m in adapters)


def test_dense_block_names_tying_and_options() -> None:
    model = build_model(tiny_cfg())
    block = model.blocks[0]
    for name in ("norm1", "attn", "norm2", "mlp"):
        assert hasattr(block, name)
    assert model.lm_head.weight is model.tok_emb.weight
    untied = build_model(tiny_cfg(tie_embeddings=False))
    assert untied.num_params() - model.num_params() == VOCAB * 32
    for kw in (
        {"use_rmsnorm": True},
        {"mlp": "gelu"},
        {"position_embedding": "sinusoidal"},
        {"use_rope": True},
    ):
        torch.manual_seed(0)
        variant = build_model(tiny_cfg(**kw))
        assert torch.isfinite(variant(fixed_batch()).loss)
    assert build_model(tiny_cfg(position_embedding="sinusoidal")).pos_emb is None


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_matches(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch))
    batch = fixed_batch()
    loss = model(batch).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.set_gradient_checkpointing(True)
    loss_ckpt = model(batch).loss
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    torch.testing.assert_close(loss_ckpt, loss)
    for g, g_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-4, atol=1e-6)


def test_moe_losses_counts_and_active_params() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg("moe")
    model = build_model(cfg)
    out = model(fixed_batch())
    m = out.metrics
    assert {"aux_loss", "z_loss"} <= set(m)
    torch.testing.assert_close(out.loss.detach(), m["ce_loss"] + m["aux_loss"] + m["z_loss"])
    # Switch loss is ≥ α (its value under perfectly uniform routing) and positive z-loss.
    assert m["aux_loss"].item() >= cfg.moe_aux_loss_weight * 0.99 and m["z_loss"].item() > 0
    counts = model.extra_metrics()["expert_tokens"]
    assert counts.dtype == torch.long and counts.shape == (cfg.num_experts,)
    assert counts.sum().item() == BATCH * SEQ * cfg.expert_capacity * cfg.n_layers
    # Only k of E experts count as active.
    per_expert = model.blocks[0].mlp.params_per_expert()
    expected = model.num_params() - cfg.n_layers * (cfg.num_experts - cfg.expert_capacity) * per_expert
    assert model.active_params() == expected < model.num_params()


def test_moe_dispatch_equals_per_token_reference() -> None:
    torch.manual_seed(0)
    layer = build_model(tiny_cfg("moe")).blocks[0].mlp
    x = torch.randn(3, 10, 32)
    y = layer(x)
    # Reference: for each token, the gate-weighted sum of its top-k experts, computed one by one.
    flat = x.reshape(-1, 32)
    probs = F.softmax(layer.router(flat), dim=-1)
    gates, experts = probs.topk(layer.top_k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    ref = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        for g, e in zip(gates[t], experts[t], strict=True):
            h = F.silu(flat[t] @ layer.w_gate[e].T) * (flat[t] @ layer.w_up[e].T)
            ref[t] += g * (h @ layer.w_down[e].T)
    torch.testing.assert_close(y.reshape(-1, 32), ref, rtol=1e-5, atol=1e-6)


def test_moe_collapsed_router_raises_aux_loss() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg("moe")
    model = build_model(cfg)
    balanced = model(fixed_batch()).metrics["aux_loss"]
    for block in model.blocks:  # a router that sends every token to experts 0 and 1
        router = torch.nn.Linear(32, cfg.num_experts, bias=True)
        with torch.no_grad():
            router.weight.zero_()
            router.bias.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))
        block.mlp.router = router
    collapsed = model(fixed_batch()).metrics["aux_loss"]
    counts = model.extra_metrics()["expert_tokens"]
    assert counts[2:].sum().item() == 0
    # f = P ≈ (1/2, 1/2, 0, 0): E·Σ f·P ≈ 2, twice the uniform value.
    assert collapsed.item() == pytest.approx(2 * cfg.moe_aux_loss_weight, rel=0.01)
    assert collapsed > balanced


@pytest.mark.parametrize("arch", ARCHS)
def test_generate(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch, max_seq_len=16))
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = model.generate(prompt, max_length=24, temperature=0.8, top_k=5)  # past max_seq_len: crops
    assert out.shape == (2, 24) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt) and int(out.max()) < VOCAB
    assert model.training  # mode restored
    # top_k=1 sampling is greedy decoding.
    greedy = model.generate(prompt, max_length=12, temperature=0.0)
    torch.manual_seed(1)
    top1 = model.generate(prompt, max_length=12, temperature=1.0, top_k=1)
    assert torch.equal(greedy, top1)


def test_param_counts_are_sensible() -> None:
    with torch.device("meta"):
        counts = {a: build_model(ModelConfig(architecture=a, size="tiny")) for a in ARCHS}
    n = {a: m.num_params() for a, m in counts.items()}
    # dense tiny: 4 layers × (4·d² attention + 3·d·688 SwiGLU) + 256·d tokens + 4096·d positions
    d = 256
    assert n["dense"] == 4 * (4 * d * d + 3 * d * 688 + 2 * d) + 256 * d + 4096 * d + d
    assert n["mamba"] < n["hybrid"] < n["dense"] < n["moe"]
    assert counts["moe"].active_params() < n["moe"]


@pytest.mark.gpu
def test_moe_grouped_mm_matches_loop_on_cuda() -> None:
    torch.manual_seed(0)
    layer = build_model(tiny_cfg("moe", d_model=64, d_ff=128)).blocks[0].mlp.cuda().bfloat16()
    x = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert layer.use_grouped_mm(x)
    y = layer(x)
    y.float().square().sum().backward()
    grad_grouped = layer.w_up.grad.clone()
    layer.zero_grad()
    layer.use_grouped_mm = lambda _x: False  # force the per-expert loop
    y_loop = layer(x)
    y_loop.float().square().sum().backward()
    torch.testing.assert_close(y.float(), y_loop.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_grouped.float(), layer.w_up.grad.float(), rtol=5e-2, atol=5e-2)
