"""Padding masks on every backend: fully padded sequences and masks that are not padding masks.

Semantics (those of the reference and of HF's own layers): with HF's SDPA layers (boolean masks) a query with no
key to attend to gets a zero attention context, so a fully padded sequence's attention output is the output bias;
with eager layers (additive ``finfo.min`` masks) its softmax is uniform and the context is the mean of the values.
"""
from __future__ import annotations

import pytest
import torch
from helpers.models import outputs, tiny_batch, tiny_model
from helpers.tolerances import check_close

import structprune as sp
from structprune.ops import dispatch as ops

KERNELS = [b for b in ("cpp", "triton") if ops.availability(b, "cpu") is None]


def _batch():
    b = tiny_batch(batch=3, seq=9, pad_from=5)
    b["attention_mask"][0, :] = 0  # sequence 0 fully padded, sequence 2 partly
    return b


def _run(model, batch, backend, dtype, grad=False):
    sp.set_backend(backend)
    m = model.to(dtype)
    m.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = outputs(m, batch)
    grads = None
    if grad:
        out.float().square().sum().backward()  # (no output is 0: a real gradient everywhere)
        grads = {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}
    m.float()
    return out.detach().float(), grads


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("backend", KERNELS)
def test_fully_padded_sequence_matches_reference(backend, dtype, attn):
    if backend == "triton" and dtype == torch.float16 and attn == "eager":
        pytest.skip("one half-precision Triton case per mask kind keeps the interpreter run short")
    model = tiny_model(attn=attn, layers=1 if backend == "triton" else 2)
    sp.patch(model)
    batch = _batch()
    grad = dtype == torch.float32
    ref32, g32 = _run(model, batch, "torch", torch.float32, grad)
    plain, _ = _run(model, batch, "torch", dtype)
    got, g = _run(model, batch, backend, dtype, grad)
    assert sp.last_backends()["attention"] == backend
    check_close("outputs", got, ref32, plain, dtype)
    if grad:
        for name in g32:
            check_close(name, g[name], g32[name], None, torch.float32)


@pytest.mark.parametrize("backend", KERNELS)
def test_fully_padded_key_bias_is_finite_in_half_precision(backend):
    """Direct op call: a key bias of finfo(float32).min everywhere must not turn into -inf (NaN softmax)."""
    g = torch.Generator().manual_seed(0)
    B, S, E, H, D = 2, 5, 16, 2, 8
    args = [torch.randn(*s, generator=g) * 0.3 for s in ((B, S, E), (H * D, E), (H * D,), (H * D, E), (H * D,),
                                                        (H * D, E), (H * D,), (E, H * D), (E,))]
    kb = torch.zeros(B, S)
    kb[0] = torch.finfo(torch.float32).min
    for dtype in (torch.bfloat16, torch.float16):
        y = ops._provider(backend).gated_attention(*[a.to(dtype) for a in args], torch.ones(H), torch.arange(H),
                                                    kb, H)
        assert torch.isfinite(y).all(), f"{backend} {dtype}: non-finite output for a fully padded key bias"


@pytest.mark.parametrize("backend", KERNELS)
def test_non_padding_4d_mask_is_refused(backend):
    model = tiny_model(layers=1)
    sp.patch(model)
    sp.set_backend(backend)
    layer = model.bert.encoder.layer[0].attention
    x = torch.randn(2, 6, 64)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None].expand(2, 1, 6, 6)
    with pytest.raises(ValueError, match="varies over the query axis"):
        layer(x, attention_mask=causal)
    padding = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    padding[1, :, :, 4:] = False  # materialised (not a stride-0 view) but the same for every query
    sp.set_backend("torch")
    ref = layer(x, attention_mask=padding)[0]
    sp.set_backend(backend)
    check_close("out", layer(x, attention_mask=padding)[0], ref, None, torch.float32)
    padding[0, 0, 2, 1] = False  # changed in place after a successful check: checked again, and refused
    with pytest.raises(ValueError, match="varies over the query axis"):
        layer(x, attention_mask=padding)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_banded_key_row_of_an_hf_sliding_mask_is_its_padding_row(kind):
    """The key row of a [B, 1, S, S] banded mask (read off its diagonal) is the padding row: a key nobody may attend
    is padding, whatever the band."""
    from structprune.ops.padding import banded_key_row

    S, window = 12, 2
    keep = torch.ones(2, S, dtype=torch.bool)
    keep[1, 8:] = False
    pos = torch.arange(S)
    band = (pos[:, None] - pos[None, :]).abs() <= window
    allowed = band[None, None] & keep[:, None, None, :]
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    row = banded_key_row(mask)
    want = allowed[:, 0].any(dim=1) if kind == "bool" else mask[:, 0].amax(dim=1)
    assert torch.equal(row, want)


@pytest.mark.parametrize("keys", [8, 16, 24, 13])
def test_query_varying_bool_mask_is_found_at_every_position(keys):
    """The mask check compares bool masks 8 keys per int64 word when the rows allow it: one flipped key anywhere,
    in any word, is found; so in inference mode, where no check is cached; views fall back to key-by-key."""
    from structprune.ops.padding import mask_row

    g = torch.Generator().manual_seed(keys)
    B, Q = 3, 5
    mask = (torch.rand(B, 1, 1, keys, generator=g) > 0.3).expand(B, 1, Q, keys).contiguous()
    with torch.inference_mode():
        assert torch.equal(mask_row(mask), mask[:, 0, 0, :])
        for b, q, k in [(0, 1, 0), (1, Q - 1, keys - 1), (2, 2, keys // 2), (2, 4, 7 % keys)]:
            bad = mask.clone()
            bad[b, 0, q, k] = ~bad[b, 0, q, k]
            with pytest.raises(ValueError, match="varies over the query axis"):
                mask_row(bad)
            wide = torch.cat([bad, bad], dim=-1)[..., keys // 2: keys // 2 + keys]  # a view: not word-aligned
            if not torch.equal(wide, wide[:, :, :1, :].expand_as(wide)):
                with pytest.raises(ValueError, match="varies over the query axis"):
                    mask_row(wide)
