"""The "cpp" kernel backend: the ops of the compiled extension (``csrc/``, built and loaded by
:mod:`structprune.backends.cpp.build`) behind ``torch.ops.structprune``.

Ops (``torch.ops.structprune.*``): ``cpp_gated_attention``, ``cpp_gated_attention_backward``, ``cpp_gated_ffn``,
``cpp_gated_ffn_backward``, ``cpp_gated_glu_ffn``, ``cpp_gated_glu_ffn_backward`` (ModernBERT's entries, and their
fake / autograd / autocast registrations: :mod:`structprune.backends.cpp.modernbert`), ``cpp_hard_concrete_sample``,
``cpp_hard_concrete_sample_backward`` and helpers
``attention_dropout_scale``, ``pack_cache_clear``, ``pack_cache_size``, ``build_info``, ``activation_names``,
``philox4x32_10``. Fake kernels, autograd formulas (calling the C++ backward ops) and autocast rules are registered
here. The op entries (:func:`gated_attention`, :func:`gated_ffn`) check their inputs with
:mod:`structprune.ops.checks`, as every backend does; the C++ ops keep only the checks that guard memory.

The backward ops take ``output_mask`` = (x, all weights and biases, gates): the autograd formulas build it from
``ctx.needs_input_grad``, so frozen weights (e.g. an L0 selection phase training only the gates) cost no weight
gradient GEMMs. Masked-out outputs are empty ``[0]`` tensors, returned to autograd as None.

Saved tensors: the forward ops take ``save_for_backward`` (set by :func:`gated_attention` / :func:`gated_ffn` when a
gradient is needed) and then also return what their backward needs (attention: packed q|k|v, the ungated
context, the softmax log-sum-exp; FFN: pre-activation and activation), so the backward recomputes nothing and
reuses the cached packed weights; under ``no_grad`` these outputs are empty.

The packed-weight cache is described in :mod:`structprune.backends.cpp.build`.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch
from torch import Tensor

from structprune.backends.cpp import build, decoder, modernbert, packing, serving_attention as _serving
from structprune.backends.cpp.build import _require, availability, build_info, cache_size, load_error, record_error
from structprune.ops.checks import check_attention_inputs, check_dropout, check_ffn_inputs
from structprune.backends.cpp.autograd import ffn_autograd
from structprune.ops.support import Backend, grad_output_mask, grad_placeholders, masked_grads, register_autocast

__all__ = ["BACKEND", "availability", "gated_attention", "gated_ffn", "hard_concrete_sample", "hard_concrete_uniform",
           "clear_cache", "cache_size", "build_info", "load_error", "supports_attention_dropout",
           "attention_dropout_scale"]

def clear_cache() -> None:
    """Drop every packed weight: the C++ pack cache's, the decoder ops' (:mod:`.decoder`) and the rotary
    attention's (:mod:`.packing`)."""
    build.clear_cache()
    decoder.clear_pack_cache()
    packing.clear()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads: int,
                    dropout_p: float = 0.0, seed: int = 0, offset: int = 0):
    """Gated self-attention projection, equal to :func:`structprune.ops.reference.gated_attention` (the gate gradient
    of pruned heads, which the reference computes from contexts this op never forms, is returned as 0).

    When a gradient is needed the op keeps q|k|v, the context and the softmax log-sum-exp for the backward
    (``save_for_backward``), which then recomputes nothing; under ``no_grad`` it keeps nothing.
    ``dropout_p > 0``: attention-probability dropout with the Philox stream ``(seed, offset)`` (the mask is
    :func:`attention_dropout_scale`; the backward regenerates it). ``seed`` may be a one-element int64 CPU tensor
    (the seed a ``torch.compile`` graph draws, a graph value rather than a constant): the op is then
    ``cpp_gated_attention_seeded``, the same kernels."""
    _require()
    check_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, key_bias=key_bias,
                           dropout_p=dropout_p, seed=seed, offset=offset, kernel=True)
    save = _needs_grad(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates)
    if isinstance(seed, torch.Tensor):  # the seed drawn inside a torch.compile graph: see _register_seeded_parts
        return torch.ops.structprune.cpp_gated_attention_seeded(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates,
                                                                active_heads, key_bias, int(num_heads), save,
                                                                float(dropout_p), seed, int(offset))[0]
    return torch.ops.structprune.cpp_gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                                                     key_bias, int(num_heads), save, float(dropout_p), int(seed),
                                                     int(offset))[0]


