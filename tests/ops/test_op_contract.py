"""The op contract, run by every registered backend available here (PyTorch's OpInfo idea).

Each backend in :mod:`structprune.ops.registry` that can run on this machine's devices is checked against the
pure-PyTorch reference: gated attention, gated FFN and hard-concrete sampling, forward and every gradient, over
shapes (sequence 1, odd, not a multiple of 16, head_dim not a power of 2), kept fractions (no head/unit, some,
all), dtypes (fp32, bf16, fp16) and frozen inputs (the backward's output_mask), with the one tolerance rule of
``tolerances.check_close``; every custom op a call reaches, forward and backward, passes ``torch.library.opcheck``.
A new backend runs all of this by registering; its own test file keeps only what is specific to it.

The grids are crossed in part, not in full, to bound the time the Triton interpreter takes: shape x kept in fp32,
dtype x kept (or activation) on one padded shape, every frozen-input pattern on one shape.
"""
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.tolerances import check_close

from structprune.ops import registry as backends
from structprune.model import gates
from structprune.ops import dispatch as ops
from structprune.ops import reference
from structprune.ops.activations import ACTIVATIONS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TARGETS = [pytest.param((name, device), id=f"{name}-{device}") for name in backends.names() for device in DEVICES
           if ops.availability(name, device) is None]
HALF = [torch.bfloat16, torch.float16]
NEG = torch.finfo(torch.float32).min
ATTN_NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "gates")
FFN_NAMES = ("x", "w1", "b1", "w2", "b2", "gates")
# Inputs frozen with requires_grad_(False) -> the backward's output_mask (x, weights and biases, gates) follows.
FROZEN = {"none": (), "weights": ("weights",), "gates": ("gates",), "x": ("x",), "x+weights": ("x", "weights"),
          "one-weight": ("w0",)}


@pytest.fixture(params=TARGETS)
def target(request):
    """(the backend object, the device its tensors live on)."""
    name, device = request.param
    return backends.load(name), torch.device(device)


def _dtype_or_skip(backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} does not take {dtype}")


