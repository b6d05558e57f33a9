"""Gated FFN: ``(act(x @ w1[kept].T + b1[kept]) * g[kept]) @ w2[:, kept].T + b2`` over kept units only.

Forward (two launches of the gathered GEMM in :mod:`._common`):
  1. ``h[N, K] = act(x @ w1[kept].T + b1[kept]) * gate[kept]``: the weight rows of kept units are read through
     the index list (``GATHER_BN``), bias + activation + gate are fused in the epilogue, which also stores the
     pre-activation when a backward will need it;
  2. ``y = h @ w2[:, kept].T + b2``: the kept columns of ``w2`` are the gathered reduction rows (``GATHER_BK``).
Backward (all Triton):
  * :func:`_ffn_bwd_act_kernel`: ``dh = dy @ w2[:, kept]`` with the epilogue ``da = dh * gate * act'(pre)``,
    and per-tile partial sums of ``dh * act(pre)`` (gate grad) and ``da`` (``b1`` grad), summed over tiles
    with ``torch.sum`` (deterministic; no atomics);
  * ``dx = da @ w1[kept]`` (gathered GEMM); ``dw1[kept] = da.T @ x`` and ``dw2[:, kept] = dy.T @ h`` with a
    scattered store into zero-filled full-size gradients (pruned rows/columns stay 0);
  * ``db2 = dy.sum(0)`` and the scatter of the unit-sized partial sums are plain torch ops.
``K == 0``: the output is ``b2`` broadcast and no GEMM runs.
The backward op's ``output_mask`` (x, weights and biases, gates) skips what only masked-out gradients need:
``dw1``, ``dw2`` and the ``b1`` partial sums without weights, ``da`` without x and weights, the gate partial
sums without gates; those outputs are empty ``[0]`` tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from structprune.ops.checks import check_ffn_inputs
from structprune.ops.support import grad_output_mask, grad_placeholders, masked_grads, register_autocast

from . import _common as C


@triton.jit
def _ffn_bwd_act_kernel(dy_ptr, w2_ptr, idx_ptr, pre_ptr, gate_ptr, da_ptr, pg_ptr, pb_ptr,
                        M, N, E,
                        stride_dym, stride_dye, stride_w2e, stride_w2i, stride_pm, stride_pn, stride_dam, stride_dan,
                        ACT: tl.constexpr, DOT: tl.constexpr,
                        STORE_DA: tl.constexpr, STORE_PG: tl.constexpr, STORE_PB: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh = dy @ w2[:, kept]`` (M rows x N kept units, reduction over E) and the activation-backward epilogue.

    Writes ``da = dh * gate * act'(pre)`` and, for this row tile, ``sum_rows(dh * act(pre))`` to ``pg[pid_m]``
    and ``sum_rows(da)`` to ``pb[pid_m]`` (both fp32 [num_row_tiles, N]); each only when its ``STORE_*`` is set.
    """
    pid_m, offs_m, offs_n, mask_n, mask, dh, g = C._unit_grad_tile(
        dy_ptr, w2_ptr, idx_ptr, gate_ptr, M, N, E, stride_dym, stride_dye, stride_w2e, stride_w2i,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT)
    pre = tl.load(C._tile_ptrs(pre_ptr, offs_m, offs_n, stride_pm, stride_pn), mask=mask, other=0.0).to(tl.float32)
    if STORE_PG:
        act = C._act_fwd(pre, ACT)
        # Round the activation like the forward stored it, so the gate grad matches h / gate.
        act = C.cast_ptr(act, da_ptr).to(tl.float32)
        pg = tl.sum(tl.where(mask, dh * act, 0.0), axis=0)
        tl.store(pg_ptr + pid_m * N + offs_n, pg, mask=mask_n)
    if STORE_DA:
        da = dh * g[None, :] * C._act_bwd(pre, ACT)
        da = tl.where(mask, da, 0.0)
        da_lo = C.cast_ptr(da, da_ptr)
        tl.store(C._tile_ptrs(da_ptr, offs_m, offs_n, stride_dam, stride_dan), da_lo, mask=mask)
        if STORE_PB:
            pb = tl.sum(da, axis=0)
            tl.store(pb_ptr + pid_m * N + offs_n, pb, mask=mask_n)


