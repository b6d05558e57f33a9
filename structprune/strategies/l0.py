"""L0 pruning: train the hard-concrete gates (Louizos et al. 2018) toward a size target under a Lagrangian
constraint, as in CoFi pruning (Xia, Zhong & Chen 2022), then make an exact, deterministic decision.

Usage (plain PyTorch)::

    ctl = L0Controller(model, PruneTarget(heads=0.5, ffn=0.3), warmup_steps=1000)
    opt = torch.optim.AdamW(ctl.param_groups(model, lr=3e-5, gate_lr=0.01, lambda_lr=0.01))
    for step, batch in enumerate(loader):
        loss = model(**batch).loss + ctl.penalty(step)
        loss.backward(); opt.step(); opt.zero_grad()
    masks = ctl.finalize()          # exact counts, masks set, sampling off, fractional gates folded

The constraint, for each structure s (heads, FFN units) and each group g (the whole model, or each layer
when the target is per layer), works on fractions of the group's original size N::

    e = E[kept] / N   (sum of the gates' expected L0),   tau = t(step) / N
    penalty = lambda1 * (e - tau) + lambda2 * (e - tau) ** 2

CoFi writes the same constraint on expected sparsity (a fraction), which keeps the penalty on the scale of
the task loss whatever the model size. ``t(step)`` goes linearly from the size still present at the start
to the final target over ``warmup_steps``. The lambdas are learnt by gradient ASCENT: :meth:`penalty` passes
them through a gradient-reversal, so an ordinary minimising optimizer (any of them, with a positive lr) pushes
each lambda in the direction that increases the penalty, while the model and ``log_alpha`` see the penalty
unchanged. This is CoFi's "negative learning rate" without needing an optimizer that accepts one.

With a budget target (``PruneTarget(speedup=2.0, at=(8, 128))``, ``latency_ms``, ``params``) the constraint is on
the expected LATENCY instead: the expected kept counts of every layer go through the cost table
(:class:`structprune.latency.LatencyTable`, piecewise linear, so differentiable), ``e`` and ``tau`` are in ms over the
dense model's ms, and ``t(step)`` goes from the present prediction to the budget; a ``params`` budget adds a
constraint on the expected parameters. Heads and FFN units are gated together, and :meth:`L0Controller.finalize`
plans exact counts meeting the budget with each gate's probability of being non-zero as its importance.

``PruneTarget(kv_heads=...)`` (decoders) constrains the expected KV heads kept, ``sum_g 1 - prod_{h in g} (1 - p_h)``
(``p_h``: a query head's probability of being non-zero); groups are decided by the sum of their heads' ``p_h``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from structprune.atomic import set_default_mode
from structprune.model.families import sizes_of
from structprune.model.gates import expected_l0
from structprune.model.masks import Masks, gate_sizes
from structprune.model.patching import gate_parameters, gated_layers
from structprune.strategies.l0_decision import finalize_l0, fold_gates
from structprune.strategies.l0_full import ExtraGates
from structprune.strategies.groups import expected_kv, kv_kept, kv_maps, kv_sizes
from structprune.strategies.param_groups import weight_param_groups
from structprune.strategies.targets import STRUCTURES, PruneTarget, as_target, layer_gates, structure_counts

DEFAULT_INIT_LOG_ALPHA = 2.5
LAGRANGIAN_FILE = "structprune_lagrangian.safetensors"


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Lagrangian(nn.Module):
    """The multipliers: ``lambda1``/``lambda2`` per structure, one entry per constraint group."""

    def __init__(self, groups: dict[str, int], init: float = 0.0):
        super().__init__()
        self.groups = dict(groups)
        for s, g in self.groups.items():
            self.register_parameter(f"{s}_lambda1", nn.Parameter(torch.full((g,), float(init))))
            self.register_parameter(f"{s}_lambda2", nn.Parameter(torch.full((g,), float(init))))

    def lambdas(self, structure: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"{structure}_lambda1"), getattr(self, f"{structure}_lambda2")


class L0Controller:
    """Hard-concrete training of the gates of a patched ``model`` toward ``target`` (fractions KEPT).

    Args:
        model: a patched model (``sp.patch``); its current masks are respected (pruned stays pruned).
        target: a :class:`PruneTarget`. Per-layer targets get one constraint (and lambda pair) per layer;
            global ones a single constraint per structure. A structure whose target is None is not gated.
        warmup_steps: steps over which the target goes linearly from the present size to ``target``.
        init_log_alpha: initial ``log_alpha`` of the unmasked gates (None: leave them). The default 2.5
            keeps the deterministic gate at exactly 1 (it is clamped for log_alpha >= 2.4), so at eval the
            model starts as the fine-tuned model it was, while in training ~29% of the samples fall in the gate's linear,
            gradient-carrying region and E[L0] = 0.98. (CoFi's 0.0, i.e. droprate 0.5, would halve every
            gate at the start.)
        init_noise: std of Gaussian noise added to ``init_log_alpha`` (seeded with ``seed``, identical on
            every rank) to break ties, as CoFi does.
        lambda_init: initial value of every lambda.
    """

    def __init__(self, model: nn.Module, target: PruneTarget, warmup_steps: int = 0,
                 init_log_alpha: float | None = DEFAULT_INIT_LOG_ALPHA, init_noise: float = 0.01,
                 lambda_init: float = 0.0, seed: int = 0):
        gated_layers(model)
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.model = model
        self.target = as_target(target)
        self.warmup_steps = int(warmup_steps)
        self.finalized = False
        self.frozen: set[tuple[str, int]] = set()  # (constraint, group) whose gates reached the target
        self.last_step = 0
        sizes = gate_sizes(model)
        self.table = None
        self.extra = ExtraGates(model)  # sublayer and hidden-dimension gates, when the model has them
        if self.extra.present and self.target.per_layer:
            raise ValueError("a per-layer target cannot constrain whole-sublayer or hidden-dimension gates; give a "
                             "global target")
        # per constraint: list of groups, each a list of layer indices; original size; start and final values
        self._groups, self._size, self._start, self._final = {}, {}, {}, {}
        counts = {} if self.target.has_budget else structure_counts(self.target, model)
        if self.target.has_budget:
            self.structures = self._budget_constraints(model)
            gated = list(STRUCTURES)
        else:
            self.structures = [s for s in (*STRUCTURES, "kv_heads") if counts.get(s) is not None]
            gated = sorted({"heads" if s == "kv_heads" else s for s in self.structures})
        if "kv_heads" in self.structures:
            if self.extra.present:
                raise ValueError("a kv_heads target cannot be trained with sublayer or hidden-dimension gates")
            self._kv = (kv_maps(model), kv_sizes(model))
            sizes["kv_heads"] = self._kv[1]
        for s in self.structures if counts else []:
            count = counts[s]
            layers = len(sizes[s])
            groups = [[i] for i in range(layers)] if isinstance(count, list) else [list(range(layers))]
            finals = count if isinstance(count, list) else [count]
            if s == "kv_heads":
                now = [int(k.sum()) for k in kv_kept([g.mask != 0 for g in layer_gates(model, "heads")], *self._kv)]
            else:
                now = [int((g.mask != 0).sum()) for g in layer_gates(model, s)]
            self._groups[s] = groups
            self._size[s] = torch.tensor([float(sum(sizes[s][i] for i in g)) for g in groups])
            self._start[s] = torch.tensor([float(sum(now[i] for i in g)) for g in groups])
            self._final[s] = torch.tensor([float(c) for c in finals])
            bad = self._final[s] > self._start[s]
            if bool(bad.any()):
                raise ValueError(f"target keeps more {s} than are still unpruned "
                                 f"({self._final[s].tolist()} > {self._start[s].tolist()})")
        device = next(model.parameters()).device
        self.lagrangian = Lagrangian({s: len(self._groups[s]) for s in self.structures}, lambda_init).to(device)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for gate in [g for s in gated for g in layer_gates(model, s)] + self.extra.gates:
                if init_log_alpha is not None:
                    noise = torch.randn(gate.n, generator=gen) * init_noise
                    value = (init_log_alpha + noise).to(gate.log_alpha)
                    gate.log_alpha.copy_(torch.where(gate.mask != 0, value, gate.log_alpha))
                gate.sampling = True

    def _budget_constraints(self, model: nn.Module) -> list[str]:
        """Set up the "latency" (expected ms through the cost table) and "params" constraints of a budget target;
        one group for the model or, per layer, one per layer. Returns the constraint names."""
        from structprune.strategies.plan import budget_of, model_unit_params, table_for

        t = self.target
        self.table = table_for(model, t) if t.has_latency else None
        budget = budget_of(model, t, self.table)
        layers = len(layer_gates(model, "heads"))
        groups = [[i] for i in range(layers)] if t.per_layer else [list(range(layers))]
        kept = {s: torch.tensor([float((g.mask != 0).sum()) for g in layer_gates(model, s)]) for s in STRUCTURES}
        full = {s: torch.tensor([float(g.n) for g in layer_gates(model, s)]) for s in STRUCTURES}
        kept.update(self.extra.kept())
        full.update(self.extra.full())
        self._unit = model_unit_params(model)
        if "kv_heads" in self._unit:  # decoders: the KV heads the kept query heads read cost parameters too
            self._kv = (kv_maps(model), kv_sizes(model))
            heads = [g.mask != 0 for g in layer_gates(model, "heads")]
            kept["kv_heads"] = torch.tensor([float(k.sum()) for k in kv_kept(heads, *self._kv)])
            full["kv_heads"] = torch.tensor([float(n) for n in self._kv[1]])
        names = []
        if self.table is not None:
            names.append("latency")
            self._groups["latency"] = groups
            self._size["latency"] = self._cost("latency", full)
            self._start["latency"] = self._cost("latency", kept)
            if t.per_layer:  # every layer gets the same share of what the budget leaves over the emptied model
                final = torch.full((len(groups),), (budget.latency_ms - self.table.empty_ms) / layers)
            else:
                final = torch.tensor([float(budget.latency_ms)])
            self._final["latency"] = torch.minimum(final, self._start["latency"])
        if budget.params is not None:
            names.append("params")
            self._groups["params"] = groups
            self._size["params"] = self._cost("params", full)
            self._start["params"] = self._cost("params", kept)
            final = torch.full((len(groups),), budget.params / len(groups))
            self._final["params"] = torch.minimum(final, self._start["params"])
        return names

    def _cost(self, name: str, counts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-group latency (ms: the whole model for one group, a layer's added ms per layer) or parameters of
        per-layer ``counts`` (tensors ``[L]``, differentiable)."""
        groups = self._groups[name]
        extra = {k: counts[k] for k in ("hidden", "attn_kept", "ffn_kept") if k in counts}
        if name == "latency" and "hidden" in extra and getattr(self.table, "hidden_grid", None):
            # below the narrowest width timed the table cannot tell: the constraint pushes the other gates instead
            extra["hidden"] = extra["hidden"].clamp(min=float(self.table.hidden_grid[0]))
        if name == "latency":
            if getattr(self.table, "num_kv_heads", None) is not None:  # decoders: the expected KV heads kept
                extra["kv_heads"] = counts["kv_heads"]
            if not self.target.per_layer:
                return torch.stack([self.table.predict(counts["heads"], counts["ffn"], **extra)]).float()
            kv = extra.get("kv_heads")
            return torch.stack([self.table.layer_ms(counts["heads"][g[0]], counts["ffn"][g[0]],
                                                    kv_heads=None if kv is None else kv[g[0]]) for g in groups]).float()
        unit = self._unit
        if "hidden" in extra:  # a head and a unit carry fewer parameters in a narrower model
            c = sizes_of(self.model)
            unit = {"heads": 4 * extra["hidden"] * c.head_dim + 3 * c.head_dim, "ffn": 2 * extra["hidden"] + 1}
        heads = self.extra.scale_counts("heads", counts["heads"], extra)
        ffn = self.extra.scale_counts("ffn", counts["ffn"], extra)
        per_layer = heads * unit["heads"] + ffn * unit["ffn"]
        if "kv_heads" in counts:
            per_layer = per_layer + counts["kv_heads"] * unit["kv_heads"]
        return torch.stack([per_layer[g].sum() for g in groups]).float()

    # ---- the constraint -------------------------------------------------------------------------
    def expected(self, structure: str) -> torch.Tensor:
        """Expected value per constraint group (differentiable), shape ``[groups]``: kept units for "heads" /
        "ffn"; for a budget target, ms through the cost table ("latency") or parameters ("params") of the
        expected kept counts."""
        if structure in ("latency", "params"):
            counts = {s: torch.stack([g.expected_l0() for g in layer_gates(self.model, s)]) for s in STRUCTURES}
            if "kv_heads" in self._unit:
                counts["kv_heads"] = self._expected_kv()
            counts.update(self.extra.expected())
            return self._cost(structure, counts)
        if structure == "kv_heads":  # a KV head is kept while one of its query heads is
            per_layer = self._expected_kv()
            return torch.stack([per_layer[g].sum() for g in self._groups[structure]])
        gates = layer_gates(self.model, structure)
        per_layer = self.extra.scale_counts(structure, torch.stack([g.expected_l0() for g in gates]),
                                            self.extra.expected())
        return torch.stack([per_layer[g].sum() for g in self._groups[structure]])

    def _expected_kv(self) -> torch.Tensor:
        """Per layer, the expected KV heads kept (:func:`~structprune.strategies.groups.expected_kv`)."""
        return torch.stack([expected_kv(expected_l0(g.log_alpha, g.beta) * g.mask, m, n) for g, m, n in
                            zip(layer_gates(self.model, "heads"), *self._kv)])

    def target_counts(self, structure: str, step: int) -> torch.Tensor:
        """``t(step)`` per constraint group: linear from the start size to the final target."""
        frac = 1.0 if self.warmup_steps == 0 else min(1.0, max(0, step) / self.warmup_steps)
        return self._start[structure] + (self._final[structure] - self._start[structure]) * frac

    def penalty(self, step: int) -> torch.Tensor:
        """The Lagrangian term to add to the loss at optimizer step ``step`` (0 after :meth:`finalize`)."""
        self.last_step = int(step)
        device = next(self.model.parameters()).device  # computed where the gates are
        total = torch.zeros((), device=device)
        if self.finalized:
            return total
        for s in self.structures:
            size = self._size[s].to(device)  # the penalty works on fractions of the dense size
            gap = (self.expected(s) - self.target_counts(s, step).to(device)) / size
            l1, l2 = (_GradReverse.apply(lam).to(device) for lam in self.lagrangian.lambdas(s))
            total = total + (l1 * gap + l2 * gap * gap).sum()
        return total

    @torch.no_grad()
    def reached_target(self, step: int, tolerance: float = 0.005) -> bool:
        """Freeze the gates of every constraint group whose expected value has come down to its final target (plus
        ``tolerance`` of the group's dense size) after the warm-up; True once every group is frozen: the moment to
        decide. Training on past it overshoots: the multipliers, wound up while the gates lagged the target, keep
        pushing, and the heads and the FFN units seldom arrive together. Frozen gates keep sampling but get no
        gradient (their ``log_alpha`` stops). The frozen set is not saved: after resuming, one call on the resumed
        gates finds it again (a frozen group's expected value no longer moves); ``train_qa``'s ``stop_fn`` does this."""
        if self.finalized or step < self.warmup_steps:
            return False
        for s in self.structures:
            over = (self.expected(s).cpu() - self._final[s]) / self._size[s]
            for g, group in enumerate(self._groups[s]):
                if (s, g) not in self.frozen and float(over[g]) <= tolerance:
                    self.frozen.add((s, g))
                    self._freeze(s, group)
        return all((s, g) in self.frozen for s in self.structures for g in range(len(self._groups[s])))

    def _freeze(self, structure: str, layers: list[int]) -> None:
        gated = (STRUCTURES if structure in ("latency", "params")
                 else ["heads" if structure == "kv_heads" else structure])
        for s in gated:
            gates = layer_gates(self.model, s)
            for i in layers:
                gates[i].log_alpha.requires_grad_(False)
                gates[i].log_alpha.grad = None
        for gate in self.extra.gates:  # global targets only: every constraint is frozen at once
            if structure in ("latency", "params") or len(self.structures) == len(self.frozen):
                gate.log_alpha.requires_grad_(False)
                gate.log_alpha.grad = None

    # ---- optimisation ---------------------------------------------------------------------------
    def lagrangian_parameters(self) -> list[nn.Parameter]:
        return list(self.lagrangian.parameters())

    def param_groups(self, model: nn.Module | None = None, lr: float = 3e-5, gate_lr: float = 0.01,
                     lambda_lr: float = 0.01, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups: weights (``lr``, decayed except biases/norms), gates' ``log_alpha`` (``gate_lr``,
        no decay) and lambdas (``lambda_lr``, no decay; ascent comes from the gradient reversal in
        :meth:`penalty`). Each group carries a ``"name"``. The 0.01 defaults are CoFi's ``reg_learning_rate``."""
        model = self.model if model is None else model
        gates = gate_parameters(self.model)
        groups = weight_param_groups(model, lr, weight_decay, exclude={id(p) for p in gates})
        groups.append({"params": gates, "lr": gate_lr, "weight_decay": 0.0, "name": "gates"})
        groups.append({"params": self.lagrangian_parameters(), "lr": lambda_lr, "weight_decay": 0.0,
                       "name": "lagrangian"})
        return groups

    # ---- logging --------------------------------------------------------------------------------
    @torch.no_grad()
    def stats(self, step: int | None = None) -> dict[str, float]:
        """Expected and actual (deterministic) kept counts, sparsities and lambdas, for logging."""
        step = self.last_step if step is None else step
        out: dict[str, float] = {}
        for s in STRUCTURES:
            gates = layer_gates(self.model, s)
            total = float(sum(g.n for g in gates))
            kept = float(sum(int((g.deterministic() != 0).sum()) for g in gates))
            out[f"kept_{s}"] = kept
            out[f"{s}_sparsity"] = 1.0 - kept / total if total else 0.0
            if s in self.structures and not self.finalized and not self.target.has_budget:
                expected = float(self.expected(s).sum())
                out[f"expected_{s}"] = expected
                out[f"expected_{s}_sparsity"] = 1.0 - expected / total if total else 0.0
                out[f"target_{s}"] = float(self.target_counts(s, step).sum())
                l1, l2 = self.lagrangian.lambdas(s)
                out[f"lambda1_{s}"] = float(l1.mean())
                out[f"lambda2_{s}"] = float(l2.mean())
        if "kv_heads" in self.structures and not self.finalized:
            out["expected_kv_heads"] = float(self.expected("kv_heads").sum())
            out["target_kv_heads"] = float(self.target_counts("kv_heads", step).sum())
            l1, l2 = self.lagrangian.lambdas("kv_heads")
            out["lambda1_kv_heads"], out["lambda2_kv_heads"] = float(l1.mean()), float(l2.mean())
        for name in (self.structures if self.target.has_budget and not self.finalized else []):
            unit = "ms" if name == "latency" else "params"
            out[f"expected_{name}_{unit}"] = float(self.expected(name).sum())
            out[f"target_{name}_{unit}"] = float(self.target_counts(name, step).sum())
            l1, l2 = self.lagrangian.lambdas(name)
            out[f"lambda1_{name}"] = float(l1.mean())
            out[f"lambda2_{name}"] = float(l2.mean())
        for key, value in self.extra.expected().items():
            out[f"expected_{key}"] = float(value.sum())
        for key, value in self.extra.values(lambda g: (g.deterministic() != 0).float()).items():
            out[f"kept_{key}"] = float(value.sum())
        if self.frozen:
            out["frozen_groups"] = float(len(self.frozen))
        if self.table is not None:
            kept = {s: [int((g.deterministic() != 0).sum()) for g in layer_gates(self.model, s)] for s in STRUCTURES}
            full = {k: v.tolist() if v.dim() else float(v) for k, v in
                    self.extra.values(lambda g: (g.deterministic() != 0).float()).items()}
            if getattr(self.table, "num_kv_heads", None) is not None:
                on = [g.deterministic() != 0 for g in layer_gates(self.model, "heads")]
                full["kv_heads"] = [int(k.sum()) for k in kv_kept(on, *self._kv)]
            out["predicted_speedup"] = (self.table.speedup(kept["heads"], kept["ffn"], **full) if full
                                        else self.table.speedup(kept["heads"], kept["ffn"]))
        return out

    # ---- the decision ---------------------------------------------------------------------------
    def finalize(self, target: PruneTarget | None = None, fold: bool = True, keep_dead: bool = False) -> Masks:
        """Keep ``target`` (default: the controller's) by ``log_alpha``; see :func:`finalize_l0`."""
        masks = finalize_l0(self.model, self.target if target is None else target, fold=fold, keep_dead=keep_dead,
                            table=self.table)
        for s in STRUCTURES:  # frozen gates thaw: the decided model trains like any other
            for gate in layer_gates(self.model, s):
                gate.log_alpha.requires_grad_(True)
        for gate in self.extra.gates:
            gate.log_alpha.requires_grad_(True)
        self.frozen.clear()
        self.finalized = True
        return masks

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu().clone() for k, v in self.lagrangian.state_dict().items()}
        state["finalized"] = torch.tensor(int(self.finalized))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.finalized = bool(int(state.pop("finalized", torch.tensor(0))))
        self.lagrangian.load_state_dict(state)

    def save(self, path: str | Path) -> Path:
        """Write the lambdas to ``path`` (a directory gets :data:`LAGRANGIAN_FILE`)."""
        path = Path(path)
        if path.is_dir():
            path = path / LAGRANGIAN_FILE
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"structures": ",".join(self.structures), "warmup_steps": str(self.warmup_steps)})
        set_default_mode(path)  # safetensors writes 0600
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / LAGRANGIAN_FILE
        self.load_state_dict(load_file(str(path)))


__all__ = ["L0Controller", "Lagrangian", "finalize_l0", "fold_gates", "weight_param_groups", "LAGRANGIAN_FILE",
           "DEFAULT_INIT_LOG_ALPHA"]
