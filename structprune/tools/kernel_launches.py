"""Recording the Triton kernel launches of ``structprune kernels``: the Triton ops' implementations run on ``meta``
tensors (forward with and without saved intermediates, backward for the gradient sets training uses, with and
without a padding mask and attention dropout, hard-concrete sampling, the decoder attention) while every launch is
recorded instead of run. :mod:`structprune.tools.kernel_report` compiles and reports them."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class Shape:
    """An encoder layer's shape: what the kernels are compiled and launched for."""
    hidden: int
    heads: int
    intermediate: int
    activation: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}


@dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    op: str


@contextlib.contextmanager
def record_launches(sink: list, op: str):
    """Inside the block, Triton kernel launches append a :class:`Launch` to ``sink`` instead of running (in
    every thread: the launch method is swapped on the class)."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(self, args, kwargs, tuple(grid) if not callable(grid) else grid, op))

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def _impl(custom_op):
    """The Python implementation behind a ``torch.library.custom_op`` (called directly so that it runs on
    ``meta`` tensors instead of dispatching to the fake kernel)."""
    return custom_op._init_fn


def _call(fn, **named):
    """``fn`` called positionally with ``named`` in its parameter order; parameters not in ``named`` take their
    defaults (so optional parameters added to the ops later do not break the report)."""
    args = []
    for name, param in inspect.signature(fn).parameters.items():
        if name in named:
            args.append(named[name])
        elif param.default is not inspect.Parameter.empty:
            args.append(param.default)
        else:
            raise TypeError(f"structprune kernels does not know what to pass for {fn.__name__}'s argument {name!r}")
    return fn(*args)


def _attention_launches(shape: Shape, dtype, heads_kept: float, batch: int, seq: int, sink: list) -> None:
    from structprune._kernels import attention as A

    E, H, D = shape.hidden, shape.heads, shape.head_dim

    def meta(*s, dt=dtype):
        return torch.empty(s, dtype=dt, device="meta")

    active = torch.empty((max(1, round(H * heads_kept)),), dtype=torch.int64, device="meta")
    w = dict(x=meta(batch, seq, E), wq=meta(H * D, E), bq=meta(H * D), wk=meta(H * D, E), bk=meta(H * D),
             wv=meta(H * D, E), bv=meta(H * D), wo=meta(E, H * D), bo=meta(E), head_gates=meta(H),
             active_heads=active, num_heads=H)
    forward, backward = _impl(A.triton_gated_attention), _impl(A.triton_gated_attention_backward)
    # attention-probability dropout in training (BERT's default 0.1), when the kernels have it
    dropouts = (0.0, 0.1) if "dropout_p" in inspect.signature(forward).parameters else (0.0,)
    for key_bias in (None, meta(batch, seq, dt=torch.float32)):
        padded = "padded" if key_bias is not None else "unpadded"
        with record_launches(sink, f"attention forward, inference, {padded}"):
            _call(forward, **w, key_bias=key_bias, save_for_backward=False)
        for p in dropouts:
            train = f"training, dropout {p}, {padded}"
            with record_launches(sink, f"attention forward, {train}"):
                y, q, k, v, ctx, o, stats = _call(forward, **w, key_bias=key_bias, save_for_backward=True,
                                                  dropout_p=p, seed=1)
            for mask, what in (((True, True, True), "all grads"), ((True, False, True), "frozen weights"),
                               ((False, False, True), "gates only")):
                with record_launches(sink, f"attention backward, {what}, {train}"):
                    _call(backward, dy=meta(batch, seq, E), **w, key_bias=key_bias, q=q, k=k, v=v, ctx=ctx, o=o,
                          stats=stats, output_mask=list(mask), dropout_p=p, seed=1)
    if hasattr(A, "attention_dropout_scale"):  # the dropout multipliers on their own (the tests' oracle)
        with record_launches(sink, "attention dropout mask"):
            A.attention_dropout_scale(batch, H, seq, active, 0.1, 1)


def _ffn_launches(shape: Shape, dtype, ffn_kept: float, batch: int, seq: int, sink: list) -> None:
    from structprune._kernels import ffn as F

    E, I = shape.hidden, shape.intermediate

    def meta(*s):
        return torch.empty(s, dtype=dtype, device="meta")

    kept = torch.empty((max(1, round(I * ffn_kept)),), dtype=torch.int64, device="meta")
    w = dict(x=meta(batch, seq, E), w1=meta(I, E), b1=meta(I), w2=meta(E, I), b2=meta(E), unit_gates=meta(I),
             kept_units=kept, activation=shape.activation)
    with record_launches(sink, "ffn forward, inference"):
        _call(_impl(F.triton_gated_ffn), **w, save_for_backward=False)
    with record_launches(sink, "ffn forward, training"):
        _, pre, h = _call(_impl(F.triton_gated_ffn), **w, save_for_backward=True)
    for mask, what in (((True, True, True), "all grads"), ((True, False, True), "frozen weights"),
                       ((False, False, True), "gates only")):
        with record_launches(sink, f"ffn backward, {what}"):
            _call(_impl(F.triton_gated_ffn_backward), dy=meta(batch, seq, E), **w, pre=pre, h=h,
                  output_mask=list(mask))


def _glu_ffn_launches(shape: Shape, dtype, ffn_kept: float, batch: int, seq: int, sink: list) -> None:
    """The GLU FFN (ModernBERT's, ``intermediate`` units of two weight rows each), with and without biases."""
    from structprune._kernels import glu_ffn as G

    E, I = shape.hidden, shape.intermediate

    def meta(*s):
        return torch.empty(s, dtype=dtype, device="meta")

    kept = torch.empty((max(1, round(I * ffn_kept)),), dtype=torch.int64, device="meta")
    for bias in (False, True):
        w = dict(x=meta(batch, seq, E), w1=meta(2 * I, E), b1=meta(2 * I) if bias else None, w2=meta(E, I),
                 b2=meta(E) if bias else None, unit_gates=meta(I), kept_units=kept, activation=shape.activation)
        with record_launches(sink, "glu ffn forward, inference"):
            _call(_impl(G.triton_gated_glu_ffn), **w, save_for_backward=False)
        with record_launches(sink, "glu ffn forward, training"):
            _, pre, h = _call(_impl(G.triton_gated_glu_ffn), **w, save_for_backward=True)
        for mask, what in (((True, True, True), "all grads"), ((False, False, True), "gates only")):
            with record_launches(sink, f"glu ffn backward, {what}"):
                _call(_impl(G.triton_gated_glu_ffn_backward), dy=meta(batch, seq, E), **w, pre=pre, h=h,
                      has_b1=bias, has_b2=bias, output_mask=list(mask))


def _rotary_attention_launches(shape: Shape, dtype, heads_kept: float, batch: int, seq: int, sink: list) -> None:
    """Rotary attention, global (no window) and local (a window of ``min(128, seq // 4)``: the banded kernels),
    with and without a padding mask; ModernBERT's layers have no biases."""
    from structprune._kernels import rotary_attention as R

    E, H, D = shape.hidden, shape.heads, shape.head_dim

    def meta(*s, dt=dtype):
        return torch.empty(s, dtype=dt, device="meta")

    active = torch.empty((max(1, round(H * heads_kept)),), dtype=torch.int64, device="meta")
    w = dict(x=meta(batch, seq, E), wq=meta(H * D, E), bq=None, wk=meta(H * D, E), bk=None, wv=meta(H * D, E),
             bv=None, wo=meta(E, H * D), bo=None, head_gates=meta(H), active_heads=active,
             cos=meta(1, seq, D, dt=torch.float32), sin=meta(1, seq, D, dt=torch.float32), num_heads=H)
    forward, backward = _impl(R.triton_gated_rotary_attention), _impl(R.triton_gated_rotary_attention_backward)
    for window in (-1, min(128, seq // 4)):
        for key_bias in (None, meta(batch, seq, dt=torch.float32)):
            what = f"{'local' if window >= 0 else 'global'}, {'padded' if key_bias is not None else 'unpadded'}"
            with record_launches(sink, f"rotary attention forward, inference, {what}"):
                _call(forward, **w, key_bias=key_bias, window=window, save_for_backward=False)
            with record_launches(sink, f"rotary attention forward, training, {what}"):
                y, q, k, v, ctx, o, stats = _call(forward, **w, key_bias=key_bias, window=window,
                                                  save_for_backward=True)
            with record_launches(sink, f"rotary attention backward, all grads, {what}"):
                _call(backward, dy=meta(batch, seq, E), **w, key_bias=key_bias, window=window,
                      biases=[False] * 4, q=q, k=k, v=v, ctx=ctx, o=o, stats=stats, output_mask=[True] * 3)


def _gate_launches(shape: Shape, sink: list) -> None:
    from structprune._kernels import hard_concrete as HC

    for n in (shape.heads, shape.intermediate):
        la = torch.empty((n,), dtype=torch.float32, device="meta")  # gates are fp32 parameters, also under autocast
        with record_launches(sink, "hard-concrete sample"):
            _call(_impl(HC.triton_hard_concrete_sample), log_alpha=la, seed=1, offset=0, beta=2.0 / 3.0)
        with record_launches(sink, "hard-concrete backward"):
            _call(_impl(HC.triton_hard_concrete_sample_backward), grad=torch.empty_like(la), log_alpha=la, seed=1,
                  offset=0, beta=2.0 / 3.0)
    with record_launches(sink, "hard-concrete noise"):
        HC.hard_concrete_uniform(shape.intermediate, 1, 0, "meta")


@contextlib.contextmanager
def _matmul_precision(precision: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _decoder_launches(shape: Shape, dtype, heads_kept: float, batch: int, seq: int, sink: list) -> None:
    """The decoder attention (grouped queries: a KV head per 4 query heads, Llama-3's ratio): prefill with and
    without key padding and a sliding window, its backward, and a decode step (one query against ``seq`` keys)."""
    from structprune._kernels import decoder_attention as DA

    H, D = shape.heads, shape.head_dim
    A = max(1, round(H * heads_kept))
    kv = max(1, min(A, H // 4))

    def meta(*s, dt=dtype):
        return torch.empty(s, dtype=dt, device="meta")

    q_to_kv = torch.empty((A,), dtype=torch.int64, device="meta")
    forward, backward = _impl(DA.triton_decoder_attention), _impl(DA.triton_decoder_attention_backward)
    for key_mask, window in ((None, -1), (meta(batch, seq, dt=torch.bool), -1), (None, 4096)):
        what = ("padded" if key_mask is not None else "unpadded") + (", window" if window > 0 else "")
        k, v = meta(batch, kv, seq, D), meta(batch, kv, seq, D)
        with record_launches(sink, f"decoder attention forward, {what}"):
            ctx, stats = _call(forward, q=meta(batch, A, seq, D), k=k, v=v, q_to_kv=q_to_kv, key_mask=key_mask,
                               window=window, scale=D ** -0.5)
        with record_launches(sink, f"decoder attention backward, {what}"):
            _call(backward, dctx=meta(batch, A, seq, D), q=meta(batch, A, seq, D), k=k, v=v, ctx=ctx, stats=stats,
                  q_to_kv=q_to_kv, key_mask=key_mask, window=window, scale=D ** -0.5)
    with record_launches(sink, "decoder attention forward, decode step"):
        _call(forward, q=meta(batch, A, 1, D), k=meta(batch, kv, seq, D), v=meta(batch, kv, seq, D), q_to_kv=q_to_kv,
              key_mask=None, window=-1, scale=D ** -0.5)


OPS = ("attention", "ffn", "gates", "rotary_attention", "glu_ffn", "decoder")


def collect_launches(shape: Shape, cc: tuple[int, int], dtype_name: str, heads_kept: float, ffn_kept: float,
                     batch: int, seq: int, ops=OPS) -> list[Launch]:
    """Every kernel launch the Triton ops in ``ops`` make for this case, with the configs chosen for ``cc``."""
    from structprune._kernels import _configs

    sink: list[Launch] = []
    dtype = DTYPES[dtype_name]
    with _configs.target(cc), _matmul_precision("high" if dtype_name == "tf32" else "highest"):
        if "attention" in ops:
            _attention_launches(shape, dtype, heads_kept, batch, seq, sink)
        if "ffn" in ops:
            _ffn_launches(shape, dtype, ffn_kept, batch, seq, sink)
        if "gates" in ops:
            _gate_launches(shape, sink)
        if "rotary_attention" in ops:
            _rotary_attention_launches(shape, dtype, heads_kept, batch, seq, sink)
        if "glu_ffn" in ops:
            _glu_ffn_launches(shape, dtype, ffn_kept, batch, seq, sink)
        if "decoder" in ops:
            _decoder_launches(shape, dtype, heads_kept, batch, seq, sink)
    return sink
