"""What is specific to the compiled ops (structprune.backends.cpp.ops, csrc/); the op contract every backend meets
(forward and gradients against the reference over shapes, kept fractions, dtypes and frozen inputs, opcheck of
a training call, the sampler's noise) is tests/ops/test_op_contract.py.

Here: the saved tensors and both backward paths (saved / recomputing), the packed-weight cache (mask, gate and
in-place weight changes between calls), the output_mask the backward ops get and honour, the input checks (the
shared Python ones at the entry, the memory guards of the raw ops), the activation names, torch.compile, Philox
known answers, the sampler's mask argument, the build recipe and the JIT build. Tolerances:
tests/helpers/tolerances.py.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from helpers.grad_masks import check_against_unmasked, check_masked_shapes, spy_backward
from helpers.tolerances import check_close

import structprune.backends.cpp.build as build
import structprune.backends.cpp.ops as ext
from structprune.model import gates as gates_mod
from structprune.ops import reference
from structprune.ops.activations import ACTIVATIONS

if ext.load_error() is not None:
    pytest.skip(f"C++ extension unavailable: {ext.load_error()}", allow_module_level=True)

NEG = torch.finfo(torch.float32).min


def _kept_index(n: int, kept: str, gen: torch.Generator) -> torch.Tensor:
    if kept == "none":
        return torch.zeros(0, dtype=torch.long)
    if kept == "all":
        return torch.arange(n)
    k = max(1, n // 2) if n > 1 else 1
    return torch.randperm(n, generator=gen)[:k].sort().values


def _gates(n: int, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    g = torch.zeros(n)
    g[index] = 0.25 + torch.rand(index.numel(), generator=gen)  # non-zero, not all 1 (gate folding is exercised)
    return g


def _attention_case(B, S, H, D, kept, padding, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E = 48 if D == 32 else 80

    def p(*shape, scale=0.2):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()

    HD = H * D
    params = dict(x=p(B, S, E, scale=1.0), wq=p(HD, E), bq=p(HD), wk=p(HD, E), bk=p(HD), wv=p(HD, E), bv=p(HD),
                  wo=p(E, HD), bo=p(E))
    active = _kept_index(H, kept, gen)
    head_gates = _gates(H, active, gen).requires_grad_()
    key_bias = None
    if padding:
        key_bias = torch.zeros(B, S)
        for b in range(B):
            n_pad = (b * 3) % S  # row 0 unpadded, others padded at the end; never all keys
            if n_pad:
                key_bias[b, S - n_pad:] = NEG
    return params, head_gates, active, key_bias


def _ffn_case(B, S, E, I, kept, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def p(*shape, scale=0.2):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()

    params = dict(x=p(B, S, E, scale=1.0), w1=p(I, E), b1=p(I), w2=p(E, I), b2=p(E))
    kept_units = _kept_index(I, kept, gen)
    unit_gates = _gates(I, kept_units, gen).requires_grad_()
    return params, unit_gates, kept_units


def _run_attention(fn, params, head_gates, active, key_bias, H, grad_out):
    names = list(params)
    inputs = [params[n] for n in names] + [head_gates]
    if fn == "cpp":
        out = ext.gated_attention(*[params[n] for n in names], head_gates, active, key_bias, H)
    else:
        out = reference.gated_attention(*[params[n] for n in names], head_gates, H, key_bias=key_bias)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, dict(zip(names + ["gates"], grads))


def _run_ffn(fn, params, unit_gates, kept, activation, grad_out):
    names = list(params)
    inputs = [params[n] for n in names] + [unit_gates]
    if fn == "cpp":
        out = ext.gated_ffn(*[params[n] for n in names], unit_gates, kept, activation)
    else:
        out = reference.gated_ffn(*[params[n] for n in names], unit_gates, activation)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, dict(zip(names + ["gates"], grads))


def _check_gate_grad(got, want, index):
    """Kept gates match the reference; pruned gates get 0 (the op never forms their contexts/activations)."""
    check_close("dgates", got[index], want[index], None, torch.float32)
    pruned = torch.ones(got.numel(), dtype=torch.bool)
    pruned[index] = False
    assert torch.all(got[pruned] == 0)


def _close_fp32(got, want, name):
    check_close(name, got, want, None, torch.float32)


# --- saved tensors (save_for_backward) ------------------------------------------------------------------------------

def _attn_args(params, hg, active, kb, H):
    return (*params.values(), hg, active, kb, H)


def _grads(outputs, inputs, grad_out):
    return torch.autograd.grad(outputs, inputs, grad_out)


@pytest.mark.parametrize("kept", ["none", "some", "all"])
@pytest.mark.parametrize("padding", [False, True])
def test_attention_saved_tensors_and_both_backward_paths(kept, padding):
    """save_for_backward=True: same y as without, saved q|k|v / context / log-sum-exp match the reference, and the
    backward from the saved tensors equals the recomputing backward and the reference gradients."""
    H, D, B, S = 4, 32, 2, 9
    params, hg, active, kb = _attention_case(B, S, H, D, kept, padding, seed=3)
    args = _attn_args(params, hg, active, kb, H)
    inputs = list(params.values()) + [hg]
    grad_out = torch.randn(B, S, params["x"].shape[-1])
    op = torch.ops.structprune.cpp_gated_attention
    y0, *unsaved = op(*args, False)
    assert all(t.shape == (0,) for t in unsaved) and unsaved[2].dtype == torch.float32
    y1, qkv, ctx, lse = op(*args, True)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    A, R = active.numel(), active.numel() * D
    assert qkv.shape == (B * S, 3 * R) and ctx.shape == (B * S, R) and lse.shape == (B, S, A)
    assert lse.dtype == torch.float32 and not (qkv.requires_grad or ctx.requires_grad or lse.requires_grad)
    if A:
        with torch.no_grad():
            rows = (active[:, None] * D + torch.arange(D)).reshape(-1)
            x = params["x"]
            q, k, v = (torch.nn.functional.linear(x, params[w][rows], params[b][rows])
                       for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
            _close_fp32(qkv, torch.cat([q, k, v], -1).reshape(B * S, 3 * R), "qkv")
            heads = [t.view(B, S, A, D).transpose(1, 2) for t in (q, k, v)]
            scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(D)
            if kb is not None:
                scores = scores + kb[:, None, None, :]
            ref_ctx = torch.softmax(scores, -1) @ heads[2]
            _close_fp32(ctx, ref_ctx.transpose(1, 2).reshape(B * S, R), "ctx")
            _close_fp32(lse, scores.logsumexp(-1).transpose(1, 2), "lse")
    g_saved = _grads(y1, inputs, grad_out)
    g_recomputed = _grads(y0, inputs, grad_out)
    _, ref_grads = _run_attention("ref", params, hg, active, kb, H, grad_out)
    for name, a, b in zip(list(params) + ["gates"], g_saved, g_recomputed):
        # the two backward paths of one kernel: equal up to the order of a few sums, tighter than the rule
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"d{name}: {m}")
        if name == "gates":
            _check_gate_grad(a, ref_grads[name], active)
        else:
            _close_fp32(a, ref_grads[name], f"d{name}")


@pytest.mark.parametrize("kept", ["none", "some", "all"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ffn_saved_tensors_and_both_backward_paths(kept, activation):
    B, S, E, I = 2, 7, 48, 96
    params, ug, kept_units = _ffn_case(B, S, E, I, kept, seed=4)
    args = (*params.values(), ug, kept_units, activation)
    inputs = list(params.values()) + [ug]
    grad_out = torch.randn(B, S, E)
    op = torch.ops.structprune.cpp_gated_ffn
    y0, *unsaved = op(*args, False)
    assert all(t.shape == (0,) for t in unsaved)
    y1, pre, h = op(*args, True)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    K = kept_units.numel()
    assert pre.shape == (B * S, K) and h.shape == (B * S, K) and not (pre.requires_grad or h.requires_grad)
    with torch.no_grad():
        ref_pre = torch.nn.functional.linear(params["x"], params["w1"][kept_units], params["b1"][kept_units])
        _close_fp32(pre, ref_pre.reshape(B * S, K), "pre")
        _close_fp32(h, reference.activation_fn(activation)(pre), "h")
    g_saved = _grads(y1, inputs, grad_out)
    g_recomputed = _grads(y0, inputs, grad_out)
    _, ref_grads = _run_ffn("ref", params, ug, kept_units, activation, grad_out)
    for name, a, b in zip(list(params) + ["gates"], g_saved, g_recomputed):
        # the two backward paths of one kernel: equal up to the order of a few sums, tighter than the rule
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"d{name}: {m}")
        if name == "gates":
            _check_gate_grad(a, ref_grads[name], kept_units)
        else:
            _close_fp32(a, ref_grads[name], f"d{name}")


def test_wrappers_save_only_when_a_gradient_is_needed(monkeypatch):
    params, hg, active, kb = _attention_case(1, 5, 4, 32, "some", False)
    fparams, ug, kept = _ffn_case(1, 5, 32, 64, "some")
    calls = []
    real_attn, real_ffn = torch.ops.structprune.cpp_gated_attention, torch.ops.structprune.cpp_gated_ffn

    class Spy:
        def __init__(self, fn, save_position):
            self.fn, self.save_position = fn, save_position

        def __call__(self, *args):
            calls.append(args[self.save_position])
            return self.fn(*args)

    monkeypatch.setattr(torch.ops.structprune, "cpp_gated_attention", Spy(real_attn, 13))
    monkeypatch.setattr(torch.ops.structprune, "cpp_gated_ffn", Spy(real_ffn, 8))
    with torch.no_grad():
        ext.gated_attention(*params.values(), hg, active, kb, 4)
        ext.gated_ffn(*fparams.values(), ug, kept, "gelu")
    assert calls == [False, False]
    calls.clear()
    ext.gated_attention(*params.values(), hg, active, kb, 4)
    ext.gated_ffn(*fparams.values(), ug, kept, "gelu")
    assert calls == [True, True]
    calls.clear()
    detached = {k: v.detach() for k, v in fparams.items()}
    ext.gated_ffn(*detached.values(), ug.detach(), kept, "gelu")  # nothing requires grad
    assert calls == [False]


def test_training_steps_follow_gate_and_weight_changes():
    """Several steps as in L0 training: gates resampled each step (refolded from the cached ungated columns),
    weights updated by an optimizer; every step's gradients equal the reference."""
    H = 4
    params, hg, active, kb = _attention_case(2, 9, H, 32, "some", True, seed=5)
    fparams, ug, kept = _ffn_case(2, 9, 48, 96, "some", seed=5)
    weights = [v for v in params.values()] + [v for v in fparams.values()]
    opt = torch.optim.SGD(weights, lr=0.01)
    gen = torch.Generator().manual_seed(6)
    for step in range(4):
        if step == 2:  # new kept sets
            active = _kept_index(H, "some", gen)
            kept = _kept_index(96, "some", gen)
        hg = _gates(H, active, gen).requires_grad_()
        ug = _gates(96, kept, gen).requires_grad_()
        g_out = torch.randn(2, 9, params["x"].shape[-1], generator=gen)
        out, grads = _run_attention("cpp", params, hg, active, kb, H, g_out)
        _, ref_grads = _run_attention("ref", params, hg, active, kb, H, g_out)
        for name, g in grads.items():
            if name == "gates":
                _check_gate_grad(g, ref_grads[name], active)
            else:
                _close_fp32(g, ref_grads[name], f"d{name}")
        f_out = torch.randn(2, 9, 48, generator=gen)
        _, grads = _run_ffn("cpp", fparams, ug, kept, "gelu", f_out)
        _, ref_grads = _run_ffn("ref", fparams, ug, kept, "gelu", f_out)
        for name, g in grads.items():
            if name == "gates":
                _check_gate_grad(g, ref_grads[name], kept)
            else:
                _close_fp32(g, ref_grads[name], f"d{name}")
        opt.zero_grad()
        loss = (ext.gated_attention(*params.values(), hg, active, kb, H) * g_out).sum() + \
            (ext.gated_ffn(*fparams.values(), ug, kept, "gelu") * f_out).sum()
        loss.backward()
        opt.step()


