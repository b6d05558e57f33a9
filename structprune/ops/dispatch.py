"""The op boundary: backend choice and the three gated ops every module calls.

Backends (registered in :mod:`structprune.ops.registry`; each implements :class:`structprune.ops.support.Backend`)
    "torch"  the pure-PyTorch reference (:mod:`structprune.ops.reference`); always available.
    "triton" Triton kernels (``kernels/``, installed as ``structprune._kernels``); CUDA tensors, or CPU
             tensors when ``TRITON_INTERPRET=1`` is set.
    "cpp"    the compiled extension (``csrc/``, ``structprune._C``); CPU tensors, and CUDA when built with CUDA.
    "auto"   for the tensors at hand, the highest-priority backend that can run them: triton then cpp on CUDA,
             cpp on CPU, else torch.

Every op checks its inputs once, here, then runs the chosen backend unless that backend reports a reason against
the inputs (``Backend.not_supported_reasons``: no head left, dropout under ``torch.compile`` without a tensor seed,
an explicit generator, ...); then "auto" tries the next backend and an explicit choice falls back to the reference.
Under ``torch.compile`` the choice is made while the graph is traced and enters it as a constant (see
:func:`_choose`), so no backend is loaded inside the traced region. The chosen :class:`~structprune.ops.support.Backend`
object runs the call itself (its own custom ops, with their autograd, fake and autocast registrations); the public
ops of :mod:`structprune.ops.schema` (``torch.ops.structprune.gated_attention(..., backend)`` and the like, one
schema for every backend) are for callers who name a backend.
:func:`last_backends` says which backend ran each op, :func:`fallback_reasons` why the chosen one did not.
Non-padding 4D masks are refused by the kernel backends. The backends import nothing from this module.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from structprune.ops import schema  # noqa: F401  (defines the public ops torch.ops.structprune.gated_attention, ...)
from structprune.ops import registry as backends
from structprune.ops import reference
from structprune.ops.checks import check_attention_inputs, check_ffn_inputs  # noqa: F401  (part of the op boundary)
from structprune.ops.checks import check_glu_ffn_inputs, check_rotary_attention_inputs
from structprune.ops.checks import check_decoder_attention_inputs, check_decoder_qkv_inputs, run_checked
from structprune.ops.support import OpInputs
from structprune.ops.padding import (banded_key_row, fully_padded, kernel_key_bias, key_bias_from_mask, mask_row,
                                     padded_sequence_output)
from structprune.ops.padding import allowed, causal_key_mask

BACKENDS = backends.names()  # the registered backends at import: ("torch", "triton", "cpp")

_requested = "auto"
_last: dict[str, str] = {}
_why: dict[str, str] = {}
_warned: set[str] = set()


def _provider(name: str):
    """The module behind backend ``name`` (None when it failed to load); for tests and GPU scripts."""
    return backends.module(name)


def availability(name: str, device: torch.device | str = "cpu") -> str | None:
    """None when backend ``name`` can run on ``device``, else the reason it cannot."""
    backends.registration(name)  # unknown names: ValueError
    return backends.availability(name, torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    return [b for b in backends.names() if availability(b, device) is None]


def _how_to_enable(name: str) -> str:
    return backends.registration(name).how_to_enable or "see `structprune info`"


def set_backend(name: str) -> None:
    """Choose the kernel backend: "torch", "triton", "cpp" or "auto" (default), for the whole process.

    An explicit backend that cannot run on CPU or any visible GPU raises at once with the reason.
    """
    global _requested
    if name != "auto":
        backends.registration(name)  # unknown names: ValueError
    if name not in ("auto", "torch"):
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        reasons = [availability(name, d) for d in devices]
        if all(r is not None for r in reasons):
            raise RuntimeError(f"backend {name!r} is not available: {'; '.join(reasons)}. "
                               f"To enable it: {_how_to_enable(name)}.")
    _requested = name


def get_backend() -> str:
    """The backend asked for with :func:`set_backend` ("auto" by default)."""
    return _requested


@contextlib.contextmanager
def use_backend(name: str):
    """``with sp.use_backend("cpp"): ...`` runs the block with backend ``name`` (checked as :func:`set_backend`
    does) and restores the previous choice afterwards, also when the block raises. Process-wide, like
    :func:`set_backend`: not meant for threads that choose different backends at once."""
    saved = _requested
    set_backend(name)
    try:
        yield name
    finally:
        set_backend(saved)


def _order(device: torch.device) -> list[str]:
    """The kernel backends to try on ``device`` under the current choice, in order (the reference, which ends every
    list, not included); "auto"'s are checked for availability one by one, as they are reached, so that a backend
    behind the first available one is never loaded. An explicit backend that cannot run on ``device`` raises."""
    if _requested == "auto":
        return backends.auto_order(device.type)
    reason = availability(_requested, device)
    if reason is not None:
        raise RuntimeError(f"backend {_requested!r} cannot run on {device}: {reason}. Use "
                           f"sp.set_backend('auto') or 'torch', or {_how_to_enable(_requested)}.")
    return [] if _requested == "torch" else [_requested]


def _usable(name: str, device: torch.device) -> bool:
    return _requested != "auto" or availability(name, device) is None


def _warn_no_kernel_backend(device: torch.device) -> None:
    """Say once that "auto" found no compiled backend for ``device`` and runs the reference."""
    if _requested != "auto" or "auto" in _warned or os.environ.get("STRUCTPRUNE_QUIET") == "1":
        return
    _warned.add("auto")
    reasons = "; ".join(f"{n}: {availability(n, device)}" for n in backends.auto_order(device.type))
    warnings.warn(f"structprune: no compiled kernel backend for {device}, using the 'torch' reference ({reasons})",
                  stacklevel=4)


def resolve_backend(device: torch.device | str) -> str:
    """The backend that runs for tensors on ``device`` under the current choice (before any input-dependent
    fallback, see :func:`fallback_reasons`)."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return _resolve_at_trace(_requested, device)
    return _resolve(device)