def supports_attention_dropout(device: torch.device) -> bool:
    """Whether :func:`gated_attention` takes ``dropout_p > 0`` on ``device`` (CPU and CUDA: yes)."""
    return availability(device) is None


def attention_dropout_scale(batch: int, num_heads: int, seq: int, heads: torch.Tensor, p: float, seed: int,
                            offset: int = 0) -> torch.Tensor:
    """The dropout multipliers [B, A, S, S] fp32 (0 or 1 / (1 - p)) that :func:`gated_attention` applies to the
    softmax probabilities of the active ``heads`` for ``(seed, offset)``; element (b, h, i, j) of the layer's
    [B, H, S, S] probabilities uses Philox4x32-10 output ``n = ((b * H + h) * S + i) * S + j`` (csrc/gated_core.h)."""
    _require()
    check_dropout(p, seed, offset)
    return torch.ops.structprune.attention_dropout_scale(batch, num_heads, seq, heads, float(p), int(seed),
                                                         int(offset))


def gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """Gated FFN projection, equal to :func:`structprune.ops.reference.gated_ffn` (pruned units' gate gradient: 0).
    Keeps the pre-activation and the activation for the backward when a gradient is needed. ``x`` may be
    [..., E] (the op takes [B, S, E]: other shapes run as [1, N, E])."""
    _require()
    check_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation, kernel=True)
    save = _needs_grad(x, w1, b1, w2, b2, unit_gates)
    if x.dim() == 3:
        return torch.ops.structprune.cpp_gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save)[0]
    x3 = x.reshape(1, math.prod(x.shape[:-1]), x.shape[-1])
    y = torch.ops.structprune.cpp_gated_ffn(x3, w1, b1, w2, b2, unit_gates, kept_units, activation, save)[0]
    return y.reshape(x.shape)


def hard_concrete_sample(log_alpha, seed: int, offset: int, beta: float = 2.0 / 3.0, mask=None):
    """Hard-concrete gates with Philox4x32-10 noise, reproducible for (seed, offset) and identical on CPU and CUDA.

    Element i uses uniform noise u_i (clamped to [1e-6, 1 - 1e-6] like :class:`structprune.model.gates.HardConcreteGate`)
    and returns ``hard_concrete_from_uniform(log_alpha, u, beta) * mask``; differentiable in ``log_alpha``.
    """
    _require()
    return torch.ops.structprune.cpp_hard_concrete_sample(log_alpha, int(seed), int(offset), float(beta), mask)