def test_backward_rejects_mismatched_saved_tensors():
    params, hg, active, kb = _attention_case(1, 5, 4, 32, "some", False)
    args = _attn_args(params, hg, active, kb, 4)
    with torch.no_grad():
        y, qkv, ctx, lse = torch.ops.structprune.cpp_gated_attention(*args, True)
        bwd = torch.ops.structprune.cpp_gated_attention_backward
        with pytest.raises(RuntimeError, match="qkv"):
            bwd(torch.ones_like(y), *args, qkv[:-1], ctx, lse)
        with pytest.raises(RuntimeError, match="or none"):
            bwd(torch.ones_like(y), *args, qkv, None, None)
        fparams, ug, kept = _ffn_case(1, 5, 32, 64, "some")
        y, pre, h = torch.ops.structprune.cpp_gated_ffn(*fparams.values(), ug, kept, "gelu", True)
        with pytest.raises(RuntimeError, match="pre"):
            torch.ops.structprune.cpp_gated_ffn_backward(torch.ones_like(y), *fparams.values(), ug, kept, "gelu",
                                                         pre.t(), h)


# --- output_mask: only the gradients that are needed ---------------------------------------------------------------

# Leaves frozen with requires_grad_(False): "weights" is every weight and bias, "w0" only the first weight.
FROZEN = ["weights", "gates", "x", "x+weights", "x+gates", "weights+gates", "w0"]


