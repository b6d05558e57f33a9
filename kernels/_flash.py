"""``@triton.jit`` pieces shared by the flash-attention kernels of :mod:`.attention`, :mod:`.rotary_attention` and
:mod:`.decoder_attention` (Triton inlines them: the compiled kernels are those written out in full).

Layout of the gated attention kernels: q, k, v, ctx are ``[B, S, A, D]`` with row stride ``stride_row``; program
axis 0 runs over batch x heads (axes 1 and 2 allow only 65,535 programs), axis 1 over blocks of rows. The softmax
statistics are two planes ``stats_plane`` apart (row max, log row sum: kept apart, not ``m + log l``, because with a
fully padded row the max is ~finfo.min and the sum would be absorbed into it); ``Delta`` rows likewise ``[B*A, S]``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _common as C


@triton.jit
def span(start, BLOCK: tl.constexpr, n):
    """``(offs, mask)``: positions ``start .. start + BLOCK`` and which of them are ``< n``."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def rows(base, offs, stride_row, offs_d):
    """int64 offsets [R, BLOCK_D] of rows ``offs`` (columns ``offs_d``) of the head starting at ``base``."""
    return base + offs.to(tl.int64)[:, None] * stride_row + offs_d[None, :]


@triton.jit
def head_block(A, S, D, stride_row, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's head and block of rows: ``(pid_bh, b, a, base, offs, mask, offs_d, mask_d)``, with ``base``
    the offset of head ``a`` of sequence ``b`` and ``offs`` the rows of block ``program_id(1)`` (``BLOCK`` rows)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // A
    a = pid_bh % A
    offs, mask = span(tl.program_id(1) * BLOCK, BLOCK, S)
    offs_d, mask_d = span(0, BLOCK_D, D)
    return pid_bh, b, a, b.to(tl.int64) * S * stride_row + a * D, offs, mask, offs_d, mask_d


@triton.jit
def kv_block(k_ptr, v_ptr, base, offs_n, mask_n, stride_row, offs_d, mask_d):
    """Keys and values of rows ``offs_n`` of a head (0 where ``mask_n`` is off): ``(tile_n, mask_nd, k, v)``."""
    tile_n = rows(base, offs_n, stride_row, offs_d)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + tile_n, mask=mask_nd, other=0.0)
    v = tl.load(v_ptr + tile_n, mask=mask_nd, other=0.0)
    return tile_n, mask_nd, k, v


@triton.jit
def dot_t(a, b, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 ``a @ b.T`` [BLOCK_M, BLOCK_N]."""
    return C._dot(a, tl.trans(b), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT)


@triton.jit
def head_gate(gate_ptr, act_ptr, a):
    """fp32 gate of the ``a``-th active head."""
    return tl.load(gate_ptr + tl.load(act_ptr + a)).to(tl.float32)


@triton.jit
def softmax_step(m_i, l_i, s, GUARD: tl.constexpr):
    """One key block of the online softmax: ``(m_new, alpha, p, l_new)`` for the fp32 scores ``s`` (the normaliser
    sees every probability). ``GUARD``: a row may meet no key in this block (-inf throughout), so 0 is subtracted
    there, not -inf."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if GUARD:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    alpha = tl.exp(m_i - m_sub)
    p = tl.exp(s - m_sub[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def store_fwd(acc, m_i, l_i, g, ctx_ptr, o_ptr, stats_ptr, tile_m, mask_md, row0, offs_m, mask_m, stats_plane,
              STORE_O: tl.constexpr):
    """Epilogue of a gated forward: ``ctx = g * o`` with ``o = acc / l``; with ``STORE_O`` also the ungated ``o``
    and the row statistics (at ``row0 + offs_m`` of each plane)."""
    o = acc / l_i[:, None]
    tl.store(ctx_ptr + tile_m, C.cast_ptr(o * g, ctx_ptr), mask=mask_md)
    if STORE_O:
        tl.store(o_ptr + tile_m, C.cast_ptr(o, o_ptr), mask=mask_md)
        srow = stats_ptr + row0 + offs_m
        tl.store(srow, m_i, mask=mask_m)
        tl.store(srow + stats_plane, tl.log(l_i), mask=mask_m)


@triton.jit
def row_stats(stats_ptr, drow_ptr, row0, offs_m, mask_m, stats_plane):
    """``(row max, log row sum, Delta row)`` of rows ``offs_m`` (at ``row0 + offs_m``), saved by the forward and the
    backward's pre-pass."""
    srow = stats_ptr + row0 + offs_m
    m_i = tl.load(srow, mask=mask_m, other=0.0)
    logl = tl.load(srow + stats_plane, mask=mask_m, other=0.0)
    return m_i, logl, tl.load(drow_ptr + row0 + offs_m, mask=mask_m, other=0.0)


@triton.jit
def gated_grad_rows(dctx_ptr, stats_ptr, drow_ptr, g, tile_m, mask_md, row0, offs_m, mask_m, stats_plane, like):
    """``(dO, m, log l, Delta)`` of rows ``offs_m`` of a gated head: ``dO = g * dctx`` in ``like``'s dtype and
    ``Delta = g * <dctx, o>``."""
    do = C.cast_like(tl.load(dctx_ptr + tile_m, mask=mask_md, other=0.0).to(tl.float32) * g, like)
    m_i, logl, d = row_stats(stats_ptr, drow_ptr, row0, offs_m, mask_m, stats_plane)
    return do, m_i, logl, g * d
