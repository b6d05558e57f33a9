"""Gated self-attention over active heads only: gathered QKV GEMMs, flash attention, gated output projection.

Forward:
  1. ``q/k/v[N, A*D] = x @ w[rows].T + b[rows]`` for the ``A`` active heads: three launches of the gathered
     GEMM of :mod:`._common` reading the weight rows ``active[c // D] * D + c % D`` by pointer arithmetic
     (``GATHER_BN`` with ``GROUP = D``); nothing is copied out of the weights. ``N = B * S``; the layout
     ``[B, S, A, D]`` is used as is by the attention kernels (no transposes).
  2. :func:`_attn_fwd_kernel`: flash attention (online softmax over key blocks, no ``S x S`` matrix in memory),
     ``key_bias`` added to the scores of each key, keys past ``S`` masked; the epilogue scales the context of
     head ``a`` by ``head_gates[active[a]]`` and stores it (plus the ungated context and the softmax row
     statistics when a backward will need them).
  3. ``y = ctx @ wo[:, cols].T + bo``: gathered GEMM over the active columns of ``wo`` (``GATHER_BK``).
Backward (Triton kernels; only bias gradients, the per-head gate sum and the scatter of those small vectors
are torch ops):
  * ``dctx = dy @ wo[:, cols]`` (gathered GEMM), ``dwo[:, cols] = dy.T @ ctx`` (scattered store into a
    zero-filled full-size gradient), ``dbo = dy.sum(0)``;
  * :func:`_attn_bwd_pre_kernel`: ``D[b, a, s] = <dctx, o>`` (ungated context), so that ``d gate[h] = sum D``
    and the flash ``Delta = gate * D``;
  * :func:`_attn_bwd_dq_kernel` and :func:`_attn_bwd_dkdv_kernel`: flash-attention backward (recomputing the
    probabilities from the saved row max and log-sum), one kernel over query blocks for ``dq`` and one over key
    blocks for ``dk, dv`` (deterministic, no atomics); ``dO = gate * dctx``;
  * ``dx = dq @ wq[rows] + dk @ wk[rows] + dv @ wv[rows]`` (three gathered GEMMs summing into one fp32 buffer),
    ``dw[rows] = d{q,k,v}.T @ x`` (scattered stores), ``db[rows] = d{q,k,v}.sum(0)``.
``A == 0``: the output is ``bo`` broadcast and no projection or attention runs.
The backward op's ``output_mask`` (x, weights and biases, gates) skips what only masked-out gradients need: the
``dwo`` and ``dw``/``db`` GEMMs without weights, the flash backward with neither x nor weights; those outputs
are empty ``[0]`` tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from structprune.ops.checks import check_attention_inputs
from structprune.ops.support import grad_output_mask, grad_placeholders, masked_grads, register_autocast

from . import _common as C, _flash as FL
from .dropout import _dropout_args, _dropout_tile, attention_dropout_scale, supports_attention_dropout

# the public API (the dropout pair re-exported for structprune.backends.triton)
__all__ = ["attention_dropout_scale", "gated_attention", "supports_attention_dropout", "triton_gated_attention",
           "triton_gated_attention_backward"]


@triton.jit
def _scores(q, k, kb_ptrs, mask_n, sm_scale, HAS_KB: tl.constexpr, DOT: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 ``q @ k.T * scale + key_bias``; keys past the sequence get -inf."""
    s = FL.dot_t(q, k, DOT, BLOCK_M, BLOCK_N) * sm_scale
    if HAS_KB:
        s += tl.load(kb_ptrs, mask=mask_n, other=0.0)[None, :]
    return tl.where(mask_n[None, :], s, float("-inf"))


