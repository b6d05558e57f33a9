"""HF attention masks -> the key bias the kernel backends take, and what fully padded sequences get.

The kernel backends take padding masks only, as a ``[B, K]`` fp32 additive key bias; the dispatcher
(:mod:`structprune.ops.dispatch`) builds it here from the ``[B, K]`` or ``[B, 1, Q, K]`` masks HF layers pass, and gives
sequences with no key left what the reference gives them.
"""
from __future__ import annotations

import weakref

import torch

from structprune.ops import reference

_checked_mask: list = []  # [(weakref to the last 4D mask checked, its version)]: every layer gets the same mask


def mask_row(attn_mask: torch.Tensor) -> torch.Tensor:
    """The [B, K] key row of an HF padding mask [B, K] or [B, 1, Q|1, K]; refuses masks that vary over queries.

    HF materialises [B, 1, Q, K]; the check (a pass over the mask and a host sync) is done once per mask, not
    once per layer, where the mask has a version counter to key that on; inference tensors have none, and are
    checked at every call (8 keys per compare for bool masks)."""
    if attn_mask.dim() == 2:
        return attn_mask
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1:
        raise ValueError(f"attention mask must be a padding mask [B, K] or [B, 1, Q, K], got shape "
                         f"{tuple(attn_mask.shape)}")
    row = attn_mask[:, 0, 0, :]
    if attn_mask.shape[2] > 1 and attn_mask.stride(2) != 0 and not torch.compiler.is_compiling():
        if _checked_mask and _checked_mask[0][0]() is attn_mask and _checked_mask[0][1] == attn_mask._version:
            return row
        if not _same_row_for_every_query(attn_mask, row):
            raise ValueError("the kernel backends take padding masks only (the same key mask for every query); "
                             "this [B, 1, Q, K] attention mask varies over the query axis. Use "
                             "sp.set_backend('torch') for causal or other per-query masks")
        if not attn_mask.is_inference():
            _checked_mask[:] = [(weakref.ref(attn_mask), attn_mask._version)]
    return row


def _same_row_for_every_query(attn_mask: torch.Tensor, row: torch.Tensor) -> bool:
    """Whether every query's row of the [B, 1, Q, K] mask equals ``row`` ([B, K]). Bool masks whose rows are whole
    8-byte words are compared as int64 words (8 keys per compare: the check is a pass over the mask at memory speed,
    once per layer in inference mode, where masks have no version counter to cache it on)."""
    K = attn_mask.shape[-1]
    if attn_mask.dtype == torch.bool and K % 8 == 0 and attn_mask.stride(-1) == 1 and attn_mask.stride(-2) == K and \
            attn_mask.storage_offset() % 8 == 0:
        try:
            words = attn_mask.view(torch.uint8).view(torch.int64)  # [B, 1, Q, K / 8]; bool bytes are 0 or 1
        except RuntimeError:  # strides a wider dtype cannot view: compare key by key
            words = None
        if words is not None:
            return bool((words == words[:, :, :1, :]).all())
    return bool((attn_mask == row[:, None, None, :]).all())


def key_bias_from_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF padding mask [B, K] or [B, 1, Q|1, K] (bool: True = attend, or additive float) -> [B, K] fp32 additive
    bias (0 = attend, ``finfo(float32).min`` = padding). A mask that varies over the query axis is refused."""
    if attn_mask is None:
        return None
    row = mask_row(attn_mask)
    if row.dtype == torch.bool:
        neg = torch.finfo(torch.float32).min
        return torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill(~row, neg)
    return row.to(torch.float32).clamp_min(torch.finfo(torch.float32).min)


def kernel_key_bias(attn_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The [batch, K] key bias a kernel backend takes for ``attn_mask``: fully padded sequences get a zero bias
    (finite scores in every dtype), and their output is then set by :func:`padded_sequence_output`."""
    key_bias = key_bias_from_mask(attn_mask)
    if key_bias is None:
        return None
    return key_bias.expand(batch, -1).masked_fill(fully_padded(attn_mask)[:, None], 0.0)


