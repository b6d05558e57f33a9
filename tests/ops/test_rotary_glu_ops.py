"""The ops ModernBERT adds: rotary / sliding-window gated attention and the GLU gated FFN (reference first).

The reference is checked against independent formulas (HF's rotary and sliding-window definitions written out,
the GLU FFN unit by unit); the public ops (``torch.ops.structprune.gated_rotary_attention`` / ``gated_glu_ffn``)
pass ``opcheck`` on the "torch" backend; bad inputs get clear errors; backends without kernels refuse."""
import pytest
import torch
import torch.nn.functional as F

import structprune  # noqa: F401  (registers the ops)
from structprune.ops import dispatch, reference
from structprune.ops import registry
from structprune.ops.support import Backend, OpInputs

B, S, E, NH, D, I = 2, 13, 24, 3, 8, 10


def rotary_tables(seq=S, dim=D, theta=50.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)[None]
    return emb.cos(), emb.sin()


def attention_args(seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)  # noqa: E731
    A = NH * D
    x = r(B, S, E)
    ws = [r(A, E), r(A) if bias else None, r(A, E), r(A) if bias else None, r(A, E), r(A) if bias else None,
          r(E, A), r(E) if bias else None]
    gates = torch.tensor([1.0, 0.0, 0.7])
    return x, ws, gates


