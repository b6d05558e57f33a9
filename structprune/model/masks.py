"""Fixed 0/1 masks of heads and FFN units: validation, setting and reading."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from structprune.model.patching import layer_parts


@dataclass
class Masks:
    """What a patched model keeps now.

    heads: bool ``[L, H]`` when every layer has the same head count, else a list of bool ``[H_l]``.
    ffn: list of bool ``[I_l]``, one per layer.
    kv_heads: grouped-query attention (decoders): the KV heads kept (those a kept query head reads), bool
    ``[L, Hkv]`` or a list of ``[Hkv_l]``; None for the other families.
    """

    heads: torch.Tensor | list[torch.Tensor]
    ffn: list[torch.Tensor]
    kv_heads: torch.Tensor | list[torch.Tensor] | None = None

    def heads_per_layer(self) -> list[torch.Tensor]:
        return list(self.heads)

    @property
    def num_heads_kept(self) -> int:
        return int(sum(int(h.sum()) for h in self.heads_per_layer()))

    @property
    def num_ffn_kept(self) -> int:
        return int(sum(int(f.sum()) for f in self.ffn))


def _per_layer(name: str, value, sizes: list[int], device: torch.device) -> list[torch.Tensor]:
    """Validate a mask given as one [L, N] tensor or a list of L vectors; returns float 0/1 vectors."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 2 or value.shape[0] != len(sizes) or len(set(sizes)) != 1 or value.shape[1] != sizes[0]:
            expected = f"[{len(sizes)}, {sizes[0]}]" if len(set(sizes)) == 1 else f"a list of {len(sizes)} vectors"
            raise ValueError(f"{name} mask must be {expected} (layers x units), got shape {tuple(value.shape)}")
        rows = list(value.unbind(0))
    elif isinstance(value, (list, tuple)):
        if len(value) != len(sizes):
            raise ValueError(f"{name} mask must have one entry per layer ({len(sizes)}), got {len(value)}")
        rows = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in value]
    else:
        raise TypeError(f"{name} mask must be a tensor [layers, units] or a list of per-layer tensors, "
                        f"got {type(value).__name__}")
    out = []
    for i, (row, size) in enumerate(zip(rows, sizes)):
        if row.shape != (size,):
            raise ValueError(f"{name} mask of layer {i} must have shape ({size},), got {tuple(row.shape)}")
        if row.dtype.is_complex or not (row.dtype == torch.bool or row.dtype.is_floating_point or
                                       row.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
            raise TypeError(f"{name} mask of layer {i} must be bool, integer or float 0/1, got {row.dtype}")
        if row.device.type != "cpu" and row.device != device:
            raise ValueError(f"{name} mask of layer {i} is on {row.device}, but the model is on {device}; "
                             "pass it on the CPU or on the model's device")
        if row.dtype != torch.bool and not torch.all((row == 0) | (row == 1)):
            bad = row[(row != 0) & (row != 1)][:3].tolist()
            raise ValueError(f"{name} mask of layer {i} must hold only 0 and 1, found {bad}")
        out.append(row.to(device=device, dtype=torch.float32))
    return out


@torch.no_grad()
def set_masks(model: nn.Module, heads=None, ffn=None, kv_heads=None) -> nn.Module:
    """Set fixed 0/1 masks (1 = keep). ``heads``: ``[L, H]`` or per-layer list; ``ffn``: ``[L, I]`` or
    per-layer list. Either may be None to leave it unchanged. All inputs are validated before any change.

    ``kv_heads`` (grouped-query attention only): ``[L, Hkv]`` or per-layer list; a pruned KV head prunes the query
    heads that read it (on top of ``heads``, or of the current head masks when ``heads`` is None). A KV head whose
    query heads are all pruned is pruned with them whether or not ``kv_heads`` says so."""
    parts = layer_parts(model)
    device = parts[0].device
    head_gates = [p.head_gate for p in parts]
    unit_gates = [p.unit_gate for p in parts]
    head_rows = _per_layer("heads", heads, [g.n for g in head_gates], device) if heads is not None else None
    ffn_rows = _per_layer("ffn", ffn, [g.n for g in unit_gates], device) if ffn is not None else None
    if kv_heads is not None:
        if any(p.kv_index is None for p in parts):
            raise TypeError(f"kv_heads masks are for grouped-query attention (decoders); {type(model).__name__} "
                            "has one KV head per query head: mask its heads")
        kv_rows = _per_layer("kv_heads", kv_heads, [p.num_kv_heads for p in parts], device)
        base = head_rows if head_rows is not None else [g.mask.clone() for g in head_gates]
        head_rows = [h * k.index_select(0, p.kv_index.to(device)) for h, k, p in zip(base, kv_rows, parts)]
    if head_rows is not None:
        for gate, row in zip(head_gates, head_rows):
            gate.set_mask(row)
    if ffn_rows is not None:
        for gate, row in zip(unit_gates, ffn_rows):
            gate.set_mask(row)
    return model


@torch.no_grad()
def get_masks(model: nn.Module) -> Masks:
    """What is kept now: a head or unit is kept when its mask is 1 and its deterministic gate is non-zero."""
    parts = layer_parts(model)
    heads = [(p.head_gate.deterministic() != 0).cpu() for p in parts]
    ffn = [(p.unit_gate.deterministic() != 0).cpu() for p in parts]
    same = len({h.numel() for h in heads}) == 1
    kv = None
    if all(p.kv_index is not None for p in parts):
        kv = [torch.zeros(p.num_kv_heads, dtype=torch.bool).index_fill_(0, p.kv_index.cpu()[h], True)
              for p, h in zip(parts, heads)]
        kv = torch.stack(kv) if len({k.numel() for k in kv}) == 1 else kv
    return Masks(heads=torch.stack(heads) if same else heads, ffn=ffn, kv_heads=kv)


def gate_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Original per-layer sizes: {"heads": [H_l], "ffn": [I_l]}."""
    parts = layer_parts(model)
    return {"heads": [p.head_gate.n for p in parts], "ffn": [p.unit_gate.n for p in parts]}
