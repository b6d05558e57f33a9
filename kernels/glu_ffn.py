"""Gated GLU FFN over packed kept units: ``y = ((act(x W1[u]) * (x W1[u+I])) * gate[u])_u @ w2[:, u].T + b2``.

Unit ``u`` is the row pair ``(u, u + I)`` of ``w1`` [2I, E] (input half, gate half; ``b1`` likewise) and column
``u`` of ``w2`` [E, I]; only the ``K`` kept units (``kept_units``) are read, by pointer arithmetic, nothing copied.

Forward (two launches):
  1. :func:`_glu_fwd_kernel`: one loop over E with two accumulators, ``a = x @ w1[kept].T`` and
     ``g = x @ w1[I + kept].T`` (each ``x`` tile loaded once), epilogue ``+ b1``, both rounded to x's dtype (as the
     reference's ``F.linear``), ``h = act(a) * g * gate`` stored [N, K]; with a backward ahead, ``pre = [a | g]``
     [N, 2K] too;
  2. ``y = h @ w2[:, kept].T + b2``: the gathered GEMM of :mod:`._common` (``GATHER_BK``).
Backward:
  * :func:`_glu_bwd_kernel`: ``dh = dy @ w2[:, kept]`` and the epilogue ``da = dh * gate * g * act'(a)``,
    ``dg = dh * gate * act(a)`` stored as ``dpre = [da | dg]`` [N, 2K], with per-row-tile partial sums of
    ``dh * act(a) * g`` (gate grad) and of ``dpre`` (``b1`` grad), summed with ``torch.sum`` (no atomics);
  * with ``rows = [kept, I + kept]``: ``dx = dpre @ w1[rows]`` (one gathered GEMM), ``dw1[rows] = dpre.T @ x``
    (scattered store into a zero-filled [2I, E]), ``dw2[:, kept] = dy.T @ h`` (scattered columns);
  * ``db2 = dy.sum(0)`` and the scatter of the unit-sized partial sums are torch ops.
``K == 0``: the output is ``b2`` broadcast (0 without ``b2``) and no GEMM runs. Biases may be None. The backward op's
``output_mask`` (x, weights and biases, gates) skips what only masked-out gradients need, as the FFN's does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from structprune.ops.checks import check_glu_ffn_inputs
from structprune.ops.support import grad_output_mask, masked_grads, register_autocast

from . import _common as C
from .ffn import _fake_outputs, _grads_like, _no_unit_outputs, _project_down, _units_backward


@triton.jit
def _glu_fwd_kernel(x_ptr, w1_ptr, idx_ptr, b1_ptr, gate_ptr, h_ptr, pre_ptr,
                    M, N, E, gate_row_off, gate_bias_off,
                    stride_xm, stride_xe, stride_wr, stride_we, stride_hm, stride_hn, stride_pm, stride_pn,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``h[M, N] = act(a) * g * gate`` for the N kept units (see the module docstring); ``pre`` [M, 2N] = [a | g]
    when ``STORE_PRE``. ``gate_row_off`` = ``I * stride_wr``: where the gate half of ``w1`` starts."""
    _, offs_m, offs_n, mask_m, mask_n = C._tile(M, N, BLOCK_M, BLOCK_N)
    units = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
    x_rows = offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = units[None, :] * stride_wr
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, E, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < E
        xt = tl.load(x_ptr + x_rows + offs_k.to(tl.int64)[None, :] * stride_xe,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_ptrs = w1_ptr + offs_k.to(tl.int64)[:, None] * stride_we + w_cols
        mask_kn = mask_k[:, None] & mask_n[None, :]
        acc_a = C._dot(xt, tl.load(w_ptrs, mask=mask_kn, other=0.0), acc_a, DOT)
        acc_g = C._dot(xt, tl.load(w_ptrs + gate_row_off, mask=mask_kn, other=0.0), acc_g, DOT)
    if HAS_BIAS:
        acc_a += tl.load(b1_ptr + units, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b1_ptr + gate_bias_off + units, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    a = C.cast_ptr(acc_a, h_ptr)  # rounded to x's dtype, as F.linear gives them to the reference
    g = C.cast_ptr(acc_g, h_ptr)
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        p_ptrs = C._tile_ptrs(pre_ptr, offs_m, offs_n, stride_pm, stride_pn)
        tl.store(p_ptrs, a, mask=mask)
        tl.store(p_ptrs + N * stride_pn, g, mask=mask)
    gate = tl.load(gate_ptr + units, mask=mask_n, other=0.0).to(tl.float32)
    h = C._act_fwd(a.to(tl.float32), ACT) * g.to(tl.float32) * gate[None, :]
    tl.store(C._tile_ptrs(h_ptr, offs_m, offs_n, stride_hm, stride_hn), C.cast_ptr(h, h_ptr), mask=mask)


@triton.jit
def _glu_bwd_kernel(dy_ptr, w2_ptr, idx_ptr, pre_ptr, gate_ptr, dpre_ptr, pg_ptr, pb_ptr,
                    M, N, E,
                    stride_dym, stride_dye, stride_w2e, stride_w2i, stride_pm, stride_pn, stride_dm, stride_dn,
                    ACT: tl.constexpr, DOT: tl.constexpr,
                    STORE_D: tl.constexpr, STORE_PG: tl.constexpr, STORE_PB: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh = dy @ w2[:, kept]`` (M rows x N kept units) and the GLU backward epilogue: ``dpre = [da | dg]``
    [M, 2N]; for this row tile ``sum_rows(dh * act(a) * g)`` to ``pg[pid_m]`` [tiles, N] and ``sum_rows(dpre)`` to
    ``pb[pid_m]`` [tiles, 2N] (fp32); each only when its ``STORE_*`` is set."""
    pid_m, offs_m, offs_n, mask_n, mask, dh, gate = C._unit_grad_tile(
        dy_ptr, w2_ptr, idx_ptr, gate_ptr, M, N, E, stride_dym, stride_dye, stride_w2e, stride_w2i,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT)
    p_ptrs = C._tile_ptrs(pre_ptr, offs_m, offs_n, stride_pm, stride_pn)
    a = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(p_ptrs + N * stride_pn, mask=mask, other=0.0).to(tl.float32)
    act = C._act_fwd(a, ACT)
    if STORE_PG:
        # act(a) * g rounded as the reference's ungated activation, whose product with dh is the gate grad
        h0 = C.cast_ptr(act * g, pre_ptr).to(tl.float32)
        tl.store(pg_ptr + pid_m * N + offs_n, tl.sum(tl.where(mask, dh * h0, 0.0), axis=0), mask=mask_n)
    if STORE_D:
        dhg = dh * gate[None, :]
        da = tl.where(mask, dhg * g * C._act_bwd(a, ACT), 0.0)
        dg = tl.where(mask, dhg * act, 0.0)
        d_ptrs = C._tile_ptrs(dpre_ptr, offs_m, offs_n, stride_dm, stride_dn)
        tl.store(d_ptrs, C.cast_ptr(da, dpre_ptr), mask=mask)
        tl.store(d_ptrs + N * stride_dn, C.cast_ptr(dg, dpre_ptr), mask=mask)
        if STORE_PB:
            row = pb_ptr + pid_m * 2 * N + offs_n
            tl.store(row, tl.sum(da, axis=0), mask=mask_n)
            tl.store(row + N, tl.sum(dg, axis=0), mask=mask_n)


# ------------------------------------------------------------------------------------------ forward
@torch.library.custom_op("structprune::triton_gated_glu_ffn", mutates_args=())
@C.on_device_of_first_arg
def triton_gated_glu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                         b2: Optional[torch.Tensor], unit_gates: torch.Tensor, kept_units: torch.Tensor,
                         activation: str, save_for_backward: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, pre, h)``; ``pre`` [N, 2K] (both halves' pre-activations) and ``h`` [N, K] (the gated product)
    are the saved intermediates, empty unless ``save_for_backward``."""
    E = x.shape[-1]
    x2 = x.reshape(-1, E)
    N, K, I = x2.shape[0], kept_units.numel(), w1.shape[0] // 2
    if K == 0 or N == 0:  # nothing kept: y is b2 broadcast (or 0), no GEMM
        return _no_unit_outputs(x, b2, N, K, 2 * K, save_for_backward)
    h = torch.empty((N, K), dtype=x.dtype, device=x.device)
    pre = torch.empty((N, 2 * K), dtype=x.dtype, device=x.device) if save_for_backward else h
    cfg = C.glu_config(x.device, N, K, x.dtype)
    _glu_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_N"]))](
        x2, w1, kept_units, b1 if b1 is not None else h, unit_gates, h, pre, N, K, E, I * w1.stride(0),
        I * (b1.stride(0) if b1 is not None else 0), x2.stride(0), x2.stride(1), w1.stride(0), w1.stride(1),
        h.stride(0), h.stride(1), pre.stride(0), pre.stride(1),
        HAS_BIAS=b1 is not None, ACT=C.ACTIVATION_CODES[activation], STORE_PRE=save_for_backward,
        DOT=C.dot_mode(x.dtype), **cfg)
    return _project_down(x, h, w2, b2, kept_units, pre, save_for_backward)


@triton_gated_glu_ffn.register_fake
def _(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save_for_backward):
    return _fake_outputs(x, kept_units, 2, save_for_backward)


# ----------------------------------------------------------------------------------------- backward
@torch.library.custom_op("structprune::triton_gated_glu_ffn_backward", mutates_args=())
@C.on_device_of_first_arg
def triton_gated_glu_ffn_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                                  unit_gates: torch.Tensor, kept_units: torch.Tensor, pre: torch.Tensor,
                                  h: torch.Tensor, activation: str, has_b1: bool, has_b2: bool,
                                  output_mask: Optional[Sequence[bool]] = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    """Returns ``(dx, dw1, db1, dw2, db2, d_unit_gates)``, full-size, zero for pruned units; those left out by
    ``output_mask`` (x, weights and biases, gates; None: all) and the gradients of absent biases are empty [0]."""

    def epilogue(cfg, tiles_m, dy2, dpre, pg, pb, need_d, need_g, need_pb):
        N, K, E = dy2.shape[0], kept_units.numel(), x.shape[-1]
        _glu_bwd_kernel[(tiles_m, triton.cdiv(K, cfg["BLOCK_N"]))](
            dy2, w2, kept_units, pre, unit_gates, dpre, pg, pb, N, K, E,
            dy2.stride(0), dy2.stride(1), w2.stride(0), w2.stride(1), pre.stride(0), pre.stride(1),
            dpre.stride(0) if need_d else 0, dpre.stride(1) if need_d else 0, ACT=C.ACTIVATION_CODES[activation],
            DOT=C.dot_mode(x.dtype), STORE_D=need_d, STORE_PG=need_g, STORE_PB=need_pb, **cfg)

    rows = torch.cat([kept_units, kept_units + w1.shape[0] // 2])  # w1's rows of the kept units: input, gate half
    return _units_backward(dy, x, w1, w2, unit_gates, kept_units, h, output_mask, (has_b1, has_b2), rows, epilogue)


@triton_gated_glu_ffn_backward.register_fake
def _(dy, x, w1, w2, unit_gates, kept_units, pre, h, activation, has_b1, has_b2, output_mask=None):
    return tuple(_grads_like(C.unpack_output_mask(output_mask), x, w1, w2, unit_gates, torch.empty, (has_b1, has_b2)))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, unit_gates, kept_units, activation, save = inputs
    ctx.unsaved = not save
    if not save:
        return
    ctx.activation = activation
    ctx.biases = (b1 is not None, b2 is not None)
    ctx.save_for_backward(x, w1, w2, unit_gates, kept_units, output[1], output[2])


def _backward(ctx, dy, _dpre, _dh):
    if ctx.unsaved:
        raise RuntimeError("structprune::triton_gated_glu_ffn was called with save_for_backward=False; "
                           "call structprune._kernels.glu_ffn.gated_glu_ffn, which sets it when a gradient is needed")
    x, w1, w2, unit_gates, kept_units, pre, h = ctx.saved_tensors
    grads = torch.ops.structprune.triton_gated_glu_ffn_backward(
        dy, x, w1, w2, unit_gates, kept_units, pre, h, ctx.activation, *ctx.biases,
        grad_output_mask(ctx.needs_input_grad, 4))
    return masked_grads(grads, ctx.needs_input_grad)


triton_gated_glu_ffn.register_autograd(_backward, setup_context=_setup_context)
register_autocast("structprune::triton_gated_glu_ffn", keep=("unit_gates",))


def gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu") -> torch.Tensor:
    """Gated GLU FFN over kept units (see the module docstring); same result as
    :func:`structprune.ops.reference.gated_glu_ffn`. Differentiable in x, w1, b1, w2, b2 and unit_gates."""
    check_glu_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation, kernel=True)
    # the kernels read 1-D vectors with unit stride, and the index on x's device (the checks allow a CPU index)
    b1, b2 = (None if t is None else t.contiguous() for t in (b1, b2))
    unit_gates = unit_gates.contiguous()
    kept_units = kept_units.to(x.device).contiguous()
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, w1, b1, w2, b2, unit_gates))
    return torch.ops.structprune.triton_gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation,
                                                      save)[0]
