"""Decoder attention with grouped queries (Llama, Mistral, Qwen2, Qwen3): flash attention through a head -> KV-head
map, causal (the Sq queries are the last Sq of the Sk keys), an optional sliding window and key padding.

``triton_decoder_attention(q [B, A, Sq, D], k, v [B, Akv, Sk, D], q_to_kv [A], key_mask [B, Sk]?, window, scale)``
returns the context ``[B, A, Sq, D]`` and the row statistics (max and log-sum, kept apart). Query head ``a`` reads
KV head ``q_to_kv[a]`` by pointer arithmetic: no ``repeat_kv``, no padded group rows, no mask tensor (the causal
band and the window come from the indices, the key padding from the ``[B, Sk]`` row). Key tiles wholly before the
window or after the causal diagonal of a query tile are not visited. A query with no visible key gets a zero
context (as SDPA gives it) and zero gradients.

Backward (custom op ``triton_decoder_attention_backward``, recomputing the probabilities from the statistics):
``Delta = <dctx, ctx>`` per row (a torch reduction), :func:`_dq_kernel` over query tiles, and :func:`_dkdv_kernel`
over key tiles of each KV head, visiting every query head mapped to it (deterministic, no atomics): groups of any
size, unequal ones included.

The backend functions around it: :func:`gated_decoder_attention` (this core, then the gates and the kept columns
of ``wo`` as torch ops) and :func:`gated_decoder_qkv` (one GEMM over the kept heads' rows, Qwen3's q/k RMSNorm and
the rotary positions, as torch ops: no Triton projection kernel yet).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from structprune.ops.checks import check_decoder_attention_inputs, check_decoder_qkv_inputs
from structprune.ops.reference import apply_rotary_native, head_rows, rms_norm
from structprune.ops.support import register_autocast

from . import _common as C, _flash as FL


@triton.jit
def _visible(offs_m, offs_n, Sq, Sk, km_row, window, HAS_KM: tl.constexpr, WINDOW: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: query ``m`` (key position ``Sk - Sq + m``) may see key ``n``."""
    pos = offs_m + (Sk - Sq)
    ok = (offs_n[None, :] <= pos[:, None]) & (offs_n < Sk)[None, :] & (offs_m < Sq)[:, None]
    if WINDOW:
        ok = ok & (pos[:, None] - offs_n[None, :] < window)
    if HAS_KM:
        ok = ok & (tl.load(km_row + offs_n, mask=offs_n < Sk, other=0) != 0)[None, :]
    return ok


@triton.jit
def _key_range(m_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Sq, Sk, window, WINDOW: tl.constexpr):
    """[lo, hi) of the key tiles that queries ``m_start .. m_start + BLOCK_M`` can see."""
    hi = tl.minimum(Sk, m_start + BLOCK_M + (Sk - Sq))
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, m_start + (Sk - Sq) - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_block(q_ptr, map_ptr, A, Akv, Sq, Sk, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's queries and the KV head they read: ``(pid_bh, b, kv_base, offs_m, mask_m, offs_d, mask_d, tile_m,
    mask_md, q)`` (axis 0: batch x query heads, as axes 1 and 2 allow only 65,535 programs; axis 1: query blocks)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // A
    kv = tl.load(map_ptr + pid_bh % A)
    kv_base = (b * Akv + kv).to(tl.int64) * Sk * D
    offs_m, mask_m = FL.span(tl.program_id(1) * BLOCK_M, BLOCK_M, Sq)
    offs_d, mask_d = FL.span(0, BLOCK_D, D)
    mask_md = mask_m[:, None] & mask_d[None, :]
    tile_m = FL.rows(pid_bh.to(tl.int64) * Sq * D, offs_m, D, offs_d)
    q = tl.load(q_ptr + tile_m, mask=mask_md, other=0.0)
    return pid_bh, b, kv_base, offs_m, mask_m, offs_d, mask_d, tile_m, mask_md, q


