"""The embedding block of the serving module: the model's own embeddings (fp32), computed in one pass per token by
the cpp kernel ``cpp_embedding_layer_norm`` (``csrc/cpu/norm_cpu.cpp``) where the family's block is the BERT layout:

    LayerNorm((word[input_ids] + token_type[token_type_ids]) + position[position_ids])

with position ids and default token types made exactly as the family's own ``forward`` makes them (BERT and ELECTRA:
the ``position_ids`` buffer; RoBERTa and XLM-R: from the input ids and the padding index). Elsewhere (another
family, relative position embeddings, no kernel backend) the model's module runs. ``kernel`` says which ran.
"""
from __future__ import annotations

import torch
from torch import nn

from structprune.ops import dispatch as ops

# Embedding classes whose forward is exactly the block above (transformers 5.x)
_BERT_LAYOUT = {"BertEmbeddings": "buffer", "ElectraEmbeddings": "buffer", "RobertaEmbeddings": "padding",
                "XLMRobertaEmbeddings": "padding", "CamembertEmbeddings": "padding"}


class ServingEmbeddings(nn.Module):
    """``forward(input_ids, token_type_ids)`` -> ``[batch * seq, hidden]`` in the serving dtype (fp32 when an
    ELECTRA-style projection follows, which runs after it in fp32)."""

    def __init__(self, embeddings: nn.Module, project: nn.Module | None, dtype: torch.dtype, config):
        super().__init__()
        self.module, self.project, self.dtype = embeddings, project, dtype
        positions = _BERT_LAYOUT.get(type(embeddings).__name__)
        ln = getattr(embeddings, "LayerNorm", None)
        absolute = getattr(config, "position_embedding_type", "absolute") in (None, "absolute")
        self.positions = positions if positions and absolute and isinstance(ln, nn.LayerNorm) and \
            ln.weight is not None and ln.bias is not None and \
            isinstance(getattr(embeddings, "token_type_embeddings", None), nn.Embedding) else None
        self.kernel: str | None = None  # "cpp" or "module": what ran at the last call

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        batch, seq = input_ids.shape
        out = self._fused(input_ids, token_type_ids) if self.positions is not None else None
        self.kernel = "cpp" if out is not None else "module"
        if out is None:
            out = self.module(input_ids=input_ids, token_type_ids=token_type_ids)
        if self.project is not None:
            out = self.project(out.view(batch, seq, -1))
        return out.to(self.dtype).reshape(batch * seq, -1)

    def _fused(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        m = self.module
        batch, seq = input_ids.shape
        if self.positions == "padding":
            position_ids = m.create_position_ids_from_input_ids(input_ids, m.padding_idx)
        else:
            position_ids = m.position_ids[:, :seq]
        if token_type_ids is None:
            if hasattr(m, "token_type_ids"):
                buffered = m.token_type_ids.expand(position_ids.shape[0], -1)
                token_type_ids = torch.gather(buffered, dim=1, index=position_ids)
            else:
                token_type_ids = torch.zeros_like(input_ids)
        ln = m.LayerNorm
        return ops.embedding_layer_norm(
            input_ids, token_type_ids.expand(batch, seq), position_ids.expand(batch, seq), m.word_embeddings.weight,
            m.token_type_embeddings.weight, m.position_embeddings.weight, ln.weight, ln.bias, float(ln.eps),
            self.dtype == torch.bfloat16 and self.project is None)

    def extra_repr(self) -> str:
        return f"layout={self.positions or 'the module'}, kernel={self.kernel}"
