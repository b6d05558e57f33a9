"""The latency table: what one encoder layer's attention and FFN cost at each kept size, measured on this
machine, and the end-to-end latency it predicts for a model with any per-layer kept counts.

A :class:`LatencyTable` holds, for one model shape, backend, dtype, batch x sequence length and thread count:

* ``attention_ms[h]``: one COMPACTED layer's attention block (Q/K/V, attention, output projection, residual,
  LayerNorm) with ``h`` heads kept, for every ``h`` in ``0..H``;
* ``ffn_ms`` at the kept-unit counts ``ffn_grid`` (0 and a grid up to the full size): the FFN block (both
  projections, activation, residual, LayerNorm); linear interpolation in between;
* ``empty_ms``: the whole model with every head and FFN unit removed (embeddings, the LayerNorms and residuals
  of every layer, the task head, Python overhead), measured end to end;
* ``dense_measured_ms``: the whole dense model, measured end to end in the same run.

The prediction for per-layer kept counts ``(h_l, u_l)`` is::

    empty_ms + scale * sum_l [attention(h_l) - attention(0) + ffn(u_l) - ffn(0)]

where ``scale`` (measured: ``(dense_measured_ms - empty_ms)`` over the same sum at full size) corrects for what
timing the blocks alone misses, so the dense prediction is the dense measurement. The curves used for
prediction are the measured medians made non-decreasing (least-squares isotonic fit): removing units never
makes a layer slower in the model, whatever the timing noise says; the raw medians are kept in the JSON.

Counts may be floats or tensors (expected counts during L0 training): the prediction is then differentiable.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

TABLE_VERSION = 1


def isotonic(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    out: list[float] = []
    for mean, weight in blocks:
        out.extend([mean] * int(weight))
    return out


def interpolate(x, xs: Sequence[int], ys: Sequence[float]):
    """Piecewise-linear ``y(x)`` through ``(xs, ys)`` (``xs`` increasing), for an int/float or a tensor
    ``x`` (differentiable in ``x``). ``x`` outside ``[xs[0], xs[-1]]`` is an error."""
    lo, hi = xs[0], xs[-1]
    if isinstance(x, torch.Tensor):
        if bool(((x.detach() < lo - 1e-6) | (x.detach() > hi + 1e-6)).any()):
            raise ValueError(f"kept count {x.detach().tolist()} outside the table's range [{lo}, {hi}]")
        grid = torch.tensor([float(v) for v in xs], dtype=x.dtype if x.is_floating_point() else torch.float64,
                            device=x.device)
        vals = torch.tensor([float(v) for v in ys], dtype=grid.dtype, device=x.device)
        xf = x.to(grid.dtype).clamp(lo, hi)
        i = torch.searchsorted(grid, xf.detach(), right=True).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = grid[i - 1], grid[i], vals[i - 1], vals[i]
        return y0 + (y1 - y0) * (xf - x0) / (x1 - x0)
    x = float(x)
    if not (lo - 1e-9 <= x <= hi + 1e-9):
        raise ValueError(f"kept count {x} outside the table's range [{lo}, {hi}]")
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class TableKey:
    """What a table was measured for; a cached table is reused only when every field matches."""

    model: dict            # architecture, model_type, hidden, heads, head_dim, intermediate, layers, activation
    backend: str
    dtype: str
    batch: int
    seq_len: int
    threads: int
    machine: dict          # cpu model, cores, torch version
    version: int = TABLE_VERSION

    def filename(self) -> str:
        m = self.model
        return (f"{m['model_type']}-h{m['hidden']}-a{m['heads']}-i{m['intermediate']}-l{m['layers']}-"
                f"{self.backend}-{self.dtype}-b{self.batch}xl{self.seq_len}-t{self.threads}.json")

    def differences(self, other: "TableKey") -> dict:
        """``{field: (self, other)}`` for every field that differs."""
        a, b = asdict(self), asdict(other)
        return {k: (a[k], b[k]) for k in a if a[k] != b.get(k)}


@dataclass
class LatencyTable:
    """Measured per-layer costs (milliseconds) and the end-to-end prediction; see the module docstring."""

    key: TableKey
    attention_ms: list[float]                 # index = heads kept, 0..H (raw medians)
    ffn_grid: list[int]                       # kept FFN units at which the FFN was timed, 0 .. I
    ffn_ms: list[float]                       # raw medians at ffn_grid
    empty_ms: float                           # whole model, nothing kept
    dense_measured_ms: float                  # whole model, everything kept
    spread: dict = field(default_factory=dict)  # relative IQR half-widths of the timings, for the record
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        heads, units = self.key.model["heads"], self.key.model["intermediate"]
        if len(self.attention_ms) != heads + 1:
            raise ValueError(f"attention_ms needs one entry per kept-head count 0..{heads}, "
                             f"got {len(self.attention_ms)}")
        grid = list(self.ffn_grid)
        if grid != sorted(set(grid)) or grid[0] != 0 or grid[-1] != units or len(grid) != len(self.ffn_ms):
            raise ValueError(f"ffn_grid must increase from 0 to {units} with one ffn_ms entry each, got {grid}")
        self._attn = isotonic(self.attention_ms)
        self._ffn = isotonic(self.ffn_ms)

    # ---- shape -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.key.model["layers"])

    @property
    def num_heads(self) -> int:
        return int(self.key.model["heads"])

    @property
    def intermediate(self) -> int:
        return int(self.key.model["intermediate"])

    @property
    def at(self) -> str:
        return f"B{self.key.batch}xL{self.key.seq_len}"

    def describe(self) -> str:
        k = self.key
        return (f"{self.at}, {k.backend} backend, {k.dtype}, {k.threads} thread(s), on {k.machine.get('cpu', '?')}")

    # ---- the cost curves (monotone fit) -------------------------------------------------------------
    def attention(self, heads):
        """Predicted attention-block ms of one layer with ``heads`` kept (int, float or tensor)."""
        return interpolate(heads, list(range(self.num_heads + 1)), self._attn)

    def ffn(self, units):
        """Predicted FFN-block ms of one layer with ``units`` kept (int, float or tensor)."""
        return interpolate(units, self.ffn_grid, self._ffn)

    @property
    def fixed_layer_ms(self) -> float:
        """One layer with nothing kept: LayerNorms, residuals, output biases."""
        return self._attn[0] + self._ffn[0]

    @property
    def scale(self) -> float:
        """Measured end-to-end encoder cost over the sum of the blocks timed alone (1 when not measurable)."""
        blocks = self.num_layers * (self._attn[-1] - self._attn[0] + self._ffn[-1] - self._ffn[0])
        if blocks <= 0 or self.dense_measured_ms <= self.empty_ms:
            return 1.0
        return (self.dense_measured_ms - self.empty_ms) / blocks

    def layer_ms(self, heads, units):
        """What one layer with ``heads``/``units`` kept adds over an emptied layer (scaled)."""
        return self.scale * (self.attention(heads) - self._attn[0] + self.ffn(units) - self._ffn[0])

    def predict(self, heads: Sequence, units: Sequence):
        """Predicted end-to-end ms for per-layer kept counts (lists of ints/floats, or tensors ``[L]``)."""
        if len(heads) != self.num_layers or len(units) != self.num_layers:
            raise ValueError(f"need one kept count per layer ({self.num_layers}), got {len(heads)} head and "
                             f"{len(units)} FFN counts")
        total = self.empty_ms
        for h, u in zip(heads, units):
            total = total + self.layer_ms(h, u)
        return total

    @property
    def dense_ms(self) -> float:
        """Predicted end-to-end ms of the dense model (equals ``dense_measured_ms`` through ``scale``)."""
        return float(self.predict([self.num_heads] * self.num_layers, [self.intermediate] * self.num_layers))

    @property
    def max_speedup(self) -> float:
        """The speed-up of removing every head and FFN unit (what no target can exceed)."""
        return self.dense_ms / self.empty_ms

    def speedup(self, heads: Sequence, units: Sequence) -> float:
        return self.dense_ms / float(self.predict(heads, units))

    # ---- JSON ---------------------------------------------------------------------------------------
    def report(self, model, heads: Sequence, units: Sequence, measure: bool = False, repeats: int = 10) -> dict:
        """Predicted latency and speed-up of ``model`` keeping ``heads`` / ``units`` per layer, at this table's
        batch x sequence length; with ``measure``, also measured: ``model`` and a dense model of its config
        timed alternated, ``repeats`` rounds, on the table's backend and the current threads."""
        k = self.key
        out = {"at": self.at, "predicted_ms": float(self.predict(heads, units)), "dense_ms": self.dense_ms,
               "predicted_speedup": self.speedup(heads, units),
               "conditions": f"{k.backend}, {k.dtype}, {k.threads} thread(s)"}
        if measure:
            out.update(self._measure(model, repeats))
        return out

    def _measure(self, model, repeats: int) -> dict:
        from structprune.latency.models import DTYPES, compacted_copy, fresh_model, model_inputs
        from structprune.ops import dispatch as ops
        from structprune.tools.timing import compare

        k = self.key
        fresh = fresh_model(model, DTYPES[k.dtype])
        dense = compacted_copy(fresh, [self.num_heads] * self.num_layers, [self.intermediate] * self.num_layers)
        device = next(model.parameters()).device
        inputs = {n: v.to(device) for n, v in model_inputs(fresh, k.batch, k.seq_len).items()}
        dense.to(device)
        was_training = model.training
        model.eval()
        saved = ops.get_backend()
        ops.set_backend(k.backend)
        try:
            with torch.inference_mode():
                t = compare({"dense": lambda: dense(**inputs), "model": lambda: model(**inputs)}, warmup=2,
                            repeats=repeats)
        finally:
            ops.set_backend(saved)
            model.train(was_training)
        r = t.speedup("model")
        return {"measured_ms": t.time("model").median * 1e3, "measured_dense_ms": t.time("dense").median * 1e3,
                "measured_speedup": r.median, "measured_speedup_q1": r.q1, "measured_speedup_q3": r.q3,
                "repeats": repeats, "measured_threads": t.threads}

    def to_dict(self) -> dict:
        return {"key": asdict(self.key), "attention_ms": self.attention_ms, "ffn_grid": self.ffn_grid,
                "ffn_ms": self.ffn_ms, "empty_ms": self.empty_ms, "dense_measured_ms": self.dense_measured_ms,
                "spread": self.spread, "notes": self.notes,
                "derived": {"attention_fit_ms": self._attn, "ffn_fit_ms": self._ffn, "scale": self.scale,
                            "fixed_layer_ms": self.fixed_layer_ms, "dense_ms": self.dense_ms,
                            "max_speedup": self.max_speedup}}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        version = data.get("key", {}).get("version")
        if version != TABLE_VERSION:
            raise ValueError(f"latency table version {version!r}, this structprune reads version {TABLE_VERSION}")
        return cls(key=TableKey(**data["key"]), attention_ms=list(data["attention_ms"]),
                   ffn_grid=[int(g) for g in data["ffn_grid"]], ffn_ms=list(data["ffn_ms"]),
                   empty_ms=float(data["empty_ms"]), dense_measured_ms=float(data["dense_measured_ms"]),
                   spread=dict(data.get("spread", {})), notes=dict(data.get("notes", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        return cls.from_dict(json.loads(Path(path).read_text()))