@triton.jit
def _key_block(q, k_ptr, v_ptr, kb_row, base, n0, S, stride_row, stride_kbs, offs_d, mask_d, sm_scale,
               HAS_KB: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys and values ``n0 .. n0 + BLOCK_N`` of the head and the scores of ``q`` against them: ``(k, v, s)``."""
    offs_n, mask_n = FL.span(n0, BLOCK_N, S)
    _, _, k, v = FL.kv_block(k_ptr, v_ptr, base, offs_n, mask_n, stride_row, offs_d, mask_d)
    return k, v, _scores(q, k, kb_row + offs_n * stride_kbs, mask_n, sm_scale, HAS_KB, DOT, BLOCK_M, BLOCK_N)


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, kb_ptr, gate_ptr, act_ptr, ctx_ptr, o_ptr, stats_ptr,
                     S, A, D, sm_scale, stride_row, stride_kbb, stride_kbs, stats_plane,
                     H, seed, drop_offset, drop_p, inv_keep,
                     HAS_KB: tl.constexpr, STORE_O: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh, b, a, base, offs_m, mask_m, offs_d, mask_d = FL.head_block(A, S, D, stride_row, BLOCK_M, BLOCK_D)
    tile_m = FL.rows(base, offs_m, stride_row, offs_d)
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + tile_m, mask=mask_md, other=0.0)
    kb_row = kb_ptr + b.to(tl.int64) * stride_kbb
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, S, BLOCK_N):
        k, v, s = _key_block(q, k_ptr, v_ptr, kb_row, base, n0, S, stride_row, stride_kbs, offs_d, mask_d, sm_scale,
                             HAS_KB, DOT, BLOCK_M, BLOCK_N)
        m_new, alpha, p, l_i = FL.softmax_step(m_i, l_i, s, False)
        if DROPOUT:
            h = tl.load(act_ptr + a)
            p = p * _dropout_tile(seed, drop_offset, b, h, H, S, offs_m, n0, drop_p, inv_keep, BLOCK_N)
        acc = C._dot(C.cast_like(p, v), v, acc * alpha[:, None], DOT)
        m_i = m_new
    FL.store_fwd(acc, m_i, l_i, FL.head_gate(gate_ptr, act_ptr, a), ctx_ptr, o_ptr, stats_ptr, tile_m, mask_md,
                pid_bh.to(tl.int64) * S, offs_m, mask_m, stats_plane, STORE_O)


@triton.jit
def _attn_bwd_pre_kernel(dctx_ptr, o_ptr, drow_ptr, S, A, D, stride_row,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``drow[b*A + a, s] = sum_d dctx * o`` in fp32."""
    pid_bh, b, a, base, offs_m, mask_m, offs_d, mask_d = FL.head_block(A, S, D, stride_row, BLOCK_M, BLOCK_D)
    tile = FL.rows(base, offs_m, stride_row, offs_d)
    mask = mask_m[:, None] & mask_d[None, :]
    dctx = tl.load(dctx_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(drow_ptr + pid_bh.to(tl.int64) * S + offs_m, tl.sum(dctx * o, axis=1), mask=mask_m)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, kb_ptr, gate_ptr, act_ptr, dctx_ptr, stats_ptr, drow_ptr, dq_ptr,
                        S, A, D, sm_scale, stride_row, stride_kbb, stride_kbs, stats_plane,
                        H, seed, drop_offset, drop_p, inv_keep,
                        HAS_KB: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh, b, a, base, offs_m, mask_m, offs_d, mask_d = FL.head_block(A, S, D, stride_row, BLOCK_M, BLOCK_D)
    mask_md = mask_m[:, None] & mask_d[None, :]
    tile_m = FL.rows(base, offs_m, stride_row, offs_d)
    q = tl.load(q_ptr + tile_m, mask=mask_md, other=0.0)
    do, m_i, logl, delta = FL.gated_grad_rows(dctx_ptr, stats_ptr, drow_ptr, FL.head_gate(gate_ptr, act_ptr, a), tile_m,
                                             mask_md, pid_bh.to(tl.int64) * S, offs_m, mask_m, stats_plane, q)
    kb_row = kb_ptr + b.to(tl.int64) * stride_kbb
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, S, BLOCK_N):
        k, v, s = _key_block(q, k_ptr, v_ptr, kb_row, base, n0, S, stride_row, stride_kbs, offs_d, mask_d, sm_scale,
                             HAS_KB, DOT, BLOCK_M, BLOCK_N)
        p = tl.exp((s - m_i[:, None]) - logl[:, None])
        dp = FL.dot_t(do, v, DOT, BLOCK_M, BLOCK_N)
        if DROPOUT:  # the forward's mask, regenerated: d(probability) = d(dropped probability) * multiplier
            h = tl.load(act_ptr + a)
            dp = dp * _dropout_tile(seed, drop_offset, b, h, H, S, offs_m, n0, drop_p, inv_keep, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = C._dot(C.cast_like(ds, k), k, dq, DOT)
    tl.store(dq_ptr + tile_m, C.cast_ptr(dq * sm_scale, dq_ptr), mask=mask_md)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, kb_ptr, gate_ptr, act_ptr, dctx_ptr, stats_ptr, drow_ptr,
                          dk_ptr, dv_ptr,
                          S, A, D, sm_scale, stride_row, stride_kbb, stride_kbs, stats_plane,
                          H, seed, drop_offset, drop_p, inv_keep,
                          HAS_KB: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh, b, a, base, offs_n, mask_n, offs_d, mask_d = FL.head_block(A, S, D, stride_row, BLOCK_N, BLOCK_D)
    pid_n = tl.program_id(1)
    tile_n, mask_nd, k, v = FL.kv_block(k_ptr, v_ptr, base, offs_n, mask_n, stride_row, offs_d, mask_d)
    g = FL.head_gate(gate_ptr, act_ptr, a)
    kb_row = kb_ptr + b.to(tl.int64) * stride_kbb
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, S, BLOCK_M):
        offs_m, mask_m = FL.span(m0, BLOCK_M, S)
        mask_md = mask_m[:, None] & mask_d[None, :]
        tile_m = FL.rows(base, offs_m, stride_row, offs_d)
        q = tl.load(q_ptr + tile_m, mask=mask_md, other=0.0)
        do, m_i, logl, delta = FL.gated_grad_rows(dctx_ptr, stats_ptr, drow_ptr, g, tile_m, mask_md,
                                                 pid_bh.to(tl.int64) * S, offs_m, mask_m, stats_plane, k)
        s = _scores(q, k, kb_row + offs_n * stride_kbs, mask_n, sm_scale, HAS_KB, DOT,
                    BLOCK_M, BLOCK_N)
        p = tl.exp((s - m_i[:, None]) - logl[:, None])
        p = tl.where(mask_m[:, None], p, 0.0)
        dp = FL.dot_t(do, v, DOT, BLOCK_M, BLOCK_N)
        if DROPOUT:
            h = tl.load(act_ptr + a)
            scale = _dropout_tile(seed, drop_offset, b, h, H, S, offs_m, pid_n * BLOCK_N, drop_p, inv_keep, BLOCK_N)
            dv = C._dot(tl.trans(C.cast_like(p * scale, k)), do, dv, DOT)
            dp = dp * scale
        else:
            dv = C._dot(tl.trans(C.cast_like(p, k)), do, dv, DOT)
        ds = p * (dp - delta[:, None])
        dk = C._dot(tl.trans(C.cast_like(ds, k)), q, dk, DOT)
    tl.store(dk_ptr + tile_n, C.cast_ptr(dk * sm_scale, dk_ptr), mask=mask_nd)
    tl.store(dv_ptr + tile_n, C.cast_ptr(dv, dv_ptr), mask=mask_nd)


# ---------------------------------------------------------- around the flash kernels (shared with .rotary_attention)
def _saved_shapes(B, S, A, D, save):
    """Shapes of (q, k, v, ctx, o, stats); all empty when nothing is saved."""
    if not save:
        return [(0,)] * 6
    return [(B * S, A * D)] * 5 + [(2, B * A, S)]


def _placeholders(x, shapes, factory):
    """Saved-tensor outputs that carry no data (nothing saved, or no active head): x's dtype, stats fp32."""
    return tuple(factory(s, dtype=torch.float32 if i == 5 else x.dtype, device=x.device) for i, s in enumerate(shapes))


def _no_head_outputs(x, bo, saved_shapes):
    """The forward's outputs with no active head (or no token): ``y`` is ``bo`` broadcast (0 without ``bo``)."""
    y = bo.expand(x.shape).clone() if bo is not None else x.new_zeros(x.shape)
    return (y,) + _placeholders(x, saved_shapes, torch.zeros)


def _project_qkv(x, projections, active_heads, D, save):
    """``(q, k, v, ctx, o, stats)``: ``x @ w[rows].T (+ b[rows])`` [B*S, A*D] for each ``(w, b)`` of ``projections``
    over the active heads' rows, then the flash forward's outputs, unwritten; ``o`` and ``stats`` only when ``save``
    (else ``ctx`` stands for them: the kernel does not write them)."""
    B, S, E = x.shape
    N, A = B * S, active_heads.numel()
    x2 = x.reshape(N, E)
    proj = []
    for w, bias in projections:
        out = torch.empty((N, A * D), dtype=x.dtype, device=x.device)
        C.gemm(x2, w, out, M=N, N=A * D, K=E, a_strides=x2.stride(), b_strides=(w.stride(1), w.stride(0)),
               out_strides=out.stride(), idx=active_heads, gather=C.GATHER_BN, group=D, bias=bias)
        proj.append(out)
    ctx = torch.empty((N, A * D), dtype=x.dtype, device=x.device)
    o = torch.empty((N, A * D), dtype=x.dtype, device=x.device) if save else ctx
    stats = torch.empty((2, B * A, S), dtype=torch.float32, device=x.device) if save else ctx
    return (*proj, ctx, o, stats)


def _project_out(x, wo, bo, active_heads, D, saved, save):
    """The forward's outputs: ``y = ctx @ wo[:, cols].T (+ bo)`` [B, S, E] (gathered GEMM over the active columns)
    and the ``saved`` ``(q, k, v, ctx, o, stats)``, or empty placeholders unless ``save``."""
    B, S, E = x.shape
    N, A, ctx = B * S, active_heads.numel(), saved[3]
    y = torch.empty((N, E), dtype=x.dtype, device=x.device)
    C.gemm(ctx, wo, y, M=N, N=E, K=A * D, a_strides=ctx.stride(), b_strides=(wo.stride(1), wo.stride(0)),
           out_strides=y.stride(), idx=active_heads, gather=C.GATHER_BK, group=D, bias=bo)
    y = y.view(B, S, E)
    if not save:
        return (y,) + _placeholders(x, _saved_shapes(B, S, A, D, False), torch.empty)
    return (y, *saved)


def _grads_like(mask, x, wq, wk, wv, wo, head_gates, factory, biases=(True, True, True, True)):
    """(dx, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, d_head_gates): :func:`grad_placeholders`, each bias's shaped
    from its weight, [0] for a bias absent in ``biases`` (bq, bk, bv, bo)."""
    weights = [part for w, has in zip((wq, wk, wv, wo), biases) for part in (w, (w, w.shape[:1] if has else (0,)))]
    return list(grad_placeholders(mask, x, weights, head_gates, factory))


def _heads_backward(dy, x, wq, wk, wv, wo, head_gates, active_heads, num_heads, ctx, o, output_mask, biases,
                    flash_config, flash):
    """The backward of a gated attention whose flash backward is ``flash(cfg, dctx, drow, dq, dk, dv)`` (it fills
    ``dq, dk, dv`` [B*S, A*D]; ``cfg`` from ``flash_config``): the output projection's gradients, the pre-pass
    (gate gradient and ``Delta``), then the input projections'. ``biases``: which of (bq, bk, bv, bo) exist.
    Returns ``(dx, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, d_head_gates)`` as the backward ops do."""
    need_x, need_w, need_g = C.unpack_output_mask(output_mask)
    B, S, E = x.shape
    H = num_heads
    D = wq.shape[0] // H
    A = active_heads.numel()
    N = B * S
    dy2 = dy.reshape(N, E).to(x.dtype)
    # Zero-filled (scattered stores leave inactive heads at 0); dx is written later.
    dx, *dws, dgate = _grads_like((False, need_w, need_g), x, wq, wk, wv, wo, head_gates, torch.zeros, biases)
    if need_w and biases[3]:
        dws[7] = dy2.sum(0, dtype=torch.float32).to(wo.dtype)
    if A == 0 or N == 0 or not (need_x or need_w or need_g):
        return (x.new_zeros((B, S, E)) if need_x else dx), *dws, dgate
    x2 = x.reshape(N, E)
    # Output projection.
    dctx = torch.empty((N, A * D), dtype=x.dtype, device=x.device)
    C.gemm(dy2, wo, dctx, M=N, N=A * D, K=E, a_strides=dy2.stride(), b_strides=(wo.stride(0), wo.stride(1)),
           out_strides=dctx.stride(), idx=active_heads, gather=C.GATHER_BN, group=D)
    if need_w:
        dwo = dws[6]
        C.gemm(dy2, ctx, dwo, M=E, N=A * D, K=N, a_strides=(dy2.stride(1), dy2.stride(0)), b_strides=ctx.stride(),
               out_strides=dwo.stride(), idx=active_heads, gather=C.SCATTER_CN, group=D)
    # Gate gradient and Delta.
    cfg = flash_config(x.device, D, x.dtype, backward=True)
    drow = torch.empty((B * A, S), dtype=torch.float32, device=x.device)
    _attn_bwd_pre_kernel[(B * A, triton.cdiv(S, cfg["BLOCK_M"]))](
        dctx, o, drow, S, A, D, A * D, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    if need_g:
        dgate.index_copy_(0, active_heads, drow.view(B, A, S).sum((0, 2)).to(dgate.dtype))
    if not (need_x or need_w):
        return dx, *dws, dgate
    # Flash-attention backward.
    dq, dk, dv = (torch.empty((N, A * D), dtype=x.dtype, device=x.device) for _ in range(3))
    flash(cfg, dctx, drow, dq, dk, dv)
    # Input projections.
    dx32 = torch.empty((N, E), dtype=torch.float32, device=x.device) if need_x else None
    for i, (w, dproj) in enumerate(((wq, dq), (wk, dk), (wv, dv))):
        if need_x:
            C.gemm(dproj, w, dx32, M=N, N=E, K=A * D, a_strides=dproj.stride(),
                   b_strides=(w.stride(0), w.stride(1)), out_strides=dx32.stride(), idx=active_heads,
                   gather=C.GATHER_BK, group=D, accumulate=i > 0)
        if need_w:
            dw, db = dws[2 * i], dws[2 * i + 1]
            C.gemm(dproj, x2, dw, M=A * D, N=E, K=N, a_strides=(dproj.stride(1), dproj.stride(0)),
                   b_strides=x2.stride(), out_strides=dw.stride(), idx=active_heads, gather=C.SCATTER_CM,
                   group=D)
            if biases[i]:
                db.view(H, D).index_copy_(0, active_heads,
                                          dproj.sum(0, dtype=torch.float32).view(A, D).to(db.dtype))
    if need_x:
        dx = dx32.to(x.dtype).view(B, S, E)
    return dx, *dws, dgate


# ------------------------------------------------------------------------------------------ forward
@torch.library.custom_op("structprune::triton_gated_attention", mutates_args=())
@C.on_device_of_first_arg
def triton_gated_attention(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor,
                           bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor, wo: torch.Tensor,
                           bo: torch.Tensor, head_gates: torch.Tensor, active_heads: torch.Tensor,
                           key_bias: Optional[torch.Tensor], num_heads: int, save_for_backward: bool,
                           dropout_p: float = 0.0, seed: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor]:
    """Returns ``(y, q, k, v, ctx, o, stats)``: ``y`` [B, S, E] and the intermediates a backward needs
    (``q, k, v`` [B*S, A*D], gated ``ctx`` and ungated ``o`` [B*S, A*D], softmax ``stats`` [2, B*A, S] fp32:
    row max and log row sum), the latter empty unless ``save_for_backward``. ``dropout_p > 0``: dropout on the
    attention probabilities with the Philox stream of ``seed`` (see :func:`attention_dropout_scale`)."""
    B, S, E = x.shape
    D = wq.shape[0] // num_heads
    A = active_heads.numel()
    if A == 0 or B * S == 0:  # no active head: y is bo broadcast, nothing else runs
        return _no_head_outputs(x, bo, _saved_shapes(B, S, A, D, save_for_backward))
    saved = _project_qkv(x, ((wq, bq), (wk, bk), (wv, bv)), active_heads, D, save_for_backward)
    q, k, v, ctx, o, stats = saved
    cfg = C.flash_config(x.device, D, x.dtype, backward=False)
    kb = key_bias if key_bias is not None else ctx
    _attn_fwd_kernel[(B * A, triton.cdiv(S, cfg["BLOCK_M"]))](
        q, k, v, kb, head_gates, active_heads, ctx, o, stats,
        S, A, D, D ** -0.5, A * D, kb.stride(0) if key_bias is not None else 0,
        kb.stride(1) if key_bias is not None else 0, B * A * S, *_dropout_args(num_heads, dropout_p, seed),
        HAS_KB=key_bias is not None, STORE_O=save_for_backward, DOT=C.dot_mode(x.dtype),
        DROPOUT=dropout_p > 0, **cfg)
    return _project_out(x, wo, bo, active_heads, D, saved, save_for_backward)


@triton_gated_attention.register_fake
def _(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, save_for_backward,
      dropout_p=0.0, seed=0):
    B, S, E = x.shape
    D = wq.shape[0] // num_heads
    shapes = _saved_shapes(B, S, active_heads.shape[0], D, save_for_backward)
    return (x.new_empty((B, S, E)),) + _placeholders(x, shapes, torch.empty)


# ----------------------------------------------------------------------------------------- backward
@torch.library.custom_op("structprune::triton_gated_attention_backward", mutates_args=())
@C.on_device_of_first_arg
def triton_gated_attention_backward(dy: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                                    wv: torch.Tensor, wo: torch.Tensor, head_gates: torch.Tensor,
                                    active_heads: torch.Tensor, key_bias: Optional[torch.Tensor],
                                    num_heads: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    ctx: torch.Tensor, o: torch.Tensor, stats: torch.Tensor,
                                    output_mask: Optional[Sequence[bool]] = None, dropout_p: float = 0.0,
                                    seed: int = 0
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, d_head_gates)``, full-size, zero for inactive
    heads; those left out by ``output_mask`` (x, weights and biases, gates; None: all) are empty ``[0]``."""
    B, S, _ = x.shape
    D = wq.shape[0] // num_heads
    A = active_heads.numel()

    def flash(cfg, dctx, drow, dq, dk, dv):
        kb = key_bias if key_bias is not None else drow
        kb_strides = (kb.stride(0), kb.stride(1)) if key_bias is not None else (0, 0)
        common = (S, A, D, D ** -0.5, A * D, kb_strides[0], kb_strides[1], B * A * S,
                  *_dropout_args(num_heads, dropout_p, seed))
        meta = dict(HAS_KB=key_bias is not None, DOT=C.dot_mode(x.dtype), DROPOUT=dropout_p > 0, **cfg)
        _attn_bwd_dq_kernel[(B * A, triton.cdiv(S, cfg["BLOCK_M"]))](
            q, k, v, kb, head_gates, active_heads, dctx, stats, drow, dq, *common, **meta)
        _attn_bwd_dkdv_kernel[(B * A, triton.cdiv(S, cfg["BLOCK_N"]))](
            q, k, v, kb, head_gates, active_heads, dctx, stats, drow, dk, dv, *common, **meta)

    return _heads_backward(dy, x, wq, wk, wv, wo, head_gates, active_heads, num_heads, ctx, o, output_mask,
                           (True,) * 4, C.flash_config, flash)


@triton_gated_attention_backward.register_fake
def _(dy, x, wq, wk, wv, wo, head_gates, active_heads, key_bias, num_heads, q, k, v, ctx, o, stats,
      output_mask=None, dropout_p=0.0, seed=0):
    return tuple(_grads_like(C.unpack_output_mask(output_mask), x, wq, wk, wv, wo, head_gates, torch.empty))


def _setup_context(ctx, inputs, output):
    x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, save, dropout_p, seed = inputs
    ctx.unsaved = not save
    if not save:
        return
    ctx.num_heads = num_heads
    ctx.dropout = (dropout_p, seed)
    ctx.has_kb = key_bias is not None
    saved = [x, wq, wk, wv, wo, head_gates, active_heads, *output[1:]]
    if key_bias is not None:
        saved.append(key_bias)
    ctx.save_for_backward(*saved)


def _backward(ctx, dy, *_unused):
    if ctx.unsaved:
        raise RuntimeError("structprune::triton_gated_attention was called with save_for_backward=False; "
                           "call structprune._kernels.gated_attention, which sets it when a gradient is needed")
    saved = list(ctx.saved_tensors)
    key_bias = saved.pop() if ctx.has_kb else None
    x, wq, wk, wv, wo, head_gates, active_heads, q, k, v, c, o, stats = saved
    grads = torch.ops.structprune.triton_gated_attention_backward(
        dy, x, wq, wk, wv, wo, head_gates, active_heads, key_bias, ctx.num_heads, q, k, v, c, o, stats,
        output_mask=grad_output_mask(ctx.needs_input_grad, 8), dropout_p=ctx.dropout[0], seed=ctx.dropout[1])
    return masked_grads(grads, ctx.needs_input_grad)


triton_gated_attention.register_autograd(_backward, setup_context=_setup_context)
register_autocast("structprune::triton_gated_attention", keep=("head_gates", "key_bias"))


def gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads: int,
                    dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Gated self-attention over the active heads (see the module docstring); same result as
    ``structprune.ops.reference.gated_attention(x, ..., head_gates, num_heads, key_bias=key_bias)``.
    Differentiable in x, every weight and bias, and head_gates (not in key_bias). ``dropout_p > 0``: dropout
    on the attention probabilities, mask :func:`attention_dropout_scale` of ``seed``, regenerated in the backward."""
    check_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, key_bias=key_bias,
                           dropout_p=dropout_p, seed=seed, kernel=True)
    # the kernels read 1-D vectors with unit stride, and the index on x's device (the checks allow a CPU index)
    bq, bk, bv, bo, head_gates = (t.contiguous() for t in (bq, bk, bv, bo, head_gates))
    active_heads = active_heads.to(x.device).contiguous()
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates))
    if isinstance(seed, torch.Tensor):  # the seed a torch.compile graph draws: see triton_gated_attention_seeded
        return torch.ops.structprune.triton_gated_attention_seeded(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates,
                                                                   active_heads, key_bias, num_heads, save,
                                                                   float(dropout_p), seed)[0]
    return torch.ops.structprune.triton_gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates,
                                                        active_heads, key_bias, num_heads, save,
                                                        float(dropout_p), int(seed))[0]