def fully_padded(attn_mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: the sequences whose every key is masked out (no host sync)."""
    row = mask_row(attn_mask)
    if row.dtype == torch.bool:
        return ~row.any(-1)
    # HF writes finfo(dtype).min for padding in additive masks; anything below half of it counts as masked
    return (row.float() <= torch.finfo(row.dtype).min / 2).all(-1)


def padded_sequence_output(y, args, num_heads, attn_mask, row, dropout_p, impl):
    """Give fully padded sequences what the reference (and HF's attention) gives them; ``row``: the mask's
    :func:`mask_row`, which the caller already has (the mask is not checked again).

    Boolean masks (HF's SDPA layers): SDPA returns a zero context for a query with no key to attend to, so
    the output is the bias ``bo``. Additive masks (HF's eager layers): every score is ``finfo.min`` after the
    add, the softmax is uniform and the context is the mean of the values; these sequences (rare: they cost
    one host sync to find) run through the reference, so that gradients match too. The kernels got a zero key
    bias for them (finite in every dtype) and their rows of ``y`` are replaced here.
    """
    dead = fully_padded(row).expand(y.shape[0])  # a mask may have batch 1, broadcast over the batch
    bo = args[8]
    if row.dtype == torch.bool:
        # on the CPU the host sync is free and saves a pass over y when (as almost always) no sequence is dead
        if y.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(dead.any()):
            return y
        return torch.where(dead[:, None, None], bo.to(y.dtype).expand_as(y), y)
    if torch.compiler.is_compiling() or not bool(dead.any()):
        return y
    idx = torch.nonzero(dead).flatten()
    mask = attn_mask[idx] if attn_mask.shape[0] == y.shape[0] else attn_mask
    y_dead = reference.gated_attention(args[0][idx], *args[1:], num_heads, attn_mask=mask, dropout_p=dropout_p,
                                       impl=impl)
    return y.index_put((idx,), y_dead.to(y.dtype))


def banded_key_row(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The [B, K] key padding row of an HF sliding-window mask [B, 1, Q, K] (a band that also masks padding): a
    key is padding when no query may attend it (every key lies in its own query's band). A [B, K] mask is its own
    row. Returns a mask of the input's kind (bool or additive), for :func:`key_bias_from_mask`."""
    if attn_mask is None or attn_mask.dim() == 2:
        return attn_mask
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1:
        raise ValueError(f"attention mask must be [B, K] or [B, 1, Q, K], got shape {tuple(attn_mask.shape)}")
    rows = attn_mask[:, 0]
    if rows.shape[-2] == rows.shape[-1]:  # key k lies in query k's band: the diagonal is the row (O(S), not O(S^2))
        return rows.diagonal(dim1=-2, dim2=-1)
    return rows.any(dim=1) if attn_mask.dtype == torch.bool else rows.amax(dim=1)


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """Bool "may attend" of a mask: bool as is, additive float above half of ``finfo.min``, integer non-zero."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask != 0


_checked_causal: dict = {}  # (id of a 4D mask, Sq, Sk, window) -> (weakref, version, key mask, reason)


def causal_key_mask(attn_mask: torch.Tensor | None, q_len: int, k_len: int, window: int):
    """``(key_mask, reason)``: the [B, Sk] bool key mask (True = attend; None: every key) that, with the causal band
    aligned bottom-right and the sliding window (:func:`structprune.ops.reference.causal_band`), gives HF's decoder
    mask ``attn_mask`` ([B, 1, Sq, Sk] bool or additive, or None), and None as the reason; or ``(None, reason)``
    when the mask is not of that form (packed sequences, a static cache, a custom mask): the reference then runs.

    A key is kept when some query may attend it. The check that the rebuilt mask is HF's (a pass over the mask,
    one host sync) is done once per mask object, not once per layer; under ``torch.compile`` it is skipped."""
    if attn_mask is None:
        if 1 < q_len != k_len:
            return None, "no mask with more keys than queries (HF's static-cache prefill: causal from the top left)"
        return None, None
    if attn_mask.dim() == 2:
        return allowed(attn_mask), None
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != q_len or \
            attn_mask.shape[3] != k_len:
        return None, f"a decoder mask of shape {tuple(attn_mask.shape)} for {q_len} queries and {k_len} keys"
    cache_key = (id(attn_mask), q_len, k_len, window)
    hit = _checked_causal.get(cache_key)
    if hit is not None and hit[0]() is attn_mask and hit[1] == attn_mask._version and \
            not torch.compiler.is_compiling():
        return hit[2], hit[3]
    may = allowed(attn_mask[:, 0])
    key_mask = may.any(dim=1)
    if torch.compiler.is_compiling():
        return key_mask, None
    rebuilt = key_mask[:, None, :] & reference.causal_band(q_len, k_len, window, attn_mask.device)[None]
    reason = None if bool((rebuilt == may).all()) else \
        "a decoder mask that is not causal + key padding + the layer's window (packed sequences, a custom mask)"
    result = (key_mask, None) if reason is None else (None, reason)
    if not attn_mask.is_inference():
        if len(_checked_causal) >= 8:
            _checked_causal.clear()
        _checked_causal[cache_key] = (weakref.ref(attn_mask), attn_mask._version, *result)
    return result
