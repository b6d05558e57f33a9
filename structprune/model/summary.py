"""Per-layer report of what a patched model keeps: heads, FFN units, parameters and FLOPs vs the original."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from structprune.model.cofi import hidden_gate
from structprune.model.families import sizes_of
from structprune.model.patching import layer_parts
from structprune.ops.reference import attention_flops, ffn_flops


@dataclass
class LayerSummary:
    heads_kept: int
    heads_total: int
    ffn_kept: int
    ffn_total: int
    params: int
    params_original: int
    flops: int
    flops_original: int


@dataclass
class Summary:
    """Returned by :func:`summary`; ``str()`` gives a table. FLOPs are per forward of one sequence."""

    seq_len: int
    layers: list[LayerSummary] = field(default_factory=list)
    latency: dict | None = None  # predicted (and measured) end-to-end latency, when a table was given
    hidden_kept: int | None = None  # hidden dimensions kept, with a hidden-dimension gate (else None)
    hidden_total: int | None = None
    skipped: list[str] = field(default_factory=list)  # "attention 3", "ffn 5": whole sublayers skipped

    def total(self, attr: str) -> int:
        return sum(getattr(row, attr) for row in self.layers)

    @property
    def heads_kept_fraction(self) -> float:
        return self.total("heads_kept") / max(1, self.total("heads_total"))

    @property
    def ffn_kept_fraction(self) -> float:
        return self.total("ffn_kept") / max(1, self.total("ffn_total"))

    def __str__(self) -> str:
        head = f"{'layer':>5} {'heads':>9} {'ffn units':>13} {'params':>21} {f'GFLOPs (seq {self.seq_len})':>21}"
        lines = [head, "-" * len(head)]

        def row(name, r):
            return (f"{name:>5} {r.heads_kept:>4}/{r.heads_total:<4} {r.ffn_kept:>6}/{r.ffn_total:<6} "
                    f"{r.params / 1e6:>8.3f}M/{r.params_original / 1e6:.3f}M ({r.params / max(1, r.params_original):>4.0%}) "
                    f"{r.flops / 1e9:>7.3f}/{r.flops_original / 1e9:.3f} ({r.flops / max(1, r.flops_original):>4.0%})")

        for i, r in enumerate(self.layers):
            lines.append(row(str(i), r))
        total = LayerSummary(*(self.total(a) for a in LayerSummary.__dataclass_fields__))
        lines.append("-" * len(head))
        lines.append(row("all", total))
        if self.hidden_kept is not None:
            lines.append(f"hidden dimensions kept: {self.hidden_kept}/{self.hidden_total}")
        if self.skipped:
            lines.append(f"sublayers skipped: {', '.join(self.skipped)}")
        if self.latency:
            lat = self.latency
            lines.append(f"latency at {lat['at']} predicted: {lat['predicted_ms']:.2f} ms vs {lat['dense_ms']:.2f} "
                         f"ms dense ({lat['predicted_speedup']:.2f}x; {lat['conditions']})")
            if "measured_ms" in lat:
                lines.append(f"latency at {lat['at']} measured: {lat['measured_ms']:.2f} ms vs "
                             f"{lat['measured_dense_ms']:.2f} ms dense ({lat['measured_speedup']:.2f}x, IQR "
                             f"{lat['measured_speedup_q1']:.2f}-{lat['measured_speedup_q3']:.2f}; "
                             f"{lat['repeats']} alternated rounds)")
        return "\n".join(lines)


def _layer_params(hidden: int, inner: int, units: int, attention_kept: bool = True, ffn_kept: bool = True) -> int:
    attention = 4 * hidden * inner + 3 * inner + hidden + 2 * hidden  # q,k,v,o weights; biases; LayerNorm
    ffn = 2 * hidden * units + units + hidden + 2 * hidden
    return attention * attention_kept + ffn * ffn_kept


def summary(model: nn.Module, seq_len: int = 128, latency=None, measure: bool = False, repeats: int = 10) -> Summary:
    """Heads and FFN units kept per layer, with encoder-layer parameters and FLOPs vs the unpruned model.

    Kept counts are what the gates keep now (mask and deterministic gate), whether or not the model was
    compacted; parameters and FLOPs are those of the compacted layer.

    ``latency``: a :class:`structprune.latency.LatencyTable` of this model's shape (its
    :meth:`~structprune.latency.LatencyTable.report` fills ``Summary.latency``); the summary then gives the
    predicted end-to-end latency and speed-up at the table's batch x sequence length, and, with ``measure``,
    the measured ones (the model and a dense model of its config timed alternated, ``repeats`` rounds, on the
    table's backend and the current threads).
    """
    sizes = sizes_of(model)
    hidden, heads_total, ffn_total, head_dim = sizes.hidden, sizes.heads, sizes.intermediate, sizes.head_dim
    out = Summary(seq_len=seq_len)
    gate = hidden_gate(model)
    width = hidden
    if gate is not None:
        width = int((gate.deterministic() != 0).sum())
        out.hidden_kept, out.hidden_total = width, hidden
    for i, parts in enumerate(layer_parts(model)):
        kept = {name: parts.get(f"{name}_sublayer_gate") is None
                or bool((parts[f"{name}_sublayer_gate"].deterministic() != 0).item()) for name in ("attn", "ffn")}
        out.skipped += [f"{'attention' if n == 'attn' else n} {i}" for n, k in kept.items() if not k]
        heads = int((parts.head_gate.deterministic() != 0).sum()) if kept["attn"] else 0
        units = int((parts.unit_gate.deterministic() != 0).sum()) if kept["ffn"] else 0
        out.layers.append(LayerSummary(
            heads_kept=heads, heads_total=heads_total, ffn_kept=units, ffn_total=ffn_total,
            params=_layer_params(width, heads * head_dim, units, kept["attn"], kept["ffn"]),
            params_original=_layer_params(hidden, heads_total * head_dim, ffn_total),
            flops=attention_flops(1, seq_len, width, heads, head_dim) + ffn_flops(1, seq_len, width, units),
            flops_original=attention_flops(1, seq_len, hidden, heads_total, head_dim)
            + ffn_flops(1, seq_len, hidden, ffn_total),
        ))
    if latency is not None:
        kept = {}
        if out.hidden_kept is not None:
            kept["hidden"] = out.hidden_kept
        if out.skipped:
            kept["attn_kept"] = [f"attention {i}" not in out.skipped for i in range(len(out.layers))]
            kept["ffn_kept"] = [f"ffn {i}" not in out.skipped for i in range(len(out.layers))]
        out.latency = latency.report(model, [r.heads_kept for r in out.layers], [r.ffn_kept for r in out.layers],
                                     measure=measure, repeats=repeats, **kept)
    return out
