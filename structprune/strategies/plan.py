"""Choose per-layer kept heads and FFN units that meet a latency / parameter budget at the least importance lost.

:func:`plan_masks` is a greedy on the cost table: while the predicted latency is over budget it removes, in the
layer and structure where it is cheapest in importance per millisecond saved, the least important remaining
units (one head; FFN units down to the next count the table says is faster). It then meets a parameter budget
(importance per parameter) and count caps the same way, and finally adds back, most importance per millisecond
first, every removed unit that still fits. Within a layer units always go in order of importance, so the
result is the top-importance set of each layer at the chosen counts.

Importances must be commensurate across heads and FFN units (an estimate of the loss each one's removal costs):
gain passes the un-normalised ``E|dL/dgate|``, random passes uniform draws scaled by each unit's parameter count,
L0 the gates' probability of being non-zero. FFN counts stay on the table's grid (where they were timed) unless
``ffn_on_grid=False``, and on multiples of ``multiple_of`` (aligned GEMM widths) when it is above 1.
"""
from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from structprune.model.families import sizes_of
from structprune.latency.table import LatencyTable

STRUCTURES = ("heads", "ffn")


def unit_params(hidden: int, head_dim: int) -> dict[str, int]:
    """Encoder parameters one head (Q/K/V rows and biases, output-projection columns) and one FFN unit carry."""
    return {"heads": 4 * hidden * head_dim + 3 * head_dim, "ffn": 2 * hidden + 1}


def model_unit_params(model) -> dict[str, int]:
    """Parameters one head and one FFN unit of ``model`` carry: :func:`unit_params` for encoders; for decoders with
    grouped-query attention (read from the first layer's projections) a query head's ``q_proj`` rows and ``o_proj``
    columns, a KV head's ``k_proj``/``v_proj`` rows (``"kv_heads"``), a GLU unit's ``gate_proj``/``up_proj`` rows
    and ``down_proj`` column, biases included."""
    from structprune.model.patching import layer_parts

    parts = layer_parts(model)[0]
    if parts.kv_index is None:
        c = sizes_of(model)
        return unit_params(c.hidden, c.head_dim)

    def rows(linear, n):  # parameters of n output rows of a linear
        return n * linear.in_features + (n if linear.bias is not None else 0)

    d = parts.attention.head_dim
    q, k, v, o = (parts[r] for r in ("query", "key", "value", "attn_out"))
    gate, up, down = (parts[r] for r in ("ffn_in", "ffn_up", "ffn_out"))
    return {"heads": rows(q, d) + d * o.out_features, "kv_heads": rows(k, d) + rows(v, d),
            "ffn": rows(gate, 1) + rows(up, 1) + down.out_features}


@dataclass
class Budget:
    """What the plan must meet; None means no such constraint.

    latency_ms: predicted end-to-end ms (global), or, with ``per_layer``, split evenly over the layers.
    params: encoder parameters of heads and FFN units kept (the fixed parts of layers are not counted), in the
        same grouping.
    caps: per structure, the most units kept: an int for the whole model or a list with one per layer.
    """

    latency_ms: float | None = None
    params: float | None = None
    per_layer: bool = False
    caps: dict | None = None


