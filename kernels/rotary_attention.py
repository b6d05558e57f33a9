"""Gated rotary / sliding-window self-attention over active heads (ModernBERT's): :mod:`.attention` with rotary
positions applied in the flash kernels' prologue and a band ``|q - k| <= window`` that bounds the blocks visited.

Forward:
  1. ``q/k/v[N, A*D] = x @ w[rows].T (+ b[rows])`` for the ``A`` active heads: the gathered GEMM of :mod:`._common`
     (``GATHER_BN``, ``GROUP = D``), as in :mod:`.attention`; biases may be None.
  2. :func:`_rot_fwd_kernel`: flash attention whose prologue rotates each q and k tile as it is loaded (HF's layout:
     the two halves of a head rotate together, ``r1 = t1 c1 - t2 s1``, ``r2 = t2 c2 + t1 s2`` in fp32, rounded to
     x's dtype like the reference's ``apply_rotary``), so the scores are ``r1_q r1_k^T + r2_q r2_k^T``. With a
     window, query block ``[m0, m0 + BLOCK_M)`` visits only the key blocks meeting ``[m0 - w, m0 + BLOCK_M + w)``:
     a local layer does ``O(S * w)`` work, not ``O(S^2)``. Keys out of the band or past ``S`` score -inf, padded
     keys get ``key_bias`` (finite: every query's band holds its own key, so no row is all -inf). Epilogue: the
     head's gate, the ungated context and the softmax row statistics when a backward needs them.
  3. ``y = ctx @ wo[:, cols].T (+ bo)``: gathered GEMM over the active columns of ``wo``.
Backward: ``dctx``, ``dwo``, ``dbo`` and ``Delta`` as in :mod:`.attention` (its pre-pass kernel); then
:func:`_rot_bwd_dq_kernel` over query blocks (the same key band) and :func:`_rot_bwd_dkdv_kernel` over key blocks
(the query band ``[n0 - w, n0 + BLOCK_N + w)``), both recomputing the rotated tiles and rotating the gradients of
the rotated q / k back (``dt1 = d1 c1 + d2 s2``, ``dt2 = d2 c2 - d1 s1``) before they are stored; then the input
projections' gradients as in :mod:`.attention`. ``A == 0``: the output is ``bo`` (or 0), no kernel runs. No dropout
(the dispatcher gives rotary attention with dropout to the reference).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from structprune.ops.checks import check_rotary_attention_inputs
from structprune.ops.support import grad_output_mask, masked_grads, register_autocast

from . import _common as C, _flash as FL
from .attention import (_grads_like, _heads_backward, _no_head_outputs, _placeholders, _project_out, _project_qkv,
                        _saved_shapes)


@triton.jit
def _tile_halves(ptr, base, offs, mask_r, offs_h, mask_h, HALF, stride_row):
    """The two halves [R, BLOCK_H] of rows ``offs`` of one head."""
    p = ptr + FL.rows(base, offs, stride_row, offs_h)
    m = mask_r[:, None] & mask_h[None, :]
    return tl.load(p, mask=m, other=0.0), tl.load(p + HALF, mask=m, other=0.0)


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, cs_base, offs, mask_r, offs_h, mask_h, HALF, stride_cs):
    """fp32 (c1, c2, s1, s2): the halves of the cos and sin rows of positions ``offs``."""
    p = FL.rows(cs_base, offs, stride_cs, offs_h)
    m = mask_r[:, None] & mask_h[None, :]
    c1 = tl.load(cos_ptr + p, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + p + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + p, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + p + HALF, mask=m, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rotated(ptr, cos_ptr, sin_ptr, base, cs_base, offs, mask_r, offs_h, mask_h, HALF, stride_row, stride_cs):
    """The rotated halves of rows ``offs`` of one head, computed in fp32 and rounded to the tensor's dtype."""
    t1, t2 = _tile_halves(ptr, base, offs, mask_r, offs_h, mask_h, HALF, stride_row)
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, cs_base, offs, mask_r, offs_h, mask_h, HALF, stride_cs)
    a, b = t1.to(tl.float32), t2.to(tl.float32)
    return C.cast_like(a * c1 - b * s1, t1), C.cast_like(b * c2 + a * s2, t1)


