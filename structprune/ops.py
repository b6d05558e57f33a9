"""The op boundary: backend choice and the two gated ops every module calls.

Backends
    "torch"  the pure-PyTorch reference (:mod:`structprune.reference`); always available.
    "triton" Triton kernels (``kernels/``, installed as ``structprune._kernels``); CUDA tensors, or CPU
             tensors when ``TRITON_INTERPRET=1`` is set.
    "cpp"    the compiled extension (``csrc/``, ``structprune._C``); CPU tensors, and CUDA when built with CUDA.
    "auto"   the fastest available for the tensors at hand: triton then cpp on CUDA, cpp on CPU, else torch.

A kernel backend is a module exposing ``availability(device) -> str | None`` (None when usable, else the
reason), ``gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias,
num_heads)`` and ``gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation)``; their backward ops take
an ``output_mask`` (:func:`grad_output_mask`) and skip the gradients nobody asked for. The reference path
is used for what kernels do not cover (attention-probability dropout in training, non-padding 4D masks),
and :func:`last_backends` says which backend ran each op.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import reference
from .gates import hard_concrete_from_uniform

BACKENDS = ("torch", "triton", "cpp")
_PROVIDER_MODULES = {"triton": "structprune._kernels", "cpp": "structprune._extension"}
_HOW_TO_ENABLE = {
    "triton": "install triton and use CUDA tensors (or set TRITON_INTERPRET=1 before importing to run on CPU)",
    "cpp": "install a C++ compiler and ninja so the extension can be JIT-built, or reinstall with "
           "`pip install --no-build-isolation .`; see `structprune info`",
}

_requested = "auto"
_providers: dict[str, object] = {}
_import_errors: dict[str, str] = {}
_last: dict[str, str] = {}
_warned: set[str] = set()


def _provider(name: str):
    if name in _providers:
        return _providers[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(_PROVIDER_MODULES[name])
    except Exception as exc:  # a missing optional dependency or a failed build
        _import_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    if not all(hasattr(mod, fn) for fn in ("availability", "gated_attention", "gated_ffn")):
        _import_errors[name] = f"{mod.__name__} does not implement the backend interface"
        return None
    _providers[name] = mod
    return mod


def availability(name: str, device: torch.device | str = "cpu") -> str | None:
    """None when backend ``name`` can run on ``device``, else the reason it cannot."""
    if name == "torch":
        return None
    if name not in _PROVIDER_MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    mod = _provider(name)
    if mod is None:
        return f"{name} backend failed to load ({_import_errors[name]})"
    return mod.availability(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    return [b for b in BACKENDS if availability(b, device) is None]


def set_backend(name: str) -> None:
    """Choose the kernel backend: "torch", "triton", "cpp" or "auto" (default).

    An explicit backend that cannot run on CPU or any visible GPU raises at once with the reason.
    """
    global _requested
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    if name not in ("auto", "torch"):
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        reasons = [availability(name, d) for d in devices]
        if all(r is not None for r in reasons):
            raise RuntimeError(f"backend {name!r} is not available: {'; '.join(reasons)}. "
                               f"To enable it: {_HOW_TO_ENABLE[name]}.")
    _requested = name


def get_backend() -> str:
    """The backend asked for with :func:`set_backend` ("auto" by default)."""
    return _requested


def resolve_backend(device: torch.device | str) -> str:
    """The backend that runs for tensors on ``device`` under the current choice."""
    device = torch.device(device)
    if _requested != "auto":
        reason = availability(_requested, device)
        if reason is not None:
            raise RuntimeError(f"backend {_requested!r} cannot run on {device}: {reason}. "
                               f"Use sp.set_backend('auto') or 'torch', or {_HOW_TO_ENABLE[_requested]}.")
        return _requested
    order = ("triton", "cpp") if device.type == "cuda" else ("cpp",)
    for name in order:
        if availability(name, device) is None:
            return name
    if "auto" not in _warned and os.environ.get("STRUCTPRUNE_QUIET") != "1":
        _warned.add("auto")
        reasons = "; ".join(f"{n}: {availability(n, device)}" for n in order)
        warnings.warn(f"structprune: no compiled kernel backend for {device}, using the 'torch' reference ({reasons})",
                      stacklevel=3)
    return "torch"


def last_backends() -> dict[str, str]:
    """Which backend ran each op last: {"attention": ..., "ffn": ...}."""
    return dict(_last)


def reset_last_backends() -> None:
    """Forget which backends ran (e.g. between benchmark cases)."""
    _last.clear()


def grad_output_mask(needs_input_grad, num_weights: int) -> list[bool]:
    """The ``output_mask`` of a kernel backward op, from ``ctx.needs_input_grad`` of a forward taking
    ``(x, <num_weights weights and biases>, gates, ...)``: [x, any weight or bias, gates]. The weights share
    one flag: when any of them needs a gradient, all are computed."""
    return [bool(needs_input_grad[0]), any(needs_input_grad[1:1 + num_weights]),
            bool(needs_input_grad[1 + num_weights])]


def masked_grads(grads, needs_input_grad) -> tuple:
    """One gradient per forward input for an autograd formula: the backward op's ``grads`` (x, weights and
    biases, gates, in input order), None for every input that needs no gradient and for the inputs after them."""
    return tuple(grads[i] if i < len(grads) and need else None for i, need in enumerate(needs_input_grad))


def key_bias_from_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF 4D padding mask [B, 1, Q|1, K] (bool: True = attend, or additive float) -> [B, K] fp32 additive bias.

    Padding masks of encoders are the same for every query row, so the first row is taken.
    """
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        row = attn_mask
    elif attn_mask.dim() == 4 and attn_mask.shape[1] == 1:
        row = attn_mask[:, 0, 0, :]
    else:
        raise ValueError(f"attention mask must be [B, K] or [B, 1, Q, K], got shape {tuple(attn_mask.shape)}")
    if row.dtype == torch.bool:
        neg = torch.finfo(torch.float32).min
        return torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill(~row, neg)
    return row.to(torch.float32).clamp_min(torch.finfo(torch.float32).min)