class _State:
    def __init__(self, table, importance, available, sizes_params, ffn_on_grid: bool, kv_maps=None,
                 multiple_of: int = 1):
        self.table = table
        self.L = table.num_layers
        self.order, self.imp, self.kept = {}, {}, {}
        for s in STRUCTURES:
            self.order[s], self.imp[s], self.kept[s] = [], [], []
            for scores, avail in zip(importance[s], available[s]):
                scores = scores.detach().double().cpu().flatten()
                idx = torch.nonzero(avail.cpu().flatten(), as_tuple=False).flatten()
                srt = idx[torch.sort(scores[idx], stable=True).indices]   # ascending importance
                self.order[s].append(srt.tolist())
                self.imp[s].append(scores[srt].tolist())
                self.kept[s].append(len(srt))
        # kept counts a plan may use: every head count; FFN counts on the table's grid (where it was timed:
        # between grid points, and most of all between 0 and the first one, real GEMMs cost more than a line
        # predicts), plus what is available when that is not on the grid
        grid = list(table.ffn_grid) if ffn_on_grid else list(range(table.intermediate + 1))
        self.allowed = {"heads": [list(range(n + 1)) for n in self.kept["heads"]],
                        "ffn": [sorted({g for g in grid if g <= n} | {n}) for n in self.kept["ffn"]]}
        if multiple_of > 1:  # aligned widths only: start from the largest one available, even within the budget
            self.allowed["ffn"] = [sorted({k for k in a if k % multiple_of == 0} | {n - n % multiple_of})
                                   for a, n in zip(self.allowed["ffn"], self.kept["ffn"])]
            self.kept["ffn"] = [a[-1] for a in self.allowed["ffn"]]
        self.unit = sizes_params
        self.kv_latency = kv_maps is not None and getattr(table, "num_kv_heads", None) is not None
        if self.kv_latency:  # a decoder's table: heads go along each layer's path, KV groups whole when cheaper
            from structprune.strategies.kv_plan import kv_removal_path

            for l, m in enumerate(kv_maps):
                order, steps = kv_removal_path(self.order["heads"][l], self.imp["heads"][l], m.tolist(),
                                               lambda h, g: table.attention(h, None, g))
                scores = importance["heads"][l].detach().double().cpu().flatten()
                self.order["heads"][l], self.imp["heads"][l] = order, scores[order].tolist()
                self.allowed["heads"][l] = steps
        self.kv = None  # grouped-query attention: per layer, the KV heads the top-k heads read, for every k
        if kv_maps is not None:
            self.kv = [[0] + [len({int(m[h]) for h in order[len(order) - k:]}) for k in range(1, len(order) + 1)]
                       for order, m in zip(self.order["heads"], kv_maps)]
        self.lat = [self.layer_lat(l) for l in range(self.L)]

    def cost(self, s, l, k) -> float:
        """Parameters of ``k`` kept units of structure ``s`` in layer ``l`` (the top-``k`` by importance): a query
        head's share, plus for decoders the KV heads those heads read."""
        extra = self.kv[l][k] * self.unit["kv_heads"] if s == "heads" and self.kv is not None else 0
        return k * self.unit[s] + extra

    def layer_lat(self, l, s=None, k=None) -> float:
        h = k if s == "heads" else self.kept["heads"][l]
        u = k if s == "ffn" else self.kept["ffn"][l]
        if self.kv_latency:
            return float(self.table.layer_ms(h, u, kv_heads=self.kv[l][h]))
        return float(self.table.layer_ms(h, u))

    def removed_importance(self, s, l, k_from, k_to) -> float:
        n = len(self.order[s][l])
        return sum(self.imp[s][l][n - k_from:n - k_to])

    def params(self, l) -> float:
        return sum(self.cost(s, l, self.kept[s][l]) for s in STRUCTURES)

    def below(self, s, l, k) -> int | None:
        """The next allowed count below ``k`` (None at 0)."""
        i = bisect.bisect_left(self.allowed[s][l], k)
        return self.allowed[s][l][i - 1] if i > 0 else None

    def above(self, s, l, k) -> int | None:
        i = bisect.bisect_right(self.allowed[s][l], k)
        return self.allowed[s][l][i] if i < len(self.allowed[s][l]) else None

    def set(self, s, l, k) -> None:
        self.kept[s][l] = k
        self.lat[l] = self.layer_lat(l)


def _groups(L: int, per_layer: bool) -> list[list[int]]:
    return [[l] for l in range(L)] if per_layer else [list(range(L))]


