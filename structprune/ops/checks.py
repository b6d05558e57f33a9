"""Input checks of the gated ops: done once by the dispatcher, above every backend, so that the same bad input
gets the same error, saying what was expected and what came, whichever backend would have run."""
from __future__ import annotations

import weakref

import torch

from structprune.ops import reference

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