# -------------------------------------------------------- around the kernels (shared with .glu_ffn, whose pre is [a | g])
def _no_unit_outputs(x, b2, N, K, pre_cols, save):
    """The forward's ``(y, pre, h)`` with no kept unit (or no token): ``y`` is ``b2`` broadcast (0 without ``b2``);
    ``pre`` [N, pre_cols] and ``h`` [N, K] zeros when ``save``, else empty."""
    E = x.shape[-1]
    y = b2.expand(N, E).clone() if b2 is not None else x.new_zeros((N, E))
    pre = x.new_zeros((N, pre_cols)) if save else x.new_empty((0,))
    h = x.new_zeros((N, K)) if save else x.new_empty((0,))
    return y.reshape(x.shape), pre, h


def _project_down(x, h, w2, b2, kept_units, pre, save):
    """The forward's ``(y, pre, h)``: ``y = h @ w2[:, kept].T (+ b2)`` shaped like x (gathered GEMM over the kept
    columns of ``w2``), the saved ``pre`` and ``h`` unless ``save`` is off (then empty)."""
    N, K = h.shape
    E = x.shape[-1]
    y = torch.empty((N, E), dtype=x.dtype, device=x.device)
    C.gemm(h, w2, y, M=N, N=E, K=K, a_strides=h.stride(), b_strides=(w2.stride(1), w2.stride(0)),
           out_strides=y.stride(), idx=kept_units, gather=C.GATHER_BK, bias=b2)
    if not save:
        return y.reshape(x.shape), x.new_empty((0,)), x.new_empty((0,))
    return y.reshape(x.shape), pre, h


def _fake_outputs(x, kept_units, pre_per_unit, save):
    """Fake ``(y, pre, h)``: ``pre`` [N, pre_per_unit * K] and ``h`` [N, K] when ``save``, else empty."""
    E = x.shape[-1]
    N = x.numel() // E if E else 0
    K = kept_units.shape[0]
    if save:
        return x.new_empty(x.shape), x.new_empty((N, pre_per_unit * K)), x.new_empty((N, K))
    return x.new_empty(x.shape), x.new_empty((0,)), x.new_empty((0,))


def _grads_like(mask, x, w1, w2, unit_gates, factory, biases=(True, True)):
    """(dx, dw1, db1, dw2, db2, d_unit_gates): :func:`grad_placeholders`, the biases shaped from their weights
    ([0] for a bias absent in ``biases``: b1, b2)."""
    b1 = (w1, w1.shape[:1] if biases[0] else (0,))
    b2 = (w2, w2.shape[:1] if biases[1] else (0,))
    return list(grad_placeholders(mask, x, [w1, b1, w2, b2], unit_gates, factory))