@triton.jit
def _key_block(q, k_ptr, v_ptr, kv_base, km_row, n0, offs_m, offs_d, mask_d, Sq, Sk, D, window, sm_scale,
               HAS_KM: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys and values ``n0 .. n0 + BLOCK_N`` of the KV head, which of them queries ``offs_m`` see, and the scaled
    scores (unmasked): ``(k, v, ok, s)``."""
    offs_n, mask_n = FL.span(n0, BLOCK_N, Sk)
    _, _, k, v = FL.kv_block(k_ptr, v_ptr, kv_base, offs_n, mask_n, D, offs_d, mask_d)
    ok = _visible(offs_m, offs_n, Sq, Sk, km_row, window, HAS_KM, WINDOW)
    return k, v, ok, FL.dot_t(q, k, DOT, BLOCK_M, BLOCK_N) * sm_scale


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, map_ptr, km_ptr, ctx_ptr, stats_ptr, A, Akv, Sq, Sk, D, window, sm_scale,
                stats_plane, HAS_KM: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh, b, kv_base, offs_m, mask_m, offs_d, mask_d, tile_m, mask_md, q = _query_block(
        q_ptr, map_ptr, A, Akv, Sq, Sk, D, BLOCK_M, BLOCK_D)
    km_row = km_ptr + b.to(tl.int64) * Sk
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(tl.program_id(1) * BLOCK_M, BLOCK_M, BLOCK_N, Sq, Sk, window, WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        k, v, ok, s = _key_block(q, k_ptr, v_ptr, kv_base, km_row, n0, offs_m, offs_d, mask_d, Sq, Sk, D, window,
                                 sm_scale, HAS_KM, WINDOW, DOT, BLOCK_M, BLOCK_N)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.where(ok, tl.exp(s - m_safe[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = C._dot(C.cast_like(p, v), v, acc * alpha[:, None], DOT)
        m_i = m_new
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(ctx_ptr + tile_m, C.cast_ptr(o, ctx_ptr), mask=mask_md)
    srow = stats_ptr + pid_bh.to(tl.int64) * Sq + offs_m
    tl.store(srow, tl.where(seen, m_i, 0.0), mask=mask_m)
    tl.store(srow + stats_plane, tl.where(seen, tl.log(tl.where(seen, l_i, 1.0)), 0.0), mask=mask_m)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, map_ptr, km_ptr, do_ptr, stats_ptr, delta_ptr, dq_ptr, A, Akv, Sq, Sk, D,
               window, sm_scale, stats_plane, HAS_KM: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh, b, kv_base, offs_m, mask_m, offs_d, mask_d, tile_m, mask_md, q = _query_block(
        q_ptr, map_ptr, A, Akv, Sq, Sk, D, BLOCK_M, BLOCK_D)
    do = tl.load(do_ptr + tile_m, mask=mask_md, other=0.0)
    m_i, logl, delta = FL.row_stats(stats_ptr, delta_ptr, pid_bh.to(tl.int64) * Sq, offs_m, mask_m, stats_plane)
    km_row = km_ptr + b.to(tl.int64) * Sk
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(tl.program_id(1) * BLOCK_M, BLOCK_M, BLOCK_N, Sq, Sk, window, WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        k, v, ok, s = _key_block(q, k_ptr, v_ptr, kv_base, km_row, n0, offs_m, offs_d, mask_d, Sq, Sk, D, window,
                                 sm_scale, HAS_KM, WINDOW, DOT, BLOCK_M, BLOCK_N)
        p = tl.where(ok, tl.exp((s - m_i[:, None]) - logl[:, None]), 0.0)
        dp = FL.dot_t(do, v, DOT, BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = C._dot(C.cast_like(ds, k), k, dq, DOT)
    tl.store(dq_ptr + tile_m, C.cast_ptr(dq * sm_scale, dq_ptr), mask=mask_md)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, map_ptr, km_ptr, do_ptr, stats_ptr, delta_ptr, dk_ptr, dv_ptr, A, Akv, Sq,
                 Sk, D, window, sm_scale, stats_plane, HAS_KM: tl.constexpr, WINDOW: tl.constexpr,
                 DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bkv = tl.program_id(0)  # batch x KV heads
    pid_n = tl.program_id(1)
    b = pid_bkv // Akv
    kv = pid_bkv % Akv
    offs_n, mask_n = FL.span(pid_n * BLOCK_N, BLOCK_N, Sk)
    offs_d, mask_d = FL.span(0, BLOCK_D, D)
    tile_n, mask_nd, k, v = FL.kv_block(k_ptr, v_ptr, pid_bkv.to(tl.int64) * Sk * D, offs_n, mask_n, D, offs_d, mask_d)
    km_row = km_ptr + b.to(tl.int64) * Sk
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # queries that can see these keys: positions >= the first key, and (window) < the last key + window
    m_lo = tl.maximum(0, pid_n * BLOCK_N - (Sk - Sq))
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    m_hi = Sq
    if WINDOW:
        m_hi = tl.minimum(Sq, pid_n * BLOCK_N + BLOCK_N - 1 + window - (Sk - Sq))
    for a in range(0, A):
        if tl.load(map_ptr + a) == kv:
            bh = (b * A + a).to(tl.int64)
            for m0 in range(m_lo, m_hi, BLOCK_M):
                offs_m, mask_m = FL.span(m0, BLOCK_M, Sq)
                mask_md = mask_m[:, None] & mask_d[None, :]
                tile_m = FL.rows(bh * Sq * D, offs_m, D, offs_d)
                q = tl.load(q_ptr + tile_m, mask=mask_md, other=0.0)
                do = tl.load(do_ptr + tile_m, mask=mask_md, other=0.0)
                m_i, logl, delta = FL.row_stats(stats_ptr, delta_ptr, bh * Sq, offs_m, mask_m, stats_plane)
                ok = _visible(offs_m, offs_n, Sq, Sk, km_row, window, HAS_KM, WINDOW)
                s = FL.dot_t(q, k, DOT, BLOCK_M, BLOCK_N) * sm_scale
                p = tl.where(ok, tl.exp((s - m_i[:, None]) - logl[:, None]), 0.0)
                dv = C._dot(tl.trans(C.cast_like(p, k)), do, dv, DOT)
                dp = FL.dot_t(do, v, DOT, BLOCK_M, BLOCK_N)
                ds = p * (dp - delta[:, None])
                dk = C._dot(tl.trans(C.cast_like(ds, k)), q, dk, DOT)
    tl.store(dk_ptr + tile_n, C.cast_ptr(dk * sm_scale, dk_ptr), mask=mask_nd)
    tl.store(dv_ptr + tile_n, C.cast_ptr(dv, dv_ptr), mask=mask_nd)


# ------------------------------------------------------------------------------------------ custom ops
def _args(q, k, q_to_kv, key_mask, window):
    B, A, Sq, D = q.shape
    cfg = C.flash_config(q.device, D, q.dtype, backward=False)
    km = key_mask if key_mask is not None else q.new_zeros(1, dtype=torch.int8)
    return (B, A, Sq, D, k.shape[1], k.shape[2], cfg, q_to_kv.to(device=q.device, dtype=torch.int32).contiguous(),
            km.to(torch.int8).contiguous(), dict(HAS_KM=key_mask is not None, WINDOW=window > 0,
                                                 DOT=C.dot_mode(q.dtype)))


@torch.library.custom_op("structprune::triton_decoder_attention", mutates_args=())
@C.on_device_of_first_arg
def triton_decoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_to_kv: torch.Tensor,
                             key_mask: Optional[torch.Tensor], window: int, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.to(k.dtype).contiguous()
    B, A, Sq, D, Akv, Sk, cfg, qmap, km, flags = _args(q, k, q_to_kv, key_mask, window)
    ctx = torch.empty_like(q)
    stats = torch.empty(2, B, A, Sq, device=q.device, dtype=torch.float32)
    if ctx.numel():
        grid = (B * A, triton.cdiv(Sq, cfg["BLOCK_M"]))
        _fwd_kernel[grid](q, k.to(q.dtype), v.to(q.dtype), qmap, km, ctx, stats, A, Akv, Sq, Sk, D, int(window),
                          float(scale), B * A * Sq, **flags, **cfg)
    return ctx, stats


@triton_decoder_attention.register_fake
def _(q, k, v, q_to_kv, key_mask, window, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(2, *q.shape[:3],
                                                                                  dtype=torch.float32)


@torch.library.custom_op("structprune::triton_decoder_attention_backward", mutates_args=())
@C.on_device_of_first_arg
def triton_decoder_attention_backward(dctx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      ctx: torch.Tensor, stats: torch.Tensor, q_to_kv: torch.Tensor,
                                      key_mask: Optional[torch.Tensor], window: int, scale: float
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    do = dctx.to(q.dtype).contiguous()
    B, A, Sq, D, Akv, Sk, _, qmap, km, flags = _args(q, k, q_to_kv, key_mask, window)
    cfg = C.flash_config(q.device, D, q.dtype, backward=True)
    delta = (dctx.float() * ctx.float()).sum(-1).contiguous()  # [B, A, Sq]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel() and k.numel():
        args = (A, Akv, Sq, Sk, D, int(window), float(scale), B * A * Sq)
        _dq_kernel[(B * A, triton.cdiv(Sq, cfg["BLOCK_M"]))](q, k, v, qmap, km, do, stats, delta, dq, *args,
                                                             **flags, **cfg)
        _dkdv_kernel[(B * Akv, triton.cdiv(Sk, cfg["BLOCK_N"]))](q, k, v, qmap, km, do, stats, delta, dk, dv,
                                                                 *args, **flags, **cfg)
    return dq, dk, dv


@triton_decoder_attention_backward.register_fake
def _(dctx, q, k, v, ctx, stats, q_to_kv, key_mask, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, q_to_kv, key_mask, window, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], q_to_kv, key_mask)
    ctx.window, ctx.scale = window, scale
    ctx.dtypes = (k.dtype, v.dtype)


def _backward(ctx, dctx, _dstats):
    q, k, v, out, stats, q_to_kv, key_mask = ctx.saved_tensors
    dq, dk, dv = triton_decoder_attention_backward(dctx, q, k, v, out, stats, q_to_kv, key_mask, ctx.window,
                                                   ctx.scale)
    return dq, dk.to(ctx.dtypes[0]), dv.to(ctx.dtypes[1]), None, None, None, None


triton_decoder_attention.register_autograd(_backward, setup_context=_setup_context)
register_autocast("structprune::triton_decoder_attention")


# ------------------------------------------------------------------------------------------ backend functions
def decoder_attention_core(q, k, v, q_to_kv, key_mask=None, window: int = -1):
    """The contexts [B, A, Sq, D] of causal grouped-query attention (see the module docstring)."""
    return triton_decoder_attention(q, k, v, q_to_kv, key_mask, int(window), q.shape[-1] ** -0.5)[0]


def gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, key_mask, window: int):
    """Equal to :func:`structprune.ops.reference.gated_decoder_attention` with ``key_mask`` and ``window``: the
    Triton core, then the gates and the kept columns of ``wo``."""
    check_decoder_attention_inputs(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, window, key_mask)
    B, A, Sq, D = q.shape
    active = torch.arange(A, device=q.device) if active_heads is None else active_heads.to(q.device)
    if A == 0:
        return F.linear(q.new_zeros(B, Sq, 0), wo[:, :0], bo)
    ctx = decoder_attention_core(q, k, v, q_to_kv, None if key_mask is None else key_mask.to(torch.bool), window)
    ctx = ctx * head_gates.index_select(0, active).to(ctx.dtype)[None, :, None, None]
    ctx = ctx.transpose(1, 2).reshape(B, Sq, A * D)
    return F.linear(ctx, wo.index_select(1, head_rows(active, D)), bo)


def gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim: int, active_heads=None,
                      active_kv=None):
    """(q, k, v) equal to :func:`structprune.ops.reference.gated_decoder_qkv`, from the kept heads' rows only."""
    check_decoder_qkv_inputs(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim, active_heads,
                             active_kv)
    B, S, _ = x.shape

    def project(w, b, heads, norm, rotary):
        if heads is not None:
            rows = head_rows(heads.to(x.device), head_dim)
            w, b = w.index_select(0, rows), None if b is None else b.index_select(0, rows)
        t = F.linear(x, w, b).reshape(B, S, -1, head_dim)
        t = (t if norm is None else rms_norm(t, norm, eps)).transpose(1, 2)
        return apply_rotary_native(t, cos, sin) if rotary else t

    return (project(wq, bq, active_heads, q_norm, True), project(wk, bk, active_kv, k_norm, True),
            project(wv, bv, active_kv, None, False))