def _resolve(device: torch.device) -> str:
    for name in _order(device):
        if _usable(name, device):
            return name
    _warn_no_kernel_backend(device)
    return "torch"


# Under torch.compile the backend is chosen while the graph is traced, by running the choice for real (which loads
# the backend modules, reads availability, warns once): dynamo takes the result as a constant instead of tracing
# importlib and the checks. The traced code reads ``_requested`` to pass it, so dynamo guards on it and a later
# set_backend() recompiles; the backends' availability does not change within a process.
@torch.compiler.assume_constant_result
def _resolve_at_trace(requested: str, device: torch.device) -> str:
    return _resolve(device)


@torch.compiler.assume_constant_result
def _choose_at_trace(requested: str, *fields) -> str:
    return _choose_eager(OpInputs(*fields)).name  # fields, not the NamedTuple: dynamo hands constants over as tuples


def _choose(inputs: OpInputs):
    """The backend object that runs ``inputs``: the first usable backend with no reason against them, else the
    reference; the reasons of those passed over are kept for :func:`fallback_reasons`."""
    if torch.compiler.is_compiling():
        return backends.load(_choose_at_trace(_requested, *inputs))
    return _choose_eager(inputs)


def _choose_eager(inputs: OpInputs):
    skipped = []
    chosen = None
    usable = False
    for name in _order(inputs.device):
        if not _usable(name, inputs.device):
            continue
        usable = True
        backend = backends.load(name)
        reasons = backend.not_supported_reasons(inputs)
        if not reasons:
            chosen = backend
            break
        skipped.append(f"{name}: {'; '.join(reasons)}")
    if not usable:
        _warn_no_kernel_backend(inputs.device)
    if skipped:
        _why[inputs.op] = " | ".join(skipped)
    else:
        _why.pop(inputs.op, None)
    return chosen if chosen is not None else backends.load("torch")


