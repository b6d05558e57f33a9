"""The serving attention kernel ``cpp_serving_attention`` (csrc/cpu/serving_attention_cpu.cpp, fp32, and
serving_attention_bf16_cpu.cpp, bf16 on AMX tiles or vdpbf16ps) against ATen's SDPA with the same additive key mask:
strided views of a fused q|k|v projection, odd sequence lengths, head dims 16/32/64, 1 and 6 heads, key padding and
a fully padded sequence, fewer queries than keys (the serving module's row split); fp32 to 1e-5, bf16 against the
fp32 SDPA of the same bf16 inputs by the half-precision rule (twice the plain bf16 SDPA's error); opcheck of schema
and fake kernel; refusals; the dispatcher's choice and its SDPA fallback."""
import pytest
import torch
import torch.nn.functional as F

import structprune.backends.cpp.ops as ext
from structprune.backends.cpp import serving_attention as sa
from structprune.ops import dispatch

from helpers.tolerances import check_close

if ext.load_error() is not None:
    pytest.skip(f"C++ extension unavailable: {ext.load_error()}", allow_module_level=True)
if not sa.supported_cpu():
    pytest.skip("cpp_serving_attention needs a CPU with AVX-512F (and an extension built with it)",
                allow_module_level=True)

op = torch.ops.structprune.cpp_serving_attention
NEG = torch.finfo(torch.float32).min
NEG16 = torch.finfo(torch.bfloat16).min  # the serving module's bf16 padding bias (exact in fp32)
needs_bf16 = pytest.mark.skipif(not sa.supported_bf16(), reason="the bf16 path needs AVX512-BF16")
# the two bf16 paths: AMX tiles (where the CPU has AMX-BF16) and vdpbf16ps (STRUCTPRUNE_SERVING_ATTENTION_AMX=0)
BF16_PATHS = pytest.mark.parametrize("path", ["amx", "vdpbf16ps"])


def bf16_path(monkeypatch, path):
    monkeypatch.setenv("STRUCTPRUNE_SERVING_ATTENTION_AMX", "1" if path == "amx" else "0")


