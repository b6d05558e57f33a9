"""The inference module :func:`structprune.serving.optimize` builds: a BERT-layout encoder (BERT, RoBERTa, ELECTRA,
XLM-R) at its compacted per-layer sizes, run as a few fused CPU calls per layer.

Per layer (``h``: ``[tokens, hidden]``, activations in the serving dtype, fp32 accumulation inside oneDNN):

    qkv  = h @ Wqkv^T + bqkv                      one GEMM for query, key and value (kept heads only)
    ctx  = attention(q, k, v, key bias)           the cpp kernel (fp32: AVX-512F; bf16: AMX or AVX512-BF16)
    h    = LayerNorm(ctx @ Wo^T + bo + h)         GEMM with the bias and the residual add as oneDNN post-ops
    a    = gelu(h @ Wi^T + bi)                    GEMM with bias + GELU post-op (kept FFN units only)
    h    = LayerNorm(a @ Wo2^T + bo2 + h)         GEMM with bias + residual post-op

Weights are reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) and the
GEMMs run with ``torch.ops.mkldnn._linear_pointwise``; where that op is missing (a torch built without oneDNN),
plain ``F.linear`` with separate bias/activation/residual takes its place. A layer with 0 heads (0 FFN units) adds
only its output bias and the residual before its LayerNorm, as the model does; a whole sublayer that pruning removed
(CoFi: its sublayer gate closed) is skipped with its LayerNorm, as the compacted model skips it. The embeddings (fp32 tables) are
:class:`structprune.serving.embeddings.ServingEmbeddings`' one pass per token, written in the serving dtype; the QA head
runs in the serving dtype; start/end logits come back in fp32. Attention runs through
:func:`structprune.ops.dispatch.serving_attention` (``cpp_serving_attention`` where the extension is built and the
CPU has AVX-512F, and AVX512-BF16 for bf16; ATen's SDPA otherwise); ``ServingLayer.attention_kernel`` says which ran
last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from structprune.ops import dispatch as ops

ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}  # HF hidden_act -> oneDNN post-op (erf GELU, as HF's "gelu")


def _mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """``y = post(x @ W^T + b)`` with ``W`` pre-packed for oneDNN; ``post`` is "none", an activation, or a residual
    add (``forward(x, residual)``)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, activation: str = "none", packed: bool = True,
                 tokens_hint: int = 1024):
        super().__init__()
        weight = linear.weight.detach().to(dtype).contiguous()
        bias = linear.bias.detach().to(dtype).contiguous() if linear.bias is not None else None
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.activation = activation
        self.packed = packed and _mkldnn_ok() and self.out_features > 0 and self.in_features > 0
        self.register_buffer("bias", bias, persistent=False)
        if self.packed:
            self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, tokens_hint),
                                 persistent=False)
        else:
            self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
            algorithm = "none" if self.activation == "gelu" else ""  # "none": erf GELU (HF's "gelu")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        if self.activation == "gelu":
            y = F.gelu(y)
        elif self.activation == "relu":
            y = F.relu(y)
        return y if residual is None else y + residual

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, post={self.activation}, "
                f"packed={self.packed}")


