"""Inference caches of the patched decoders: under bf16 autocast without gradients the cpp decoder ops, the GLU FFN
and the LM head cast their (packed) weights once per weight version instead of at every call, and compute what the
reference backend computes with per-call casts; in-place updates are seen; a decode step that sees every key runs
without a mask; the LM head is a plain ``nn.Linear`` again after unpatching."""
import copy

import pytest
import torch
from torch import nn

import structprune as sp
from helpers.decoders import greedy, left_padded, masks, outputs, tiny_model
from helpers.tolerances import check_close
from helpers import models as _models
from structprune.model.families.decoder import DecoderLMHead
from structprune.ops import reference

cpp_ops = pytest.importorskip("structprune.backends.cpp.ops")
if cpp_ops.load_error() is not None:
    pytest.skip(f"C++ extension unavailable: {cpp_ops.load_error()}", allow_module_level=True)
from structprune.backends.cpp import decoder as dec  # noqa: E402

one_thread_reference_backend = _models.one_thread_reference_backend  # the autouse fixture


def _masked(family="llama"):
    heads, ffn = masks()
    return sp.set_masks(sp.patch(tiny_model(family)), heads=heads, ffn=ffn)


def _bf16(model, inputs, backend):
    with sp.use_backend(backend), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**inputs).logits.float()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_weights_cast_once_and_match_per_call_casts(family):
    sp.clear_cache()
    model, inputs = _masked(family), left_padded()
    want = _bf16(model, inputs, "torch")  # the reference: every weight cast by autocast at every call
    first = _bf16(model, inputs, "cpp")
    assert sp.last_backends()["attention"] == "cpp" and sp.last_backends()["ffn"] == "cpp"
    cast = [k for k in dec._PACKS if len(k) > 1 and k[1] == torch.bfloat16]
    assert cast, "no packed bf16 weights cached"
    assert model.model.layers[0].mlp.__dict__["_fused"][0][0] == torch.bfloat16
    assert model.lm_head.__dict__["_cast"][1].dtype == torch.bfloat16
    entries = set(dec._PACKS)
    second = _bf16(model, inputs, "cpp")
    assert set(dec._PACKS) == entries  # reused, not rebuilt
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    with torch.no_grad():
        ref32 = model(**inputs).logits
    check_close(family, first, ref32, want, torch.bfloat16)


def test_in_place_updates_reach_the_cast_copies():
    model, inputs = _masked(), left_padded()
    before = _bf16(model, inputs, "cpp")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(1.5)
            layer.self_attn.o_proj.weight.mul_(0.5)
            layer.mlp.down_proj.weight.mul_(2.0)
        model.lm_head.weight.mul_(3.0)
    after = _bf16(model, inputs, "cpp")
    assert (after - before).abs().max() > 1e-2
    with torch.no_grad():
        ref32 = model(**inputs).logits
    check_close("after", after, ref32, _bf16(model, inputs, "torch"), torch.bfloat16)


def test_bf16_greedy_generation_patched_equals_compacted():
    model, inputs = _masked(), left_padded()
    compacted = sp.compact(copy.deepcopy(model))
    with sp.use_backend("cpp"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(greedy(model, inputs, 8), greedy(compacted, inputs, 8))


@pytest.mark.parametrize("window", [-1, 4, 40])
def test_decode_step_without_a_mask(window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g),
               torch.randn(2, 2, 9, 8, generator=g))
    wo, gates = torch.randn(16, 6 * 8, generator=g), torch.rand(6, generator=g)
    active, q_to_kv = torch.tensor([0, 2, 3, 5]), torch.tensor([0, 1, 1, 0])
    got = dec.gated_decoder_attention(q, k, v, wo, None, gates, active, q_to_kv, None, window)
    want = reference.gated_decoder_attention(q, k, v, wo, None, gates, active, q_to_kv, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lm_head_is_plain_linear_again_after_unpatch():
    plain = tiny_model("llama")
    model = sp.patch(copy.deepcopy(plain))
    assert type(model.lm_head) is DecoderLMHead
    assert set(model.lm_head.state_dict()) == set(plain.lm_head.state_dict())
    x = torch.randn(2, 3, plain.config.hidden_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model.lm_head(x), plain.lm_head(x), atol=1e-2, rtol=1e-2)
    y = model.lm_head(x)  # with a gradient: nn.Linear's own forward
    y.sum().backward()
    assert model.lm_head.weight.grad is not None
    sp.unpatch(model)
    assert type(model.lm_head) is nn.Linear and "_cast" not in model.lm_head.__dict__
    torch.testing.assert_close(outputs(model, left_padded()), outputs(plain, left_padded()), atol=1e-5, rtol=1e-5)
