"""The cpp backend's decoder ops (structprune/backends/cpp/decoder.py) against the reference: forward and every
gradient, fp32 and bf16 (the half-precision rule of tests/helpers/tolerances.py), no / some / all heads kept,
equal and unequal groups, key padding, a sliding window, decode steps (queries against a longer cache), absent
biases and norms; the packed weights' cache follows in-place updates; the dispatcher runs it for both ops."""
import pytest
import torch
from helpers.tolerances import check_close

import structprune as sp
import structprune.backends.cpp.ops as ext
from structprune.backends.cpp import decoder as dec
from structprune.ops import dispatch, reference

if ext.load_error() is not None:
    pytest.skip(f"C++ extension unavailable: {ext.load_error()}", allow_module_level=True)

B, S, E, H, KV, D = 2, 11, 32, 6, 3, 8
HEADS = {"all": (0, 1, 2, 3, 4, 5), "equal": (2, 3, 4, 5), "unequal": (0, 1, 3, 5), "one": (4,), "none": ()}


def rotary_tables(seq=S, dim=D, theta=100.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    emb = torch.cat([torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]] * 2, -1)[None]
    return emb.cos(), emb.sin()


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]


def _grads(y, leaves, grad_out):
    present = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(y, present, grad_out.to(y.dtype), allow_unused=True))
    return [None if t is None else next(got) for t in leaves]


