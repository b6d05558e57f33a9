"""Strategies on decoders with grouped-query attention (tiny random Llama and Qwen3): query heads, whole KV groups
and GLU units; exact counts, KV groups ranked by the sum of their heads' importances, compaction removing the
pruned KV heads, and the L0 constraint on the expected KV heads kept."""
import pytest
import torch

import structprune as sp
from helpers.decoders import H, I, KV, L, VOCAB, left_padded, outputs, tiny_model
from helpers import models as _models
from structprune.strategies import L0Controller, PruneTarget, apply_masks, finalize_l0, gain_masks, random_masks
from structprune.strategies.groups import expected_kv
from structprune.strategies.targets import select_groups

one_thread_reference_backend = _models.one_thread_reference_backend  # the autouse fixture: reference ops, one thread


def lm_batches(n=2, b=3, s=10, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (b, s), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long), "labels": ids.clone()})
    return out


def decide(strategy, model, target):
    if strategy == "random":
        return random_masks(model, target, seed=1)
    if strategy == "gain":
        return gain_masks(model, lm_batches(), target)
    if strategy == "gain_iterative":
        return gain_masks(model, lm_batches(), target, steps=2)
    with torch.no_grad():  # l0: distinct log_alpha, as after training, all gates open
        for g in sp.iter_gates(model):
            g.log_alpha.copy_(3.0 + torch.rand(g.n, generator=torch.Generator().manual_seed(g.n)))
    return finalize_l0(model, target, fold=False)


def kept(rows):
    return [int(r.sum()) for r in rows]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("strategy", ["random", "gain", "gain_iterative", "l0"])
def test_kv_group_targets_hit_the_counts_and_compaction_removes_them(family, strategy):
    model = sp.patch(tiny_model(family))
    masks = decide(strategy, model, PruneTarget(kv_heads=0.5, ffn=0.5))
    groups = H // KV
    assert int(masks.kv_heads.sum()) == L * KV // 2 and masks.num_heads_kept == groups * L * KV // 2
    assert masks.num_ffn_kept == round(0.5 * L * I)
    for heads, kv in zip(masks.heads, masks.kv_heads):  # whole groups: a kept group keeps all its query heads
        assert torch.equal(heads, kv.repeat_interleave(groups))
    apply_masks(model, masks)
    inputs = left_padded()
    want = outputs(model, inputs)
    sp.compact(model)
    assert [layer.self_attn.num_kv_heads for layer in model.model.layers] == kept(masks.kv_heads)
    assert [layer.self_attn.num_heads for layer in model.model.layers] == kept(masks.heads)
    torch.testing.assert_close(outputs(model, inputs), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["random", "gain", "l0"])
def test_kv_groups_and_heads_per_layer(strategy):
    """Two KV groups and three query heads per layer: the third head goes to one of the two kept groups."""
    model = sp.patch(tiny_model("llama"))
    masks = decide(strategy, model, PruneTarget(kv_heads=2, heads=3, ffn=[10, 0, 48], per_layer=True))
    assert kept(masks.kv_heads) == [2] * L and kept(masks.heads) == [3] * L and kept(masks.ffn) == [10, 0, 48]
    apply_masks(model, masks)
    assert torch.equal(sp.get_masks(model).kv_heads, masks.kv_heads)


def test_query_head_targets_on_decoders_report_kv_heads():
    model = sp.patch(tiny_model("qwen3"))
    masks = random_masks(model, PruneTarget(heads=0.25, ffn=None), seed=0)
    assert masks.num_heads_kept == L * H // 4 and masks.num_ffn_kept == L * I
    apply_masks(model, masks)
    assert torch.equal(sp.get_masks(model).kv_heads, masks.kv_heads)


