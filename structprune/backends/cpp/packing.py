"""The kept heads' weights of the rotary attention, packed for inference and kept while nothing they depend on changes.

:func:`pack_heads` gathers the rows of ``wq``/``wk``/``wv`` of the kept heads into one ``[3 * A * D, E]`` matrix (one
GEMM for the three projections) and the kept columns of ``wo`` times their heads' gates. Gathering costs a pass over
those weights per call (about 5 MB for a ModernBERT-base layer at 50% heads), so in CPU inference (the stamp reads a
few values back: no device sync wanted on CUDA) the result is cached, one entry per layer (keyed on ``wq``, or on the
fused weight it is a block of), like the C++ pack cache of :mod:`structprune.backends.cpp.build`: it is reused while
every weight has the same storage, shape and ``_version`` and the same values at 16 sampled positions (a rewrite
through ``.data`` bumps no version), and the kept heads and their gate values are the same.
``structprune.clear_cache()`` / :func:`clear` empty it. With gradients nothing is cached (autograd must see the
gather).
"""
from __future__ import annotations

import threading
import weakref

import torch

_MAX_ENTRIES = 256
_cache: dict[tuple, tuple] = {}  # (id(wq's base), offset, shape) -> (weakref to that base, stamp, packed)
_lock = threading.Lock()


def clear() -> None:
    with _lock:
        _cache.clear()


def size() -> int:
    return len(_cache)


def _stamp(tensors, active_heads, gates) -> tuple:
    parts = []
    for t in tensors:
        if t is None:
            parts.append(None)
            continue
        flat = t.detach().reshape(-1)
        probe = flat[torch.linspace(0, flat.numel() - 1, 16, dtype=torch.long)] if flat.numel() else flat
        parts.append((t.data_ptr(), tuple(t.shape), t._version, t.dtype, tuple(probe.tolist())))
    return tuple(parts) + (tuple(active_heads.tolist()), tuple(gates.tolist()))


def _pack(wq, bq, wk, bk, wv, bv, wo, head_gates, idx, D: int, dtype):
    A = idx.numel()
    rows = (idx[:, None] * D + torch.arange(D, device=idx.device)[None, :]).reshape(A * D)
    w_qkv = torch.cat([w.index_select(0, rows) for w in (wq, wk, wv)])
    b_qkv = None
    if not (bq is None and bk is None and bv is None):
        b_qkv = torch.cat([w_qkv.new_zeros(A * D) if b is None else b.index_select(0, rows) for b in (bq, bk, bv)])
    g = head_gates.index_select(0, idx).to(dtype).repeat_interleave(D)
    return w_qkv, b_qkv, wo.index_select(1, rows) * g  # the gates scale wo's kept columns, not the context


def pack_heads(wq, bq, wk, bk, wv, bv, wo, head_gates, active_heads, D: int, dtype, cache: bool):
    """``(w_qkv [3AD, E], b_qkv [3AD] or None, wo_gated [E, AD])`` of the kept heads ``active_heads``; ``cache``:
    reuse (and keep) the packed weights of this layer while nothing they depend on changed (inference only)."""
    idx = active_heads.to(wq.device)
    if not cache:
        return _pack(wq, bq, wk, bk, wv, bv, wo, head_gates, idx, D, dtype)
    base = wq._base if wq._base is not None else wq  # a row block of a fused QKV weight: the weight itself
    key = (id(base), wq.storage_offset(), tuple(wq.shape))
    stamp = _stamp((wq, bq, wk, bk, wv, bv, wo), active_heads, head_gates.index_select(0, idx))
    with _lock:
        hit = _cache.get(key)
    if hit is not None and hit[0]() is base and hit[1] == stamp:
        return hit[2]
    packed = _pack(wq, bq, wk, bk, wv, bv, wo, head_gates, idx, D, dtype)
    with _lock:
        for dead in [k for k, v in _cache.items() if v[0]() is None]:  # entries of freed weights
            del _cache[dead]
        if len(_cache) >= _MAX_ENTRIES:
            _cache.pop(next(iter(_cache)))
        _cache[key] = (weakref.ref(base), stamp, packed)
    return packed
