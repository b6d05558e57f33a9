"""The "cpp" backend's attention for fp32 CPU inference with a small head_dim (the serving module's encoder layers):
``cpp_serving_attention`` (``csrc/cpu/serving_attention_cpu.cpp``), exact softmax attention tiled like a GEMM with
AVX-512F, in place of ATen's flash kernel (tiny BLAS GEMMs per 32-wide head).

:func:`serving_attention` returns None where the kernel does not apply, and the caller
(:func:`structprune.ops.dispatch.serving_attention`) runs ATen's SDPA instead.
"""
from __future__ import annotations

import torch

__all__ = ["serving_attention", "supported_cpu", "register"]

_OP = "cpp_serving_attention"
_HEAD_DIM_MULTIPLE, _MAX_HEAD_DIM = 16, 128
_state: dict = {}


def supported_cpu() -> bool:
    """Whether this CPU has AVX-512F (the kernel's only path) and the loaded extension has the op."""
    if "ok" not in _state:
        avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
        _state["ok"] = bool(avx512 is not None and avx512()) and hasattr(torch.ops.structprune, _OP)
    return _state["ok"]


def serving_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None,
                      scale: float) -> torch.Tensor | None:
    """``softmax(q k^T * scale + key_bias) v`` as ``[B, Sq, H, D]`` contiguous, for fp32 CPU tensors q
    ``[B, H, Sq, D]``, k and v ``[B, H, Sk, D]`` (last dimension contiguous) and key_bias ``[B, Sk]`` additive or
    None; None where the kernel does not apply (no AVX-512F or no op in the extension, another dtype or device,
    head_dim not a multiple of 16 up to 128, no key, a gradient needed, torch.compile tracing)."""
    if torch.compiler.is_compiling() or not supported_cpu():
        return None
    tensors = (q, k, v) if key_bias is None else (q, k, v, key_bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors) or q.dim() != 4:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    D = q.shape[-1]
    if D % _HEAD_DIM_MULTIPLE or D > _MAX_HEAD_DIM or D == 0 or k.shape[2] == 0 or \
            any(t.stride(-1) != 1 for t in (q, k, v)):
        return None
    return torch.ops.structprune.cpp_serving_attention(q, k, v, key_bias, float(scale))


def register() -> None:
    """The fake kernel of ``cpp_serving_attention`` (called once, when the extension loads)."""
    if not hasattr(torch.ops.structprune, _OP):
        return

    @torch.library.register_fake("structprune::" + _OP)
    def _fake(q, k, v, key_bias, scale):
        B, H, S, D = q.shape
        return q.new_empty((B, S, H, D))