def _kept(n, kept, gen):
    if kept == "none":
        return torch.zeros(0, dtype=torch.long)
    if kept == "all":
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:max(1, n // 2)].sort().values


def _gates(n, index, gen):
    g = torch.zeros(n)
    g[index] = 0.25 + torch.rand(index.numel(), generator=gen)  # non-zero and not all 1
    return g


def attention_case(B, S, E, H, D, kept, pad, device, seed=0):
    """fp32 leaves (x, weights, biases, gates), the active heads and the key bias (or None)."""
    gen = torch.Generator().manual_seed(seed)
    HD = H * D

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    leaves = [rnd(B, S, E, scale=1.0), rnd(HD, E, scale=E ** -0.5), rnd(HD, scale=0.1), rnd(HD, E, scale=E ** -0.5),
              rnd(HD, scale=0.1), rnd(HD, E, scale=E ** -0.5), rnd(HD, scale=0.1), rnd(E, HD, scale=HD ** -0.5),
              rnd(E, scale=0.1)]
    active = _kept(H, kept, gen)
    leaves.append(_gates(H, active, gen).to(device))
    key_bias = None
    if pad:
        key_bias = torch.zeros(B, S)
        for b in range(1, B):  # row 0 unpadded, later rows padded at the end, never every key
            key_bias[b, max(1, S - 3 * b):] = NEG
        key_bias = key_bias.to(device)
    return leaves, active.to(device), key_bias


def ffn_case(B, S, E, I, kept, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    leaves = [rnd(B, S, E, scale=1.0), rnd(I, E, scale=E ** -0.5), rnd(I, scale=0.5), rnd(E, I, scale=I ** -0.5),
              rnd(E, scale=0.1)]
    kept_units = _kept(I, kept, gen)
    leaves.append(_gates(I, kept_units, gen).to(device))
    return leaves, kept_units.to(device)


def _frozen(names, frozen):
    parts = FROZEN[frozen]
    off = {n for n in names if n in parts}
    if "weights" in parts:
        off.update(names[1:-1])
    if "w0" in parts:
        off.add(names[1])
    return off


def run(fn, leaves, dtype, dy, frozen=(), gates_last=True):
    """``fn`` on copies of ``leaves`` in ``dtype`` (the gates, last, stay fp32 as the modules pass them); the output
    and the gradient of each leaf (None for the frozen ones)."""
    last = len(leaves) - 1 if gates_last else len(leaves)
    leaves = [t.detach().to(dtype if i < last else torch.float32).requires_grad_(i not in frozen)
              for i, t in enumerate(leaves)]
    out = fn(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, dy.to(out.dtype)) if wanted else ())
    return out, [next(grads) if t.requires_grad else None for t in leaves]


def check(backend, names, got, ref, plain, dtype, kept_index):
    """Output and gradients within the tolerance rule; the gate gradient on the kept entries (a kernel never forms
    the pruned ones, whose gradient it returns as 0; the reference differentiates them too)."""
    (out, grads), (ref_out, ref_grads), (plain_out, plain_grads) = got, ref, plain
    assert out.dtype == dtype and out.shape == ref_out.shape
    check_close("out", out, ref_out, plain_out, dtype)
    for name, g, r, p in zip(names, grads, ref_grads, plain_grads):
        if g is None or r is None:
            assert g is None and r is None, f"d{name}: a gradient only one side computed"
            continue
        assert g.dtype == (torch.float32 if name == "gates" else dtype), f"d{name}: dtype {g.dtype}"
        if name == "gates":
            if backend.name != "torch":
                pruned = torch.ones(g.numel(), dtype=torch.bool, device=g.device)
                pruned[kept_index] = False
                assert torch.all(g[pruned] == 0), "dgates must be 0 for pruned entries"
            g, r, p = g[kept_index], r[kept_index], p[kept_index]
        check_close(f"d{name}", g, r, p, dtype)


def compare_attention(target, case, dtype, frozen="none"):
    backend, device = target
    _dtype_or_skip(backend, dtype)
    leaves, active, key_bias = case
    H = leaves[-1].numel()
    off = {ATTN_NAMES.index(n) for n in _frozen(ATTN_NAMES, frozen)}
    dy = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(1)).to(device)

    def kernel(*t):
        return backend.gated_attention(*t, active, key_bias, H)

    def ref(*t):
        return reference.gated_attention(*t, H, key_bias=key_bias)

    got = run(kernel, leaves, dtype, dy, off)
    want = run(ref, leaves, torch.float32, dy, off)
    plain = want if dtype == torch.float32 else run(ref, leaves, dtype, dy, off)
    check(backend, ATTN_NAMES, got, want, plain, dtype, active)


def compare_ffn(target, case, activation, dtype, frozen="none"):
    backend, device = target
    _dtype_or_skip(backend, dtype)
    leaves, kept_units = case
    off = {FFN_NAMES.index(n) for n in _frozen(FFN_NAMES, frozen)}
    dy = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(1)).to(device)

    def kernel(*t):
        return backend.gated_ffn(*t, kept_units, activation)

    def ref(*t):
        return reference.gated_ffn(*t, activation)

    got = run(kernel, leaves, dtype, dy, off)
    want = run(ref, leaves, torch.float32, dy, off)
    plain = want if dtype == torch.float32 else run(ref, leaves, dtype, dy, off)
    check(backend, FFN_NAMES, got, want, plain, dtype, kept_units)


# --- gated attention ------------------------------------------------------------------------------------------------
# B, S, E, H, D, padding
ATTN_SHAPES = [pytest.param((1, 1, 32, 2, 16, False), id="s1"),
               pytest.param((2, 7, 48, 3, 16, True), id="s7-pad"),
               pytest.param((3, 33, 64, 4, 16, True), id="s33-pad"),
               pytest.param((2, 12, 72, 3, 24, True), id="d24-pad")]


