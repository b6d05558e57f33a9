"""Measure a :class:`~structprune.latency.LatencyTable` on this machine, cache it, and check its predictions.

Timings do not depend on the weights' values, so the table is measured on a freshly initialised model of the
same class and config (seeded), never touching the caller's model. Every probe is a COMPACTED block (what
will be served): at each hidden width of the grid (:mod:`structprune.latency.widths`), for each kept-head count
one attention block and for each point of the FFN grid one FFN block, and the whole model with every sublayer
skipped; plus the whole model emptied and the whole dense model; all of them are timed interleaved in the same
rounds (:func:`structprune.tools.timing.compare`), and the median per probe is kept. Decoders (grouped-query
attention) are timed at full width, at ``generate()``'s prefill, with a KV-head dimension besides the kept query
heads (:mod:`structprune.latency.decoder_probes`).

    table = get_table(model, batch=8, seq_len=128, backend="cpp")   # cached per machine/shape/backend/threads
    table.predict([12] * 6, [1536] * 6)                            # ms, end to end
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from structprune.ops import dispatch as ops
from structprune.model.compaction import compact_layer, parts_of
from structprune.model.families import family_of, sizes_of
from structprune.model.patching import gated_layers
from structprune.latency.models import DTYPES, compacted_copy, fresh_model, model_inputs
from structprune.latency.table import ENCODER_TABLE_VERSION, TABLE_VERSION, LatencyTable, TableKey
from structprune.latency.widths import hidden_widths, narrow_layer, narrow_model, skipped_model

Timer = Callable[[Mapping[str, Callable[[], object]]], Mapping[str, list[float]]]
def default_cache_dir() -> Path:
    """``$STRUCTPRUNE_CACHE_DIR/latency``, else ``~/.cache/structprune/latency``."""
    root = os.environ.get("STRUCTPRUNE_CACHE_DIR")
    return Path(root) / "latency" if root else Path.home() / ".cache" / "structprune" / "latency"


def machine() -> dict:
    """What a table depends on besides the model and the inputs: the CPU model, its cores, torch."""
    from structprune.tools.machine import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}


def model_key(model: nn.Module) -> dict:
    """The original shape of ``model`` (its config: compaction does not change it)."""
    c = sizes_of(model)
    key = {"architecture": type(model).__name__, "model_type": model.config.model_type, "hidden": c.hidden,
           "heads": c.heads, "head_dim": c.head_dim, "intermediate": c.intermediate, "layers": c.layers,
           "activation": c.activation}
    if family_of(model).grouped_kv:  # decoders: the KV heads, and what the prefill runs (decoder_probes)
        key.update(kv_heads=c.kv_heads, prefill="use_cache, logits_to_keep=1")
    return key


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch dtype, got {dtype!r}")
        return dtype
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype}")


def table_key(model: nn.Module, batch: int, seq_len: int, backend: str = "cpp", dtype="fp32",
              threads: int | None = None, machine_info: dict | None = None) -> TableKey:
    """The key a table for these settings is stored and looked up under."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got {batch}x{seq_len}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and seq_len > max_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_len}")
    key = model_key(model)
    return TableKey(model=key, backend=backend, dtype=_dtype_name(dtype), batch=int(batch),
                    seq_len=int(seq_len), threads=int(threads or torch.get_num_threads()),
                    machine=machine_info if machine_info is not None else machine(),
                    version=TABLE_VERSION if "kv_heads" in key else ENCODER_TABLE_VERSION)


