"""The autograd formula the cpp FFN ops share (``cpp_gated_ffn`` and ``cpp_gated_glu_ffn``): their forwards take
``(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save_for_backward)`` and return ``(y, pre, h)``, and their
backward ops take the same tensors, the activation and the saved ``pre`` / ``h``."""
from __future__ import annotations

import torch

from structprune.ops.support import grad_output_mask, masked_grads


def ffn_autograd(backward_op: str):
    """``(setup_context, backward)`` for :func:`torch.library.register_autograd` of an FFN op whose backward op is
    ``torch.ops.structprune.<backward_op>`` (looked up at each call); the saved activations are reused when the
    forward kept them, else the backward recomputes."""

    def setup_context(ctx, inputs, output):
        *tensors, activation, save = inputs
        ctx.activation = activation
        ctx.saved_outputs = bool(save)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, *(output[1:] if save else ()))  # x, w1, b1, w2, b2, gates, kept [, pre, h]

    def backward(ctx, grad, *_unused):
        if grad is None:
            return (None,) * 9
        saved = ctx.saved_tensors
        *tensors, pre, h = saved if ctx.saved_outputs else (*saved, None, None)
        grads = getattr(torch.ops.structprune, backward_op)(grad.to(tensors[0].dtype).contiguous(), *tensors, ctx.activation, pre, h,
                            output_mask=grad_output_mask(ctx.needs_input_grad, 4))
        return masked_grads(grads, ctx.needs_input_grad)  # None for absent biases, kept_units, activation, save

    return setup_context, backward
