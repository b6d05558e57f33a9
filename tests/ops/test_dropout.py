"""Attention-probability dropout fused into the kernel backends.

Oracle: the reference attention with the kernel's own dropout mask (each backend exposes the mask it draws for
``(seed, offset)``), forward and backward; the backward must regenerate the very mask of the forward. Plus the
statistics of the mask (keep rate, 1 / (1 - p) scaling), its independence of which other heads are pruned, and
seed semantics (``torch.manual_seed`` reproduces a training step, as for the gate sampling).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_batch, tiny_model
from helpers.tolerances import check_close

import structprune as sp
from structprune.ops import dispatch as ops

KERNELS = [b for b in ("cpp", "triton") if ops.availability(b, "cpu") is None]


def _provider(backend):
    return ops._provider(backend)


def _mask(backend, B, H, S, heads, p, seed):
    return _provider(backend).attention_dropout_scale(B, H, S, heads, p, seed, 0)


def _inputs(B=2, S=9, E=16, H=4, D=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(*s, generator=g) * 0.4 for s in ((B, S, E), (H * D, E), (H * D,), (H * D, E), (H * D,),
                                                     (H * D, E), (H * D,), (E, H * D), (E,))]
    t = [a.to(dtype).requires_grad_() for a in t]
    gates = torch.tensor([1.0, 0.0, 0.6, 1.0])[:H].requires_grad_()
    key_bias = torch.zeros(B, S)
    key_bias[-1, S - 3:] = torch.finfo(torch.float32).min
    return t, gates, key_bias, H


def _reference_with_mask(x, wq, bq, wk, bk, wv, bv, wo, bo, gates, H, key_bias, active, scale):
    """The reference attention with the dropout multipliers ``scale`` [B, A, S, S] on the active heads."""
    B, S, _ = x.shape
    D = wq.shape[0] // H

    def heads(t):
        return t.view(B, S, H, D).transpose(1, 2)[:, active]

    q, k, v = heads(F.linear(x, wq, bq)), heads(F.linear(x, wk, bk)), heads(F.linear(x, wv, bv))
    s = (q @ k.transpose(-1, -2)).float() * D ** -0.5 + key_bias[:, None, None, :]
    p = (torch.softmax(s, -1) * scale).to(x.dtype)  # softmax in fp32, as SDPA's math path
    ctx = torch.zeros(B, H, S, D, dtype=x.dtype)
    ctx[:, active] = (p @ v) * gates[active].to(x.dtype)[None, :, None, None]
    return F.linear(ctx.transpose(1, 2).reshape(B, S, H * D), wo, bo)


def _grads(out, leaves, dy):
    return torch.autograd.grad(out, leaves, dy)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("p, S", ((0.1, 9), (0.5, 9), (0.1, 40)))  # S = 40: two key blocks under the interpreter
def test_matches_reference_with_the_kernels_own_mask(backend, p, S):
    t, gates, key_bias, H = _inputs(S=S)
    active = torch.tensor([0, 2, 3])
    B, S = t[0].shape[:2]
    seed = 1234
    out = _provider(backend).gated_attention(*t, gates, active, key_bias, H, dropout_p=p, seed=seed)
    scale = _mask(backend, B, H, S, active, p, seed)
    ref = _reference_with_mask(*t, gates, H, key_bias, active, scale)
    check_close("out", out, ref, None, torch.float32)
    dy = torch.randn_like(out)
    leaves = [*t, gates]
    got_g, ref_g = _grads(out, leaves, dy), _grads(ref, leaves, dy)
    names = ["x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "gates"]
    for name, a, b in zip(names, got_g, ref_g):
        if name == "gates":  # pruned heads: the kernels return 0 (documented), the reference its formula
            a, b = a[active], b[active]
        check_close(f"{backend} d{name}", a, b, None, torch.float32)
    # the same seed draws the same mask, another seed another one
    again = _provider(backend).gated_attention(*t, gates, active, key_bias, H, dropout_p=p, seed=seed)
    other = _provider(backend).gated_attention(*t, gates, active, key_bias, H, dropout_p=p, seed=seed + 1)
    assert torch.equal(out, again) and not torch.allclose(out, other)


@pytest.mark.parametrize("backend", KERNELS)
def test_mask_statistics_and_head_independence(backend):
    B, H, S, p = 2, 4, 64, 0.1
    full = _mask(backend, B, H, S, torch.arange(H), p, 7)
    kept = full != 0
    assert torch.all((full == 0) | ((full - 1 / (1 - p)).abs() < 1e-6)), "multipliers must be 0 or 1 / (1 - p)"
    n = kept.numel()
    rate = kept.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, f"keep rate {rate:.4f}, expected {1 - p}"
    # E[mask] = 1: dropout keeps the expected attention output
    assert abs(full.mean().item() - 1.0) < 4 * (p / (1 - p) / n) ** 0.5
    # a head's mask does not depend on which other heads are active
    some = _mask(backend, B, H, S, torch.tensor([1, 3]), p, 7)
    assert torch.equal(some, full[:, [1, 3]])
    # neighbouring rows and heads are not copies of each other
    assert not torch.equal(full[0, 0, 0], full[0, 0, 1]) and not torch.equal(full[0, 0], full[0, 1])


@pytest.mark.parametrize("backend", KERNELS)
def test_model_training_with_attention_dropout_runs_on_the_kernel(backend):
    model = tiny_model(layers=1 if backend == "triton" else 2)
    assert model.config.attention_probs_dropout_prob == 0.1  # BERT's default
    sp.patch(model)
    model.train()
    sp.set_backend(backend)
    batch = tiny_batch(batch=2, seq=8, pad_from=5)
    pos = torch.tensor([1, 2])

    def step(seed):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        loss = model(**batch, start_positions=pos, end_positions=pos + 1).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_a, grads_a = step(3)
    assert sp.last_backends()["attention"] == backend
    loss_b, grads_b = step(3)
    loss_c, _ = step(4)
    assert torch.isfinite(loss_a) and torch.equal(loss_a, loss_b) and not torch.equal(loss_a, loss_c)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("backend", KERNELS)
def test_dropout_zero_is_the_plain_kernel(backend):
    t, gates, key_bias, H = _inputs()
    active = torch.tensor([0, 2, 3])
    with torch.no_grad():
        a = _provider(backend).gated_attention(*t, gates, active, key_bias, H)
        b = _provider(backend).gated_attention(*t, gates, active, key_bias, H, dropout_p=0.0, seed=5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNELS)
def test_bad_dropout_arguments_are_refused(backend):
    t, gates, key_bias, H = _inputs()
    with pytest.raises((ValueError, RuntimeError), match="dropout_p"):
        _provider(backend).gated_attention(*t, gates, torch.arange(H), key_bias, H, dropout_p=1.0, seed=1)


@pytest.mark.skipif(len(KERNELS) < 2, reason="needs both kernel backends")
def test_cpp_and_triton_draw_the_same_mask():
    """Both follow csrc/philox.h's stream, so a seed means the same dropout on either backend."""
    heads = torch.tensor([0, 2, 5])
    a = _mask("cpp", 2, 6, 37, heads, 0.1, 2**31 - 5)
    b = _mask("triton", 2, 6, 37, heads, 0.1, 2**31 - 5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("backend", KERNELS)
def test_half_precision_within_dtype_tolerance(backend, dtype):
    """Error against the fp32 reference (same mask) at most ~2x that of the reference computed in ``dtype``."""
    t32, gates, key_bias, H = _inputs()
    active = torch.tensor([0, 2, 3])
    B, S = t32[0].shape[:2]
    scale = _mask(backend, B, H, S, active, 0.1, 99)
    th = [a.detach().to(dtype).requires_grad_() for a in t32]
    out = _provider(backend).gated_attention(*th, gates, active, key_bias, H, dropout_p=0.1, seed=99)
    assert out.dtype == dtype
    ref32 = _reference_with_mask(*t32, gates, H, key_bias, active, scale)
    plain = _reference_with_mask(*th, gates, H, key_bias, active, scale)
    check_close("out", out, ref32, plain, dtype)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    g = _grads(out, th, dy.to(dtype))
    g32 = _grads(ref32, t32, dy)
    gp = _grads(plain, th, dy.to(dtype))
    for name, a, b, c in zip(["x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo"], g, g32, gp):
        check_close(f"d{name}", a, b, c, dtype)
