import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structprune as sp
from helpers.models import FAMILIES, layer_part, outputs, tiny_batch, tiny_model

L, H, I = 3, 4, 96


def zeroed_reference(model, heads, ffn, batch):
    """The same model with pruned head contexts / FFN activations zeroed by hooks on unpatched HF modules."""
    handles = []
    head_dim = layer_part(model, 0, "query").out_features // H
    for i, (hmask, fmask) in enumerate(zip(heads, ffn)):
        col = hmask.float().repeat_interleave(head_dim)
        handles.append(layer_part(model, i, "attn_out").register_forward_pre_hook(
            lambda m, args, col=col: (args[0] * col,) + args[1:]))
        handles.append(layer_part(model, i, "ffn_out").register_forward_pre_hook(
            lambda m, args, f=fmask.float(): (args[0] * f,) + args[1:]))
    try:
        with torch.no_grad():
            return outputs(model, batch)
    finally:
        for h in handles:
            h.remove()


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), family=st.sampled_from(FAMILIES), attn=st.sampled_from(["sdpa", "eager"]),
       p_head=st.sampled_from([0.0, 0.5, 1.0]), p_ffn=st.sampled_from([0.0, 0.3, 1.0]))
def test_masked_equals_zeroed_contexts_and_activations(seed, family, attn, p_head, p_ffn):
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(L, H, generator=g) < p_head
    ffn = torch.rand(L, I, generator=g) < p_ffn
    model = tiny_model(family, "qa", attn)
    batch = tiny_batch()
    expected = zeroed_reference(model, heads, ffn, batch)
    sp.patch(model)
    sp.set_masks(model, heads=heads, ffn=ffn)
    with torch.no_grad():
        got = outputs(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    m = sp.get_masks(model)
    assert torch.equal(m.heads, heads) and all(torch.equal(a, b) for a, b in zip(m.ffn, ffn))


def test_masks_accept_lists_ints_and_floats():
    model = sp.patch(tiny_model())
    sp.set_masks(model, heads=[[1, 0, 1, 1]] * L, ffn=[torch.ones(I)] * L)
    assert sp.get_masks(model).num_heads_kept == 3 * L
    sp.set_masks(model, heads=torch.ones(L, H, dtype=torch.int64))
    assert sp.get_masks(model).num_heads_kept == H * L


@pytest.mark.parametrize("heads, ffn, error, match", [
    (torch.ones(L, H + 1), None, ValueError, r"\[3, 4\]"),
    (torch.ones(L + 1, H), None, ValueError, "layers"),
    (None, [torch.ones(I)] * (L - 1), ValueError, "one entry per layer"),
    (None, [torch.ones(I - 1)] * L, ValueError, r"\(96,\)"),
    (torch.full((L, H), 0.5), None, ValueError, "only 0 and 1"),
    (torch.full((L, H), 2), None, ValueError, "only 0 and 1"),
    (torch.ones(L, H, dtype=torch.complex64), None, TypeError, "bool, integer or float"),
    ("all", None, TypeError, "tensor"),
])
def test_bad_masks_are_clear_errors_and_change_nothing(heads, ffn, error, match):
    model = sp.patch(tiny_model())
    sp.set_masks(model, heads=torch.tensor([[1, 1, 0, 1]] * L))
    with pytest.raises(error, match=match):
        sp.set_masks(model, heads=heads, ffn=ffn)
    assert sp.get_masks(model).num_heads_kept == 3 * L


def test_bad_ffn_mask_does_not_apply_good_head_mask():
    model = sp.patch(tiny_model())
    with pytest.raises(ValueError):
        sp.set_masks(model, heads=torch.zeros(L, H), ffn=torch.ones(L, I + 1))
    assert sp.get_masks(model).num_heads_kept == H * L


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mask_on_other_device_is_an_error():
    model = sp.patch(tiny_model())
    with pytest.raises(ValueError, match="device"):
        sp.set_masks(model, heads=torch.ones(L, H, device="cuda"))


def test_layer_with_no_heads_and_no_units_still_runs_residual_and_layernorm():
    model = sp.patch(tiny_model())
    sp.set_masks(model, heads=torch.zeros(L, H), ffn=torch.zeros(L, I))
    batch = tiny_batch()
    with torch.no_grad():
        out = outputs(model, batch)
    assert torch.isfinite(out).all()