def last_backends() -> dict[str, str]:
    """Which backend ran each op last: {"attention": ..., "ffn": ..., "gates": ...}."""
    return dict(_last)


def fallback_reasons() -> dict[str, str]:
    """For each op whose last call did not run the first backend tried: why each skipped backend refused it."""
    return dict(_why)


def reset_last_backends() -> None:
    """Forget which backends ran (e.g. between benchmark cases)."""
    _last.clear()
    _why.clear()


def clear_cache() -> None:
    """Drop every cached packed weight of the kernel backends (``sp.clear_cache()``).

    The ``cpp`` backend packs the kept rows/columns of each layer's weights once and reuses them while the
    weights are unchanged; in-place updates PyTorch tracks (optimizer steps, ``copy_`` / ``add_`` under
    ``no_grad``, ``load_state_dict``) and, on CPU, rewrites of a whole weight through ``.data`` are detected.
    Call this after writing *part* of a weight through ``.data`` (e.g. ``w.data[rows] = 0``), which may not
    be. A no-op when no backend has cached anything."""
    import sys

    ext = sys.modules.get("structprune.backends.cpp.ops")
    if ext is not None and ext.load_error() is None:
        ext.clear_cache()


def _host_seed() -> int:
    """A kernel seed from torch's default generator, so that ``torch.manual_seed`` reproduces every backend."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _graph_seed() -> torch.Tensor:
    """The kernel seed under ``torch.compile``: the draw of :func:`_host_seed`, kept as a one-element CPU tensor so
    that it stays a value computed by the graph on every run."""
    return torch.randint(0, 2**31 - 1, (1,), device="cpu")


def hard_concrete_sample(log_alpha: torch.Tensor, beta: float, generator: torch.Generator | None = None):
    """One hard-concrete sample per entry of ``log_alpha``, differentiable in it.

    Kernel backends with a ``hard_concrete_sample`` draw the noise with a counter-based generator fused with the
    stretch and clamp; the seed comes from torch's default generator, so ``torch.manual_seed`` makes runs
    reproducible on every backend. The reference draws ``torch.rand`` (from ``generator`` when given).
    """
    inputs = OpInputs("hard_concrete", log_alpha.device, log_alpha.dtype, generator=generator is not None,
                      compiling=torch.compiler.is_compiling())
    backend = _choose(inputs)
    if backend.hard_concrete_sample is not None:
        z = backend.hard_concrete_sample(log_alpha, _host_seed(), 0, float(beta))
        _last["gates"] = backend.name
        return z
    u = torch.rand(log_alpha.shape, device=log_alpha.device, generator=generator).clamp(1e-6, 1.0 - 1e-6)
    _last["gates"] = "torch"
    return reference.hard_concrete_from_uniform(log_alpha, u, beta)


def gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads: int,
                    attn_mask=None, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Gated self-attention output projection (see :func:`structprune.ops.reference.gated_attention`).

    ``active_heads`` lists the heads whose gate is non-zero; kernel backends skip all the others. Inputs are
    checked here, for every backend (:func:`check_attention_inputs`).
    """
    check_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, attn_mask,
                           dropout_p)
    backend = _choose(OpInputs("attention", x.device, x.dtype, num_heads=num_heads, dropout_p=float(dropout_p),
                               compiling=torch.compiler.is_compiling()))
    if backend.name == "torch":  # the reference itself: it takes any mask, eager attention and torch's dropout
        if attn_mask is not None and attn_mask.dim() == 2:  # [B, K] padding mask -> [B, 1, 1, K], as SDPA wants
            attn_mask = attn_mask[:, None, None, :]
        out = reference.gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads,
                                        attn_mask=attn_mask, dropout_p=dropout_p, impl=impl)
    else:
        # Under torch.compile the seed is drawn in the graph (a value of each run, from torch's default generator)
        # and the backend's op takes it as a tensor; eager draws it on the host. Either way torch.manual_seed
        # reproduces the run.
        seed = (_graph_seed() if torch.compiler.is_compiling() else _host_seed()) if dropout_p > 0.0 else 0
        row = None if attn_mask is None else mask_row(attn_mask)  # a [B, 1, Q, K] mask is checked once per call
        out = run_checked(backend.gated_attention, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                          kernel_key_bias(row, x.shape[0]), num_heads, dropout_p=float(dropout_p), seed=seed)
        if attn_mask is not None:  # fully padded sequences get what the reference gives them
            out = padded_sequence_output(out, (x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates), num_heads,
                                         attn_mask, row, dropout_p, impl)
    _last["attention"] = backend.name
    return out


def gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """Gated feed-forward projection (see :func:`structprune.ops.reference.gated_ffn`); inputs checked here for
    every backend (:func:`check_ffn_inputs`)."""
    check_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    backend = _choose(OpInputs("ffn", x.device, x.dtype, compiling=torch.compiler.is_compiling()))
    if backend.name == "torch":
        out = reference.gated_ffn(x, w1, b1, w2, b2, unit_gates, activation)
    else:
        out = run_checked(backend.gated_ffn, x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    _last["ffn"] = backend.name
    return out


# --- rotary / sliding-window attention and the GLU FFN (ModernBERT) ----------------------------------------------
def gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads: int, cos, sin,
                           window: int = -1, attn_mask=None, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Gated self-attention with rotary positions and an optional sliding window (see
    :func:`structprune.ops.reference.gated_rotary_attention`); biases may be None.

    ``attn_mask``: HF's mask for the layer ([B, K] padding, or [B, 1, Q, K], which for a sliding layer is already
    banded): the reference applies it as it is; a kernel backend gets its key padding row and ``window``. A
    backend without kernels for rotary positions / the window (``not_supported_reasons``) falls back to the
    reference, as does attention dropout here (the op has no dropout argument)."""
    check_rotary_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, cos, sin,
                                  window, attn_mask, dropout_p)
    backend = _choose(OpInputs("attention", x.device, x.dtype, num_heads=num_heads, dropout_p=float(dropout_p),
                               compiling=torch.compiler.is_compiling(), rotary=True, window=int(window)))
    if backend.name == "torch":
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = reference.banded_key_mask(key_bias_from_mask(attn_mask), x.shape[1], window, x.dtype,
                                                  x.device)
        out = reference.gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads, cos, sin,
                                               window=window, attn_mask=attn_mask, dropout_p=dropout_p, impl=impl)
    else:
        row = banded_key_row(attn_mask)
        out = run_checked(backend.gated_rotary_attention, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates,
                          active_heads, kernel_key_bias(row, x.shape[0]), cos, sin, int(window), num_heads)
        if row is not None and not torch.compiler.is_compiling():  # fully padded sequences: the reference's output
            dead = fully_padded(row).expand(x.shape[0])
            if bool(dead.any()):
                idx = torch.nonzero(dead).flatten()
                mask = attn_mask[idx] if attn_mask.shape[0] == x.shape[0] else attn_mask
                if mask.dim() == 2:
                    mask = mask[:, None, None, :]
                ref = reference.gated_rotary_attention(x[idx], wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads,
                                                       cos if cos.shape[0] == 1 else cos[idx],
                                                       sin if sin.shape[0] == 1 else sin[idx], window=window,
                                                       attn_mask=mask, impl=impl)
                out = out.index_put((idx,), ref.to(out.dtype))
    _last["attention"] = backend.name
    return out


def gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """Gated GLU feed-forward projection (see :func:`structprune.ops.reference.gated_glu_ffn`): unit ``u`` is the
    row pair ``(u, u + I)`` of ``w1`` and column ``u`` of ``w2``; biases may be None."""
    check_glu_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    backend = _choose(OpInputs("ffn", x.device, x.dtype, compiling=torch.compiler.is_compiling(), glu=True))
    if backend.name == "torch":
        out = reference.gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, activation)
    else:
        out = run_checked(backend.gated_glu_ffn, x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    _last["ffn"] = backend.name
    return out


# --- decoder attention with grouped queries (Llama, Mistral, Qwen2, Qwen3) ----------------------------------------
def gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps: float, cos, sin, head_dim: int,
                      active_heads=None, active_kv=None):
    """``(q, k, v)`` of a decoder layer: q [B, A, S, D] of the query heads ``active_heads``, k and v [B, Akv, S, D]
    of the KV heads ``active_kv`` (None: every head), each with its RMSNorm (``q_norm`` / ``k_norm``, Qwen3; else
    None) and the rotary positions ``cos``/``sin`` (see :func:`structprune.ops.reference.gated_decoder_qkv`). What
    this returns is what a KV cache stores."""
    check_decoder_qkv_inputs(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim, active_heads,
                             active_kv)
    backend = _choose(OpInputs("qkv", x.device, x.dtype, compiling=torch.compiler.is_compiling(), decoder=True))
    if backend.name == "torch":
        out = reference.gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, float(eps), cos, sin, head_dim,
                                          active_heads, active_kv)
    else:
        out = run_checked(backend.gated_decoder_qkv, x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, float(eps), cos,
                          sin, head_dim, active_heads, active_kv)
    _last["qkv"] = backend.name
    return out


def gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, window: int = -1, attn_mask=None,
                            dropout_p: float = 0.0, impl: str = "sdpa"):
    """Causal grouped-query attention of the active heads (query head ``active_heads[a]`` reads KV head
    ``q_to_kv[a]`` of k/v) and the gated output projection, ``[B, Sq, E]`` (see
    :func:`structprune.ops.reference.gated_decoder_attention`). The Sq queries are the last Sq of the Sk keys.

    ``attn_mask``: HF's decoder mask for the layer (None, or [B, 1, Sq, Sk] bool or additive): the reference
    applies it as it is; a kernel backend gets its key padding row and ``window`` when they rebuild it exactly
    (:func:`structprune.ops.padding.causal_key_mask`), else the reference runs and ``fallback_reasons`` says why.
    A query with no visible key (a left-padding position) gets a zero context from the kernels, as from HF's SDPA
    layers; HF's eager layers give it a uniform one (padding outputs only)."""
    check_decoder_attention_inputs(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, window, None, dropout_p,
                                   attn_mask)
    inputs = OpInputs("attention", q.device, q.dtype, num_heads=q.shape[1], dropout_p=float(dropout_p),
                      compiling=torch.compiler.is_compiling(), decoder=True)
    backend = _choose(inputs)
    key_mask = None
    if backend.name != "torch":
        key_mask, reason = causal_key_mask(attn_mask, q.shape[2], k.shape[2], int(window))
        if key_mask is not None and key_mask.shape[0] != q.shape[0]:  # a mask of batch 1, for every sequence
            key_mask = key_mask.expand(q.shape[0], -1)
        if reason is not None:
            _why["attention"] = f"{backend.name}: {reason}"
            backend = backends.load("torch")
    if backend.name == "torch":
        if attn_mask is not None and attn_mask.dim() == 2:  # a [B, Sk] key mask: with the causal band and window
            attn_mask = reference.decoder_mask(allowed(attn_mask), q.shape[2], k.shape[2], int(window), q.device)
        out = reference.gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, int(window),
                                                attn_mask=attn_mask, dropout_p=dropout_p, impl=impl)
    else:
        out = run_checked(backend.gated_decoder_attention, q, k, v, wo, bo, head_gates, active_heads, q_to_kv,
                          key_mask, int(window))
    _last["attention"] = backend.name
    return out