def _freeze(params, gates, frozen):
    """Detached copies of the leaves, requiring grad except the frozen ones; and the expected output_mask."""
    parts = frozen.split("+")
    names = list(params)
    leaves = {n: params[n].detach().clone().requires_grad_() for n in names}
    leaves["gates"] = gates.detach().clone().requires_grad_()
    off = set()
    if "x" in parts:
        off.add("x")
    if "weights" in parts:
        off.update(names[1:])
    if "w0" in parts:
        off.add(names[1])
    if "gates" in parts:
        off.add("gates")
    for n in off:
        leaves[n].requires_grad_(False)
    mask = ["x" not in off, any(n not in off for n in names[1:]), "gates" not in off]
    return leaves, off, mask


def _check_frozen_grads(leaves, off, ref_grads, kept):
    for name, t in leaves.items():
        if name in off:
            assert t.grad is None, f"{name} is frozen but got a gradient"
        elif name == "gates":
            _check_gate_grad(t.grad, ref_grads[name], kept)
        else:
            _close_fp32(t.grad, ref_grads[name], f"d{name}")


@pytest.mark.parametrize("frozen", FROZEN)
@pytest.mark.parametrize("save", [True, False], ids=["saved", "recompute"])
def test_attention_frozen_inputs_get_no_gradient(frozen, save, monkeypatch):
    """Gradients of the leaves requiring grad match the reference; frozen leaves get None, and the backward op
    was asked (output_mask) for no more than needed and returned empty tensors for the rest."""
    H = 4
    params, hg, active, kb = _attention_case(2, 9, H, 32, "some", True, seed=8)
    grad_out = torch.randn(2, 9, params["x"].shape[-1])
    ref_out, ref_grads = _run_attention("ref", params, hg, active, kb, H, grad_out)
    leaves, off, mask = _freeze(params, hg, frozen)
    calls = spy_backward(monkeypatch, "cpp_gated_attention_backward")
    out = torch.ops.structprune.cpp_gated_attention(*leaves.values(), active, kb, H, save)[0]
    _close_fp32(out, ref_out, "out")
    out.backward(grad_out)
    assert [c[0] for c in calls] == [mask]
    check_masked_shapes(calls[0][1], mask, leaves)
    _check_frozen_grads(leaves, off, ref_grads, active)


