"""FLOPs per token and MFU: the analytic parameter count matches the built models, and each term
scales with the sequence length the way the architecture's cost does."""

from __future__ import annotations

import pytest
from kubearch_trainer.config import ModelConfig
from kubearch_trainer.flops import (
    H100_BF16_PEAK_FLOPS,
    count_params,
    flops_per_token,
    gpt_flops_per_token,
    layer_kinds,
    measured_params,
    mfu,
)
from kubearch_trainer.models.registry import available_architectures, build_model

SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_seq_len": 128}


def _built(arch: str, **kw):
    assert arch in available_architectures(), f"models/{arch}.py did not register {arch!r}"
    cfg = ModelConfig(architecture=arch, **{**SMALL, **kw})
    return cfg, build_model(cfg)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"attention": "lora_small"},
        {"attention": "enhanced_medium"},
        {"attention": "bias_only", "use_rmsnorm": True},
        {"mlp": "gelu", "tie_embeddings": False},
        {"position_embedding": "sinusoidal"},
        {"use_rope": True},
    ],
)
def test_dense_analytic_count_equals_model(kw: dict) -> None:
    cfg, model = _built("dense", **kw)
    assert count_params(cfg) == measured_params(model)
    assert count_params(cfg).total == model.num_params()


def test_dense_preset_sizes_equal_model() -> None:
    """The real presets (not only toy dims), so the 6·N term of the benchmark is the model's."""
    for size in ("tiny", "small"):
        cfg = ModelConfig(architecture="dense", size=size)
        assert count_params(cfg).total == build_model(cfg).num_params()


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("mamba", {}),
        ("mamba", {"state_size": 8, "conv_size": 3, "expand": 3}),
        ("moe", {"num_experts": 4, "expert_capacity": 2}),
        ("hybrid", {"hybrid_attention_every": 2, "n_layers": 4}),
    ],
)
def test_other_families_analytic_count_equals_model(arch: str, kw: dict) -> None:
    cfg, model = _built(arch, **kw)
    analytic, real = count_params(cfg), measured_params(model)
    assert analytic.total == real.total
    assert analytic.active == real.active


def test_six_n_uses_matmul_params_excluding_position_table() -> None:
    cfg = ModelConfig(architecture="dense", **SMALL)
    p = count_params(cfg)
    f = flops_per_token(cfg, 64)
    assert p.lookup_only == cfg.max_seq_len * 32  # learned positions do no matmul
    assert f.params_term == 6 * (p.total - p.lookup_only)
    rope = ModelConfig(architecture="dense", use_rope=True, **SMALL)
    assert count_params(rope).lookup_only == 0  # tied token embedding = the LM head's matmul


def test_dense_attention_term_linear_in_seq_len() -> None:
    cfg = ModelConfig(architecture="dense", **SMALL)
    f1, f2 = flops_per_token(cfg, 1024), flops_per_token(cfg, 4096)
    assert f1.params_term == f2.params_term
    assert f2.attention_term == pytest.approx(4 * f1.attention_term)
    assert f1.attention_term == 12 * 2 * 32 * 1024
    assert f1.scan_term == 0


def test_hybrid_attention_term_stops_growing_at_window() -> None:
    cfg = ModelConfig(architecture="hybrid", hybrid_local_window=256, hybrid_attention_every=2, **SMALL)
    n_attn = layer_kinds(cfg).count("attention")
    assert n_attn == 1 and layer_kinds(cfg).count("mamba") == 1
    small, at_w, big = (flops_per_token(cfg, t).attention_term for t in (128, 256, 8192))
    assert small == 12 * n_attn * 32 * 128
    assert at_w == big == 12 * n_attn * 32 * 256
    assert flops_per_token(cfg, 8192).scan_term > 0


def test_mamba_cost_independent_of_seq_len() -> None:
    cfg = ModelConfig(architecture="mamba", **SMALL)
    f1, f2 = flops_per_token(cfg, 512), flops_per_token(cfg, 8192)
    assert f1.total == f2.total and f1.attention_term == 0
    assert f1.scan_term == 3 * 7 * (2 * 32) * 16 * 2  # d_inner = expand·d, N = 16, 2 layers


def test_moe_counts_active_experts_only() -> None:
    base = {**SMALL, "num_experts": 8}
    k1 = ModelConfig(architecture="moe", expert_capacity=1, **base)
    k2 = ModelConfig(architecture="moe", expert_capacity=2, **base)
    p1, p2 = count_params(k1), count_params(k2)
    assert p1.total == p2.total > p2.active > p1.active
    expert = p2.active - p1.active  # per layer one more expert is active
    assert flops_per_token(k2, 64).total - flops_per_token(k1, 64).total == 6 * expert


def test_model_argument_uses_the_real_count() -> None:
    cfg, model = _built("dense")
    assert flops_per_token(cfg, 64, model=model) == flops_per_token(cfg, 64)


def test_mfu_and_issue_convention() -> None:
    # 768d×10L GPT at 150M params: the issue's convention gives ≈ 1 GFLOP per token at T=1024,
    # so 569k tokens/s is about 57% of the H100's 989 TFLOP/s.
    per_token = gpt_flops_per_token(148_000_000, 10, 768, 1024)
    assert per_token == 6 * 148_000_000 + 12 * 10 * 768 * 1024
    assert mfu(569e3, per_token) == pytest.approx(0.566, abs=0.005)
    assert mfu(1.0, H100_BF16_PEAK_FLOPS) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="peak"):
        mfu(1.0, 1.0, peak=0)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(ModelConfig(), 0)
    with pytest.raises(ValueError, match=r"model\.architecture"):
        layer_kinds(ModelConfig(architecture="vae"))


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn", "cnn"])
@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"image_size": 8, "image_channels": 3}])
def test_recurrent_and_cnn_counts_equal_model(arch: str, kw: dict) -> None:
    """The GPU matrix sizes these families by this count too (not an estimate)."""
    for size in ("tiny", "small"):
        cfg = ModelConfig(architecture=arch, size=size, **kw)
        assert count_params(cfg).total == sum(p.numel() for p in build_model(cfg).parameters())


def test_every_builtin_architecture_is_registered() -> None:
    """families.py no longer swallows ModuleNotFoundError: a family that cannot import fails here."""
    from kubearch_trainer.config import BUILTIN_ARCHITECTURES

    assert set(BUILTIN_ARCHITECTURES) <= set(available_architectures())


def test_a_family_module_that_cannot_import_is_an_error() -> None:
    """Before, families.py swallowed the ModuleNotFoundError and the family vanished silently."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['kubearch_trainer.models.cnn'] = None\n"
        "import kubearch_trainer.models.families\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr
