"""The "torch" backend: the pure-PyTorch reference (:mod:`structprune.ops.reference`) behind the op contract.

Always available, refuses nothing, and is where the dispatcher falls back to. The dispatcher calls the reference
itself when this backend runs (it then also takes masks that vary over queries, eager attention and an explicit
``torch.Generator`` for the gates); this object is the same computation in the kernels' calling convention, for
the contract tests. No ``hard_concrete_sample``: the reference draws its noise with ``torch.rand``.
"""
from __future__ import annotations

from structprune.ops import reference
from structprune.ops.checks import check_attention_inputs, check_ffn_inputs, check_glu_ffn_inputs, \
    check_rotary_attention_inputs
from structprune.ops.checks import check_decoder_attention_inputs, check_decoder_qkv_inputs
from structprune.ops.support import Backend


def gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads: int,
                    dropout_p: float = 0.0, seed: int = 0):
    """:func:`structprune.ops.reference.gated_attention` (every head computed, ``active_heads`` unused); dropout
    draws from torch's generator, ``seed`` is unused."""
    check_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, key_bias=key_bias,
                           dropout_p=dropout_p, seed=seed)
    return reference.gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads, key_bias=key_bias,
                                     dropout_p=dropout_p)


def gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """:func:`structprune.ops.reference.gated_ffn` (every unit computed, ``kept_units`` unused)."""
    check_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    return reference.gated_ffn(x, w1, b1, w2, b2, unit_gates, activation)


def gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, cos, sin,
                           window: int, num_heads: int):
    """:func:`structprune.ops.reference.gated_rotary_attention` (every head computed)."""
    check_rotary_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, cos, sin,
                                  window, key_bias=key_bias)
    return reference.gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads, cos, sin,
                                            window=window, key_bias=key_bias)


def gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """:func:`structprune.ops.reference.gated_glu_ffn` (every unit computed)."""
    check_glu_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    return reference.gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, activation)


def gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim, active_heads=None,
                      active_kv=None):
    """:func:`structprune.ops.reference.gated_decoder_qkv`."""
    check_decoder_qkv_inputs(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim, active_heads,
                             active_kv)
    return reference.gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim,
                                       active_heads, active_kv)


def gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, key_mask, window: int):
    """:func:`structprune.ops.reference.gated_decoder_attention` with the key mask and the window."""
    check_decoder_attention_inputs(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, window, key_mask)
    return reference.gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, window,
                                             key_mask=key_mask)


BACKEND = Backend(name="torch", availability=lambda device: None, reference=True,
                  gated_attention=gated_attention, gated_ffn=gated_ffn,
                  gated_rotary_attention=gated_rotary_attention, gated_glu_ffn=gated_glu_ffn,
                  gated_decoder_qkv=gated_decoder_qkv, gated_decoder_attention=gated_decoder_attention)
