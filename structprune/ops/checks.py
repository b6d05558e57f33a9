"""Input checks of the gated ops: the one copy, run by the dispatcher (:mod:`structprune.ops`) and by every
backend's op entry (``structprune.backends.cpp.ops``, ``structprune._kernels``, ``structprune.backends.pytorch``), so that
the same bad input gets the same error, saying what was expected and what came, whichever backend runs it and
however it is reached. They run once per call: the dispatcher calls a backend entry through :func:`run_checked`,
inside which the entry's copy is skipped (eager only; a kernel entry still refuses what only the reference takes).
The C++ ops keep only the checks that guard their memory (csrc/checks.h).

The contract (see :mod:`structprune.ops.support` for the ops): x is float32, float16 or bfloat16, [B, S, E] for
attention and [..., E] for the FFN (position-wise); weights and biases are on x's device, of x's dtype (unless
autocast, whose rule casts them, is on) and of the nn.Linear shapes; the gates are floating, one per head / unit;
the kept index (``active_heads`` / ``kept_units``) holds sorted unique int64 indices, on x's device or the CPU
(values checked on the CPU only: no device sync); ``key_bias`` is a [B, S] float32 additive key mask; dropout's
``p`` is in [0, 1) and its ``seed`` / ``offset`` are ints in [0, 2**63).
"""
from __future__ import annotations

import threading
import weakref

import torch

from structprune.ops.activations import check_activation

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_upstream = threading.local()  # .depth > 0: inside run_checked on this thread


def run_checked(entry, *args, **kwargs):
    """``entry(*args, **kwargs)``, a backend's op entry called by the dispatcher on inputs it has just checked: the
    entry's own checks are skipped (a decode step saves ~0.1 ms per op). Under ``torch.compile`` both run (the
    checks cost nothing in the compiled graph)."""
    if torch.compiler.is_compiling():
        return entry(*args, **kwargs)
    _upstream.depth = getattr(_upstream, "depth", 0) + 1
    try:
        return entry(*args, **kwargs)
    finally:
        _upstream.depth -= 1


def _checked_upstream(*required) -> bool:
    """Whether the dispatcher checked this call's inputs (see :func:`run_checked`) and every ``required`` kernel
    input is there (a None goes through the full checks, which say what a kernel backend needs)."""
    return not torch.compiler.is_compiling() and getattr(_upstream, "depth", 0) > 0 and \
        all(r is not None for r in required)


def _describe(t) -> str:
    """What came: a tensor's dtype and shape, or the type of anything else."""
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {list(t.shape)}"
    return type(t).__name__


