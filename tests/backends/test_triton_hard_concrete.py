"""What is specific to the fused Triton hard-concrete sampler (structprune._kernels): its Philox counter layout,
torch.compile and its input checks. Sampling against the reference, gradients, dtypes, noise statistics and opcheck
are the op contract, tests/ops/test_op_contract.py."""
import pytest
import torch

from helpers.triton_cases import triton_devices

DEVICES = triton_devices()

import structprune.backends.triton as K  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
def test_counter_is_offset_plus_index(device):
    """Entry i uses Philox counter offset + i: shifting the offset shifts the stream (the cpp sampler keys its
    blocks differently; the op contract asks only for reproducible prefix streams)."""
    u = K.hard_concrete_uniform(101, 42, 10, device)
    assert torch.equal(K.hard_concrete_uniform(100, 42, 11, device), u[1:])


def test_compiles_fullgraph():
    device = DEVICES[0]
    la = torch.randn(10, device=device, requires_grad=True)

    def fn(t):
        return (K.hard_concrete_sample(t, 5, 3) * 2).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (g_c,) = torch.autograd.grad(compiled(la), la)
    (g_e,) = torch.autograd.grad(fn(la), la)
    torch.testing.assert_close(g_c, g_e, rtol=0, atol=0)


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