@pytest.mark.parametrize("frozen", FROZEN)
@pytest.mark.parametrize("save", [True, False], ids=["saved", "recompute"])
def test_ffn_frozen_inputs_get_no_gradient(frozen, save, monkeypatch):
    params, ug, kept = _ffn_case(2, 7, 48, 96, "some", seed=8)
    grad_out = torch.randn(2, 7, 48)
    ref_out, ref_grads = _run_ffn("ref", params, ug, kept, "gelu", grad_out)
    leaves, off, mask = _freeze(params, ug, frozen)
    calls = spy_backward(monkeypatch, "cpp_gated_ffn_backward")
    out = torch.ops.structprune.cpp_gated_ffn(*leaves.values(), kept, "gelu", save)[0]
    _close_fp32(out, ref_out, "out")
    out.backward(grad_out)
    assert [c[0] for c in calls] == [mask]
    check_masked_shapes(calls[0][1], mask, leaves)
    _check_frozen_grads(leaves, off, ref_grads, kept)


MASKS = [list(m) for m in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("kept", ["none", "some", "all"])
def test_attention_backward_output_mask_direct(mask, kept):
    """Called directly: masked-out gradients are empty, the others equal the default (all) call's, with the saved
    tensors and recomputing."""
    params, hg, active, kb = _attention_case(2, 9, 4, 32, kept, True, seed=9)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _attn_args(params, hg, active, kb, 4))
    y, *saved = torch.ops.structprune.cpp_gated_attention(*args, True)
    grad_out = torch.randn_like(y)
    bwd = torch.ops.structprune.cpp_gated_attention_backward
    for extra in (saved, [None, None, None]):
        full = bwd(grad_out, *args, *extra)
        got = bwd(grad_out, *args, *extra, output_mask=mask)
        check_against_unmasked(got, full, mask, list(params) + ["gates"])


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("kept", ["none", "some", "all"])
def test_ffn_backward_output_mask_direct(mask, kept):
    params, ug, kept_units = _ffn_case(2, 7, 48, 96, kept, seed=9)
    args = (*[v.detach() for v in params.values()], ug.detach(), kept_units, "gelu_tanh")
    y, pre, h = torch.ops.structprune.cpp_gated_ffn(*args, True)
    grad_out = torch.randn_like(y)
    bwd = torch.ops.structprune.cpp_gated_ffn_backward
    for extra in ((pre, h), (None, None)):
        full = bwd(grad_out, *args, *extra)
        got = bwd(grad_out, *args, *extra, output_mask=mask)
        check_against_unmasked(got, full, mask, list(params) + ["gates"])


# --- the packed-weight cache ----------------------------------------------------------------------------------------

def _attn_fwd_check(params, hg, active, kb, H):
    with torch.no_grad():
        out = ext.gated_attention(*params.values(), hg, active, kb, H)
        ref = reference.gated_attention(*params.values(), hg, H, key_bias=kb)
    _close_fp32(out, ref, "out")


def _ffn_fwd_check(params, ug, kept, activation="gelu"):
    with torch.no_grad():
        out = ext.gated_ffn(*params.values(), ug, kept, activation)
        ref = reference.gated_ffn(*params.values(), ug, activation)
    _close_fp32(out, ref, "out")