# --- row norms for inference ------------------------------------------------------------------------------------
def rms_norm(x, weight, eps: float):
    """HF's RMSNorm of ``x`` over its last axis (:func:`structprune.ops.reference.rms_norm`). Without a gradient
    on the CPU the backend's one-pass kernel runs where it has one (cpp's); otherwise, and under ``torch.compile``,
    the reference. ``last_backends()["norm"]`` says which ran."""
    return _row_norm("rms_norm", lambda: reference.rms_norm(x, weight, float(eps)), x, weight, float(eps))


def layer_norm(x, weight, bias, eps: float):
    """``F.layer_norm(x, x.shape[-1:], weight, bias, eps)``, with the backend's kernel as :func:`rms_norm` (cpp's
    takes fp32 or bf16 ``x`` with fp32 weight and bias: statistics and affine map in fp32, rounded once)."""
    return _row_norm("layer_norm", lambda: torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps),
                     x, weight, bias, float(eps))


def _row_norm(name: str, reference_fn, x, *args):
    out, ran = None, "torch"
    if not torch.compiler.is_compiling():
        chosen = resolve_backend(x.device)
        kernel = getattr(backends.module(chosen), name, None) if chosen != "torch" else None
        out = kernel(x, *args) if kernel is not None else None
        ran = chosen if out is not None else "torch"
    _last["norm"] = ran
    return out if out is not None else reference_fn()


