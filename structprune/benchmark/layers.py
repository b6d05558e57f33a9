"""The benchmarked layer: one HF ``BertLayer`` built dense, compacted or pruned on shared weights, its inputs,
the timed step, and the FLOP/byte model of one call."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from structprune.model.compaction import compact
from structprune.model.masks import set_masks
from structprune.model.patching import patch, set_gate_sampling
from structprune.ops.reference import attention_flops, ffn_flops
from structprune.benchmark.config import VARIANT_KINDS, Shape


class _SingleLayerModel(nn.Module):
    """The smallest thing :func:`structprune.patch` accepts: ``.config`` and ``.encoder.layer``."""

    def __init__(self, config, layer: nn.Module):
        super().__init__()
        self.config = config
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([layer])

    @property
    def layer(self) -> nn.Module:
        return self.encoder.layer[0]


def bert_config(shape: Shape, attn_implementation: str = "sdpa"):
    from transformers import BertConfig

    return BertConfig(hidden_size=shape.hidden, num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                      num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      attn_implementation=attn_implementation)


def base_state(shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    """fp32 CPU weights of one HF ``BertLayer`` (BERT's init), shared by every variant of a shape."""
    from transformers.models.bert.modeling_bert import BertLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = BertLayer(bert_config(shape))
        # BERT init leaves biases and LayerNorm at 0/1; small random values make the output check meaningful.
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.02)
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def keep_count(n: int, frac: float) -> int:
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"kept fraction must be in [0, 1], got {frac}")
    return min(n, max(1, round(frac * n))) if frac > 0 else 0


def random_mask(n: int, frac: float, seed: int) -> torch.Tensor:
    """0/1 float mask keeping ``round(frac * n)`` entries chosen at random; nested across fractions for a seed."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    mask = torch.zeros(n)
    mask[order[:keep_count(n, frac)]] = 1.0
    return mask


def build_layer(shape: Shape, kind: str, state: dict, *, head_frac: float = 1.0, ffn_frac: float = 1.0,
                mode: str = "inference", dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> nn.Module:
    """One encoder layer of the given kind ("dense-eager", "dense-sdpa", "compacted", "pruned"), set up for ``mode``."""
    from transformers.models.bert.modeling_bert import BertLayer

    if kind not in VARIANT_KINDS:
        raise ValueError(f"unknown variant kind {kind!r}; expected one of {VARIANT_KINDS}")
    config = bert_config(shape, "eager" if kind == "dense-eager" else "sdpa")
    layer = BertLayer(config)
    layer.load_state_dict(state)
    layer.to(device=device, dtype=dtype)
    if kind in ("compacted", "pruned"):
        model = _SingleLayerModel(config, layer)
        patch(model)
        set_masks(model, heads=random_mask(shape.heads, head_frac, seed)[None],
                  ffn=random_mask(shape.ffn, ffn_frac, seed + 1)[None])
        if kind == "compacted":
            compact(model)
        # the pruned layer samples its gates in training (L0 pruning); the compacted one is a plain smaller layer
        set_gate_sampling(model, kind == "pruned" and mode == "training")
        layer = model.layer
    layer.train(mode == "training")
    return layer


def flop_byte_model(shape: Shape, batch: int, seq: int, heads_kept: int, units_kept: int, elem_bytes: int,
                     training: bool) -> tuple[int, int]:
    """(FLOPs, bytes) of one layer call. Bytes: weights + biases of the kept heads/units, plus each op's
    activations in and out; training counts forward + backward as 3x the forward for both."""
    e, tokens = shape.hidden, batch * seq
    inner = heads_kept * shape.head_dim
    flops = attention_flops(batch, seq, e, heads_kept, shape.head_dim) + ffn_flops(batch, seq, e, units_kept)
    attn_bytes = (4 * e * inner + 3 * inner + e) + 2 * tokens * e
    ffn_bytes = (2 * e * units_kept + units_kept + e) + 2 * tokens * e
    nbytes = (attn_bytes + ffn_bytes) * elem_bytes
    factor = 3 if training else 1
    return flops * factor, nbytes * factor


def make_inputs(shape: Shape, batch: int, seq: int, dtype: torch.dtype, device, seed: int, padding: float = 0.0,
                training: bool = False):
    """(hidden states, 4D additive attention mask or None, gradient of the output or None)."""
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(batch, seq, shape.hidden, generator=gen).to(device=device, dtype=dtype)
    mask = None
    if padding > 0:
        pad = min(seq - 1, round(padding * seq))
        mask = torch.zeros(batch, 1, 1, seq, dtype=dtype)
        mask[..., seq - pad:] = torch.finfo(dtype).min
        mask = mask.to(device)
    grad = None
    if training:
        x.requires_grad_(True)
        grad = (torch.randn(batch, seq, shape.hidden, generator=gen) * 0.1).to(device=device, dtype=dtype)
    return x, mask, grad


def make_step(module: Callable, params: list, x: torch.Tensor, mask, grad, training: bool) -> Callable[[], object]:
    """The timed callable: a no_grad forward, or forward + backward with gradients reset to None first."""
    if not training:
        def step():
            with torch.no_grad():
                return module(x, mask)
        return step

    def train_step():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x, mask)
        out.backward(grad)
        return out
    return train_step
