"""Per-layer report of what a patched model keeps: heads, FFN units, parameters and FLOPs vs the original; for
decoders with grouped-query attention also the KV heads and the KV-cache bytes per token."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from structprune.model.cofi import hidden_gate
from structprune.model.families import family_of
from structprune.model.patching import layer_parts


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
    kv_heads_kept: int | None = None  # grouped-query attention only: KV heads a kept head reads
    kv_heads_total: int | None = None
    kv_cache_bytes: int | None = None  # per token: keys and values of the kept KV heads, in the model's dtype
    kv_cache_bytes_original: int | None = None


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
        kv = bool(self.layers) and self.layers[0].kv_heads_total is not None
        head = f"{'layer':>5} {'heads':>9} " + (f"{'kv heads':>9} " if kv else "") + \
            f"{'ffn units':>13} {'params':>21} {f'GFLOPs (seq {self.seq_len})':>21}" + \
            (f" {'KV cache B/token':>18}" if kv else "")
        lines = [head, "-" * len(head)]

        def row(name, r):
            kv_heads = f"{r.kv_heads_kept:>4}/{r.kv_heads_total:<4} " if kv else ""
            cache = f" {r.kv_cache_bytes:>7}/{r.kv_cache_bytes_original:<7}" if kv else ""
            return (f"{name:>5} {r.heads_kept:>4}/{r.heads_total:<4} {kv_heads}{r.ffn_kept:>6}/{r.ffn_total:<6} "
                    f"{r.params / 1e6:>8.3f}M/{r.params_original / 1e6:.3f}M ({r.params / max(1, r.params_original):>4.0%}) "
                    f"{r.flops / 1e9:>7.3f}/{r.flops_original / 1e9:.3f} ({r.flops / max(1, r.flops_original):>4.0%})"
                    f"{cache}")

        for i, r in enumerate(self.layers):
            lines.append(row(str(i), r))
        total = LayerSummary(*(self.total(a) if kv or a not in _KV_FIELDS else None
                               for a in LayerSummary.__dataclass_fields__))
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


_KV_FIELDS = ("kv_heads_kept", "kv_heads_total", "kv_cache_bytes", "kv_cache_bytes_original")


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
    family = family_of(model)
    sizes = family.sizes(model.config)
    heads_total, ffn_total = sizes.heads, sizes.intermediate
    out = Summary(seq_len=seq_len)
    gate = hidden_gate(model)
    cofi = {}
    if gate is not None:
        out.hidden_kept, out.hidden_total = int((gate.deterministic() != 0).sum()), sizes.hidden
        cofi["hidden"] = out.hidden_kept
    for i, parts in enumerate(layer_parts(model)):
        subs = {name: parts.get(f"{name}_sublayer_gate") is None
                or bool((parts[f"{name}_sublayer_gate"].deterministic() != 0).item()) for name in ("attn", "ffn")}
        out.skipped += [f"{'attention' if n == 'attn' else n} {i}" for n, k in subs.items() if not k]
        if not all(subs.values()):
            cofi.update(attention_kept=subs["attn"], ffn_kept=subs["ffn"])
        elif "attention_kept" in cofi:
            cofi.update(attention_kept=True, ffn_kept=True)
        kept = (parts.head_gate.deterministic() != 0) & subs["attn"]
        heads = int(kept.sum())
        units = int((parts.unit_gate.deterministic() != 0).sum()) if subs["ffn"] else 0
        kv = kv_total = None
        if parts.kv_index is not None:
            kv = int(parts.kv_index[kept.to(parts.kv_index.device)].unique().numel())
            kv_total = sizes.kv_heads
        params, flops = family.layer_cost(sizes, seq_len, heads, units, kv, **cofi)
        params0, flops0 = family.layer_cost(sizes, seq_len, heads_total, ffn_total, kv_total)
        row = LayerSummary(heads_kept=heads, heads_total=heads_total, ffn_kept=units, ffn_total=ffn_total,
                           params=params, params_original=params0, flops=flops, flops_original=flops0)
        if kv is not None:
            per_head = 2 * sizes.head_dim * parts["key"].weight.element_size()  # a key and a value
            row.kv_heads_kept, row.kv_heads_total = kv, kv_total
            row.kv_cache_bytes, row.kv_cache_bytes_original = kv * per_head, kv_total * per_head
        out.layers.append(row)
    if latency is not None:
        kept = {}
        if out.hidden_kept is not None:
            kept["hidden"] = out.hidden_kept
        if out.skipped:
            kept["attn_kept"] = [f"attention {i}" not in out.skipped for i in range(len(out.layers))]
            kept["ffn_kept"] = [f"ffn {i}" not in out.skipped for i in range(len(out.layers))]
        if getattr(latency, "num_kv_heads", None) is not None:  # decoders: the KV heads the kept query heads read
            kept["kv_heads"] = [r.kv_heads_kept for r in out.layers]
        out.latency = latency.report(model, [r.heads_kept for r in out.layers], [r.ffn_kept for r in out.layers],
                                     measure=measure, repeats=repeats, **kept)
    return out
