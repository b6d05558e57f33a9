import copy

import pytest
import torch
import transformers

import structprune as sp
from helpers.models import outputs, tiny_batch, tiny_model


# Exactness for every family, task head and attention implementation: tests/model/test_families.py.


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_patch_exact_for_each_activation(act):
    model = tiny_model("bert", "qa", act=act)
    batch = tiny_batch()
    with torch.no_grad():
        expected = outputs(model, batch)
        got = outputs(sp.patch(model), batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_patched_model_trains_like_unpatched():
    model = tiny_model("bert", "qa")
    ref = copy.deepcopy(model)
    sp.patch(model)
    sp.set_backend("torch")  # HF's own dropout stream: the kernels' fused attention dropout draws another one
    batch = dict(tiny_batch(), start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([4, 5, 6]))
    for m in (model, ref):
        m.train()
        torch.manual_seed(5)
        m(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)


def test_state_dict_keeps_hf_names_and_adds_gates():
    model = tiny_model("bert", "qa")
    before = set(model.state_dict())
    sp.patch(model)
    after = set(model.state_dict())
    assert before <= after
    extra = after - before
    assert all(k.endswith(("log_alpha", "mask")) for k in extra)
    assert len([k for k in extra if k.endswith("log_alpha")]) == 2 * model.config.num_hidden_layers
    assert len(sp.gate_parameters(model)) == 2 * model.config.num_hidden_layers


def test_patching_twice_is_an_error():
    model = sp.patch(tiny_model())
    with pytest.raises(RuntimeError, match="already patched"):
        sp.patch(model)


def test_unsupported_model_is_a_clear_error():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(TypeError, match=r"bert.*roberta"):
        sp.patch(transformers.GPT2Model(config))


def test_decoder_bert_is_refused():
    model = tiny_model()
    model.config.is_decoder = True
    with pytest.raises(TypeError, match="decoder"):
        sp.patch(model)


def test_apis_need_a_patched_model():
    model = tiny_model()
    for fn in (sp.compact, sp.get_masks, sp.summary):
        with pytest.raises(sp.NotPatchedError, match="patch"):
            fn(model)


def test_patched_model_deepcopies_and_pickles(tmp_path):
    model = sp.patch(tiny_model())
    clone = copy.deepcopy(model)
    torch.save(clone, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(back, batch), outputs(model, batch))


def test_gate_sampling_switch():
    model = sp.patch(tiny_model())
    assert not any(g.sampling for g in sp.iter_gates(model))
    sp.set_gate_sampling(model, True)
    assert all(g.sampling for g in sp.iter_gates(model))
