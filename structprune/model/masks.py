"""Fixed 0/1 masks of heads and FFN units: validation, setting and reading."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from structprune.model.cofi import hidden_gate, sublayer_gates
from structprune.model.patching import layer_parts


@dataclass
class Masks:
    """What a patched model keeps now.

    heads: bool ``[L, H]`` when every layer has the same head count, else a list of bool ``[H_l]``.
    ffn: list of bool ``[I_l]``, one per layer.
    hidden: bool ``[d]`` (the hidden dimensions kept), or None when the model has no hidden-dimension gate.
    attn_sublayers, ffn_sublayers: bool ``[L]`` (whole sublayers kept), or None without sublayer gates.
    kv_heads: grouped-query attention (decoders): the KV heads kept (those a kept query head reads), bool
    ``[L, Hkv]`` or a list of ``[Hkv_l]``; None for the other families.
    """

    heads: torch.Tensor | list[torch.Tensor]
    ffn: list[torch.Tensor]
    hidden: torch.Tensor | None = None
    attn_sublayers: torch.Tensor | None = None
    ffn_sublayers: torch.Tensor | None = None
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


def _extra_gates(model: nn.Module, name: str) -> list:
    """The gates behind the mask ``name`` ("hidden", "attn_sublayers", "ffn_sublayers"); a ValueError saying how
    to get them when the model was patched without them."""
    gates = [hidden_gate(model)] if name == "hidden" else sublayer_gates(model, name)
    if any(g is None for g in gates):
        flag = "hidden=True" if name == "hidden" else "sublayers=True"
        raise ValueError(f"a {name} mask needs the model patched with structprune.patch(model, {flag})")
    return gates


@torch.no_grad()
def set_masks(model: nn.Module, heads=None, ffn=None, kv_heads=None, hidden=None, attn_sublayers=None,
              ffn_sublayers=None) -> nn.Module:
    """Set fixed 0/1 masks (1 = keep). ``heads``: ``[L, H]`` or per-layer list; ``ffn``: ``[L, I]`` or
    per-layer list; ``hidden``: ``[d]``; ``attn_sublayers`` / ``ffn_sublayers``: ``[L]`` (the last three need the
    model patched with ``hidden=True`` / ``sublayers=True``). Any may be None to leave it unchanged. All inputs are
    validated before any change.

    ``kv_heads`` (grouped-query attention only): ``[L, Hkv]`` or per-layer list; a pruned KV head prunes the query
    heads that read it (on top of ``heads``, or of the current head masks when ``heads`` is None). A KV head whose
    query heads are all pruned is pruned with them whether or not ``kv_heads`` says so."""
    parts = layer_parts(model)
    device = parts[0].device
    head_gates = [p.head_gate for p in parts]
    unit_gates = [p.unit_gate for p in parts]
    head_rows = _per_layer("heads", heads, [g.n for g in head_gates], device) if heads is not None else None
    if kv_heads is not None:
        if any(p.kv_index is None for p in parts):
            raise TypeError(f"kv_heads masks are for grouped-query attention (decoders); {type(model).__name__} "
                            "has one KV head per query head: mask its heads")
        kv_rows = _per_layer("kv_heads", kv_heads, [p.num_kv_heads for p in parts], device)
        base = head_rows if head_rows is not None else [g.mask.clone() for g in head_gates]
        head_rows = [h * k.index_select(0, p.kv_index.to(device)) for h, k, p in zip(base, kv_rows, parts)]
    rows = []
    if head_rows is not None:
        rows.append((head_gates, head_rows))
    if ffn is not None:
        rows.append((unit_gates, _per_layer("ffn", ffn, [g.n for g in unit_gates], device)))
    if hidden is not None:
        gate = _extra_gates(model, "hidden")[0]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 1:
            raise ValueError(f"hidden mask must be a 1-D tensor of {gate.n} entries, got "
                             f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
        rows.append(([gate], _per_layer("hidden", [hidden], [gate.n], device)))
    for name, value in (("attn_sublayers", attn_sublayers), ("ffn_sublayers", ffn_sublayers)):
        if value is not None:
            gates = _extra_gates(model, name)
            value = torch.as_tensor(value)
            if value.shape != (len(gates),):
                raise ValueError(f"{name} mask must have one entry per layer ({len(gates)},), got {tuple(value.shape)}")
            rows.append((gates, _per_layer(name, list(value.reshape(-1, 1)), [1] * len(gates), device)))
    for gates, values in rows:
        for gate, row in zip(gates, values):
            gate.set_mask(row)
    return model


@torch.no_grad()
def get_masks(model: nn.Module) -> Masks:
    """What is kept now: a head or unit is kept when its mask is 1 and its deterministic gate is non-zero."""
    parts = layer_parts(model)
    heads = [(p.head_gate.deterministic() != 0).cpu() for p in parts]
    ffn = [(p.unit_gate.deterministic() != 0).cpu() for p in parts]
    same = len({h.numel() for h in heads}) == 1
    extra = {}
    gate = hidden_gate(model)
    if gate is not None:
        extra["hidden"] = (gate.deterministic() != 0).cpu()
    for name in ("attn_sublayers", "ffn_sublayers"):
        gates = sublayer_gates(model, name)
        if all(g is not None for g in gates):
            extra[name] = torch.cat([(g.deterministic() != 0).cpu() for g in gates])
    kv = None
    if all(p.kv_index is not None for p in parts):
        kv = [torch.zeros(p.num_kv_heads, dtype=torch.bool).index_fill_(0, p.kv_index.cpu()[h], True)
              for p, h in zip(parts, heads)]
        kv = torch.stack(kv) if len({k.numel() for k in kv}) == 1 else kv
    return Masks(heads=torch.stack(heads) if same else heads, ffn=ffn, kv_heads=kv, **extra)


def gate_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Original per-layer sizes: {"heads": [H_l], "ffn": [I_l]}."""
    parts = layer_parts(model)
    return {"heads": [p.head_gate.n for p in parts], "ffn": [p.unit_gate.n for p in parts]}
