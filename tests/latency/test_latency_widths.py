"""Latency table version 2: hidden widths and skipped sublayers (the grid, the probes at reduced width, the
prediction, version-1 files, the view for planning). No timing is checked here: a fake timer gives the numbers."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import structprune as sp
from structprune.latency import LatencyTable, get_table, hidden_widths, measure_table
from structprune.latency.fits import bilinear, isotonic, isotonic_grid
from structprune.latency.widths import narrow_layer, parse_hidden_grid, skipped_model
from structprune.model.patching import gated_layers
from structprune.strategies import current_masks
from structprune.strategies.plan import Budget, plan_masks
from helpers.latency_tables import (HEADS, HIDDEN, LAYERS, MACHINE, UNITS, WIDTHS, fake_ms, fake_timer,
                                    synthetic_table, synthetic_v2_table)
from helpers.models import one_thread_reference_backend, tiny_batch, tiny_model  # noqa: F401  (autouse fixture)


@pytest.fixture
def model():
    return sp.patch(tiny_model(layers=LAYERS, hidden=HIDDEN, heads=HEADS, ffn=UNITS))


@pytest.fixture
def table(model):
    return synthetic_v2_table(model)


# ---- the grid and the fits --------------------------------------------------------------------------------
def test_hidden_widths_and_their_parsing():
    assert hidden_widths(384) == [96, 192, 288, 384] and hidden_widths(64) == WIDTHS
    assert hidden_widths(384, [0.5, 100, 1.0]) == [100, 192, 384] and hidden_widths(384, [384]) == [384]
    assert parse_hidden_grid("0.25, 96,1.0") == [0.25, 96, 1.0]
    for bad in ([0], [1.5], [385], [0.0], ["96"], [True]):
        with pytest.raises(ValueError, match="width"):
            hidden_widths(384, bad)
    for text in ("a,b", "", "0.5;96"):
        with pytest.raises(ValueError, match="hidden-grid"):
            parse_hidden_grid(text)


def test_isotonic_grid_is_monotone_along_both_axes():
    rows = [[1.0, 3.0, 2.0], [0.5, 4.0, 5.0], [2.0, 2.5, 6.0]]
    fit = isotonic_grid(rows)
    assert all(a <= b for r in fit for a, b in zip(r, r[1:]))
    assert all(fit[i][j] <= fit[i + 1][j] for i in range(2) for j in range(3))
    assert isotonic_grid([[3.0, 2.0, 1.0]]) == [isotonic([3.0, 2.0, 1.0])]
    # bilinear between two widths: halfway in width is the mean of the two rows' interpolations
    xs, grid = [0, 10], [[0.0, 1.0], [2.0, 5.0]]
    assert bilinear(5, xs, grid, 15, [10, 20]) == pytest.approx((0.5 + 3.5) / 2)
    assert bilinear(10, xs, grid, 20, [10, 20]) == 5.0
    with pytest.raises(ValueError, match="hidden width 9 outside"):
        bilinear(5, xs, grid, 9, [10, 20])


# ---- measuring: the fake timer, the probes at reduced width -------------------------------------------------
def test_measure_table_v2_with_fake_timer(model, table):
    measured = measure_table(model, 2, 8, backend="torch", timer=fake_timer, machine_info=MACHINE, ffn_points=4)
    assert measured.hidden_grid == WIDTHS and measured.ffn_grid == table.ffn_grid
    for name in ("attention_ms", "ffn_ms", "empty_ms", "dense_measured_ms", "skipped_measured_ms"):
        assert getattr(measured, name) == pytest.approx(getattr(table, name)), name
    for name in ("narrow_attention_ms", "narrow_ffn_ms"):
        assert all(a == pytest.approx(b) for a, b in zip(getattr(measured, name), getattr(table, name), strict=True))
    assert measured.skipped_measured_ms == pytest.approx([0.3, 0.4, 0.5, 0.6])
    assert measured.narrow_attention_ms[0] == pytest.approx([fake_ms(f"attention/{h}/16") for h in range(HEADS + 1)])


def test_prediction_anchors_on_the_three_whole_model_measurements(table):
    full = [HEADS] * LAYERS, [UNITS] * LAYERS
    zero = [0] * LAYERS, [0] * LAYERS
    off = [False] * LAYERS
    assert table.scale == pytest.approx(1.0) and table.fixed_scale == pytest.approx(0.4 / 0.6)
    assert table.predict(*full) == pytest.approx(25.0) == table.dense_ms
    assert table.predict(*zero) == pytest.approx(1.0) == table.empty_ms
    # the defaults spelled out give the same prediction; everything skipped is the skipped model at each width
    assert table.predict(*full, hidden=HIDDEN, attn_kept=[1] * LAYERS, ffn_kept=[1.0] * LAYERS) == pytest.approx(25.0)
    assert table.predict(*zero, hidden=HIDDEN, attn_kept=[True] * LAYERS, ffn_kept=None) == pytest.approx(1.0)
    for w, skipped in zip(WIDTHS, [0.3, 0.4, 0.5, 0.6]):
        assert table.predict(*full, hidden=w, attn_kept=off, ffn_kept=off) == pytest.approx(skipped)
    assert table.max_speedup == pytest.approx(25.0 / 0.3)
    # by hand at width 32: blocks cost half; one attention sublayer skipped in layer 0
    fs, half = 0.4 / 0.6, 0.5
    attn = [fs * 0.1 * half + (0.1 + h) * half - 0.1 * half for h in (2, 3, 4)]
    ffn = [fs * 0.1 * half + (0.1 + u / 24) * half - 0.1 * half for u in (24, 48, 96)]
    want = 0.4 + attn[1] + attn[2] + sum(ffn)
    got = table.predict([2, 3, 4], [24, 48, 96], hidden=32, attn_kept=[0, 1, 1], ffn_kept=[1, 1, 1])
    assert got == pytest.approx(want)
    assert table.speedup([2, 3, 4], [24, 48, 96], 32, [0, 1, 1], [1, 1, 1]) == pytest.approx(25.0 / want)


def test_prediction_is_differentiable_and_monotone(table):
    heads = torch.tensor([2.5, 3.0, 1.0], requires_grad=True)
    units = torch.tensor([30.0, 96.0, 0.0], requires_grad=True)
    hidden = torch.tensor(40.0, requires_grad=True)
    attn = torch.tensor([1.0, 0.5, 0.2], requires_grad=True)
    ffn = torch.tensor([0.9, 1.0, 0.0], requires_grad=True)
    out = table.predict(heads, units, hidden, attn, ffn)
    out.backward()
    floats = table.predict(heads.tolist(), units.tolist(), 40.0, attn.tolist(), ffn.tolist())
    assert float(out.detach()) == pytest.approx(floats, rel=1e-6)
    for t in (heads, units, hidden, attn, ffn):
        assert torch.isfinite(t.grad).all() and (t.grad >= 0).all()
    assert float(heads.grad[0]) == pytest.approx(float(attn.detach()[0]) * table.scale * (1 / 64 * 40), rel=1e-5)
    assert float(attn.grad[1]) == pytest.approx(float(table.attention_sublayer_ms(3.0, 40.0)), rel=1e-5)
    assert float(hidden.grad) > 0
    wider = table.predict(heads.tolist(), units.tolist(), 48, attn.tolist(), ffn.tolist())
    assert wider > floats  # wider is slower
    with pytest.raises(ValueError, match="probabilities in"):
        table.predict([1] * 3, [0] * 3, attn_kept=[1.5, 1, 1])
    with pytest.raises(ValueError, match="one entry per layer"):
        table.predict([1] * 3, [0] * 3, ffn_kept=[1, 1])
    with pytest.raises(ValueError, match="hidden width 8 outside .*--hidden-grid"):
        table.predict([1] * 3, [0] * 3, hidden=8)


# ---- version 1 --------------------------------------------------------------------------------------------
def test_version_1_tables_are_read_and_predict_full_width_only(model, tmp_path):
    v1 = synthetic_table(model)
    assert v1.hidden_grid == [HIDDEN] and not v1.measures_skipping and v1.max_speedup == pytest.approx(25.0)
    with pytest.raises(ValueError, match="measure it again"):
        v1.predict([1] * 3, [0] * 3, attn_kept=[1, 0, 1])
    with pytest.raises(ValueError, match="measure it again"):
        v1.view(HIDDEN, [True] * 3, [True] * 3)
    data = v1.to_dict()
    data["key"].update(version=1, backend="torch")
    for name in ("hidden_grid", "narrow_attention_ms", "narrow_ffn_ms", "skipped_measured_ms", "derived"):
        data.pop(name)
    path = tmp_path / LatencyTable.from_dict(data).key.filename()
    path.write_text(json.dumps(data))
    old = LatencyTable.load(path)
    assert old.key.version == 1 and old.predict([2] * 3, [48] * 3) == pytest.approx(1.0 + 3 * 4.0)
    # in the cache, a version-1 file is measured again
    calls = []
    table = get_table(model, 2, 8, backend="torch", cache_dir=tmp_path, machine_info=MACHINE, verbose=False,
                      timer=lambda fns: calls.append(1) or fake_timer(fns), ffn_points=4)
    assert calls and table.key.version == 2 and table.measures_skipping
    assert LatencyTable.load(path).measures_skipping


def test_table_v2_json_round_trip_and_checks(model, table, tmp_path):
    back = LatencyTable.load(table.save(tmp_path / "t.json"))
    assert back.to_dict() == table.to_dict() and back.hidden_grid == WIDTHS
    kw = dict(attention_ms=table.attention_ms, ffn_grid=table.ffn_grid, ffn_ms=table.ffn_ms, empty_ms=1.0,
              dense_measured_ms=25.0)
    with pytest.raises(ValueError, match="hidden_grid must increase"):
        LatencyTable(table.key, hidden_grid=[32, 16, 64], **kw)
    with pytest.raises(ValueError, match="one row per width below"):
        LatencyTable(table.key, hidden_grid=[32, 64], narrow_attention_ms=[], narrow_ffn_ms=[], **kw)
    with pytest.raises(ValueError, match="needs skipped_measured_ms"):
        LatencyTable(table.key, hidden_grid=[32, 64], narrow_attention_ms=[table.attention_ms],
                     narrow_ffn_ms=[table.ffn_ms], **kw)


def test_cache_measures_again_for_another_hidden_grid(model, tmp_path):
    calls = []

    def timer(fns):
        calls.append(sorted({n.rsplit("/", 1)[-1] for n in fns if n.startswith("attention/")}, key=int))
        return fake_timer(fns)

    kw = dict(backend="torch", cache_dir=tmp_path, timer=timer, ffn_points=4, verbose=False, machine_info=MACHINE)
    get_table(model, 2, 8, **kw)
    get_table(model, 2, 8, **kw)
    get_table(model, 2, 8, hidden_grid=[0.25, 0.5, 0.75], **kw)   # the same widths: reused
    assert calls == [["16", "32", "48", "64"]]
    table = get_table(model, 2, 8, hidden_grid=[0.5], **kw)
    assert calls[-1] == ["32", "64"] and table.hidden_grid == [32, 64]


# ---- the probes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_narrowed_layer_computes_the_masked_hidden_width(family):
    """A layer sliced to width w on x[..., :w] computes what the full layer's projections compute on x with the
    other hidden dimensions zeroed, followed by a LayerNorm over the w kept dimensions (CoFi's semantics)."""
    model = sp.patch(tiny_model(family, layers=1, hidden=HIDDEN, heads=HEADS, ffn=UNITS))
    full = gated_layers(model)[0]
    parts = sp.family_of(model).parts(full)
    w = 40
    x = torch.randn(2, 6, HIDDEN)
    xm = torch.cat([x[..., :w], torch.zeros(2, 6, HIDDEN - w)], dim=-1)
    narrow = narrow_layer(copy.deepcopy(full), HIDDEN, w)
    assert tuple(sp.family_of(model).parts(narrow)["query"].weight.shape) == (HIDDEN, w)
    norms = [m for m in full.modules() if isinstance(m, torch.nn.LayerNorm)]
    attn_norm, ffn_norm = norms[0], norms[-1]

    def ln(v, norm):
        return F.layer_norm(v[..., :w], (w,), norm.weight[:w], norm.bias[:w], norm.eps)

    with torch.no_grad():
        context = parts["attn_out"](torch.nn.functional.scaled_dot_product_attention(
            *(parts[r](xm).view(2, 6, HEADS, -1).transpose(1, 2) for r in ("query", "key", "value")))
            .transpose(1, 2).reshape(2, 6, HIDDEN))
        want_attn = ln(context + xm, attn_norm)
        ffn_act = F.gelu(parts["ffn_in"](xm))
        want_ffn = ln(parts["ffn_out"](ffn_act) + xm, ffn_norm)
        if family == "bert":
            got_attn = narrow.attention(x[..., :w], None)[0]
            got_ffn = sp.family_of(model).ffn_block(narrow, x[..., :w])
        else:
            got_attn = narrow.sa_layer_norm(narrow.attention(x[..., :w])[0] + x[..., :w])
            got_ffn = sp.family_of(model).ffn_block(narrow, x[..., :w])
    torch.testing.assert_close(got_attn, want_attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_ffn, want_ffn, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "electra", "distilbert"])