def fused_qkv(B, S, H, D, seed=0):
    """q, k, v as the serving module makes them: views [B, H, S, D] of one [B, S, 3, H, D] projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B * S, 3 * H * D, generator=g) * 2.0
    return qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)


def padding_bias(B, S, lengths, neg=NEG):
    bias = torch.zeros(B, S)
    for b, n in enumerate(lengths):
        bias[b, n:] = neg
    return bias


def on_two_threads(fn, *args):
    """``fn(*args)`` with 2 intra-op threads (work units split mid-head), the thread count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def sdpa(q, k, v, bias, scale):
    mask = None if bias is None else bias[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("S", [1, 7, 33, 192, 200])
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("H", [1, 6])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_matches_sdpa(S, D, H, padded):
    B = 3
    q, k, v = fused_qkv(B, S, H, D, seed=S * D + H)
    # batch row 1 partly padded, row 2 fully padded (SDPA: equal scores, the mean of v)
    bias = padding_bias(B, S, [S, max(1, S // 2), 0]) if padded else None
    scale = D ** -0.5
    out = op(q, k, v, bias, scale)
    assert out.shape == (B, S, H, D) and out.is_contiguous()
    torch.testing.assert_close(out, sdpa(q, k, v, bias, scale), atol=1e-5, rtol=1e-5)


def check_bf16(out, q, k, v, bias, scale):
    """The bf16 kernel's output against the fp32 SDPA of the same (bf16) inputs, the plain bf16 SDPA the yardstick."""
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    ref = sdpa(q.float(), k.float(), v.float(), bias, scale)
    plain = sdpa(q, k, v, None if bias is None else bias.bfloat16(), scale)
    check_close("cpp bf16 attention", out, ref, plain, torch.bfloat16)


@needs_bf16
@BF16_PATHS
@pytest.mark.parametrize("S", [1, 7, 33, 192, 200])
@pytest.mark.parametrize("D", [16, 32, 48, 64])  # AMX: 16 and 48 padded to a tile depth of 32
@pytest.mark.parametrize("H", [1, 6])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_bf16_matches_fp32_sdpa_within_the_bf16_rule(S, D, H, padded, path, monkeypatch):
    bf16_path(monkeypatch, path)
    B = 3
    q, k, v = (t.bfloat16() for t in fused_qkv(B, S, H, D, seed=S * D + H))
    bias = padding_bias(B, S, [S, max(1, S // 2), 0], NEG16) if padded else None
    out = op(q, k, v, bias, D ** -0.5)
    assert out.shape == (B, S, H, D)
    check_bf16(out, q, k, v, bias, D ** -0.5)


@needs_bf16
@BF16_PATHS
@pytest.mark.parametrize("rows", [(0, 5), (5, 192), (96, 200)])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_bf16_fewer_queries_than_keys(rows, padded, path, monkeypatch):
    bf16_path(monkeypatch, path)
    S, H, D = 200, 6, 32
    q, k, v = (t.bfloat16() for t in fused_qkv(1, S, H, D, seed=1))
    q = q[:, :, rows[0]:rows[1]]
    bias = padding_bias(1, S, [150], NEG16) if padded else None
    check_bf16(op(q, k, v, bias, 0.3), q, k, v, bias, 0.3)


@needs_bf16
@BF16_PATHS
def test_bf16_large_scores_head_dim_128_and_parallel_chunks(path, monkeypatch):
    bf16_path(monkeypatch, path)
    q, k, v = (t.bfloat16() for t in fused_qkv(2, 77, 3, 128, seed=2))
    out = on_two_threads(op, q * 6, k * 6, v, None, 0.125)
    check_bf16(out, q * 6, k * 6, v, None, 0.125)


@pytest.mark.parametrize("rows", [(0, 5), (5, 192), (96, 200)])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_fewer_queries_than_keys(rows, padded):
    """The row split of one sequence: a block of query rows against every key."""
    S, H, D = 200, 6, 32
    q, k, v = fused_qkv(1, S, H, D, seed=1)
    q = q[:, :, rows[0]:rows[1]]
    bias = padding_bias(1, S, [150]) if padded else None
    out = op(q, k, v, bias, 0.3)
    torch.testing.assert_close(out, sdpa(q, k, v, bias, 0.3), atol=1e-5, rtol=1e-5)


def test_large_scores_and_parallel_chunks():
    """Sharp softmax rows (large logits) and several threads splitting the work units mid-head."""
    q, k, v = fused_qkv(2, 77, 3, 48, seed=2)
    out = on_two_threads(op, q * 6, k * 6, v, None, 0.125)
    torch.testing.assert_close(out, sdpa(q * 6, k * 6, v, None, 0.125), atol=1e-5, rtol=1e-5)


def test_passes_opcheck():
    """Schema, fake kernel and dispatch (forward only: the Python side calls it without gradients)."""
    q, k, v = fused_qkv(2, 9, 2, 16)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(op.default, (q, k, v, padding_bias(2, 9, [9, 4]), 0.25), test_utils=tests)
    torch.library.opcheck(op.default, (q.contiguous(), k.contiguous(), v.contiguous(), None, 0.25), test_utils=tests)
    if sa.supported_bf16():
        q, k, v = (t.bfloat16() for t in (q, k, v))
        torch.library.opcheck(op.default, (q, k, v, padding_bias(2, 9, [9, 4], NEG16), 0.25), test_utils=tests)


@pytest.mark.parametrize("case,message", [
    ("fp16", "float32 or bfloat16"), ("mixed", "one dtype"), ("head_dim", "multiple of 16"),
    ("rank", r"\[batch, heads, seq, head_dim\]"), ("kv_shape", "k and v"), ("bias", "key_bias"), ("last_stride", "contiguous last dimension")])
def test_refusals(case, message):
    q, k, v = fused_qkv(1, 8, 2, 16)
    bias = None
    if case == "fp16":
        q, k, v = q.half(), k.half(), v.half()
    elif case == "mixed":
        q = q.bfloat16()
    elif case == "head_dim":
        q, k, v = fused_qkv(1, 8, 2, 24)
    elif case == "rank":
        q = q[0]
    elif case == "kv_shape":
        v = v[:, :1]
    elif case == "bias":
        bias = torch.zeros(1, 7)
    elif case == "last_stride":
        q = q.transpose(2, 3)
    with pytest.raises(RuntimeError, match=message):
        op(q, k, v, bias, 0.25)


def test_python_entry_declines_what_it_cannot_run(monkeypatch):
    q, k, v = fused_qkv(1, 8, 2, 16)
    b16 = (q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert sa.serving_attention(q, k, v, None, 0.25) is not None
    assert (sa.serving_attention(*b16, None, 0.25) is not None) == sa.supported_bf16()
    assert sa.serving_attention(q.half(), k.half(), v.half(), None, 0.25) is None
    assert sa.serving_attention(q.bfloat16(), k, v, None, 0.25) is None
    assert sa.serving_attention(q, k, v, torch.zeros(1, 8, dtype=torch.bfloat16), 0.25) is None
    assert sa.serving_attention(*fused_qkv(1, 8, 2, 24), None, 0.25) is None
    assert sa.serving_attention(q.requires_grad_(), k, v, None, 0.25) is None
    monkeypatch.setattr(sa, "supported_bf16", lambda: False)  # a CPU without AVX512-BF16: SDPA runs
    assert sa.serving_attention(*b16, None, 0.25) is None
    assert sa.serving_attention(q.detach(), k, v, None, 0.25) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatcher_runs_the_kernel_where_it_applies_and_sdpa_otherwise(dtype):
    q, k, v = (t.to(dtype) for t in fused_qkv(2, 13, 6, 32))
    bias = padding_bias(2, 13, [13, 5], torch.finfo(dtype).min).to(dtype)
    out, ran = dispatch.serving_attention_ran(q, k, v, bias)
    assert ran == ("cpp" if dtype == torch.float32 or sa.supported_bf16() else "sdpa")
    assert dispatch.last_backends()["attention"] == ran
    assert out.shape == (2, 13, 6, 32) and out.is_contiguous()
    ref = sdpa(q.float(), k.float(), v.float(), bias.float(), 32 ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=1e-5 if dtype == torch.float32 else 2e-2,
                               rtol=1e-5 if dtype == torch.float32 else 2e-2)
    with dispatch.use_backend("torch"):
        assert dispatch.serving_attention_ran(q, k, v, bias)[1] == "sdpa"
