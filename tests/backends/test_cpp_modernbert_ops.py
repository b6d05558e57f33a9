"""The "cpp" backend's ModernBERT ops (structprune.backends.cpp.modernbert, csrc/glu_ffn.cpp) against the reference:
the GLU FFN on packed kept units (forward, both backward paths, output masks, biases None or present, 0 / some /
all units kept, fp32 and bf16, autocast, the pack cache, opcheck, torch.compile) and rotary / sliding-window
attention over the kept heads (forward and gradients, windows, padding, biases, fp32 and bf16). Tolerances:
tests/helpers/tolerances.py (pruned units' and heads' gate gradients are 0 here, as for the other kernel ops)."""
from __future__ import annotations

import pytest
import torch
from helpers.tolerances import check_close

import structprune as sp
import structprune.backends.cpp.ops as ext
from structprune.backends.cpp import modernbert as mb
from structprune.ops import dispatch, reference
from structprune.ops.activations import ACTIVATIONS
from structprune.ops.support import OpInputs

if ext.load_error() is not None:
    pytest.skip(f"C++ extension unavailable: {ext.load_error()}", allow_module_level=True)

B, S, E, I = 2, 5, 24, 13  # odd sizes
NEG = torch.finfo(torch.float32).min


def _kept(n, kept, gen):
    if kept == "none":
        return torch.zeros(0, dtype=torch.long)
    if kept == "all":
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[: n // 2].sort().values


def _gates(n, index, gen):
    g = torch.zeros(n)
    g[index] = 0.25 + torch.rand(index.numel(), generator=gen)  # not all 1: gate folding is exercised
    return g


def glu_case(kept="some", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.3: torch.randn(*s, generator=gen) * scale  # noqa: E731
    params = dict(x=r(B, S, E, scale=1.0), w1=r(2 * I, E), b1=r(2 * I) if bias else None, w2=r(E, I),
                  b2=r(E) if bias else None)
    kept_units = _kept(I, kept, gen)
    return params, _gates(I, kept_units, gen), kept_units


def _leaves(params, gates, dtype):
    ps = {k: None if v is None else v.to(dtype).requires_grad_() for k, v in params.items()}
    return ps, gates.clone().requires_grad_()


def _grads(y, tensors, grad_out):
    live = [t for t in tensors if t is not None]
    gs = iter(torch.autograd.grad(y, live, grad_out.to(y.dtype)))
    return [None if t is None else next(gs) for t in tensors]


def _run(fn, params, gates, dtype, grad_out):
    ps, g = _leaves(params, gates, dtype)
    y = fn(ps, g)
    tensors = [*ps.values(), g]
    return y, _grads(y, tensors, grad_out)


def _check_all(name, got, ref32, plain, dtype, kept):
    y, grads = got
    y32, grads32 = ref32
    yp, gradsp = plain
    check_close(f"{name} y", y, y32, yp, dtype)
    names = ["x", "w1", "b1", "w2", "b2", "gates"]
    for n, a, r, p in zip(names, grads, grads32, gradsp):
        if r is None:
            assert a is None
            continue
        if n == "gates":  # kept units: the reference's; pruned units: 0 (the op never forms their activations)
            assert (a[~torch.isin(torch.arange(a.numel()), kept)] == 0).all()
            a, r, p = a[kept], r[kept], p[kept]
        check_close(f"{name} d{n}", a, r, p, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kept", ["none", "some", "all"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_glu_ffn_matches_the_reference(activation, kept, bias, dtype):
    params, gates, kept_units = glu_case(kept, bias, seed=hash((activation, kept, bias)) % 1000)
    grad_out = torch.randn(B, S, E, generator=torch.Generator().manual_seed(7))
    ref = lambda ps, g: reference.gated_glu_ffn(*ps.values(), g, activation)  # noqa: E731
    ker = lambda ps, g: mb.gated_glu_ffn(*ps.values(), g, kept_units, activation)  # noqa: E731
    got = _run(ker, params, gates, dtype, grad_out)
    assert got[0].dtype == dtype
    rounded = {k: None if v is None else v.to(dtype).float() for k, v in params.items()}
    ref32 = _run(ref, rounded, gates, torch.float32, grad_out)
    plain = _run(ref, params, gates, dtype, grad_out)
    _check_all(f"glu[{activation},{kept}]", got, ref32, plain, dtype, kept_units)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kept", ["none", "some", "all"])
def test_glu_saved_tensors_and_the_recomputing_backward_agree(kept, bias):
    params, gates, kept_units = glu_case(kept, bias, seed=3)
    op = torch.ops.structprune.cpp_gated_glu_ffn
    ps, g = _leaves(params, gates, torch.float32)
    args = (*ps.values(), g, kept_units, "gelu")
    y0, *unsaved = op(*args, False)
    y1, pre, h = op(*args, True)
    assert all(t.shape == (0,) for t in unsaved)
    K = kept_units.numel()
    assert pre.shape == (B * S, 2 * K) and h.shape == (B * S, K)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    rows = torch.cat([kept_units, kept_units + I])
    with torch.no_grad():
        want_pre = torch.nn.functional.linear(ps["x"], ps["w1"][rows], None if bias is False else ps["b1"][rows])
        torch.testing.assert_close(pre, want_pre.reshape(B * S, 2 * K))
        torch.testing.assert_close(h, torch.nn.functional.gelu(pre[:, :K]) * pre[:, K:])
    grad_out = torch.randn(B, S, E)
    tensors = [*ps.values(), g]
    for a, b in zip(_grads(y1, tensors, grad_out), _grads(y0, tensors, grad_out)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True]])
def test_glu_backward_honours_the_output_mask(mask):
    params, gates, kept_units = glu_case("some", True)
    args = (torch.randn(B, S, E), *params.values(), gates, kept_units, "relu")
    full = torch.ops.structprune.cpp_gated_glu_ffn_backward(*args)
    part = torch.ops.structprune.cpp_gated_glu_ffn_backward(*args, output_mask=mask)
    wanted = [mask[0], mask[1], mask[1], mask[1], mask[1], mask[2]]
    for f, p, w in zip(full, part, wanted):
        if w:
            torch.testing.assert_close(p, f)
        else:
            assert p.shape == (0,)
    # no bias: db1 / db2 are empty even when the weights' gradients are wanted
    nb = torch.ops.structprune.cpp_gated_glu_ffn_backward(torch.randn(B, S, E), params["x"], params["w1"], None,
                                                          params["w2"], None, gates, kept_units, "relu")
    assert nb[2].shape == (0,) and nb[4].shape == (0,) and nb[1].shape == (2 * I, E)


def test_glu_frozen_weights_and_x_of_any_rank():
    params, gates, kept_units = glu_case("some", False)
    x = params["x"].reshape(B * S, E).requires_grad_()
    g = gates.clone().requires_grad_()
    y = mb.gated_glu_ffn(x, params["w1"], None, params["w2"], None, g, kept_units, "gelu")
    want = reference.gated_glu_ffn(params["x"], params["w1"], None, params["w2"], None, gates, "gelu")
    torch.testing.assert_close(y, want.reshape(B * S, E), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert x.grad.shape == x.shape and g.grad.shape == g.shape


def test_glu_pack_cache_follows_mask_gate_and_weight_changes():
    params, gates, kept_units = glu_case("some", True)
    p = list(params.values())

    def check(g, kept):
        got = mb.gated_glu_ffn(*p, g, kept, "gelu")
        torch.testing.assert_close(got, reference.gated_glu_ffn(*p, g, "gelu"), atol=1e-5, rtol=1e-5)

    check(gates, kept_units)
    other = torch.tensor([0, 4, 12])
    check(_gates(I, other, torch.Generator().manual_seed(1)), other)  # another mask
    gates2 = gates * 0.5
    check(gates2, kept_units)  # other gate values (folded into the packed w2)
    with torch.no_grad():
        p[1].mul_(1.5)  # an in-place weight update
        p[2].add_(0.1)
    check(gates2, kept_units)


def test_glu_under_autocast_gives_bf16_and_fp32_gradients():
    params, gates, kept_units = glu_case("some", True)
    ps, g = _leaves(params, gates, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mb.gated_glu_ffn(*ps.values(), g, kept_units, "gelu")
        want = reference.gated_glu_ffn(*params.values(), gates, "gelu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in ps.values())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_glu_opcheck(bias):
    params, gates, kept_units = glu_case("some", bias)
    ps, g = _leaves(params, gates, torch.float32)
    for save in (False, True):
        torch.library.opcheck(torch.ops.structprune.cpp_gated_glu_ffn.default,
                              (*ps.values(), g, kept_units, "gelu_tanh", save))
    plain = [None if v is None else v.detach() for v in ps.values()]
    y, pre, h = torch.ops.structprune.cpp_gated_glu_ffn(*plain, gates, kept_units, "relu", True)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.structprune.cpp_gated_glu_ffn_backward.default,
                              (torch.randn_like(y), *plain, gates, kept_units, "relu", pre, h),
                              {"output_mask": mask})
        torch.library.opcheck(torch.ops.structprune.cpp_gated_glu_ffn_backward.default,
                              (torch.randn_like(y), *plain, gates, kept_units, "relu"), {"output_mask": mask})


def test_glu_compiles_fullgraph():
    params, gates, kept_units = glu_case("some", True)
    ps, g = _leaves(params, gates, torch.float32)
    fn = torch.compile(lambda *a: mb.gated_glu_ffn(*a, kept_units, "gelu"), fullgraph=True, backend="aot_eager")
    y = fn(*ps.values(), g)
    torch.testing.assert_close(y, reference.gated_glu_ffn(*params.values(), gates, "gelu"), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert ps["w1"].grad is not None and g.grad is not None


def test_dispatcher_runs_cpp_and_refuses_glu_off_the_cpu():
    params, gates, kept_units = glu_case("some", True)
    with sp.use_backend("cpp"):
        dispatch.gated_glu_ffn(*params.values(), gates, kept_units, "gelu")
    assert sp.last_backends()["ffn"] == "cpp"
    assert ext.BACKEND.not_supported_reasons(OpInputs("ffn", torch.device("cpu"), torch.float32, glu=True)) == []
    assert any("CPU-only" in r for r in
               ext.BACKEND.not_supported_reasons(OpInputs("ffn", torch.device("cuda"), torch.float32, glu=True)))
    assert ext.BACKEND.not_supported_reasons(OpInputs("attention", torch.device("cpu"), torch.float32, num_heads=2,
                                                      rotary=True, window=3)) == []


# --- rotary / sliding-window attention ------------------------------------------------------------------------------
NH, D, SA = 3, 8, 11


def rotary_tables(seq=SA, dim=D, theta=50.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    emb = torch.cat([torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]] * 2, -1)[None]
    return emb.cos(), emb.sin()


def attention_case(kept, bias, padding, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.4: torch.randn(*s, generator=gen) * scale  # noqa: E731
    A = NH * D
    names = ["x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo"]
    shapes = [(B, SA, E), (A, E), (A,), (A, E), (A,), (A, E), (A,), (E, A), (E,)]
    params = {n: (r(*s) if n[0] != "b" or bias else None) for n, s in zip(names, shapes)}
    active = _kept(NH, kept, gen) if kept != "some" else torch.tensor([0, 2])
    key_bias = None
    if padding:
        key_bias = torch.zeros(B, SA)
        key_bias[1, 7:] = NEG
    return params, _gates(NH, active, gen), active, key_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [-1, 0, 3])
@pytest.mark.parametrize("bias,padding", [(True, True), (False, False), (False, True)])
@pytest.mark.parametrize("kept", ["some", "all", "none"])
def test_rotary_attention_matches_the_reference(kept, bias, padding, window, dtype):
    params, gates, active, key_bias = attention_case(kept, bias, padding, seed=window + 5)
    cos, sin = rotary_tables()
    grad_out = torch.randn(B, SA, E, generator=torch.Generator().manual_seed(2))
    if padding:  # the padded sequence's padding queries: compared nowhere (their band may hold no key)
        grad_out[1, 7:] = 0

    def ref(ps, g):
        mask = reference.banded_key_mask(key_bias, SA, window, ps["x"].dtype, ps["x"].device)
        return reference.gated_rotary_attention(*ps.values(), g, NH, cos, sin, window=window, attn_mask=mask)

    def ker(ps, g):
        return mb.gated_rotary_attention(*ps.values(), g, active, key_bias, cos, sin, window, NH)

    keep = torch.ones(B, SA, 1, dtype=torch.bool)
    if padding:
        keep[1, 7:] = False

    def run(fn, prm, dt):
        ps, g = _leaves(prm, gates, dt)
        y = fn(ps, g)
        tensors = [*ps.values(), g]
        return y * keep, _grads(y, tensors, grad_out)

    got = run(ker, params, dtype)
    rounded = {k: None if v is None else v.to(dtype).float() for k, v in params.items()}
    ref32, plain = run(ref, rounded, torch.float32), run(ref, params, dtype)
    names = list(params) + ["gates"]
    check_close("y", got[0], ref32[0], plain[0], dtype)
    for n, a, r, p in zip(names, got[1], ref32[1], plain[1]):
        if r is None:
            assert a is None
            continue
        if n == "gates":
            pruned = ~torch.isin(torch.arange(NH), active)
            assert (a[pruned] == 0).all()
            a, r, p = a[active], r[active], p[active]
        check_close(f"d{n}", a, r, p, dtype)


@pytest.mark.parametrize("window", [0, 5, 64, 70, 147])
@pytest.mark.parametrize("padding", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("Dq", [16, 6], ids=["hd16", "hd6"])  # 16: the AVX2 path where the CPU has it; 6: plain loops
def test_banded_attention_matches_one_masked_attention(window, padding, Dq):
    """S = 150: three blocks of 64 queries for the C++ kernel (no gradient), each query visiting only its band's
    keys; the same output as one attention over all keys with the banded mask (padding queries excluded, as above),
    with q / k / v strided views like the op's; with gradients (the masked SDPA) the same gradients too."""
    gen = torch.Generator().manual_seed(window)
    Bq, Hq, Sq = 2, 3, 150
    qkv = torch.randn(Bq, Sq, 3, Hq, Dq, generator=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, S, D] views, as the op makes them
    key_bias, keep = None, torch.ones(Bq, Sq, 1, 1)
    if padding:
        key_bias = torch.zeros(Bq, Sq)
        key_bias[1, 120:] = NEG
        keep[1, 120:] = 0
    mask = reference.banded_key_mask(key_bias, Sq, window, torch.float32, "cpu")

    def want_of(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2) * keep

    with torch.no_grad():
        got = mb.banded_attention(q, k, v, key_bias, window) * keep
        torch.testing.assert_close(got, want_of(q, k, v), atol=1e-5, rtol=1e-5)
        half = mb.banded_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_bias, window)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float() * keep, got, atol=3e-2, rtol=3e-2)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    got = mb.banded_attention(*leaves, key_bias, window) * keep
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = want_of(*ref_leaves)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dy = torch.randn(got.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, ref_leaves, dy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_banded_kernel_opcheck_and_refusals():
    q = torch.randn(1, 2, 70, 8)
    torch.library.opcheck(torch.ops.structprune.cpp_banded_attention.default, (q, q, q, None, 3, 0.35, 64),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="window >= 0"):
        torch.ops.structprune.cpp_banded_attention(q, q, q, None, -1, 0.35, 64)
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.structprune.cpp_banded_attention(q, q[:, :1], q, None, 3, 0.35, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared", "per_sequence"])
def test_rotary_kernel_matches_the_reference(dtype, per_sequence):
    """cpp_rotary_qk on the fused projection [B, S, 3, A, D] gives the reference's rotated q and k, rounded once."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, SA, 3, NH, D, generator=gen).to(dtype)
    cos, sin = rotary_tables()
    if per_sequence:
        cos, sin = torch.cat([cos, cos.roll(1, 1)]), torch.cat([sin, sin.roll(1, 1)])
    got = torch.ops.structprune.cpp_rotary_qk(qkv, cos, sin)
    assert got.shape == (B, SA, 2, NH, D) and got.dtype == dtype
    for p in range(2):
        want = reference.apply_rotary(qkv[:, :, p].transpose(1, 2), cos, sin).transpose(1, 2)
        torch.testing.assert_close(got[:, :, p], want, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)
    torch.library.opcheck(torch.ops.structprune.cpp_rotary_qk.default, (qkv, cos, sin),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.structprune.cpp_rotary_qk(qkv, cos[:, :-1], sin)


def test_rotary_attention_pack_cache_follows_mask_gate_and_weight_changes():
    """Without gradients the kept heads' packed weights are cached per layer (structprune/backends/cpp/packing.py):
    a new mask, new gate values, an in-place update and a rewrite through .data each give the new result."""
    from structprune.backends.cpp import packing

    params, gates, active, key_bias = attention_case("some", True, True, seed=3)
    p = list(params.values())
    cos, sin = rotary_tables()
    keep = torch.ones(B, SA, 1)
    keep[1, 7:] = 0

    def check(g, act):
        with torch.no_grad():
            got = mb.gated_rotary_attention(*p, g, act, key_bias, cos, sin, 3, NH)
            mask = reference.banded_key_mask(key_bias, SA, 3, torch.float32, "cpu")
            want = reference.gated_rotary_attention(*p, g, NH, cos, sin, window=3, attn_mask=mask)
        torch.testing.assert_close(got * keep, want * keep, atol=1e-5, rtol=1e-5)

    packing.clear()
    check(gates, active)
    assert packing.size() == 1
    check(gates, active)  # a hit
    other = torch.tensor([1])
    check(_gates(NH, other, torch.Generator().manual_seed(1)), other)  # another mask
    check(gates * 0.5, active)  # other gate values (folded into wo's kept columns)
    with torch.no_grad():
        p[1].mul_(1.5)  # an in-place update of wq
    check(gates, active)
    p[7].data = p[7].data * 2.0  # a rewrite of wo through .data
    check(gates, active)
    p[3].data.copy_(p[3].data * 0.5)  # a rewrite of wk's values through .data: no version bump
    check(gates, active)
    sp.clear_cache()
    assert packing.size() == 0