def slow_attention(x, ws, gates, cos, sin, window, key_valid):
    """Per batch, head and query, the formula of HF's ModernBERT attention written out."""
    wq, bq, wk, bk, wv, bv, wo, bo = ws
    out = torch.zeros(B, S, NH * D)
    for b in range(B):
        q, k, v = (F.linear(x[b], w, bb).view(S, NH, D) for w, bb in ((wq, bq), (wk, bk), (wv, bv)))

        def rot(t):
            t1, t2 = t[..., :D // 2], t[..., D // 2:]
            return t * cos[0][:, None] + torch.cat([-t2, t1], -1) * sin[0][:, None]

        q, k = rot(q), rot(k)
        for h in range(NH):
            for i in range(S):
                allowed = [j for j in range(S) if key_valid[b, j] and (window < 0 or abs(i - j) <= window)]
                if not allowed:  # a padding query with no key in its band: compared nowhere
                    continue
                s = torch.stack([q[i, h] @ k[j, h] for j in allowed]) / D ** 0.5
                p = torch.softmax(s, 0)
                out[b, i, h * D:(h + 1) * D] = gates[h] * sum(pj * v[j, h] for pj, j in zip(p, allowed))
    return F.linear(out, wo, bo)


@pytest.mark.parametrize("window", [-1, 0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_rotary_attention_matches_the_formula(window, bias):
    x, ws, gates = attention_args(bias=bias)
    cos, sin = rotary_tables()
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[1, 9:] = False
    key_bias = torch.zeros(B, S).masked_fill(~key_valid, torch.finfo(torch.float32).min)
    rows = key_valid[..., None]  # padding queries (whose band may hold no key) are not compared
    want = slow_attention(x, ws, gates, cos, sin, window, key_valid) * rows
    got = reference.gated_rotary_attention(x, *ws, gates, NH, cos, sin, window=window, key_bias=key_bias) * rows
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the dispatcher with HF's [B, K] padding mask, and the public op on the "torch" backend: the same
    mask = key_valid  # bool, as HF layers pass it
    active = torch.tensor([0, 2])
    d = dispatch.gated_rotary_attention(x, *ws, gates, active, NH, cos, sin, window=window, attn_mask=mask) * rows
    torch.testing.assert_close(d, want, atol=1e-5, rtol=1e-5)
    op = torch.ops.structprune.gated_rotary_attention(x, *ws, gates, active, key_bias, cos, sin, window, NH, "torch")
    op = op * rows
    torch.testing.assert_close(op, want, atol=1e-5, rtol=1e-5)


def test_reference_glu_ffn_matches_unit_by_unit():
    g = torch.Generator().manual_seed(2)
    x, w1, b1 = torch.randn(B, S, E, generator=g), torch.randn(2 * I, E, generator=g), torch.randn(2 * I, generator=g)
    w2, b2 = torch.randn(E, I, generator=g), torch.randn(E, generator=g)
    gates = torch.rand(I, generator=g)
    gates[[1, 4]] = 0
    want = b2.expand(B, S, E).clone()
    for u in range(I):
        h = F.gelu(x @ w1[u] + b1[u]) * (x @ w1[u + I] + b1[u + I]) * gates[u]
        want += h[..., None] * w2[:, u]
    got = reference.gated_glu_ffn(x, w1, b1, w2, b2, gates, "gelu")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    kept = torch.nonzero(gates).flatten()
    torch.testing.assert_close(dispatch.gated_glu_ffn(x, w1, b1, w2, b2, gates, kept), want, atol=1e-4, rtol=1e-5)
    # 0 units: the output bias alone (and no bias: zeros)
    empty = reference.gated_glu_ffn(x, w1[:0], None, w2[:, :0], b2, gates[:0], "gelu")
    torch.testing.assert_close(empty, b2.expand(B, S, E))


def test_opcheck_public_ops_on_the_reference():
    x, ws, gates = attention_args()
    cos, sin = rotary_tables()
    x.requires_grad_(True)
    key_bias = torch.zeros(B, S)
    key_bias[1, 10:] = torch.finfo(torch.float32).min
    torch.library.opcheck(torch.ops.structprune.gated_rotary_attention.default,
                          (x, *ws, gates, torch.tensor([0, 2]), key_bias, cos, sin, 3, NH, "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(2 * I, E, generator=g, requires_grad=True)
    w2 = torch.randn(E, I, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.structprune.gated_glu_ffn.default,
                          (x, w1, None, w2, None, torch.ones(I), torch.arange(I), "gelu", "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_gradients_flow_through_rotary_attention_and_glu():
    x, ws, gates = attention_args()
    cos, sin = rotary_tables()
    ws = [w.requires_grad_(True) for w in ws]
    gates.requires_grad_(True)
    reference.gated_rotary_attention(x, *ws, gates, NH, cos, sin, window=2).sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in ws) and gates.grad[1] != 0


def test_bad_inputs_are_refused_with_what_was_expected():
    x, ws, gates = attention_args()
    cos, sin = rotary_tables()
    with pytest.raises(ValueError, match="cos must be"):
        dispatch.gated_rotary_attention(x, *ws, gates, None, NH, cos[:, :5], sin)
    with pytest.raises(ValueError, match="window must be"):
        dispatch.gated_rotary_attention(x, *ws, gates, None, NH, cos, sin, window=-2)
    with pytest.raises(ValueError, match="2 \\* units rows"):
        dispatch.gated_glu_ffn(x, torch.randn(7, E), None, torch.randn(E, 3), None, torch.ones(3), None)
    with pytest.raises(ValueError, match="w2 must have shape"):
        dispatch.gated_glu_ffn(x, torch.randn(8, E), None, torch.randn(E, 3), None, torch.ones(4), None)


def test_kernel_backends_have_no_kernel_yet_and_say_so():
    cpu = torch.device("cpu")
    kernel = Backend(name="k", availability=lambda d: None, gated_attention=None, gated_ffn=None)
    rotary = ["rotary positions / a sliding-window key mask (no gated_rotary_attention kernel)"]
    assert kernel.not_supported_reasons(OpInputs("attention", cpu, torch.float32, num_heads=2, rotary=True)) == rotary
    assert kernel.not_supported_reasons(OpInputs("attention", cpu, torch.float32, num_heads=2, window=0)) == rotary
    assert kernel.not_supported_reasons(OpInputs("ffn", cpu, torch.float32, glu=True)) == \
        ["a GLU FFN (no gated_glu_ffn kernel)"]
    # a backend that has the kernels is not refused for them
    with_glu = Backend(name="k", availability=lambda d: None, gated_attention=None, gated_ffn=None,
                       gated_glu_ffn=lambda *a: None)
    assert with_glu.not_supported_reasons(OpInputs("ffn", cpu, torch.float32, glu=True)) == []
    assert all(registry.load(n).not_supported_reasons(OpInputs("ffn", cpu, torch.float32, glu=True)) == []
               for n in ("torch",))