def test_cache_follows_mask_and_gate_changes():
    H = 4
    params, hg, active, kb = _attention_case(2, 9, H, 32, "some", True)
    fparams, ug, kept = _ffn_case(2, 9, 48, 96, "some")
    for step in range(4):
        gen = torch.Generator().manual_seed(100 + step)
        active = _kept_index(H, ["some", "all", "some", "none"][step], gen)
        hg = _gates(H, active, gen)
        _attn_fwd_check(params, hg, active, kb, H)
        _attn_fwd_check(params, hg * 0.5, active, kb, H)  # same index, new gate values
        kept = _kept_index(96, ["some", "all", "some", "none"][step], gen)
        ug = _gates(96, kept, gen)
        _ffn_fwd_check(fparams, ug, kept)
        _ffn_fwd_check(fparams, ug * 2.0, kept)
    hg_module = gates_mod.HardConcreteGate(H, sampling=False)  # index tensor cached by the gate, mask changed in place
    hg_module.set_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    _attn_fwd_check(params, hg_module(), hg_module.kept_index(), kb, H)
    hg_module.set_mask(torch.tensor([0.0, 1.0, 1.0, 0.0]))
    _attn_fwd_check(params, hg_module(), hg_module.kept_index(), kb, H)


@pytest.mark.parametrize("how", ["no_grad_add_", "copy_", "optimizer_step", "load_state_dict", "data_add_then_clear"])
def test_cache_sees_in_place_weight_updates(how):
    H = 4
    params, hg, active, kb = _attention_case(2, 9, H, 32, "some", False)
    fparams, ug, kept = _ffn_case(2, 9, 48, 96, "some")
    weights = [v for k, v in params.items() if k != "x"] + [v for k, v in fparams.items() if k != "x"]
    opt = torch.optim.SGD(weights, lr=0.5)
    for _ in range(3):
        _attn_fwd_check(params, hg, active, kb, H)
        _ffn_fwd_check(fparams, ug, kept)
        if how == "no_grad_add_":
            with torch.no_grad():
                for w in weights:
                    w.add_(torch.randn_like(w) * 0.1)
        elif how == "copy_":
            with torch.no_grad():
                for w in weights:
                    w.copy_(torch.randn_like(w) * 0.2)
        elif how == "optimizer_step":
            opt.zero_grad()
            loss = ext.gated_attention(*params.values(), hg, active, kb, H).square().sum() + \
                ext.gated_ffn(*fparams.values(), ug, kept, "gelu").square().sum()
            loss.backward()
            opt.step()
        elif how == "load_state_dict":
            module = torch.nn.ParameterList(weights)
            module.load_state_dict({k: torch.randn_like(v) * 0.2 for k, v in module.state_dict().items()})
        else:  # writes through .data bypass the version counter: the documented remedy is clear_cache()
            for w in weights:
                w.data.add_(torch.randn_like(w) * 0.1)
            ext.clear_cache()


def test_cache_not_fooled_by_reused_memory():
    """New weights allocated where freed ones lived (same address, version 0) must not hit a stale entry."""
    for seed in range(4):
        fparams, ug, kept = _ffn_case(2, 5, 32, 64, "some", seed=seed)
        _ffn_fwd_check(fparams, ug, kept)
        params, hg, active, kb = _attention_case(1, 5, 4, 32, "some", False, seed=seed)
        _attn_fwd_check(params, hg, active, kb, 4)
        del fparams, params
    ext.clear_cache()
    assert ext.cache_size() == 0


def test_input_errors_name_the_tensor():
    """The entry runs the checks every backend shares (structprune/_input_checks.py)."""
    params, hg, active, kb = _attention_case(2, 5, 4, 32, "some", False)
    args = list(params.values())
    args[1] = args[1][:-1]  # wq one row short
    with pytest.raises(ValueError, match="wq has 127 rows, not num_heads \\* head_dim with num_heads = 4"):
        ext.gated_attention(*args, hg, active, kb, 4)
    fparams, ug, kept = _ffn_case(2, 3, 32, 64, "some")
    with pytest.raises(ValueError, match="activation must be one of"):
        ext.gated_ffn(*fparams.values(), ug, kept, "swish")
    with pytest.raises(ValueError, match="kept_units must hold sorted unique indices"):
        ext.gated_ffn(*fparams.values(), ug, kept.flip(0), "gelu")
    with pytest.raises(ValueError, match="dropout_p must be in \\[0, 1\\), got 1.5"):
        ext.attention_dropout_scale(1, 4, 3, active, 1.5, 0)


