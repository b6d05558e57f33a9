"""What is specific to the Triton gated attention (structprune._kernels); the op contract every backend meets
(shapes, kept heads, dtypes, frozen inputs, opcheck) is tests/ops/test_op_contract.py.

Here: the flash kernels' tile sizes (head_dim 64 and 128, two key blocks), strided inputs, a batch-broadcast key
bias, the saved tensors, the backward op's output_mask, torch.compile, the kernels' own input checks and launch
grid. Runs on CPU under the Triton interpreter (conftest sets TRITON_INTERPRET=1 when there is no CUDA) and on CUDA
when present. Shapes are tiny because the interpreter runs each program in Python.
Tolerances: fp32 absolute/relative 1e-4; fp16/bf16 follow the rule "error of the kernel against the fp32
reference <= 2x the error of the plain PyTorch computation in that dtype against the same reference, + eps"
with eps = 1 ulp of the dtype at max(1, largest |reference|).
"""
import pytest
import torch

from helpers.grad_masks import check_against_unmasked
from helpers.tolerances import check_close
from helpers.triton_cases import (check_compiled_matches_eager, check_compiled_with_frozen_leaves, check_frozen_leaves,
                                  check_outputs, run_and_grads, triton_devices)
from helpers.triton_cases import cast_except_gates as cast

DEVICES = triton_devices()

from structprune.ops import reference  # noqa: E402
import structprune.backends.triton as K  # noqa: E402
from structprune._kernels import attention as kernel_attention, ffn as kernel_ffn  # noqa: E402

NEG = torch.finfo(torch.float32).min
NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "head_gates")


