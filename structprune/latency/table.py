"""The latency table: what one encoder layer's attention and FFN cost at each kept size and hidden width, measured
on this machine, and the end-to-end latency it predicts for a model with any per-layer kept counts, hidden width
and kept sublayers.

A :class:`LatencyTable` holds, for one model shape, backend, dtype, batch x sequence length and thread count:

* ``hidden_grid``: the hidden widths timed (increasing, the last the model's own ``d``);
* ``attention_ms[h]``: one COMPACTED layer's attention block (Q/K/V, attention, output projection, residual,
  LayerNorm) with ``h`` heads kept, for every ``h`` in ``0..H``, at full width; ``narrow_attention_ms`` the
  same at each narrower width of ``hidden_grid`` (one row each);
* ``ffn_ms`` at the kept-unit counts ``ffn_grid`` (0 and a grid up to the full size): the FFN block (both
  projections, activation, residual, LayerNorm) at full width; ``narrow_ffn_ms`` the rows of narrower widths;
* ``empty_ms``: the whole model with every head and FFN unit removed but every sublayer kept (embeddings, the
  LayerNorms and residuals of every layer, the task head, Python overhead), measured end to end;
* ``skipped_measured_ms``: per width of ``hidden_grid``, the whole model at that width with every sublayer
  skipped (embeddings, embedding LayerNorm, task head, overhead), measured end to end;
* ``dense_measured_ms``: the whole dense model, measured end to end in the same run.

With ``A(h, d)`` and ``F(u, d)`` the block curves (bilinear in count and width), the prediction for per-layer
kept counts ``(h_l, u_l)``, hidden width ``d`` and per-layer sublayer kept-probabilities ``a_l``, ``f_l`` is::

    skipped(d) + sum_l [a_l * (fixed_scale * A(0, d) + scale * (A(h_l, d) - A(0, d)))
                        + f_l * (fixed_scale * F(0, d) + scale * (F(u_l, d) - F(0, d)))]

``scale`` (``(dense_measured_ms - empty_ms)`` over the sum of the blocks' variable parts at full size) and
``fixed_scale`` (``empty_ms - skipped(full width)`` over the sum of the blocks' fixed parts) correct for what
timing the blocks alone misses, so the whole-model measurements are predicted exactly (up to the monotone fits):
the dense model, the emptied model and, at each width, the model with every sublayer skipped. At full width with every sublayer kept this is the
version-1 prediction ``empty_ms + scale * sum_l [A(h_l) - A(0) + F(u_l) - F(0)]``.

The curves used for prediction are the measured medians made non-decreasing (least-squares isotonic fits along the
counts, then along the widths): removing units or hidden dimensions never makes a layer slower in the model,
whatever the timing noise says, and skipping sublayers never makes the model slower than emptying them; the raw
medians are kept in the JSON. Counts, widths and kept-probabilities may be floats or tensors (expected values during
L0 training): the prediction is then differentiable. :meth:`LatencyTable.view` gives the table at a decided width
and set of sublayers, for planners that choose heads and units (:func:`structprune.strategies.plan.plan_masks`).

Decoders with grouped-query attention (version 3; :mod:`structprune.latency.decoder_probes`): measured at
``generate()``'s prefill, full width with every sublayer kept (they have no hidden-dimension or sublayer gates, so
``hidden``, ``attn_kept`` and ``ffn_kept`` are refused), with ``kv_attention_ms`` (the attention block at ``H``
query heads over ``g = 1..Hkv`` KV heads) besides ``attention_ms``; ``A(h, g)`` is the separable
:class:`~structprune.latency.kv.KVCurves`, and ``predict(heads, units, kv_heads=...)`` takes the KV heads kept per
layer (default: those the first ``heads`` query heads read). Encoder tables are written as version 2, unchanged.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from structprune.latency.fits import bilinear, isotonic, isotonic_grid, width_segment
from structprune.latency.kv import KVCurves

TABLE_VERSION = 3  # version 3: decoders (the KV-head curve); encoder tables are still written as version 2
ENCODER_TABLE_VERSION = 2
READ_VERSIONS = (1, 2, 3)  # version 1: full width only, no skipped-sublayer measurement (heads and FFN units only)


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
    version: int = ENCODER_TABLE_VERSION

    def filename(self) -> str:
        m = self.model
        kv = f"-kv{m['kv_heads']}" if "kv_heads" in m else ""
        return (f"{m['model_type']}-h{m['hidden']}-a{m['heads']}{kv}-i{m['intermediate']}-l{m['layers']}-"
                f"{self.backend}-{self.dtype}-b{self.batch}xl{self.seq_len}-t{self.threads}.json")

    def differences(self, other: "TableKey") -> dict:
        """``{field: (self, other)}`` for every field that differs."""
        a, b = asdict(self), asdict(other)
        return {k: (a[k], b[k]) for k in a if a[k] != b.get(k)}


@dataclass
class LatencyTable:
    """Measured per-layer costs (milliseconds) and the end-to-end prediction; see the module docstring.

    Built with only the version-1 fields (no ``hidden_grid``, no ``skipped_measured_ms``), a table predicts the full
    width with every sublayer kept, and says so when asked for anything else."""

    key: TableKey
    attention_ms: list[float]                 # index = heads kept, 0..H (raw medians), full width
    ffn_grid: list[int]                       # kept FFN units at which the FFN was timed, 0 .. I
    ffn_ms: list[float]                       # raw medians at ffn_grid, full width
    empty_ms: float                           # whole model, no head or unit kept, every sublayer kept
    dense_measured_ms: float                  # whole model, everything kept
    spread: dict = field(default_factory=dict)  # relative IQR half-widths of the timings, for the record
    notes: dict = field(default_factory=dict)
    hidden_grid: list[int] | None = None      # widths timed, increasing, last = the model's (None: full width only)
    narrow_attention_ms: list[list[float]] = field(default_factory=list)  # [width below full][heads kept]
    narrow_ffn_ms: list[list[float]] = field(default_factory=list)        # [width below full][ffn_grid point]
    skipped_measured_ms: list[float] | None = None  # per hidden_grid width: whole model, every sublayer skipped
    kv_attention_ms: list[float] | None = None  # decoders: attention at H query heads with g = 1..Hkv KV heads

    def __post_init__(self):
        heads, units, hidden = self.key.model["heads"], self.key.model["intermediate"], self.key.model["hidden"]
        if len(self.attention_ms) != heads + 1:
            raise ValueError(f"attention_ms needs one entry per kept-head count 0..{heads}, "
                             f"got {len(self.attention_ms)}")
        grid = list(self.ffn_grid)
        if grid != sorted(set(grid)) or grid[0] != 0 or grid[-1] != units or len(grid) != len(self.ffn_ms):
            raise ValueError(f"ffn_grid must increase from 0 to {units} with one ffn_ms entry each, got {grid}")
        widths = [int(w) for w in (self.hidden_grid or [hidden])]
        if widths != sorted(set(widths)) or widths[0] < 1 or widths[-1] != hidden:
            raise ValueError(f"hidden_grid must increase from >= 1 to the model's hidden size {hidden}, got {widths}")
        self.hidden_grid = widths
        narrow = len(widths) - 1
        if (len(self.narrow_attention_ms) != narrow or any(len(r) != heads + 1 for r in self.narrow_attention_ms)
                or len(self.narrow_ffn_ms) != narrow or any(len(r) != len(grid) for r in self.narrow_ffn_ms)):
            raise ValueError(f"narrow_attention_ms / narrow_ffn_ms need one row per width below {hidden} "
                             f"({widths[:-1]}), of {heads + 1} / {len(grid)} entries")
        if self.skipped_measured_ms is None and narrow:
            raise ValueError("a table with narrower hidden widths needs skipped_measured_ms (one per width)")
        if self.skipped_measured_ms is not None and len(self.skipped_measured_ms) != len(widths):
            raise ValueError(f"skipped_measured_ms needs one entry per hidden width {widths}, "
                             f"got {len(self.skipped_measured_ms)}")
        self._attn_rows = isotonic_grid([*self.narrow_attention_ms, self.attention_ms])
        self._ffn_rows = isotonic_grid([*self.narrow_ffn_ms, self.ffn_ms])
        self._kv = None
        if ("kv_heads" in self.key.model) != (self.kv_attention_ms is not None):
            raise ValueError("a decoder table (kv_heads in its model key) needs kv_attention_ms, and only it")
        if self.kv_attention_ms is not None:
            if narrow or self.skipped_measured_ms is not None:
                raise ValueError("a decoder table is full width with every sublayer kept (no hidden_grid below the "
                                 "model's width, no skipped_measured_ms)")
            self._kv = KVCurves(self._attn_rows[-1], self.kv_attention_ms, heads, int(self.key.model["kv_heads"]))
            self._attn_rows = [self._kv.default]
        self._attn, self._ffn = self._attn_rows[-1], self._ffn_rows[-1]

    # ---- shape -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.key.model["layers"])

    @property
    def num_heads(self) -> int:
        return int(self.key.model["heads"])

    @property
    def num_kv_heads(self) -> int | None:
        """KV heads per layer of a decoder's table (None for encoders)."""
        return None if self._kv is None else self._kv.num_kv

    @property
    def intermediate(self) -> int:
        return int(self.key.model["intermediate"])

    @property
    def hidden(self) -> int:
        """The model's hidden width (the last of ``hidden_grid``)."""
        return int(self.key.model["hidden"])

    @property
    def measures_skipping(self) -> bool:
        """Whether the model with every sublayer skipped was measured (tables of version 2 that
        :func:`~structprune.latency.measure_table` writes), so narrower widths and skipped sublayers can be
        predicted."""
        return self.skipped_measured_ms is not None

    @property
    def at(self) -> str:
        return f"B{self.key.batch}xL{self.key.seq_len}"

    def describe(self) -> str:
        k = self.key
        return (f"{self.at}, {k.backend} backend, {k.dtype}, {k.threads} thread(s), on {k.machine.get('cpu', '?')}")

    # ---- the cost curves (monotone fit) -------------------------------------------------------------
    def attention(self, heads, hidden=None, kv_heads=None):
        """Predicted attention-block ms of one layer with ``heads`` kept at hidden width ``hidden`` (default: the
        model's); ints, floats or tensors. Decoders: with ``kv_heads`` KV heads kept (default: those the first
        ``heads`` query heads read), :class:`~structprune.latency.kv.KVCurves`."""
        if kv_heads is not None:
            if self._kv is None:
                raise ValueError("kv_heads is for decoder tables (grouped-query attention); this table is an "
                                 "encoder's, with one KV head per query head")
            self._check_decoder(hidden)
            self._kv.check(heads, kv_heads)
            return self._kv.attention(heads, kv_heads)
        return bilinear(heads, list(range(self.num_heads + 1)), self._attn_rows, self._width(hidden), self.hidden_grid)

    def ffn(self, units, hidden=None):
        """Predicted FFN-block ms of one layer with ``units`` kept at hidden width ``hidden`` (default: the
        model's); ints, floats or tensors."""
        return bilinear(units, self.ffn_grid, self._ffn_rows, self._width(hidden), self.hidden_grid)

    def _width(self, hidden):
        return self.hidden if hidden is None else hidden

    @property
    def fixed_layer_ms(self) -> float:
        """One layer with nothing kept, full width: LayerNorms, residuals, output biases."""
        return self._attn[0] + self._ffn[0]

    @property
    def scale(self) -> float:
        """Measured end-to-end cost of the kept heads and units over the same blocks timed alone (1 when not
        measurable)."""
        blocks = self.num_layers * (self._attn[-1] - self._attn[0] + self._ffn[-1] - self._ffn[0])
        if blocks <= 0 or self.dense_measured_ms <= self.empty_ms:
            return 1.0
        return (self.dense_measured_ms - self.empty_ms) / blocks

    def _skipped_fit(self) -> tuple[list[float], float]:
        """(the skipped-model curve over ``hidden_grid``, ``fixed_scale``): the monotone fit of the measurements,
        capped at ``empty_ms`` (skipping sublayers never costs more than emptying them); the scale puts what the
        emptied model costs over the skipped one on the blocks' fixed parts (on the curve where they take 0 ms)."""
        self._need_skipping("the skipped-model curve")
        curve = [min(v, self.empty_ms) for v in isotonic(self.skipped_measured_ms)]
        gap, fixed = self.empty_ms - curve[-1], self.num_layers * self.fixed_layer_ms
        fixed_scale = gap / fixed if fixed > 0 else 0.0
        return [v + gap - fixed_scale * fixed for v in curve], fixed_scale

    @property
    def fixed_scale(self) -> float:
        """Measured end-to-end cost of the sublayers' fixed parts (LayerNorms, residuals, biases, calls) over the
        same parts timed alone (needs :attr:`measures_skipping`)."""
        return self._skipped_fit()[1]

    def skipped_ms(self, hidden=None):
        """Predicted end-to-end ms of the model at hidden width ``hidden`` (default: the model's) with every
        sublayer skipped: embeddings, task head and overhead (a float, or a tensor differentiable in ``hidden``)."""
        curve = self._skipped_fit()[0]
        i, j, t = width_segment(self._width(hidden), self.hidden_grid)
        return curve[i] if i == j else curve[i] + (curve[j] - curve[i]) * t

    def _check_decoder(self, hidden=None, *kept, what: str = "a hidden width or kept sublayers") -> None:
        if self._kv is not None and (hidden is not None or any(k is not None for k in kept)):
            raise ValueError(f"{what}: a decoder's latency table is full width with every sublayer kept (decoders "
                             "have no hidden-dimension or sublayer gates); give heads, units and kv_heads only")

    def _need_skipping(self, what: str) -> None:
        self._check_decoder(True, what=what)
        if not self.measures_skipping:
            raise ValueError(f"{what} needs a latency table measured with hidden widths and skipped sublayers; this "
                             f"one (version {self.key.version}) has neither: measure it again "
                             f"(structprune latency-table --refresh, or get_table(..., refresh=True))")

    def attention_sublayer_ms(self, heads, hidden=None):
        """What one kept attention sublayer with ``heads`` heads adds to the model at width ``hidden`` (scaled)."""
        d = self._width(hidden)
        empty = self.attention(0, d)
        return self.fixed_scale * empty + self.scale * (self.attention(heads, d) - empty)

    def ffn_sublayer_ms(self, units, hidden=None):
        """What one kept FFN sublayer with ``units`` units adds to the model at width ``hidden`` (scaled)."""
        d = self._width(hidden)
        empty = self.ffn(0, d)
        return self.fixed_scale * empty + self.scale * (self.ffn(units, d) - empty)

    def layer_ms(self, heads, units, hidden=None, kv_heads=None):
        """What one layer with ``heads``/``units`` (and, decoders, ``kv_heads``) kept adds over an emptied layer
        (scaled), at width ``hidden``."""
        if kv_heads is not None:
            if not isinstance(heads, torch.Tensor) and float(heads) == 0:
                kv_heads = 0  # no query head reads a KV head (a compacted layer may hold a zeroed one)
            attn = self.attention(heads, hidden, kv_heads) - self._attn[0]
        else:
            d = self._width(hidden)
            attn = self.attention(heads, d) - self.attention(0, d)
        d = self._width(hidden)
        return self.scale * (attn + self.ffn(units, d) - self.ffn(0, d))

    def predict(self, heads: Sequence, units: Sequence, hidden=None, attn_kept: Sequence | None = None,
                ffn_kept: Sequence | None = None, kv_heads: Sequence | None = None):
        """Predicted end-to-end ms (see the module docstring) for per-layer kept counts ``heads`` / ``units``
        (lists of ints/floats, or tensors ``[L]``) at hidden width ``hidden`` (a number or scalar tensor; default
        the model's), with per-layer attention / FFN sublayers kept with probability ``attn_kept`` / ``ffn_kept``
        (bools, numbers in [0, 1] or tensors ``[L]``; default every one kept). The counts of a skipped sublayer
        do not matter. Decoders: ``kv_heads`` the KV heads kept per layer (default: those the first ``heads``
        query heads read); ``hidden``, ``attn_kept``, ``ffn_kept`` are refused. Differentiable in every tensor
        argument."""
        layers = self.num_layers
        if len(heads) != layers or len(units) != layers:
            raise ValueError(f"need one kept count per layer ({layers}), got {len(heads)} head and "
                             f"{len(units)} FFN counts")
        self._check_decoder(hidden, attn_kept, ffn_kept)
        if kv_heads is not None:
            if len(kv_heads) != layers:
                raise ValueError(f"need one KV-head count per layer ({layers}), got {len(kv_heads)}")
            total = self.empty_ms
            for h, u, g in zip(heads, units, kv_heads):
                total = total + self.layer_ms(h, u, kv_heads=g)
            return total
        for name, kept in (("attn_kept", attn_kept), ("ffn_kept", ffn_kept)):
            _check_fractions(name, kept, layers)
        if hidden is None and attn_kept is None and ffn_kept is None:
            total = self.empty_ms
            for h, u in zip(heads, units):
                total = total + self.layer_ms(h, u)
            return total
        self._need_skipping("predicting a narrower hidden width or skipped sublayers")
        total = self.skipped_ms(hidden)
        for i, (h, u) in enumerate(zip(heads, units)):
            a = 1.0 if attn_kept is None else attn_kept[i]
            f = 1.0 if ffn_kept is None else ffn_kept[i]
            total = total + a * self.attention_sublayer_ms(h, hidden) + f * self.ffn_sublayer_ms(u, hidden)
        return total

    @property
    def dense_ms(self) -> float:
        """Predicted end-to-end ms of the dense model (equals ``dense_measured_ms`` through ``scale``)."""
        return float(self.predict([self.num_heads] * self.num_layers, [self.intermediate] * self.num_layers))

    @property
    def max_speedup(self) -> float:
        """The speed-up of the fastest model the table describes: every sublayer skipped at the smallest hidden
        width (a version-1 table: every head and FFN unit removed)."""
        if not self.measures_skipping:
            return self.dense_ms / self.empty_ms
        return self.dense_ms / float(self.skipped_ms(self.hidden_grid[0]))

    def speedup(self, heads: Sequence, units: Sequence, hidden=None, attn_kept: Sequence | None = None,
                ffn_kept: Sequence | None = None, kv_heads: Sequence | None = None) -> float:
        """``dense_ms`` over :meth:`predict` of the same arguments."""
        return self.dense_ms / float(self.predict(heads, units, hidden, attn_kept, ffn_kept, kv_heads))

    def view(self, hidden: int, attn_kept: Sequence[bool], ffn_kept: Sequence[bool]):
        """This table at a decided hidden width and set of kept sublayers: a
        :class:`~structprune.latency.view.TableView` with the interface planners use (``layer_ms``, ``predict``,
        ``empty_ms``, ...), in which skipped sublayers cost nothing."""
        from structprune.latency.view import TableView

        return TableView(self, hidden, attn_kept, ffn_kept)

    # ---- JSON ---------------------------------------------------------------------------------------
    def report(self, model, heads: Sequence, units: Sequence, measure: bool = False, repeats: int = 10,
               **kept) -> dict:
        """Predicted latency and speed-up of ``model`` keeping ``heads`` / ``units`` per layer (and ``hidden``,
        ``attn_kept``, ``ffn_kept`` as :meth:`predict` takes them), at this table's batch x sequence length; with
        ``measure``, also measured: ``model`` and a dense model of its config timed alternated, ``repeats`` rounds,
        on the table's backend and the current threads."""
        k = self.key
        out = {"at": self.at, "predicted_ms": float(self.predict(heads, units, **kept)), "dense_ms": self.dense_ms,
               "predicted_speedup": self.speedup(heads, units, **kept),
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
        derived = {"attention_fit_ms": self._attn, "ffn_fit_ms": self._ffn, "scale": self.scale,
                   "fixed_layer_ms": self.fixed_layer_ms, "dense_ms": self.dense_ms, "max_speedup": self.max_speedup,
                   "attention_fit_ms_by_width": self._attn_rows, "ffn_fit_ms_by_width": self._ffn_rows}
        if self.measures_skipping:
            curve, fixed_scale = self._skipped_fit()
            derived.update(skipped_fit_ms=curve, fixed_scale=fixed_scale)
        extra = {}
        if self._kv is not None:  # decoders only: an encoder table's JSON is that of version 2
            extra["kv_attention_ms"] = self.kv_attention_ms
            derived.update(query_fit_ms=self._kv.query, kv_fit_ms=self._kv.kv)
        return {**extra, "key": asdict(self.key), "attention_ms": self.attention_ms, "ffn_grid": self.ffn_grid,
                "ffn_ms": self.ffn_ms, "empty_ms": self.empty_ms, "dense_measured_ms": self.dense_measured_ms,
                "hidden_grid": self.hidden_grid, "narrow_attention_ms": self.narrow_attention_ms,
                "narrow_ffn_ms": self.narrow_ffn_ms, "skipped_measured_ms": self.skipped_measured_ms,
                "spread": self.spread, "notes": self.notes, "derived": derived}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        """A table from :meth:`to_dict`'s JSON, of this version or version 1 (full width, no skipped sublayers:
        its key keeps version 1, so :func:`~structprune.latency.get_table` measures it again)."""
        version = data.get("key", {}).get("version")
        if version not in READ_VERSIONS:
            raise ValueError(f"latency table version {version!r}, this structprune reads versions {READ_VERSIONS}")
        skipped, kv = data.get("skipped_measured_ms"), data.get("kv_attention_ms")
        if (kv is not None) != (version == TABLE_VERSION):
            raise ValueError(f"a latency table of version {version} with{'' if kv is not None else 'out'} "
                             "kv_attention_ms: version 3 is the decoders' (with it), versions 1 and 2 the encoders'")
        return cls(key=TableKey(**data["key"]), attention_ms=list(data["attention_ms"]),
                   ffn_grid=[int(g) for g in data["ffn_grid"]], ffn_ms=list(data["ffn_ms"]),
                   empty_ms=float(data["empty_ms"]), dense_measured_ms=float(data["dense_measured_ms"]),
                   spread=dict(data.get("spread", {})), notes=dict(data.get("notes", {})),
                   hidden_grid=[int(w) for w in data.get("hidden_grid") or [data["key"]["model"]["hidden"]]],
                   narrow_attention_ms=[list(r) for r in data.get("narrow_attention_ms", [])],
                   narrow_ffn_ms=[list(r) for r in data.get("narrow_ffn_ms", [])],
                   skipped_measured_ms=None if skipped is None else [float(v) for v in skipped],
                   kv_attention_ms=None if kv is None else [float(v) for v in kv])

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


def _check_fractions(name: str, values, layers: int) -> None:
    """``values`` (None, or one kept-probability per layer) has ``layers`` entries in [0, 1]."""
    if values is None:
        return
    if len(values) != layers:
        raise ValueError(f"{name} needs one entry per layer ({layers}), got {len(values)}")
    t = values.detach().float() if isinstance(values, torch.Tensor) else torch.tensor(
        [float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in values])
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"{name} must be bools or probabilities in [0, 1], got {t.tolist()}")
