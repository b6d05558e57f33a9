"""The Triton gated attention (:mod:`.attention`) with the dropout seed as a tensor, for ``torch.compile``.

Under ``torch.compile`` the dispatcher draws the dropout seed inside the graph (a one-element int64 CPU tensor, a
value of each run, neither a constant baked into the graph nor a host read that breaks it), so the op must take it
as a tensor. These opaque ops read it when they run (no device sync: it lives on the CPU) and call
:mod:`.attention`'s ops, whose kernels are the same; the autograd formula is theirs, with the seed saved as a tensor
for the backward, where the dropout mask is regenerated.
"""
from __future__ import annotations

from typing import Optional

import torch

from structprune.ops.support import grad_output_mask, masked_grads, register_autocast

from . import _common as C
from .attention import _grads_like

TAKES_TENSOR_SEED = True  # importing this module registers the ops below: gated_attention then takes a tensor seed


@torch.library.custom_op("structprune::triton_gated_attention_seeded", mutates_args=())
def triton_gated_attention_seeded(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor,
                                  bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor, wo: torch.Tensor,
                                  bo: torch.Tensor, head_gates: torch.Tensor, active_heads: torch.Tensor,
                                  key_bias: Optional[torch.Tensor], num_heads: int, save_for_backward: bool,
                                  dropout_p: float, seed: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor]:
    """:func:`triton_gated_attention` with the Philox seed as a one-element int64 CPU tensor."""
    return tuple(torch.ops.structprune.triton_gated_attention(
        x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, save_for_backward,
        dropout_p, int(seed.item())))


@triton_gated_attention_seeded.register_fake
def _(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, save_for_backward,
      dropout_p, seed):
    return torch.ops.structprune.triton_gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                                                        key_bias, num_heads, save_for_backward, dropout_p, 0)


@torch.library.custom_op("structprune::triton_gated_attention_seeded_backward", mutates_args=())
def triton_gated_attention_seeded_backward(dy: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                                           wv: torch.Tensor, wo: torch.Tensor, head_gates: torch.Tensor,
                                           active_heads: torch.Tensor, key_bias: Optional[torch.Tensor],
                                           num_heads: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                           ctx: torch.Tensor, o: torch.Tensor, stats: torch.Tensor,
                                           output_mask: list[bool], dropout_p: float, seed: torch.Tensor
                                           ) -> list[torch.Tensor]:
    """:func:`triton_gated_attention_backward` with the Philox seed as a one-element int64 CPU tensor."""
    return list(torch.ops.structprune.triton_gated_attention_backward(
        dy, x, wq, wk, wv, wo, head_gates, active_heads, key_bias, num_heads, q, k, v, ctx, o, stats,
        output_mask=output_mask, dropout_p=dropout_p, seed=int(seed.item())))


@triton_gated_attention_seeded_backward.register_fake
def _(dy, x, wq, wk, wv, wo, head_gates, active_heads, key_bias, num_heads, q, k, v, ctx, o, stats, output_mask,
      dropout_p, seed):
    return _grads_like(C.unpack_output_mask(output_mask), x, wq, wk, wv, wo, head_gates, torch.empty)


def _setup_seeded(ctx, inputs, output):
    *tensors, key_bias, num_heads, save, dropout_p, seed = inputs
    x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads = tensors
    ctx.unsaved = not save
    if not save:
        return
    ctx.num_heads, ctx.dropout_p, ctx.has_kb = num_heads, dropout_p, key_bias is not None
    saved = [seed, x, wq, wk, wv, wo, head_gates, active_heads, *output[1:]]
    ctx.save_for_backward(*saved, *([key_bias] if key_bias is not None else []))


def _backward_seeded(ctx, dy, *_unused):
    if ctx.unsaved:
        raise RuntimeError("structprune::triton_gated_attention_seeded was called with save_for_backward=False; "
                           "call structprune._kernels.gated_attention, which sets it when a gradient is needed")
    saved = list(ctx.saved_tensors)
    key_bias = saved.pop() if ctx.has_kb else None
    seed, x, wq, wk, wv, wo, head_gates, active_heads, q, k, v, c, o, stats = saved
    grads = triton_gated_attention_seeded_backward(
        dy.contiguous(), x, wq, wk, wv, wo, head_gates, active_heads, key_bias, ctx.num_heads, q, k, v, c, o, stats,
        grad_output_mask(ctx.needs_input_grad, 8), ctx.dropout_p, seed)
    return masked_grads(grads, ctx.needs_input_grad)


triton_gated_attention_seeded.register_autograd(_backward_seeded, setup_context=_setup_seeded)
register_autocast("structprune::triton_gated_attention_seeded", keep=("head_gates", "key_bias"))
