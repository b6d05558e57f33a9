"""Gated attention and gated FFN pieces shared by every model family.

They hold the layer's full weights (the very ``nn.Linear`` modules of the Hugging Face layer, so parameter
names stay as HF writes them) plus a :class:`~structprune.model.gates.HardConcreteGate` per head / per FFN unit,
and compute through :mod:`structprune.ops.dispatch`, which picks the kernel backend. They know nothing about model
families: each family's adapter (:mod:`structprune.model.families`) builds them from its HF layers.
"""
from __future__ import annotations

import torch
from torch import nn

from structprune.model.gates import HardConcreteGate
from structprune.model.hidden import hidden_scale
from structprune.ops import dispatch as ops


def gate_values(gate: HardConcreteGate) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gate values [n], indices of the gates the kernels compute: every non-zero one); a fresh sample in training
    with sampling on.

    Under ``torch.compile`` the index is the gate's ``mask_index`` (the entries whose mask is non-zero, kept up to
    date outside the graph whenever the mask changes), never a ``nonzero`` of the values, whose size depends on
    the data and would break the graph: the compiled kernels also compute the unmasked gates whose value is 0 (a
    closed deterministic gate, or a sample at 0 in L0 training) and multiply them by 0, so the result is the same.
    With the reference backend no index is needed."""
    values = gate()
    if torch.compiler.is_compiling():
        return values, None if ops.resolve_backend(values.device) == "torch" else gate.mask_index
    if gate.stochastic:
        return values, torch.nonzero(values.detach() != 0, as_tuple=False).flatten()
    return values, gate.kept_index()


def sublayer_closed(gate: HardConcreteGate | None) -> bool:
    """Whether a whole-sublayer gate (one entry; None: no such gate) is closed at eval: the sublayer, its residual and
    its LayerNorm are skipped (compaction keeps it skipped, serving skips it too)."""
    return gate is not None and int(gate.kept_index().numel()) == 0


def sublayer_scale(gate: HardConcreteGate | None) -> tuple[torch.Tensor | None, bool]:
    """(what a sublayer's output is multiplied by, whether the sublayer is skipped) for a whole-sublayer gate (one
    entry; None: no such gate). A gate at exactly 0 skips the sublayer, its residual and its LayerNorm (CoFi): at
    eval when it is closed, in training with sampling when this forward pass's sample is 0."""
    if gate is None:
        return None, False
    if gate.stochastic:
        value = gate()
        return value, bool(value.detach().item() == 0)
    if sublayer_closed(gate):
        return None, True
    value = gate.deterministic()
    return (None if gate.is_fully_open() else value), False


def scale_sublayer_output(out: torch.Tensor, sublayer: torch.Tensor | None, hidden_gate) -> torch.Tensor:
    """A sublayer's output times its sublayer gate's value and the hidden gate's (each only where there is one), as
    it enters the residual add (CoFi; see :mod:`structprune.model.hidden`)."""
    if sublayer is not None:
        out = out * sublayer.to(out.dtype)
    hidden = hidden_scale(hidden_gate, out.dtype)
    return out * hidden if hidden is not None else out


def attend(hidden_states: torch.Tensor, query: nn.Linear, key: nn.Linear, value: nn.Linear, output: nn.Linear,
           head_gate: HardConcreteGate, num_heads: int, attention_mask, dropout_p: float, config) -> torch.Tensor:
    """Gated multi-head self-attention with its output projection (bias included, no residual), as one op;
    ``config._attn_implementation`` says whether an attention mask is HF's eager (additive) or SDPA kind."""
    gates, active = gate_values(head_gate)
    impl = "eager" if getattr(config, "_attn_implementation", "sdpa") == "eager" else "sdpa"
    return ops.gated_attention(
        hidden_states, query.weight, query.bias, key.weight, key.bias, value.weight, value.bias, output.weight,
        output.bias, gates, active, num_heads, attn_mask=attention_mask, dropout_p=dropout_p, impl=impl)


def stash_hf_module(gated: nn.Module, hf_module: nn.Module, detach: tuple[str, ...]) -> None:
    """Keep the HF module ``gated`` replaces (unregistered, so not in the state dict), without its submodules
    ``detach`` (the gated module holds those), for :func:`unstash_hf_module`."""
    for name in detach:
        setattr(hf_module, name, None)
    gated.__dict__["_structprune_hf_module"] = hf_module


def unstash_hf_module(gated: nn.Module, **modules: nn.Module) -> nn.Module:
    """The HF module ``gated`` replaced, holding ``modules`` (the current ones) again, in ``gated``'s mode."""
    hf_module = gated.__dict__.pop("_structprune_hf_module", None)
    if hf_module is None:
        raise RuntimeError(f"{type(gated).__name__} does not hold the Hugging Face module it replaced")
    for name, module in modules.items():
        setattr(hf_module, name, module)
    return hf_module.train(gated.training)


class GatedSelfAttention(nn.Module):
    """Q/K/V projections of one layer and one gate per head (HF's ``attention.self``)."""

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear, num_heads: int, head_dim: int,
                 sampling: bool = False):
        super().__init__()
        if query.out_features != num_heads * head_dim:
            raise ValueError(f"query projection has {query.out_features} outputs, expected "
                             f"num_heads * head_dim = {num_heads} * {head_dim}")
        self.query, self.key, self.value = query, key, value
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.head_gate = HardConcreteGate(num_heads, sampling=sampling)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"

    def attend(self, hidden_states: torch.Tensor, output: nn.Linear, attention_mask, dropout_p: float, config):
        """Gated attention through ``output`` (the layer's attention output projection): see :func:`attend`."""
        return attend(hidden_states, self.query, self.key, self.value, output, self.head_gate, self.num_heads,
                      attention_mask, dropout_p if self.training else 0.0, config)