def test_raw_ops_guard_their_memory():
    """Called directly (past the Python checks), the C++ ops still refuse what would read out of bounds: indices
    out of range or out of order, shapes they index with, saved tensors of the wrong shape."""
    fparams, ug, kept = _ffn_case(2, 3, 32, 64, "some")
    ffn = torch.ops.structprune.cpp_gated_ffn
    w = [t.detach() for t in fparams.values()]
    with pytest.raises(RuntimeError, match="kept_units must hold sorted unique indices in \\[0, 64\\), got 64"):
        ffn(*w, ug.detach(), torch.tensor([0, 64]), "gelu")
    with pytest.raises(RuntimeError, match="kept_units must hold sorted unique indices"):
        ffn(*w, ug.detach(), kept.flip(0), "gelu")
    with pytest.raises(RuntimeError, match="w2 must have shape \\[32, 64\\], got \\[32, 63\\]"):
        ffn(*w[:3], w[3][:, 1:], w[4], ug.detach(), kept, "gelu")
    with pytest.raises(RuntimeError, match="x must be \\[B, S, E\\]"):
        ffn(w[0][0], *w[1:], ug.detach(), kept, "gelu")
    params, hg, active, kb = _attention_case(1, 5, 4, 32, "some", False)
    with pytest.raises(RuntimeError, match="active_heads"):
        torch.ops.structprune.cpp_gated_attention(*[t.detach() for t in params.values()], hg.detach(),
                                                  torch.tensor([4]), None, 4)


def test_cpp_accepts_exactly_the_python_activation_names():
    """The C++ switch over activation names (csrc/ffn.cpp) and structprune/ops/activations.py agree: the op lists the
    same names, runs each, and refuses others naming them."""
    from structprune.ops.activations import HF_ACTIVATIONS

    assert tuple(torch.ops.structprune.activation_names()) == ACTIVATIONS
    fparams, ug, kept = _ffn_case(1, 3, 32, 64, "some")
    w = [t.detach() for t in fparams.values()]
    for name in ACTIVATIONS:
        y = torch.ops.structprune.cpp_gated_ffn(*w, ug.detach(), kept, name)[0]
        check_close(f"y {name}", y, reference.gated_ffn(*w, ug.detach(), name), None, torch.float32)
    expected = ", ".join(f"'{n}'" for n in ACTIVATIONS)
    for name in sorted(set(HF_ACTIVATIONS) - set(ACTIVATIONS)) + ["GELU", "", "SiLU", "swiglu"]:
        with pytest.raises(RuntimeError, match=f"activation must be one of {expected}, got"):
            torch.ops.structprune.cpp_gated_ffn(*w, ug.detach(), kept, name)


def test_ffn_entry_takes_x_of_any_rank():
    """x [..., E] (the FFN is position-wise, as the other backends take it) runs as [1, N, E], with gradients."""
    fparams, ug, kept = _ffn_case(2, 3, 32, 64, "some")
    w = list(fparams.values())
    x4 = w[0].detach().reshape(1, 2, 3, 32).requires_grad_()
    y = ext.gated_ffn(x4, *w[1:], ug, kept, "relu")
    assert y.shape == (1, 2, 3, 32)
    check_close("y", y, reference.gated_ffn(x4, *w[1:], ug, "relu"), None, torch.float32)
    (g,) = torch.autograd.grad(y.sum(), x4)
    assert g.shape == x4.shape


# --- torch.library integration --------------------------------------------------------------------------------------

# The op contract (test_op_contract.py) opchecks the ops as a training call reaches them (forward saving its
# tensors, backward with them and every gradient); here the forward that saves nothing and masked backwards.

def test_opcheck_forward_ops_saving_nothing():
    params, hg, active, kb = _attention_case(1, 3, 2, 32, "some", True)
    torch.library.opcheck(torch.ops.structprune.cpp_gated_attention.default,
                          (*params.values(), hg, active, kb, 2, False))
    params, ug, kept = _ffn_case(1, 3, 32, 16, "some")
    torch.library.opcheck(torch.ops.structprune.cpp_gated_ffn.default,
                          (*params.values(), ug, kept, "gelu_tanh", False))


@pytest.mark.parametrize("mask", [[True, False, True], [False, False, True], [True, True, False]],
                         ids=["frozen-weights", "gates-only", "frozen-gates"])
def test_opcheck_backward_ops_with_saved_tensors(mask):
    kwargs = {"output_mask": mask}
    params, hg, active, kb = _attention_case(1, 3, 2, 32, "some", True)
    args = (*params.values(), hg, active, kb, 2)
    with torch.no_grad():
        y, *saved = torch.ops.structprune.cpp_gated_attention(*args, True)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.structprune.cpp_gated_attention_backward.default,
                          (torch.randn_like(y), *args, *saved), kwargs)
    fparams, ug, kept = _ffn_case(1, 3, 32, 16, "some")
    fargs = (*[v.detach() for v in fparams.values()], ug.detach(), kept, "relu")
    y, pre, h = torch.ops.structprune.cpp_gated_ffn(*fargs, True)
    torch.library.opcheck(torch.ops.structprune.cpp_gated_ffn_backward.default, (torch.randn_like(y), *fargs, pre, h),
                          kwargs)


