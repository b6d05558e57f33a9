"""drop_layers: the shallower model computes what the original computes through the kept layers only (the oracle:
the original with its layer list cut to those layers), for every family, and saves as a plain transformers model;
ModernBERT's global/local pattern follows the kept layers."""
import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

import structprune as sp
from helpers import models
from helpers.models import tiny_batch, tiny_model
from structprune.model.layer_drop import drop_layers, layers_to_keep

one_thread_reference_backend = models.one_thread_reference_backend  # the autouse fixture, in this module


def tiny_modernbert(layers=6, head="ForQuestionAnswering"):
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=3, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, cls_token_id=1, sep_token_id=2, attn_implementation="sdpa", initializer_range=0.2)
    return getattr(transformers, "ModernBert" + head)(config).eval()


def model_of(family, layers=4):
    return tiny_modernbert(layers) if family == "modernbert" else tiny_model(family, layers=layers)


def cut(model, keep):
    """The oracle: a copy of ``model`` whose layer list holds only the layers ``keep`` (the same modules)."""
    ref = copy.deepcopy(model)
    family = sp.family_of(ref)
    layers = family.layers(ref)
    kept = nn.ModuleList([layers[i] for i in keep])
    parent_path, _, name = family.layers_path.rpartition(".")
    base = ref.base_model
    setattr(base.get_submodule(parent_path) if parent_path else base, name, kept)
    return ref


def logits(model, batch):
    out = model(**batch)
    return torch.cat([out.start_logits, out.end_logits], dim=-1)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "modernbert"])
@pytest.mark.parametrize("keep", [[0, 2], [0, 1, 2, 3], [0], [0, 3]])
def test_the_shallower_model_is_the_original_through_the_kept_layers(family, keep):
    model = model_of(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student = drop_layers(model, keep)
    assert type(student) is type(model) and len(sp.family_of(student).layers(student)) == len(keep)
    assert sp.family_of(student).sizes(student.config).layers == len(keep)
    batch = tiny_batch(seq=24 if family == "modernbert" else 11, pad_from=9)  # longer than the local window
    with torch.no_grad():
        torch.testing.assert_close(logits(student, batch), logits(cut(model, keep), batch), rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    assert not student.training and not sp.is_patched(student)


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
def test_the_saved_student_loads_in_plain_transformers(family, tmp_path):
    student = drop_layers(model_of(family), [0, 3])
    student.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(student)
    batch = tiny_batch(seq=24, pad_from=9)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, batch), logits(student, batch), rtol=0, atol=0)
    if family == "modernbert":
        assert loaded.config.layer_types == ["full_attention", "full_attention"]


def test_modernbert_layer_types_follow_the_kept_layers():
    model = tiny_modernbert(6)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"] * 2
    student = drop_layers(model, [0, 2, 3, 4])
    want = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert student.config.layer_types == want
    assert [layer.attention_type for layer in student.model.layers] == want
    assert [layer.attn.sliding_window is None for layer in student.model.layers] == [True, False, True, False]


def test_modernbert_first_kept_layer_loses_its_pre_attention_norm():
    """ModernBERT's layer 0 has no attn_norm (the embeddings' norm precedes it): keeping 1, 3, 5 leaves layer 1's
    norm out, with a warning; the student then equals the cut original with that norm replaced by the identity."""
    model = tiny_modernbert(6)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.attn_norm\.weight"):
        student = drop_layers(model, 3)
    ref = cut(model, [1, 3, 5])
    ref.model.layers[0].attn_norm = nn.Identity()
    batch = tiny_batch(seq=24, pad_from=9)
    with torch.no_grad():
        torch.testing.assert_close(logits(student, batch), logits(ref, batch), rtol=0, atol=0)
        assert not torch.allclose(logits(student, batch), logits(cut(model, [1, 3, 5]), batch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_layers(model, [0, 5])  # layer 0 kept first: nothing left out, no warning


def test_a_count_keeps_every_other_layer_evenly_spread_with_the_last():
    assert layers_to_keep(3, 6) == [1, 3, 5]
    assert layers_to_keep(2, 6) == [2, 5]
    assert layers_to_keep(6, 12) == [1, 3, 5, 7, 9, 11]
    assert layers_to_keep(6, 6) == list(range(6))
    assert layers_to_keep(1, 6) == [5]
    for n in range(1, 13):
        for k in range(1, n + 1):
            kept = layers_to_keep(k, n)
            assert len(set(kept)) == k and kept[-1] == n - 1 and kept == sorted(kept)
    assert layers_to_keep([4, 0, 2], 6) == [0, 2, 4]


@pytest.mark.parametrize("keep, match", [(0, "count from 1 to 6"), (7, "count from 1 to 6"),
                                         ([0, 6], "indices from 0 to 5"), ([], "indices"), ([1, 1], "twice")])
def test_bad_keep_is_refused(keep, match):
    with pytest.raises(ValueError, match=match):
        layers_to_keep(keep, 6)


def test_a_patched_or_compacted_model_is_refused():
    with pytest.raises(TypeError, match="plain transformers model"):
        drop_layers(sp.patch(tiny_model("bert", layers=3)), 2)
    model = sp.patch(tiny_model("bert", layers=3))
    sp.set_masks(model, heads=torch.tensor([[True, False, True, True]] * 3), ffn=torch.ones(3, 96, dtype=torch.bool))
    sp.compact(model)
    sp.unpatch(model)
    with pytest.raises(ValueError, match="compacted"):
        drop_layers(model, 2)
