"""A latency table seen at a decided hidden width and set of kept sublayers, with the interface the planner and
the L0 controller use, so heads and FFN units can be planned for a model whose width and sublayers are fixed.

    view = table.view(hidden=288, attn_kept=[True] * 5 + [False], ffn_kept=[True] * 6)
    masks = plan_masks(view, importance, view.available(masks), Budget(latency_ms=20.0), hidden, head_dim)
    table.predict(heads, units, 288, view.attn_kept, view.ffn_kept)   # == view.predict(heads, units)
"""
from __future__ import annotations

from typing import Sequence

import torch


class TableView:
    """``table`` (a :class:`~structprune.latency.LatencyTable` measured with hidden widths and skipped sublayers)
    at hidden width ``hidden`` with per-layer attention / FFN sublayers kept or skipped.

    * ``empty_ms``: the model at this width with every head and unit removed: the skipped model plus the fixed
      parts (LayerNorm, residual, bias) of the sublayers kept; ``dense_ms``: still the dense model's, so speed-ups
      are against the original;
    * ``layer_ms(h, u)``: what ``h`` heads and ``u`` units add to a layer at this width. It does not know the
      layer, so the heads (units) of a skipped sublayer must not be kept: plan with :meth:`available`, which
      marks them unavailable. :meth:`predict` ignores them, as :meth:`LatencyTable.predict` does;
    * ``attention(h)``, ``ffn(u)``: the block curves at this width; ``ffn_grid``, ``key``, ``num_layers``, ... the
      table's.
    """

    def __init__(self, table, hidden: int, attn_kept: Sequence[bool], ffn_kept: Sequence[bool]):
        layers = table.num_layers
        kept = {}
        for name, values in (("attn_kept", attn_kept), ("ffn_kept", ffn_kept)):
            values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
            if len(values) != layers or any(v not in (0, 1) for v in values):
                raise ValueError(f"{name} needs one bool per layer ({layers}), got {values}")
            kept[name] = [bool(v) for v in values]
        if int(hidden) != hidden:
            raise ValueError(f"hidden must be a whole width, got {hidden}")
        self.table, self.hidden = table, int(hidden)
        self.attn_kept, self.ffn_kept = kept["attn_kept"], kept["ffn_kept"]
        self.empty_ms = float(table.predict([0] * layers, [0] * layers, self.hidden, self.attn_kept, self.ffn_kept))

    # ---- the table's shape ----------------------------------------------------------------------
    @property
    def key(self):
        return self.table.key

    @property
    def ffn_grid(self) -> list[int]:
        return self.table.ffn_grid

    @property
    def num_layers(self) -> int:
        return self.table.num_layers

    @property
    def num_heads(self) -> int:
        return self.table.num_heads

    @property
    def intermediate(self) -> int:
        return self.table.intermediate

    @property
    def at(self) -> str:
        return self.table.at

    @property
    def scale(self) -> float:
        return self.table.scale

    def describe(self) -> str:
        a, f = sum(self.attn_kept), sum(self.ffn_kept)
        return (f"{self.table.describe()}; hidden width {self.hidden} of {self.table.hidden}, {a}/{self.num_layers} "
                f"attention and {f}/{self.num_layers} FFN sublayers kept")

    # ---- costs at this width ----------------------------------------------------------------------
    def attention(self, heads):
        """The attention-block curve at this width (ms of one block, unscaled, as the table's)."""
        return self.table.attention(heads, self.hidden)

    def ffn(self, units):
        """The FFN-block curve at this width."""
        return self.table.ffn(units, self.hidden)

    def layer_ms(self, heads, units):
        """What ``heads`` heads and ``units`` FFN units add to one layer at this width (scaled)."""
        return self.table.layer_ms(heads, units, self.hidden)

    def predict(self, heads: Sequence, units: Sequence):
        """Predicted end-to-end ms: :meth:`LatencyTable.predict` at this width and these sublayers."""
        return self.table.predict(heads, units, self.hidden, self.attn_kept, self.ffn_kept)

    @property
    def dense_ms(self) -> float:
        return self.table.dense_ms

    @property
    def max_speedup(self) -> float:
        """The speed-up of removing every head and FFN unit at this width and with these sublayers."""
        return self.dense_ms / self.empty_ms

    def speedup(self, heads: Sequence, units: Sequence) -> float:
        return self.dense_ms / float(self.predict(heads, units))

    def available(self, masks: dict) -> dict:
        """``masks`` (``{"heads": [per-layer bool masks], "ffn": [...]}``, e.g. what is still unpruned) with every
        head of a skipped attention sublayer and every unit of a skipped FFN sublayer made unavailable."""
        out = dict(masks)
        for name, kept in (("heads", self.attn_kept), ("ffn", self.ffn_kept)):
            if len(masks[name]) != self.num_layers:
                raise ValueError(f"masks[{name!r}] needs one mask per layer ({self.num_layers}), got {len(masks[name])}")
            out[name] = [m if k else torch.zeros_like(m) for m, k in zip(masks[name], kept)]
        return out
