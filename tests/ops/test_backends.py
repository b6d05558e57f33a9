"""Whole patched models on each kernel backend against the "torch" reference backend."""
import os
import subprocess
import sys
import types

import pytest
import torch

import structprune as sp
from structprune.ops import support as _op_support
from structprune.ops import registry as backends
from structprune.ops import dispatch as ops
from helpers.models import FAMILIES, outputs, tiny_batch, tiny_model
from helpers.tolerances import check_close

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
    check_close("logits", got, expected, None, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compacted_model_same_logits_as_torch(backend):
    model = sp.compact(masked_model("bert", seed=1))
    batch = tiny_batch(batch=2, seq=9, pad_from=5)
    with torch.no_grad():
        sp.set_backend("torch")
        expected = outputs(model, batch)
        sp.set_backend(backend)
        got = outputs(model, batch)
    check_close("logits", got, expected, None, torch.float32)


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
        # three layers of sampled gates and a QA loss: a looser bound than the one op's rule
        torch.testing.assert_close(grads[backend][n], g, atol=2e-4, rtol=2e-3, msg=n)


def test_grad_output_mask_and_masked_grads():
    """needs_input_grad of (x, 4 weights, gates, 2 non-tensors) -> output_mask, and the backward's 6 gradients
    -> one per input, None where no gradient is needed."""
    needs = (False, False, True, False, False, True, False, False)
    assert _op_support.grad_output_mask(needs, 4) == [False, True, True]
    assert _op_support.grad_output_mask((True, False, False, False, False, False, False), 4) == [True, False, False]
    grads = tuple(torch.full((1,), float(i)) for i in range(6))
    got = _op_support.masked_grads(grads, needs)
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


def test_use_backend_restores_the_previous_choice_also_on_errors():
    sp.set_backend("torch")
    with ops.use_backend("auto"):
        assert sp.get_backend() == "auto"
    assert sp.get_backend() == "torch"
    with pytest.raises(KeyError):
        with ops.use_backend("auto"):
            raise KeyError("inside")
    assert sp.get_backend() == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("cuda"):
            pass
    assert sp.get_backend() == "torch"


def test_registry_orders_auto_by_priority():
    assert ops.BACKENDS == backends.names() == ("torch", "triton", "cpp")
    assert backends.auto_order("cuda") == ["triton", "cpp"]
    assert backends.auto_order("cpu") == ["cpp"]
    for name in ops.available_backends("cpu"):
        assert backends.load(name).name == name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_input_dependent_fallback_says_why(backend):
    """A call the chosen backend refuses (no head left) runs on the reference, and fallback_reasons says why."""
    sp.set_backend(backend)
    x = torch.randn(1, 3, 4)
    zeros = torch.zeros(0, 4), torch.zeros(0)
    out = ops.gated_attention(x, *zeros, *zeros, *zeros, torch.zeros(4, 0), torch.zeros(4), torch.zeros(0),
                              torch.zeros(0, dtype=torch.long), 0)
    torch.testing.assert_close(out, torch.zeros(1, 3, 4))
    assert ops.last_backends()["attention"] == "torch"
    assert "no head left" in ops.fallback_reasons()["attention"]
    x = torch.randn(1, 3, 4)
    ops.gated_ffn(x, torch.randn(2, 4), torch.randn(2), torch.randn(4, 2), torch.randn(4), torch.ones(2),
                  torch.arange(2))
    assert ops.last_backends()["ffn"] == backend and "ffn" not in ops.fallback_reasons()


def test_a_registered_backend_takes_part_in_auto(monkeypatch):
    """A new backend is a module defining BACKEND and one register() line: "auto" runs it when it has the highest
    priority, and passes to the next backend for the calls it refuses."""
    from structprune.backends import pytorch as _torch_backend

    ran = []

    def attention(*args, **kwargs):
        ran.append("attention")
        return _torch_backend.gated_attention(*args, **kwargs)

    module = types.ModuleType("toy_backend")
    module.BACKEND = _op_support.Backend(
        name="toy", availability=lambda device: None, gated_attention=attention, gated_ffn=_torch_backend.gated_ffn,
        extra_reasons=lambda inputs: ["toy refuses the FFN"] if inputs.op == "ffn" else [])
    monkeypatch.setitem(sys.modules, "toy_backend", module)
    for name in ("_registry", "_loaded", "_errors", "_orders"):
        monkeypatch.setattr(backends, name, dict(getattr(backends, name)))
    backends.register("toy", "toy_backend", priority=100)
    sp.set_backend("auto")
    assert ops.resolve_backend("cpu") == "toy"
    x = torch.randn(1, 3, 4)
    w = [torch.randn(4, 4), torch.randn(4)] * 4
    ops.gated_attention(x, *w, torch.ones(2), torch.arange(2), 2)
    assert ran == ["attention"] and ops.last_backends()["attention"] == "toy"
    ops.gated_ffn(x, torch.randn(2, 4), torch.randn(2), torch.randn(4, 2), torch.randn(4), torch.ones(2),
                  torch.arange(2))
    next_best = ([b for b in backends.auto_order("cpu") if b != "toy" and ops.availability(b) is None] + ["torch"])[0]
    assert ops.last_backends()["ffn"] == next_best
    assert ops.fallback_reasons()["ffn"] == "toy: toy refuses the FFN"
    with ops.use_backend("toy"):
        ops.gated_ffn(x, torch.randn(2, 4), torch.randn(2), torch.randn(4, 2), torch.randn(4), torch.ones(2),
                      torch.arange(2))
        assert ops.last_backends()["ffn"] == "torch"  # an explicit choice falls back to the reference