def plan_masks(table: LatencyTable, importance: dict[str, Sequence[torch.Tensor]],
               available: dict[str, Sequence[torch.Tensor]], budget: Budget, hidden: int, head_dim: int,
               ffn_on_grid: bool = True, unit: dict | None = None,
               kv_maps: Sequence[torch.Tensor] | None = None, multiple_of: int = 1) -> dict[str, list[torch.Tensor]]:
    """Per-layer bool keep masks meeting ``budget`` (see the module docstring); units not ``available``
    (already pruned) stay pruned. With ``ffn_on_grid`` FFN counts are limited to the table's grid points (where
    the cost was measured, not interpolated). ``unit``: the parameters per unit (default :func:`unit_params`);
    ``kv_maps`` (decoders: each layer's head -> KV-head map) counts the KV heads the kept heads read, at
    ``unit["kv_heads"]`` each; ``multiple_of``: every layer's FFN count a multiple of it (the largest such count
    available is where the plan starts). Raises ValueError when no choice meets it."""
    st = _State(table, importance, available, unit or unit_params(hidden, head_dim), ffn_on_grid, kv_maps,
                multiple_of)
    groups = _groups(st.L, budget.per_layer)
    eps = 1e-9
    lat_budget = None
    if budget.latency_ms is not None:
        floor = table.empty_ms
        if budget.latency_ms < floor * (1 - eps):
            raise ValueError(f"a predicted latency of {budget.latency_ms:.3f} ms is out of reach: removing every head "
                             f"and FFN unit gives {floor:.3f} ms ({table.dense_ms / floor:.2f}x) at {table.describe()}")
        room = budget.latency_ms - table.empty_ms
        lat_budget = [room * len(g) / st.L for g in groups]
    par_budget = None
    if budget.params is not None:
        par_budget = [budget.params * len(g) / st.L for g in groups] if budget.per_layer else [budget.params]
    caps = {s: c for s, c in (budget.caps or {}).items() if c is not None}

    def group_lat(g):
        return sum(st.lat[l] for l in groups[g])

    def group_params(g):
        return sum(st.params(l) for l in groups[g])

    def over(values_fn, limits):
        return [g for g in range(len(groups)) if limits is not None and values_fn(g) > limits[g] * (1 + eps) + eps]

    # 1. latency: remove the least importance per millisecond saved
    def removal(s, l):
        """(importance lost per ms saved, new count) of the cheapest step down in (s, l), or None."""
        k, now = st.kept[s][l], st.lat[l]
        k2 = st.below(s, l, k)
        while k2 is not None and st.layer_lat(l, s, k2) >= now - 1e-12:
            k2 = st.below(s, l, k2)
        if k2 is None:
            return None
        return st.removed_importance(s, l, k, k2) / (now - st.layer_lat(l, s, k2)), k2

    if lat_budget is not None:
        moves = {(s, l): removal(s, l) for s in STRUCTURES for l in range(st.L)}
        while bad := over(group_lat, lat_budget):
            options = [(m[0], s, l, m[1]) for g in bad for l in groups[g] for s in STRUCTURES
                       if (m := moves[(s, l)]) is not None]
            if not options:
                raise ValueError("the latency budget cannot be met by removing the heads and FFN units still "
                                 f"present (at {table.describe()})")
            _, s, l, k2 = min(options)
            st.set(s, l, k2)
            for s in STRUCTURES:
                moves[(s, l)] = removal(s, l)

    # 2. parameters: the least importance per parameter
    while par_budget is not None and (bad := over(group_params, par_budget)):
        best = None
        for g in bad:
            for l in groups[g]:
                for s in STRUCTURES:
                    k = st.kept[s][l]
                    k2 = st.below(s, l, k)
                    if k2 is None:
                        continue
                    score = st.removed_importance(s, l, k, k2) / (st.cost(s, l, k) - st.cost(s, l, k2))
                    if best is None or score < best[0]:
                        best = (score, s, l, k2)
        if best is None:
            raise ValueError("the parameter budget cannot be met by removing the heads and FFN units still present")
        st.set(best[1], best[2], best[3])

    # 3. count caps: the least important unit of the structure
    def cap_groups(s):
        cap = caps[s]
        return ([(list(range(st.L)), cap)] if isinstance(cap, int) else [([l], c) for l, c in enumerate(cap)])

    for s in caps:
        for layers, cap in cap_groups(s):
            while sum(st.kept[s][l] for l in layers) > cap:
                l = min((l for l in layers if st.kept[s][l] > 0),
                        key=lambda l: st.removed_importance(s, l, st.kept[s][l], st.below(s, l, st.kept[s][l]))
                        / (st.kept[s][l] - st.below(s, l, st.kept[s][l])))
                st.set(s, l, st.below(s, l, st.kept[s][l]))

    # 4. add back what still fits, most importance per millisecond first
    group_of = {l: g for g, ls in enumerate(groups) for l in ls}

    def fits(s, l, added, new_lat) -> bool:
        g = group_of[l]
        if lat_budget is not None:
            if group_lat(g) - st.lat[l] + new_lat > lat_budget[g] * (1 + eps) + eps:
                return False
        more = st.cost(s, l, st.kept[s][l] + added) - st.cost(s, l, st.kept[s][l])
        if par_budget is not None and group_params(g) + more > par_budget[g] * (1 + eps) + eps:
            return False
        if s in caps:
            for layers, cap in cap_groups(s):
                if l in layers and sum(st.kept[s][i] for i in layers) + added > cap:
                    return False
        return True

    def addition(s, l):
        """(importance gained per ms added, importance, new count) of adding back one unit in (s, l), or None."""
        k = st.kept[s][l]
        k2 = st.above(s, l, k)
        if k2 is None:
            return None
        new_lat = st.layer_lat(l, s, k2)
        if not fits(s, l, k2 - k, new_lat):
            return None
        gained = st.removed_importance(s, l, k2, k)
        cost = new_lat - st.lat[l]
        return (gained / cost if cost > 1e-12 else float("inf")), gained, k2

    while True:
        options = [(m[0], m[1], s, l, m[2]) for l in range(st.L) for s in STRUCTURES
                   if (m := addition(s, l)) is not None]
        if not options:
            break
        _, _, s, l, k = max(options)
        st.set(s, l, k)

    out = {}
    for s in STRUCTURES:
        out[s] = []
        for l, avail in enumerate(available[s]):
            mask = torch.zeros(avail.numel(), dtype=torch.bool)
            keep = st.order[s][l][len(st.order[s][l]) - st.kept[s][l]:]
            mask[keep] = True
            out[s].append(mask)
    return out