def test_group_importance_is_the_sum_of_its_heads():
    """Group 0 holds the single best head, group 1 the best sum: group 1 is kept; pruned heads count nothing; then
    the heads are ranked within the kept groups, each keeping its best."""
    scores = [torch.tensor([9.0, 0.0, 5.0, 5.0, 1.0, 1.0])]
    kv_index, available = [torch.tensor([0, 0, 1, 1, 2, 2])], [torch.ones(6, dtype=torch.bool)]
    heads, kv = select_groups(scores, available, kv_index, [3], 1, None)
    assert kv[0].tolist() == [False, True, False] and heads[0].tolist() == [False, False, True, True, False, False]
    available[0][3] = False  # group 1 now sums to 5 < 9
    heads, kv = select_groups(scores, available, kv_index, [3], 1, None)
    assert kv[0].tolist() == [True, False, False]
    heads, kv = select_groups(scores, [torch.ones(6, dtype=torch.bool)], kv_index, [3], 2, 3)
    assert kv[0].tolist() == [True, True, False] and heads[0].tolist() == [True, False, True, True, False, False]
    heads, kv = select_groups([torch.tensor([9.0, 8.0, 7.0, 0.0, 1.0, 1.0])], [torch.ones(6, dtype=torch.bool)],
                              kv_index, [3], 2, 2)  # the second head of group 0 yields to group 1's best
    assert heads[0].tolist() == [True, False, True, False, False, False]
    with pytest.raises(ValueError, match="every kept KV group needs"):
        select_groups(scores, [torch.ones(6, dtype=torch.bool)], kv_index, [3], 3, 2)


def test_expected_kv_heads():
    index = torch.tensor([0, 0, 1, 1])
    p = torch.tensor([0.5, 0.5, 1.0, 0.0], requires_grad=True)
    value = expected_kv(p, index, 2)
    torch.testing.assert_close(value, torch.tensor(1.75))  # (1 - 0.25) + (1 - 0)
    value.backward()  # the gradient of the groups' mean probabilities
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5))
    draws = torch.rand(20000, 4) < p.detach()
    monte_carlo = torch.zeros(20000, 2).index_add_(1, index, draws.float()).gt(0).sum(1).float().mean()
    assert abs(float(monte_carlo) - 1.75) < 0.02


def test_l0_trains_toward_a_kv_group_target():
    """The kv_heads constraint drives the expected KV heads down the warm-up; finalize keeps exactly the target."""
    model = sp.patch(tiny_model("llama")).train()
    ctl = L0Controller(model, PruneTarget(kv_heads=0.5, ffn=0.5), warmup_steps=8, init_log_alpha=0.5)
    assert set(ctl.structures) == {"kv_heads", "ffn"}
    start = float(ctl.expected("kv_heads").detach())
    assert 0.9 * L * KV < start < L * KV
    opt = torch.optim.AdamW(ctl.param_groups(model, lr=1e-3, gate_lr=0.2, lambda_lr=0.5))
    torch.manual_seed(0)
    for step, batch in enumerate(lm_batches(n=16)):
        loss = model(**batch).loss + ctl.penalty(step)
        loss.backward()
        opt.step()
        opt.zero_grad()
    stats = ctl.stats()
    assert stats["expected_kv_heads"] < start - 1 and stats["target_kv_heads"] == L * KV // 2
    masks = ctl.finalize(keep_dead=True)
    assert int(masks.kv_heads.sum()) == L * KV // 2 and masks.num_heads_kept == L * H // 2
    assert masks.num_ffn_kept == round(0.5 * L * I)


def test_kv_target_needs_grouped_attention_and_counts():
    from helpers.models import tiny_model as tiny_encoder

    with pytest.raises(TypeError, match="grouped-query attention"):
        random_masks(sp.patch(tiny_encoder("bert")), PruneTarget(kv_heads=0.5))
    with pytest.raises(ValueError, match="kv_heads"):
        PruneTarget(kv_heads=0.5, params=0.5)
    with pytest.raises(ValueError, match="fraction kept must be in"):
        PruneTarget(kv_heads=1.5)


