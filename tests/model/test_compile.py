"""Patched models under torch.compile (aot_eager: traces through dynamo and AOTAutograd, no C++ codegen)."""
import pytest
import torch

import structprune as sp
from structprune.ops import dispatch as ops
from helpers.models import outputs, tiny_batch, tiny_model


def masked():
    model = sp.patch(tiny_model())
    sp.set_masks(model, heads=torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]))
    return model


def test_inference_fullgraph_on_reference_backend():
    sp.set_backend("torch")
    model, batch = masked(), tiny_batch()
    with torch.no_grad():
        expected = outputs(model, batch)
        got = outputs(torch.compile(model, fullgraph=True, backend="aot_eager"), batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_l0_training_step_fullgraph_on_reference_backend():
    sp.set_backend("torch")
    model = masked()
    sp.set_gate_sampling(model, True)
    model.train()
    for layer in model.bert.encoder.layer:
        layer.attention.attention_dropout = 0.0
    batch = dict(tiny_batch(), start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 3, 4]))
    loss = torch.compile(model, fullgraph=True, backend="aot_eager")(**batch).loss
    loss.backward()
    grads = [g.log_alpha.grad for g in sp.iter_gates(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert grads[0][1] == 0  # a masked head gets no gradient


@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if ops.availability(b, "cpu") is None])
def test_kernel_backends_under_compile(backend):
    sp.set_backend(backend)
    model, batch = masked(), tiny_batch()
    with torch.no_grad():
        expected = outputs(model, batch)
        got = outputs(torch.compile(model, backend="aot_eager"), batch)
    assert sp.last_backends()["attention"] == backend
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