def hard_concrete_uniform(n: int, seed: int, offset: int, device) -> torch.Tensor:
    """The fp32 uniform noise [n] (clamped to [1e-6, 1 - 1e-6]) that :func:`hard_concrete_sample` uses for
    ``(seed, offset)``: element i is word ``i % 4`` of Philox4x32-10 block ``(i // 4, offset)`` under key ``seed``,
    ``((word >> 9) + 0.5) / 2**23``. One op call per block: for tests and small ``n``."""
    _require()
    m = 0xFFFFFFFF
    words = []
    for blk in range((n + 3) // 4):
        words += torch.ops.structprune.philox4x32_10([blk & m, blk >> 32, offset & m, offset >> 32],
                                                     [seed & m, seed >> 32])
    w = torch.tensor(words[:n], dtype=torch.int64)
    return (((w >> 9).double() + 0.5) / 2**23).float().clamp(1e-6, 1 - 1e-6).to(device)


# --- fake kernels and autograd --------------------------------------------------------------------------------------

def _empty(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _attention_saved_shapes(x, wq, active_heads, num_heads, save):
    """Shapes of the saved outputs (qkv, ctx, lse) of cpp_gated_attention; [0] each when not saving."""
    if not save:
        return (0,), (0,), (0,)
    B, S, _ = x.shape
    R = active_heads.shape[0] * (wq.shape[0] // num_heads)
    return (B * S, 3 * R), (B * S, R), (B, S, active_heads.shape[0])


def _register_python_parts() -> None:
    lib = "structprune::"

    @torch.library.register_fake(lib + "cpp_gated_attention")
    def _attn_fake(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads,
                   save_for_backward=False, dropout_p=0.0, seed=0, offset=0):
        qkv, ctx, lse = _attention_saved_shapes(x, wq, active_heads, num_heads, save_for_backward)
        return (_empty(x), x.new_empty(qkv), x.new_empty(ctx), x.new_empty(lse, dtype=torch.float32))

    @torch.library.register_fake(lib + "cpp_gated_attention_backward")
    def _attn_bwd_fake(grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads,
                       qkv=None, ctx=None, lse=None, output_mask=(True, True, True), dropout_p=0.0, seed=0,
                       offset=0):
        return grad_placeholders(output_mask, x, (wq, bq, wk, bk, wv, bv, wo, bo), head_gates)

    @torch.library.register_fake(lib + "cpp_gated_ffn")
    def _ffn_fake(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save_for_backward=False):
        shape = (x.shape[0] * x.shape[1], kept_units.shape[0]) if save_for_backward else (0,)
        return _empty(x), x.new_empty(shape), x.new_empty(shape)

    @torch.library.register_fake(lib + "cpp_gated_ffn_backward")
    def _ffn_bwd_fake(grad_out, x, w1, b1, w2, b2, unit_gates, kept_units, activation, pre=None, h=None,
                      output_mask=(True, True, True)):
        return grad_placeholders(output_mask, x, (w1, b1, w2, b2), unit_gates)

    @torch.library.register_fake(lib + "cpp_hard_concrete_sample")
    def _hc_fake(log_alpha, seed, offset, beta, mask=None):
        return _empty(log_alpha)

    @torch.library.register_fake(lib + "cpp_hard_concrete_sample_backward")
    def _hc_bwd_fake(grad, log_alpha, seed, offset, beta, mask=None):
        return _empty(log_alpha)

    # Forward ops called with save_for_backward=True return what their backward needs (saved here, beside the
    # inputs); called without it (directly, e.g. by opcheck) the backward recomputes the forward. The saved
    # outputs are not differentiable, and no zero gradients are materialized for them (grad is None when the
    # output itself was not used).
    def _attn_setup(ctx, inputs, output):
        *tensors, num_heads, save, dropout_p, seed, offset = inputs
        ctx.num_heads = num_heads
        ctx.dropout = (dropout_p, seed, offset)
        ctx.saved_outputs = bool(save)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        # x, weights, biases, head_gates, active_heads, key_bias (may be None) [, qkv, ctx, lse]
        ctx.save_for_backward(*tensors, *(output[1:] if save else ()))

    def _attn_backward(ctx, grad, *_unused):
        if grad is None:
            return (None,) * 17
        saved = ctx.saved_tensors
        *tensors, qkv, c, lse = saved if ctx.saved_outputs else (*saved, None, None, None)
        grads = torch.ops.structprune.cpp_gated_attention_backward(
            grad.to(tensors[0].dtype).contiguous(), *tensors, ctx.num_heads, qkv, c, lse,
            output_mask=grad_output_mask(ctx.needs_input_grad, 8), dropout_p=ctx.dropout[0], seed=ctx.dropout[1],
            offset=ctx.dropout[2])
        return masked_grads(grads, ctx.needs_input_grad)  # None for active_heads, key_bias, num_heads, save, ...

    torch.library.register_autograd(lib + "cpp_gated_attention", _attn_backward, setup_context=_attn_setup)

    _ffn_setup, _ffn_backward = ffn_autograd("cpp_gated_ffn_backward")
    torch.library.register_autograd(lib + "cpp_gated_ffn", _ffn_backward, setup_context=_ffn_setup)

    def _hc_setup(ctx, inputs, output):
        log_alpha, seed, offset, beta, mask = inputs
        ctx.args = (seed, offset, beta)
        ctx.save_for_backward(log_alpha, mask)

    def _hc_backward(ctx, grad):
        log_alpha, mask = ctx.saved_tensors
        seed, offset, beta = ctx.args
        g = torch.ops.structprune.cpp_hard_concrete_sample_backward(grad, log_alpha, seed, offset, beta, mask)
        return g, None, None, None, None

    torch.library.register_autograd(lib + "cpp_hard_concrete_sample", _hc_backward, setup_context=_hc_setup)

    # Autocast: x, weights and biases in the region's dtype; gates and the fp32 key bias as they are. The gate
    # sampler has no rule: it runs in fp32 under autocast, like the reference's elementwise math.
    register_autocast(lib + "cpp_gated_attention", keep=("head_gates", "key_bias"))
    register_autocast(lib + "cpp_gated_ffn", keep=("unit_gates",))


def _register_seeded_parts() -> None:
    """``cpp_gated_attention_seeded`` and its backward: ``cpp_gated_attention`` with the Philox seed as a tensor.

    Under ``torch.compile`` the dispatcher draws the dropout seed inside the graph (``torch.randint`` on the CPU,
    from torch's default generator), so that it is a value of each run, neither a constant baked into the graph
    nor a host read that breaks it. The C++ ops take the seed as an ``int``; these opaque custom ops read it from
    the tensor when they run (a one-element CPU tensor: no device sync) and call the same kernels. The autograd
    formula is that of ``cpp_gated_attention``: the forward returns what the backward needs, nothing recomputed."""
    @torch.library.custom_op("structprune::cpp_gated_attention_seeded", mutates_args=())
    def _seeded(x: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, wo: Tensor,
                bo: Tensor, head_gates: Tensor, active_heads: Tensor, key_bias: Optional[Tensor], num_heads: int,
                save_for_backward: bool, dropout_p: float, seed: Tensor,
                offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(torch.ops.structprune.cpp_gated_attention(
            x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, save_for_backward,
            dropout_p, int(seed.item()), offset))

    @_seeded.register_fake
    def _(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, save_for_backward,
          dropout_p, seed, offset):
        qkv, ctx, lse = _attention_saved_shapes(x, wq, active_heads, num_heads, save_for_backward)
        return (_empty(x), x.new_empty(qkv), x.new_empty(ctx), x.new_empty(lse, dtype=torch.float32))

    @torch.library.custom_op("structprune::cpp_gated_attention_seeded_backward", mutates_args=())
    def _seeded_backward(grad_out: Tensor, x: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor,
                         bv: Tensor, wo: Tensor, bo: Tensor, head_gates: Tensor, active_heads: Tensor,
                         key_bias: Optional[Tensor], num_heads: int, qkv: Optional[Tensor], ctx: Optional[Tensor],
                         lse: Optional[Tensor], output_mask: list[bool], dropout_p: float, seed: Tensor,
                         offset: int) -> list[Tensor]:
        return list(torch.ops.structprune.cpp_gated_attention_backward(
            grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, qkv, ctx,
            lse, output_mask=output_mask, dropout_p=dropout_p, seed=int(seed.item()), offset=offset))

    @_seeded_backward.register_fake
    def _(grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, qkv, ctx, lse,
          output_mask, dropout_p, seed, offset):
        return list(grad_placeholders(output_mask, x, (wq, bq, wk, bk, wv, bv, wo, bo), head_gates))

    def _setup(ctx, inputs, output):
        *tensors, num_heads, save, dropout_p, seed, offset = inputs
        ctx.num_heads = num_heads
        ctx.dropout = (dropout_p, offset)
        ctx.saved_outputs = bool(save)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(seed, *tensors, *(output[1:] if save else ()))

    def _backward(ctx, grad, *_unused):
        if grad is None:
            return (None,) * 17
        seed, *saved = ctx.saved_tensors
        *tensors, qkv, c, lse = saved if ctx.saved_outputs else (*saved, None, None, None)
        grads = _seeded_backward(grad.to(tensors[0].dtype).contiguous(), *tensors, ctx.num_heads, qkv, c, lse,
                                 grad_output_mask(ctx.needs_input_grad, 8), ctx.dropout[0], seed, ctx.dropout[1])
        return masked_grads(grads, ctx.needs_input_grad)

    _seeded.register_autograd(_backward, setup_context=_setup)
    register_autocast("structprune::cpp_gated_attention_seeded", keep=("head_gates", "key_bias"))


if load_error() is None:
    try:
        _register_python_parts()
        _register_seeded_parts()
        modernbert.register()
        decoder.register()
        _serving.register()
    except Exception as exc:  # e.g. an incompatible torch.library
        if "already" in str(exc):  # this module was reloaded: the registrations from the first import stand
            pass
        else:
            record_error(f"registering fake/autograd kernels failed ({type(exc).__name__}: {exc})")


# row norms for inference (None where the kernel does not apply): the dispatcher reads them through BACKEND.module
rms_norm, layer_norm = decoder.inference_rms_norm, decoder.inference_layer_norm
embedding_layer_norm = decoder.inference_embedding_layer_norm  # the serving module's embedding block
serving_attention = _serving.serving_attention  # fp32 attention for inference (the serving module's)

BACKEND = Backend(name="cpp", availability=availability, supports_attention_dropout=supports_attention_dropout,
                  takes_tensor_seed=True,
                  gated_attention=gated_attention, gated_ffn=gated_ffn, hard_concrete_sample=hard_concrete_sample,
                  hard_concrete_uniform=hard_concrete_uniform, gated_glu_ffn=modernbert.gated_glu_ffn,
                  gated_rotary_attention=modernbert.gated_rotary_attention, extra_reasons=modernbert.extra_reasons,
                  gated_decoder_qkv=decoder.gated_decoder_qkv, gated_decoder_attention=decoder.gated_decoder_attention,
                  module=sys.modules[__name__])
