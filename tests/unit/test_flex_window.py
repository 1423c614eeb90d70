"""The FlexAttention path of local (sliding-window) attention against the SDPA-masked reference.

FlexAttention runs on CPU for inference only in this torch (compiled through a C++ template, so
the first call per shape compiles for ~15 s): forward outputs and window semantics are checked
here; gradients need CUDA (see ``test_flex_cpu_has_no_backward`` for the exact reason). Shapes
are kept to two compiled (T, window) pairs, reused by the module- and model-level checks.
"""

from __future__ import annotations

import pytest
import torch
from kubearch_trainer.config import ModelConfig
from kubearch_trainer.models import layers
from kubearch_trainer.models.layers import (
    AttentionSpec,
    CausalSelfAttention,
    local_attention,
    resolve_local_backend,
    set_local_attention_backend,
)
from kubearch_trainer.models.registry import build_model

B, H, HD = 2, 2, 16
SHAPES = [(64, 8), (96, 16)]  # (T, window); 96 is not a multiple of Flex's 128 tile
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
NO_CPU_BACKWARD = (
    "FlexAttention has no backward on CPU in torch "
    f"{torch.__version__} (flex_attention raises NotImplementedError 'FlexAttention does not "
    "support backward on CPU'), so gradients are compared on CUDA only"
)