@triton.jit
def _store_unrotated(ptr, d1, d2, cos_ptr, sin_ptr, base, cs_base, offs, mask_r, offs_h, mask_h, HALF, stride_row,
                     stride_cs, scale):
    """Store the gradient of the un-rotated rows from ``(d1, d2)``, that of the rotated halves (times ``scale``)."""
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, cs_base, offs, mask_r, offs_h, mask_h, HALF, stride_cs)
    p = ptr + FL.rows(base, offs, stride_row, offs_h)
    m = mask_r[:, None] & mask_h[None, :]
    tl.store(p, C.cast_ptr((d1 * c1 + d2 * s2) * scale, ptr), mask=m)
    tl.store(p + HALF, C.cast_ptr((d2 * c2 - d1 * s1) * scale, ptr), mask=m)


@triton.jit
def _band(start, size, S, WINDOW, BLOCK: tl.constexpr, BANDED: tl.constexpr):
    """``[lo, hi)``: the positions within ``WINDOW`` of ``[start, start + size)``, ``lo`` aligned to ``BLOCK``."""
    if BANDED:
        lo = tl.maximum(start - WINDOW, 0) // BLOCK * BLOCK
        hi = tl.minimum(start + size + WINDOW, S)
    else:
        lo = 0
        hi = S
    return lo, hi


