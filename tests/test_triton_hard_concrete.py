"""Fused hard-concrete sampling (structprune._kernels) against structprune.gates.hard_concrete_from_uniform."""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from structprune import gates  # noqa: E402
import structprune._kernels as K  # noqa: E402

DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else [])
if not DEVICES or K.availability(torch.device(DEVICES[0])) is not None:
    pytest.skip("Triton backend unavailable: " + str(K.availability(torch.device("cpu"))), allow_module_level=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 12, 3000])
def test_matches_reference_given_same_noise(device, n):
    log_alpha = (torch.randn(n) * 3).to(device).requires_grad_()
    z = K.hard_concrete_sample(log_alpha, seed=1234, offset=7)
    u = K.hard_concrete_uniform(n, seed=1234, offset=7, device=device)
    ref = gates.hard_concrete_from_uniform(log_alpha, u)
    torch.testing.assert_close(z, ref, atol=1e-6, rtol=1e-5)
    gz = torch.randn(n, device=device)
    (g,) = torch.autograd.grad(z, log_alpha, gz)
    (g_ref,) = torch.autograd.grad(ref, log_alpha, gz)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    clamped = (z == 0) | (z == 1)
    assert torch.all(g[clamped] == 0), "gradient must be 0 where the sample is clamped"
    if n == 3000:
        assert 0 < int(clamped.sum()) < n  # both regimes exercised


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_log_alpha(device, dtype):
    log_alpha = (torch.randn(64) * 2).to(device=device, dtype=dtype).requires_grad_()
    z = K.hard_concrete_sample(log_alpha, 3, 0)
    assert z.dtype == dtype
    u = K.hard_concrete_uniform(64, 3, 0, device)
    ref = gates.hard_concrete_from_uniform(log_alpha.detach().float(), u)
    torch.testing.assert_close(z.float(), ref, atol=2 * torch.finfo(dtype).eps, rtol=0)
    (g,) = torch.autograd.grad(z.sum(), log_alpha)
    assert g.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_reproducible_and_counter_based(device):
    la = torch.zeros(100, device=device)
    a = K.hard_concrete_sample(la, 42, 10)
    assert torch.equal(a, K.hard_concrete_sample(la, 42, 10))
    assert not torch.equal(a, K.hard_concrete_sample(la, 43, 10))
    # Entry i uses counter offset + i: shifting the offset shifts the stream.
    u = K.hard_concrete_uniform(101, 42, 10, device)
    assert torch.equal(K.hard_concrete_uniform(100, 42, 11, device), u[1:])
    assert torch.equal(K.hard_concrete_uniform(100, 42, 10, device), u[:100])


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_statistics(device):
    n = 20000
    u = K.hard_concrete_uniform(n, 7, 0, device)
    assert u.dtype == torch.float32 and u.shape == (n,)
    assert float(u.min()) >= 1e-6 and float(u.max()) <= 1 - 1e-6
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 0.005
    # Sampling at log_alpha = 0 gives P(z > 0) = expected_l0(0).
    z = K.hard_concrete_sample(torch.zeros(n, device=device), 9, 0)
    p = float(gates.expected_l0(torch.zeros(())))
    assert abs(float((z > 0).float().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("device", DEVICES)
def test_beta_and_shapes(device):
    la = torch.randn(3, 5, device=device)
    z = K.hard_concrete_sample(la, 1, 0, beta=0.5)
    assert z.shape == (3, 5)
    u = K.hard_concrete_uniform(15, 1, 0, device).view(3, 5)
    torch.testing.assert_close(z, gates.hard_concrete_from_uniform(la, u, beta=0.5), atol=1e-6, rtol=1e-5)
    assert K.hard_concrete_sample(torch.empty(0, device=device), 1, 0).shape == (0,)


def test_opcheck_and_compile():
    device = DEVICES[0]
    la = torch.randn(10, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.structprune.triton_hard_concrete, (la, 5, 3, 2 / 3))

    def fn(t):
        return (K.hard_concrete_sample(t, 5, 3) * 2).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (g_c,) = torch.autograd.grad(compiled(la), la)
    (g_e,) = torch.autograd.grad(fn(la), la)
    torch.testing.assert_close(g_c, g_e)


def test_input_errors():
    la = torch.zeros(4, device=DEVICES[0])
    with pytest.raises(ValueError, match="seed must be an int"):
        K.hard_concrete_sample(la, -1, 0)
    with pytest.raises(ValueError, match="offset must be an int"):
        K.hard_concrete_sample(la, 0, 2 ** 31)
    with pytest.raises(ValueError, match="log_alpha must have dtype"):
        K.hard_concrete_sample(la.double(), 0, 0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        K.hard_concrete_sample(la, 0, 0, beta=0.0)
