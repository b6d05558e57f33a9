"""Appending a decoder layer's keys and values to an HF ``DynamicCache`` without re-concatenating the whole cache.

``DynamicLayer.update`` runs ``torch.cat([keys, new], dim=-2)`` at every step: each decode step copies the whole
cache of every layer (O(length) bytes, and on the CPU a parallel region per copy). :func:`update` keeps the layer's
keys and values in a buffer with room to grow (``_HEADROOM`` tokens, rounded) and writes only the new positions;
``layer.keys`` / ``layer.values`` are then views of its first ``length`` positions, so everything HF does with the
layer (``get_seq_length``, masks, ``crop``, ``reorder_cache``, serialisation) sees the same tensors it would have.

The buffer is reused only while the layer's tensors are still exactly the views it handed out, of the length it
wrote (positions already written are never overwritten: after a ``crop``, a ``reorder_cache`` or any other change
the next update copies into a new buffer), with the same dtype, device and batch/head/dim sizes. Anything else
(another layer class, offloading, the first update of a layer, a gradient through k or v, ``torch.compile``)
runs the cache's own ``update``.
"""
from __future__ import annotations

import torch

__all__ = ["update"]

_HEADROOM = 256  # extra positions a new buffer holds (and the rounding of its length)


def _plain_dynamic_layer(cache, layer_idx: int):
    from transformers.cache_utils import Cache, DynamicLayer

    layers = getattr(cache, "layers", None)
    if type(cache).update is not Cache.update or getattr(cache, "offloading", False) or layers is None or \
            layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4 else None


def _buffer_holds(layer, keys: torch.Tensor, values: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                  need: int) -> bool:
    state = layer.__dict__.get("_structprune_kv")
    if state is None:
        return False
    kbuf, vbuf, length = state
    return (keys.shape[-2] == length and keys.data_ptr() == kbuf.data_ptr() and values.data_ptr() == vbuf.data_ptr()
            and keys.stride() == kbuf.stride() and values.stride() == vbuf.stride()
            and keys.shape[:2] == new_k.shape[:2] and keys.shape[-1] == new_k.shape[-1]
            and values.shape[:2] == new_v.shape[:2] and values.shape[-1] == new_v.shape[-1]
            and kbuf.dtype == new_k.dtype and vbuf.dtype == new_v.dtype and kbuf.device == new_k.device
            and kbuf.shape[-2] >= need)


def update(cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **kwargs):
    """``cache.update(key_states, value_states, layer_idx, **kwargs)``, writing into a growing buffer when the
    layer is a plain ``DynamicLayer`` (see the module docstring); returns the layer's keys and values."""
    layer = _plain_dynamic_layer(cache, layer_idx)
    if layer is None or torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            key_states.requires_grad or value_states.requires_grad or layer.keys.requires_grad)):
        return cache.update(key_states, value_states, layer_idx, **kwargs)
    keys, values = layer.keys, layer.values
    length, new = keys.shape[-2], key_states.shape[-2]
    need = length + new
    if not _buffer_holds(layer, keys, values, key_states, value_states, need):
        if keys.dtype != key_states.dtype or values.dtype != value_states.dtype or \
                keys.shape[:2] != key_states.shape[:2] or values.shape[:2] != value_states.shape[:2]:
            return cache.update(key_states, value_states, layer_idx, **kwargs)
        cap = -(-(need + _HEADROOM) // _HEADROOM) * _HEADROOM
        kbuf = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
        vbuf = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
        kbuf[:, :, :length].copy_(keys)
        vbuf[:, :, :length].copy_(values)
    else:
        kbuf, vbuf, _ = layer.__dict__["_structprune_kv"]
    kbuf[:, :, length:need].copy_(key_states)
    vbuf[:, :, length:need].copy_(value_states)
    layer.keys, layer.values = kbuf[:, :, :need], vbuf[:, :, :need]
    layer.__dict__["_structprune_kv"] = (kbuf, vbuf, need)
    return layer.keys, layer.values
