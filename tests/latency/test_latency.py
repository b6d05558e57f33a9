"""Latency cost table (structprune.latency): building with an injected timer, interpolation, the JSON cache,
and the strategies meeting speed / latency / parameter budgets on a synthetic table. No timing here."""
import json

import pytest
import torch

import structprune as sp
from structprune.latency import (LatencyTable, get_table, interpolate, isotonic, measure_table, model_key,
                                 table_key)
from structprune.strategies.plan import Budget, plan_masks, unit_params
from structprune.strategies import PruneTarget, current_masks, gain_masks, random_masks
from structprune.strategies.targets import parse_at
from helpers.latency_tables import HEADS, LAYERS, MACHINE, UNITS, counts, fake_timer, synthetic_table
from helpers.models import one_thread_reference_backend, qa_batches, tiny_model  # noqa: F401  (autouse fixture)



@pytest.fixture
def model():
    return sp.patch(tiny_model(layers=LAYERS, hidden=64, heads=HEADS, ffn=UNITS))


# ---- the table ------------------------------------------------------------------------------------------
def test_isotonic_and_interpolation():
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    xs, ys = [0, 10, 30], [1.0, 2.0, 4.0]
    assert interpolate(0, xs, ys) == 1.0 and interpolate(30, xs, ys) == 4.0
    assert interpolate(5, xs, ys) == pytest.approx(1.5) and interpolate(20.0, xs, ys) == pytest.approx(3.0)
    t = torch.tensor([5.0, 20.0], requires_grad=True)
    y = interpolate(t, xs, ys)
    assert torch.allclose(y, torch.tensor([1.5, 3.0], dtype=y.dtype))
    y.sum().backward()
    assert torch.allclose(t.grad, torch.tensor([0.1, 0.1]))  # the slopes of the two segments
    with pytest.raises(ValueError, match="outside"):
        interpolate(31, xs, ys)


def test_measure_table_with_injected_timer(model):
    table = measure_table(model, 2, 8, backend="torch", timer=fake_timer, machine_info=MACHINE, ffn_points=4)
    assert table.ffn_grid == [0, 24, 48, 72, 96]
    assert table.attention_ms == pytest.approx([0.1, 1.1, 2.1, 3.1, 4.1])
    assert table.ffn_ms == pytest.approx([0.1, 1.1, 2.1, 3.1, 4.1])
    assert table.empty_ms == pytest.approx(1.0) and table.dense_measured_ms == pytest.approx(25.0)
    # the blocks sum to 8 ms per layer at full size, exactly what the end-to-end difference says
    assert table.scale == pytest.approx(1.0)
    assert table.dense_ms == pytest.approx(25.0)
    assert table.predict([2] * 3, [48] * 3) == pytest.approx(1.0 + 3 * 4.0)
    assert table.predict([0] * 3, [0] * 3) == pytest.approx(1.0)
    assert table.max_speedup == pytest.approx(25.0 / 0.3)  # every sublayer skipped at width 16: 0.2 + 0.1 ms
    assert table.key.machine == MACHINE and table.key.threads == 1 and table.key.backend == "torch"
    assert sp.get_backend() == "torch"  # restored


def test_measure_table_probes_compacted_blocks(model):
    """The real probes run (on the reference backend) and give one finite median each."""
    from structprune.latency.cost_model import compare_timer

    table = measure_table(model, 2, 8, backend="torch", timer=compare_timer(0, 1), machine_info=MACHINE, ffn_points=2)
    assert len(table.attention_ms) == HEADS + 1 and table.ffn_grid == [0, 48, 96]
    assert all(v > 0 for v in table.attention_ms + table.ffn_ms + [table.empty_ms, table.dense_measured_ms])
    assert table.hidden_grid == [16, 32, 48, 64] and len(table.narrow_attention_ms) == len(table.narrow_ffn_ms) == 3
    assert all(v > 0 for row in table.narrow_attention_ms + table.narrow_ffn_ms for v in row)
    assert len(table.skipped_measured_ms) == 4 and all(v > 0 for v in table.skipped_measured_ms)


def test_scale_corrects_blocks_to_the_measured_dense(model):
    table = synthetic_table(model)
    table.dense_measured_ms = 1.0 + LAYERS * 8.0 * 1.5
    assert table.scale == pytest.approx(1.5)
    assert table.dense_ms == pytest.approx(table.dense_measured_ms)


def test_table_checks_its_shape(model):
    key = table_key(model, 2, 8, "cpp", threads=1, machine_info=MACHINE)
    with pytest.raises(ValueError, match="one entry per kept-head count"):
        LatencyTable(key, attention_ms=[1.0] * HEADS, ffn_grid=[0, UNITS], ffn_ms=[1.0, 2.0], empty_ms=1,
                     dense_measured_ms=2)
    with pytest.raises(ValueError, match="ffn_grid"):
        LatencyTable(key, attention_ms=[1.0] * (HEADS + 1), ffn_grid=[0, 50], ffn_ms=[1.0, 2.0], empty_ms=1,
                     dense_measured_ms=2)
    with pytest.raises(ValueError, match="backend"):
        table_key(model, 2, 8, "nope")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        table_key(model, 2, 10_000)


