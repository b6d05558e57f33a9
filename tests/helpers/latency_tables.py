"""A synthetic latency table for strategy and planning tests (no timing): a 3-layer model with 4 heads and 96 FFN
units per layer, attention 1 ms per head, FFN 1 ms per 24 units, 0.1 ms fixed each."""
from structprune.latency import LatencyTable, table_key

LAYERS, HEADS, UNITS = 3, 4, 96
MACHINE = {"cpu": "fake cpu", "cores": 2, "torch": "x"}


def synthetic_table(model, batch=2, seq=8, machine=MACHINE):
    key = table_key(model, batch, seq, "cpp", "fp32", threads=1, machine_info=machine)
    return LatencyTable(key, attention_ms=[0.1 + h for h in range(HEADS + 1)], ffn_grid=[0, 24, 48, 72, 96],
                        ffn_ms=[0.1, 1.1, 2.1, 3.1, 4.1], empty_ms=1.0, dense_measured_ms=1.0 + LAYERS * 8.0)


def counts(masks):
    return [int(h.sum()) for h in masks.heads_per_layer()], [int(f.sum()) for f in masks.ffn]