def _check_x(x, dims: str, ndim: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or \
            (x.dim() != ndim if ndim is not None else x.dim() < 1):
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor {dims}, got {_describe(x)}")


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


def _check_index(name: str, idx, n: int, x: torch.Tensor, required: bool) -> None:
    """Sorted unique int64 indices into range(n), on the CPU or x's device (values checked on the CPU only:
    no device sync). None is allowed unless ``required`` (the reference computes every head / unit)."""
    if idx is None and not required:
        return
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {_describe(idx)}")
    if idx.device != x.device and idx.device.type != "cpu":
        raise ValueError(f"{name} must be on {x.device} (the device of x) or the CPU, got {idx.device}")
    if idx.numel() > n:
        raise ValueError(f"{name} must have at most {n} entries (one per gate), got {idx.numel()}")
    if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
        key = id(idx)
        hit = _checked_index.get(key)
        if hit is not None and hit[0]() is idx and hit[1:] == (idx._version, n):
            return  # the gates' cached index: checked on an earlier call and unchanged since
        if int(idx.min()) < 0 or int(idx.max()) >= n or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            shown = idx.tolist()
            shown = f"{shown[:8]}..." if len(shown) > 8 else str(shown)
            raise ValueError(f"{name} must hold sorted unique indices in [0, {n}), got {shown}")
        if not idx.is_inference():
            if len(_checked_index) >= 512:
                _checked_index.clear()
            _checked_index[key] = (weakref.ref(idx), idx._version, n)


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")


def check_dropout(dropout_p, seed=0, offset=0) -> None:
    """Attention dropout: probability in [0, 1), Philox ``seed`` and ``offset`` ints in [0, 2**63); the seed may
    also be a one-element int64 CPU tensor (the seed a ``torch.compile`` graph draws; its value is not read)."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device.type != "cpu":
            raise ValueError(f"a tensor dropout seed must be one int64 element on the CPU, got {seed.dtype} "
                             f"{tuple(seed.shape)} on {seed.device}")
    else:
        _check_int("dropout seed", seed)
    _check_int("dropout offset", offset)


def check_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads,
                           attn_mask=None, dropout_p=0.0, *, key_bias=None, seed=0, offset=0,
                           kernel: bool = False) -> None:
    """Raise a ValueError/TypeError saying what was expected unless the inputs of ``gated_attention`` fit.

    ``attn_mask``: the dispatcher's HF-style mask; ``key_bias``: the kernel backends' [B, S] fp32 key mask.
    ``kernel``: the caller is a kernel backend's entry, which needs ``active_heads`` and at least one head (a
    layer with no head left is its output bias, which only the reference computes; the dispatcher never sends it
    to a kernel backend)."""
    if _checked_upstream(*((active_heads,) if kernel else ())) and (num_heads or not kernel):
        return
    _check_x(x, "[B, S, E]", 3)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < (1 if kernel else 0):
        want = "an int >= 1 (a kernel backend needs a head; with none left only the reference runs)" if kernel \
            else "an int >= 0"
        raise ValueError(f"num_heads must be {want}, got {num_heads!r}")
    B, S, E = x.shape
    _check_tensor("wq", wq, (None, E), x)
    HD = wq.shape[0]
    if (num_heads == 0) != (HD == 0) or (num_heads and HD % num_heads):
        raise ValueError(f"wq has {HD} rows, not num_heads * head_dim with num_heads = {num_heads}")
    for name, t, shape in (("bq", bq, (HD,)), ("wk", wk, (HD, E)), ("bk", bk, (HD,)), ("wv", wv, (HD, E)),
                           ("bv", bv, (HD,)), ("wo", wo, (E, HD)), ("bo", bo, (E,))):
        _check_tensor(name, t, shape, x)
    _check_tensor("head_gates", head_gates, (num_heads,), x, same_dtype=False)
    _check_index("active_heads", active_heads, num_heads, x, required=kernel)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != x.device:
            raise ValueError(f"attention mask must be a tensor on {x.device}, got "
                             f"{getattr(attn_mask, 'device', type(attn_mask).__name__)}")
        if attn_mask.shape[0] not in (1, B) or attn_mask.shape[-1] != S:
            raise ValueError(f"attention mask must be [B, K] or [B, 1, Q, K] with B = {B}, K = {S}, got shape "
                             f"{tuple(attn_mask.shape)}")
    if key_bias is not None:
        if not isinstance(key_bias, torch.Tensor) or key_bias.dtype != torch.float32 or \
                list(key_bias.shape) != [B, S] or key_bias.device != x.device:
            raise ValueError(f"key_bias must be a float32 tensor of shape [{B}, {S}] on {x.device}, got "
                             f"{_describe(key_bias)}" + (f" on {key_bias.device}"
                                                         if isinstance(key_bias, torch.Tensor) else ""))
    check_dropout(dropout_p, seed, offset)


def check_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation, *, kernel: bool = False) -> None:
    """Raise a ValueError/TypeError saying what was expected unless the inputs of ``gated_ffn`` fit.
    ``kernel``: the caller is a kernel backend's entry, which needs ``kept_units``."""
    if _checked_upstream(*((kept_units,) if kernel else ())):
        return
    _check_x(x, "[..., E]", None)
    E = x.shape[-1]
    _check_tensor("w1", w1, (None, E), x)
    n = w1.shape[0]
    for name, t, shape in (("b1", b1, (n,)), ("w2", w2, (E, n)), ("b2", b2, (E,))):
        _check_tensor(name, t, shape, x)
    _check_tensor("unit_gates", unit_gates, (n,), x, same_dtype=False)
    _check_index("kept_units", kept_units, n, x, required=kernel)
    check_activation(activation)


# --- rotary / sliding-window attention and the GLU FFN (ModernBERT) ----------------------------------------------
def _check_optional(name: str, t, shape: tuple, x: torch.Tensor) -> None:
    if t is not None:
        _check_tensor(name, t, shape, x)


