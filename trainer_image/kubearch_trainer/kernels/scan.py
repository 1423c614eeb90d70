"""Mamba-1 selective scan: a sequential reference, a vectorised chunked scan, and a dispatcher.

The recurrence, per batch b, channel d and state n (Δ > 0, A < 0)::

    h_t = exp(Δ_t · A) ⊙ h_{t-1} + Δ_t · B_t · u_t          (state, shape (D, N))
    y_t = Σ_n C_t[n] · h_t[:, n] + D ⊙ u_t

Shapes (batch-first, like the rest of the trainer): u, Δ: (B, L, D); A: (D, N); B, C: (B, L, N);
D: (D,). Everything is computed in float32 and returned in u's dtype.

Why the chunked scan uses a Hillis–Steele (doubling) scan inside chunks rather than the
"cumsum of Δ·A in log space" trick: the log-space form needs exp(-Σ Δ·A), which overflows float32
as soon as a chunk's total decay passes e^88 (easily reached with A = -16 and Δ ≈ 1), whereas the
doubling scan only multiplies decays ≤ 1 and so cannot overflow. Work is O(L·log c·D·N) in
log2(c) vectorised steps, plus a loop over the L/c chunks that carries the (B, D, N) state.
"""

from __future__ import annotations

import functools

import torch


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recurrence as written: a Python loop over time. Slow; the ground truth for tests."""
    dtype = u.dtype
    u, delta, A, B, C = (z.float() for z in (u, delta, A, B, C))
    batch, length, d_inner = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)  # (B, D, N)
        h = decay * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + u * D.float()
    return y.to(dtype)


def _doubling_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t · h_{t-1} + b_t along dim -3, starting from h = 0.

    Returns (prod of a up to t, h_t). Each step composes every element with the one ``k`` steps
    earlier (k = 1, 2, 4, ...), so log2(length) steps cover the whole dimension.
    """
    length = a.shape[-3]
    k = 1
    while k < length:
        # Elements before k have nothing k steps back and stay as they are.
        later = torch.addcmul(b[..., k:, :, :], a[..., k:, :, :], b[..., :-k, :, :])
        b = torch.cat((b[..., :k, :, :], later), dim=-3)
        a = torch.cat((a[..., :k, :, :], a[..., k:, :, :] * a[..., :-k, :, :]), dim=-3)
        k *= 2
    return a, b


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Vectorised scan in plain PyTorch (any device, autograd-friendly).

    1. Pad L up to a multiple of ``chunk_size`` with Δ = 0 (decay 1, input 0: a no-op step).
    2. Inside every chunk at once: doubling scan from a zero state -> local states and the
       cumulative decay since the chunk start.
    3. Loop over chunks only: state entering chunk k = decay_total(k-1)·state(k-1) + local_end(k-1).
    4. h_t = local_t + cumdecay_t · state_entering; y_t = C_t · h_t + D·u_t.
    """
    dtype = u.dtype
    u, delta, A, B, C = (z.float() for z in (u, delta, A, B, C))
    batch, length, d_inner = u.shape
    n_state = A.shape[1]
    chunk = max(1, min(chunk_size, length))
    pad = (-length) % chunk
    if pad:
        u_p, delta_p = (torch.nn.functional.pad(z, (0, 0, 0, pad)) for z in (u, delta))
        B_p, C_p = (torch.nn.functional.pad(z, (0, 0, 0, pad)) for z in (B, C))
    else:
        u_p, delta_p, B_p, C_p = u, delta, B, C
    n_chunks = (length + pad) // chunk

    # (B, n_chunks, c, D, N)
    decay = torch.exp(delta_p[..., None] * A).view(batch, n_chunks, chunk, d_inner, n_state)
    inputs = ((delta_p * u_p)[..., None] * B_p[:, :, None, :]).view(batch, n_chunks, chunk, d_inner, n_state)
    cum_decay, local = _doubling_scan(decay, inputs)

    # Carry the state across chunks: a short loop over chunks, not over time.
    state = u.new_zeros(batch, d_inner, n_state)
    entering = []
    for k in range(n_chunks):
        entering.append(state)
        state = cum_decay[:, k, -1] * state + local[:, k, -1]
    h = local + cum_decay * torch.stack(entering, dim=1)[:, :, None]

    y = torch.einsum("bkcdn,bkcn->bkcd", h, C_p.view(batch, n_chunks, chunk, n_state))
    y = y.reshape(batch, n_chunks * chunk, d_inner)[:, :length]
    if D is not None:
        y = y + u * D.float()
    return y.to(dtype)


@functools.cache
def _mamba_ssm_scan():  # cached: a failed import would otherwise be retried every call
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA extension
        return None
    return selective_scan_fn


@functools.cache
def _triton_scan():
    try:
        from kubearch_trainer.kernels.scan_triton import selective_scan_triton, triton_scan_available
    except Exception:  # the Triton kernel is optional (and needs triton + CUDA)
        return None
    # A CUDA build of torch without a working Triton must fall back, not raise.
    return selective_scan_triton if triton_scan_available("cuda") else None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fastest available implementation: mamba-ssm's CUDA kernel, our Triton kernel, else chunked."""
    if u.is_cuda:
        fn = _mamba_ssm_scan()
        if fn is not None:
            # mamba-ssm wants channel-first (B, D, L) and (B, N, L), Δ/B/C in u's dtype, A in fp32
            # (it accumulates in fp32 internally).
            y = fn(
                u.transpose(1, 2).contiguous(),
                delta.to(u.dtype).transpose(1, 2).contiguous(),
                A.float().contiguous(),
                B.to(u.dtype).transpose(1, 2).contiguous(),
                C.to(u.dtype).transpose(1, 2).contiguous(),
                None if D is None else D.float(),
                delta_softplus=False,
            )
            return y.transpose(1, 2)
        fn = _triton_scan()
        if fn is not None:
            return fn(u, delta, A, B, C, D)
    return selective_scan_chunked(u, delta, A, B, C, D)