def _compare(names, run_kernel, run_reference, tensors, dtype, grad_out):
    """Kernel in ``dtype`` vs the fp32 reference on the same (rounded) inputs, with the plain ``dtype`` reference
    as the half-precision yardstick; outputs and every gradient."""
    rounded = [None if t is None else t.to(dtype).float() for t in tensors]
    leaves = _leaves(tensors, dtype)
    y = run_kernel(*leaves)
    got = (y, _grads(y, leaves, grad_out))
    ref_leaves = _leaves(rounded, torch.float32)
    y32 = run_reference(*ref_leaves)
    ref32 = (y32, _grads(y32, ref_leaves, grad_out))
    plain_leaves = _leaves(tensors, dtype)
    yp = run_reference(*plain_leaves)
    plain = (yp, _grads(yp, plain_leaves, grad_out))
    check_close("y", got[0], ref32[0], plain[0], dtype)
    for n, a, r, p in zip(names, got[1], ref32[1], plain[1]):
        if r is None:
            assert a is None or not a.abs().any(), n
            continue
        check_close(f"d{n}", a if a is not None else torch.zeros_like(r), r, p, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias,norm", [(True, True), (False, False)])
@pytest.mark.parametrize("kept", ["all", "unequal", "one"])
def test_qkv_matches_the_reference(kept, bias, norm, dtype):
    g = torch.Generator().manual_seed(len(kept) + bias)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    tensors = [r(B, S, E), r(H * D, E), r(H * D) if bias else None, r(KV * D, E), r(KV * D) if bias else None,
               r(KV * D, E), r(KV * D) if bias else None, r(D) + 1 if norm else None, r(D) + 1 if norm else None]
    cos, sin = rotary_tables()
    active = torch.tensor(HEADS[kept], dtype=torch.long)
    active_kv = torch.unique(active // 2)
    grad_outs = [torch.randn(B, n, S, D, generator=g) for n in (active.numel(), active_kv.numel(),
                                                                 active_kv.numel())]

    def as_one(fn):  # one output for _compare: q, k and v concatenated over heads
        return lambda *t: torch.cat(fn(*t), dim=1)

    ker = as_one(lambda *t: dec.gated_decoder_qkv(*t, 1e-6, cos.to(t[0].dtype), sin.to(t[0].dtype), D, active,
                                                  active_kv))
    ref = as_one(lambda *t: reference.gated_decoder_qkv(*t, 1e-6, cos.to(t[0].dtype), sin.to(t[0].dtype), D,
                                                        active, active_kv))
    names = ["x", "wq", "bq", "wk", "bk", "wv", "bv", "q_norm", "k_norm"]
    _compare(names, ker, ref, tensors, dtype, torch.cat(grad_outs, dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias,norm,batched", [(True, True, False), (False, False, True), (False, True, True)])
@pytest.mark.parametrize("kept", ["all", "unequal", "one", "none"])
@pytest.mark.parametrize("seq", [S, 1], ids=["prefill", "decode"])
def test_qkv_epilogue_without_gradients_matches_the_reference(seq, kept, bias, norm, batched, dtype, monkeypatch):
    """No gradient: the q/k norm + rotary + layout run as one C++ pass (cpp_decoder_rotary), fp32 math rounded
    once: equal to the fp32 reference on the same rounded inputs (per-sequence or shared rotary tables)."""
    g = torch.Generator().manual_seed(len(kept) + bias + seq)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)  # noqa: E731
    tensors = [r(B, seq, E), r(H * D, E), r(H * D) if bias else None, r(KV * D, E), r(KV * D) if bias else None,
               r(KV * D, E), r(KV * D) if bias else None, r(D) + 1 if norm else None, r(D) + 1 if norm else None]
    cos, sin = rotary_tables(S + 3)
    cos, sin = cos[:, 3:3 + seq], sin[:, 3:3 + seq]  # positions 3.. (a decode step: not position 0)
    if batched:
        cos, sin = torch.cat([cos, cos.roll(1, 1)]), torch.cat([sin, sin.roll(1, 1)])
    active = torch.tensor(HEADS[kept], dtype=torch.long)
    active_kv = torch.unique(active // 2)
    calls, real = [], torch.ops.structprune.cpp_decoder_rotary

    def spy(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(torch.ops.structprune, "cpp_decoder_rotary", spy)
    got = torch.cat(dec.gated_decoder_qkv(*tensors, 1e-6, cos, sin, D, active, active_kv), dim=1)
    assert calls, "the epilogue kernel did not run"
    f32 = [None if t is None else t.float() for t in tensors]
    want32 = torch.cat(reference.gated_decoder_qkv(*f32, 1e-6, cos, sin, D, active, active_kv), dim=1)
    plain = torch.cat(reference.gated_decoder_qkv(*tensors, 1e-6, cos, sin, D, active, active_kv), dim=1)
    assert got.dtype == dtype
    check_close("qkv", got, want32, plain, dtype)


def attention_case(kept, q_len, seed=0, bias=True, padding=True):
    g = torch.Generator().manual_seed(seed)
    active = torch.tensor(HEADS[kept], dtype=torch.long)
    q_to_kv = active // 2
    keep_kv = torch.unique(q_to_kv)
    q_to_kv = torch.searchsorted(keep_kv, q_to_kv)
    tensors = [torch.randn(B, active.numel(), q_len, D, generator=g), torch.randn(B, keep_kv.numel(), S, D, generator=g),
               torch.randn(B, keep_kv.numel(), S, D, generator=g), torch.randn(E, H * D, generator=g) * 0.3,
               torch.randn(E, generator=g) if bias else None, torch.rand(H, generator=g) + 0.2]
    key_mask = None
    if padding:
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[1, :4] = False
    return tensors, active, q_to_kv, key_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [-1, 3])
@pytest.mark.parametrize("q_len", [S, 1, 5], ids=["prefill", "decode", "chunk"])
@pytest.mark.parametrize("kept", ["all", "equal", "unequal", "one"])
def test_attention_matches_the_reference(kept, q_len, window, dtype):
    tensors, active, q_to_kv, key_mask = attention_case(kept, q_len, seed=q_len + window)
    grad_out = torch.randn(B, q_len, E, generator=torch.Generator().manual_seed(1))
    names = ["q", "k", "v", "wo", "bo", "gates"]

    def ker(q, k, v, wo, bo, gates):
        return dec.gated_decoder_attention(q, k, v, wo, bo, gates, active, q_to_kv, key_mask, window)

    def ref(q, k, v, wo, bo, gates):
        return reference.gated_decoder_attention(q, k, v, wo, bo, gates, active, q_to_kv, window, key_mask=key_mask)

    _compare(names, ker, ref, tensors, dtype, grad_out)


@pytest.mark.parametrize("bias", [True, False])
def test_attention_with_no_head_left_and_no_padding(bias):
    tensors, active, q_to_kv, _ = attention_case("none", S, bias=bias, padding=False)
    y = dec.gated_decoder_attention(*tensors, active, q_to_kv, None, -1)
    torch.testing.assert_close(y, (tensors[4] if bias else torch.zeros(E)).expand(B, S, E))
    tensors, active, q_to_kv, _ = attention_case("unequal", S, bias=bias, padding=False)
    torch.testing.assert_close(dec.gated_decoder_attention(*tensors, active, q_to_kv, None, -1),
                               reference.gated_decoder_attention(*tensors, active, q_to_kv), atol=1e-5, rtol=1e-5)


def test_packed_weights_follow_in_place_updates():
    """Under no_grad the packed rows / columns are cached; an optimizer-style in-place update is seen."""
    tensors, active, q_to_kv, key_mask = attention_case("unequal", S)
    q, k, v, wo, bo, gates = tensors
    wo = torch.nn.Parameter(wo)
    with torch.no_grad():
        first = dec.gated_decoder_attention(q, k, v, wo, bo, gates, active, q_to_kv, key_mask, -1)
        wo.mul_(2.0)
        second = dec.gated_decoder_attention(q, k, v, wo, bo, gates, active, q_to_kv, key_mask, -1)
        want = reference.gated_decoder_attention(q, k, v, wo, bo, gates, active, q_to_kv, key_mask=key_mask)
    torch.testing.assert_close(second, want, atol=1e-5, rtol=1e-5)
    assert (second - first).abs().max() > 1e-3
    sp.clear_cache()
    assert not dec._PACKS


def test_dispatcher_runs_both_decoder_ops_on_cpp():
    tensors, active, q_to_kv, key_mask = attention_case("unequal", S)
    mask = reference.decoder_mask(key_mask, S, S, -1, "cpu")
    dispatch.reset_last_backends()  # reasons other tests' ops left behind
    with sp.use_backend("cpp"):
        got = dispatch.gated_decoder_attention(*tensors, active, q_to_kv, attn_mask=mask)
        assert sp.last_backends()["attention"] == "cpp" and not sp.fallback_reasons()
    want = reference.gated_decoder_attention(*tensors, active, q_to_kv, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with sp.use_backend("cpp"):  # the public op names the backend
        pub = torch.ops.structprune.gated_decoder_attention(*tensors, active, q_to_kv, key_mask, -1, "cpp")
    torch.testing.assert_close(pub, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [-1, 4])
def test_the_masks_a_layer_may_get_give_the_same_outputs(window):
    """HF's 4D bool and additive masks, a [B, Sk] key mask and a batch-1 mask: the same outputs on the reference
    and on the cpp backend (which gets the key padding row and the window). Right padding: every query sees a key
    (a left-padding query would get a uniform context from an additive mask on the reference, as in HF's eager
    layers)."""
    tensors, active, q_to_kv, _ = attention_case("unequal", S)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, 9:] = False  # two padding keys: every window still holds a real key
    want = reference.gated_decoder_attention(*tensors, active, q_to_kv, window, key_mask=key_mask)
    bool4d = reference.decoder_mask(key_mask, S, S, window, "cpu")
    additive = torch.zeros(bool4d.shape).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    for mask in (bool4d, additive, key_mask.long()):
        for name in ("torch", "cpp"):
            with sp.use_backend(name):
                got = dispatch.gated_decoder_attention(*tensors, active, q_to_kv, window, attn_mask=mask)
            assert sp.last_backends()["attention"] == name
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    one = reference.decoder_mask(torch.ones(1, S, dtype=torch.bool), S, S, window, "cpu")
    want = reference.gated_decoder_attention(*tensors, active, q_to_kv, window)
    with sp.use_backend("cpp"):
        torch.testing.assert_close(dispatch.gated_decoder_attention(*tensors, active, q_to_kv, window, attn_mask=one),
                                   want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [-1, 3, 64])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("q_len", [1, 5], ids=["decode", "chunk"])
@pytest.mark.parametrize("kept", ["all", "equal", "unequal", "one"])
def test_decode_kernel_matches_the_reference(kept, q_len, padding, window, dtype, monkeypatch):
    """Without gradients a few queries run csrc/cpu/decoder_cpu.cpp (no repeat_kv, no mask tensor): equal to the
    fp32 reference on the same rounded inputs, left and right key padding (a fully padded query row included)."""
    tensors, active, q_to_kv, _ = attention_case(kept, q_len, seed=7 * q_len + window)
    key_mask = None
    if padding != "none":
        key_mask = torch.ones(B, S, dtype=torch.bool)
        if padding == "left":
            key_mask[1, :S - 2] = False  # row 1: the first queries of a chunk see no key
        else:
            key_mask[0, S - 3:] = False
    low = [None if t is None else t.to(dtype) for t in tensors]
    calls, real = [], torch.ops.structprune.cpp_decoder_decode_attention

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(torch.ops.structprune, "cpp_decoder_decode_attention", spy)
    got = dec.gated_decoder_attention(*low, active, q_to_kv, key_mask, window)
    assert calls or not active.numel(), "the decode kernel did not run"
    want32 = reference.gated_decoder_attention(*[None if t is None else t.float() for t in low], active, q_to_kv,
                                               window, key_mask=key_mask)
    plain = reference.gated_decoder_attention(*low, active, q_to_kv, window, key_mask=key_mask)
    check_close("y", got, want32, plain, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dim", [16, 12], ids=["vector-path", "scalar-path"])
def test_decode_kernel_on_a_long_cache(dim, dtype):
    """The vectorised rows (fp32 / bf16, head_dim a multiple of 8: csrc/cpu/attention_rows.h) and the scalar pass
    (any other head_dim, fp16) on 70 keys (every remainder of the 4-key and 8-lane loops), left padding and a
    window, against SDPA in fp32 on the same rounded inputs."""
    g = torch.Generator().manual_seed(dim)
    Sk, Sq, A, Akv = 70, 3, 4, 2
    q, k, v = (torch.randn(2, n, s, dim, generator=g).to(dtype) for n, s in ((A, Sq), (Akv, Sk), (Akv, Sk)))
    q_to_kv = torch.tensor([1, 0, 1, 1])
    key_mask = torch.ones(2, Sk, dtype=torch.bool)
    key_mask[1, :9] = False
    for window in (-1, 33):
        got = torch.ops.structprune.cpp_decoder_decode_attention(q, k, v, q_to_kv, key_mask, window, dim ** -0.5)
        pos = torch.arange(Sk - Sq, Sk)[:, None]
        keys = torch.arange(Sk)[None, :]
        allowed = (keys <= pos) & ((pos - keys < window) if window > 0 else True) & key_mask[:, None, None, :]
        want = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float()[:, q_to_kv], v.float()[:, q_to_kv], attn_mask=allowed)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def test_decode_kernel_refuses_a_bad_map():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="q_to_kv\\[1\\] = 1 is not a KV head"):
        torch.ops.structprune.cpp_decoder_decode_attention(q, k, k, torch.tensor([0, 1]), None, -1, 0.3)
    with pytest.raises(RuntimeError, match="key_mask must be bool"):
        torch.ops.structprune.cpp_decoder_decode_attention(q, k, k, torch.tensor([0, 0]), torch.ones(1, 4), -1, 0.3)


def test_forward_only_kernels_pass_opcheck():
    """Schema, fake kernel and dispatch of the two forward-only C++ ops (torch.library.opcheck; no autograd: the
    Python side runs them only without gradients)."""
    g = torch.Generator().manual_seed(0)
    cos, sin = rotary_tables()
    qkv = torch.randn(B, S, (3 + 2 * 2) * D, generator=g)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.structprune.cpp_decoder_rotary.default,
                          (qkv, cos, sin, torch.rand(D, generator=g), None, 1e-6, D, 3, 2), test_utils=tests)
    q, k = torch.randn(B, 3, 2, D, generator=g), torch.randn(B, 2, S, D, generator=g)
    torch.library.opcheck(torch.ops.structprune.cpp_decoder_decode_attention.default,
                          (q, k, k.clone(), torch.tensor([0, 1, 1]), torch.ones(B, S, dtype=torch.bool), 4, 0.25),
                          test_utils=tests)