@pytest.mark.parametrize("kept", ["none", "some", "all"])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention_matches_reference(target, shape, kept):
    compare_attention(target, attention_case(*shape, kept, target[1]), torch.float32)


@pytest.mark.parametrize("kept", ["some", "all"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_attention_half_precision(target, dtype, kept):
    compare_attention(target, attention_case(3, 33, 64, 4, 16, kept, True, target[1], seed=1), dtype)


@pytest.mark.parametrize("frozen", list(FROZEN))
def test_attention_frozen_inputs(target, frozen):
    compare_attention(target, attention_case(2, 9, 48, 4, 16, "some", True, target[1], seed=2), torch.float32,
                      frozen)


# --- gated FFN ------------------------------------------------------------------------------------------------------
# B, S, E, I, activation
FFN_SHAPES = [pytest.param((1, 1, 32, 64, "gelu"), id="s1-gelu"),
              pytest.param((2, 7, 48, 96, "gelu_tanh"), id="s7-gelu_tanh"),
              pytest.param((2, 33, 64, 130, "relu"), id="s33-i130-relu"),
              pytest.param((2, 9, 40, 72, "silu"), id="s9-silu")]


@pytest.mark.parametrize("kept", ["none", "some", "all"])
@pytest.mark.parametrize("shape", FFN_SHAPES)
def test_ffn_matches_reference(target, shape, kept):
    *dims, activation = shape
    compare_ffn(target, ffn_case(*dims, kept, target[1]), activation, torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ffn_half_precision(target, dtype, activation):
    compare_ffn(target, ffn_case(3, 11, 64, 96, "some", target[1], seed=1), activation, dtype)


@pytest.mark.parametrize("frozen", list(FROZEN))
def test_ffn_frozen_inputs(target, frozen):
    compare_ffn(target, ffn_case(2, 7, 48, 96, "some", target[1], seed=2), "gelu", torch.float32, frozen)


# --- hard-concrete sampling -----------------------------------------------------------------------------------------

def _sampler(target):
    backend, device = target
    if backend.hard_concrete_sample is None:
        pytest.skip(f"{backend.name} has no hard_concrete_sample (the reference samples with torch.rand)")
    return backend, device


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("n", [1, 13, 3000])
def test_hard_concrete_matches_reference_given_its_noise(target, n, dtype):
    backend, device = _sampler(target)
    _dtype_or_skip(backend, dtype)
    seed, offset, beta = 1234567, 7, 0.5 if n == 13 else reference.BETA
    log_alpha = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(device)
    u = backend.hard_concrete_uniform(n, seed, offset, device)
    assert u.dtype == torch.float32 and u.shape == (n,)
    dz = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    got = run(lambda t: backend.hard_concrete_sample(t, seed, offset, beta), [log_alpha], dtype, dz, gates_last=False)
    want = run(lambda t: reference.hard_concrete_from_uniform(t, u, beta), [log_alpha], torch.float32, dz)
    plain = run(lambda t: reference.hard_concrete_from_uniform(t, u.to(dtype), beta), [log_alpha], dtype, dz,
                gates_last=False)
    assert got[0].dtype == dtype and got[1][0].dtype == dtype
    check_close("z", got[0], want[0], plain[0], dtype)
    check_close("dlog_alpha", got[1][0], want[1][0], plain[1][0], dtype)
    clamped = (want[0] == 0) | (want[0] == 1)  # in fp32: half precision rounds values near 0 and 1 onto them
    if dtype == torch.float32:
        assert torch.all(got[1][0][clamped] == 0), "the gradient must be 0 where the sample is clamped"
    if n == 3000:
        assert 0 < int(clamped.sum()) < n  # both regimes exercised


def test_hard_concrete_noise_is_reproducible_uniform_and_a_prefix_stream(target):
    backend, device = _sampler(target)
    n = 20000
    u = backend.hard_concrete_uniform(n, 7, 3, device)
    assert float(u.min()) >= 1e-6 and float(u.max()) <= 1 - 1e-6
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / n) ** 0.5 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(backend.hard_concrete_uniform(100, 7, 3, device), u[:100])
    la = torch.zeros(100, device=device)
    z = backend.hard_concrete_sample(la, 42, 10, reference.BETA)
    assert torch.equal(z, backend.hard_concrete_sample(la, 42, 10, reference.BETA))
    assert not torch.equal(z, backend.hard_concrete_sample(la, 43, 10, reference.BETA))
    assert not torch.equal(z, backend.hard_concrete_sample(la, 42, 11, reference.BETA))
    assert backend.hard_concrete_sample(torch.empty(0, device=device), 1, 0, reference.BETA).shape == (0,)
    z = backend.hard_concrete_sample(torch.zeros(n, device=device), 9, 0, reference.BETA)
    p = float(gates.expected_l0(torch.zeros(())))  # at log_alpha = 0, P(z > 0) = expected_l0(0)
    assert abs(float((z > 0).float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5
    la = torch.randn(3, 5, device=device)  # any shape: entry i of the flattened tensor uses noise i
    u = backend.hard_concrete_uniform(15, 1, 0, device).view(3, 5)
    check_close("z 2-D", backend.hard_concrete_sample(la, 1, 0, 0.5), reference.hard_concrete_from_uniform(la, u, 0.5),
                None, torch.float32)


# --- torch.library: every custom op a call reaches ------------------------------------------------------------------

class _CustomOpCalls(TorchDispatchMode):
    """Records (op, args, kwargs) of every ``structprune::`` op dispatched inside the block, backward ops too."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "structprune":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


@pytest.mark.parametrize("op", ["attention", "ffn", "hard_concrete"])
def test_opcheck_every_op_a_call_reaches(target, op):
    backend, device = target
    if op == "attention":
        leaves, active, key_bias = attention_case(1, 5, 32, 2, 16, "some", True, device)
        leaves = [t.requires_grad_() for t in leaves]
        call = lambda: backend.gated_attention(*leaves, active, key_bias, 2)  # noqa: E731
    elif op == "ffn":
        leaves, kept_units = ffn_case(1, 3, 32, 16, "some", device)
        leaves = [t.requires_grad_() for t in leaves]
        call = lambda: backend.gated_ffn(*leaves, kept_units, "gelu_tanh")  # noqa: E731
    else:
        backend, device = _sampler(target)
        la = torch.randn(10, device=device, requires_grad=True)
        call = lambda: backend.hard_concrete_sample(la, 5, 3, reference.BETA)  # noqa: E731
    with _CustomOpCalls() as spy:
        call().sum().backward()
    if backend.name == "torch":
        assert not spy.calls  # the reference is plain aten
    else:
        assert len(spy.calls) >= 2, [c[0] for c in spy.calls]  # a forward and a backward op
    for func, args, kwargs in spy.calls:
        if func.name().endswith("_backward"):  # called with the saved leaves; opcheck them as plain inputs
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(func, args, kwargs)


# --- through the dispatcher -----------------------------------------------------------------------------------------

def test_dispatcher_runs_the_backend_chosen(target):
    backend, device = target
    leaves, active, _ = attention_case(2, 5, 32, 2, 16, "some", False, device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    mask[1, 3:] = False
    fleaves, kept_units = ffn_case(2, 5, 32, 16, "some", device)
    with ops.use_backend(backend.name):
        y = ops.gated_attention(*leaves, active, 2, attn_mask=mask)
        f = ops.gated_ffn(*fleaves, kept_units, "gelu")
        assert ops.last_backends()["attention"] == ops.last_backends()["ffn"] == backend.name
    key_bias = torch.zeros(2, 5, device=device).masked_fill(~mask, NEG)
    check_close("attention", y, reference.gated_attention(*leaves, 2, key_bias=key_bias), None, torch.float32)
    check_close("ffn", f, reference.gated_ffn(*fleaves, "gelu"), None, torch.float32)


# --- the public ops: one per computation, the backend an argument ---------------------------------------------------

def test_public_ops_run_the_named_backend(target):
    """``torch.ops.structprune.<computation>(..., backend)`` gives the backend's own result and gradients."""
    backend, device = target
    leaves, active, key_bias = attention_case(2, 7, 32, 2, 16, "some", True, device)
    leaves = [t.requires_grad_() for t in leaves]
    y = torch.ops.structprune.gated_attention(*leaves, active, key_bias, 2, backend.name)
    direct = [t.detach().clone().requires_grad_() for t in leaves]
    y_direct = backend.gated_attention(*direct, active, key_bias, 2)
    torch.testing.assert_close(y, y_direct, rtol=0, atol=0)
    (y * y_direct.detach()).sum().backward()
    (y_direct * y_direct.detach()).sum().backward()
    for name, a, b in zip(ATTN_NAMES, leaves, direct):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    fleaves, kept_units = ffn_case(2, 5, 32, 16, "some", device)
    f = torch.ops.structprune.gated_ffn(*fleaves, kept_units, "gelu", backend.name)
    torch.testing.assert_close(f, backend.gated_ffn(*fleaves, kept_units, "gelu"), rtol=0, atol=0)
    la = torch.randn(9, device=device)
    if backend.hard_concrete_sample is None:
        with pytest.raises(ValueError, match="no counter-based sampler"):
            torch.ops.structprune.hard_concrete_sample(la, 5, 3, reference.BETA, backend.name)
    else:
        z = torch.ops.structprune.hard_concrete_sample(la, 5, 3, reference.BETA, backend.name)
        torch.testing.assert_close(z, backend.hard_concrete_sample(la, 5, 3, reference.BETA), rtol=0, atol=0)


def test_public_ops_have_one_schema_and_name_unknown_backends():
    for op, names in (("gated_attention", ATTN_NAMES[:-1] + ("head_gates",)),
                      ("gated_ffn", FFN_NAMES[:-1] + ("unit_gates",)), ("hard_concrete_sample", ("log_alpha",))):
        args = [a.name for a in getattr(torch.ops.structprune, op).default._schema.arguments]
        assert args[:len(names)] == list(names) and "backend" in args, (op, args)
    x = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        torch.ops.structprune.gated_ffn(x, torch.randn(4, 8), torch.randn(4), torch.randn(8, 4), torch.randn(8),
                                        torch.ones(4), torch.arange(4), "gelu", "nope")


def test_checks_inputs_like_the_dispatcher(target):
    """Every backend's entry runs the one set of input checks (structprune/_input_checks.py): through the public
    op or called directly, a bad input gets the dispatcher's error (tests/test_input_checks.py has the full table)."""
    backend, device = target
    leaves, active, _ = attention_case(2, 5, 16, 2, 8, "all", False, device)
    fleaves, kept_units = ffn_case(2, 5, 16, 8, "all", device)
    unsorted = active.flip(0).cpu()
    for call in (lambda: backend.gated_attention(*leaves, unsorted, None, 2),
                 lambda: torch.ops.structprune.gated_attention(*leaves, unsorted, None, 2, backend.name),
                 lambda: ops.gated_attention(*leaves, unsorted, 2)):
        with pytest.raises(ValueError, match=r"active_heads must hold sorted unique indices in \[0, 2\), got \[1, 0\]"):
            call()
    bad_bias = torch.zeros(2, 4, device=device)
    with pytest.raises(ValueError, match=r"key_bias must be a float32 tensor of shape \[2, 5\]"):
        backend.gated_attention(*leaves, active, bad_bias, 2)
    for call in (lambda: backend.gated_ffn(*fleaves, kept_units, "swish"),
                 lambda: torch.ops.structprune.gated_ffn(*fleaves, kept_units, "swish", backend.name),
                 lambda: ops.gated_ffn(*fleaves, kept_units, "swish")):
        with pytest.raises(ValueError, match="activation must be one of " + re.escape(str(ACTIVATIONS)) + ", got 'swish'"):
            call()