def _units_backward(dy, x, w1, w2, unit_gates, kept_units, h, output_mask, biases, rows, epilogue):
    """The backward of a gated FFN whose first GEMM reads ``w1``'s rows ``rows`` and whose GEMM + activation-backward
    kernel is launched by ``epilogue(cfg, tiles_m, dy2, da, pg, pb, need_da, need_g, need_pb)``: it fills ``da``
    [N, R] (the gradient of the ``R = len(rows)`` pre-activations), the per-row-tile partial sums ``pg`` [tiles, K]
    (gate grad) and ``pb`` [tiles, R] (``b1`` grad), each when asked (else they stand for nothing); then
    ``dx = da @ w1[rows]``, ``dw1[rows] = da.T @ x``, ``dw2[:, kept] = dy.T @ h``. ``biases``: whether b1, b2
    exist. Returns ``(dx, dw1, db1, dw2, db2, d_unit_gates)`` as the backward ops do."""
    need_x, need_w, need_g = C.unpack_output_mask(output_mask)
    E = x.shape[-1]
    x2 = x.reshape(-1, E)
    dy2 = dy.reshape(-1, E).to(x.dtype)
    N, K, R = x2.shape[0], kept_units.numel(), rows.numel()
    # Zero-filled (scattered stores leave pruned units at 0); dx is written later.
    dx, dw1, db1, dw2, db2, dgate = _grads_like((False, need_w, need_g), x, w1, w2, unit_gates, torch.zeros, biases)
    if need_w and biases[1]:
        db2 = dy2.sum(0, dtype=torch.float32).to(w2.dtype)
    if K == 0 or N == 0 or not (need_x or need_w or need_g):
        if need_x:
            dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        return dx, dw1, db1, dw2, db2, dgate
    cfg = C.gemm_config(x.device, N, K, E, x.dtype)
    tiles_m = triton.cdiv(N, cfg["BLOCK_M"])
    need_da, need_pb = need_x or need_w, need_w and biases[0]
    dummy = dy2  # stands for the buffers the kernel does not write (their STORE_* off); x's dtype, as da's
    da = torch.empty((N, R), dtype=x.dtype, device=x.device) if need_da else dummy
    pg = torch.empty((tiles_m, K), dtype=torch.float32, device=x.device) if need_g else dummy
    pb = torch.empty((tiles_m, R), dtype=torch.float32, device=x.device) if need_pb else dummy
    epilogue(cfg, tiles_m, dy2, da, pg, pb, need_da, need_g, need_pb)
    if need_g:
        dgate.index_copy_(0, kept_units, pg.sum(0).to(dgate.dtype))
    if need_x:
        dx = torch.empty((N, E), dtype=x.dtype, device=x.device)
        C.gemm(da, w1, dx, M=N, N=E, K=R, a_strides=da.stride(), b_strides=(w1.stride(0), w1.stride(1)),
               out_strides=dx.stride(), idx=rows, gather=C.GATHER_BK)
        dx = dx.reshape(x.shape)
    if need_w:
        if need_pb:
            db1.index_copy_(0, rows, pb.sum(0).to(db1.dtype))
        C.gemm(da, x2, dw1, M=R, N=E, K=N, a_strides=(da.stride(1), da.stride(0)), b_strides=x2.stride(),
               out_strides=dw1.stride(), idx=rows, gather=C.SCATTER_CM)
        C.gemm(dy2, h, dw2, M=E, N=K, K=N, a_strides=(dy2.stride(1), dy2.stride(0)), b_strides=h.stride(),
               out_strides=dw2.stride(), idx=kept_units, gather=C.SCATTER_CN)
    return dx, dw1, db1, dw2, db2, dgate


