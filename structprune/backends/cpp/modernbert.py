"""The "cpp" backend's ops for ModernBERT's layers: the GLU FFN (a C++ op on packed kept units) and rotary /
sliding-window attention (C++ kernels for CPU inference, ATen ops on the kept heads' weight slices otherwise).

``gated_glu_ffn`` runs ``torch.ops.structprune.cpp_gated_glu_ffn`` (``csrc/glu_ffn.cpp``): the kept units' row pairs
``(u, u + I)`` of ``w1`` are packed into one ``[2K, E]`` matrix and the kept columns of ``w2`` (gated on the CPU)
into ``[E, K]``, once per mask or weight change (the pack cache of :mod:`structprune.backends.cpp.build`), so a
call costs two GEMMs over the kept units; its backward op ``cpp_gated_glu_ffn_backward`` takes the same
``output_mask`` as the other backward ops and returns zero rows / columns / gate gradients for pruned units. CPU
only so far: on CUDA the backend refuses the GLU FFN (``extra_reasons``) and the dispatcher falls back.

``gated_rotary_attention`` projects with the kept heads' rows of ``wq``/``wk``/``wv`` (one GEMM; the kept heads'
weights gathered by :mod:`.packing`, cached for CPU inference), applies the rotary positions to q and k in fp32 like
the reference (for CPU inference the C++ kernel ``cpp_rotary_qk``, one pass over the projection), and runs
:func:`banded_attention` over the kept heads: ATen's SDPA for a global layer; for a local one, in CPU inference, the
C++ kernel ``cpp_banded_attention`` (``csrc/cpu/modernbert_cpu.cpp``: each query visits only its band's keys, so a
local layer does ``O(S * window)`` work), with gradients one masked SDPA. The gates scale the kept columns of
``wo``. Pruned heads cost nothing, and their weights' and gates' gradients are 0 (autograd through ATen ops).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from structprune.backends.cpp.build import _require
from structprune.ops.checks import check_glu_ffn_inputs, check_rotary_attention_inputs
from structprune.ops.reference import banded_key_mask
from structprune.backends.cpp.autograd import ffn_autograd
from structprune.backends.cpp.packing import pack_heads
from structprune.ops.support import OpInputs, register_autocast

__all__ = ["gated_glu_ffn", "gated_rotary_attention", "extra_reasons", "register"]


def gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """Gated GLU FFN, equal to :func:`structprune.ops.reference.gated_glu_ffn` over the kept units (pruned units'
    gate gradient: 0). Biases may be None; ``x`` may be [..., E]. Keeps the pre-activations of both halves and
    ``act(a) * g`` for the backward when a gradient is needed."""
    _require()
    check_glu_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation, kernel=True)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, w1, b1, w2, b2, unit_gates))
    x3 = x if x.dim() == 3 else x.reshape(1, math.prod(x.shape[:-1]), x.shape[-1])
    y = torch.ops.structprune.cpp_gated_glu_ffn(x3, w1, b1, w2, b2, unit_gates, kept_units, activation, save)[0]
    return y if x.dim() == 3 else y.reshape(x.shape)


def gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, cos, sin,
                           window: int, num_heads: int):
    """Rotary / sliding-window gated attention over the kept heads ``active_heads``, equal to
    :func:`structprune.ops.reference.gated_rotary_attention` with the mask :func:`banded_key_mask` of
    ``key_bias`` (pruned heads' gate gradient: 0). Biases may be None."""
    _require()
    check_rotary_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, cos, sin,
                                  window, key_bias=key_bias, kernel=True)
    B, S, _ = x.shape
    D = wq.shape[0] // num_heads
    A = active_heads.numel()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates))
    cpu_inference = not grad and x.device.type == "cpu"
    w_qkv, b_qkv, wo_kept = pack_heads(wq, bq, wk, bk, wv, bv, wo, head_gates, active_heads, D, x.dtype,
                                       cache=cpu_inference and not torch.compiler.is_compiling())
    qkv = F.linear(x, w_qkv, b_qkv).view(B, S, 3, A, D)
    if cpu_inference:  # the C++ kernel: one pass, no temporaries
        qk = torch.ops.structprune.cpp_rotary_qk(qkv, *torch.broadcast_tensors(cos, sin))
    else:
        qk = rotary_qk(qkv[:, :, :2], cos, sin)  # [B, S, 2, A, D]: q and k rotated in one pass
    q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    ctx = banded_attention(q, k, v, key_bias, window)  # [B, S, A, D]
    return F.linear(ctx.reshape(B, S, A * D), wo_kept, bo)