class ServingLayer(nn.Module):
    """One encoder layer at its compacted sizes (see the module docstring)."""

    def __init__(self, parts: dict, heads: int, head_dim: int, activation: str, dtype: torch.dtype, packed: bool,
                 pad_units: int = 1, skip_attention: bool = False, skip_ffn: bool = False):
        super().__init__()
        if (skip_attention and heads) or (skip_ffn and parts["ffn_in"].out_features):
            raise ValueError("ServingLayer: a skipped sublayer must have been compacted to 0 heads (FFN units)")
        self.heads, self.head_dim = heads, head_dim
        self.skip_attention, self.skip_ffn = skip_attention, skip_ffn
        self.attention_kernel: str | None = None  # "cpp" or "sdpa": what ran at the last call
        q, k, v = parts["query"], parts["key"], parts["value"]
        self.qkv = None
        if heads > 0:
            fused = nn.Linear(q.in_features, 3 * heads * head_dim)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
                fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            self.qkv = PackedLinear(fused, dtype, packed=packed)
            self.attn_out = PackedLinear(parts["attn_out"], dtype, packed=packed)
        self.register_buffer("attn_out_bias", parts["attn_out"].bias.detach().to(dtype), persistent=False)
        self.ln1 = ServingLayerNorm(parts["ln1"])
        self.units = parts["ffn_in"].out_features
        if self.units > 0:
            ffn_in, ffn_out = _padded_ffn(parts["ffn_in"], parts["ffn_out"], pad_units)
            self.ffn_in = PackedLinear(ffn_in, dtype, activation=activation, packed=packed)
            self.ffn_out = PackedLinear(ffn_out, dtype, packed=packed)
        self.register_buffer("ffn_out_bias", parts["ffn_out"].bias.detach().to(dtype), persistent=False)
        self.ln2 = ServingLayerNorm(parts["ln2"])

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
        """``h``: ``[batch * seq, hidden]``; ``mask``: the additive key bias ``[batch, seq]`` or None."""
        if self.heads == 0:
            return self._ffn(self._headless(h))
        qkv = self.qkv(h).view(batch, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        ctx = self._attention(qkv[0], qkv[1], qkv[2], mask)
        return self._ffn(self.ln1(self.attn_out(ctx.view(batch * seq, self.heads * self.head_dim), h)))

    def forward_rows(self, h: torch.Tensor, mask: torch.Tensor | None, seq: int, start: int, qkv_all: torch.Tensor,
                     barrier) -> torch.Tensor:
        """Rows ``start:start + len(h)`` of ONE sequence (``h``: ``[rows, hidden]``), while other threads run the
        other rows: the query/key/value rows are written into ``qkv_all`` (``[seq, 3 * heads * head_dim]``, one
        buffer per layer and call), one ``barrier.wait()``, then this thread's queries attend to every key."""
        if self.heads == 0:
            return self._ffn(self._headless(h))
        rows = h.shape[0]
        qkv = self.qkv(h)
        qkv_all[start:start + rows] = qkv
        barrier.wait()
        q = qkv.view(1, rows, 3, self.heads, self.head_dim)[:, :, 0].transpose(1, 2)
        kv = qkv_all.view(1, seq, 3, self.heads, self.head_dim)
        ctx = self._attention(q, kv[:, :, 1].transpose(1, 2), kv[:, :, 2].transpose(1, 2), mask)
        return self._ffn(self.ln1(self.attn_out(ctx.view(rows, self.heads * self.head_dim), h)))

    def _headless(self, h: torch.Tensor) -> torch.Tensor:
        """The attention sublayer of a layer with 0 heads: its output bias and LayerNorm, or nothing when skipped."""
        return h if self.skip_attention else self.ln1(h + self.attn_out_bias)

    def _attention(self, q, k, v, key_bias):
        """``[B, Sq, H, D]`` contiguous in q's dtype; key_bias: the model's ``[B, Sk]`` fp32 additive bias, or None."""
        ctx, self.attention_kernel = ops.serving_attention_ran(q, k, v, key_bias)
        return ctx

    def extra_repr(self) -> str:
        skipped = [name for name, skip in (("attention", self.skip_attention), ("ffn", self.skip_ffn)) if skip]
        return (f"heads={self.heads}, head_dim={self.head_dim}, attention_kernel={self.attention_kernel}"
                + (f", skipped={skipped}" if skipped else ""))

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        if self.skip_ffn:
            return h
        if self.units > 0:
            return self.ln2(self.ffn_out(self.ffn_in(h), h))
        return self.ln2(h + self.ffn_out_bias)


class ServingLayerNorm(nn.Module):
    """A copy of a LayerNorm with fp32 weight and bias in every serving dtype (statistics and affine map in fp32,
    rounded once to the activations' dtype), run by :func:`structprune.ops.dispatch.layer_norm`: the cpp kernel
    (AVX-512; ATen's bf16 LayerNorm runs at a fraction of the memory bandwidth) where the extension is built,
    ATen's otherwise."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.eps = float(ln.eps)
        weight = ln.weight.detach().float().clone()
        bias = ln.bias.detach().float().clone() if ln.bias is not None else torch.zeros_like(weight)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@torch.no_grad()
def _padded_ffn(ffn_in: nn.Linear, ffn_out: nn.Linear, multiple: int) -> tuple[nn.Linear, nn.Linear]:
    """The FFN with its units padded to a multiple of ``multiple`` by zero rows/columns: act(0 + 0) = 0 for GELU and
    ReLU and the padded columns of the output projection are 0, so outputs do not change; the GEMMs get K and N
    that fill the CPU's tiles (AMX: 32 bf16 in K, 16 in N)."""
    n = ffn_in.out_features
    extra = -n % multiple
    if extra == 0:
        return ffn_in, ffn_out
    new_in = nn.Linear(ffn_in.in_features, n + extra)
    new_in.weight.zero_()
    new_in.bias.zero_()
    new_in.weight[:n], new_in.bias[:n] = ffn_in.weight, ffn_in.bias
    new_out = nn.Linear(n + extra, ffn_out.out_features)
    new_out.weight.zero_()
    new_out.weight[:, :n], new_out.bias[:] = ffn_out.weight, ffn_out.bias
    return new_in, new_out