@triton.jit
def _scores(q1, q2, k1, k2, kb_ptrs, offs_m, offs_n, mask_n, sm_scale, WINDOW, HAS_KB: tl.constexpr,
            BANDED: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 ``(r1_q r1_k^T + r2_q r2_k^T) * scale + key_bias``; keys past the sequence or out of the band: -inf."""
    s = C._dot(q2, tl.trans(k2), FL.dot_t(q1, k1, DOT, BLOCK_M, BLOCK_N), DOT) * sm_scale
    if HAS_KB:
        s += tl.load(kb_ptrs, mask=mask_n, other=0.0)[None, :]
    keep = mask_n[None, :]
    if BANDED:
        keep = keep & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= WINDOW)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _rotated_kv(k_ptr, v_ptr, cos_ptr, sin_ptr, base, cs_base, offs_n, mask_n, offs_h, mask_h, offs_d, mask_d, HALF,
                stride_row, stride_cs):
    """``(k1, k2, v, tile_n, mask_nd)``: the rotated halves of keys ``offs_n`` of one head and their values."""
    k1, k2 = _rotated(k_ptr, cos_ptr, sin_ptr, base, cs_base, offs_n, mask_n, offs_h, mask_h, HALF, stride_row,
                      stride_cs)
    tile_n = FL.rows(base, offs_n, stride_row, offs_d)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    return k1, k2, tl.load(v_ptr + tile_n, mask=mask_nd, other=0.0), tile_n, mask_nd


@triton.jit
def _key_block(q1, q2, k_ptr, v_ptr, cos_ptr, sin_ptr, kb_row, base, cs_base, n0, offs_m, offs_h, mask_h, offs_d,
               mask_d, S, HALF, WINDOW, sm_scale, stride_row, stride_cs, stride_kbs, HAS_KB: tl.constexpr,
               BANDED: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``n0 .. n0 + BLOCK_N`` of the head, rotated, their values, and the scores of the rotated queries
    ``(q1, q2)`` of rows ``offs_m`` against them: ``(k1, k2, v, s)``."""
    offs_n, mask_n = FL.span(n0, BLOCK_N, S)
    k1, k2, v, _, _ = _rotated_kv(k_ptr, v_ptr, cos_ptr, sin_ptr, base, cs_base, offs_n, mask_n, offs_h, mask_h, offs_d,
                                  mask_d, HALF, stride_row, stride_cs)
    s = _scores(q1, q2, k1, k2, kb_row + offs_n * stride_kbs, offs_m, offs_n, mask_n, sm_scale, WINDOW, HAS_KB,
                BANDED, DOT, BLOCK_M, BLOCK_N)
    return k1, k2, v, s


@triton.jit
def _rot_fwd_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kb_ptr, gate_ptr, act_ptr, ctx_ptr, o_ptr, stats_ptr,
                    S, A, D, HALF, WINDOW, sm_scale, stride_row, stride_cb, stride_cs, stride_kbb, stride_kbs,
                    stats_plane,
                    HAS_KB: tl.constexpr, BANDED: tl.constexpr, STORE_O: tl.constexpr, DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_bh, b, a, base, offs_m, mask_m, offs_d, mask_d = FL.head_block(A, S, D, stride_row, BLOCK_M, BLOCK_D)
    cs_base = b.to(tl.int64) * stride_cb
    offs_h, mask_h = FL.span(0, BLOCK_H, HALF)
    q1, q2 = _rotated(q_ptr, cos_ptr, sin_ptr, base, cs_base, offs_m, mask_m, offs_h, mask_h, HALF, stride_row,
                      stride_cs)
    kb_row = kb_ptr + b.to(tl.int64) * stride_kbb
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _band(tl.program_id(1) * BLOCK_M, BLOCK_M, S, WINDOW, BLOCK_N, BANDED)
    for n0 in range(lo, hi, BLOCK_N):
        k1, k2, v, s = _key_block(q1, q2, k_ptr, v_ptr, cos_ptr, sin_ptr, kb_row, base, cs_base, n0, offs_m, offs_h,
                                  mask_h, offs_d, mask_d, S, HALF, WINDOW, sm_scale, stride_row, stride_cs, stride_kbs,
                                  HAS_KB, BANDED, DOT, BLOCK_M, BLOCK_N)
        m_new, alpha, p, l_i = FL.softmax_step(m_i, l_i, s, True)
        acc = C._dot(C.cast_like(p, v), v, acc * alpha[:, None], DOT)
        m_i = m_new
    FL.store_fwd(acc, m_i, l_i, FL.head_gate(gate_ptr, act_ptr, a), ctx_ptr, o_ptr, stats_ptr,
                FL.rows(base, offs_m, stride_row, offs_d), mask_m[:, None] & mask_d[None, :], pid_bh.to(tl.int64) * S,
                offs_m, mask_m, stats_plane, STORE_O)


@triton.jit
def _rot_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kb_ptr, gate_ptr, act_ptr, dctx_ptr, stats_ptr,
                       drow_ptr, dq_ptr,
                       S, A, D, HALF, WINDOW, sm_scale, stride_row, stride_cb, stride_cs, stride_kbb, stride_kbs,
                       stats_plane,
                       HAS_KB: tl.constexpr, BANDED: tl.constexpr, DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_bh, b, a, base, offs_m, mask_m, offs_d, mask_d = FL.head_block(A, S, D, stride_row, BLOCK_M, BLOCK_D)
    cs_base = b.to(tl.int64) * stride_cb
    offs_h, mask_h = FL.span(0, BLOCK_H, HALF)
    q1, q2 = _rotated(q_ptr, cos_ptr, sin_ptr, base, cs_base, offs_m, mask_m, offs_h, mask_h, HALF, stride_row,
                      stride_cs)
    do, m_i, logl, delta = FL.gated_grad_rows(dctx_ptr, stats_ptr, drow_ptr, FL.head_gate(gate_ptr, act_ptr, a),
                                             FL.rows(base, offs_m, stride_row, offs_d), mask_m[:, None] & mask_d[None, :],
                                             pid_bh.to(tl.int64) * S, offs_m, mask_m, stats_plane, q1)
    kb_row = kb_ptr + b.to(tl.int64) * stride_kbb
    dq1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    lo, hi = _band(tl.program_id(1) * BLOCK_M, BLOCK_M, S, WINDOW, BLOCK_N, BANDED)
    for n0 in range(lo, hi, BLOCK_N):
        k1, k2, v, s = _key_block(q1, q2, k_ptr, v_ptr, cos_ptr, sin_ptr, kb_row, base, cs_base, n0, offs_m, offs_h,
                                  mask_h, offs_d, mask_d, S, HALF, WINDOW, sm_scale, stride_row, stride_cs, stride_kbs,
                                  HAS_KB, BANDED, DOT, BLOCK_M, BLOCK_N)
        p = tl.exp((s - m_i[:, None]) - logl[:, None])
        dp = FL.dot_t(do, v, DOT, BLOCK_M, BLOCK_N)
        ds = C.cast_like(p * (dp - delta[:, None]), k1)
        dq1 = C._dot(ds, k1, dq1, DOT)
        dq2 = C._dot(ds, k2, dq2, DOT)
    _store_unrotated(dq_ptr, dq1, dq2, cos_ptr, sin_ptr, base, cs_base, offs_m, mask_m, offs_h, mask_h, HALF,
                     stride_row, stride_cs, sm_scale)


@triton.jit
def _rot_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kb_ptr, gate_ptr, act_ptr, dctx_ptr, stats_ptr,
                         drow_ptr, dk_ptr, dv_ptr,
                         S, A, D, HALF, WINDOW, sm_scale, stride_row, stride_cb, stride_cs, stride_kbb, stride_kbs,
                         stats_plane,
                         HAS_KB: tl.constexpr, BANDED: tl.constexpr, DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    pid_bh, b, a, base, offs_n, mask_n, offs_d, mask_d = FL.head_block(A, S, D, stride_row, BLOCK_N, BLOCK_D)
    cs_base = b.to(tl.int64) * stride_cb
    offs_h, mask_h = FL.span(0, BLOCK_H, HALF)
    k1, k2, v, tile_n, mask_nd = _rotated_kv(k_ptr, v_ptr, cos_ptr, sin_ptr, base, cs_base, offs_n, mask_n, offs_h,
                                             mask_h, offs_d, mask_d, HALF, stride_row, stride_cs)
    g = FL.head_gate(gate_ptr, act_ptr, a)
    kb_ptrs = kb_ptr + b.to(tl.int64) * stride_kbb + offs_n * stride_kbs
    dk1 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dk2 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo, hi = _band(tl.program_id(1) * BLOCK_N, BLOCK_N, S, WINDOW, BLOCK_M, BANDED)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m, mask_m = FL.span(m0, BLOCK_M, S)
        q1, q2 = _rotated(q_ptr, cos_ptr, sin_ptr, base, cs_base, offs_m, mask_m, offs_h, mask_h, HALF, stride_row,
                          stride_cs)
        do, m_i, logl, delta = FL.gated_grad_rows(dctx_ptr, stats_ptr, drow_ptr, g, FL.rows(base, offs_m, stride_row,
                                                                                          offs_d),
                                                 mask_m[:, None] & mask_d[None, :], pid_bh.to(tl.int64) * S, offs_m,
                                                 mask_m, stats_plane, k1)
        s = _scores(q1, q2, k1, k2, kb_ptrs, offs_m, offs_n, mask_n, sm_scale, WINDOW, HAS_KB, BANDED, DOT,
                    BLOCK_M, BLOCK_N)
        p = tl.where(mask_m[:, None], tl.exp((s - m_i[:, None]) - logl[:, None]), 0.0)
        dv = C._dot(tl.trans(C.cast_like(p, k1)), do, dv, DOT)
        dp = FL.dot_t(do, v, DOT, BLOCK_M, BLOCK_N)
        ds = tl.trans(C.cast_like(p * (dp - delta[:, None]), k1))
        dk1 = C._dot(ds, q1, dk1, DOT)
        dk2 = C._dot(ds, q2, dk2, DOT)
    _store_unrotated(dk_ptr, dk1, dk2, cos_ptr, sin_ptr, base, cs_base, offs_n, mask_n, offs_h, mask_h, HALF,
                     stride_row, stride_cs, sm_scale)
    tl.store(dv_ptr + tile_n, C.cast_ptr(dv, dv_ptr), mask=mask_nd)


def _flash_args(B, S, A, D, window, cos, key_bias):
    """The scalar arguments shared by the three flash kernels, and the constexprs other than the config."""
    banded = 0 <= window < S - 1  # a window reaching every key is no band
    kb_strides = (key_bias.stride(0), key_bias.stride(1)) if key_bias is not None else (0, 0)
    args = (S, A, D, D // 2, max(window, 0), D ** -0.5, A * D, cos.stride(0) if cos.shape[0] > 1 else 0,
            cos.stride(1), *kb_strides, B * A * S)
    return args, dict(HAS_KB=key_bias is not None, BANDED=banded)


def _block_h(cfg, D):
    return max(16, triton.next_power_of_2(D // 2)) if cfg["BLOCK_D"] >= 16 else triton.next_power_of_2(D // 2)


# ------------------------------------------------------------------------------------------ forward
@torch.library.custom_op("structprune::triton_gated_rotary_attention", mutates_args=())
@C.on_device_of_first_arg
def triton_gated_rotary_attention(x: torch.Tensor, wq: torch.Tensor, bq: Optional[torch.Tensor], wk: torch.Tensor,
                                  bk: Optional[torch.Tensor], wv: torch.Tensor, bv: Optional[torch.Tensor],
                                  wo: torch.Tensor, bo: Optional[torch.Tensor], head_gates: torch.Tensor,
                                  active_heads: torch.Tensor, key_bias: Optional[torch.Tensor], cos: torch.Tensor,
                                  sin: torch.Tensor, window: int, num_heads: int, save_for_backward: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor]:
    """Returns ``(y, q, k, v, ctx, o, stats)`` as :func:`.attention.triton_gated_attention` (q and k un-rotated:
    the kernels rotate them as they load them); ``cos`` / ``sin`` [1 or B, S, D] contiguous, of one shape."""
    B, S, E = x.shape
    D = wq.shape[0] // num_heads
    A = active_heads.numel()
    if A == 0 or B * S == 0:  # no active head: y is bo broadcast (or 0), nothing else runs
        return _no_head_outputs(x, bo, _saved_shapes(B, S, A, D, save_for_backward))
    saved = _project_qkv(x, ((wq, bq), (wk, bk), (wv, bv)), active_heads, D, save_for_backward)
    q, k, v, ctx, o, stats = saved
    cfg = C.rotary_flash_config(x.device, D, x.dtype, backward=False)
    args, flags = _flash_args(B, S, A, D, window, cos, key_bias)
    _rot_fwd_kernel[(B * A, triton.cdiv(S, cfg["BLOCK_M"]))](
        q, k, v, cos, sin, key_bias if key_bias is not None else ctx, head_gates, active_heads, ctx, o, stats,
        *args, STORE_O=save_for_backward, DOT=C.dot_mode(x.dtype), BLOCK_H=_block_h(cfg, D), **flags, **cfg)
    return _project_out(x, wo, bo, active_heads, D, saved, save_for_backward)


@triton_gated_rotary_attention.register_fake
def _(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, cos, sin, window, num_heads,
      save_for_backward):
    B, S, E = x.shape
    shapes = _saved_shapes(B, S, active_heads.shape[0], wq.shape[0] // num_heads, save_for_backward)
    return (x.new_empty((B, S, E)),) + _placeholders(x, shapes, torch.empty)


# ----------------------------------------------------------------------------------------- backward
@torch.library.custom_op("structprune::triton_gated_rotary_attention_backward", mutates_args=())
@C.on_device_of_first_arg
def triton_gated_rotary_attention_backward(
        dy: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
        head_gates: torch.Tensor, active_heads: torch.Tensor, key_bias: Optional[torch.Tensor], cos: torch.Tensor,
        sin: torch.Tensor, window: int, num_heads: int, biases: Sequence[bool], q: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor, ctx: torch.Tensor, o: torch.Tensor, stats: torch.Tensor,
        output_mask: Optional[Sequence[bool]] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, d_head_gates)``, full-size, zero for inactive heads;
    those left out by ``output_mask`` and the gradients of the biases absent in ``biases`` (bq, bk, bv, bo) are [0]."""
    B, S, _ = x.shape
    D, A = wq.shape[0] // num_heads, active_heads.numel()

    def flash(cfg, dctx, drow, dq, dk, dv):
        args, flags = _flash_args(B, S, A, D, window, cos, key_bias)
        kb = key_bias if key_bias is not None else drow
        meta = dict(DOT=C.dot_mode(x.dtype), BLOCK_H=_block_h(cfg, D), **flags, **cfg)
        _rot_bwd_dq_kernel[(B * A, triton.cdiv(S, cfg["BLOCK_M"]))](
            q, k, v, cos, sin, kb, head_gates, active_heads, dctx, stats, drow, dq, *args, **meta)
        _rot_bwd_dkdv_kernel[(B * A, triton.cdiv(S, cfg["BLOCK_N"]))](
            q, k, v, cos, sin, kb, head_gates, active_heads, dctx, stats, drow, dk, dv, *args, **meta)

    return _heads_backward(dy, x, wq, wk, wv, wo, head_gates, active_heads, num_heads, ctx, o, output_mask, biases,
                           C.rotary_flash_config, flash)


@triton_gated_rotary_attention_backward.register_fake
def _(dy, x, wq, wk, wv, wo, head_gates, active_heads, key_bias, cos, sin, window, num_heads, biases, q, k, v, ctx,
      o, stats, output_mask=None):
    return tuple(_grads_like(C.unpack_output_mask(output_mask), x, wq, wk, wv, wo, head_gates, torch.empty, biases))


def _setup_context(ctx, inputs, output):
    x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, cos, sin, window, num_heads, save = inputs
    ctx.unsaved = not save
    if not save:
        return
    ctx.args = (window, num_heads, [b is not None for b in (bq, bk, bv, bo)])
    ctx.has_kb = key_bias is not None
    saved = [x, wq, wk, wv, wo, head_gates, active_heads, cos, sin, *output[1:]]
    ctx.save_for_backward(*saved, *([key_bias] if key_bias is not None else []))


def _backward(ctx, dy, *_unused):
    if ctx.unsaved:
        raise RuntimeError("structprune::triton_gated_rotary_attention was called with save_for_backward=False; call "
                           "structprune._kernels.rotary_attention.gated_rotary_attention, which sets it when needed")
    saved = list(ctx.saved_tensors)
    key_bias = saved.pop() if ctx.has_kb else None
    x, wq, wk, wv, wo, head_gates, active_heads, cos, sin, q, k, v, c, o, stats = saved
    grads = torch.ops.structprune.triton_gated_rotary_attention_backward(
        dy, x, wq, wk, wv, wo, head_gates, active_heads, key_bias, cos, sin, *ctx.args, q, k, v, c, o, stats,
        output_mask=grad_output_mask(ctx.needs_input_grad, 8))
    return masked_grads(grads, ctx.needs_input_grad)


triton_gated_rotary_attention.register_autograd(_backward, setup_context=_setup_context)
register_autocast("structprune::triton_gated_rotary_attention", keep=("head_gates", "key_bias", "cos", "sin"))


def gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, cos, sin,
                           window: int, num_heads: int) -> torch.Tensor:
    """Gated rotary / sliding-window attention over the active heads (see the module docstring); same result as
    :func:`structprune.ops.reference.gated_rotary_attention` with the mask ``banded_key_mask(key_bias, S, window)``.
    Differentiable in x, every weight and bias (which may be None) and head_gates."""
    check_rotary_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, cos, sin,
                                  window, key_bias=key_bias, kernel=True)
    bq, bk, bv, bo = (None if t is None else t.contiguous() for t in (bq, bk, bv, bo))
    head_gates = head_gates.contiguous()
    active_heads = active_heads.to(x.device).contiguous()
    cos, sin = (t.contiguous() for t in torch.broadcast_tensors(cos, sin))  # one shape: the kernels share strides
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates))
    return torch.ops.structprune.triton_gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates,
                                                               active_heads, key_bias, cos, sin, int(window),
                                                               int(num_heads), save)[0]