def table_for(model, target) -> LatencyTable:
    """The cost table a speed ``target`` refers to: ``target.table`` (checked against the model's shape), else
    the cached or freshly measured table at ``target.at`` (:func:`~structprune.latency.get_table`)."""
    from structprune.latency.cost_model import get_table, model_key

    if target.table is not None:
        mine, theirs = model_key(model), target.table.key.model
        shape = ("hidden", "heads", "intermediate", "layers") + (("kv_heads",) if "kv_heads" in mine else ())
        if any(mine[k] != theirs.get(k) for k in shape):
            raise ValueError(f"the latency table was measured for {({k: theirs.get(k) for k in shape})}, but the "
                             f"model has {({k: mine[k] for k in shape})}")
        return target.table
    return get_table(model, *target.at, backend=target.backend, dtype=target.dtype)


def budget_of(model, target, table: LatencyTable | None) -> Budget:
    """The :class:`Budget` of a budget ``target`` for ``model``: ms from the speed-up, parameters from the
    fraction, caps from ``heads``/``ffn`` (original sizes)."""
    from structprune.model.masks import gate_sizes
    from structprune.model.patching import layer_parts

    sizes = gate_sizes(model)
    unit = model_unit_params(model)
    latency = None
    if target.speedup is not None:
        latency = table.dense_ms / float(target.speedup)
    elif target.latency_ms is not None:
        latency = float(target.latency_ms)
    if latency is not None:
        latency = _check_reachable(model, target, table, latency)
    params = None
    if target.params is not None:
        kv = sum(p.num_kv_heads for p in layer_parts(model)) * unit["kv_heads"] if "kv_heads" in unit else 0
        params = float(target.params) * (sum(sum(sizes[s]) * unit[s] for s in STRUCTURES) + kv)
    caps = {s: target.counts(s, sizes[s]) for s in STRUCTURES}
    return Budget(latency_ms=latency, params=params, per_layer=target.per_layer, caps=caps)


