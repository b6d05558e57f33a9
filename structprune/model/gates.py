"""Hard-concrete gates (Louizos, Welling & Kingma, 2018) with a fixed 0/1 mask on top.

A gate vector of ``n`` entries has two pieces of state:

* ``log_alpha`` (a parameter): the location of the hard-concrete distribution of each gate;
* ``mask`` (a buffer of 0/1): a fixed pruning decision; a masked gate is exactly 0 whatever ``log_alpha`` says.

A third buffer, ``mask_index`` (int64, not saved), lists the entries whose mask is non-zero. It is refreshed outside
any ``torch.compile`` region whenever the mask changes through this class (:meth:`~HardConcreteGate.set_mask`,
:meth:`~HardConcreteGate.keep_only_`, ``load_state_dict``), so a compiled model reads an index whose size is known
when the graph is traced (no data-dependent ``nonzero`` in the graph); see :func:`structprune.model.modules.gate_values`.

In training with ``sampling`` on, ``forward`` draws ``z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta)
* (zeta - gamma) + gamma, 0, 1)``; otherwise it returns the deterministic gate
``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``. Both are multiplied by ``mask``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from structprune.ops import dispatch as ops
from structprune.ops.reference import BETA, GAMMA, ZETA

# sigmoid(OPEN_LOG_ALPHA) * (ZETA - GAMMA) + GAMMA > 1, so the deterministic gate starts at exactly 1.
OPEN_LOG_ALPHA = 3.0


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The eval-time gate value of each entry of ``log_alpha``."""
    return torch.clamp(torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Probability of each gate being non-zero: ``sigmoid(log_alpha - beta * log(-gamma / zeta))``."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


class HardConcreteGate(nn.Module):
    """``n`` hard-concrete gates plus a fixed 0/1 mask.

    Args:
        n: number of gates (heads of a layer, or FFN units of a layer).
        sampling: whether ``forward`` samples in training mode. Off, the gate is deterministic in
            both modes and acts as a fixed mask (the state right after :func:`structprune.patch`).
        init_log_alpha: initial location; the default opens every gate fully (deterministic gate = 1).
    """

    def __init__(self, n: int, sampling: bool = True, init_log_alpha: float = OPEN_LOG_ALPHA, beta: float = BETA):
        super().__init__()
        if n < 0:
            raise ValueError(f"HardConcreteGate needs n >= 0 gates, got {n}")
        self.n = n
        self.beta = beta
        self.sampling = sampling
        self.log_alpha = nn.Parameter(torch.full((n,), float(init_log_alpha)))
        self.register_buffer("mask", torch.ones(n))
        self.register_buffer("mask_index", torch.arange(n), persistent=False)
        self._index_cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"n={self.n}, sampling={self.sampling}, kept={int(self.mask.sum().item()) if self.n else 0}"

    @property
    def stochastic(self) -> bool:
        """True when ``forward`` draws a fresh sample (training mode with sampling on)."""
        return self.training and self.sampling

    def forward(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gate values, shape ``[n]``, fp32, on the device of ``log_alpha``. Deterministic values that need no
        gradient are cached until ``mask`` or ``log_alpha`` change (a decode step reads them once per layer)."""
        if self.stochastic:
            return ops.hard_concrete_sample(self.log_alpha, self.beta, generator) * self.mask
        la, mask = self.log_alpha, self.mask
        if (torch.is_grad_enabled() and la.requires_grad) or torch.compiler.is_compiling() or la.is_inference() \
                or mask.is_inference():
            return deterministic_gate(la) * mask
        key = self._state_key()
        cached = self.__dict__.get("_value_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_value_cache"] = (key, deterministic_gate(la) * mask)
        return cached[1]

    def _state_key(self) -> tuple:
        """What the cached gate values and kept index depend on: which ``log_alpha`` and ``mask`` tensors, their
        in-place versions and storage, and inference mode (a tensor made under it cannot be saved for backward,
        so such entries serve inference only)."""
        la, mask = self.log_alpha, self.mask
        return (id(la), la._version, la.data_ptr(), id(mask), mask._version, mask.data_ptr(),
                torch.is_inference_mode_enabled())

    def expected_l0(self) -> torch.Tensor:
        """Expected number of non-zero gates (differentiable), counting only unmasked entries."""
        return (expected_l0(self.log_alpha, self.beta) * self.mask).sum()

    def deterministic(self) -> torch.Tensor:
        return deterministic_gate(self.log_alpha) * self.mask

    def is_fully_open(self) -> bool:
        """True when the deterministic gate is exactly 1 everywhere (so gating is the identity at eval)."""
        return bool(torch.all(self.deterministic() == 1.0).item())

    def kept_index(self) -> torch.Tensor:
        """Indices of gates that are non-zero at eval, cached until ``mask`` or ``log_alpha`` change."""
        if torch.compiler.is_compiling() or self.mask.is_inference() or self.log_alpha.is_inference():
            # traced, or no version counter to key a cache on
            return torch.nonzero(self.deterministic() != 0, as_tuple=False).flatten()
        key = self._state_key()
        if self._index_cache is None or self._index_cache[0] != key:
            idx = torch.nonzero(self.deterministic() != 0, as_tuple=False).flatten()
            self._index_cache = (key, idx)
        return self._index_cache[1]

    @torch.no_grad()
    def refresh_mask_index(self) -> None:
        """Recompute ``mask_index`` from ``mask`` (done by every method here that changes the mask; call it after
        writing ``mask`` in place directly, before running a compiled model)."""
        self.mask_index = torch.nonzero(self.mask != 0, as_tuple=False).flatten()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.mask.device.type != "meta":
            self.refresh_mask_index()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask.copy_(mask.to(self.mask.dtype))
        self.refresh_mask_index()

    @torch.no_grad()
    def open_(self) -> None:
        """Reset ``log_alpha`` so that the deterministic gate is 1 everywhere (the mask stays)."""
        self.log_alpha.fill_(OPEN_LOG_ALPHA)

    @torch.no_grad()
    def keep_only_(self, index: torch.Tensor) -> None:
        """Shrink to the gates at ``index`` (used by physical compaction)."""
        self.log_alpha = nn.Parameter(self.log_alpha.detach()[index].clone(), requires_grad=self.log_alpha.requires_grad)
        self.mask = self.mask[index].clone()
        self.n = int(index.numel())
        self._index_cache = None
        self.__dict__.pop("_value_cache", None)
        self.refresh_mask_index()


class SharedGate(HardConcreteGate):
    """A gate vector read at several places of one forward pass with ONE sample (the hidden-dimension gate: the
    embeddings and every layer must drop the same dimensions).

    :meth:`draw` (called by the first reader of a forward pass) samples, or takes the deterministic values, and
    keeps them with their non-zero index; :meth:`current` returns what was drawn last. Outside training with
    sampling both are the deterministic values."""

    def __init__(self, n: int, sampling: bool = True, init_log_alpha: float = OPEN_LOG_ALPHA, beta: float = BETA):
        super().__init__(n, sampling=sampling, init_log_alpha=init_log_alpha, beta=beta)
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [n], indices of the non-zero values) for the forward pass that starts now."""
        if self.stochastic:
            values = self()
            self._drawn = (values, torch.nonzero(values.detach() != 0, as_tuple=False).flatten())
            return self._drawn
        self._drawn = None
        return self.deterministic(), self.kept_index()

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`draw` gave this forward pass (deterministic values when not sampling)."""
        if self.stochastic and self._drawn is not None:
            return self._drawn
        return self.deterministic(), self.kept_index()

    def is_identity(self) -> bool:
        """True when applying the gate changes nothing (every entry kept, deterministic value exactly 1, not
        sampling): readers may then skip it."""
        if self.stochastic:
            return False
        return int(self.kept_index().numel()) == self.n and self.is_fully_open()

    def keep_only_(self, index: torch.Tensor) -> None:
        super().keep_only_(index)
        self._drawn = None
