"""The decoder ops (grouped-query attention for Llama, Mistral, Qwen2, Qwen3), reference first.

The reference is checked against the formulas written out (per batch, head and query: HF's RMSNorm, rotary
positions, causal + sliding-window + key-padding visibility, each query head reading its KV head); the public ops
(``torch.ops.structprune.gated_decoder_qkv`` / ``gated_decoder_attention``) pass ``opcheck`` on the "torch" backend;
the mask HF builds is turned into the kernels' key mask only when it is causal + padding + window; bad inputs get
clear errors; backends without the kernels refuse with a reason."""
import pytest
import torch
import torch.nn.functional as F

from structprune.ops import dispatch, padding, reference
from structprune.ops.support import Backend, OpInputs

B, S, E, H, KV, D = 2, 9, 24, 6, 3, 8


def rotary_tables(seq=S, dim=D, theta=100.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    emb = torch.cat([torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]] * 2, -1)[None]
    return emb.cos(), emb.sin()


def qkv_args(seed=0, bias=True, norm=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    x = r(B, S, E)
    ws = [r(H * D, E), r(H * D) if bias else None, r(KV * D, E), r(KV * D) if bias else None, r(KV * D, E),
          r(KV * D) if bias else None]
    norms = [torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5] if norm else [None, None]
    return x, ws, norms


def slow_qkv(x, ws, norms, cos, sin, eps=1e-6):
    """Each head of each token written out: (RMSNorm,) rotate the pairs (i, i + D/2)."""
    wq, bq, wk, bk, wv, bv = ws
    out = []
    for w, b, n, rotate in ((wq, bq, norms[0], True), (wk, bk, norms[1], True), (wv, bv, None, False)):
        t = F.linear(x, w, b).view(B, S, -1, D)
        if n is not None:
            t = n * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)
        if rotate:
            c, s = cos[0][None, :, None, :], sin[0][None, :, None, :]
            t1, t2 = t[..., :D // 2], t[..., D // 2:]
            t = t * c + torch.cat([-t2, t1], -1) * s
        out.append(t.transpose(1, 2))
    return out


@pytest.mark.parametrize("bias,norm", [(True, True), (False, False), (True, False)])
def test_reference_qkv_is_the_formula(bias, norm):
    x, ws, norms = qkv_args(bias=bias, norm=norm)
    cos, sin = rotary_tables()
    want = slow_qkv(x, ws, norms, cos, sin)
    got = reference.gated_decoder_qkv(x, *ws, *norms, 1e-6, cos, sin, D)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    act, act_kv = torch.tensor([1, 4, 5]), torch.tensor([0, 2])
    q, k, v = reference.gated_decoder_qkv(x, *ws, *norms, 1e-6, cos, sin, D, act, act_kv)
    torch.testing.assert_close(q, want[0][:, act])
    torch.testing.assert_close(k, want[1][:, act_kv])
    torch.testing.assert_close(v, want[2][:, act_kv])


def slow_attention(q, k, v, wo, bo, gates, active, q_to_kv, window, key_mask):
    """Per batch, active head and query: softmax over the visible keys (j <= pos, pos - j < window, not padding) of
    the head's KV head; no visible key: a zero context."""
    Bq, A, Sq, Dq = q.shape
    Sk = k.shape[2]
    ctx = torch.zeros(Bq, Sq, H * Dq)
    for b in range(Bq):
        for a in range(A):
            h, j = int(active[a]), int(q_to_kv[a])
            for i in range(Sq):
                pos = Sk - Sq + i
                seen = [t for t in range(Sk) if t <= pos and (window <= 0 or pos - t < window)
                        and (key_mask is None or key_mask[b, t])]
                if not seen:
                    continue
                p = torch.softmax(torch.stack([q[b, a, i] @ k[b, j, t] for t in seen]) / Dq ** 0.5, 0)
                ctx[b, i, h * Dq:(h + 1) * Dq] = gates[h] * sum(pt * v[b, j, t] for pt, t in zip(p, seen))
    return F.linear(ctx, wo, bo)


def attention_case(seed=0, q_len=S, k_len=S, heads=(0, 1, 3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    active = torch.tensor(heads, dtype=torch.long)
    q_to_kv = torch.tensor([h // 2 for h in heads], dtype=torch.long)  # KV head 1 lost query head 2
    q = torch.randn(B, len(heads), q_len, D, generator=g)
    k, v = torch.randn(B, KV, k_len, D, generator=g), torch.randn(B, KV, k_len, D, generator=g)
    wo, bo = torch.randn(E, H * D, generator=g) * 0.3, torch.randn(E, generator=g)
    gates = torch.rand(H, generator=g) + 0.2
    key_mask = torch.ones(B, k_len, dtype=torch.bool)
    key_mask[1, :4] = False  # left padding
    return q, k, v, wo, bo, gates, active, q_to_kv, key_mask


@pytest.mark.parametrize("window", [-1, 3])
@pytest.mark.parametrize("q_len", [S, 1, 4])
def test_reference_attention_is_the_formula(window, q_len):
    q, k, v, wo, bo, gates, active, q_to_kv, key_mask = attention_case(q_len=q_len)
    want = slow_attention(q, k, v, wo, bo, gates, active, q_to_kv, window, key_mask)
    got = reference.gated_decoder_attention(q, k, v, wo, bo, gates, active, q_to_kv, window, key_mask=key_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_attention_with_no_head_is_the_bias():
    q, k, v, wo, bo, gates, *_ = attention_case()
    empty = torch.zeros(0, dtype=torch.long)
    got = reference.gated_decoder_attention(q[:, :0], k[:, :0], v[:, :0], wo, bo, gates, empty, empty)
    torch.testing.assert_close(got, bo.expand(B, S, E))


def _hf_mask(key_mask, q_len, k_len, window, additive=False):
    mask = reference.decoder_mask(key_mask, q_len, k_len, window, "cpu").expand(B, 1, q_len, k_len)
    if additive:
        return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("window", [-1, 3])
def test_the_kernels_key_mask_rebuilds_hfs_mask(window, additive):
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, :4] = False
    got, reason = padding.causal_key_mask(_hf_mask(key_mask, S, S, window, additive), S, S, window)
    assert reason is None and torch.equal(got, key_mask)
    # decode: one query against a cache
    got, reason = padding.causal_key_mask(_hf_mask(key_mask, 1, S, window, additive), 1, S, window)
    assert reason is None
    hole = _hf_mask(key_mask, S, S, window).clone()
    hole[0, 0, 5, 4] = False
    assert padding.causal_key_mask(hole, S, S, window)[1] is not None
    wrong_window = _hf_mask(key_mask, S, S, 2)
    assert padding.causal_key_mask(wrong_window, S, S, window)[1] is not None
    assert padding.causal_key_mask(None, S, S, window) == (None, None)
    assert padding.causal_key_mask(None, 3, S, window)[1] is not None  # causal from the top left: not ours


def test_opcheck_public_ops_on_the_reference():
    x, ws, norms = qkv_args()
    cos, sin = rotary_tables()
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.structprune.gated_decoder_qkv.default,
                          (x, *ws, *norms, 1e-6, cos, sin, D, torch.tensor([0, 3]), torch.tensor([1]), "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    q, k, v, wo, bo, gates, active, q_to_kv, key_mask = attention_case()
    q.requires_grad_(True)
    torch.library.opcheck(torch.ops.structprune.gated_decoder_attention.default,
                          (q, k, v, wo, bo, gates, active, q_to_kv, key_mask, 3, "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_inputs_are_refused_with_what_was_expected():
    x, ws, norms = qkv_args()
    cos, sin = rotary_tables()
    with pytest.raises(ValueError, match="head_dim must be an even int"):
        dispatch.gated_decoder_qkv(x, *ws, *norms, 1e-6, cos, sin, 7)
    with pytest.raises(ValueError, match="cos must be"):
        dispatch.gated_decoder_qkv(x, *ws, *norms, 1e-6, cos[:, :4], sin, D)
    with pytest.raises(ValueError, match="q_norm must have shape"):
        dispatch.gated_decoder_qkv(x, *ws, torch.ones(D + 1), norms[1], 1e-6, cos, sin, D)
    with pytest.raises(ValueError, match="active_kv must hold sorted unique indices"):
        dispatch.gated_decoder_qkv(x, *ws, *norms, 1e-6, cos, sin, D, None, torch.tensor([2, 0]))
    q, k, v, wo, bo, gates, active, q_to_kv, key_mask = attention_case()
    with pytest.raises(ValueError, match=r"q_to_kv must hold KV head indices in \[0, 3\)"):
        dispatch.gated_decoder_attention(q, k, v, wo, bo, gates, active, q_to_kv + 1)
    with pytest.raises(ValueError, match="q holds 5 heads but active_heads lists 2"):
        dispatch.gated_decoder_attention(q, k, v, wo, bo, gates, active[:2], q_to_kv)
    with pytest.raises(ValueError, match="at least the 9 query positions"):
        dispatch.gated_decoder_attention(q, k[:, :, :4], v[:, :, :4], wo, bo, gates, active, q_to_kv)
    with pytest.raises(ValueError, match="window must be an int >= -1"):
        dispatch.gated_decoder_attention(q, k, v, wo, bo, gates, active, q_to_kv, window=-3)


def test_kernel_backends_without_the_decoder_kernels_refuse():
    cpu = torch.device("cpu")
    kernel = Backend(name="k", availability=lambda d: None, gated_attention=None, gated_ffn=None)
    reason = ["decoder grouped-query attention (no gated_decoder_qkv / gated_decoder_attention kernels)"]
    assert kernel.not_supported_reasons(OpInputs("qkv", cpu, torch.float32, decoder=True)) == reason
    assert kernel.not_supported_reasons(OpInputs("attention", cpu, torch.float32, num_heads=2, decoder=True)) == \
        reason
    both = Backend(name="k", availability=lambda d: None, gated_attention=None, gated_ffn=None,
                   gated_decoder_qkv=lambda *a: None, gated_decoder_attention=lambda *a: None)
    assert both.not_supported_reasons(OpInputs("attention", cpu, torch.float32, num_heads=2, decoder=True)) == []
    assert any("dropout" in r for r in both.not_supported_reasons(
        OpInputs("attention", cpu, torch.float32, num_heads=2, decoder=True, dropout_p=0.1)))