def test_skipped_model_is_embeddings_and_head_at_the_width(family):
    model = sp.patch(tiny_model(family, layers=2, hidden=HIDDEN, heads=HEADS, ffn=UNITS))
    batch = tiny_batch(pad_from=None)
    w = 24
    skipped = skipped_model(model, w)
    assert len(sp.family_of(skipped).layers(skipped)) == 0 and len(gated_layers(model)) == 2  # the original is untouched
    with torch.no_grad():
        embeddings = model.base_model.embeddings
        if family == "distilbert":
            raw = embeddings.word_embeddings(batch["input_ids"]) + embeddings.position_embeddings.weight[:11]
        else:
            raw = (embeddings.word_embeddings(batch["input_ids"]) + embeddings.position_embeddings.weight[:11]
                   + embeddings.token_type_embeddings.weight[0])
        norm = embeddings.LayerNorm
        if family == "electra":  # the projection to the hidden size, after the embeddings' own LayerNorm
            hidden = model.base_model.embeddings_project(F.layer_norm(raw, norm.normalized_shape, norm.weight,
                                                                      norm.bias, norm.eps))[..., :w]
        else:
            hidden = F.layer_norm(raw[..., :w], (w,), norm.weight[:w], norm.bias[:w], norm.eps)
        head = model.qa_outputs
        want = hidden @ head.weight[:, :w].T + head.bias
        got = skipped(**batch)
    torch.testing.assert_close(got.start_logits, want[..., 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.end_logits, want[..., 1], atol=1e-5, rtol=1e-5)


# ---- the view --------------------------------------------------------------------------------------------
def test_view_has_the_planning_interface(table):
    attn_kept, ffn_kept = [True, False, True], [True, True, False]
    view = table.view(32, attn_kept, ffn_kept)
    zero = [0] * LAYERS
    assert view.empty_ms == pytest.approx(table.predict(zero, zero, 32, attn_kept, ffn_kept))
    assert view.dense_ms == table.dense_ms and view.max_speedup == pytest.approx(table.dense_ms / view.empty_ms)
    assert view.num_layers == LAYERS and view.num_heads == HEADS and view.intermediate == UNITS
    assert view.ffn_grid == table.ffn_grid and view.key == table.key and view.at == table.at
    assert view.attention(2) == pytest.approx(table.attention(2, 32)) and view.ffn(48) == pytest.approx(1.05)
    h, u = [2, 0, 4], [48, 96, 0]  # the skipped sublayers keep nothing
    assert view.predict(h, u) == pytest.approx(table.predict(h, u, 32, attn_kept, ffn_kept))
    assert view.empty_ms + sum(view.layer_ms(a, b) for a, b in zip(h, u)) == pytest.approx(view.predict(h, u))
    assert view.predict([2, 4, 4], [48, 96, 96]) == pytest.approx(view.predict(h, u))  # skipped: ignored
    assert view.speedup(h, u) == pytest.approx(table.dense_ms / view.predict(h, u))
    assert "hidden width 32 of 64, 2/3 attention and 2/3 FFN sublayers kept" in view.describe()
    for bad in (dict(attn_kept=[True] * 2), dict(ffn_kept=[2, 1, 1]), dict(hidden=32.5), dict(hidden=8)):
        args = dict(hidden=32, attn_kept=attn_kept, ffn_kept=ffn_kept) | bad
        with pytest.raises(ValueError):
            table.view(**args)


@pytest.mark.parametrize("hidden, attn_kept, ffn_kept, speedup", [
    (48, [True, False, True], [True, True, False], 2.0),
    (32, [True] * 3, [False, True, True], 4.0),
    (64, [True] * 3, [True] * 3, 1.5),
])
def test_plan_masks_on_a_view_meets_the_tables_budget(model, table, hidden, attn_kept, ffn_kept, speedup):
    """plan_masks, unchanged, plans heads and units on a view; the table's own prediction with the same width
    and sublayers meets the budget, and no skipped sublayer keeps a head or unit."""
    view = table.view(hidden, attn_kept, ffn_kept)
    budget = table.dense_ms / speedup
    assert view.empty_ms < budget < view.predict([HEADS] * LAYERS, [UNITS] * LAYERS)
    g = torch.Generator().manual_seed(0)
    imp = {"heads": [torch.rand(HEADS, generator=g) for _ in range(LAYERS)],
           "ffn": [torch.rand(UNITS, generator=g) * 0.05 for _ in range(LAYERS)]}
    out = plan_masks(view, imp, view.available(current_masks(model)), Budget(latency_ms=budget), HIDDEN, 16)
    h, u = [int(m.sum()) for m in out["heads"]], [int(m.sum()) for m in out["ffn"]]
    assert table.predict(h, u, hidden, attn_kept, ffn_kept) <= budget + 1e-9
    assert all(n == 0 for n, k in zip(h, attn_kept) if not k) and all(n == 0 for n, k in zip(u, ffn_kept) if not k)
    # tight: one more head in a kept attention sublayer would break the budget
    for layer in (i for i in range(LAYERS) if attn_kept[i] and h[i] < HEADS):
        more = h[:layer] + [h[layer] + 1] + h[layer + 1:]
        assert table.predict(more, u, hidden, attn_kept, ffn_kept) > budget
    with pytest.raises(ValueError, match="out of reach.*hidden width"):
        plan_masks(view, imp, view.available(current_masks(model)), Budget(latency_ms=view.empty_ms * 0.9), HIDDEN, 16)


def test_l0_controller_runs_on_a_view(model, table):
    """The L0 controller's latency Lagrangian, unchanged, reads a view: expected latency at the decided width and
    sublayers, and a final decision that meets the target by the table's own prediction."""
    from structprune.strategies import L0Controller, PruneTarget

    attn_kept, ffn_kept = [True, True, False], [True, False, True]
    view = table.view(48, attn_kept, ffn_kept)
    ctl = L0Controller(model, PruneTarget(speedup=2.5, table=view), warmup_steps=0, seed=0)
    opt = torch.optim.Adam(ctl.param_groups(model, lr=0.0, gate_lr=0.1, lambda_lr=0.5))
    for step in range(20):
        opt.zero_grad()
        ctl.penalty(step).backward()
        opt.step()
    assert ctl.stats()["expected_latency_ms"] < view.predict([HEADS] * LAYERS, [UNITS] * LAYERS)
    masks = ctl.finalize()
    h = [int(m.sum()) for m in masks.heads_per_layer()]
    u = [int(m.sum()) for m in masks.ffn]
    assert table.speedup(h, u, 48, attn_kept, ffn_kept) >= 2.5


def test_narrow_model_and_checking_predictions_at_a_width(model):
    """A whole model sliced to a width keeps every layer (each sliced as the probes are); check_predictions times
    such models beside the table's prediction (a real run on the reference backend, one round)."""
    from structprune.latency import check_predictions
    from structprune.latency.cost_model import compare_timer
    from structprune.latency.widths import narrow_model

    batch = tiny_batch(pad_from=None)
    with torch.no_grad():
        torch.testing.assert_close(narrow_model(model, HIDDEN)(**batch).start_logits, model(**batch).start_logits)
        narrow = narrow_model(model, 24)
        out = narrow(**batch, output_hidden_states=True)
    assert len(gated_layers(narrow)) == LAYERS and out.start_logits.shape == (3, 11)
    assert all(h.shape[-1] == 24 for h in out.hidden_states)
    table = synthetic_v2_table(model)
    rows = check_predictions(model, table, [([2] * 3, [48] * 3), ([4] * 3, [96] * 3, 32)], timer=compare_timer(0, 1))
    assert [r["hidden"] for r in rows] == [HIDDEN, 32]
    assert rows[1]["predicted_ms"] == pytest.approx(table.predict([4] * 3, [96] * 3, 32))
    assert all(r["measured_ms"] > 0 and r["measured_speedup"] > 0 for r in rows)