def test_json_round_trip(model, tmp_path):
    table = synthetic_table(model)
    path = table.save(tmp_path / "t.json")
    back = LatencyTable.load(path)
    assert back.key == table.key and back.to_dict() == table.to_dict()
    data = json.loads(path.read_text())
    data["key"]["version"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version"):
        LatencyTable.load(path)


def test_cache_is_reused_and_invalidated(model, tmp_path):
    calls = []

    def timer(fns):
        calls.append(len(fns))
        return fake_timer(fns)

    kw = dict(backend="torch", cache_dir=tmp_path, timer=timer, ffn_points=4, verbose=False)
    first = get_table(model, 2, 8, machine_info=MACHINE, **kw)
    assert len(calls) == 1 and len(list(tmp_path.iterdir())) == 1
    again = get_table(model, 2, 8, machine_info=MACHINE, **kw)
    assert len(calls) == 1 and again.to_dict() == first.to_dict()          # reused
    get_table(model, 2, 8, machine_info=MACHINE, refresh=True, **kw)
    assert len(calls) == 2                                                  # --refresh
    other = get_table(model, 2, 8, machine_info={**MACHINE, "cpu": "another cpu"}, **kw)
    assert len(calls) == 3 and other.key.machine["cpu"] == "another cpu"   # machine changed: measured again
    get_table(model, 4, 8, machine_info=MACHINE, **kw)
    assert len(calls) == 4                                                  # shape changed: another table
    assert len(list(tmp_path.glob("*.json"))) == 2


# ---- targets ------------------------------------------------------------------------------------------
def test_target_validation(model):
    table = synthetic_table(model)
    with pytest.raises(ValueError, match=">= 1"):
        PruneTarget(speedup=0.5, at=(2, 8))
    with pytest.raises(ValueError, match="not both"):
        PruneTarget(speedup=2.0, latency_ms=3.0, at=(2, 8))
    with pytest.raises(ValueError, match="at=\\(batch, seq_len\\)"):
        PruneTarget(speedup=2.0)
    with pytest.raises(ValueError, match="measured at"):
        PruneTarget(speedup=2.0, at=(8, 128), table=table)
    with pytest.raises(ValueError, match="> 0"):
        PruneTarget(latency_ms=0.0, at=(2, 8))
    with pytest.raises(ValueError, match="fraction"):
        PruneTarget(params=1.5)
    assert parse_at("8x128") == (8, 128) and parse_at("32X192") == (32, 192)
    with pytest.raises(ValueError, match="BATCHxSEQ_LEN"):
        parse_at("8-128")


@pytest.mark.parametrize("strategy", ["random", "gain", "gain_iterative"])
@pytest.mark.parametrize("speedup", [1.0, 1.7, 2.0, 3.0, 8.0])
def test_strategies_meet_a_speedup(model, strategy, speedup):
    table = synthetic_table(model)
    target = PruneTarget(speedup=speedup, table=table)
    masks = make(strategy, model, target)
    h, u = counts(masks)
    got = table.speedup(h, u)
    assert got >= speedup * (1 - 1e-9)
    assert all(n in table.ffn_grid for n in u)  # FFN counts where the table was measured
    # the add-back pass leaves no head or grid step of FFN units that could still be kept: the plan is tight
    slack = [table.speedup(h[:l] + [h[l] + 1] + h[l + 1:], u) for l in range(LAYERS) if h[l] < HEADS]
    slack += [table.speedup(h, u[:l] + [u[l] + 24] + u[l + 1:]) for l in range(LAYERS) if u[l] < UNITS]
    assert all(s < speedup * (1 - 1e-12) for s in slack)


def make(strategy, model, target):

    if strategy == "random":
        return random_masks(model, target, seed=3)
    if strategy == "gain":
        return gain_masks(model, qa_batches(2), target)
    return gain_masks(model, iter(qa_batches(2)), target, steps=3)


def test_latency_ms_target_and_per_layer_budget(model):
    table = synthetic_table(model)
    masks = random_masks(model, PruneTarget(latency_ms=10.0, table=table), seed=0)
    assert table.predict(*counts(masks)) <= 10.0 + 1e-9
    masks = random_masks(model, PruneTarget(speedup=2.0, table=table, per_layer=True), seed=0)
    h, u = counts(masks)
    share = (table.dense_ms / 2.0 - table.empty_ms) / LAYERS
    assert all(table.layer_ms(a, b) <= share + 1e-9 for a, b in zip(h, u))


def test_mixed_target_speed_and_params(model):
    table = synthetic_table(model)
    unit = unit_params(64, 16)
    total = LAYERS * (HEADS * unit["heads"] + UNITS * unit["ffn"])
    masks = random_masks(model, PruneTarget(speedup=1.5, params=0.3, table=table), seed=0)
    h, u = counts(masks)
    assert table.speedup(h, u) >= 1.5
    assert sum(h) * unit["heads"] + sum(u) * unit["ffn"] <= 0.3 * total
    masks = random_masks(model, PruneTarget(speedup=1.5, heads=0.25, table=table), seed=0)  # heads as a cap
    assert sum(counts(masks)[0]) <= 3


def test_ffn_counts_off_grid_when_asked(model):
    table = synthetic_table(model)
    imp = {"heads": [torch.full((HEADS,), 100.0)] * LAYERS, "ffn": [torch.rand(UNITS)] * LAYERS}
    out = plan_masks(table, imp, current_masks(model), Budget(latency_ms=table.dense_ms / 1.3), 64, 16,
                     ffn_on_grid=False)
    units = [int(m.sum()) for m in out["ffn"]]
    assert any(u not in table.ffn_grid for u in units)
    assert table.predict([HEADS] * LAYERS, units) <= table.dense_ms / 1.3 + 1e-9


def test_ffn_counts_on_multiples_when_asked(model):
    """``multiple_of``: every layer's FFN count a multiple of it, off the grid too; a layer whose available units are
    not one starts at the largest multiple below them (here 13 units pruned already: 83 -> 80)."""
    table = synthetic_table(model)
    imp = {"heads": [torch.full((HEADS,), 100.0)] * LAYERS, "ffn": [torch.rand(UNITS)] * LAYERS}
    avail = current_masks(model)
    avail["ffn"][1] = avail["ffn"][1].clone()
    avail["ffn"][1][:13] = False
    for budget in (table.dense_ms / 1.01, table.dense_ms / 1.3):
        free = plan_masks(table, imp, avail, Budget(latency_ms=budget), 64, 16, ffn_on_grid=False)
        out = plan_masks(table, imp, avail, Budget(latency_ms=budget), 64, 16, ffn_on_grid=False, multiple_of=8)
        units = [int(m.sum()) for m in out["ffn"]]
        assert all(u % 8 == 0 for u in units), units
        assert any(int(m.sum()) % 8 for m in free["ffn"])  # the same plan without it is not aligned
        assert units[1] <= 80 and not (out["ffn"][1] & ~avail["ffn"][1]).any()
        assert table.predict([int(h.sum()) for h in out["heads"]], units) <= budget + 1e-9


def test_cheapest_importance_goes_first(model):
    """With every head far more important per ms than FFN units, the plan removes FFN units only."""
    table = synthetic_table(model)
    imp = {"heads": [torch.full((HEADS,), 100.0)] * LAYERS, "ffn": [torch.rand(UNITS) * 0.01] * LAYERS}
    avail = current_masks(model)
    out = plan_masks(table, imp, avail, Budget(latency_ms=table.dense_ms / 1.5), 64, 16)
    assert [int(m.sum()) for m in out["heads"]] == [HEADS] * LAYERS
    kept = out["ffn"][0]
    # within a layer the kept units are the most important ones
    assert imp["ffn"][0][kept].min() >= imp["ffn"][0][~kept].max()


def test_pruned_units_stay_pruned(model):
    table = synthetic_table(model)
    sp.set_masks(model, heads=torch.tensor([[1, 0, 1, 1]] * LAYERS))
    masks = random_masks(model, PruneTarget(speedup=2.0, table=table), seed=0)
    assert not any(bool(h[1]) for h in masks.heads_per_layer())


def test_impossible_targets(model):
    table = synthetic_table(model)
    with pytest.raises(ValueError, match="out of reach.*25.00x"):
        random_masks(model, PruneTarget(speedup=30.0, table=table))
    with pytest.raises(ValueError, match="out of reach"):
        random_masks(model, PruneTarget(latency_ms=0.5, table=table))
    other = sp.patch(tiny_model(layers=2, hidden=64, heads=HEADS, ffn=UNITS))
    with pytest.raises(ValueError, match="measured for"):
        random_masks(other, PruneTarget(speedup=2.0, table=table))


def test_model_key_ignores_compaction(model):
    key = model_key(model)
    sp.set_masks(model, heads=torch.tensor([[1, 0, 0, 0]] * LAYERS))
    sp.compact(model)
    assert model_key(model) == key and key["heads"] == HEADS


def test_summary_shows_predicted_and_measured_latency(model):
    key = table_key(model, 2, 8, "torch", threads=1, machine_info=MACHINE)
    table = LatencyTable(key, attention_ms=[0.1 + h for h in range(HEADS + 1)], ffn_grid=[0, 24, 48, 72, 96],
                         ffn_ms=[0.1, 1.1, 2.1, 3.1, 4.1], empty_ms=1.0, dense_measured_ms=1.0 + LAYERS * 8.0)
    sp.set_masks(model, heads=torch.tensor([[1, 1, 0, 0]] * LAYERS), ffn=[torch.arange(UNITS) < 48] * LAYERS)
    report = sp.summary(model, latency=table)
    assert report.latency["predicted_ms"] == pytest.approx(1.0 + LAYERS * 4.0)
    assert report.latency["predicted_speedup"] == pytest.approx(25.0 / 13.0)
    assert "measured_ms" not in report.latency and "predicted" in str(report)
    report = sp.summary(sp.compact(model), latency=table, measure=True, repeats=1)
    assert report.latency["measured_ms"] > 0 and report.latency["measured_speedup"] > 0
    assert "measured" in str(report)
    assert sp.summary(model).latency is None
