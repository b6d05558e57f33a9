"""Fuzzing: every available kernel backend against the pure-PyTorch reference (hypothesis).

Random batch (0 and 1 included), sequence length (1-300, never a multiple of 16), heads, head_dim, hidden and FFN
sizes, dtype (fp32 / bf16), contiguity of the input and the weights, gate masks (all kept, none kept, random),
padding (none, random lengths, fully padded sequences); forward and every gradient.
fp32 must match tightly; bf16 by the rule of ``tolerances.py`` (at most 2x the error of the reference computed
in bf16, against the fp32 reference). The gate gradient of a pruned head / unit is 0 (the kernels never form
it), the reference's is compared on the kept ones.

Profiles (environment variable ``STRUCTPRUNE_FUZZ``):
    ``ci`` (default)  20 examples per test (Triton: 5), derandomized (the same every run), no example database
    ``long``          500 examples per test (Triton: 62), random, the failures kept in ``.hypothesis/``

    STRUCTPRUNE_FUZZ=long python -m pytest -q tests/ops/test_fuzz_ops.py

A failure shrinks to a minimal case; keep it as an ``@example`` below so that it stays tested.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers.tolerances import check_close as _close

from structprune.ops import dispatch as ops
from structprune.ops import reference
from structprune.ops.activations import ACTIVATIONS

settings.register_profile("structprune-ci", max_examples=20, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("structprune-long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
PROFILE = settings.get_profile("structprune-" + os.environ.get("STRUCTPRUNE_FUZZ", "ci"))
TRITON_EXAMPLES = max(5, PROFILE.max_examples // 8)

BACKENDS = [b for b in ("cpp", "triton") if ops.availability(b, "cpu") is None]
if not BACKENDS:
    pytest.skip("no kernel backend available on CPU to fuzz", allow_module_level=True)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# "yes": every tensor contiguous; "matrices": x and weight matrices are transposed views; "no": biases and
# gates too (strided 1-D views)
CONTIGUITY = ("yes", "matrices", "no")


def seq_lengths(max_s: int = 300):
    return st.integers(1, max_s).filter(lambda s: s % 16 != 0)


@st.composite
def attention_cases(draw, max_b=3, max_s=300, max_h=4):
    return dict(
        B=draw(st.integers(0, max_b)), S=draw(seq_lengths(max_s)), H=draw(st.integers(1, max_h)),
        D=draw(st.sampled_from([1, 2, 4, 8, 12, 16, 24, 32])), E=draw(st.sampled_from([8, 24, 40, 64])),
        kept=draw(st.sampled_from(["all", "none", "random"])), pad=draw(st.sampled_from(["none", "random", "full"])),
        dtype=draw(st.sampled_from(list(DTYPES))), contiguous=draw(st.sampled_from(CONTIGUITY)),
        seed=draw(st.integers(0, 2**16)))


@st.composite
def ffn_cases(draw, max_b=3, max_s=300):
    return dict(
        B=draw(st.integers(0, max_b)), S=draw(seq_lengths(max_s)), E=draw(st.sampled_from([8, 24, 40, 64])),
        I=draw(st.integers(1, 200)), kept=draw(st.sampled_from(["all", "none", "random"])),
        activation=draw(st.sampled_from(list(ACTIVATIONS))), dtype=draw(st.sampled_from(list(DTYPES))),
        contiguous=draw(st.sampled_from(CONTIGUITY)), seed=draw(st.integers(0, 2**16)))


# ----------------------------------------------------------------------------------------------- building inputs
def _leaf(shape, scale, gen, contiguous):
    """A random fp32 tensor, laid out as ``contiguous`` (:data:`CONTIGUITY`) says; the values are the same."""
    t = torch.randn(*shape, generator=gen) * scale
    if contiguous != "yes" and len(shape) >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif contiguous == "no":
        t = torch.stack([t, t], -1)[..., 0]  # stride 2
    return t


def _gates(n, kept, gen, contiguous="yes"):
    g = torch.rand(n, generator=gen) * 0.9 + 0.1
    if kept == "none":
        g.zero_()
    elif kept == "random":
        g[torch.rand(n, generator=gen) < 0.5] = 0.0
    index = torch.nonzero(g).flatten()
    return (torch.stack([g, g], -1)[..., 0] if contiguous == "no" else g), index


def _key_bias(B, S, pad, dtype, gen):
    if pad == "none":
        return None
    neg = torch.finfo(dtype).min  # what an HF model in this dtype puts on padded keys
    bias = torch.zeros(B, S)
    for b in range(B):
        valid = int(torch.randint(1, S + 1, (1,), generator=gen))
        if pad == "full" and b == B - 1:
            valid = 0  # the last sequence of the batch is all padding
        bias[b, valid:] = neg
    return bias


def _cast(leaves, dtype):
    """Everything but the gates (the last leaf, kept fp32 as the modules pass them) in ``dtype``, as new leaves."""
    return [t.detach().to(dtype).requires_grad_() if i < len(leaves) - 1 else t.detach().requires_grad_()
            for i, t in enumerate(leaves)]


def _run(fn, leaves, dy):
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype), allow_unused=True) if out.numel() else \
        [torch.zeros_like(t) for t in leaves]
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def _amax(t) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def _compare(kernel, ref, leaves, dtype, names, gate_index, dy):
    """Kernel in ``dtype`` vs the fp32 reference (and the reference in ``dtype`` for the half tolerance)."""
    out, grads = _run(kernel, _cast(leaves, dtype), dy)
    ref_out, ref_grads = _run(ref, _cast(leaves, torch.float32), dy)
    plain_out, plain_grads = (ref_out, ref_grads) if dtype == torch.float32 else _run(ref, _cast(leaves, dtype), dy)
    assert out.dtype == dtype
    _close("out", out, ref_out, plain_out, dtype)
    n_gates = leaves[-1].numel()
    pruned = torch.ones(n_gates, dtype=torch.bool)
    pruned[gate_index] = False
    ref_by_name = dict(zip(names, ref_grads))
    for name, g, r, p in zip(names, grads, ref_grads, plain_grads):
        scale = None
        if name == "bk":  # exactly 0 in exact arithmetic (softmax ignores a per-query shift): round-off of wk's terms
            scale = max(_amax(ref_by_name["wk"]), _amax(ref_by_name["bq"]))
        if name == "gates":
            assert torch.all(g[pruned] == 0), "the gradient of a pruned gate must be 0"
            g, r, p = g[gate_index], r[gate_index], p[gate_index]
        _close(f"grad {name}", g, r, p, dtype, scale)


# ----------------------------------------------------------------------------------------------- the checks
ATTN_NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "gates")


def check_attention(backend: str, case: dict) -> None:
    B, S, H, D, E = case["B"], case["S"], case["H"], case["D"], case["E"]
    dtype, contiguous = DTYPES[case["dtype"]], case["contiguous"]
    gen = torch.Generator().manual_seed(case["seed"])
    HD = H * D
    x = _leaf((B, S, E), 1.0, gen, contiguous)
    w = [_leaf((HD, E), E ** -0.5, gen, contiguous), _leaf((HD,), 0.1, gen, contiguous),
         _leaf((HD, E), E ** -0.5, gen, contiguous), _leaf((HD,), 0.1, gen, contiguous),
         _leaf((HD, E), E ** -0.5, gen, contiguous), _leaf((HD,), 0.1, gen, contiguous),
         _leaf((E, HD), HD ** -0.5, gen, contiguous), _leaf((E,), 0.1, gen, contiguous)]
    gates, active = _gates(H, case["kept"], gen, contiguous)
    key_bias = _key_bias(B, S, case["pad"], dtype, gen)
    dy = torch.randn(B, S, E, generator=gen)
    mod = ops._provider(backend)

    def kernel(*leaves):
        return mod.gated_attention(*leaves, active, key_bias, H)

    def ref(*leaves):
        return reference.gated_attention(*leaves, H, key_bias=key_bias)

    _compare(kernel, ref, [x, *w, gates], dtype, ATTN_NAMES, active, dy)


FFN_NAMES = ("x", "w1", "b1", "w2", "b2", "gates")


def check_ffn(backend: str, case: dict) -> None:
    B, S, E, I = case["B"], case["S"], case["E"], case["I"]
    dtype, contiguous = DTYPES[case["dtype"]], case["contiguous"]
    gen = torch.Generator().manual_seed(case["seed"])
    leaves = [_leaf((B, S, E), 1.0, gen, contiguous), _leaf((I, E), E ** -0.5, gen, contiguous),
              _leaf((I,), 0.1, gen, contiguous), _leaf((E, I), I ** -0.5, gen, contiguous),
              _leaf((E,), 0.1, gen, contiguous)]
    gates, kept = _gates(I, case["kept"], gen, contiguous)
    dy = torch.randn(B, S, E, generator=gen)
    mod = ops._provider(backend)

    def kernel(*ls):
        return mod.gated_ffn(*ls, kept, case["activation"])

    def ref(*ls):
        return reference.gated_ffn(*ls, case["activation"])

    _compare(kernel, ref, [*leaves, gates], dtype, FFN_NAMES, kept, dy)


# ----------------------------------------------------------------------------------------------- tests
def tiny_head_dim_in_bf16(case: dict) -> bool:
    return case["dtype"] == "bf16" and case["D"] <= 2


# Found by the fuzzer: in bf16 with head_dim 1 or 2, the cpp attention's gradients of bk/bv/bq/gates exceed
# 2x the error of the plain bf16 reference (e.g. grad bv 0.056 vs 2 x 0.0092 + 0.017); fine from head_dim 4.
TINY_HEAD_DIM_BF16 = [
    dict(B=1, S=18, H=1, D=1, E=24, kept="all", pad="random", dtype="bf16", contiguous="no", seed=0),
    dict(B=2, S=18, H=1, D=2, E=24, kept="all", pad="random", dtype="bf16", contiguous="yes", seed=0),
]


@pytest.mark.xfail(strict=False, reason="bf16 attention gradients at head_dim <= 2 exceed the 2x-of-plain-bf16 "
                                        "tolerance (found by fuzzing; issue 16)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TINY_HEAD_DIM_BF16, ids=lambda c: f"D{c['D']}-S{c['S']}-{c['pad']}")
def test_bf16_tiny_head_dim(backend, case):
    check_attention(backend, case)


# Found by the long profile on the cpp backend, bf16, long sequences (kept as regressions; xfail until fixed):
# attention, one sequence that is all padding: grad wv 0.553 > 2 x 0.145 + 0.24;
# FFN with a single unit over 165 tokens: grad b1 0.0952 > 2 x 0.00142 + 0.061.
FOUND_BF16 = [
    ("attention", dict(B=1, S=289, H=4, D=8, E=8, kept="random", pad="full", dtype="bf16", contiguous="no",
                       seed=415)),
    ("ffn", dict(B=1, S=165, E=24, I=1, kept="random", activation="gelu", dtype="bf16", contiguous="no",
                 seed=2488)),
]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension unavailable")
@pytest.mark.xfail(strict=False, reason="cpp bf16 gradients over long sequences exceed the 2x-of-plain-bf16 "
                                        "tolerance (found by fuzzing; issue 16)")
@pytest.mark.parametrize("kind, case", FOUND_BF16, ids=[k for k, _ in FOUND_BF16])
def test_cpp_bf16_found_by_fuzzing(kind, case):
    (check_attention if kind == "attention" else check_ffn)("cpp", case)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension unavailable")
@settings(PROFILE)
@given(case=attention_cases())
def test_fuzz_cpp_attention(case):
    assume(not tiny_head_dim_in_bf16(case))  # a known failure, kept below as explicit (xfail) tests
    check_attention("cpp", case)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension unavailable")
@settings(PROFILE)
@given(case=ffn_cases())
def test_fuzz_cpp_ffn(case):
    check_ffn("cpp", case)


# Triton runs in its interpreter on CPU (slow): fewer and smaller examples.
@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@settings(PROFILE, max_examples=TRITON_EXAMPLES)
@given(case=attention_cases(max_b=2, max_s=100, max_h=2))
def test_fuzz_triton_attention(case):
    assume(not tiny_head_dim_in_bf16(case) and case["contiguous"] != "no")  # known failures, kept as tests
    check_attention("triton", case)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@settings(PROFILE, max_examples=TRITON_EXAMPLES)
@given(case=ffn_cases(max_b=2, max_s=100))
def test_fuzz_triton_ffn(case):
    assume(case["contiguous"] != "no")  # a known failure, kept as explicit (xfail) tests
    check_ffn("triton", case)


# Found by fuzzing: the Triton kernels read strided 1-D biases and gates as if they were contiguous (silently
# wrong outputs, e.g. max error 0.29 with a stride-2 b2); the cpp backend handles them.
STRIDED_VECTORS = [
    ("ffn", dict(B=2, S=5, E=24, I=7, kept="all", activation="relu", dtype="fp32", contiguous="no", seed=0)),
    ("attention", dict(B=1, S=3, H=1, D=8, E=8, kept="all", pad="none", dtype="fp32", contiguous="no", seed=0)),
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@pytest.mark.parametrize("kind, case", STRIDED_VECTORS, ids=[k for k, _ in STRIDED_VECTORS])
def test_triton_strided_vectors(kind, case):
    (check_attention if kind == "attention" else check_ffn)("triton", case)


# ----------------------------------------------------------------------------------------------- whole models
@st.composite
def model_cases(draw):
    layers, heads = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return dict(family=draw(st.sampled_from(["bert", "roberta"])), layers=layers, heads=heads,
                head_dim=draw(st.sampled_from([4, 8, 12])), ffn=draw(st.integers(1, 48)),
                masks=[draw(st.sampled_from(["all", "none", "random", "heads off", "ffn off"])) for _ in range(layers)],
                B=draw(st.integers(1, 3)), S=draw(seq_lengths(70)), pad=draw(st.sampled_from(["none", "random", "full"])),
                seed=draw(st.integers(0, 2**16)))


def check_model(backend: str, case: dict) -> None:
    """A patched tiny BERT/RoBERTa (per-layer masks, whole layers off included) on ``backend`` vs "torch": logits
    and every parameter gradient, fp32, with an HF padding mask (a fully padded sequence included). Training mode
    (gradients) with every dropout at 0 and gate sampling off, so both compute the same function."""
    import structprune as sp
    from helpers.models import tiny_model

    L, H, D, I = case["layers"], case["heads"], case["head_dim"], case["ffn"]
    model = sp.patch(tiny_model(case["family"], "qa", layers=L, heads=H, hidden=H * D, ffn=I, seed=case["seed"]))
    model.train()  # gradients flow, but dropout off so that both backends compute the same function
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    gen = torch.Generator().manual_seed(case["seed"])
    heads, ffn = torch.rand(L, H, generator=gen) < 0.5, torch.rand(L, I, generator=gen) < 0.5
    for i, kind in enumerate(case["masks"]):
        if kind in ("all", "ffn off"):
            heads[i] = True
        if kind in ("none", "heads off"):
            heads[i] = False
        if kind == "all":
            ffn[i] = True
        if kind in ("none", "ffn off"):
            ffn[i] = False
    sp.set_masks(model, heads=heads, ffn=ffn)
    sp.set_gate_sampling(model, False)
    B, S = case["B"], case["S"]
    ids = torch.randint(3, 120, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    if case["pad"] != "none":
        for b in range(B):
            mask[b, int(torch.randint(1, S + 1, (1,), generator=gen)):] = 0
        if case["pad"] == "full":
            mask[-1] = 0

    def run(name):
        sp.set_backend(name)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask)
        logits = torch.cat([out.start_logits, out.end_logits], -1)
        logits.backward(torch.ones_like(logits) / logits.numel())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    try:
        expected, expected_grads = run("torch")
        got, grads = run(backend)
    finally:
        sp.set_backend("torch")
    _close("logits", got, expected, None, torch.float32)
    assert grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        _close(name, g, expected_grads[name], None, torch.float32)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension unavailable")
@settings(PROFILE, max_examples=max(5, PROFILE.max_examples // 2))
@given(case=model_cases())
def test_fuzz_cpp_patched_model(case):
    check_model("cpp", case)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@settings(PROFILE, max_examples=max(2, PROFILE.max_examples // 10))
@given(case=model_cases())
def test_fuzz_triton_patched_model(case):
    assume(case["S"] <= 24 and case["B"] <= 2 and case["layers"] <= 2)  # the interpreter is slow
    check_model("triton", case)
