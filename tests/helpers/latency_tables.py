"""Synthetic latency tables for strategy and planning tests (no timing): a 3-layer model of hidden size 64 with 4
heads and 96 FFN units per layer; at full width attention 1 ms per head, FFN 1 ms per 24 units, 0.1 ms fixed each.
:func:`fake_timer` gives :func:`~structprune.latency.measure_table` the same numbers (and those of narrower widths)."""
from structprune.latency import LatencyTable, table_key

LAYERS, HEADS, UNITS, HIDDEN = 3, 4, 96, 64
WIDTHS = [16, 32, 48, 64]
FFN_GRID = [0, 24, 48, 72, 96]
MACHINE = {"cpu": "fake cpu", "cores": 2, "torch": "x"}


def synthetic_table(model, batch=2, seq=8, machine=MACHINE):
    """Full width only, no skipped-sublayer measurement (what a version-1 table can predict)."""
    key = table_key(model, batch, seq, "cpp", "fp32", threads=1, machine_info=machine)
    return LatencyTable(key, attention_ms=[0.1 + h for h in range(HEADS + 1)], ffn_grid=FFN_GRID,
                        ffn_ms=[0.1, 1.1, 2.1, 3.1, 4.1], empty_ms=1.0, dense_measured_ms=1.0 + LAYERS * 8.0)


def fake_ms(name: str) -> float:
    """The milliseconds :func:`fake_timer` gives a probe: at width ``w``, block costs scale with ``w / 64``; the
    model with every sublayer skipped takes ``0.2 + 0.4 * w / 64`` ms, emptied 1 ms, dense 25 ms."""
    kind, *rest = name.split("/")
    if kind in ("attention", "ffn"):
        n, width = (int(v) for v in rest)
        return (0.1 + (n if kind == "attention" else n / 24)) * width / HIDDEN
    if rest[0] == "skipped":
        return 0.2 + 0.4 * int(rest[1]) / HIDDEN
    return 1.0 if rest[0] == "empty" else 1.0 + LAYERS * 8.0


def fake_timer(fns):
    """A timer for :func:`~structprune.latency.measure_table`: one deterministic sample per probe (:func:`fake_ms`)."""
    return {name: [fake_ms(name) * 1e-3] for name in fns}


def synthetic_v2_table(model, batch=2, seq=8, machine=MACHINE):
    """With hidden widths 16..64 and the skipped models: what ``measure_table`` gives with :func:`fake_timer`."""
    key = table_key(model, batch, seq, "cpp", "fp32", threads=1, machine_info=machine)
    attn = [[fake_ms(f"attention/{h}/{w}") for h in range(HEADS + 1)] for w in WIDTHS]
    ffn = [[fake_ms(f"ffn/{u}/{w}") for u in FFN_GRID] for w in WIDTHS]
    return LatencyTable(key, attention_ms=attn[-1], ffn_grid=FFN_GRID, ffn_ms=ffn[-1], empty_ms=1.0,
                        dense_measured_ms=1.0 + LAYERS * 8.0, hidden_grid=WIDTHS, narrow_attention_ms=attn[:-1],
                        narrow_ffn_ms=ffn[:-1], skipped_measured_ms=[fake_ms(f"model/skipped/{w}") for w in WIDTHS])


def counts(masks):
    return [int(h.sum()) for h in masks.heads_per_layer()], [int(f.sum()) for f in masks.ffn]