@pytest.fixture(autouse=True)
def _fresh_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the environment default and may warn again."""
    monkeypatch.delenv(layers.LOCAL_ATTENTION_ENV, raising=False)
    monkeypatch.setattr(layers, "_policy", None)
    monkeypatch.setattr(layers, "_warned", set())


def _qkv(t: int, device: torch.device = CPU, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """q, k, v with the memory layout CausalSelfAttention with RoPE produces (q, k contiguous
    after the rotation, v a strided view of the fused qkv projection), so that every Flex call
    at one T below reuses one compiled kernel instead of recompiling per layout."""
    g = torch.Generator().manual_seed(t)
    q, k = (torch.randn(B, H, t, HD, generator=g).to(device) for _ in range(2))
    v = torch.randn(B, t, 3 * H * HD, generator=g).to(device)[..., 2 * H * HD :]
    v = v.view(B, t, H, HD).transpose(1, 2)
    return tuple(z.detach().requires_grad_(requires_grad) for z in (q, k, v))


def _uses_flex(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls into the compiled Flex kernel, so a silent fallback to SDPA cannot pass."""
    calls: list[int] = []
    real = layers._flex

    def counting() -> object:
        calls.append(1)
        return real()

    monkeypatch.setattr(layers, "_flex", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------


def test_policy_resolution() -> None:
    def r(backend: str, device: torch.device, t: int, grad: bool = True, **kw: float) -> str:
        return resolve_local_backend(backend, device, t, kw.pop("head_dim", 64), grad, **kw)

    assert r("auto", CPU, 8192) == "sdpa"  # Flex only pays off on CUDA
    assert r("auto", CUDA, 4096) == "flex"
    assert r("auto", CUDA, 2048) == "flex"
    assert r("auto", CUDA, 1024) == "sdpa"  # slower than SDPA's flash kernel at 1K
    assert r("auto", CUDA, 4095, grad=False) == "sdpa"  # generate(): no recompile per length
    assert r("auto", CUDA, 4096, dropout_p=0.1) == "sdpa"  # Flex has no dropout
    assert r("auto", CUDA, 4096, head_dim=8) == "sdpa"  # below Flex's Triton minimum
    assert r("sdpa", CUDA, 8192) == "sdpa"
    assert r("flex", CUDA, 64) == "flex"
    assert r("flex", CPU, 64, grad=False) == "flex"
    with pytest.warns(UserWarning, match="no backward on CPU"):
        assert r("flex", CPU, 64) == "sdpa"
    with pytest.warns(UserWarning, match="needs head dim >= 16, got 8"):
        assert r("flex", CUDA, 4096, head_dim=8) == "sdpa"
    with pytest.warns(UserWarning, match="has no dropout"):
        assert r("flex", CUDA, 4096, dropout_p=0.1) == "sdpa"
    with pytest.raises(ValueError, match="'fast' is not one of auto, sdpa, flex"):
        r("fast", CPU, 64)


def test_policy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert layers.local_attention_backend() == "auto"
    monkeypatch.setenv(layers.LOCAL_ATTENTION_ENV, "Flex")
    assert layers.local_attention_backend() == "auto"  # read once per process ...
    set_local_attention_backend(None)
    assert layers.local_attention_backend() == "flex"  # ... until reset
    monkeypatch.setenv(layers.LOCAL_ATTENTION_ENV, "triton")
    set_local_attention_backend(None)
    with pytest.raises(ValueError, match="KUBEARCH_LOCAL_ATTENTION: 'triton' is not one of auto, sdpa, flex"):
        layers.local_attention_backend()
    set_local_attention_backend("sdpa")
    assert layers.local_attention_backend() == "sdpa"


def test_dense_attention_is_sdpa_causal_without_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    real = layers.F.scaled_dot_product_attention

    def spy(*args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    set_local_attention_backend("flex")  # the policy only concerns windowed attention
    cfg = ModelConfig(architecture="dense", d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=50)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.logits(torch.randint(0, 50, (2, 16)))
    assert len(seen) == 2
    assert all(kw.get("is_causal") is True and kw.get("attn_mask") is None for kw in seen)


# ---------------------------------------------------------------------------------------------
# Flex forward on CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "window"), SHAPES)
def test_flex_forward_matches_sdpa_masked(t: int, window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _uses_flex(monkeypatch)
    q, k, v = _qkv(t)
    with torch.no_grad():
        reference = local_attention(q, k, v, window, backend="sdpa")
        flex = local_attention(q, k, v, window, backend="flex")
    assert calls == [1]
    torch.testing.assert_close(flex, reference, rtol=1e-5, atol=1e-5)
    block_mask = layers.window_block_mask(t, window, CPU)
    assert block_mask is layers.window_block_mask(t, window, CPU)  # cached per (T, window, device)


def test_block_mask_visits_o_t_times_w_tiles() -> None:
    """Why Flex is O(T·w): the kernel visits only tiles the block mask lists, and for a window w
    a query tile needs at most ceil(w/128) + 1 key tiles, whatever T is (SDPA's dense mask makes
    it visit all (T/128)² of them)."""
    window, tile = 256, layers.FLEX_BLOCK_SIZE
    per_query_tile = window // tile + 1
    for t in (1024, 2048, 4096):
        bm = layers.window_block_mask(t, window, CPU)
        visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
        # query tile i needs key tiles max(0, i - w/128) .. i: i + 1 of them until the window fills
        expected = sum(min(i + 1, per_query_tile) for i in range(t // tile))
        assert visited == expected
        assert visited < (t // tile) ** 2 / 2


def _changed_positions(f: object, x: torch.Tensor, x_perturbed: torch.Tensor) -> set[int]:
    with torch.no_grad():
        diff = (f(x) - f(x_perturbed)).abs()[0].flatten(1).amax(dim=1)  # per position
    return {i for i in range(x.size(1)) if diff[i] > 1e-6}


def test_flex_attention_layer_sees_only_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    t, window = SHAPES[0]
    j = 20
    calls = _uses_flex(monkeypatch)
    set_local_attention_backend("flex")
    torch.manual_seed(0)
    attn = CausalSelfAttention(H * HD, H, AttentionSpec(None, rope=True, bias=False), 128, window=window)
    attn.eval()
    x = torch.randn(B, t, H * HD)
    x2 = x.clone()
    x2[0, j] += 1.0
    assert _changed_positions(attn, x, x2) == set(range(j, j + window))
    assert calls  # it really ran through Flex


def test_hybrid_model_same_logits_with_flex_and_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    t, window = SHAPES[0]
    calls = _uses_flex(monkeypatch)
    cfg = ModelConfig(
        architecture="hybrid",
        d_model=H * HD,
        n_layers=2,
        n_heads=H,
        d_ff=64,
        vocab_size=50,
        max_seq_len=128,
        hybrid_local_window=window,
        hybrid_attention_every=2,
        use_rope=True,
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 50, (B, t))
    with torch.no_grad():
        set_local_attention_backend("sdpa")
        reference = model.logits(ids)
        set_local_attention_backend("flex")
        flex = model.logits(ids)
    assert calls == [1]  # one attention layer
    torch.testing.assert_close(flex, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients: CUDA only; on CPU the forced Flex path falls back to SDPA
# ---------------------------------------------------------------------------------------------


def test_flex_cpu_has_no_backward() -> None:
    """The fact behind the CPU fallback and the CUDA-only gradient test: if a newer torch adds a
    CPU backward this fails, and the fallback in resolve_local_backend can go."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _qkv(32, requires_grad=True)
    with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
        flex_attention(q, k, v)


def test_forced_flex_training_on_cpu_falls_back_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    t, window = SHAPES[0]
    calls = _uses_flex(monkeypatch)
    grads = {}
    for backend in ("sdpa", "flex"):
        q, k, v = _qkv(t, requires_grad=True)
        if backend == "flex":
            with pytest.warns(UserWarning, match="no backward on CPU"):
                out = local_attention(q, k, v, window, backend=backend)
        else:
            out = local_attention(q, k, v, window, backend=backend)
        out.square().sum().backward()
        grads[backend] = (out.detach(), q.grad, k.grad, v.grad)
    assert calls == []
    for a, b in zip(grads["flex"], grads["sdpa"], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CPU_BACKWARD)
@pytest.mark.parametrize(("t", "window"), SHAPES)
def test_flex_gradients_match_sdpa_on_cuda(t: int, window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _uses_flex(monkeypatch)
    results = {}
    for backend in ("sdpa", "flex"):
        q, k, v = _qkv(t, CUDA, requires_grad=True)
        out = local_attention(q, k, v, window, backend=backend)
        out.square().sum().backward()
        results[backend] = (out.detach(), q.grad, k.grad, v.grad)
    assert calls == [1]
    for a, b in zip(results["flex"], results["sdpa"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
