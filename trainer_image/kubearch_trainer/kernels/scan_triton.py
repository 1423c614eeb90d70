"""Mamba-1 selective scan as Triton kernels (forward and backward), for CUDA GPUs.

Semantics, identical to ``kernels.scan.selective_scan_ref`` (shapes: u, delta (B, L, D); A (D, N);
B, C (B, L, N); D (D,)):

    h_t = exp(δ_t ⊗ A) ⊙ h_{t-1} + (δ_t · u_t) ⊗ B_t          h_{-1} = 0,  h_t ∈ R^{D×N}
    y_t = h_t · C_t + D ⊙ u_t

Why a kernel: in PyTorch the scan materialises (B, L, D, N) tensors — N times the activations
of everything around it — and is memory-bound. Here each program owns a block of channels of one
sequence, keeps its (BLOCK_D × N) state in registers and walks the sequence once: it reads u, δ,
B, C and writes y, nothing of size N·L. Programs (B × D/BLOCK_D of them) run in parallel, as in
Mamba's own CUDA kernel. Two variants:

- ``tiled`` (default): the sequence is walked ``TILE`` steps at a time. A tile's inputs arrive
  as 2-D loads (TILE × BLOCK_D, TILE × N), the per-step pairs (a_t, b_t) = (exp(δ_t A), δ_t u_t B_t)
  are combined with ``tl.associative_scan`` (the composition of h ↦ a·h + b is associative), and
  the carried state is added: h_t = B̃_t + Ã_t · h_in. Few dependent steps per program, so load
  latency is paid once per tile instead of once per step.
- ``sequential``: one time step per loop iteration; the simplest form, kept as a cross-check and
  for shapes where the tiled one's registers overflow.

Backward: the forward pass also stores the state entering every ``chunk`` steps
(B × L/chunk × D × N floats, a fraction 1/chunk of what the PyTorch scan keeps). The backward
kernel walks chunks from last to first; in each chunk it recomputes from the stored state (into a
small per-program scratch buffer) the states it needs and runs the adjoint recurrence

    ĝh_t = gy_t ⊗ C_t + exp(δ_{t+1} ⊗ A) ⊙ ĝh_{t+1}

backwards (the tiled kernel as a reverse ``associative_scan`` per tile, h_{t-1} from a forward
scan over inputs shifted by one step). Per-channel gradients (u, δ) are written directly; the
ones summed over channels (B, C) or over the batch (A, D) are written as per-program partial sums
and reduced by PyTorch afterwards, so the result is deterministic (no atomics).

All arithmetic is float32 whatever the input dtype (bf16 inputs are upcast on load); outputs are
cast back to the inputs' dtypes. On CPU the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported), which the tests use on small shapes.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU-only installs and CI without it use the PyTorch scan.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

#: Time steps between stored states (backward recomputes at most this many steps per chunk).
DEFAULT_CHUNK = 64
#: Channels per program (sequential kernels).
DEFAULT_BLOCK_D = 32
#: Channels per program and time steps per parallel scan (tiled kernels): a program holds
#: TILE × BLOCK_D × N values per live tensor, so these stay small (register pressure).
DEFAULT_BLOCK_D_TILED = 8
DEFAULT_TILE = 16


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def triton_scan_available(device: torch.device | str) -> bool:
    """Whether :func:`selective_scan_triton` can run on tensors on ``device``."""
    if not HAS_TRITON:
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and interpreter_enabled()


if HAS_TRITON:

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr,
        delta_ptr,
        a_ptr,
        b_ptr,
        c_ptr,
        dskip_ptr,
        y_ptr,
        hck_ptr,
        L,
        DIM,
        NST,
        N_CHUNKS,
        HAS_D: tl.constexpr,
        SAVE: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < DIM
        mask_n = offs_n < NST
        mask_dn = mask_d[:, None] & mask_n[None, :]

        a = tl.load(a_ptr + offs_d[:, None] * NST + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        if HAS_D:
            dskip = tl.load(dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        seq_ld = pid_b * L * DIM
        seq_ln = pid_b * L * NST
        hck_base = hck_ptr + pid_b * N_CHUNKS * DIM * NST + offs_d[:, None] * NST + offs_n[None, :]
        for t in range(0, L):
            if SAVE:  # noqa: SIM102 - a constexpr test, then a run-time one (Triton)
                if t % CHUNK == 0:
                    tl.store(hck_base + (t // CHUNK) * DIM * NST, h, mask=mask_dn)
            u_t = tl.load(u_ptr + seq_ld + t * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            dt_t = tl.load(delta_ptr + seq_ld + t * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            b_t = tl.load(b_ptr + seq_ln + t * NST + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            c_t = tl.load(c_ptr + seq_ln + t * NST + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(dt_t[:, None] * a) * h + (dt_t * u_t)[:, None] * b_t[None, :]
            y_t = tl.sum(h * c_t[None, :], axis=1)
            if HAS_D:
                y_t += dskip * u_t
            tl.store(y_ptr + seq_ld + t * DIM + offs_d, y_t, mask=mask_d)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr,
        delta_ptr,
        a_ptr,
        b_ptr,
        c_ptr,
        dskip_ptr,
        gy_ptr,
        hck_ptr,
        scratch_ptr,
        gu_ptr,
        gdelta_ptr,
        ga_part_ptr,
        gb_part_ptr,
        gc_part_ptr,
        gd_part_ptr,
        L,
        DIM,
        NST,
        N_CHUNKS,
        N_DBLK,
        HAS_D: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < DIM
        mask_n = offs_n < NST
        mask_dn = mask_d[:, None] & mask_n[None, :]
        tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]

        a = tl.load(a_ptr + offs_d[:, None] * NST + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        if HAS_D:
            dskip = tl.load(dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        seq_ld = pid_b * L * DIM
        seq_ln = pid_b * L * NST
        hck_base = hck_ptr + pid_b * N_CHUNKS * DIM * NST + offs_d[:, None] * NST + offs_n[None, :]
        scratch = scratch_ptr + (pid_b * N_DBLK + pid_d) * CHUNK * BLOCK_D * BLOCK_N + tile
        part_ln = (pid_b * N_DBLK + pid_d) * L * NST

        gh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        ga_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        gd_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for ci in range(0, N_CHUNKS):
            c = N_CHUNKS - 1 - ci
            t0 = c * CHUNK
            h0 = tl.load(hck_base + c * DIM * NST, mask=mask_dn, other=0.0)
            # 1) recompute this chunk's states into the scratch buffer
            h = h0
            for j in range(0, CHUNK):
                t = t0 + j
                if t < L:
                    u_t = tl.load(u_ptr + seq_ld + t * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    dt_t = tl.load(delta_ptr + seq_ld + t * DIM + offs_d, mask=mask_d, other=0.0).to(
                        tl.float32
                    )
                    b_t = tl.load(b_ptr + seq_ln + t * NST + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    h = tl.exp(dt_t[:, None] * a) * h + (dt_t * u_t)[:, None] * b_t[None, :]
                    tl.store(scratch + j * BLOCK_D * BLOCK_N, h)
            tl.debug_barrier()
            # 2) adjoint recurrence backwards through the chunk
            for jj in range(0, CHUNK):
                j = CHUNK - 1 - jj
                t = t0 + j
                if t < L:
                    h_t = tl.load(scratch + j * BLOCK_D * BLOCK_N)
                    if j > 0:  # noqa: SIM108 - run-time branch inside a Triton kernel
                        h_prev = tl.load(scratch + (j - 1) * BLOCK_D * BLOCK_N)
                    else:
                        h_prev = h0
                    u_t = tl.load(u_ptr + seq_ld + t * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    dt_t = tl.load(delta_ptr + seq_ld + t * DIM + offs_d, mask=mask_d, other=0.0).to(
                        tl.float32
                    )
                    gy_t = tl.load(gy_ptr + seq_ld + t * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    b_t = tl.load(b_ptr + seq_ln + t * NST + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    c_t = tl.load(c_ptr + seq_ln + t * NST + offs_n, mask=mask_n, other=0.0).to(tl.float32)

                    gh += gy_t[:, None] * c_t[None, :]  # now dLoss/dh_t
                    tl.store(
                        gc_part_ptr + part_ln + t * NST + offs_n,
                        tl.sum(gy_t[:, None] * h_t, axis=0),
                        mask=mask_n,
                    )
                    decay = tl.exp(dt_t[:, None] * a)
                    g_decay = gh * h_prev * decay  # dLoss/d(δA), elementwise
                    gh_b = tl.sum(gh * b_t[None, :], axis=1)  # Σ_n ĝh · B
                    gdt = tl.sum(g_decay * a, axis=1) + gh_b * u_t
                    gu = gh_b * dt_t
                    if HAS_D:
                        gu += dskip * gy_t
                        gd_acc += gy_t * u_t
                    ga_acc += g_decay * dt_t[:, None]
                    tl.store(
                        gb_part_ptr + part_ln + t * NST + offs_n,
                        tl.sum(gh * (dt_t * u_t)[:, None], axis=0),
                        mask=mask_n,
                    )
                    tl.store(gu_ptr + seq_ld + t * DIM + offs_d, gu, mask=mask_d)
                    tl.store(gdelta_ptr + seq_ld + t * DIM + offs_d, gdt, mask=mask_d)
                    gh = gh * decay  # carried to h_{t-1}
            tl.debug_barrier()
        ga_ptrs = ga_part_ptr + pid_b * DIM * NST + offs_d[:, None] * NST + offs_n[None, :]
        tl.store(ga_ptrs, ga_acc, mask=mask_dn)
        if HAS_D:
            tl.store(gd_part_ptr + pid_b * DIM + offs_d, gd_acc, mask=mask_d)


if HAS_TRITON:

    @triton.jit
    def _pair_combine(a1, b1, a2, b2):
        """Compose two steps of ``h = a·h + b`` (first (a1, b1), then (a2, b2))."""
        return a1 * a2, b1 * a2 + b2

    @triton.jit
    def _scan_fwd_tiled_kernel(
        u_ptr,
        delta_ptr,
        a_ptr,
        b_ptr,
        c_ptr,
        dskip_ptr,
        y_ptr,
        hck_ptr,
        L,
        DIM,
        NST,
        N_TILES,
        N_SEG,
        HAS_D: tl.constexpr,
        SAVE: tl.constexpr,
        TILE: tl.constexpr,
        SEG_TILES: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        local = tl.arange(0, TILE)
        mask_d = offs_d < DIM
        mask_n = offs_n < NST
        mask_dn = mask_d[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + offs_d[:, None] * NST + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        if HAS_D:
            dskip = tl.load(dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        seq_ld = pid_b * L * DIM
        seq_ln = pid_b * L * NST
        hck_base = hck_ptr + pid_b * N_SEG * DIM * NST + offs_d[:, None] * NST + offs_n[None, :]
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for tile in range(0, N_TILES):
            if SAVE:  # noqa: SIM102 - a constexpr test, then a run-time one (Triton)
                if tile % SEG_TILES == 0:
                    tl.store(hck_base + (tile // SEG_TILES) * DIM * NST, h, mask=mask_dn)
            offs_t = tile * TILE + local
            mask_t = offs_t < L
            m_td = mask_t[:, None] & mask_d[None, :]
            m_tn = mask_t[:, None] & mask_n[None, :]
            ld = seq_ld + offs_t[:, None] * DIM + offs_d[None, :]
            ln = seq_ln + offs_t[:, None] * NST + offs_n[None, :]
            u = tl.load(u_ptr + ld, mask=m_td, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + ld, mask=m_td, other=0.0).to(tl.float32)
            bm = tl.load(b_ptr + ln, mask=m_tn, other=0.0).to(tl.float32)
            cm = tl.load(c_ptr + ln, mask=m_tn, other=0.0).to(tl.float32)
            decay = tl.exp(dt[:, :, None] * a[None, :, :])  # (TILE, BLOCK_D, BLOCK_N); 1 on padding
            inp = (dt * u)[:, :, None] * bm[:, None, :]
            pa, pb = tl.associative_scan((decay, inp), 0, _pair_combine)
            h_all = pb + pa * h[None, :, :]
            y = tl.sum(h_all * cm[:, None, :], axis=2)
            if HAS_D:
                y += dskip[None, :] * u
            tl.store(y_ptr + ld, y, mask=m_td)
            h = tl.sum(tl.where((local == TILE - 1)[:, None, None], h_all, 0.0), axis=0)

    @triton.jit
    def _scan_bwd_tiled_kernel(
        u_ptr,
        delta_ptr,
        a_ptr,
        b_ptr,
        c_ptr,
        dskip_ptr,
        gy_ptr,
        hck_ptr,
        scratch_ptr,
        gu_ptr,
        gdelta_ptr,
        ga_part_ptr,
        gb_part_ptr,
        gc_part_ptr,
        gd_part_ptr,
        L,
        DIM,
        NST,
        N_SEG,
        N_DBLK,
        HAS_D: tl.constexpr,
        TILE: tl.constexpr,
        SEG_TILES: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        local = tl.arange(0, TILE)
        mask_d = offs_d < DIM
        mask_n = offs_n < NST
        mask_dn = mask_d[:, None] & mask_n[None, :]
        state_tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
        a = tl.load(a_ptr + offs_d[:, None] * NST + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        if HAS_D:
            dskip = tl.load(dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        seq_ld = pid_b * L * DIM
        seq_ln = pid_b * L * NST
        hck_base = hck_ptr + pid_b * N_SEG * DIM * NST + offs_d[:, None] * NST + offs_n[None, :]
        scratch = scratch_ptr + (pid_b * N_DBLK + pid_d) * SEG_TILES * BLOCK_D * BLOCK_N + state_tile
        part_ln = (pid_b * N_DBLK + pid_d) * L * NST

        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dLoss/dh flowing in from later tiles
        ga_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        gd_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for si in range(0, N_SEG):
            seg = N_SEG - 1 - si
            # 1) the state entering each tile of this segment, from the segment's checkpoint
            h = tl.load(hck_base + seg * DIM * NST, mask=mask_dn, other=0.0)
            for k in range(0, SEG_TILES):
                tl.store(scratch + k * BLOCK_D * BLOCK_N, h)
                offs_t = (seg * SEG_TILES + k) * TILE + local
                m_td = (offs_t < L)[:, None] & mask_d[None, :]
                m_tn = (offs_t < L)[:, None] & mask_n[None, :]
                ld = seq_ld + offs_t[:, None] * DIM + offs_d[None, :]
                u = tl.load(u_ptr + ld, mask=m_td, other=0.0).to(tl.float32)
                dt = tl.load(delta_ptr + ld, mask=m_td, other=0.0).to(tl.float32)
                bm = tl.load(
                    b_ptr + seq_ln + offs_t[:, None] * NST + offs_n[None, :], mask=m_tn, other=0.0
                ).to(tl.float32)
                pa, pb = tl.associative_scan(
                    (tl.exp(dt[:, :, None] * a[None, :, :]), (dt * u)[:, :, None] * bm[:, None, :]),
                    0,
                    _pair_combine,
                )
                h_all = pb + pa * h[None, :, :]
                h = tl.sum(tl.where((local == TILE - 1)[:, None, None], h_all, 0.0), axis=0)
            tl.debug_barrier()
            # 2) tiles of the segment in reverse: adjoint scan, then every gradient of the tile
            for kk in range(0, SEG_TILES):
                k = SEG_TILES - 1 - kk
                t0 = (seg * SEG_TILES + k) * TILE
                if t0 < L:
                    h0 = tl.load(scratch + k * BLOCK_D * BLOCK_N)
                    offs_t = t0 + local
                    mask_t = offs_t < L
                    m_td = mask_t[:, None] & mask_d[None, :]
                    m_tn = mask_t[:, None] & mask_n[None, :]
                    ld = seq_ld + offs_t[:, None] * DIM + offs_d[None, :]
                    ln = seq_ln + offs_t[:, None] * NST + offs_n[None, :]
                    u = tl.load(u_ptr + ld, mask=m_td, other=0.0).to(tl.float32)
                    dt = tl.load(delta_ptr + ld, mask=m_td, other=0.0).to(tl.float32)
                    gy = tl.load(gy_ptr + ld, mask=m_td, other=0.0).to(tl.float32)
                    bm = tl.load(b_ptr + ln, mask=m_tn, other=0.0).to(tl.float32)
                    cm = tl.load(c_ptr + ln, mask=m_tn, other=0.0).to(tl.float32)
                    decay = tl.exp(dt[:, :, None] * a[None, :, :])
                    # adjoint: gh_t = gy_t ⊗ C_t + decay_{t+1} ⊙ gh_{t+1}; the tile's last step
                    # takes the carry instead (decay already applied to it)
                    m_next = ((offs_t + 1) < L)[:, None] & (local < TILE - 1)[:, None] & mask_d[None, :]
                    dt_next = tl.load(delta_ptr + ld + DIM, mask=m_next, other=0.0).to(tl.float32)
                    ra, rb = tl.associative_scan(
                        (tl.exp(dt_next[:, :, None] * a[None, :, :]), gy[:, :, None] * cm[:, None, :]),
                        0,
                        _pair_combine,
                        reverse=True,
                    )
                    gh = rb + ra * carry[None, :, :]
                    # h_{t-1}: the same forward scan over the inputs shifted by one step
                    m_prev = (local > 0)[:, None] & mask_t[:, None]
                    dt_p = tl.load(delta_ptr + ld - DIM, mask=m_prev & mask_d[None, :], other=0.0).to(
                        tl.float32
                    )
                    u_p = tl.load(u_ptr + ld - DIM, mask=m_prev & mask_d[None, :], other=0.0).to(tl.float32)
                    b_p = tl.load(b_ptr + ln - NST, mask=m_prev & mask_n[None, :], other=0.0).to(tl.float32)
                    qa, qb = tl.associative_scan(
                        (
                            tl.exp(dt_p[:, :, None] * a[None, :, :]),
                            (dt_p * u_p)[:, :, None] * b_p[:, None, :],
                        ),
                        0,
                        _pair_combine,
                    )
                    h_prev = qb + qa * h0[None, :, :]
                    h_t = decay * h_prev + (dt * u)[:, :, None] * bm[:, None, :]

                    g_decay = gh * h_prev * decay  # dLoss/d(δ·A)
                    gh_b = tl.sum(gh * bm[:, None, :], axis=2)  # (TILE, BLOCK_D)
                    gdt = tl.sum(g_decay * a[None, :, :], axis=2) + gh_b * u
                    gu = gh_b * dt
                    if HAS_D:
                        gu += dskip[None, :] * gy
                        gd_acc += tl.sum(gy * u, axis=0)
                    ga_acc += tl.sum(g_decay * dt[:, :, None], axis=0)
                    tl.store(gu_ptr + ld, gu, mask=m_td)
                    tl.store(gdelta_ptr + ld, gdt, mask=m_td)
                    gb = tl.sum(gh * (dt * u)[:, :, None], axis=1)  # (TILE, BLOCK_N)
                    gc = tl.sum(gy[:, :, None] * h_t, axis=1)
                    pn = part_ln + offs_t[:, None] * NST + offs_n[None, :]
                    tl.store(gb_part_ptr + pn, gb, mask=m_tn)
                    tl.store(gc_part_ptr + pn, gc, mask=m_tn)
                    carry = tl.sum(tl.where((local == 0)[:, None, None], decay * gh, 0.0), axis=0)
            tl.debug_barrier()
        ga_ptrs = ga_part_ptr + pid_b * DIM * NST + offs_d[:, None] * NST + offs_n[None, :]
        tl.store(ga_ptrs, ga_acc, mask=mask_dn)
        if HAS_D:
            tl.store(gd_part_ptr + pid_b * DIM + offs_d, gd_acc, mask=mask_d)


def _check_shapes(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, L, D); got {tuple(u.shape)} and {tuple(delta.shape)}")
    bsz, length, dim = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N); got {tuple(A.shape)}")
    nst = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (bsz, length, nst):
            raise ValueError(f"{name} must be (B, L, N) = {(bsz, length, nst)}; got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must be (D={dim},); got {tuple(D.shape)}")


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, chunk, block_d):  # type: ignore[override]
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D = D.contiguous() if D is not None else None
        bsz, length, dim = u.shape
        nst = A.shape[1]
        n_chunks = triton.cdiv(length, chunk)
        block_n = triton.next_power_of_2(nst)
        y = torch.empty((bsz, length, dim), device=u.device, dtype=torch.float32)
        save = any(ctx.needs_input_grad[:6])
        hck = torch.empty((bsz, n_chunks, dim, nst) if save else (1,), device=u.device, dtype=torch.float32)
        grid = (bsz, triton.cdiv(dim, block_d))
        _scan_fwd_kernel[grid](
            u,
            delta,
            A,
            B,
            C,
            D if D is not None else u,
            y,
            hck,
            length,
            dim,
            nst,
            n_chunks,
            HAS_D=D is not None,
            SAVE=save,
            CHUNK=chunk,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, hck)
            ctx.chunk, ctx.block_d = chunk, block_d
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        u, delta, A, B, C, D, hck = ctx.saved_tensors
        chunk, block_d = ctx.chunk, ctx.block_d
        gy = gy.contiguous()
        bsz, length, dim = u.shape
        nst = A.shape[1]
        n_chunks = hck.shape[1]
        n_dblk = triton.cdiv(dim, block_d)
        block_n = triton.next_power_of_2(nst)
        f32 = {"device": u.device, "dtype": torch.float32}
        scratch = torch.empty((bsz, n_dblk, chunk, block_d, block_n), **f32)
        gu = torch.empty((bsz, length, dim), **f32)
        gdelta = torch.empty((bsz, length, dim), **f32)
        ga_part = torch.empty((bsz, dim, nst), **f32)
        gb_part = torch.empty((bsz, n_dblk, length, nst), **f32)
        gc_part = torch.empty((bsz, n_dblk, length, nst), **f32)
        gd_part = torch.empty((bsz, dim) if D is not None else (1,), **f32)
        _scan_bwd_kernel[(bsz, n_dblk)](
            u,
            delta,
            A,
            B,
            C,
            D if D is not None else u,
            gy,
            hck,
            scratch,
            gu,
            gdelta,
            ga_part,
            gb_part,
            gc_part,
            gd_part,
            length,
            dim,
            nst,
            n_chunks,
            n_dblk,
            HAS_D=D is not None,
            CHUNK=chunk,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
        )
        gD = gd_part.sum(0).to(D.dtype) if D is not None else None
        return (
            gu.to(u.dtype),
            gdelta.to(delta.dtype),
            ga_part.sum(0).to(A.dtype),
            gb_part.sum(1).to(B.dtype),
            gc_part.sum(1).to(C.dtype),
            gD,
            None,
            None,
        )


class _SelectiveScanTritonTiled(torch.autograd.Function):
    """The tiled kernels: ``tile`` steps per parallel scan, a stored state every ``seg_tiles`` tiles."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, tile, seg_tiles, block_d, num_warps):  # type: ignore[override]
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D = D.contiguous() if D is not None else None
        bsz, length, dim = u.shape
        nst = A.shape[1]
        n_tiles = triton.cdiv(length, tile)
        n_seg = triton.cdiv(n_tiles, seg_tiles)
        y = torch.empty((bsz, length, dim), device=u.device, dtype=torch.float32)
        save = any(ctx.needs_input_grad[:6])
        hck = torch.empty((bsz, n_seg, dim, nst) if save else (1,), device=u.device, dtype=torch.float32)
        _scan_fwd_tiled_kernel[(bsz, triton.cdiv(dim, block_d))](
            u, delta, A, B, C, D if D is not None else u, y, hck,
            length, dim, nst, n_tiles, n_seg,
            HAS_D=D is not None, SAVE=save, TILE=tile, SEG_TILES=seg_tiles,
            BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(nst), num_warps=num_warps,
        )  # fmt: skip
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, hck)
            ctx.cfg = (tile, seg_tiles, block_d, num_warps)
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        u, delta, A, B, C, D, hck = ctx.saved_tensors
        tile, seg_tiles, block_d, num_warps = ctx.cfg
        gy = gy.contiguous()
        bsz, length, dim = u.shape
        nst = A.shape[1]
        n_seg = hck.shape[1]
        n_dblk = triton.cdiv(dim, block_d)
        block_n = triton.next_power_of_2(nst)
        f32 = {"device": u.device, "dtype": torch.float32}
        scratch = torch.empty((bsz, n_dblk, seg_tiles, block_d, block_n), **f32)
        gu = torch.empty((bsz, length, dim), **f32)
        gdelta = torch.empty((bsz, length, dim), **f32)
        ga_part = torch.empty((bsz, dim, nst), **f32)
        gb_part = torch.empty((bsz, n_dblk, length, nst), **f32)
        gc_part = torch.empty((bsz, n_dblk, length, nst), **f32)
        gd_part = torch.empty((bsz, dim) if D is not None else (1,), **f32)
        _scan_bwd_tiled_kernel[(bsz, n_dblk)](
            u, delta, A, B, C, D if D is not None else u, gy, hck, scratch,
            gu, gdelta, ga_part, gb_part, gc_part, gd_part,
            length, dim, nst, n_seg, n_dblk,
            HAS_D=D is not None, TILE=tile, SEG_TILES=seg_tiles, BLOCK_D=block_d, BLOCK_N=block_n,
            num_warps=num_warps,
        )  # fmt: skip
        gD = gd_part.sum(0).to(D.dtype) if D is not None else None
        return (
            gu.to(u.dtype),
            gdelta.to(delta.dtype),
            ga_part.sum(0).to(A.dtype),
            gb_part.sum(1).to(B.dtype),
            gc_part.sum(1).to(C.dtype),
            gD,
            None,
            None,
            None,
            None,
        )


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    impl: str = "tiled",
    chunk: int = DEFAULT_CHUNK,
    block_d: int | None = None,
    tile: int = DEFAULT_TILE,
    num_warps: int = 4,
) -> torch.Tensor:
    """Selective scan through the Triton kernels; same signature and result as the reference.

    ``impl``: ``tiled`` (default: ``tile`` steps per parallel scan, coalesced 2-D loads) or
    ``sequential`` (one step per loop iteration; simplest, kept as a cross-check). ``chunk`` is
    the number of steps between stored states (backward memory vs recomputation); ``block_d``
    the channels per program (default 8 tiled, 32 sequential); ``num_warps`` the tiled kernels'
    warps per program (tune with ``bench/scan_kernel.py --sweep`` on the GPU).

    Raises ``RuntimeError`` where the kernels cannot run (no Triton, or CPU tensors without the
    interpreter); callers check :func:`triton_scan_available` first and fall back to PyTorch.
    """
    _check_shapes(u, delta, A, B, C, D)
    if impl not in ("tiled", "sequential"):
        raise ValueError(f"impl: {impl!r} is not one of tiled, sequential")
    if block_d is None:
        block_d = DEFAULT_BLOCK_D_TILED if impl == "tiled" else DEFAULT_BLOCK_D
    pow2 = lambda v: v >= 1 and not v & (v - 1)  # noqa: E731
    if chunk < 1 or not pow2(block_d) or not pow2(tile):
        raise ValueError(
            f"chunk must be >= 1, block_d and tile powers of two; got {chunk}, {block_d}, {tile}"
        )
    if not triton_scan_available(u.device):
        raise RuntimeError(
            f"selective_scan_triton cannot run on {u.device}: needs triton and a CUDA device "
            "(or TRITON_INTERPRET=1 on CPU); use kernels.scan's PyTorch scan instead"
        )
    launch = _launch if COMPILE_THROUGH else _launch_outside_graph
    return launch(u, delta, A, B, C, D, impl, chunk, block_d, tile, num_warps)


def _launch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    impl: str,
    chunk: int,
    block_d: int,
    tile: int,
    num_warps: int,
) -> torch.Tensor:
    if impl == "sequential":
        return _SelectiveScanTriton.apply(u, delta, A, B, C, D, chunk, block_d)
    seg_tiles = max(1, chunk // tile)
    return _SelectiveScanTritonTiled.apply(u, delta, A, B, C, D, tile, seg_tiles, block_d, num_warps)


#: Under ``torch.compile`` the kernels run as an opaque call (a graph break) unless
#: ``KUBEARCH_SCAN_COMPILE=1``: Dynamo can trace user Triton kernels inside an autograd.Function,
#: but that path has not been exercised on the GPU yet, and a failure there would cost a whole
#: benchmark run. Flip it on the H100 and compare.
COMPILE_THROUGH = os.environ.get("KUBEARCH_SCAN_COMPILE", "0") == "1"
_launch_outside_graph = torch.compiler.disable(_launch)