def _check_reachable(model, target, table, latency: float) -> float:
    """``latency`` when some model the gates can make meets it; else a ValueError (removing every head and FFN unit,
    or, with sublayer and hidden-dimension gates, skipping every sublayer at the narrowest width the table timed,
    is still slower). On a view (the width and sublayers already decided: the end of L0 training) a warning
    instead, and the latency of removing every head and unit left, which the plan then goes to."""
    from structprune.latency.view import TableView
    from structprune.strategies.l0_full import ExtraGates

    floor, what = table.empty_ms, "removing every head and FFN unit"
    if not isinstance(table, TableView) and ExtraGates(model).present and getattr(table, "measures_skipping", False):
        floor, what = table.dense_ms / table.max_speedup, "skipping every sublayer at the narrowest width timed"
    if latency >= floor * (1 - 1e-9):
        return latency
    asked = f"speed-up {target.speedup:g}x" if target.speedup is not None else f"latency of {latency:.3f} ms"
    message = (f"a {asked} is out of reach: {what} gives {floor:.3f} ms ({table.dense_ms / floor:.2f}x) at "
               f"{table.describe()}")
    if isinstance(table, TableView):
        warnings.warn(message + "; every head and FFN unit left is removed", stacklevel=3)
        return floor
    raise ValueError(message)


def budget_masks(model, target, scores: dict, start: dict, ffn_on_grid: bool = True,
                 table=None) -> dict[str, list[torch.Tensor]]:
    """Per-layer keep masks meeting a budget ``target`` with importance ``scores``, from the ``start`` masks;
    FFN counts on the latency table's grid unless ``ffn_on_grid=False`` (then any count, its cost interpolated).
    ``table``: plan on this table (or a view of one) instead of the target's."""
    c = sizes_of(model)
    if table is None:
        table = table_for(model, target) if target.has_latency else None
    budget = budget_of(model, target, table)
    on_grid = table is not None and ffn_on_grid
    if table is None:  # a parameter budget only: a flat table makes the plan ignore latency, any count allowed
        table = _flat_table(model)
    unit = model_unit_params(model)
    maps = None
    if "kv_heads" in unit:
        from structprune.strategies.groups import kv_maps

        maps = kv_maps(model)
    return plan_masks(table, scores, start, budget, c.hidden, c.head_dim, ffn_on_grid=on_grid, unit=unit,
                      kv_maps=maps, multiple_of=getattr(target, "multiple_of", 1))


def _flat_table(model) -> LatencyTable:
    from structprune.latency.cost_model import model_key
    from structprune.latency.table import TableKey

    key = {k: v for k, v in model_key(model).items() if k not in ("kv_heads", "prefill")}  # no KV-head curve
    return LatencyTable(TableKey(model=key, backend="none", dtype="fp32", batch=1, seq_len=1, threads=1, machine={}),
                        attention_ms=[0.0] * (key["heads"] + 1), ffn_grid=[0, key["intermediate"]], ffn_ms=[0.0, 0.0],
                        empty_ms=1.0, dense_measured_ms=1.0)