def ffn_grid(units: int, points: int = 24) -> list[int]:
    """0 and ``points`` kept-unit counts evenly spaced up to ``units`` (rounded to whole units)."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    return sorted({0, units, *(round(units * k / points) for k in range(1, points + 1))})


def compare_timer(warmup: int = 2, repeats: int = 15) -> Timer:
    """The default timer: every probe once per round, rounds alternating order, ``repeats`` samples each."""
    from structprune.tools.timing import compare

    def timer(fns):
        return compare(dict(fns), warmup=warmup, repeats=repeats).seconds

    return timer


def _layer_inputs(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, object]:
    """What the model passes to its first encoder layer: (hidden states, attention mask)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = args[0]
        seen["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    handle = gated_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen["x"], seen["mask"]


def _probe_layer(base: nn.Module, heads: int, units: int) -> nn.Module:
    layer = copy.deepcopy(base)
    for gate, k in zip(parts_of(layer).gates, (heads, units)):
        mask = torch.zeros(gate.n)
        mask[:k] = 1.0
        gate.set_mask(mask)
    compact_layer(layer)
    return layer


@torch.no_grad()
def measure_table(model: nn.Module, batch: int, seq_len: int, backend: str = "cpp", dtype="fp32",
                  ffn_points: int = 24, timer: Timer | None = None, machine_info: dict | None = None,
                  seed: int = 0, hidden_grid: Sequence[float | int] | None = None) -> LatencyTable:
    """Time the blocks of ``model``'s shape on this machine and return the :class:`LatencyTable`.

    Args:
        model: any supported HF model (patched or not, compacted or not); only its class and config are used.
        batch, seq_len: the input shape the latency refers to.
        backend: the kernel backend (``sp.set_backend`` name) to time; restored afterwards.
        dtype: "fp32", "fp16", "bf16" or the torch dtype.
        ffn_points: FFN kept-unit grid size (plus 0); linear interpolation in between.
        timer: ``timer({name: fn}) -> {name: [per-call seconds, ...]}``; default :func:`compare_timer`.
            Probe names are ``"attention/<heads>/<width>"``, ``"ffn/<units>/<width>"``,
            ``"model/skipped/<width>"``, ``"model/empty"`` and ``"model/dense"``; for decoders
            (:mod:`~structprune.latency.decoder_probes`: full width, no skipped model, at the prefill of
            ``generate()``) also ``"kv/<kv heads>/<width>"``.
        machine_info: what to record as the machine (default :func:`machine`).
        hidden_grid: the hidden widths (ints) or fractions of the hidden size (floats) to time besides the full
            width (:func:`~structprune.latency.widths.hidden_widths`; default 1/4, 1/2, 3/4). Encoders only.

    Uses the current ``torch.get_num_threads()`` and records it. Every probe at every width is timed in the same
    interleaved rounds.
    """
    key = table_key(model, batch, seq_len, backend, dtype, machine_info=machine_info)
    _check_grid(key, hidden_grid)
    torch_dtype = DTYPES[key.dtype]
    timer = timer or compare_timer()
    fresh = fresh_model(model, torch_dtype, seed)
    inputs = model_inputs(fresh, batch, seq_len, seed)
    heads, units, layers, hidden = (key.model[k] for k in ("heads", "intermediate", "layers", "hidden"))
    grid = ffn_grid(units, ffn_points)
    decoder = "kv_heads" in key.model
    widths = [hidden] if decoder else hidden_widths(hidden, hidden_grid)
    saved = ops.get_backend()
    ops.set_backend(backend)
    try:
        if decoder:
            from structprune.latency.decoder_probes import block_probes

            fns = block_probes(fresh, inputs, grid)
        else:
            fns = _encoder_probes(fresh, inputs, heads, hidden, grid, widths)
        empty = compacted_copy(fresh, [0] * layers, [0] * layers)
        dense = compacted_copy(fresh, [heads] * layers, [units] * layers)
        fns["model/empty"] = lambda: empty(**inputs)
        fns["model/dense"] = lambda: dense(**inputs)
        with torch.inference_mode():  # built outside it (weights keep their version counters), served inside it
            seconds = timer(fns)
    finally:
        ops.set_backend(saved)
    from structprune.tools.timing import Spread

    ms = {name: Spread.of([s * 1e3 for s in seconds[name]]) for name in fns}
    spread = {name: round(s.rel_halfwidth, 4) for name, s in ms.items() if len(seconds[name]) > 1}
    attention = [[ms[f"attention/{h}/{w}"].median for h in range(heads + 1)] for w in widths]
    ffn = [[ms[f"ffn/{u}/{w}"].median for u in grid] for w in widths]
    kv = None
    if decoder:
        kv = [ms[f"kv/{g}/{hidden}"].median for g in range(1, key.model["kv_heads"])] + [attention[-1][-1]]
    return LatencyTable(key=key, attention_ms=attention[-1], ffn_grid=grid, ffn_ms=ffn[-1],
                        empty_ms=ms["model/empty"].median, dense_measured_ms=ms["model/dense"].median,
                        spread=spread, notes={"samples": len(seconds["model/dense"]), "seed": seed},
                        hidden_grid=widths, narrow_attention_ms=attention[:-1], narrow_ffn_ms=ffn[:-1],
                        skipped_measured_ms=None if decoder else [ms[f"model/skipped/{w}"].median for w in widths],
                        kv_attention_ms=kv)


def _encoder_probes(fresh: nn.Module, inputs: dict, heads: int, hidden: int, grid: list[int],
                    widths: list[int]) -> dict[str, Callable[[], object]]:
    """The encoder's blocks at every width and the skipped model (see the module docstring)."""
    x, mask = _layer_inputs(fresh, inputs)
    base = gated_layers(fresh)[0]
    family = family_of(fresh)
    fns: dict[str, Callable[[], object]] = {}
    for w in widths:
        xw = x[..., :w].contiguous()
        for h in range(heads + 1):
            attn = narrow_layer(_probe_layer(base, h, 0), hidden, w).attention
            fns[f"attention/{h}/{w}"] = lambda m=attn, xw=xw: m(xw, mask)
        for u in grid:
            layer = narrow_layer(_probe_layer(base, 0, u), hidden, w)
            fns[f"ffn/{u}/{w}"] = lambda m=layer, xw=xw: family.ffn_block(m, xw)
        skipped = skipped_model(fresh, w)
        _check_runs(skipped, inputs, f"the model at hidden width {w} with every sublayer skipped")
        fns[f"model/skipped/{w}"] = lambda m=skipped: m(**inputs)
    return fns


def _check_grid(key: TableKey, hidden_grid) -> None:
    """A ValueError for hidden widths asked of a decoder (no hidden-dimension gates: its table is full width)."""
    if "kv_heads" in key.model and hidden_grid is not None:
        raise ValueError(f"{key.model['architecture']} is a decoder: it has no hidden-dimension or sublayer gates, so "
                         "its latency table is full width with every sublayer kept; drop hidden_grid (--hidden-grid)")


def _check_runs(model: nn.Module, inputs: dict, what: str) -> None:
    """Run ``model`` once, so a model it cannot be built for fails here with a clear message, not in the timer."""
    try:
        with torch.inference_mode():
            model(**inputs)
    except Exception as exc:
        raise RuntimeError(f"could not run {what} ({type(model).__name__}): {exc}") from exc


def get_table(model: nn.Module, batch: int, seq_len: int, backend: str = "cpp", dtype="fp32",
              cache_dir: str | Path | None = None, refresh: bool = False, verbose: bool = True,
              **measure_kwargs) -> LatencyTable:
    """The cached table for these settings when one exists for this machine (same CPU, cores, torch, shape,
    backend, dtype, batch, sequence length and threads; and the hidden widths, when ``hidden_grid`` is given),
    else a fresh measurement, cached for next time. ``refresh`` measures again whatever the cache holds."""
    key = table_key(model, batch, seq_len, backend, dtype, machine_info=measure_kwargs.get("machine_info"))
    _check_grid(key, measure_kwargs.get("hidden_grid"))
    path = Path(cache_dir or default_cache_dir()) / key.filename()
    if path.is_file() and not refresh:
        try:
            table = LatencyTable.load(path)
        except (ValueError, TypeError, KeyError) as exc:
            warnings.warn(f"ignoring unreadable latency table {path}: {exc}", stacklevel=2)
        else:
            differ = table.key.differences(key)
            asked = measure_kwargs.get("hidden_grid")
            if asked is not None and hidden_widths(key.model["hidden"], asked) != table.hidden_grid:
                differ["hidden_grid"] = (table.hidden_grid, hidden_widths(key.model["hidden"], asked))
            if not differ:
                return table
            if verbose:
                print(f"latency table {path} was measured for other settings {differ}; measuring again")
    if verbose:
        print(f"measuring the latency table for {key.model['architecture']} at B{batch}xL{seq_len}, "
              f"{backend}, {key.dtype}, {key.threads} thread(s) -> {path}")
    table = measure_table(model, batch, seq_len, backend, dtype, **measure_kwargs)
    table.save(path)
    return table


@torch.no_grad()
def check_predictions(model: nn.Module, table: LatencyTable, counts: list[tuple], timer: Timer | None = None,
                      seed: int = 0) -> list[dict]:
    """Measure compacted models with the given per-layer ``(heads, units)`` counts, or ``(heads, units, hidden)``
    at a narrower hidden width (every sublayer kept), against the dense model (alternated in the same rounds) and
    set the measured speed-ups beside the table's predictions. Decoders: ``(heads, units, kv_heads)`` (per-layer
    lists; the heads spread over the first ``kv_heads`` KV groups, :func:`~structprune.latency.decoder_probes.
    spread_heads`) or ``(heads, units)`` (the first heads, the KV heads they read)."""
    timer = timer or compare_timer()
    key = table.key
    fresh = fresh_model(model, DTYPES[key.dtype], seed)
    inputs = model_inputs(fresh, key.batch, key.seq_len, seed)
    layers = table.num_layers
    decoder = table.num_kv_heads is not None
    cases = [(list(c[0]), list(c[1]), (list(c[2]) if decoder else int(c[2])) if len(c) > 2 else None)
             for c in counts]
    fns = {"dense": (lambda m=compacted_copy(fresh, [table.num_heads] * layers, [table.intermediate] * layers):
                     m(**inputs))}
    for i, (h, u, w) in enumerate(cases):
        if decoder:
            from structprune.latency.decoder_probes import compacted_decoder

            built = compacted_decoder(fresh, h, u, w)
        else:
            built = narrow_model(compacted_copy(fresh, h, u), table.hidden if w is None else w)
        fns[f"case/{i}"] = lambda m=built: m(**inputs)
    saved = ops.get_backend()
    ops.set_backend(key.backend)
    try:
        with torch.inference_mode():
            seconds = timer(fns)
    finally:
        ops.set_backend(saved)
    from structprune.tools.timing import Spread

    rows = []
    dense = seconds["dense"]
    for i, (h, u, w) in enumerate(cases):
        ratios = Spread.of([d / max(s, 1e-12) for d, s in zip(dense, seconds[f"case/{i}"])])
        t = Spread.of([s * 1e3 for s in seconds[f"case/{i}"]])
        kw = {"kv_heads": w} if decoder else {"hidden": None if w in (None, table.hidden) else w}
        row = {"heads": h, "ffn": u, **({"kv_heads": w} if decoder else {"hidden": w or table.hidden})}
        row.update(predicted_ms=float(table.predict(h, u, **kw)), measured_ms=t.median,
                   predicted_speedup=table.speedup(h, u, **kw), measured_speedup=ratios.median,
                   speedup_q1=ratios.q1, speedup_q3=ratios.q3)
        rows.append(row)
    return rows
