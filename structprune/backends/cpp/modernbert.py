"""The "cpp" backend's ops for ModernBERT's layers: the GLU FFN (a C++ op on packed kept units) and rotary /
sliding-window attention (ATen ops on the kept heads' weight slices).

``gated_glu_ffn`` runs ``torch.ops.structprune.cpp_gated_glu_ffn`` (``csrc/glu_ffn.cpp``): the kept units' row pairs
``(u, u + I)`` of ``w1`` are packed into one ``[2K, E]`` matrix and the kept columns of ``w2`` (gated on the CPU)
into ``[E, K]``, once per mask or weight change (the pack cache of :mod:`structprune.backends.cpp.build`), so a
call costs two GEMMs over the kept units; its backward op ``cpp_gated_glu_ffn_backward`` takes the same
``output_mask`` as the other backward ops and returns zero rows / columns / gate gradients for pruned units. CPU
only so far: on CUDA the backend refuses the GLU FFN (``extra_reasons``) and the dispatcher falls back.

``gated_rotary_attention`` projects with the kept heads' rows of ``wq``/``wk``/``wv`` (one GEMM), applies the rotary
positions to q and k in fp32 like the reference, runs ``scaled_dot_product_attention`` with the key padding bias
and the band ``|q - k| <= window`` as one additive mask, scales each kept head's context by its gate and
projects with the kept columns of ``wo``: pruned heads cost nothing, and their weights' and gates' gradients are 0
(autograd through ATen ops; no C++ kernel of its own yet).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from structprune.backends.cpp.build import _require
from structprune.ops.checks import check_glu_ffn_inputs, check_rotary_attention_inputs
from structprune.ops.reference import apply_rotary, banded_key_mask
from structprune.backends.cpp.autograd import ffn_autograd
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
    idx = active_heads.to(x.device)
    A = idx.numel()
    rows = (idx[:, None] * D + torch.arange(D, device=x.device)[None, :]).reshape(A * D)
    w_qkv = torch.cat([w.index_select(0, rows) for w in (wq, wk, wv)])
    b_qkv = None
    if not (bq is None and bk is None and bv is None):
        b_qkv = torch.cat([x.new_zeros(A * D) if b is None else b.index_select(0, rows) for b in (bq, bk, bv)])
    qkv = F.linear(x, w_qkv, b_qkv).view(B, S, 3, A, D).permute(2, 0, 3, 1, 4)  # [3, B, A, S, D]
    q, k = apply_rotary(qkv[0], cos, sin), apply_rotary(qkv[1], cos, sin)
    mask = banded_key_mask(key_bias, S, window, q.dtype, x.device)
    ctx = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=mask, scale=D ** -0.5)  # [B, A, S, D]
    ctx = ctx * head_gates.index_select(0, idx).to(ctx.dtype)[None, :, None, None]
    return F.linear(ctx.transpose(1, 2).reshape(B, S, A * D), wo.index_select(1, rows), bo)


def extra_reasons(inputs: OpInputs) -> list[str]:
    """What the cpp backend refuses beyond the shared reasons: the GLU FFN off the CPU (its C++ op has CPU kernels
    only so far)."""
    if inputs.glu and inputs.device.type != "cpu":
        return [f"a GLU FFN on {inputs.device.type} (the cpp GLU kernel is CPU-only so far)"]
    return []


# --- fake kernels, autograd and autocast of the C++ GLU ops -----------------------------------------------------------
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

    _setup, _backward = ffn_autograd("cpp_gated_glu_ffn_backward")
    torch.library.register_autograd(lib + "cpp_gated_glu_ffn", _backward, setup_context=_setup)
    register_autocast(lib + "cpp_gated_glu_ffn", keep=("unit_gates",))

