"""Hidden-dimension gates (CoFi, Xia, Zhong & Chen 2022): one gate per dimension of the hidden states, shared by the
embeddings and every layer, so that a pruned dimension is absent from the whole residual stream.

With gate values ``z`` ([d], kept where non-zero), a post-LayerNorm model computes

* embeddings: ``LN_k(z * (word + position + token_type)) * z``;
* every residual write: ``LN_k(z * sublayer(x) + x) * z`` (the caller scales the sublayer's output);

where ``LN_k`` is the LayerNorm over the kept dimensions only, with its weight and bias restricted to them; pruned
dimensions of its output are 0. Removing the pruned dimensions from every weight (:func:`slice_hidden`) therefore
computes exactly the kept dimensions of the masked model, which is what makes hidden-dimension pruning exact.

The gate lives on the embeddings module (``<embeddings>.hidden_gate``, saved with the model); each gated LayerNorm
holds an unregistered reference to it. In training with sampling the embeddings' LayerNorm draws the forward
pass's one sample and the later ones read it (:class:`~structprune.model.gates.SharedGate`).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from structprune.model.gates import SharedGate


class HiddenGatedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the kept hidden dimensions, times the hidden gate (see the module docstring).

    It takes over the parameters of the LayerNorm it replaces (same names in the state dict). ``first``: this is the
    first reader of the gate in a forward pass (the embeddings'), which draws the sample and scales its input."""

    def __init__(self, norm: nn.LayerNorm, gate: SharedGate, first: bool = False):
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                         bias=norm.bias is not None, device="meta")
        self.weight, self.bias = norm.weight, norm.bias
        self.__dict__["hidden_gate"] = gate  # not a submodule: the gate is saved once, on the embeddings
        self.first = first

    def extra_repr(self) -> str:
        return super().extra_repr() + f", first={self.first}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.__dict__["hidden_gate"]
        if gate.n != x.shape[-1]:
            raise ValueError(f"hidden states have {x.shape[-1]} dimensions, the hidden gate {gate.n}")
        if self.first:
            values, kept = gate.draw()
        else:
            values, kept = gate.current()
        if gate.is_identity():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        z = values.to(x.dtype).index_select(0, kept)
        xk = x.index_select(-1, kept)
        if self.first:
            xk = xk * z
        weight = self.weight.index_select(0, kept) if self.weight is not None else None
        bias = self.bias.index_select(0, kept) if self.bias is not None else None
        yk = F.layer_norm(xk, (int(kept.numel()),), weight, bias, self.eps) * z
        return yk.new_zeros(x.shape).index_copy(-1, kept, yk)  # in the norm's dtype (fp32 under CPU autocast)

    def plain(self) -> nn.LayerNorm:
        """A plain ``nn.LayerNorm`` holding this one's parameters."""
        norm = nn.LayerNorm(self.normalized_shape, eps=self.eps, elementwise_affine=self.elementwise_affine,
                            bias=self.bias is not None, device="meta")
        norm.weight, norm.bias = self.weight, self.bias
        return norm


def hidden_scale(gate: SharedGate | None, dtype: torch.dtype) -> torch.Tensor | None:
    """What a sublayer's output is multiplied by before the residual add: the hidden gate's values of this forward
    pass (None when there is no hidden gate or it changes nothing)."""
    if gate is None or gate.is_identity():
        return None
    return gate.current()[0].to(dtype)


def _get(root: nn.Module, path: str) -> nn.Module:
    return operator.attrgetter(path)(root)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, module)


@torch.no_grad()
def select_embedding(emb: nn.Embedding, cols: torch.Tensor, scale: torch.Tensor | None) -> nn.Embedding:
    """``emb`` keeping embedding dimensions ``cols``, each multiplied by ``scale`` (when given)."""
    weight = emb.weight.detach().index_select(1, cols)
    if scale is not None:
        weight = weight * scale.to(weight)
    new = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=emb.padding_idx, max_norm=emb.max_norm,
                       norm_type=emb.norm_type, scale_grad_by_freq=emb.scale_grad_by_freq, sparse=emb.sparse,
                       device="meta")
    new.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=emb.weight.requires_grad)
    return new


@torch.no_grad()
def select_norm(norm: nn.LayerNorm, cols: torch.Tensor, scale: torch.Tensor | None) -> nn.LayerNorm:
    """``norm`` over the dimensions ``cols`` only, its weight and bias multiplied by ``scale`` (when given); a
    :class:`HiddenGatedLayerNorm` stays one (same gate)."""
    weight = norm.weight.detach().index_select(0, cols) if norm.weight is not None else None
    bias = norm.bias.detach().index_select(0, cols) if norm.bias is not None else None
    if scale is not None:
        if weight is None:
            raise ValueError("cannot fold a fractional hidden gate into a LayerNorm without weights")
        weight, bias = weight * scale.to(weight), (bias * scale.to(bias) if bias is not None else None)
    new = nn.LayerNorm(int(cols.numel()), eps=norm.eps, elementwise_affine=weight is not None, bias=bias is not None,
                       device="meta")
    if weight is not None:
        new.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=norm.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=norm.bias.requires_grad)
    if isinstance(norm, HiddenGatedLayerNorm):
        return HiddenGatedLayerNorm(new, norm.__dict__["hidden_gate"], first=norm.first)
    return new


def gate_of(model: nn.Module, path: str) -> SharedGate | None:
    """The hidden gate of a model whose embeddings are at ``path`` (None when it has none)."""
    return getattr(_get(model, path), "hidden_gate", None)


__all__ = ["HiddenGatedLayerNorm", "hidden_scale", "select_embedding", "select_norm", "gate_of"]
