"""The Triton rotary / sliding-window attention (kernels/rotary_attention.py) against the reference: forward and every
gradient, fp32 / fp16 / bf16, odd shapes (S spanning two blocks with a ragged tail, head_dim 8), 0 / some / all heads
kept, biases present or None, windows of 0, shorter than a block, and longer than the sequence, a padded batch,
per-sequence rotary tables, the backward op's output_mask, opcheck and the dispatcher. Runs under the Triton
interpreter on CPU (conftest sets TRITON_INTERPRET=1) or on CUDA; tolerances from tests/helpers/tolerances.py.

Padding queries of a padded sequence are compared nowhere (their band may hold only padded keys, where every
implementation's output is arbitrary), as in tests/backends/test_cpp_modernbert_ops.py."""
import pytest
import torch

from helpers.grad_masks import check_against_unmasked
from helpers.triton_cases import check_outputs, run_with_optional, triton_devices

DEV = triton_devices()[0]

import structprune as sp  # noqa: E402
from structprune.ops import dispatch, reference  # noqa: E402
from structprune._kernels import rotary_attention as R  # noqa: E402

B, S, E, NH, D = 2, 37, 24, 3, 8  # S: two 32-row blocks under the interpreter, the second ragged
PAD = 30  # sequence 1 is padded from here on
NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "head_gates")


def rotary_tables(batch=1, theta=50.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    pos = torch.arange(S, dtype=torch.float32)[None, :, None] + torch.arange(batch, dtype=torch.float32)[:, None, None]
    emb = torch.cat([pos * inv] * 2, -1)  # [batch, S, D]: per-sequence offsets when batch > 1
    return emb.cos().to(DEV), emb.sin().to(DEV)


def case(kept="some", bias=True, padding=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.4).to(DEV)  # noqa: E731
    A = NH * D
    params = [r(B, S, E), r(A, E), r(A), r(A, E), r(A), r(A, E), r(A), r(E, A), r(E)]
    if not bias:
        params = [None if i in (2, 4, 6, 8) else t for i, t in enumerate(params)]
    active = {"none": torch.zeros(0, dtype=torch.long), "all": torch.arange(NH), "some": torch.tensor([0, 2])}[kept]
    gates = torch.zeros(NH)
    gates[active] = 0.25 + torch.rand(active.numel(), generator=gen)
    key_bias = None
    if padding:
        key_bias = torch.zeros(B, S)
        key_bias[1, PAD:] = torch.finfo(torch.float32).min
        key_bias = key_bias.to(DEV)
    return params, gates.to(DEV), active.to(DEV), key_bias


def run(fn, params, gates, dtype, dy, keep):
    """The output (padding queries zeroed by ``keep``) and the gradients."""
    y, grads = run_with_optional(fn, params, gates, dtype, dy)
    return y * keep.to(y.dtype), grads


def compare(params, gates, active, key_bias, window, dtype, cos_sin=None):
    cos, sin = cos_sin or rotary_tables()
    keep = torch.ones(B, S, 1, device=DEV)
    if key_bias is not None:
        keep[1, PAD:] = 0
    dy = torch.randn(B, S, E, generator=torch.Generator().manual_seed(1)).to(DEV) * keep

    def ker(*t):
        return R.gated_rotary_attention(*t[:9], t[9], active, key_bias, cos, sin, window, NH)

    def ref(*t):
        mask = reference.banded_key_mask(key_bias, S, window, t[0].dtype, t[0].device)
        return reference.gated_rotary_attention(*t[:9], t[9], NH, cos, sin, window=window, attn_mask=mask)

    got = run(ker, params, gates, dtype, dy, keep)
    rounded = [None if t is None else t.to(dtype).float() for t in params]
    ref32 = run(ref, rounded, gates, torch.float32, dy, keep)
    plain = ref32 if dtype == torch.float32 else run(ref, params, gates, dtype, dy, keep)
    assert got[0].dtype == dtype
    check_outputs(f"[w={window}] ", got, ref32, plain, NAMES, active, dtype)


@pytest.mark.parametrize("window", [-1, 0, 3, 40])
@pytest.mark.parametrize("kept,bias,padding", [("some", True, True), ("all", False, False), ("some", False, True)])
def test_matches_the_reference_fp32(kept, bias, padding, window):
    compare(*case(kept, bias, padding, seed=window + 2), window, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("window", [-1, 5])
def test_matches_the_reference_in_half_precision(dtype, window):
    compare(*case("some", True, True, seed=9), window, dtype)


def test_no_head_kept_gives_the_output_bias_and_zero_gradients():
    params, gates, active, key_bias = case("none", True, True)
    compare(params, gates, active, key_bias, 3, torch.float32)
    y = R.gated_rotary_attention(*params, gates, active, key_bias, *rotary_tables(), 3, NH)
    torch.testing.assert_close(y, params[8].expand(B, S, E))


def test_per_sequence_rotary_tables():
    compare(*case("all", True, False, seed=4), 6, torch.float32, cos_sin=rotary_tables(batch=B))


def test_the_band_bounds_the_key_blocks_visited():
    """A window of 3 on S = 37: query block 0 (rows 0-31) must not see key 36, whose score would be visible if the
    kernel visited that block unmasked; and the result differs from the global layer's."""
    params, gates, active, _ = case("all", True, False, seed=1)
    cos, sin = rotary_tables()
    local = R.gated_rotary_attention(*params, gates, active, None, cos, sin, 3, NH)
    glob = R.gated_rotary_attention(*params, gates, active, None, cos, sin, -1, NH)
    assert (local - glob).abs().max() > 1e-3
    x2 = params[0].clone()
    x2[:, 36] += 10.0  # change the last position: rows more than 3 away are unaffected
    moved = R.gated_rotary_attention(x2, *params[1:], gates, active, None, cos, sin, 3, NH)
    torch.testing.assert_close(moved[:, :33], local[:, :33], rtol=0, atol=0)
    assert (moved[:, 33:] - local[:, 33:]).abs().max() > 1e-3


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True]])
def test_backward_honours_the_output_mask(mask):
    params, gates, active, key_bias = case("some", True, True)
    cos, sin = rotary_tables()
    out = torch.ops.structprune.triton_gated_rotary_attention(*params, gates, active, key_bias, cos, sin, 3, NH, True)
    x, wq, _, wk, _, wv, _, wo, _ = params
    args = (torch.randn_like(x), x, wq, wk, wv, wo, gates, active, key_bias, cos, sin, 3, NH, [True] * 4, *out[1:])
    full = torch.ops.structprune.triton_gated_rotary_attention_backward(*args)
    part = torch.ops.structprune.triton_gated_rotary_attention_backward(*args, output_mask=mask)
    check_against_unmasked(part, full, mask, NAMES)