def hard_concrete_sample(log_alpha: torch.Tensor, beta: float, generator: torch.Generator | None = None):
    """One hard-concrete sample per entry of ``log_alpha``, differentiable in it.

    Kernel backends that provide ``hard_concrete_sample(log_alpha, seed, offset, beta)`` draw the noise
    with a counter-based generator fused with the stretch and clamp; the seed comes from torch's default
    generator, so ``torch.manual_seed`` makes runs reproducible on every backend.
    """
    traced = torch.compiler.is_compiling()  # a host-side seed would break the graph: sample with torch.rand
    backend = resolve_backend(log_alpha.device) if generator is None and not traced else "torch"
    provider = _providers.get(backend)
    if provider is not None and hasattr(provider, "hard_concrete_sample"):
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        z = provider.hard_concrete_sample(log_alpha, seed, 0, beta)
    else:
        backend = "torch"
        u = torch.rand(log_alpha.shape, device=log_alpha.device, generator=generator).clamp(1e-6, 1.0 - 1e-6)
        z = hard_concrete_from_uniform(log_alpha, u, beta)
    _last["gates"] = backend
    return z


def gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads: int,
                    attn_mask=None, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Gated self-attention output projection (see :func:`structprune.reference.gated_attention`).

    ``active_heads`` lists the heads whose gate is non-zero; kernel backends skip all the others.
    """
    backend = resolve_backend(x.device)
    if dropout_p > 0.0 or num_heads == 0:
        # attention-probability dropout exists only in the reference path; with no head left the layer is
        # just the output bias, which the reference returns without any attention work
        backend = "torch"
    if backend != "torch":
        key_bias = key_bias_from_mask(attn_mask)
        out = _providers[backend].gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                                                  key_bias, num_heads)
    else:
        out = reference.gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads,
                                         attn_mask=attn_mask, dropout_p=dropout_p, impl=impl)
    _last["attention"] = backend
    return out


def gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """Gated feed-forward projection (see :func:`structprune.reference.gated_ffn`)."""
    backend = resolve_backend(x.device)
    if backend != "torch":
        out = _providers[backend].gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    else:
        out = reference.gated_ffn(x, w1, b1, w2, b2, unit_gates, activation)
    _last["ffn"] = backend
    return out
