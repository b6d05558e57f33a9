"""The "cpp" backend's attention for fp32 and bf16 CPU inference with a small head_dim (the serving module's encoder
layers): ``cpp_serving_attention``, exact softmax attention tiled like a GEMM, in place of ATen's flash kernel (tiny
BLAS GEMMs per 32-wide head): fp32 with AVX-512F (``csrc/cpu/serving_attention_cpu.cpp``), bf16 with AMX tiles or
AVX512-BF16 dot products (``csrc/cpu/serving_attention_bf16_cpu.cpp``; needs AVX512-BF16).

:func:`serving_attention` returns None where the kernel does not apply, and the caller
(:func:`structprune.ops.dispatch.serving_attention`) runs ATen's SDPA instead.
"""
from __future__ import annotations

import torch

__all__ = ["serving_attention", "supported_cpu", "supported_bf16", "register"]

_OP = "cpp_serving_attention"
_HEAD_DIM_MULTIPLE, _MAX_HEAD_DIM = 16, 128
_state: dict = {}


def supported_cpu() -> bool:
    """Whether this CPU has AVX-512F (the kernel's only path) and the loaded extension has the op."""
    if "ok" not in _state:
        avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
        _state["ok"] = bool(avx512 is not None and avx512()) and hasattr(torch.ops.structprune, _OP)
    return _state["ok"]


def supported_bf16() -> bool:
    """Whether the bf16 path runs here: :func:`supported_cpu` and AVX512-BF16."""
    if "bf16" not in _state:
        bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        _state["bf16"] = supported_cpu() and bool(bf16 is not None and bf16())
    return _state["bf16"]


def serving_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None,
                      scale: float) -> torch.Tensor | None:
    """``softmax(q k^T * scale + key_bias) v`` as ``[B, Sq, H, D]`` contiguous, for fp32 or bf16 CPU tensors q
    ``[B, H, Sq, D]``, k and v ``[B, H, Sk, D]`` (last dimension contiguous; bf16 q, k, v give a bf16 output) and
    key_bias ``[B, Sk]`` additive (fp32, or the inputs' dtype: converted) or None; None where the kernel does not
    apply (no AVX-512F or no op in the extension, bf16 without AVX512-BF16, another dtype or device, head_dim not a
    multiple of 16 up to 128, no key, a gradient needed, torch.compile tracing)."""
    if torch.compiler.is_compiling() or not supported_cpu():
        return None
    dtype = q.dtype
    if dtype not in (torch.float32, torch.bfloat16) or (dtype == torch.bfloat16 and not supported_bf16()):
        return None
    if any(t.device.type != "cpu" or t.dtype != dtype for t in (q, k, v)) or q.dim() != 4:
        return None
    if key_bias is not None:
        if key_bias.device.type != "cpu" or key_bias.dtype not in (torch.float32, dtype):
            return None
        key_bias = key_bias.float()
    tensors = (q, k, v) if key_bias is None else (q, k, v, key_bias)
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
