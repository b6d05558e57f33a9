"""The public custom ops: one per computation, with one schema whatever the backend.

    torch.ops.structprune.gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias,
                                          num_heads, backend, dropout_p=0.0, seed=0) -> Tensor
    torch.ops.structprune.gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation, backend) -> Tensor
    torch.ops.structprune.hard_concrete_sample(log_alpha, seed, offset, beta, backend) -> Tensor
    torch.ops.structprune.gated_rotary_attention(x, wq, bq?, wk, bk?, wv, bv?, wo, bo?, head_gates, active_heads,
                                                 key_bias, cos, sin, window, num_heads, backend) -> Tensor
    torch.ops.structprune.gated_glu_ffn(x, w1, b1?, w2, b2?, unit_gates, kept_units, activation, backend) -> Tensor
    torch.ops.structprune.gated_decoder_qkv(x, wq, bq?, wk, bk?, wv, bv?, q_norm?, k_norm?, eps, cos, sin, head_dim,
                                            active_heads?, active_kv?, backend) -> (q, k, v)
    torch.ops.structprune.gated_decoder_attention(q, k, v, wo, bo?, head_gates, active_heads?, q_to_kv, key_mask?,
                                                  window, backend) -> Tensor

``backend`` names a registered backend (:mod:`structprune.ops.registry`); the arguments are those of the op contract
(:mod:`structprune.ops.support`). The dispatcher (:mod:`structprune.ops.dispatch`) calls these after choosing the backend;
scripts, exported graphs and profiles see one name per computation.

They follow ``aten::scaled_dot_product_attention``: CompositeImplicitAutograd ops that run the backend's own
implementation, whose ops carry the autograd formula, the fake kernel and the autocast rule. Each backend keeps
what its own backward needs, as SDPA's flash, memory-efficient and math kernels do: the cpp backend's CPU path
saves ATen's flash-attention log-sum-exp, the Triton kernels keep the row max and the log row sum apart (so that a
fully padded row, whose max is ``finfo.min``, keeps its sum), and the reference saves nothing of its own.
"""
from __future__ import annotations

import torch

from structprune.ops import registry as backends

_lib = torch.library.Library("structprune", "FRAGMENT")
_lib.define("gated_attention(Tensor x, Tensor wq, Tensor bq, Tensor wk, Tensor bk, Tensor wv, Tensor bv, Tensor wo, "
            "Tensor bo, Tensor head_gates, Tensor active_heads, Tensor? key_bias, int num_heads, str backend, "
            "float dropout_p=0.0, int seed=0) -> Tensor")
_lib.define("gated_ffn(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor unit_gates, Tensor kept_units, "
            "str activation, str backend) -> Tensor")
_lib.define("hard_concrete_sample(Tensor log_alpha, int seed, int offset, float beta, str backend) -> Tensor")
# ModernBERT's: rotary positions and a sliding window (``window`` >= 0: keys within |q - k| <= window; -1: none),
# and the GLU FFN (``w1`` [2*I, E]: input half, then gate half). Biases may be absent.
_lib.define("gated_rotary_attention(Tensor x, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, Tensor? bv, "
            "Tensor wo, Tensor? bo, Tensor head_gates, Tensor active_heads, Tensor? key_bias, Tensor cos, "
            "Tensor sin, int window, int num_heads, str backend) -> Tensor")
_lib.define("gated_glu_ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor unit_gates, "
            "Tensor kept_units, str activation, str backend) -> Tensor")
# Decoders with grouped queries (Llama, Mistral, Qwen2, Qwen3): the projections (q of the active heads, k and v of the
# active KV heads; Qwen3's q/k RMSNorm; rotary positions), then, after the KV cache update, causal attention with
# key padding and a sliding window (``window`` > 0: keys with q - k < window) and the gated output projection.
_lib.define("gated_decoder_qkv(Tensor x, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, Tensor? bv, "
            "Tensor? q_norm, Tensor? k_norm, float eps, Tensor cos, Tensor sin, int head_dim, Tensor? active_heads, "
            "Tensor? active_kv, str backend) -> (Tensor, Tensor, Tensor)")
_lib.define("gated_decoder_attention(Tensor q, Tensor k, Tensor v, Tensor wo, Tensor? bo, Tensor head_gates, "
            "Tensor? active_heads, Tensor q_to_kv, Tensor? key_mask, int window, str backend) -> Tensor")


def _backend(name: str, op: str):
    backend = backends.load(name)  # unknown names: ValueError from the registry
    if backend is None:
        raise RuntimeError(f"structprune::{op}: backend {name!r} failed to load ({backends.load_error(name)})")
    return backend


def _gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, backend,
                     dropout_p=0.0, seed=0):
    dropout = dict(dropout_p=float(dropout_p), seed=int(seed)) if dropout_p > 0.0 else {}
    return _backend(backend, "gated_attention").gated_attention(
        x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, **dropout)


def _gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation, backend):
    return _backend(backend, "gated_ffn").gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation)


def _hard_concrete_sample(log_alpha, seed, offset, beta, backend):
    impl = _backend(backend, "hard_concrete_sample")
    if impl.hard_concrete_sample is None:
        raise ValueError(f"structprune::hard_concrete_sample: backend {backend!r} has no counter-based sampler "
                         f"(the reference draws torch.rand: use structprune.ops.dispatch.hard_concrete_sample); backends "
                         f"that have one: {[n for n in backends.names() if _has_sampler(n)]}")
    return impl.hard_concrete_sample(log_alpha, seed, offset, beta)


def _extra_op(backend: str, op: str):
    impl = getattr(_backend(backend, op), op)
    if impl is None:
        raise ValueError(f"structprune::{op}: backend {backend!r} does not implement it (the dispatcher runs the "
                         "reference instead: use structprune.ops.dispatch)")
    return impl


def _gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, cos, sin,
                            window, num_heads, backend):
    return _extra_op(backend, "gated_rotary_attention")(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                                                        key_bias, cos, sin, window, num_heads)


def _gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation, backend):
    return _extra_op(backend, "gated_glu_ffn")(x, w1, b1, w2, b2, unit_gates, kept_units, activation)


def _gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim, active_heads, active_kv,
                       backend):
    return _extra_op(backend, "gated_decoder_qkv")(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin,
                                                   head_dim, active_heads, active_kv)


def _gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, key_mask, window, backend):
    return _extra_op(backend, "gated_decoder_attention")(q, k, v, wo, bo, head_gates, active_heads, q_to_kv,
                                                         key_mask, window)


def _has_sampler(name: str) -> bool:
    backend = backends.load(name)
    return backend is not None and backend.hard_concrete_sample is not None


for _name, _fn in (("gated_attention", _gated_attention), ("gated_ffn", _gated_ffn),
                   ("hard_concrete_sample", _hard_concrete_sample),
                   ("gated_rotary_attention", _gated_rotary_attention), ("gated_glu_ffn", _gated_glu_ffn),
                   ("gated_decoder_qkv", _gated_decoder_qkv), ("gated_decoder_attention", _gated_decoder_attention)):
    _lib.impl(_name, _fn, "CompositeImplicitAutograd")