def make_inputs(B, S, E, H, D, kept, device, pad=False, seed=0):
    """fp32 leaf tensors (x, weights, biases, gates), active-head index and key_bias."""
    g = torch.Generator().manual_seed(seed)
    HD = H * D

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = rnd(B, S, E, scale=1.0)
    w = [rnd(HD, E, scale=E ** -0.5), rnd(HD, scale=0.1), rnd(HD, E, scale=E ** -0.5), rnd(HD, scale=0.1),
         rnd(HD, E, scale=E ** -0.5), rnd(HD, scale=0.1), rnd(E, HD, scale=HD ** -0.5), rnd(E, scale=0.1)]
    gates = torch.rand(H, generator=g) * 0.9 + 0.1
    if kept == "none":
        gates.zero_()
    elif kept == "random":
        keep = torch.randperm(H, generator=g)[: max(1, H // 2)]
        mask = torch.zeros(H, dtype=torch.bool)
        mask[keep] = True
        gates[~mask] = 0.0
    elif kept == "one":
        gates[1:] = 0.0
    gates = gates.to(device)
    active = torch.nonzero(gates != 0).flatten()
    key_bias = None
    if pad:
        key_bias = torch.zeros(B, S)
        for b in range(B):
            valid = max(1, S - 3 * b - (S // 3 if b else 0))  # row 0 unpadded, later rows more and more padded
            key_bias[b, valid:] = NEG
        key_bias = key_bias.to(device)
    return [x, *w, gates], active, key_bias


def kernel_fn(active, key_bias, H):
    return lambda x, wq, bq, wk, bk, wv, bv, wo, bo, g: K.gated_attention(
        x, wq, bq, wk, bk, wv, bv, wo, bo, g, active, key_bias, H)


def reference_fn(key_bias, H, impl="sdpa"):
    return lambda x, wq, bq, wk, bk, wv, bv, wo, bo, g: reference.gated_attention(
        x, wq, bq, wk, bk, wv, bv, wo, bo, g, H, key_bias=key_bias, impl=impl)


def compare(leaves, active, key_bias, H, dtype, impl="sdpa"):
    B, S, E = leaves[0].shape
    dy = torch.randn(B, S, E, generator=torch.Generator().manual_seed(1)).to(leaves[0].device)
    out, grads = run_and_grads(kernel_fn(active, key_bias, H), cast(leaves, dtype), dy)
    ref, ref_grads = run_and_grads(reference_fn(key_bias, H, impl), leaves, dy)
    if dtype == torch.float32:
        plain, plain_grads = ref, ref_grads
    else:
        plain, plain_grads = run_and_grads(reference_fn(key_bias, H, impl), cast(leaves, dtype), dy)
    assert out.dtype == dtype and out.shape == (B, S, E)
    check_outputs("", (out, grads), (ref, ref_grads), (plain, plain_grads), NAMES, active, dtype)


# B, S, E, H, D, kept, pad, dtype: the tile sizes of the flash kernels (test_op_contract.py runs the common grid)
CASES = [
    pytest.param(2, 40, 128, 2, 64, "all", True, torch.float32, id="s40-d64-all-pad"),
    pytest.param(1, 9, 128, 1, 128, "all", False, torch.float32, id="d128"),
    pytest.param(2, 17, 128, 2, 64, "all", False, torch.float16, id="fp16-d64"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,S,E,H,D,kept,pad,dtype", CASES)
def test_matches_reference(device, B, S, E, H, D, kept, pad, dtype):
    leaves, active, key_bias = make_inputs(B, S, E, H, D, kept, device, pad)
    compare(leaves, active, key_bias, H, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_padded_row_and_noncontiguous_x(device):
    leaves, active, key_bias = make_inputs(3, 11, 32, 2, 16, "all", device, pad=True)
    key_bias[1] = NEG  # every key padded: the softmax is uniform, as in the eager reference
    x = leaves[0]
    leaves[0] = torch.empty(11, 3, 32, device=device).transpose(0, 1).copy_(x)  # [B, S, E] view, strided
    assert not leaves[0].is_contiguous()
    # The eager reference: torch's CPU SDPA backward (2.13) differs from its own forward on fully masked rows.
    compare(leaves, active, key_bias, 2, torch.float32, impl="eager")
    # The same with a non-contiguous weight (transposed storage).
    leaves[7] = leaves[7].t().contiguous().t()
    out = K.gated_attention(*leaves, active, key_bias, 2)
    check_close("out", out, reference.gated_attention(*leaves, 2, key_bias=key_bias, impl="eager"), None,
                torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_broadcast_key_bias(device):
    """A key_bias with batch stride 0 (one padding row expanded over the batch)."""
    leaves, active, _ = make_inputs(3, 10, 32, 2, 16, "all", device)
    row = torch.zeros(1, 10, device=device)
    row[0, 6:] = NEG
    compare(leaves, active, row.expand(3, 10), 2, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_larger_shapes(device):
    """Several query and key blocks per head and several GEMM tiles per dimension."""
    leaves, active, key_bias = make_inputs(2, 130, 256, 4, 64, "random", device, pad=True)
    compare(leaves, active, key_bias, 4, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_saves_nothing(device):
    leaves, active, key_bias = make_inputs(1, 6, 32, 2, 16, "all", device)
    with torch.no_grad():
        res = torch.ops.structprune.triton_gated_attention(*leaves, active, key_bias, 2, False)
    assert all(t.numel() == 0 for t in res[1:])
    check_close("out", res[0], reference.gated_attention(*leaves, 2), None, torch.float32)


# --- output_mask: only the gradients that are needed -----------------------------------------------------------------
# Leaves frozen with requires_grad_(False) -> the output_mask (x, weights and biases, gates) the backward gets.
FROZEN = {"weights": [True, False, True], "gates": [True, True, False], "x": [False, True, True],
          "x+weights": [False, False, True], "wq": [True, True, True]}


@pytest.mark.parametrize("frozen", list(FROZEN))
def test_frozen_inputs_get_no_gradient(frozen, monkeypatch):
    """Leaves requiring grad get the reference gradients; frozen ones get None, and the backward op was asked for
    no more than needed (output_mask), returning empty tensors for the rest."""
    H = 4
    leaves, active, key_bias = make_inputs(2, 9, 64, H, 16, "random", DEVICES[0], pad=True, seed=3)
    dy = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1)).to(DEVICES[0])
    check_frozen_leaves(monkeypatch, "triton_gated_attention_backward", kernel_fn(active, key_bias, H),
                        reference_fn(key_bias, H), leaves, NAMES, frozen, FROZEN[frozen], dy, active)


def _backward_args(device, pad=True, kept="random"):
    leaves, active, key_bias = make_inputs(2, 9, 64, 4, 16, kept, device, pad=pad, seed=4)
    res = torch.ops.structprune.triton_gated_attention(*leaves, active, key_bias, 4, True)
    dy = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2)).to(device)
    x, wq, _, wk, _, wv, _, wo, _, gates = leaves
    return (dy, x, wq, wk, wv, wo, gates, active, key_bias, 4, *res[1:])


@pytest.mark.parametrize("mask", [[True, False, True], [False, False, True], [False, True, False], [False] * 3],
                         ids=["frozen-weights", "gates-only", "weights-only", "nothing"])
@pytest.mark.parametrize("kept", ["none", "random", "all"])
def test_backward_output_mask_direct(mask, kept):
    """Called directly: masked-out gradients are empty, the others equal the default (all) call's."""
    args = _backward_args(DEVICES[0], kept=kept)
    op = torch.ops.structprune.triton_gated_attention_backward
    full, got = op(*args), op(*args, mask)
    check_against_unmasked(got, full, mask, NAMES)


def test_backward_output_mask_must_have_three_entries():
    with pytest.raises(ValueError, match="output_mask must have 3 entries"):
        torch.ops.structprune.triton_gated_attention_backward(*_backward_args(DEVICES[0]), [True, False])


def test_opcheck_backward_with_output_mask():
    args = _backward_args(DEVICES[0])
    torch.library.opcheck(torch.ops.structprune.triton_gated_attention_backward, (*args, [True, False, True]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_frozen_weights():
    """aot_eager with frozen weights: the masked backward is traced through its fake kernel."""
    leaves, active, key_bias = make_inputs(2, 9, 32, 2, 16, "one", DEVICES[0], pad=True)
    check_compiled_with_frozen_leaves(kernel_fn(active, key_bias, 2), leaves, NAMES, ("x", "head_gates"),
                                      torch.randn(2, 9, 32, device=DEVICES[0]))


def test_torch_compile_fullgraph():
    """aot_eager: the graph (forward and the backward op) is traced through the fake registrations and run
    eagerly; inductor would also work on GPU but is slow to compile around interpreted kernels on CPU."""
    leaves, active, key_bias = make_inputs(2, 9, 32, 2, 16, "one", DEVICES[0], pad=True)
    check_compiled_matches_eager(kernel_fn(active, key_bias, 2), leaves, torch.randn(2, 9, 32, device=DEVICES[0]))


def test_input_errors():
    """The checks every backend shares (structprune/_input_checks.py; tests/test_input_checks.py runs them all)."""
    device = DEVICES[0]
    leaves, active, key_bias = make_inputs(1, 4, 32, 2, 16, "all", device)
    with pytest.raises(ValueError, match=r"wq must have shape \[\*, 32\]"):
        K.gated_attention(leaves[0], leaves[1][:, :16], *leaves[2:], active, None, 2)
    with pytest.raises(ValueError, match=r"wo must have the dtype of x \(torch.float32\), got torch.float16"):
        K.gated_attention(*leaves[:7], leaves[7].half(), *leaves[8:], active, None, 2)
    with pytest.raises(ValueError, match="active_heads must be a 1-D int64 tensor, got torch.int32"):
        K.gated_attention(*leaves, active.int(), None, 2)
    with pytest.raises(ValueError, match=r"key_bias must be a float32 tensor of shape \[1, 4\]"):
        K.gated_attention(*leaves, active, torch.zeros(1, 5, device=device), 2)
    with pytest.raises(ValueError, match=r"active_heads must hold sorted unique indices in \[0, 2\), got \[0, 2\]"):
        K.gated_attention(*leaves, torch.tensor([0, 2]), None, 2)
    with pytest.raises(ValueError, match=r"active_heads must hold sorted unique indices in \[0, 2\), got \[1, 0\]"):
        K.gated_attention(*leaves, torch.tensor([1, 0]), None, 2)  # the order: not checked here before
    with pytest.raises(ValueError, match=r"wq has 32 rows, not num_heads \* head_dim with num_heads = 3"):
        K.gated_attention(*leaves[:9], torch.ones(3, device=device), active, None, 3)


def test_availability_reason(monkeypatch):
    assert K.availability(torch.device(DEVICES[0])) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = K.availability(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_launch_grid_puts_batch_times_heads_on_axis_0(monkeypatch):
    """B*A above CUDA's 65,535 limit of grid axes 1 and 2 must go on axis 0 (meta tensors: nothing runs)."""
    from structprune._kernels import _common as C

    grids = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.setdefault(self.name, []).append(tuple(grid))
            return lambda *args, **kwargs: None

    for name in ("_attn_fwd_kernel", "_attn_bwd_pre_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        monkeypatch.setattr(kernel_attention, name, Recorder(name))
    monkeypatch.setattr(C, "gemm_kernel", Recorder("gemm"))
    B, S, E, H, D = 6000, 8, 24, 12, 2  # B * H = 72,000
    meta = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    w = [meta(H * D, E), meta(H * D), meta(H * D, E), meta(H * D), meta(H * D, E), meta(H * D), meta(E, H * D),
         meta(E)]
    active = torch.empty(H, dtype=torch.int64, device="meta")
    y, *saved = kernel_attention.triton_gated_attention._init_fn(meta(B, S, E), *w, meta(H), active, None, H, True,
                                                             0.1, 1)
    kernel_attention.triton_gated_attention_backward._init_fn(meta(B, S, E), meta(B, S, E), w[0], w[2], w[4], w[6],
                                                         meta(H), active, None, H, *saved, None, 0.1, 1)
    for name in ("_attn_fwd_kernel", "_attn_bwd_pre_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        (grid,) = grids[name]
        assert grid[0] == B * H and max(grid[1:]) <= 65535, (name, grid)


def test_launches_run_under_a_guard_for_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every op sets it to its inputs' device first."""
    import types

    from structprune._kernels import _common as C

    entered = []

    class FakeGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeGuard)
    launcher = C.on_device_of_first_arg(lambda t, n=1: n)
    assert launcher(torch.empty(2), n=3) == 3 and entered == []  # CPU tensors: no guard
    launcher(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert entered == [torch.device("cuda", 1)]
    ops_ = (kernel_attention.triton_gated_attention, kernel_attention.triton_gated_attention_backward,
            kernel_ffn.triton_gated_ffn, kernel_ffn.triton_gated_ffn_backward)
    assert all(hasattr(op._init_fn, "__wrapped__") for op in ops_), "every launching op runs under the guard"
