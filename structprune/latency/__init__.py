"""Latency-aware pruning: a per-machine cost table of heads, FFN units, hidden width and whole sublayers, and plans
that meet a speed target.

    from structprune.latency import get_table
    table = get_table(model, batch=8, seq_len=128, backend="cpp")   # measured once, cached as JSON
    table.predict(heads_per_layer, units_per_layer)                # end-to-end ms
    table.predict(heads, units, hidden=288, attn_kept=[1, 1, 0, 1, 1, 1], ffn_kept=[1] * 6)
    table.view(288, attn_kept, ffn_kept)                           # the same interface, width and sublayers fixed
    PruneTarget(speedup=2.0, table=table)                          # strategies prune to it
    table.predict(heads, units, kv_heads=kv_heads_per_layer)       # decoders (grouped-query attention)
"""
from structprune.latency.cost_model import (check_predictions, default_cache_dir, ffn_grid, get_table, machine, measure_table,
                         model_key, table_key)
from structprune.latency.table import TABLE_VERSION, LatencyTable, TableKey
from structprune.latency.fits import interpolate, isotonic
from structprune.latency.view import TableView
from structprune.latency.widths import hidden_widths

__all__ = ["LatencyTable", "TableKey", "TABLE_VERSION", "get_table", "measure_table", "check_predictions",
           "table_key", "model_key", "machine", "ffn_grid", "default_cache_dir", "interpolate", "isotonic", "TableView",
           "hidden_widths"]