def test_opcheck():
    params, gates, active, key_bias = case("some", False, True)
    cos, sin = rotary_tables()
    for save in (False, True):
        torch.library.opcheck(torch.ops.structprune.triton_gated_rotary_attention.default,
                              (*params, gates, active, key_bias, cos, sin, 3, NH, save),
                              test_utils=("test_schema", "test_faketensor"))


def test_dispatcher_runs_the_triton_kernel_with_an_hf_sliding_mask():
    """The dispatcher hands a [B, 1, S, S] banded HF mask to the kernel as its padding row and the window."""
    params, gates, active, key_bias = case("some", True, True)
    cos, sin = rotary_tables()
    hf_mask = reference.banded_key_mask(key_bias, S, 3, torch.float32, DEV)
    with sp.use_backend("triton"):
        y = dispatch.gated_rotary_attention(*params, gates, active, NH, cos, sin, window=3, attn_mask=hf_mask)
    assert sp.last_backends()["attention"] == "triton"
    want = reference.gated_rotary_attention(*params, gates, NH, cos, sin, window=3, attn_mask=hf_mask)
    torch.testing.assert_close(y[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[1, :PAD], want[1, :PAD], atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_with_what_was_expected():
    params, gates, active, key_bias = case("some", True, True)
    cos, sin = rotary_tables()
    with pytest.raises(ValueError, match="window must be an int >= -1"):
        R.gated_rotary_attention(*params, gates, active, key_bias, cos, sin, -2, NH)
    with pytest.raises(ValueError, match="cos must be"):
        R.gated_rotary_attention(*params, gates, active, key_bias, cos[:, :-1], sin, 3, NH)