# ------------------------------------------------------------------------------------------ forward
@torch.library.custom_op("structprune::triton_gated_ffn", mutates_args=())
@C.on_device_of_first_arg
def triton_gated_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     unit_gates: torch.Tensor, kept_units: torch.Tensor, activation: str,
                     save_for_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, pre, h)``; ``pre`` [N, K] (pre-activation) and ``h`` [N, K] (gated activation) are the
    saved intermediates, empty unless ``save_for_backward``."""
    E = x.shape[-1]
    x2 = x.reshape(-1, E)
    N, K = x2.shape[0], kept_units.numel()
    if K == 0 or N == 0:  # nothing kept: y is b2 broadcast, no GEMM
        return _no_unit_outputs(x, b2, N, K, K, save_for_backward)
    act = C.ACTIVATION_CODES[activation]
    h = torch.empty((N, K), dtype=x.dtype, device=x.device)
    pre = torch.empty((N, K), dtype=x.dtype, device=x.device) if save_for_backward else None
    C.gemm(x2, w1, h, M=N, N=K, K=E, a_strides=x2.stride(), b_strides=(w1.stride(1), w1.stride(0)),
           out_strides=h.stride(), idx=kept_units, gather=C.GATHER_BN, bias=b1, gate=unit_gates, act=act, pre=pre)
    return _project_down(x, h, w2, b2, kept_units, pre, save_for_backward)


@triton_gated_ffn.register_fake
def _(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save_for_backward):
    return _fake_outputs(x, kept_units, 1, save_for_backward)


# ----------------------------------------------------------------------------------------- backward
@torch.library.custom_op("structprune::triton_gated_ffn_backward", mutates_args=())
@C.on_device_of_first_arg
def triton_gated_ffn_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                              unit_gates: torch.Tensor, kept_units: torch.Tensor, pre: torch.Tensor,
                              h: torch.Tensor, activation: str, output_mask: Optional[Sequence[bool]] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """Returns ``(dx, dw1, db1, dw2, db2, d_unit_gates)``, full-size, zero for pruned units; those left out by
    ``output_mask`` (x, weights and biases, gates; None: all) are empty ``[0]``."""

    def epilogue(cfg, tiles_m, dy2, da, pg, pb, need_da, need_g, need_pb):
        N, K, E = dy2.shape[0], kept_units.numel(), x.shape[-1]
        _ffn_bwd_act_kernel[(tiles_m, triton.cdiv(K, cfg["BLOCK_N"]))](
            dy2, w2, kept_units, pre, unit_gates, da, pg, pb, N, K, E,
            dy2.stride(0), dy2.stride(1), w2.stride(0), w2.stride(1), pre.stride(0), pre.stride(1),
            K, 1, ACT=C.ACTIVATION_CODES[activation], DOT=C.dot_mode(x.dtype),
            STORE_DA=need_da, STORE_PG=need_g, STORE_PB=need_pb,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])

    return _units_backward(dy, x, w1, w2, unit_gates, kept_units, h, output_mask, (True, True), kept_units, epilogue)


@triton_gated_ffn_backward.register_fake
def _(dy, x, w1, w2, unit_gates, kept_units, pre, h, activation, output_mask=None):
    return tuple(_grads_like(C.unpack_output_mask(output_mask), x, w1, w2, unit_gates, torch.empty))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, unit_gates, kept_units, activation, save = inputs
    _, pre, h = output
    if not save:
        ctx.unsaved = True
        return
    ctx.unsaved = False
    ctx.activation = activation
    ctx.save_for_backward(x, w1, w2, unit_gates, kept_units, pre, h)


def _backward(ctx, dy, _dpre, _dh):
    if ctx.unsaved:
        raise RuntimeError("structprune::triton_gated_ffn was called with save_for_backward=False; "
                           "call structprune._kernels.gated_ffn, which sets it when a gradient is needed")
    x, w1, w2, unit_gates, kept_units, pre, h = ctx.saved_tensors
    grads = torch.ops.structprune.triton_gated_ffn_backward(
        dy, x, w1, w2, unit_gates, kept_units, pre, h, ctx.activation, grad_output_mask(ctx.needs_input_grad, 4))
    return masked_grads(grads, ctx.needs_input_grad)


triton_gated_ffn.register_autograd(_backward, setup_context=_setup_context)
register_autocast("structprune::triton_gated_ffn", keep=("unit_gates",))


def gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu") -> torch.Tensor:
    """Gated FFN over kept units (see the module docstring); same result as
    :func:`structprune.ops.reference.gated_ffn`. Differentiable in x, w1, b1, w2, b2 and unit_gates."""
    check_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation, kernel=True)
    # the kernels read 1-D vectors with unit stride, and the index on x's device (the checks allow a CPU index)
    b1, b2, unit_gates = (t.contiguous() for t in (b1, b2, unit_gates))
    kept_units = kept_units.to(x.device).contiguous()
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2, unit_gates))
    return torch.ops.structprune.triton_gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save)[0]