def test_opcheck_backward_ops_recomputing_with_mask():
    params, hg, active, kb = _attention_case(1, 3, 2, 32, "some", True)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _attn_args(params, hg, active, kb, 2))
    torch.library.opcheck(torch.ops.structprune.cpp_gated_attention_backward.default,
                          (torch.randn(1, 3, params["x"].shape[-1]), *args), {"output_mask": [False, True, False]})
    fparams, ug, kept = _ffn_case(1, 3, 32, 16, "some")
    fargs = (*[v.detach() for v in fparams.values()], ug.detach(), kept, "gelu")
    torch.library.opcheck(torch.ops.structprune.cpp_gated_ffn_backward.default, (torch.randn(1, 3, 32), *fargs),
                          {"output_mask": [False, True, False]})


@pytest.mark.parametrize("frozen", [None, "weights", "x+weights"])
def test_compiles_fullgraph(frozen):
    """Traced through the fake kernels, the masked backward (frozen leaves) included; gradients as the reference's."""
    torch._dynamo.reset()
    params, ug, kept = _ffn_case(2, 3, 32, 16, "some")
    hparams, hg, active, kb = _attention_case(2, 3, 2, 32, "some", True)
    leaves, off, _ = _freeze(params, ug, frozen or "none")
    hleaves, hoff, _ = _freeze(hparams, hg, frozen or "none")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(ffn_args, attn_args):
        return (ext.gated_ffn(*ffn_args, kept, "gelu").sum() +
                ext.gated_attention(*attn_args, active, kb, 2).square().sum())

    loss = f(list(leaves.values()), list(hleaves.values()))
    loss.backward()
    ref = reference.gated_ffn(*params.values(), ug, "gelu").sum()
    ref = ref + reference.gated_attention(*hparams.values(), hg, 2, key_bias=kb).square().sum()
    _close_fp32(loss, ref, "loss")
    ref.backward()
    for ls, fz, ps, g, kept_idx in ((leaves, off, params, ug, kept), (hleaves, hoff, hparams, hg, active)):
        _check_frozen_grads(ls, fz, {**{n: t.grad for n, t in ps.items()}, "gates": g.grad}, kept_idx)


# --- Philox hard-concrete sampler -----------------------------------------------------------------------------------

def _philox_py(ctr, key):
    M0, M1, W0, W1, mask = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c, k0, k1 = list(ctr), key[0], key[1]
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & mask, (k1 + W1) & mask
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c[3] ^ k1) & mask, p0 & mask]
    return c


def _uniforms_py(n, seed, offset):
    out = []
    for i in range(n):
        blk = i // 4
        w = _philox_py([blk & 0xFFFFFFFF, blk >> 32, offset & 0xFFFFFFFF, offset >> 32],
                       [seed & 0xFFFFFFFF, seed >> 32])[i % 4]
        out.append(((w >> 9) + 0.5) / 2**23)
    return torch.tensor(out, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)


def test_philox_known_answers():
    # Random123 known-answer vectors for philox4x32-10.
    assert torch.ops.structprune.philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                          0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert torch.ops.structprune.philox4x32_10([ones] * 4, [ones, ones]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                                             0x6D5451FD]
    ctr, key = [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]
    assert torch.ops.structprune.philox4x32_10(ctr, key) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    assert torch.ops.structprune.philox4x32_10(ctr, key) == _philox_py(ctr, key)


def test_hard_concrete_sample_mask_and_64_bit_seed():
    """The cpp sampler's own extras: a ``mask`` multiplied in, and seeds above 2**32 (both key words used)."""
    n, seed, offset = 13, 1234567890123, 42
    log_alpha = torch.randn(n, requires_grad=True)
    mask = (torch.arange(n) % 3 != 1).float()
    z = ext.hard_concrete_sample(log_alpha, seed, offset, mask=mask)
    la_ref = log_alpha.detach().clone().requires_grad_()
    z_ref = reference.hard_concrete_from_uniform(la_ref, _uniforms_py(n, seed, offset)) * mask
    check_close("z", z, z_ref, None, torch.float32)
    torch.testing.assert_close(ext.hard_concrete_sample(log_alpha, seed, offset, mask=mask), z)  # reproducible
    assert not torch.equal(ext.hard_concrete_sample(log_alpha, seed, offset + 1, mask=mask), z)
    w = torch.randn(n)
    (g,) = torch.autograd.grad((z * w).sum(), log_alpha)
    (g_ref,) = torch.autograd.grad((z_ref * w).sum(), la_ref)
    check_close("dlog_alpha", g, g_ref, None, torch.float32)


