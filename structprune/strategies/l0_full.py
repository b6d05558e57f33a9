"""L0 over CoFi's structures beyond heads and FFN units: the whole-sublayer gates and the hidden-dimension gate of a
model patched with ``sublayers=True`` / ``hidden=True`` (:mod:`structprune.model.cofi`).

:class:`ExtraGates` gives the :class:`~structprune.strategies.l0.L0Controller` what it needs: the expected values
these gates contribute to the one Lagrangian (the probability each sublayer is kept, the expected hidden width),
which multiply into the expected kept heads / units, parameters and latency; and the deterministic decision at the
end (:meth:`ExtraGates.decide`), after which heads and FFN units are planned for the decided width and sublayers.
"""
from __future__ import annotations

import torch
from torch import nn

from structprune.model.cofi import hidden_gate, sublayer_gates
from structprune.model.gates import expected_l0


class ExtraGates:
    """The sublayer and hidden-dimension gates of a patched model (``present`` is False when it has none)."""

    def __init__(self, model: nn.Module):
        self.hidden = hidden_gate(model)
        attn, ffn = sublayer_gates(model, "attn_sublayers"), sublayer_gates(model, "ffn_sublayers")
        self.attn = attn if attn and all(g is not None for g in attn) else None
        self.ffn = ffn if ffn and all(g is not None for g in ffn) else None

    @property
    def present(self) -> bool:
        return self.hidden is not None or self.attn is not None

    @property
    def gates(self) -> list:
        out = list(self.attn or []) + list(self.ffn or [])
        return out + ([self.hidden] if self.hidden is not None else [])

    def values(self, fn) -> dict[str, torch.Tensor]:
        out = {}
        if self.hidden is not None:
            out["hidden"] = fn(self.hidden).sum()
        if self.attn is not None:
            out["attn_kept"] = torch.stack([fn(g).sum() for g in self.attn])
            out["ffn_kept"] = torch.stack([fn(g).sum() for g in self.ffn])
        return out

    def expected(self) -> dict[str, torch.Tensor]:
        """Differentiable: ``hidden`` (expected kept dimensions), ``attn_kept`` / ``ffn_kept`` ([L], the probability
        each sublayer is kept)."""
        return self.values(lambda g: g.expected_l0())

    def kept(self) -> dict[str, torch.Tensor]:
        """The same, from the masks (what is still unpruned)."""
        return self.values(lambda g: (g.mask != 0).float())

    def full(self) -> dict[str, torch.Tensor]:
        """The same for the unpruned model."""
        return self.values(lambda g: torch.ones_like(g.mask))

    def scale_counts(self, structure: str, per_layer: torch.Tensor, expected: dict) -> torch.Tensor:
        """Per-layer expected kept heads ("heads") or units ("ffn"), times the probability their sublayer is kept."""
        key = "attn_kept" if structure == "heads" else "ffn_kept"
        return per_layer * expected[key] if key in expected else per_layer

    @torch.no_grad()
    def decide(self, hidden_count: int | None = None, min_hidden: int = 0, multiple_of: int = 1) -> dict:
        """The deterministic decision, set as masks: a sublayer is kept when its gate's probability of being non-zero
        is at least 0.5 and its deterministic value is non-zero; ``hidden_count`` dimensions (default: the expected
        count, rounded) are kept, the highest ``log_alpha`` first, among the unmasked ones whose deterministic value
        is non-zero, at least ``min_hidden`` of them (the narrowest width a latency table timed); with ``multiple_of``
        the count is rounded to the nearest multiple of it (down when fewer are available). Returns
        ``{"hidden": int, "attn_kept": [bool], "ffn_kept": [bool]}`` (the keys present)."""
        out = {}
        for key, gates in (("attn_kept", self.attn), ("ffn_kept", self.ffn)):
            if gates is None:
                continue
            keep = []
            for g in gates:
                k = bool(g.mask.item() != 0 and float(expected_l0(g.log_alpha, g.beta)) >= 0.5
                         and float(g.deterministic()) != 0)
                g.set_mask(torch.full_like(g.mask, float(k)))
                keep.append(k)
            out[key] = keep
        if self.hidden is not None:
            g = self.hidden
            available = (g.mask != 0) & (g.deterministic() != 0)
            count = int(round(float(g.expected_l0()))) if hidden_count is None else int(hidden_count)
            low, high = int(min_hidden), int(available.sum())
            if multiple_of > 1:  # the nearest multiple, at least min_hidden, at most what is available
                m = multiple_of
                count, low, high = m * int(count / m + 0.5), -(-low // m) * m, high - high % m
            count = min(max(low, 0, count), high)
            score = torch.where(available, g.log_alpha.detach(), torch.full_like(g.log_alpha, -float("inf")))
            mask = torch.zeros_like(g.mask)
            mask[torch.topk(score, count).indices] = 1.0
            g.set_mask(mask)
            out["hidden"] = count
        return out

    @torch.no_grad()
    def tighten(self, decided: dict, table, latency_ms: float, min_hidden: int = 0, multiple_of: int = 1) -> dict:
        """Close more of the decision until removing every head and unit left could meet ``latency_ms`` on ``table``
        (the discrete decision may keep more than the expected values trained toward): each time, the kept sublayer
        or the step of hidden dimensions (1/16 of the width, rounded down to a multiple of ``multiple_of``, never below
        ``min_hidden``) least likely kept, by the gates' probability of being non-zero. Masks and ``decided`` are
        updated; returns ``decided``."""
        step = max(1, (self.hidden.n if self.hidden is not None else 0) // 16)
        step = multiple_of * max(1, step // multiple_of)
        while planning_table(table, decided).empty_ms > latency_ms * (1 + 1e-9):
            options = []
            for key, gates in (("attn_kept", self.attn), ("ffn_kept", self.ffn)):
                for i, g in enumerate(gates or []):
                    if decided[key][i]:
                        options.append((float(expected_l0(g.log_alpha, g.beta)), key, i))
            if self.hidden is not None and decided["hidden"] - step >= max(min_hidden, 1):
                kept = torch.nonzero(self.hidden.mask != 0).flatten()
                p = expected_l0(self.hidden.log_alpha, self.hidden.beta)[kept]
                options.append((float(torch.sort(p).values[:step].mean()), "hidden", step))
            if not options:
                break
            _, key, what = min(options)
            if key == "hidden":
                g = self.hidden
                kept = torch.nonzero(g.mask != 0).flatten()
                drop = kept[torch.argsort(g.log_alpha.detach()[kept])[:what]]
                mask = g.mask.clone()
                mask[drop] = 0.0
                g.set_mask(mask)
                decided["hidden"] -= what
            else:
                gates = self.attn if key == "attn_kept" else self.ffn
                gates[what].set_mask(torch.zeros_like(gates[what].mask))
                decided[key][what] = False
        return decided

    def sampling(self, on: bool) -> None:
        for g in self.gates:
            g.sampling = on


def planning_table(table, decided: dict):
    """The cost table as the head / unit planner must see it once the width and sublayers are decided."""
    if not decided:
        return table
    layers = table.num_layers
    return table.view(hidden=decided.get("hidden", table.key.model["hidden"]),
                      attn_kept=decided.get("attn_kept", [True] * layers),
                      ffn_kept=decided.get("ffn_kept", [True] * layers))


def without_skipped(start: dict[str, list[torch.Tensor]], decided: dict) -> dict[str, list[torch.Tensor]]:
    """``start`` masks with every head (unit) of a skipped attention (FFN) sublayer made unavailable."""
    out = {s: [m.clone() for m in masks] for s, masks in start.items()}
    for s, key in (("heads", "attn_kept"), ("ffn", "ffn_kept")):
        for i, kept in enumerate(decided.get(key, [])):
            if not kept:
                out[s][i].zero_()
    return out


__all__ = ["ExtraGates", "planning_table", "without_skipped"]