def rotary_qk(qk, cos, sin):
    """:func:`structprune.ops.reference.apply_rotary` on q and k at once, in the [B, S, 2, A, D] layout of the fused
    projection (no transposes): fp32 arithmetic, rounded back to the input's dtype, as the reference."""
    t = qk.float()
    c, s = cos.float()[:, :, None, None, :], sin.float()[:, :, None, None, :]
    half = t.shape[-1] // 2
    rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return torch.addcmul(t * c, rot, s).to(qk.dtype)


QUERY_BLOCK = 64  # queries per block of the C++ banded kernel: a block visits QUERY_BLOCK + 2 * window keys


def banded_attention(q, k, v, key_bias, window: int):
    """Softmax attention of [B, A, S, D] tensors with the additive [B, S] ``key_bias`` (or None) and, for
    ``window >= 0``, only the keys within ``|q - k| <= window``; returns the context [B, S, A, D] (the layout the
    output projection reads).

    A global layer (no window, or one reaching every key) runs ATen's SDPA. A local layer without gradients runs
    ``cpp_banded_attention`` (``csrc/cpu/modernbert_cpu.cpp``): blocks of :data:`QUERY_BLOCK` queries, each
    visiting only the keys of its band, so its cost grows as ``S * window``, not ``S^2``. With gradients, one SDPA
    over every key with the band as a mask (:func:`banded_key_mask`, differentiable): ATen has no banded kernel,
    and blocking the queries through its SDPA was measured slower on CPU than one masked call."""
    B, A, S, D = q.shape
    scale = D ** -0.5
    if window < 0 or window >= S - 1:
        mask = None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not grad and q.device.type == "cpu":
        return torch.ops.structprune.cpp_banded_attention(q, k, v, key_bias, window, scale, QUERY_BLOCK)
    mask = banded_key_mask(key_bias, S, window, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def extra_reasons(inputs: OpInputs) -> list[str]:
    """What the cpp backend refuses beyond the shared reasons: the GLU FFN off the CPU (its C++ op has CPU kernels
    only so far)."""
    if inputs.glu and inputs.device.type != "cpu":
        return [f"a GLU FFN on {inputs.device.type} (the cpp GLU kernel is CPU-only so far)"]
    return []


# --- fake kernels, autograd and autocast of the C++ ops -----------------------------------------------------------
def _glu_grad_placeholders(output_mask, x, w1, b1, w2, b2, unit_gates):
    need_x, need_w, need_g = output_mask

    def make(t, need, like=None):
        like = t if like is None else like
        return like.new_empty(tuple(t.shape) if need and t is not None else (0,))

    return (make(x, need_x), make(w1, need_w), make(b1, need_w and b1 is not None, w1), make(w2, need_w),
            make(b2, need_w and b2 is not None, w2), make(unit_gates, need_g))


def register() -> None:
    """Fake kernels, the autograd formula and the autocast rule of ``cpp_gated_glu_ffn`` (called once, when the
    extension has loaded)."""
    lib = "structprune::"

    @torch.library.register_fake(lib + "cpp_gated_glu_ffn")
    def _glu_fake(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save_for_backward=False):
        n, k = x.shape[0] * x.shape[1], kept_units.shape[0]
        pre, h = ((n, 2 * k), (n, k)) if save_for_backward else ((0,), (0,))
        return torch.empty_like(x), x.new_empty(pre), x.new_empty(h)

    @torch.library.register_fake(lib + "cpp_gated_glu_ffn_backward")
    def _glu_bwd_fake(grad_out, x, w1, b1, w2, b2, unit_gates, kept_units, activation, pre=None, h=None,
                      output_mask=(True, True, True)):
        return _glu_grad_placeholders(output_mask, x, w1, b1, w2, b2, unit_gates)

    @torch.library.register_fake(lib + "cpp_rotary_qk")
    def _rotary_fake(qkv, cos, sin):
        B, S, _, A, D = qkv.shape
        return qkv.new_empty((B, S, 2, A, D))

    @torch.library.register_fake(lib + "cpp_banded_attention")
    def _banded_fake(q, k, v, key_bias, window, scale, block):
        B, A, S, D = q.shape
        return q.new_empty((B, S, A, D))

    _setup, _backward = ffn_autograd("cpp_gated_glu_ffn_backward")
    torch.library.register_autograd(lib + "cpp_gated_glu_ffn", _backward, setup_context=_setup)
    register_autocast(lib + "cpp_gated_glu_ffn", keep=("unit_gates",))

