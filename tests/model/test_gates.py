import math

import pytest
import torch

from structprune.model.gates import HardConcreteGate, deterministic_gate, expected_l0
from structprune.ops.reference import BETA, GAMMA, ZETA, hard_concrete_from_uniform


def test_initialised_fully_open():
    gate = HardConcreteGate(7)
    assert torch.equal(gate.eval()(), torch.ones(7))
    assert gate.is_fully_open()
    assert torch.equal(gate.kept_index(), torch.arange(7))


def test_samples_in_training_deterministic_in_eval():
    gate = HardConcreteGate(2000, init_log_alpha=0.0)
    gate.train()
    a, b = gate(), gate()
    assert not torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a == 0).any() and (a == 1).any() and ((a > 0) & (a < 1)).any()  # stretched and clamped
    gate.eval()
    assert torch.equal(gate(), gate())
    assert torch.allclose(gate(), torch.full((2000,), 0.5))  # sigmoid(0) * 1.2 - 0.1


def test_sampling_off_is_deterministic_in_training():
    gate = HardConcreteGate(5, sampling=False, init_log_alpha=0.0).train()
    assert torch.equal(gate(), deterministic_gate(gate.log_alpha.detach()))


def test_sample_distribution_matches_expected_l0():
    log_alpha = torch.tensor([-2.0, 0.0, 1.5])
    u = torch.rand(200_000, 3).clamp(1e-6, 1 - 1e-6)
    z = hard_concrete_from_uniform(log_alpha, u)
    nonzero = (z > 0).float().mean(0)
    assert torch.allclose(nonzero, expected_l0(log_alpha), atol=5e-3)
    # closed form: P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))
    assert math.isclose(expected_l0(torch.tensor(0.0)).item(),
                        1 / (1 + math.exp(BETA * math.log(-GAMMA / ZETA))), rel_tol=1e-6)


def test_gradient_flows_to_log_alpha_and_is_zero_where_clamped():
    log_alpha = torch.zeros(4, requires_grad=True)
    u = torch.tensor([1e-4, 0.3, 0.7, 1 - 1e-4])
    z = hard_concrete_from_uniform(log_alpha, u)
    z.sum().backward()
    assert z[0] == 0 and z[3] == 1
    assert log_alpha.grad[0] == 0 and log_alpha.grad[3] == 0
    assert (log_alpha.grad[1:3] > 0).all()


def test_mask_zeroes_gates_and_expected_l0_counts_unmasked():
    gate = HardConcreteGate(4).eval()
    gate.set_mask(torch.tensor([1, 0, 1, 0]))
    assert torch.equal(gate(), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(gate.kept_index(), torch.tensor([0, 2]))
    assert gate.expected_l0().item() == pytest.approx(2 * expected_l0(torch.tensor(3.0)).item())


def test_kept_index_cache_follows_log_alpha_updates():
    gate = HardConcreteGate(3).eval()
    assert gate.kept_index().tolist() == [0, 1, 2]
    with torch.no_grad():
        gate.log_alpha[1] = -10.0  # deterministic gate clamps to 0
    assert gate.kept_index().tolist() == [0, 2]


def test_deterministic_values_cache_follows_updates_and_never_holds_a_gradient():
    """Without a gradient the eval-time values are computed once and reused, until the mask or log_alpha change
    (in place, or replaced by loading or compaction); with a gradient they are computed each time, in the graph."""
    gate = HardConcreteGate(4).eval()
    with torch.no_grad():
        first = gate()
        assert gate() is first
        gate.log_alpha[1] = -10.0
        assert gate().tolist() == [1.0, 0.0, 1.0, 1.0]
        gate.set_mask(torch.tensor([1.0, 1.0, 0.0, 1.0]))
        assert gate().tolist() == [1.0, 0.0, 0.0, 1.0]
    gate.load_state_dict({"log_alpha": torch.full((4,), 3.0), "mask": torch.ones(4)})
    with torch.no_grad():
        assert gate().tolist() == [1.0] * 4
        gate.keep_only_(torch.tensor([0, 3]))
        assert gate().tolist() == [1.0, 1.0]
    values = gate()
    assert values.grad_fn is not None and gate() is not values
    with torch.inference_mode():
        assert gate().is_inference()
    assert not gate().is_inference()


def test_kept_index_made_under_inference_mode_is_not_reused_for_training():
    """An evaluation (inference_mode) inside a training run must not leave an index autograd cannot save."""
    gate = HardConcreteGate(4).eval()
    with torch.inference_mode():
        assert gate.kept_index().is_inference()
    idx = gate.kept_index()
    assert not idx.is_inference()
    x = torch.randn(2, 4, requires_grad=True)
    x.index_select(1, idx).sum().backward()  # fails if the inference-mode index came back
    assert x.grad is not None


def test_gate_parameters_are_named_log_alpha():
    names = [n for n, _ in HardConcreteGate(3).named_parameters()]
    assert names == ["log_alpha"]