def _gated_params(model) -> int:
    """Parameters of every layer's q/k/v/o and gate/up/down projections (what heads, KV heads and units hold)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return sum(p.numel() for n, p in model.named_parameters() if any(f".{k}." in n for k in names))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_unit_params_are_what_compaction_removes(family):
    """A query head, a KV head and a GLU unit carry what compaction takes away (Qwen2: with the q/k/v biases)."""
    from structprune.strategies.plan import model_unit_params

    model = sp.patch(tiny_model(family))
    unit = model_unit_params(model)
    dense = _gated_params(model)
    heads = torch.ones(L, H, dtype=torch.bool)
    heads[0, [0, 1, 5]] = False  # KV head 0 of layer 0 goes, and one more query head
    ffn = [torch.arange(I) >= 7, torch.ones(I, dtype=torch.bool), torch.ones(I, dtype=torch.bool)]
    sp.set_masks(model, heads=heads, ffn=ffn)
    sp.compact(model)
    assert dense - _gated_params(model) == 3 * unit["heads"] + unit["kv_heads"] + 7 * unit["ffn"]
    assert unit["heads"] == 2 * 64 * 8 + (8 if family == "qwen2" else 0)


@pytest.mark.parametrize("strategy", ["random", "gain", "l0"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_parameter_budget_on_decoders(strategy, per_layer):
    """A parameter budget counts the KV heads the kept query heads read: the compacted model holds at most the
    budget, and no unit more would fit."""
    from structprune.strategies.plan import model_unit_params

    model = sp.patch(tiny_model("qwen2"))
    unit = model_unit_params(model)
    dense = _gated_params(model)
    masks = decide(strategy, model, PruneTarget(params=0.4, per_layer=per_layer))
    apply_masks(model, masks)
    sp.compact(model)
    kept = _gated_params(model)
    assert 0.4 * dense - unit["heads"] - unit["kv_heads"] - unit["ffn"] < kept <= 0.4 * dense


def test_l0_parameter_lagrangian_counts_kv_heads():
    """The expected parameters start at the dense count (KV heads included) and fall under the Lagrangian; the
    decision meets the budget."""
    from structprune.strategies.plan import model_unit_params

    model = sp.patch(tiny_model("llama")).train()
    dense = _gated_params(model)
    ctl = L0Controller(model, PruneTarget(params=0.5), warmup_steps=4, init_log_alpha=0.5)
    assert ctl.structures == ["params"]
    with torch.no_grad():
        for g in sp.iter_gates(model):
            g.log_alpha.fill_(20.0)  # every gate surely on: the expectation is the dense count
        assert float(ctl.expected("params")) == pytest.approx(dense, rel=1e-4)
        for g in sp.iter_gates(model):
            g.log_alpha.fill_(0.5)
    start = float(ctl.expected("params").detach())
    opt = torch.optim.AdamW(ctl.param_groups(model, lr=1e-3, gate_lr=0.2, lambda_lr=0.5))
    for step, batch in enumerate(lm_batches(n=10)):
        (model(**batch).loss + ctl.penalty(step)).backward()
        opt.step()
        opt.zero_grad()
    assert float(ctl.expected("params").detach()) < start - 0.02 * dense
    ctl.finalize(keep_dead=True)
    sp.compact(model.eval())
    unit = model_unit_params(model)
    assert 0.5 * dense - unit["heads"] - unit["kv_heads"] - unit["ffn"] < _gated_params(model) <= 0.5 * dense


def test_a_latency_table_of_another_kv_grouping_is_refused():
    """Speed targets on decoders: tests/latency/test_latency_decoders.py; a table must be the model's shape."""
    from structprune.latency import measure_table

    def timer(fns):
        return {name: [1e-3 * (1 + ("dense" in name))] for name in fns}

    other = measure_table(sp.patch(tiny_model("llama", num_key_value_heads=2)), 1, 8, backend="torch", timer=timer,
                          ffn_points=2)
    with pytest.raises(ValueError, match="kv_heads"):
        random_masks(sp.patch(tiny_model("llama")), PruneTarget(speedup=1.2, table=other))
