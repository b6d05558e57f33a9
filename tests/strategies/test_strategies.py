"""Pruning strategies: exact target sizes (global / per layer), composition, gain importance, L0 training."""
import copy

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

import structprune as sp
from structprune.model.patching import gated_layers
from structprune.strategies import (L0Controller, PruneTarget, apply_masks, finalize_l0, gain_importance, gain_masks,
                                    random_masks)
from helpers.models import one_thread_reference_backend, qa_batches  # noqa: F401  (autouse fixture)

L, H, I, D, SEQ, VOCAB = 3, 4, 96, 16, 16, 100




def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=H * D, num_attention_heads=H, num_hidden_layers=L,
                     intermediate_size=I, max_position_embeddings=64)
    return sp.patch(BertForQuestionAnswering(cfg))


def check_counts(masks, heads, ffn, per_layer):
    h = masks.heads_per_layer()
    if per_layer:
        assert [int(x.sum()) for x in h] == heads
        assert [int(x.sum()) for x in masks.ffn] == ffn
    else:
        assert masks.num_heads_kept == heads
        assert masks.num_ffn_kept == ffn


def make_masks(name, model, target):
    if name == "random":
        return random_masks(model, target, seed=3)
    if name == "gain":
        return gain_masks(model, qa_batches(2), target)
    if name == "gain_iterative":
        return gain_masks(model, iter(qa_batches(2)), target, steps=3)
    if name == "l0":
        return finalize_l0(model, target)
    raise ValueError(name)


