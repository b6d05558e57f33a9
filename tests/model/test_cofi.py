"""Whole-sublayer and hidden-dimension gates (CoFi's structures) on BERT-layout models: open gates change nothing,
masks equal an independent oracle built with hooks on the plain Hugging Face model, compaction and save/load keep
the outputs, and plain transformers loads the compacted model."""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

import structprune as sp
from helpers.models import tiny_batch, tiny_model
from model.test_standalone import run_isolated
from structprune.model.cofi import hidden_gate
from structprune.model.hidden import HiddenGatedLayerNorm

BERT_LAYOUT = ("bert", "roberta", "electra", "xlm-roberta")
L, H, I, D = 3, 4, 96, 64


def masks(seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = torch.ones(L, H)
    heads[0, 1] = 0
    heads[2] = 0  # every head of layer 2 pruned, its attention sublayer still kept (bias + residual + LayerNorm)
    ffn = [torch.ones(I) for _ in range(L)]
    ffn[0][:40] = 0
    hidden = torch.rand(D, generator=g) > 0.35
    return {"heads": heads, "ffn": ffn, "hidden": hidden, "attn_sublayers": torch.tensor([1, 0, 1]),
            "ffn_sublayers": torch.tensor([1, 1, 0])}


def oracle(model, m):
    """The plain HF model with hooks: every LayerNorm over the kept hidden dimensions (pruned ones 0), skipped
    sublayers as the identity, pruned heads' and units' inputs to the output projections zeroed."""
    model = copy.deepcopy(model)
    kept = m["hidden"].nonzero().flatten()

    def ln(mod, inputs, out):
        y = torch.zeros_like(out)
        y[..., kept] = F.layer_norm(inputs[0][..., kept], (len(kept),), mod.weight[kept], mod.bias[kept], mod.eps)
        return y

    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.register_forward_hook(ln)
    if model.config.model_type == "distilbert":
        return _distilbert_oracle(model, m)
    for i, layer in enumerate(model.base_model.encoder.layer):
        heads = m["heads"][i].repeat_interleave(D // H)
        layer.attention.output.dense.register_forward_pre_hook(lambda mod, a, h=heads: (a[0] * h,))
        layer.output.dense.register_forward_pre_hook(lambda mod, a, u=m["ffn"][i]: (a[0] * u,))
        if not m["attn_sublayers"][i]:
            layer.attention.register_forward_hook(lambda mod, inputs, out: (inputs[0],) + tuple(out[1:]))
        if not m["ffn_sublayers"][i]:
            layer.feed_forward_chunk = types.MethodType(lambda self, a: a, layer)
    return model


def _distilbert_oracle(model, m):
    """DistilBERT: the same hooks on ``out_lin`` / ``lin2``; a skipped sublayer as HF's block forward without it."""
    for i, layer in enumerate(model.base_model.transformer.layer):
        heads = m["heads"][i].repeat_interleave(D // H)
        layer.attention.out_lin.register_forward_pre_hook(lambda mod, a, h=heads: (a[0] * h,))
        layer.ffn.lin2.register_forward_pre_hook(lambda mod, a, u=m["ffn"][i]: (a[0] * u,))

        def forward(self, x, attention_mask=None, skip_a=not m["attn_sublayers"][i],
                    skip_f=not m["ffn_sublayers"][i], **kwargs):
            if not skip_a:
                x = self.sa_layer_norm(self.attention(x, attention_mask=attention_mask, **kwargs)[0] + x)
            return x if skip_f else self.output_layer_norm(self.ffn(x) + x)

        layer.forward = types.MethodType(forward, layer)
    return model


def run(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def close(a, b, kept=None, tol=1e-5):
    for k in a:
        x, y = a[k], b[k]
        if kept is not None and k == "last_hidden_state":
            if x.shape[-1] > y.shape[-1]:
                x = x[..., kept]
            elif y.shape[-1] > x.shape[-1]:
                y = y[..., kept]
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=lambda msg: f"{k}: {msg}")


@pytest.mark.parametrize("family", BERT_LAYOUT + ("distilbert",))
@pytest.mark.parametrize("head", ["qa", "cls", "ForTokenClassification", "bare"])
def test_open_gates_change_nothing(family, head):
    batch = tiny_batch()
    model = tiny_model(family, head)
    ref = run(model, batch)
    close(run(sp.patch(model, sublayers=True, hidden=family != "electra"), batch), ref)


@pytest.mark.parametrize("family,head", [("bert", "qa"), ("roberta", "cls"), ("bert", "ForTokenClassification"),
                                         ("xlm-roberta", "bare"), ("distilbert", "qa"), ("distilbert", "cls")])
def test_masks_equal_oracle_compaction_and_save_load(family, head, tmp_path):
    batch = tiny_batch()
    model = tiny_model(family, head)
    m = masks()
    expected = run(oracle(model, m), batch)
    sp.patch(model, sublayers=True, hidden=True)
    sp.set_masks(model, **m)
    got = sp.get_masks(model)
    assert got.hidden.tolist() == m["hidden"].tolist() and got.attn_sublayers.tolist() == [True, False, True]
    if "cpp" in sp.available_backends():  # a kernel backend runs the gated attention and FFN
        with sp.use_backend("cpp"):
            close(run(model, batch), expected)
        assert sp.last_backends()["attention"] == "cpp" and sp.last_backends()["ffn"] == "cpp"
    close(run(model, batch), expected)
    kept = m["hidden"].nonzero().flatten()
    sp.compact(model)
    assert model.base_model.embeddings.word_embeddings.weight.shape[1] == len(kept)
    parts = [sp.family_of(model).parts(layer) for layer in sp.family_of(model).layers(model)]
    assert parts[1]["query"].weight.shape[0] == 0  # skipped: no head left
    assert parts[2]["ffn_in"].weight.shape[0] == 0
    close(run(model, batch), expected, kept)
    sp.save_pretrained(model, tmp_path / "m")
    close(run(sp.from_pretrained(tmp_path / "m"), batch), expected, kept)


def test_fractional_gates_fold_exactly():
    batch = tiny_batch()
    model = sp.patch(tiny_model("bert", "qa"), sublayers=True, hidden=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in sp.iter_gates(model):
            gate.log_alpha.copy_(torch.randn(gate.n, generator=g) * 2 - 0.5)
    masked = run(model, batch)
    assert not hidden_gate(model).is_fully_open()
    close(run(sp.compact(model), tiny_batch()), masked, tol=1e-4)


def test_plain_transformers_loads_compacted(tmp_path):
    batch = tiny_batch()
    jobs, expected = [], {}
    for family, head, auto in (("bert", "qa", "AutoModelForQuestionAnswering"),
                               ("roberta", "cls", "AutoModelForSequenceClassification"),
                               ("bert", "bare", "AutoModel"), ("distilbert", "qa", "AutoModelForQuestionAnswering"),
                               ("distilbert", "cls", "AutoModelForSequenceClassification")):
        model = sp.patch(tiny_model(family, head), sublayers=True, hidden=True)
        sp.set_masks(model, **masks())
        sp.compact(model)
        expected[family, head] = run(model, batch)
        sp.save_pretrained(model, tmp_path / f"{family}-{head}")
        jobs.append([str(tmp_path / f"{family}-{head}"), auto, str(tmp_path / f"{family}-{head}.pt")])
    run_isolated(tmp_path, jobs, batch)
    for (family, head), exp in expected.items():
        got = torch.load(tmp_path / f"{family}-{head}.pt")
        assert got["_structprune_modules"] == []
        close(exp, {k: got[k] for k in exp})


def test_training_draws_one_hidden_sample_per_forward_and_trains_the_gates():
    model = sp.patch(tiny_model("bert", "qa"), sampling=True, sublayers=True, hidden=True).train()
    with torch.no_grad():
        hidden_gate(model).log_alpha.fill_(0.0)  # about half the samples at 0 or 1
    seen = []
    for mod in model.modules():
        if isinstance(mod, HiddenGatedLayerNorm):
            mod.register_forward_hook(lambda mod, i, o: seen.append(mod.__dict__["hidden_gate"].current()[0]))
    out = model(**tiny_batch())
    assert len(seen) == 1 + 2 * L and all(torch.equal(s, seen[0]) for s in seen)
    (out.start_logits.square().mean()).backward()
    assert hidden_gate(model).log_alpha.grad is not None and hidden_gate(model).log_alpha.grad.abs().sum() > 0
    sub = model.bert.encoder.layer[0].attention.sublayer_gate
    assert sub.log_alpha.grad is not None
    seen.clear()
    model(**tiny_batch())
    assert not torch.equal(seen[0], seen[-1]) or len(seen) == 1 + 2 * L  # a new forward pass, a new sample


def test_clear_errors():
    from model.test_modernbert import tiny_model as tiny_modernbert

    with pytest.raises(TypeError, match="BERT layout"):
        sp.patch(tiny_modernbert("qa"), sublayers=True)
    with pytest.raises(TypeError, match="projects them"):
        sp.patch(tiny_model("electra", "qa"), hidden=True)
    with pytest.raises(TypeError, match="language-modelling head"):
        sp.patch(tiny_model("bert", "ForMaskedLM"), hidden=True)
    model = sp.patch(tiny_model("bert", "qa"))
    with pytest.raises(ValueError, match="hidden=True"):
        sp.set_masks(model, hidden=torch.ones(D))
    with pytest.raises(ValueError, match="sublayers=True"):
        sp.set_masks(model, attn_sublayers=torch.ones(L))
    model = sp.patch(tiny_model("bert", "qa"), sublayers=True, hidden=True)
    with pytest.raises(ValueError, match="shape"):
        sp.set_masks(model, hidden=torch.ones(D + 1))
    with pytest.raises(ValueError, match="one entry per layer"):
        sp.set_masks(model, ffn_sublayers=torch.ones(L + 1))


def test_unpatch_after_hidden_pruning_and_refusal_with_skipped_sublayers():
    batch = tiny_batch()
    model = sp.patch(tiny_model("bert", "qa"), sublayers=True, hidden=True)
    m = masks()
    sp.set_masks(model, heads=m["heads"], hidden=m["hidden"])
    expected = run(model, batch)
    plain = sp.unpatch(model)
    assert not any(isinstance(mod, HiddenGatedLayerNorm) for mod in plain.modules())
    close(run(plain, batch), expected)
    model = sp.patch(tiny_model("bert", "qa"), sublayers=True)
    sp.set_masks(model, attn_sublayers=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="skip a whole sublayer"):
        sp.unpatch(model)


def test_summary_counts_the_kept_width_and_skipped_sublayers():
    model = sp.patch(tiny_model("bert", "qa"), sublayers=True, hidden=True)
    sp.set_masks(model, **masks())
    report = sp.summary(model)
    width = int(masks()["hidden"].sum())
    assert report.hidden_kept == width and report.skipped == ["attention 1", "ffn 2"]
    assert report.layers[1].heads_kept == 0 and report.layers[2].ffn_kept == 0
    assert f"hidden dimensions kept: {width}/{D}" in str(report)
    compacted = sum(p.numel() for layer in sp.compact(model).bert.encoder.layer for n, p in layer.named_parameters()
                    if "gate" not in n and not (n.startswith("attention.") and layer is model.bert.encoder.layer[1])
                    and not (n.startswith(("intermediate.", "output.")) and layer is model.bert.encoder.layer[2]))
    assert report.total("params") == compacted


def test_bf16_autocast_close_to_fp32_and_trains():
    """Under CPU bf16 autocast (``prune --bf16``) the masked model stays within bf16 rounding of fp32, and an L0
    step with every gate sampling has finite gradients."""
    model = sp.patch(tiny_model("bert", "qa"), sublayers=True, hidden=True)
    sp.set_masks(model, **masks())
    with torch.no_grad():
        fp32 = model(**tiny_batch()).start_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**tiny_batch()).start_logits
    torch.testing.assert_close(bf16.float(), fp32, atol=2e-2, rtol=2e-2)
    model = sp.patch(tiny_model("bert", "qa"), sampling=True, sublayers=True, hidden=True).train()
    with torch.no_grad():
        for gate in sp.iter_gates(model):
            gate.log_alpha.fill_(0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**tiny_batch())
    out.start_logits.float().square().mean().backward()
    assert all(torch.isfinite(g.log_alpha.grad).all() for g in sp.iter_gates(model) if g.log_alpha.grad is not None)
    assert hidden_gate(model).log_alpha.grad is not None