def embedding_layer_norm(ids, type_ids, position_ids, word, types, positions, weight, bias, eps: float,
                         bf16_out: bool = False):
    """``LayerNorm((word[ids] + types[type_ids]) + positions[position_ids])`` (BERT's embedding block, fp32 tables)
    as ``[ids.numel(), E]``, fp32 or bf16, by the backend's kernel (cpp's); None where none applies, and the caller
    runs the model's own module. ``last_backends()["embeddings"]`` says which ran ("cpp" or "torch")."""
    out, ran = None, "torch"
    if not torch.compiler.is_compiling():
        chosen = resolve_backend(ids.device)
        kernel = getattr(backends.module(chosen), "embedding_layer_norm", None) if chosen != "torch" else None
        out = kernel(ids, type_ids, position_ids, word, types, positions, weight, bias, float(eps),
                     bool(bf16_out)) if kernel is not None else None
        ran = chosen if out is not None else "torch"
    _last["embeddings"] = ran
    return out


# --- attention for the serving module ---------------------------------------------------------------------------
def serving_attention(q, k, v, key_bias=None, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + key_bias) v`` for inference as ``[B, Sq, H, D]`` contiguous (``.view(B * Sq, H * D)``
    feeds the output projection); q ``[B, H, Sq, D]``, k and v ``[B, H, Sk, D]``, key_bias ``[B, Sk]`` additive (0 =
    attend, finfo.min = padding) or None; scale defaults to ``1 / sqrt(D)``. The backend's kernel runs where it has
    one that applies (cpp's: fp32 with AVX-512F or bf16 with AVX512-BF16, head_dim a multiple of 16 up to 128), ATen's
    SDPA with the mask ``key_bias[:, None, None, :]`` otherwise; ``last_backends()["attention"]`` says which ("cpp"
    or "sdpa")."""
    return serving_attention_ran(q, k, v, key_bias, scale)[0]


def serving_attention_ran(q, k, v, key_bias=None, scale: float | None = None) -> tuple[torch.Tensor, str]:
    """:func:`serving_attention` and the name of what ran ("cpp" or "sdpa"), for callers that record it per module
    (several threads may call it at once)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, ran = None, "sdpa"
    if not torch.compiler.is_compiling():
        chosen = resolve_backend(q.device)
        kernel = getattr(backends.module(chosen), "serving_attention", None) if chosen != "torch" else None
        out = kernel(q, k, v, key_bias, scale) if kernel is not None else None
        ran = chosen if out is not None else "sdpa"
    if out is None:
        mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.transpose(1, 2).contiguous()
    _last["attention"] = ran
    return out, ran
