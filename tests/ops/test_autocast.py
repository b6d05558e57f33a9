"""Mixed precision: the kernel ops take part in ``torch.autocast`` like the reference does.

Under autocast the reference's ``F.linear`` runs in the autocast dtype (fp32 accumulation) and returns it; the
kernel ops must do the same (x, weights and biases cast, gates and the key bias kept in fp32), and their backward
must accept the low-precision gradient and give fp32 parameters fp32 gradients. Accuracy: the house rule, error
against the fp32 reference at most ~2x the plain-PyTorch (reference backend) autocast error.
"""
from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_batch, tiny_model
from helpers.tolerances import check_close

import structprune as sp
from structprune.ops import support as _op_support
from structprune.ops import dispatch as ops
from structprune.ops import reference

KERNELS = [b for b in ("cpp", "triton") if ops.availability(b, "cpu") is None]
DTYPES = (torch.bfloat16, torch.float16)


def _model(layers: int):
    m = tiny_model(layers=layers, hidden=32, heads=4, ffn=48)
    m.config.hidden_dropout_prob = 0.0
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    sp.patch(m)
    for mod in m.modules():  # no attention-probability dropout here (see test_dropout.py)
        if hasattr(mod, "attention_dropout"):
            mod.attention_dropout = 0.0
    heads = torch.ones(layers, 4)
    heads[0, 1] = 0
    ffn = torch.ones(layers, 48)
    ffn[:, ::3] = 0
    sp.set_masks(m, heads=heads, ffn=ffn)
    return m.train()


def _step(model, batch, backend, dtype):
    """Loss and parameter gradients of one training step on ``backend`` (autocast to ``dtype`` unless None)."""
    sp.set_backend(backend)
    model.zero_grad(set_to_none=True)
    pos = torch.tensor([1, 2, 3])
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(**batch, start_positions=pos, end_positions=pos + 2)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNELS)
def test_autocast_training_step_matches_reference(backend, dtype):
    layers = 1 if backend == "triton" else 2  # the Triton interpreter is slow
    model = _model(layers)
    batch = tiny_batch(batch=3, seq=9, pad_from=5)
    loss32, grads32 = _step(model, batch, "torch", None)
    loss_ref, grads_ref = _step(model, batch, "torch", dtype)
    loss, grads = _step(model, batch, backend, dtype)
    assert sp.last_backends()["attention"] == backend and sp.last_backends()["ffn"] == backend
    check_close("loss", loss, loss32, loss_ref, dtype)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32, f"{name}: gradient dtype {g.dtype}, expected that of the fp32 parameter"
        check_close(name, g, grads32[name], grads_ref[name], dtype)


def _attention_inputs(seed=0, E=32, H=4, D=8, B=2, S=7):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).requires_grad_()  # noqa: E731
    x = r(B, S, E)
    w = [r(H * D, E), r(H * D), r(H * D, E), r(H * D), r(H * D, E), r(H * D), r(E, H * D), r(E)]
    gates = torch.tensor([1.0, 0.0, 0.7, 1.0]).requires_grad_()
    active = torch.tensor([0, 2, 3])
    key_bias = torch.zeros(B, S)
    key_bias[1, 5:] = torch.finfo(torch.float32).min
    return x, w, gates, active, key_bias, H


@pytest.mark.parametrize("backend", KERNELS)
def test_ops_return_the_reference_dtype_under_autocast(backend):
    x, w, gates, active, key_bias, H = _attention_inputs()
    g = torch.Generator().manual_seed(1)
    w1, b1, w2, b2 = (torch.randn(*s, generator=g).requires_grad_() for s in ((24, 32), (24,), (32, 24), (32,)))
    unit_gates = torch.rand(24, generator=g).requires_grad_()
    ops.set_backend(backend)
    provider = ops._provider(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference.gated_attention(x, *w, gates, H, key_bias=key_bias)
        got = provider.gated_attention(x, *w, gates, active, key_bias, H)
        ref_f = reference.gated_ffn(x, w1, b1, w2, b2, unit_gates, "gelu")
        got_f = provider.gated_ffn(x, w1, b1, w2, b2, unit_gates, torch.arange(24), "gelu")
    assert got.dtype == ref.dtype == torch.bfloat16
    assert got_f.dtype == ref_f.dtype == torch.bfloat16
    (got.float().sum() + got_f.float().sum()).backward()
    for t in [x, *w, gates, w1, b1, w2, b2, unit_gates]:
        assert t.grad is not None and t.grad.dtype == torch.float32


def test_autocast_rule_rejects_unknown_argument_names():
    with pytest.raises(ValueError, match="has no argument"):
        _op_support.register_autocast("structprune::triton_gated_ffn", keep=("gates",))