def check_rotary_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, cos, sin,
                                  window, attn_mask=None, dropout_p=0.0, *, key_bias=None, kernel: bool = False):
    """The checks of :func:`check_attention_inputs` for ``gated_rotary_attention`` (biases may be None), plus
    ``cos``/``sin``: [B or 1, S, head_dim] floating tensors on x's device, and ``window``: an int >= -1."""
    if _checked_upstream(*((active_heads,) if kernel else ())) and (num_heads or not kernel):
        return
    _check_x(x, "[B, S, E]", 3)
    B, S, E = x.shape
    _check_tensor("wq", wq, (None, E), x)
    HD = wq.shape[0]
    zero = {"bq": x.new_zeros(HD) if bq is None else bq, "bk": x.new_zeros(HD) if bk is None else bk,
            "bv": x.new_zeros(HD) if bv is None else bv, "bo": x.new_zeros(E) if bo is None else bo}
    check_attention_inputs(x, wq, zero["bq"], wk, zero["bk"], wv, zero["bv"], wo, zero["bo"], head_gates,
                           active_heads, num_heads, attn_mask, dropout_p, key_bias=key_bias, kernel=kernel)
    if not isinstance(window, int) or isinstance(window, bool) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1: no sliding window), got {window!r}")
    D = HD // num_heads if num_heads else None
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != S or \
                (D is not None and t.shape[2] != D) or t.dtype not in _FLOAT_DTYPES or t.device != x.device:
            raise ValueError(f"{name} must be a floating tensor [1 or {B}, {S}, {D if D is not None else 'head_dim'}]"
                             f" on {x.device}, got {_describe(t)}"
                             + (f" on {t.device}" if isinstance(t, torch.Tensor) else ""))
    if D is not None and D % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {D}")


def check_glu_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation, *, kernel: bool = False) -> None:
    """Inputs of ``gated_glu_ffn``: w1 [2*I, E] (input half, then gate half), b1 [2*I] or None, w2 [E, I],
    b2 [E] or None, unit_gates [I]."""
    if _checked_upstream(*((kept_units,) if kernel else ())):
        return
    _check_x(x, "[..., E]", None)
    E = x.shape[-1]
    _check_tensor("w1", w1, (None, E), x)
    if w1.shape[0] % 2:
        raise ValueError(f"w1 of a GLU FFN must have 2 * units rows (input half, gate half), got {w1.shape[0]}")
    n = w1.shape[0] // 2
    _check_optional("b1", b1, (2 * n,), x)
    _check_tensor("w2", w2, (E, n), x)
    _check_optional("b2", b2, (E,), x)
    _check_tensor("unit_gates", unit_gates, (n,), x, same_dtype=False)
    _check_index("kept_units", kept_units, n, x, required=kernel)
    check_activation(activation)


