"""What a kernel backend implements and the helpers its ops use; the bottom of the op stack.

A backend module (``structprune.backends.cpp.ops``, ``structprune._kernels``, or a new one) defines ``BACKEND =
Backend(...)`` and is registered with a priority in :mod:`structprune.ops.registry`; the dispatcher
(:mod:`structprune.ops.dispatch`) checks the inputs once, then runs the highest-priority backend whose
:attr:`Backend.not_supported_reasons` is empty for them. This module imports nothing from structprune, so
backends never import the dispatcher.

The op contract (every backend, the same arguments; see :mod:`structprune.ops.reference` for the shapes):

* ``gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads,
  dropout_p=0.0, seed=0)`` -> ``[B, S, E]``; ``key_bias`` is a ``[B, S]`` fp32 additive key mask or None;
  ``dropout_p > 0`` only when the backend reports no reason against it, ``seed`` drawn by the dispatcher (an
  ``int``, or under ``torch.compile`` a one-element int64 CPU tensor drawn in the graph, for backends that declare
  ``takes_tensor_seed``).
* ``gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation)`` -> ``[B, S, E]``.
* ``hard_concrete_sample(log_alpha, seed, offset, beta)`` -> a sample shaped like ``log_alpha`` whose noise
  is the backend's own counter-based stream ``hard_concrete_uniform(n, seed, offset, device)``.
* optional: ``gated_rotary_attention`` / ``gated_glu_ffn`` (ModernBERT), and the decoder pair
  ``gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim, active_heads,
  active_kv)`` -> ``(q, k, v)`` and ``gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv,
  key_mask, window)`` -> ``[B, Sq, E]`` (the KV cache update sits between them; see
  :mod:`structprune.ops.reference`'s decoder section for the shapes).

Each is differentiable in every floating tensor argument but ``key_bias``; the backward ops take an
``output_mask`` (:func:`grad_output_mask`) and skip the gradients nobody asked for.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

OPS = ("attention", "ffn", "hard_concrete", "qkv")


class OpInputs(NamedTuple):
    """What a backend may refuse a call for (a NamedTuple, so ``torch.compile`` traces it for free)."""
    op: str  # one of OPS
    device: torch.device
    dtype: torch.dtype
    num_heads: int = -1  # attention only
    dropout_p: float = 0.0  # attention only
    generator: bool = False  # hard_concrete only: an explicit torch.Generator was given
    compiling: bool = False  # traced by torch.compile
    rotary: bool = False  # attention only: rotary positions between the projections and the attention
    window: int = -1  # attention only: a sliding window (keys within |q - k| <= window), -1 for none
    glu: bool = False  # ffn only: a GLU FFN (w1 holds the input and the gate halves)
    decoder: bool = False  # the decoder pair: gated_decoder_qkv ("qkv") and gated_decoder_attention ("attention")


def _never(device: torch.device) -> bool:
    return False


@dataclass(frozen=True)
class Backend:
    """One kernel backend: its name, whether it can run on a device, what it supports, and its ops.

    ``availability(device)`` is None when the backend can run on ``device``, else the reason. What a backend
    supports is declared (``supports_attention_dropout(device)``, ``takes_tensor_seed``, ``hard_concrete_sample``
    present or not, ``reference``), and :meth:`not_supported_reasons` derives from it why it cannot run a call, as
    xformers' op classes do; ``extra_reasons(inputs)`` adds a backend's own. The dispatcher then falls back to the
    next backend. ``hard_concrete_sample`` / ``hard_concrete_uniform`` may be None (the reference samples
    instead). ``module`` is the Python module behind the backend, for its extras.
    """
    name: str
    availability: Callable[[torch.device], Optional[str]]
    gated_attention: Callable
    gated_ffn: Callable
    hard_concrete_sample: Optional[Callable] = None
    hard_concrete_uniform: Optional[Callable] = None
    gated_rotary_attention: Optional[Callable] = None  # rotary / sliding-window attention (None: not implemented)
    gated_glu_ffn: Optional[Callable] = None  # the GLU FFN (None: not implemented)
    gated_decoder_qkv: Optional[Callable] = None  # decoder q/k/v projection + q/k norm + rotary (None: not implemented)
    gated_decoder_attention: Optional[Callable] = None  # causal grouped-query attention + gated wo (None: idem)
    supports_attention_dropout: Callable[[torch.device], bool] = _never
    takes_tensor_seed: bool = False  # gated_attention also takes the dropout seed as a one-element int64 CPU tensor
    reference: bool = False  # computes everything: refuses nothing
    extra_reasons: Optional[Callable[[OpInputs], list]] = None
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    module: object = None

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        """Why this backend cannot run the call described by ``inputs`` (empty: it can)."""
        reasons = [] if self.reference else _kernel_reasons(self, inputs)
        return reasons + (list(self.extra_reasons(inputs)) if self.extra_reasons is not None else [])


def _kernel_reasons(backend: Backend, inputs: OpInputs) -> list[str]:
    """The reasons every compiled backend shares: what only the reference computes, and what ``backend`` does
    not declare."""
    reasons = []
    if (inputs.rotary or inputs.window >= 0) and backend.gated_rotary_attention is None:
        reasons.append("rotary positions / a sliding-window key mask (no gated_rotary_attention kernel)")
    if inputs.glu and backend.gated_glu_ffn is None:
        reasons.append("a GLU FFN (no gated_glu_ffn kernel)")
    if inputs.decoder and (backend.gated_decoder_qkv is None or backend.gated_decoder_attention is None):
        reasons.append("decoder grouped-query attention (no gated_decoder_qkv / gated_decoder_attention kernels)")
    if inputs.op == "attention":
        if inputs.num_heads == 0:
            reasons.append("no head left (the layer is its output bias, which the reference returns)")
        if inputs.dropout_p > 0.0:
            if inputs.rotary or inputs.window >= 0 or inputs.decoder:
                reasons.append("attention dropout with rotary positions (the rotary ops have no dropout: reference)")
            elif inputs.compiling and not backend.takes_tensor_seed:
                reasons.append("attention dropout under torch.compile (this backend takes no tensor seed, and a "
                               "host-side seed would break the graph)")
            elif not backend.supports_attention_dropout(inputs.device):
                reasons.append(f"no fused attention dropout on {inputs.device.type}")
    elif inputs.op == "hard_concrete":
        if backend.hard_concrete_sample is None:
            reasons.append("no hard_concrete_sample")
        if inputs.generator:
            reasons.append("an explicit torch.Generator (only the reference draws from it)")
        if inputs.compiling:
            reasons.append("gate sampling under torch.compile (a host-side seed would break the graph)")
    return reasons


# --- autograd helpers of the backward ops -----------------------------------------------------------------------
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


def grad_placeholders(output_mask, x, weights, gates, factory=torch.empty) -> tuple:
    """Gradient outputs of a backward op, for its fake kernel or to fill: ``(dx, *dweights, dgates)`` made by
    ``factory`` with each input's shape, dtype and device, shape ``[0]`` where ``output_mask`` (x, weights,
    gates) leaves them out. ``weights``: tensors, or ``(tensor, shape)`` pairs for a gradient shaped otherwise
    (a bias that the backward op gets only through its weight)."""
    need_x, need_w, need_g = output_mask
    specs = [(x, x.shape, need_x)]
    specs += [(w, w.shape, need_w) if isinstance(w, torch.Tensor) else (w[0], w[1], need_w) for w in weights]
    specs.append((gates, gates.shape, need_g))
    return tuple(factory(tuple(shape) if need else (0,), dtype=t.dtype, device=t.device) for t, shape, need in specs)


# --- autocast ------------------------------------------------------------------------------------------------------
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
