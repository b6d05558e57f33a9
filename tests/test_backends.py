"""Whole patched models on each kernel backend against the "torch" reference backend."""
import os
import subprocess
import sys

import pytest
import torch

import structprune as sp
from structprune import ops
from models import FAMILIES, outputs, tiny_batch, tiny_model

KERNEL_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(ops.availability(b, "cpu") is not None,
                                                            reason=str(ops.availability(b, "cpu"))))
                   for b in ("triton", "cpp")]
L, H, I = 3, 4, 96


def masked_model(family, seed=0, attn="sdpa"):
    model = sp.patch(tiny_model(family, "qa", attn, layers=L, heads=H, ffn=I))
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(L, H, generator=g) < 0.5
    heads[0] = True
    heads[1] = False
    ffn = torch.rand(L, I, generator=g) < 0.3
    sp.set_masks(model, heads=heads, ffn=ffn)
    return model


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_model_same_logits_as_torch(backend, family):
    model = masked_model(family)
    batch = tiny_batch(batch=2, seq=13, pad_from=9)
    with torch.no_grad():
        sp.set_backend("torch")
        expected = outputs(model, batch)
        sp.set_backend(backend)
        got = outputs(model, batch)
    assert sp.last_backends()["attention"] == backend and sp.last_backends()["ffn"] == backend
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compacted_model_same_logits_as_torch(backend):
    model = sp.compact(masked_model("bert", seed=1))
    batch = tiny_batch(batch=2, seq=9, pad_from=5)
    with torch.no_grad():
        sp.set_backend("torch")
        expected = outputs(model, batch)
        sp.set_backend(backend)
        got = outputs(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("selection_phase", [False, True], ids=["all-trainable", "frozen-weights"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_training_step_gradients_match_torch(backend, selection_phase):
    """Sampled gates, no dropout: every parameter gradient (log_alpha included) equals the reference's. In the
    selection phase only the gates train (the first layer's input then needs no gradient either)."""
    grads = {}
    batch = dict(tiny_batch(batch=2, seq=9, pad_from=6), start_positions=torch.tensor([1, 2]),
                 end_positions=torch.tensor([3, 4]))
    for name in ("torch", backend):
        model = masked_model("bert", seed=2)
        model.config.attention_probs_dropout_prob = 0.0
        for layer in model.bert.encoder.layer:
            layer.attention.attention_dropout = 0.0
        sp.set_gate_sampling(model, True)
        model.train()
        if selection_phase:
            model.requires_grad_(False)
            for p in sp.gate_parameters(model):
                p.requires_grad_(True)
        sp.set_backend(name)
        gen = torch.Generator().manual_seed(7)
        for gate in sp.iter_gates(model):  # the same sampled gates on both backends
            gate.forward = (lambda g: (lambda generator=None: type(g).forward(g, generator=gen)))(gate)
        torch.manual_seed(3)
        model(**batch).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["torch"].keys() == grads[backend].keys()
    if selection_phase:
        assert len(grads["torch"]) == len(sp.gate_parameters(model)) == L * 2
    for n, g in grads["torch"].items():
        torch.testing.assert_close(grads[backend][n], g, atol=2e-4, rtol=2e-3, msg=n)


def test_grad_output_mask_and_masked_grads():
    """needs_input_grad of (x, 4 weights, gates, 2 non-tensors) -> output_mask, and the backward's 6 gradients
    -> one per input, None where no gradient is needed."""
    needs = (False, False, True, False, False, True, False, False)
    assert ops.grad_output_mask(needs, 4) == [False, True, True]
    assert ops.grad_output_mask((True, False, False, False, False, False, False), 4) == [True, False, False]
    grads = tuple(torch.full((1,), float(i)) for i in range(6))
    got = ops.masked_grads(grads, needs)
    assert [None if g is None else int(g) for g in got] == [None, None, 2, None, None, 5, None, None]


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import structprune as sp\n"
            "try:\n    sp.set_backend('triton')\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if "triton could not be imported" in out.stdout:
        pytest.skip("triton not installed")
    if torch.cuda.is_available():
        pytest.skip("a GPU makes triton available")
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backend"):
        sp.set_backend("cuda")


def test_auto_backend_reports_what_ran():
    model = masked_model("bert")
    sp.set_backend("auto")
    with torch.no_grad():
        outputs(model, tiny_batch())
    assert sp.last_backends()["attention"] == ops.resolve_backend("cpu")
