"""Every family adapter: every task head patches exactly, and unpatch gives plain HF modules back."""
import pytest
import torch
import transformers

import structprune as sp
from helpers.models import FAMILIES, PREFIXES, layer_part, outputs, pruning_masks, tiny_batch, tiny_model

L, H, I = 3, 4, 96
# Every encoder task head transformers has for the supported families (decoder/causal-LM heads are refused).
TASK_HEADS = ("Model", "ForQuestionAnswering", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM",
              "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction")
CASES = [(f, h) for f in FAMILIES for h in TASK_HEADS if hasattr(transformers, PREFIXES[f] + h)]


def head_outputs(model, batch):
    """Every floating output tensor of ``model`` on ``batch`` (multiple-choice heads get [B, 2, S] inputs)."""
    if type(model).__name__.endswith("ForMultipleChoice"):
        batch = {k: v[:, None].expand(-1, 2, -1).contiguous() for k, v in batch.items()}
    out = model(**batch)
    return [v for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def test_every_family_is_registered():
    assert set(FAMILIES) <= set(sp.SUPPORTED_MODEL_TYPES)
    assert len(CASES) >= 30


@pytest.mark.parametrize("family, head", CASES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_task_head_patches_exactly(family, head, attn):
    model = tiny_model(family, head, attn)
    cls = type(model)
    batch = tiny_batch()
    with torch.no_grad():
        expected = head_outputs(model, batch)
        assert sp.patch(model) is model
        got = head_outputs(model, batch)
    assert isinstance(model, cls) and sp.is_patched(model) and len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_compacted_and_reloaded_agree(tmp_path, family):
    model = sp.patch(tiny_model(family, "qa"))
    heads, ffn = pruning_masks()
    sp.set_masks(model, heads=heads, ffn=ffn)
    batch = tiny_batch()
    with torch.no_grad():
        masked = outputs(model, batch)
        sp.compact(model)
        torch.testing.assert_close(outputs(model, batch), masked, atol=1e-5, rtol=0)
    assert [layer_part(model, i, "attention").num_heads for i in range(L)] == heads.sum(1).tolist()
    assert [layer_part(model, i, "ffn_out").in_features for i in range(L)] == ffn.sum(1).tolist()
    sp.save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(outputs(sp.from_pretrained(tmp_path / "m"), batch), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fractional", [False, True])
def test_unpatch_restores_plain_modules_with_current_weights(family, fractional):
    model = tiny_model(family, "qa")
    classes = {name: type(m) for name, m in model.named_modules()}
    sp.patch(model)
    heads, ffn = pruning_masks(1)
    sp.set_masks(model, heads=heads, ffn=ffn)
    if fractional:
        with torch.no_grad():
            for gate in sp.iter_gates(model):
                gate.log_alpha.copy_(torch.linspace(-1, 3, gate.n))
    batch = tiny_batch()
    with torch.no_grad():
        expected = outputs(model, batch)
        assert sp.unpatch(model) is model
        got = outputs(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not sp.is_patched(model)
    assert all(classes.get(name, type(m)) is type(m) for name, m in model.named_modules())
    assert "structprune" not in " ".join(type(m).__module__ for m in model.modules())
    assert not [k for k in model.state_dict() if "_gate." in k]
    sp.patch(model)  # and back again
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, batch), expected, atol=1e-5, rtol=1e-5)


def test_unpatch_of_an_unpruned_model_gives_the_same_state():
    model = tiny_model("bert", "qa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp.unpatch(sp.patch(model))
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_unpatch_needs_a_patched_model():
    with pytest.raises(sp.NotPatchedError, match="not patched"):
        sp.unpatch(tiny_model())


def test_family_of_names_supported_types():
    with pytest.raises(TypeError, match="distilbert"):
        sp.family_of(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2)))
