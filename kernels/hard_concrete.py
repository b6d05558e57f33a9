"""Fused hard-concrete sampling: counter-based uniform noise, stretch and clamp in one kernel.

``u_i = clamp(tl.rand(seed, offset + i), 1e-6, 1 - 1e-6)`` (Philox, so equal ``(seed, offset)`` give equal
noise on any device and launch configuration), then, as :func:`structprune.ops.reference.hard_concrete_from_uniform`,
``z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * (ZETA - GAMMA) + GAMMA, 0, 1)``. The noise is
clamped like :class:`structprune.model.gates.HardConcreteGate` clamps ``torch.rand``. The backward kernel draws
the same noise again from ``(seed, offset)`` instead of saving it: ``dz/dlog_alpha = (ZETA - GAMMA) * s (1 - s)
/ beta`` where the stretched value lies in ``[0, 1]`` (``torch.clamp``'s convention at the bounds), else 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from structprune.ops.reference import BETA, GAMMA, ZETA

from . import _common as C

U_EPS = 1e-6
_BLOCK = 1024


@triton.jit
def _uniform(seed, offs, U_LO: tl.constexpr, U_HI: tl.constexpr):
    return tl.minimum(tl.maximum(tl.rand(seed, offs), U_LO), U_HI)


@triton.jit
def _hc_kernel(la_ptr, z_ptr, grad_ptr, dla_ptr, n, seed, offset, inv_beta,
               GAMMA_: tl.constexpr, ZETA_: tl.constexpr, U_LO: tl.constexpr, U_HI: tl.constexpr,
               MODE: tl.constexpr, BLOCK: tl.constexpr):
    """MODE 0: ``z`` (sample); MODE 1: ``dla = grad * dz/dlog_alpha``; MODE 2: the uniform noise itself."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    u = _uniform(seed, offset + i, U_LO, U_HI)
    if MODE == 2:
        tl.store(z_ptr + i, u, mask=mask)
    else:
        la = tl.load(la_ptr + i, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + la) * inv_beta)
        t = s * (ZETA_ - GAMMA_) + GAMMA_
        if MODE == 0:
            z = tl.minimum(tl.maximum(t, 0.0), 1.0)
            tl.store(z_ptr + i, C.cast_ptr(z, z_ptr), mask=mask)
        else:
            gz = tl.load(grad_ptr + i, mask=mask, other=0.0).to(tl.float32)
            inside = (t >= 0.0) & (t <= 1.0)
            d = tl.where(inside, gz * (ZETA_ - GAMMA_) * s * (1.0 - s) * inv_beta, 0.0)
            tl.store(dla_ptr + i, C.cast_ptr(d, dla_ptr), mask=mask)


def _check_counter(seed, offset, n):
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(offset, int) or offset < 0 or offset + n >= 2 ** 31:
        raise ValueError(f"offset must be an int >= 0 with offset + n < 2**31 (Philox counter), got offset={offset!r}, "
                         f"n={n}")


def _launch(mode, n, seed, offset, beta, la=None, out=None, grad=None, dla=None):
    if n == 0:
        return
    dummy = out if out is not None else dla
    with C.device_guard(dummy.device):
        _hc_kernel[(triton.cdiv(n, _BLOCK),)](
            la if la is not None else dummy, out if out is not None else dummy, grad if grad is not None else dummy,
            dla if dla is not None else dummy, n, seed, offset, 1.0 / beta,
            GAMMA_=GAMMA, ZETA_=ZETA, U_LO=U_EPS, U_HI=1.0 - U_EPS, MODE=mode, BLOCK=_BLOCK)


@torch.library.custom_op("structprune::triton_hard_concrete_sample", mutates_args=())
def triton_hard_concrete_sample(log_alpha: torch.Tensor, seed: int, offset: int, beta: float) -> torch.Tensor:
    """A hard-concrete sample shaped like ``log_alpha`` (same dtype), noise from ``(seed, offset)``."""
    la = log_alpha.contiguous()
    z = torch.empty_like(la)
    _launch(0, la.numel(), seed, offset, beta, la=la, out=z)
    return z


@triton_hard_concrete_sample.register_fake
def _(log_alpha, seed, offset, beta):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


@torch.library.custom_op("structprune::triton_hard_concrete_sample_backward", mutates_args=())
def triton_hard_concrete_sample_backward(grad: torch.Tensor, log_alpha: torch.Tensor, seed: int, offset: int,
                                  beta: float) -> torch.Tensor:
    la = log_alpha.contiguous()
    g = grad.contiguous()
    dla = torch.empty_like(la)
    _launch(1, la.numel(), seed, offset, beta, la=la, grad=g, dla=dla)
    return dla


@triton_hard_concrete_sample_backward.register_fake
def _(grad, log_alpha, seed, offset, beta):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    log_alpha, seed, offset, beta = inputs
    ctx.save_for_backward(log_alpha)
    ctx.seed, ctx.offset, ctx.beta = seed, offset, beta


def _backward(ctx, grad):
    (log_alpha,) = ctx.saved_tensors
    return (torch.ops.structprune.triton_hard_concrete_sample_backward(grad, log_alpha, ctx.seed, ctx.offset, ctx.beta),
            None, None, None)


triton_hard_concrete_sample.register_autograd(_backward, setup_context=_setup_context)


def hard_concrete_sample(log_alpha: torch.Tensor, seed: int, offset: int, beta: float = BETA) -> torch.Tensor:
    """Hard-concrete sample of each entry of ``log_alpha`` with the Philox noise of ``(seed, offset)``
    (entry ``i`` uses counter ``offset + i``); differentiable in ``log_alpha`` (zero where clamped)."""
    if not isinstance(log_alpha, torch.Tensor):
        raise TypeError(f"log_alpha must be a torch.Tensor, got {type(log_alpha).__name__}")
    C.check_tensor("log_alpha", log_alpha, None, C.SUPPORTED_DTYPES, log_alpha.device)
    _check_counter(seed, offset, log_alpha.numel())
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    return torch.ops.structprune.triton_hard_concrete_sample(log_alpha, seed, offset, float(beta))


def hard_concrete_uniform(n: int, seed: int, offset: int, device: torch.device | str) -> torch.Tensor:
    """The fp32 uniform noise [n] that :func:`hard_concrete_sample` uses for ``(seed, offset)`` (already
    clamped to ``[1e-6, 1 - 1e-6]``), for comparing with ``reference.hard_concrete_from_uniform``."""
    _check_counter(seed, offset, n)
    u = torch.empty((n,), dtype=torch.float32, device=device)
    _launch(2, n, seed, offset, 1.0, out=u)
    return u
