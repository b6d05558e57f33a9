"""L0 with a latency budget: the Lagrangian on the expected latency through the cost table, its gradient, and the
exact decision meeting the budget."""
import pytest
import torch

import structprune as sp
from structprune.model.gates import expected_l0
from structprune.strategies import L0Controller, PruneTarget
from structprune.strategies.targets import layer_gates
from helpers.models import one_thread_reference_backend, tiny_model  # noqa: F401  (autouse fixture)
from helpers.latency_tables import HEADS, LAYERS, UNITS, counts, synthetic_table


@pytest.fixture
def model():
    return sp.patch(tiny_model(layers=LAYERS, hidden=64, heads=HEADS, ffn=UNITS))


def test_latency_penalty_gradient(model):
    table = synthetic_table(model)
    ctl = L0Controller(model, PruneTarget(speedup=2.0, table=table), warmup_steps=0, init_noise=0.5, seed=1)
    assert ctl.structures == ["latency"]
    with torch.no_grad():
        l1, l2 = ctl.lagrangian.lambdas("latency")
        l1.fill_(1.0)
        l2.fill_(0.0)
    ctl.penalty(0).backward()
    dense = table.dense_ms
    for s, slope in (("heads", lambda n: table.attention(n + 1) - table.attention(n)),
                     ("ffn", lambda n: (table.ffn(72) - table.ffn(48)) / 24)):
        for layer, gate in enumerate(layer_gates(model, s)):
            p = expected_l0(gate.log_alpha.detach())
            n = float(p.sum())
            # d penalty / d log_alpha_i = lambda1 / dense_ms * scale * curve slope at E[count] * p_i (1 - p_i)
            want = table.scale * slope(int(n)) * p * (1 - p) / dense
            assert torch.allclose(gate.log_alpha.grad, want.float(), rtol=1e-4, atol=1e-9), (s, layer)
    lam = ctl.lagrangian.lambdas("latency")[0]
    assert lam.grad is not None and float(lam.grad) < 0  # gradient reversal: ascent on the multiplier when over budget


def test_latency_penalty_pulls_expected_latency_down(model):
    table = synthetic_table(model)
    ctl = L0Controller(model, PruneTarget(speedup=2.0, table=table), warmup_steps=0, seed=0)
    opt = torch.optim.Adam(ctl.param_groups(model, lr=0.0, gate_lr=0.1, lambda_lr=0.5))
    start = float(ctl.expected("latency").detach())
    for step in range(30):
        opt.zero_grad()
        ctl.penalty(step).backward()
        opt.step()
    stats = ctl.stats()
    assert stats["expected_latency_ms"] < 0.8 * start  # no task loss here: only the direction is checked
    assert stats["lambda1_latency"] != 0.0
    masks = ctl.finalize()
    h, u = counts(masks)
    assert table.speedup(h, u) >= 2.0 and ctl.stats()["predicted_speedup"] == pytest.approx(table.speedup(h, u))


def test_latency_budget_stops_the_gates_where_the_expected_latency_meets_it(model):
    table = synthetic_table(model)
    ctl = L0Controller(model, PruneTarget(speedup=2.0, table=table), warmup_steps=0, seed=0)
    opt = torch.optim.Adam(ctl.param_groups(model, lr=0.0, gate_lr=0.1, lambda_lr=0.5))
    budget = float(ctl._final["latency"])
    for step in range(200):
        opt.zero_grad()
        ctl.penalty(step).backward()
        opt.step()
        if ctl.reached_target(step + 1):
            break
    else:
        pytest.fail("the expected latency never came down to the budget")
    expected = float(ctl.expected("latency").detach())
    assert expected <= budget + 0.005 * table.dense_ms  # within the tolerance of the dense model's latency
    gates = layer_gates(model, "heads") + layer_gates(model, "ffn")
    assert not any(g.log_alpha.requires_grad for g in gates)  # one constraint over both structures: all stop
    frozen = [g.log_alpha.detach().clone() for g in gates]
    opt.zero_grad()
    ctl.penalty(step + 1).backward()
    opt.step()
    assert all(torch.equal(a, g.log_alpha) for a, g in zip(frozen, gates))


def test_latency_and_params_per_layer(model):
    table = synthetic_table(model)
    ctl = L0Controller(model, PruneTarget(speedup=1.5, params=0.5, per_layer=True, table=table), seed=0)
    assert ctl.structures == ["latency", "params"]
    assert ctl.expected("latency").shape == (LAYERS,) and ctl.expected("params").shape == (LAYERS,)
    state = ctl.state_dict()
    assert {"latency_lambda1", "params_lambda2"} <= set(state)
    masks = ctl.finalize()
    h, u = counts(masks)
    share = (table.dense_ms / 1.5 - table.empty_ms) / LAYERS
    assert all(table.layer_ms(a, b) <= share + 1e-9 for a, b in zip(h, u))


def test_impossible_latency_target(model):
    table = synthetic_table(model)
    with pytest.raises(ValueError, match="out of reach"):
        L0Controller(model, PruneTarget(speedup=40.0, table=table))


def test_budget_decision_keeps_the_open_gates_and_no_closed_one(model):
    """Gates that ended inside a latency budget: the decision keeps every open head and unit (never closing an
    open head to keep closed FFN units a grid point would round in) and no closed one; outputs unchanged."""
    from structprune.strategies import finalize_l0

    table = synthetic_table(model)
    open_units = 30  # between the table's grid points 24 and 48
    with torch.no_grad():
        for gate in layer_gates(model, "heads"):
            gate.log_alpha.fill_(3.0)
        for gate in layer_gates(model, "ffn"):
            gate.log_alpha.fill_(-6.0)  # closed: deterministic 0, probability of being non-zero ~1%
            gate.log_alpha[:open_units] = 3.0
    alive_ms = table.empty_ms + sum(table.layer_ms(HEADS, open_units) for _ in range(LAYERS))
    model.eval()
    x = {"input_ids": torch.randint(3, 100, (2, 8))}
    with torch.no_grad():
        before = model(**x).start_logits
    masks = finalize_l0(model, PruneTarget(latency_ms=alive_ms * 1.01, table=table))
    assert counts(masks) == ([HEADS] * LAYERS, [open_units] * LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).start_logits, before, atol=1e-5, rtol=1e-4)
