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
an ``output_mask`` (:func:`grad_output_mask`) and skip the gradients nobody asked for. A backend that also has
``supports_attention_dropout(device) -> bool`` takes ``dropout_p``, ``seed`` (attention-probability dropout with
its own counter-based mask, seeded from torch's default generator); otherwise dropout runs on the reference
path. Non-padding 4D masks are refused by the kernel backends. :func:`last_backends` says which backend ran
each op.
"""
from __future__ import annotations

import importlib
import os
import warnings
import weakref

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


def clear_cache() -> None:
    """Drop every cached packed weight of the kernel backends (``sp.clear_cache()``).

    The ``cpp`` backend packs the kept rows/columns of each layer's weights once and reuses them while the
    weights are unchanged; in-place updates PyTorch tracks (optimizer steps, ``copy_`` / ``add_`` under
    ``no_grad``, ``load_state_dict``) and, on CPU, rewrites of a whole weight through ``.data`` are detected.
    Call this after writing *part* of a weight through ``.data`` (e.g. ``w.data[rows] = 0``), which may not
    be. A no-op when no backend has cached anything."""
    import sys

    ext = sys.modules.get("structprune._extension")
    if ext is not None and ext.load_error() is None:
        ext.clear_cache()


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


_AUTOCAST_DEVICES = ("cpu", "cuda")


def register_autocast(qualname: str, keep: tuple[str, ...] = (), lib=None) -> None:
    """Autocast rule for the kernel op ``qualname`` (e.g. ``"structprune::cpp_gated_ffn"``), as
    :func:`torch.library.register_autocast` but following the autocast dtype of the region (bf16 or fp16)
    instead of one fixed dtype, and leaving the tensor arguments named in ``keep`` as they are (gates and the
    fp32 key bias, which the reference also keeps in fp32).

    In a ``torch.autocast(device, dtype)`` region the other floating tensors on ``device`` are cast to
    ``dtype`` (differentiable casts: the gradients of fp32 parameters come back in fp32), and the op runs with
    autocast off, computing in ``dtype`` with fp32 accumulation; it returns ``dtype`` like the reference's
    ``F.linear`` does under autocast. Outside autocast nothing changes.
    """
    op = torch._library.utils.lookup_op(qualname)
    names = [a.name for a in op._schema.arguments]
    unknown = set(keep) - set(names)
    if unknown:
        raise ValueError(f"{qualname} has no argument(s) {sorted(unknown)}; its arguments are {names}")
    keep_idx = {names.index(n) for n in keep}
    namespace, opname = qualname.split("::")
    lib = lib if lib is not None else _autocast_lib(namespace)
    for device_type in _AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        with warnings.catch_warnings():  # torch.library.custom_op ops come with a pass-through autocast kernel
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            lib.impl(opname, _autocast_kernel(op, device_type, getattr(torch._C.DispatchKey, key), keep_idx), key,
                     with_keyset=True)


_autocast_libs: dict[str, object] = {}


def _autocast_lib(namespace: str):
    if namespace not in _autocast_libs:
        _autocast_libs[namespace] = torch.library.Library(namespace, "IMPL")
    return _autocast_libs[namespace]


def _autocast_kernel(op, device_type: str, dispatch_key, keep_idx: set[int]):
    names = [a.name for a in op._schema.arguments]

    def cast(i, a):
        if (i in keep_idx or not isinstance(a, torch.Tensor) or not a.is_floating_point()
                or a.dtype == torch.float64 or a.device.type != device_type):
            return a
        return a.to(torch.get_autocast_dtype(device_type))

    def kernel(_keyset, *args, **kwargs):
        args = [cast(i, a) for i, a in enumerate(args)]
        kwargs = {k: cast(names.index(k), v) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            return op(*args, **kwargs)

    return kernel


_checked_mask: list = []  # [(weakref to the last 4D mask checked, its version)]: every layer gets the same mask


def _mask_row(attn_mask: torch.Tensor) -> torch.Tensor:
    """The [B, K] key row of an HF padding mask [B, K] or [B, 1, Q|1, K]; refuses masks that vary over queries.

    HF materialises [B, 1, Q, K]; the check (a pass over the mask and a host sync) is done once per mask, not
    once per layer."""
    if attn_mask.dim() == 2:
        return attn_mask
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1:
        raise ValueError(f"attention mask must be a padding mask [B, K] or [B, 1, Q, K], got shape "
                         f"{tuple(attn_mask.shape)}")
    row = attn_mask[:, 0, 0, :]
    if attn_mask.shape[2] > 1 and attn_mask.stride(2) != 0 and not torch.compiler.is_compiling():
        if _checked_mask and _checked_mask[0][0]() is attn_mask and _checked_mask[0][1] == attn_mask._version:
            return row
        if not bool((attn_mask == row[:, None, None, :]).all()):
            raise ValueError("the kernel backends take padding masks only (the same key mask for every query); "
                             "this [B, 1, Q, K] attention mask varies over the query axis. Use "
                             "sp.set_backend('torch') for causal or other per-query masks")
        if not attn_mask.is_inference():
            _checked_mask[:] = [(weakref.ref(attn_mask), attn_mask._version)]
    return row


def key_bias_from_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF padding mask [B, K] or [B, 1, Q|1, K] (bool: True = attend, or additive float) -> [B, K] fp32 additive
    bias (0 = attend, ``finfo(float32).min`` = padding). A mask that varies over the query axis is refused."""
    if attn_mask is None:
        return None
    row = _mask_row(attn_mask)
    if row.dtype == torch.bool:
        neg = torch.finfo(torch.float32).min
        return torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill(~row, neg)
    return row.to(torch.float32).clamp_min(torch.finfo(torch.float32).min)


def _fully_padded(attn_mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: the sequences whose every key is masked out (no host sync)."""
    row = _mask_row(attn_mask)
    if row.dtype == torch.bool:
        return ~row.any(-1)
    # HF writes finfo(dtype).min for padding in additive masks; anything below half of it counts as masked
    return (row.float() <= torch.finfo(row.dtype).min / 2).all(-1)


def _padded_sequence_output(y, args, num_heads, attn_mask, dropout_p, impl):
    """Give fully padded sequences what the reference (and HF's attention) gives them.

    Boolean masks (HF's SDPA layers): SDPA returns a zero context for a query with no key to attend to, so
    the output is the bias ``bo``. Additive masks (HF's eager layers): every score is ``finfo.min`` after the
    add, the softmax is uniform and the context is the mean of the values; these sequences (rare: they cost
    one host sync to find) run through the reference, so that gradients match too. The kernels got a zero key
    bias for them (finite in every dtype) and their rows of ``y`` are replaced here.
    """
    dead = _fully_padded(attn_mask).expand(y.shape[0])  # a mask may have batch 1, broadcast over the batch
    bo = args[8]
    if _mask_row(attn_mask).dtype == torch.bool:
        return torch.where(dead[:, None, None], bo.to(y.dtype).expand_as(y), y)
    if torch.compiler.is_compiling() or not bool(dead.any()):
        return y
    idx = torch.nonzero(dead).flatten()
    mask = attn_mask[idx] if attn_mask.shape[0] == y.shape[0] else attn_mask
    y_dead = reference.gated_attention(args[0][idx], *args[1:], num_heads, attn_mask=mask, dropout_p=dropout_p,
                                       impl=impl)
    return y.index_put((idx,), y_dead.to(y.dtype))


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


# --- input checks: once, above every backend, so the same bad input gets the same error everywhere ---------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t, shape: tuple, x: torch.Tensor, same_dtype: bool = True) -> None:
    """``t`` must be a tensor on x's device of ``shape`` (None entries free), floating, and of x's dtype when
    ``same_dtype`` (not under autocast, whose rule casts the parameters)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if same_dtype and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")


_checked_index: dict[int, tuple] = {}  # id -> (weakref, version, n) of index tensors found valid


def _check_index(name: str, idx, n: int, x: torch.Tensor) -> None:
    """Sorted unique int64 indices into range(n), on the CPU or x's device (values checked on the CPU only:
    no device sync)."""
    if idx is None:
        return
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"{name} must be a 1-D int64 tensor, got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} of shape {list(getattr(idx, 'shape', []))}")
    if idx.device != x.device and idx.device.type != "cpu":
        raise ValueError(f"{name} must be on {x.device} or the CPU, got {idx.device}")
    if idx.numel() > n:
        raise ValueError(f"{name} has {idx.numel()} entries for {n} gates")
    if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
        key = id(idx)
        hit = _checked_index.get(key)
        if hit is not None and hit[0]() is idx and hit[1:] == (idx._version, n):
            return  # the gates' cached index: checked on an earlier call and unchanged since
        if int(idx.min()) < 0 or int(idx.max()) >= n or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            raise ValueError(f"{name} must hold sorted unique indices in [0, {n}), got {idx.tolist()[:8]}...")
        if not idx.is_inference():
            if len(_checked_index) >= 512:
                _checked_index.clear()
            _checked_index[key] = (weakref.ref(idx), idx._version, n)


def check_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads,
                           attn_mask=None, dropout_p=0.0) -> None:
    """Raise a ValueError/TypeError saying what was expected unless the inputs of :func:`gated_attention` fit."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor [B, S, E], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {list(getattr(x, 'shape', []))}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 0:
        raise ValueError(f"num_heads must be an int >= 0, got {num_heads!r}")
    B, S, E = x.shape
    _check_tensor("wq", wq, (None, E), x)
    HD = wq.shape[0]
    if (num_heads == 0) != (HD == 0) or (num_heads and HD % num_heads):
        raise ValueError(f"wq has {HD} rows, not num_heads * head_dim with num_heads = {num_heads}")
    for name, t, shape in (("bq", bq, (HD,)), ("wk", wk, (HD, E)), ("bk", bk, (HD,)), ("wv", wv, (HD, E)),
                           ("bv", bv, (HD,)), ("wo", wo, (E, HD)), ("bo", bo, (E,))):
        _check_tensor(name, t, shape, x)
    _check_tensor("head_gates", head_gates, (num_heads,), x, same_dtype=False)
    _check_index("active_heads", active_heads, num_heads, x)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != x.device:
            raise ValueError(f"attention mask must be a tensor on {x.device}, got "
                             f"{getattr(attn_mask, 'device', type(attn_mask).__name__)}")
        if attn_mask.shape[0] not in (1, B) or attn_mask.shape[-1] != S:
            raise ValueError(f"attention mask must be [B, K] or [B, 1, Q, K] with B = {B}, K = {S}, got shape "
                             f"{tuple(attn_mask.shape)}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def check_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation) -> None:
    """Raise a ValueError/TypeError saying what was expected unless the inputs of :func:`gated_ffn` fit."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor [B, S, E], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {list(getattr(x, 'shape', []))}")
    E = x.shape[-1]
    _check_tensor("w1", w1, (None, E), x)
    n = w1.shape[0]
    for name, t, shape in (("b1", b1, (n,)), ("w2", w2, (E, n)), ("b2", b2, (E,))):
        _check_tensor(name, t, shape, x)
    _check_tensor("unit_gates", unit_gates, (n,), x, same_dtype=False)
    _check_index("kept_units", kept_units, n, x)
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")


def gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads: int,
                    attn_mask=None, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Gated self-attention output projection (see :func:`structprune.reference.gated_attention`).

    ``active_heads`` lists the heads whose gate is non-zero; kernel backends skip all the others. Inputs are
    checked here, for every backend (:func:`check_attention_inputs`).
    """
    check_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, attn_mask,
                           dropout_p)
    backend = resolve_backend(x.device)
    if num_heads == 0:  # no head left: the layer is just the output bias, which the reference returns as is
        backend = "torch"
    provider = _providers.get(backend)
    dropout = {}
    if dropout_p > 0.0 and backend != "torch":
        supports = getattr(provider, "supports_attention_dropout", None)
        if torch.compiler.is_compiling() or supports is None or not supports(x.device):
            backend = "torch"  # traced (a host-side seed would break the graph), or no fused dropout here
        else:  # the seed comes from torch's default generator, as for the gate sampling: manual_seed reproduces
            dropout = dict(dropout_p=float(dropout_p), seed=int(torch.randint(0, 2**31 - 1, (1,)).item()))
    if backend != "torch":
        key_bias = key_bias_from_mask(attn_mask)
        if key_bias is not None:  # fully padded sequences: finite scores here, their output is set below
            key_bias = key_bias.expand(x.shape[0], -1).masked_fill(_fully_padded(attn_mask)[:, None], 0.0)
        out = provider.gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias,
                                       num_heads, **dropout)
        if attn_mask is not None:
            out = _padded_sequence_output(out, (x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates), num_heads,
                                          attn_mask, dropout_p, impl)
    else:
        out = reference.gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads,
                                         attn_mask=attn_mask, dropout_p=dropout_p, impl=impl)
    _last["attention"] = backend
    return out


def gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """Gated feed-forward projection (see :func:`structprune.reference.gated_ffn`); inputs checked here for
    every backend (:func:`check_ffn_inputs`)."""
    check_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    backend = resolve_backend(x.device)
    if backend != "torch":
        out = _providers[backend].gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation)
    else:
        out = reference.gated_ffn(x, w1, b1, w2, b2, unit_gates, activation)
    _last["ffn"] = backend
    return out