# --- decoder attention with grouped queries (Llama, Mistral, Qwen2, Qwen3) ----------------------------------------
def _check_heads_tensor(name: str, t, shape: tuple, like: torch.Tensor) -> None:
    """[B, heads, S, D] tensors of the decoder ops: floating, on ``like``'s device, of ``shape`` (None: free)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES or t.dim() != len(shape) or \
            any(s is not None and s != d for s, d in zip(shape, t.shape)) or t.device != like.device:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must be a float32, float16 or bfloat16 tensor {want} on {like.device}, got "
                         f"{_describe(t)}" + (f" on {t.device}" if isinstance(t, torch.Tensor) else ""))


def check_decoder_qkv_inputs(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim, active_heads,
                             active_kv) -> None:
    """Inputs of ``gated_decoder_qkv``: x [B, S, E]; wq [H*D, E], wk/wv [Hkv*D, E] (``head_dim`` D >= 2, even),
    biases [rows] or None; q_norm/k_norm [D] or None; eps > 0; cos/sin [B or 1, S, D]; ``active_heads`` /
    ``active_kv`` sorted unique indices into the H query / Hkv KV heads, or None (every head)."""
    if _checked_upstream():
        return
    _check_x(x, "[B, S, E]", 3)
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 2 (rotary positions rotate pairs), got {head_dim!r}")
    B, S, E = x.shape
    _check_tensor("wq", wq, (None, E), x)
    _check_tensor("wk", wk, (None, E), x)
    if wq.shape[0] % head_dim or wk.shape[0] % head_dim:
        raise ValueError(f"wq ({wq.shape[0]} rows) and wk ({wk.shape[0]} rows) must hold whole heads of "
                         f"head_dim {head_dim}")
    H, Hkv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    _check_tensor("wv", wv, (Hkv * head_dim, E), x)
    for name, t, n in (("bq", bq, H), ("bk", bk, Hkv), ("bv", bv, Hkv)):
        _check_optional(name, t, (n * head_dim,), x)
    for name, t in (("q_norm", q_norm), ("k_norm", k_norm)):
        _check_optional(name, t, (head_dim,), x)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != S or \
                t.shape[2] != head_dim or t.dtype not in _FLOAT_DTYPES or t.device != x.device:
            raise ValueError(f"{name} must be a floating tensor [1 or {B}, {S}, {head_dim}] on {x.device}, got "
                             f"{_describe(t)}" + (f" on {t.device}" if isinstance(t, torch.Tensor) else ""))
    _check_index("active_heads", active_heads, H, x, required=False)
    _check_index("active_kv", active_kv, Hkv, x, required=False)


def check_decoder_attention_inputs(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, window, key_mask=None,
                                   dropout_p=0.0, attn_mask=None) -> None:
    """Inputs of ``gated_decoder_attention``: q [B, A, Sq, D]; k, v [B, Akv, Sk, D] with Sk >= Sq (the queries are
    the last Sq keys); wo [E, H*D], bo [E] or None; head_gates [H]; ``active_heads`` the A sorted unique heads of
    q (None: A = H); ``q_to_kv`` [A] int64 indices in [0, Akv); window an int >= -1 (-1 or 0: none); key_mask
    [B, Sk] bool or None (the dispatcher's, built from the mask it checked)."""
    if _checked_upstream():
        return
    _check_heads_tensor("q", q, (None, None, None, None), q)
    B, A, Sq, D = q.shape
    _check_heads_tensor("k", k, (B, None, None, D), q)
    Akv, Sk = k.shape[1], k.shape[2]
    _check_heads_tensor("v", v, (B, Akv, Sk, D), q)
    for name, t in (("k", k), ("v", v)):  # under autocast (HF's RMSNorm returns fp32) SDPA casts them
        if t.dtype != q.dtype and not torch.is_autocast_enabled(q.device.type):
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if Sk < Sq:
        raise ValueError(f"k and v must hold at least the {Sq} query positions (the queries are the last keys), "
                         f"got {Sk} keys")
    if not isinstance(wo, torch.Tensor) or wo.dim() != 2 or wo.shape[1] % D or wo.device != q.device:
        raise ValueError(f"wo must be a tensor [E, heads * {D}] on {q.device}, got {_describe(wo)}")
    H = wo.shape[1] // D
    _check_tensor("wo", wo, (None, H * D), q)
    _check_optional("bo", bo, (wo.shape[0],), q)
    _check_tensor("head_gates", head_gates, (H,), q, same_dtype=False)
    _check_index("active_heads", active_heads, H, q, required=False)
    if (active_heads.numel() if active_heads is not None else H) != A:
        raise ValueError(f"q holds {A} heads but active_heads lists "
                         f"{active_heads.numel() if active_heads is not None else H}")
    if not isinstance(q_to_kv, torch.Tensor) or q_to_kv.dtype != torch.int64 or tuple(q_to_kv.shape) != (A,) or \
            (q_to_kv.device != q.device and q_to_kv.device.type != "cpu"):
        raise ValueError(f"q_to_kv must be an int64 tensor [{A}] on {q.device} or the CPU, got {_describe(q_to_kv)}")
    if A and q_to_kv.device.type == "cpu" and not torch.compiler.is_compiling() and \
            (int(q_to_kv.min()) < 0 or int(q_to_kv.max()) >= Akv):
        raise ValueError(f"q_to_kv must hold KV head indices in [0, {Akv}), got {q_to_kv.tolist()[:8]}")
    if not isinstance(window, int) or isinstance(window, bool) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1: no sliding window), got {window!r}")
    if key_mask is not None and (not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or
                                 tuple(key_mask.shape) != (B, Sk) or key_mask.device != q.device):
        raise ValueError(f"key_mask must be a bool tensor [{B}, {Sk}] on {q.device}, got {_describe(key_mask)}")
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.device != q.device or
                                  attn_mask.dim() not in (2, 4) or attn_mask.shape[0] not in (1, B) or
                                  attn_mask.shape[-1] != Sk or (attn_mask.dim() == 4 and
                                                                attn_mask.shape[2] not in (1, Sq))):
        raise ValueError(f"attention mask must be [B, {Sk}] or [B, 1, {Sq}, {Sk}] with B = {B} on {q.device}, got "
                         f"{_describe(attn_mask)}")
    check_dropout(dropout_p)