STRATEGIES = ["random", "gain", "gain_iterative", "l0"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("per_layer", [False, True])
def test_strategy_hits_fractions_exactly(strategy, per_layer):
    model = tiny_model()
    if strategy == "l0":  # give the gates distinct log_alpha, as after training
        with torch.no_grad():
            for g in sp.iter_gates(model):
                g.log_alpha.copy_(torch.randn(g.n))
    masks = make_masks(strategy, model, PruneTarget(heads=0.5, ffn=0.3, per_layer=per_layer))
    if per_layer:
        check_counts(masks, [2] * L, [round(0.3 * I)] * L, True)
    else:
        check_counts(masks, round(0.5 * L * H), round(0.3 * L * I), False)
    apply_masks(model, masks)
    got = sp.get_masks(model)
    assert got.num_heads_kept == masks.num_heads_kept and got.num_ffn_kept == masks.num_ffn_kept


@pytest.mark.parametrize("strategy", ["random", "gain"])
def test_counts_and_per_layer_lists(strategy):
    model = tiny_model()
    masks = make_masks(strategy, model, PruneTarget(heads=5, ffn=100))
    check_counts(masks, 5, 100, False)
    masks = make_masks(strategy, model, PruneTarget(heads=[4, 1, 0], ffn=[0.5, 0.25, 1.0]))
    check_counts(masks, [4, 1, 0], [48, 24, 96], True)
    masks = make_masks(strategy, model, PruneTarget(heads=3, ffn=None, per_layer=True))
    check_counts(masks, [3] * L, [I] * L, True)


def test_random_is_seeded_and_global_ranking_varies_layer_sizes():
    model = tiny_model()
    t = PruneTarget(heads=0.5, ffn=0.5)
    a, b = random_masks(model, t, seed=7), random_masks(model, t, seed=7)
    c = random_masks(model, t, seed=8)
    assert torch.equal(a.heads, b.heads) and all(torch.equal(x, y) for x, y in zip(a.ffn, b.ffn))
    assert not all(torch.equal(x, y) for x, y in zip(a.ffn, c.ffn))
    assert len({int(f.sum()) for f in a.ffn}) > 1  # global: layers end with different sizes


@pytest.mark.parametrize("second", ["random", "gain"])
def test_strategies_compose_pruned_stays_pruned(second):
    model = tiny_model()
    first = random_masks(model, PruneTarget(heads=0.75, ffn=0.5), seed=1)
    apply_masks(model, first)
    masks = make_masks(second, model, PruneTarget(heads=0.5, ffn=0.25))
    check_counts(masks, 6, 72, False)
    for new, old in zip(masks.heads_per_layer() + masks.ffn, first.heads_per_layer() + first.ffn):
        assert not bool((new & ~old).any())  # nothing revived
    with pytest.raises(ValueError, match="only"):
        random_masks(model, PruneTarget(heads=1.0, ffn=1.0))  # cannot keep more than what is left


def test_target_validation():
    with pytest.raises(ValueError):
        PruneTarget(heads=1.5)
    with pytest.raises(TypeError):
        PruneTarget(heads=True)
    with pytest.raises(ValueError, match="layers"):
        random_masks(tiny_model(), PruneTarget(heads=[1, 2]))


# ---- gain -----------------------------------------------------------------------------------------

def test_gain_importance_normalised_and_zeroed_head_least_important():
    model = tiny_model()
    layer, head = 1, 2
    with torch.no_grad():  # the head's output columns are zero, so d loss / d gate = 0
        w = gated_layers(model)[layer].attention.output.dense.weight
        w[:, head * D:(head + 1) * D] = 0
    grads_before = [p.grad for p in model.parameters()]
    imp = gain_importance(model, qa_batches(3))
    assert imp.num_batches == 3
    assert all(p.grad is None for p in model.parameters()) and all(g is None for g in grads_before)
    for vecs in (imp.heads, imp.ffn, imp.raw_heads, imp.raw_ffn):
        assert all(bool((v >= 0).all()) for v in vecs)
    for v in imp.heads + imp.ffn:
        assert v.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert imp.heads[layer][head].item() == 0.0
    flat = torch.cat(imp.heads)
    assert int(flat.argmin()) == layer * H + head
    masks = gain_masks(model, qa_batches(3), PruneTarget(heads=11, ffn=None))
    assert not bool(masks.heads[layer, head]) and masks.num_heads_kept == 11
    masks = gain_masks(model, qa_batches(3), PruneTarget(heads=3, ffn=None, per_layer=True))
    assert not bool(masks.heads[layer, head])


def test_gain_leaves_model_state_alone():
    model = tiny_model()
    model.train()
    before = [g.mask.clone() for g in sp.iter_gates(model)]
    gain_masks(model, qa_batches(2), PruneTarget(heads=0.5, ffn=0.5), steps=2)
    assert model.training
    assert all(torch.equal(a, g.mask) for a, g in zip(before, sp.iter_gates(model)))


def test_gain_custom_loss_fn_and_max_batches():
    model = tiny_model()
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        out = m(input_ids=batch["input_ids"])
        return out.start_logits.logsumexp(-1).mean()

    gain_importance(model, qa_batches(4), loss_fn=loss_fn, max_batches=2)
    assert len(calls) == 2


# ---- L0 -------------------------------------------------------------------------------------------

def test_l0_training_moves_toward_target_and_finalize_matches():
    model = tiny_model()
    target = PruneTarget(heads=0.5, ffn=0.5)
    ctl = L0Controller(model, target, warmup_steps=10)
    assert all(g.sampling for g in sp.iter_gates(model))
    assert all(g.is_fully_open() for g in sp.iter_gates(model))  # starts as the unpruned model
    opt = torch.optim.AdamW(ctl.param_groups(model, lr=1e-3, gate_lr=0.1, lambda_lr=0.1))
    assert [g["name"] for g in opt.param_groups] == ["weights", "weights_no_decay", "gates", "lagrangian"]
    fractions = []
    model.train()
    for step, batch in enumerate(qa_batches(30, bs=4, seed=5)):
        loss = model(**batch).loss + ctl.penalty(step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        st = ctl.stats()
        fractions.append(st["expected_heads"] / (L * H))
    st = ctl.stats()
    assert {"expected_heads", "expected_ffn", "kept_heads", "kept_ffn", "heads_sparsity", "ffn_sparsity",
            "target_heads", "lambda1_heads"} <= set(st)
    assert st["target_heads"] == 6.0 and st["target_ffn"] == 144.0
    assert abs(fractions[-1] - 0.5) < abs(fractions[0] - 0.5) - 0.05
    assert fractions[-1] < fractions[len(fractions) // 2] < fractions[0] + 1e-3  # monotone-ish
    assert st["lambda1_heads"] > 0  # ascent: the constraint is violated (e > tau), lambda1 grew

    # deterministic L0 model restricted to the finalize selection == finalized (folded) model
    model.eval()
    x = qa_batches(1, seed=9)[0]
    inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    reference = copy.deepcopy(model)
    masks = ctl.finalize()
    check_counts(masks, 6, 144, False)
    apply_masks(reference, masks)  # same units, fractional gates not folded
    with torch.no_grad():
        ref = reference(**inputs)
        out = model(**inputs)
    torch.testing.assert_close(out.start_logits, ref.start_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.end_logits, ref.end_logits, atol=1e-5, rtol=1e-4)
    assert not any(g.sampling for g in sp.iter_gates(model))
    got = sp.get_masks(model)
    assert got.num_heads_kept == 6 and got.num_ffn_kept == 144
    for g in sp.iter_gates(model):  # kept gates are open; the values live in the weights now
        assert bool((g.deterministic()[g.mask != 0] == 1).all())
    assert float(ctl.penalty(100)) == 0.0
    small = sp.compact(copy.deepcopy(model))  # physical pruning of the finalized model changes nothing
    with torch.no_grad():
        compacted = small(**inputs)
    torch.testing.assert_close(compacted.start_logits, ref.start_logits, atol=1e-5, rtol=1e-4)


def test_l0_reached_target_freezes_each_structure_where_it_arrives():
    """Heads and FFN units arrive at their targets at different steps: each stops there (its gates get no more
    gradient), and the controller says "decide" once both have; the decision then cuts nothing by rank."""
    model = tiny_model()
    ctl = L0Controller(model, PruneTarget(heads=0.5, ffn=0.5), warmup_steps=2)
    from structprune.strategies.targets import layer_gates

    heads, ffn = layer_gates(model, "heads"), layer_gates(model, "ffn")
    assert not ctl.reached_target(5)  # everything open: far from the targets
    with torch.no_grad():
        for g in heads:  # heads at their target (half closed), FFN units not yet
            g.log_alpha[: g.n // 2] = -10.0
    assert not ctl.reached_target(1)  # still in the warm-up: nothing is frozen yet
    assert not ctl.frozen
    assert not ctl.reached_target(2)
    assert ctl.frozen == {("heads", 0)}
    assert not any(g.log_alpha.requires_grad for g in heads) and all(g.log_alpha.requires_grad for g in ffn)
    model.train()
    (model(**qa_batches(1)[0]).loss + ctl.penalty(3)).backward()
    assert all(g.log_alpha.grad is None for g in heads) and any(g.log_alpha.grad is not None for g in ffn)
    assert ctl.stats()["frozen_groups"] == 1.0
    resumed = tiny_model(seed=1)  # as after a crash: a new controller, then the checkpoint's weights
    again = L0Controller(resumed, PruneTarget(heads=0.5, ffn=0.5), warmup_steps=2)
    resumed.load_state_dict(model.state_dict())
    assert not again.reached_target(3) and again.frozen == ctl.frozen  # found again from the resumed gates
    with torch.no_grad():
        for g in ffn:
            g.log_alpha[: g.n // 2] = -10.0
    assert ctl.reached_target(3)
    masks = ctl.finalize()
    check_counts(masks, 6, 144, False)  # exactly what the gates held: no rank cut, no fill
    assert not ctl.frozen and all(g.log_alpha.requires_grad for g in heads + ffn)  # thawed for continued training


def test_finalize_is_exact_when_l0_already_at_target():
    """When the deterministic L0 model already keeps exactly the target, finalize+fold changes nothing."""
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in sp.iter_gates(model):
            la = torch.rand(gate.n, generator=g) * 2 - 1.0  # fractional deterministic values
            la[: gate.n // 2] = -10.0  # closed
            gate.log_alpha.copy_(la)
    kept = sp.get_masks(model)
    inputs = {"input_ids": qa_batches(1)[0]["input_ids"]}
    with torch.no_grad():
        before = model(**inputs)
    masks = finalize_l0(model, PruneTarget(heads=kept.num_heads_kept, ffn=kept.num_ffn_kept))
    assert masks.num_heads_kept == kept.num_heads_kept
    with torch.no_grad():
        after = model(**inputs)
    torch.testing.assert_close(after.start_logits, before.start_logits, atol=1e-5, rtol=1e-4)


def test_l0_per_layer_constraints_and_state_roundtrip(tmp_path):
    model = tiny_model()
    ctl = L0Controller(model, PruneTarget(heads=0.5, ffn=None, per_layer=True), warmup_steps=0)
    assert ctl.lagrangian.heads_lambda1.shape == (L,)
    assert not any(layer.intermediate.unit_gate.sampling for layer in gated_layers(model))
    pen = ctl.penalty(0)
    pen.backward()
    # gradient reversal: dpenalty/dlambda1 = gap > 0, the lambda receives -gap
    assert bool((ctl.lagrangian.heads_lambda1.grad < 0).all())
    with torch.no_grad():
        ctl.lagrangian.heads_lambda1.fill_(0.7)
    ctl.save(tmp_path)
    other = L0Controller(tiny_model(), PruneTarget(heads=0.5, ffn=None, per_layer=True))
    other.load(tmp_path)
    assert torch.equal(other.lagrangian.heads_lambda1, ctl.lagrangian.heads_lambda1)
    masks = ctl.finalize()
    check_counts(masks, [2] * L, [I] * L, True)


@pytest.mark.parametrize("backend", [b for b in sp.available_backends("cpu") if b == "cpp"])
def test_gain_and_fold_agree_on_compiled_backend(backend):
    """Gate-value gradients (gain) and folded gates (L0 finalize) through a compiled CPU backend."""
    model = tiny_model()
    ref = gain_importance(model, qa_batches(2))
    sp.set_backend(backend)
    got = gain_importance(model, qa_batches(2))
    for a, b in zip(ref.heads + ref.ffn, got.heads + got.ffn):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        for g in sp.iter_gates(model):
            g.log_alpha.copy_(torch.randn(g.n))
    model.eval()
    x = {"input_ids": qa_batches(1)[0]["input_ids"]}
    reference = copy.deepcopy(model)
    masks = finalize_l0(model, PruneTarget(heads=0.5, ffn=0.5))
    apply_masks(reference, masks)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).start_logits, reference(**x).start_logits, atol=1e-4, rtol=1e-3)


def test_magnitude_keeps_largest_norms_per_layer():
    from structprune.strategies import magnitude_masks

    model = tiny_model()
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():  # head 2 of layer 1 and FFN unit 5 of layer 1 lose their weights: the least important
        layer.attention.self.value.weight.view(H, D, -1)[2] = 0
        layer.intermediate.dense.weight[5] = 0
    heads, ffn = magnitude_masks(model, 0.75, 0.5)
    assert [int(h.sum()) for h in heads] == [3] * L and [int(f.sum()) for f in ffn] == [I // 2] * L
    assert all(h.dtype == torch.bool and h.shape == (H,) for h in heads)
    assert not heads[1][2] and not ffn[1][5]
    sp.set_masks(model, heads=heads, ffn=ffn)
    assert sp.get_masks(model).num_heads_kept == 3 * L


def test_l0_decision_drops_closed_units_ranked_in():
    """Gates that ended below the target: the units ranked in with a closed gate compute zeros, so the decision
    drops them (same outputs, fewer units); keep_dead=True holds the target count with them zeroed."""
    target = PruneTarget(heads=0.75, ffn=0.75)
    models = []
    for keep_dead in (False, True):
        model = tiny_model().eval()
        with torch.no_grad():
            for gate in sp.iter_gates(model):
                gate.log_alpha.fill_(2.0)
                gate.log_alpha[: gate.n // 2] = -10.0  # half closed: below the 75% target
        x = {"input_ids": qa_batches(1)[0]["input_ids"]}
        with torch.no_grad():
            before = model(**x).start_logits
        masks = finalize_l0(model, target, keep_dead=keep_dead)
        with torch.no_grad():
            torch.testing.assert_close(model(**x).start_logits, before, atol=1e-5, rtol=1e-4)
        models.append((masks, model))
    (dropped, model), (kept, _) = models
    assert dropped.num_heads_kept == L * (H // 2) and dropped.num_ffn_kept == L * (I // 2)
    assert kept.num_heads_kept == round(0.75 * L * H) and kept.num_ffn_kept == round(0.75 * L * I)
    sp.compact(model)
    assert sp.summary(model).total("heads_kept") == L * (H // 2)