def test_failed_cuda_jit_build_is_reported(monkeypatch, tmp_path):
    """A CUDA JIT build that fails and leaves a CPU-only build warns, and says why in build_info / availability."""
    from torch.utils import cpp_extension

    built = []

    def fake_load(name, **kwargs):
        if "cuda" in name:
            raise RuntimeError("nvcc fatal: unsupported gpu architecture 'compute_999'")
        built.append(name)

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setenv("STRUCTPRUNE_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("STRUCTPRUNE_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setattr(build, "_cuda_build_error", None)
    with pytest.warns(RuntimeWarning, match="CUDA build of the C\\+\\+ extension failed"):
        build._jit_build()
    assert built == ["structprune_ext_cpu"]
    assert "compute_999" in ext.build_info()["cuda_build_error"]
    assert "compute_999" in ext.availability(torch.device("cuda"))


def _recipe():
    from pathlib import Path

    return build._load_recipe(Path(__file__).resolve().parents[2] / "csrc")


def test_build_recipe_arch_list_and_max_jobs():
    """csrc/build_recipe.py: STRUCTPRUNE_CUDA_ARCH_LIST, else TORCH_CUDA_ARCH_LIST, else sm_80 + sm_90a + PTX;
    MAX_JOBS from the cores and memory unless set; every source it lists exists, every .cpp/.cu of csrc/ is listed."""
    from pathlib import Path

    recipe = _recipe()
    arch = recipe.cuda_arch_list
    assert arch({}) == "8.0;9.0a;9.0+PTX"
    assert arch({"TORCH_CUDA_ARCH_LIST": "8.6"}) == "8.6"
    assert arch({"TORCH_CUDA_ARCH_LIST": "8.6", "STRUCTPRUNE_CUDA_ARCH_LIST": "12.0"}) == "12.0"
    assert recipe.build_env({}, with_cuda=False) == {"MAX_JOBS": recipe.default_max_jobs()}
    assert recipe.build_env({"MAX_JOBS": "3"}, with_cuda=True) == {"TORCH_CUDA_ARCH_LIST": "8.0;9.0a;9.0+PTX"}
    assert 1 <= int(recipe.default_max_jobs()) <= (os.cpu_count() or 1)
    csrc = Path(recipe.__file__).parent
    listed = set(recipe.sources(with_cuda=True))
    assert all((csrc / s).is_file() for s in listed)
    assert {str(p.relative_to(csrc)) for p in csrc.rglob("*") if p.suffix in (".cpp", ".cu")} == listed
    setup = (csrc.parent / "setup.py").read_text()
    assert "build_recipe.py" in setup and "register.cpp" not in setup  # setup.py lists no sources of its own


def test_jit_build_follows_the_recipe(monkeypatch, tmp_path, capsys):
    """The JIT build compiles the recipe's sources with its flags, under its arch list and MAX_JOBS (set for the
    build only), and says so on stderr first, once, unless STRUCTPRUNE_QUIET=1; loading from the cache is silent."""
    from torch.utils import cpp_extension

    recipe = _recipe()
    seen = []

    def fake_load(name, sources, extra_cflags, build_directory, **kwargs):
        seen.append((name, [os.path.relpath(s, recipe.__file__.rsplit("/", 1)[0]) for s in sources], extra_cflags,
                     os.environ.get("TORCH_CUDA_ARCH_LIST"), os.environ.get("MAX_JOBS")))
        if "cuda" in name:
            raise RuntimeError("no nvcc here")
        open(os.path.join(build_directory, name + ".so"), "w").close()

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(build, "_cuda_build_error", None)
    monkeypatch.setenv("STRUCTPRUNE_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("STRUCTPRUNE_CUDA_ARCH_LIST", "8.6")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.delenv("STRUCTPRUNE_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.delenv("STRUCTPRUNE_SANITIZE", raising=False)
    monkeypatch.delenv("STRUCTPRUNE_QUIET", raising=False)
    with pytest.warns(RuntimeWarning):
        build._jit_build()
    (cuda_name, cuda_src, cuda_flags, cuda_arch, cuda_jobs), (cpu_name, cpu_src, cpu_flags, cpu_arch, _) = seen
    assert cuda_src == recipe.sources(True) and cpu_src == recipe.sources(False)
    assert cuda_flags == recipe.cxx_flags(True) and cpu_flags == recipe.cxx_flags(False)
    assert (cuda_arch, cuda_jobs) == ("8.6", recipe.default_max_jobs()) and cpu_arch is None
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ and "MAX_JOBS" not in os.environ  # restored after the build
    err = capsys.readouterr().err
    assert err.count("structprune: building the C++ extension (first use, about a minute; cached under") == 1
    assert str(tmp_path) in err
    monkeypatch.setattr(torch.version, "cuda", None)
    build._jit_build()  # the library is there and newer than the sources: loaded from the cache, no notice
    assert "building the C++ extension" not in capsys.readouterr().err
    (tmp_path / "structprune_ext_cpu" / "structprune_ext_cpu.so").unlink()
    monkeypatch.setenv("STRUCTPRUNE_QUIET", "1")
    build._jit_build()
    assert "building the C++ extension" not in capsys.readouterr().err
