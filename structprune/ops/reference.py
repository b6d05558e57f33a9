"""Pure-PyTorch reference of every op: the oracle each kernel backend is tested against.

Shapes (nn.Linear layout, ``weight[out, in]``):
    x: [B, S, E]; wq/wk/wv: [H*D, E]; bq/bk/bv: [H*D]; wo: [E, H*D]; bo: [E]
    head_gates: [H] gate value per head (0 = pruned); the context of head h is scaled by it before ``wo``
    key_bias: [B, S] additive float mask over keys (0 = attend, very negative = padding), or None
    w1: [I, E]; b1: [I]; w2: [E, I]; b2: [E]; unit_gates: [I] gate per FFN unit
The outputs are the projections *before* the residual add and LayerNorm, bias included. Hard-concrete
sampling (Louizos, Welling & Kingma, 2018): :func:`hard_concrete_from_uniform`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from structprune.ops.activations import check_activation

# The hard-concrete distribution: temperature and stretch interval (gamma, zeta).
BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1


def activation_fn(name: str):
    """The torch function of activation ``name`` (one of :data:`structprune.ops.activations.ACTIVATIONS`)."""
    check_activation(name)
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise NotImplementedError(f"structprune.ops.activations lists {name!r}, which the reference does not compute")


def key_bias_to_mask(key_bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, S] additive key bias -> [B, 1, 1, S] additive mask broadcastable over heads and queries."""
    if key_bias is None:
        return None
    return key_bias.to(dtype)[:, None, None, :]


def attention_context(q, k, v, attn_mask, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Multi-head attention on [B, H, S, D] tensors; ``attn_mask`` is any mask SDPA accepts."""
    if impl == "eager":
        scores = torch.matmul(q, k.transpose(2, 3)) * (q.size(-1) ** -0.5)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            scores = scores + attn_mask
        probs = F.softmax(scores, dim=-1)
        probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
        return torch.matmul(probs, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=q.size(-1) ** -0.5)


def gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads: int, key_bias=None,
                    attn_mask=None, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Self-attention whose per-head context is scaled by ``head_gates`` before the output projection.

    ``attn_mask`` (a 4D HF-style mask) takes precedence over ``key_bias`` when both are given.
    """
    B, S, _ = x.shape
    if num_heads == 0:  # every head removed by compaction: only the output bias is left
        return F.linear(x.new_zeros(B, S, 0), wo, bo)
    head_dim = wq.shape[0] // num_heads

    def heads(t):
        return t.view(B, S, num_heads, head_dim).transpose(1, 2)

    q = heads(F.linear(x, wq, bq))
    k = heads(F.linear(x, wk, bk))
    v = heads(F.linear(x, wv, bv))
    mask = attn_mask if attn_mask is not None else key_bias_to_mask(key_bias, x.dtype)
    ctx = attention_context(q, k, v, mask, dropout_p, impl)  # [B, H, S, D]
    ctx = ctx * head_gates.to(ctx.dtype)[None, :, None, None]
    ctx = ctx.transpose(1, 2).reshape(B, S, num_heads * head_dim)
    return F.linear(ctx, wo, bo)


def gated_ffn(x, w1, b1, w2, b2, unit_gates, activation: str = "gelu"):
    """``(act(x @ w1.T + b1) * unit_gates) @ w2.T + b2``."""
    h = activation_fn(activation)(F.linear(x, w1, b1))
    h = h * unit_gates.to(h.dtype)
    return F.linear(h, w2, b2)


def hard_concrete_from_uniform(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """A hard-concrete sample given uniform noise ``u`` in (0, 1); differentiable in ``log_alpha``.

    This is the pure-PyTorch reference of the fused sampling kernels.
    """
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def attention_flops(batch: int, seq: int, hidden: int, heads_kept: int, head_dim: int) -> int:
    """Multiply-adds x2 of a self-attention block with ``heads_kept`` heads (projections + scores + context)."""
    inner = heads_kept * head_dim
    proj = 2 * batch * seq * hidden * inner * 4  # q, k, v and output projections
    attn = 2 * batch * heads_kept * seq * seq * head_dim * 2
    return proj + attn


def ffn_flops(batch: int, seq: int, hidden: int, units_kept: int) -> int:
    return 2 * batch * seq * hidden * units_kept * 2


# --- rotary, sliding-window attention and the GLU FFN (ModernBERT; decoder GLU models later) ---------------------
# Extra shapes: cos/sin: [B or 1, S, D] (D = head_dim, HF's rotary layout: the two halves of a head rotate
# together); window: keys within |q - k| <= window attend (a band), -1 = every key; w1 of the GLU FFN: [2*I, E],
# rows [0, I) the input half and rows [I, 2*I) the gate half (unit u is the row pair (u, u + I)); b1: [2*I] or None.
def rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on ``t`` [B, H, S, D] with ``cos``/``sin`` [B or 1, S, D], computed in fp32 (as HF does)."""
    tf = t.float()
    c, s = cos[:, None].float(), sin[:, None].float()
    return (tf * c + rotate_half(tf) * s).to(t.dtype)


def band(seq: int, window: int, device) -> torch.Tensor | None:
    """[S, S] bool: query q may attend key k (|q - k| <= window); None for ``window < 0`` (every key)."""
    if window < 0:
        return None
    pos = torch.arange(seq, device=device)
    return (pos[:, None] - pos[None, :]).abs() <= window


def banded_key_mask(key_bias: torch.Tensor | None, seq: int, window: int, dtype, device) -> torch.Tensor | None:
    """The additive [B|1, 1, S, S] mask of a [B, S] key bias (or None) restricted to a band of half-width
    ``window`` (keys out of the band get ``finfo(dtype).min``); None when there is nothing to mask."""
    allowed = band(seq, window, device)
    mask = key_bias_to_mask(key_bias, dtype)
    if allowed is None:
        return mask
    base = mask if mask is not None else torch.zeros(1, 1, 1, seq, dtype=dtype, device=device)
    return base.expand(base.shape[0], 1, seq, seq).masked_fill(~allowed, torch.finfo(dtype).min)


def gated_rotary_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, num_heads: int, cos, sin,
                           window: int = -1, key_bias=None, attn_mask=None, dropout_p: float = 0.0,
                           impl: str = "sdpa"):
    """:func:`gated_attention` with rotary positions applied to q and k between the projections and the
    attention, and a sliding window (``window`` >= 0: keys within ``|q - k| <= window``). Biases may be None.

    ``attn_mask`` (a 4D HF-style mask, which for a sliding layer already holds the band) takes precedence over
    ``key_bias`` and ``window``."""
    B, S, _ = x.shape
    if num_heads == 0:
        return F.linear(x.new_zeros(B, S, 0), wo, bo)
    head_dim = wq.shape[0] // num_heads

    def heads(t):
        return t.view(B, S, num_heads, head_dim).transpose(1, 2)

    q = apply_rotary(heads(F.linear(x, wq, bq)), cos, sin)
    k = apply_rotary(heads(F.linear(x, wk, bk)), cos, sin)
    v = heads(F.linear(x, wv, bv))
    mask = attn_mask if attn_mask is not None else banded_key_mask(key_bias, S, window, x.dtype, x.device)
    ctx = attention_context(q, k, v, mask, dropout_p, impl)
    ctx = ctx * head_gates.to(ctx.dtype)[None, :, None, None]
    ctx = ctx.transpose(1, 2).reshape(B, S, num_heads * head_dim)
    return F.linear(ctx, wo, bo)


def gated_glu_ffn(x, w1, b1, w2, b2, unit_gates, activation: str = "gelu"):
    """``((act(x @ w1[:I].T + b1[:I]) * (x @ w1[I:].T + b1[I:])) * unit_gates) @ w2.T + b2`` (biases may be None)."""
    a, g = F.linear(x, w1, b1).chunk(2, dim=-1)
    h = activation_fn(activation)(a) * g
    h = h * unit_gates.to(h.dtype)
    return F.linear(h, w2, b2)


def glu_ffn_flops(batch: int, seq: int, hidden: int, units_kept: int) -> int:
    return 2 * batch * seq * hidden * units_kept * 3


# --- decoder attention with grouped queries (Llama, Mistral, Qwen2, Qwen3) ---------------------------------------
# Two ops, so that a KV cache update fits between them: gated_decoder_qkv projects (q: the active query heads; k, v:
# the active KV heads), applies the per-head q/k RMSNorm (Qwen3) and the rotary positions as HF does (in the
# input's dtype); gated_decoder_attention attends (causal, aligned bottom-right: the Sq queries are the last Sq of
# the Sk keys, as with HF's caches; key padding; an optional sliding window: keys with q - k < window) with each
# query head reading its KV head through ``q_to_kv`` and projects the gated contexts with ``wo``. Shapes:
#   q: [B, A, Sq, D] (the heads ``active_heads``, in that order; every head when None); k, v: [B, Akv, Sk, D];
#   q_to_kv: [A] int64, the index in k/v's head axis of each active head's KV head; key_mask: [B, Sk] bool
#   (True = attend) or None. A query with no visible key gets a zero context, as SDPA gives it.
def rms_norm(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Llama / Qwen3 RMSNorm over the last axis: fp32 statistics, ``weight * normed.to(t.dtype)``."""
    tf = t.float()
    tf = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * tf.to(t.dtype)


def apply_rotary_native(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on ``t`` [B, H, S, D] in its own dtype, as HF's decoders' ``apply_rotary_pos_emb``."""
    c, s = cos[:, None].to(t.dtype), sin[:, None].to(t.dtype)
    return t * c + rotate_half(t) * s


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows (of q/k/v projections; columns of the output projection) that heads ``heads`` own."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).reshape(-1)


def gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps: float, cos, sin, head_dim: int,
                      active_heads=None, active_kv=None):
    """(q, k, v) of a decoder layer (see above): q [B, A, S, D] of ``active_heads``, k and v [B, Akv, S, D] of the
    KV heads ``active_kv`` (None: every head). Biases and norms may be None."""
    B, S, _ = x.shape

    def heads(t, norm):
        t = t.view(B, S, t.shape[-1] // head_dim, head_dim)
        return (t if norm is None else rms_norm(t, norm, eps)).transpose(1, 2)

    q = apply_rotary_native(heads(F.linear(x, wq, bq), q_norm), cos, sin)
    k = apply_rotary_native(heads(F.linear(x, wk, bk), k_norm), cos, sin)
    v = heads(F.linear(x, wv, bv), None)
    if active_heads is not None:
        q = q.index_select(1, active_heads.to(x.device))
    if active_kv is not None:
        k, v = k.index_select(1, active_kv.to(x.device)), v.index_select(1, active_kv.to(x.device))
    return q, k, v


def causal_band(q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """[Sq, Sk] bool: query i (the key position ``k_len - q_len + i``) may see key j: ``j <= pos`` and, for
    ``window > 0``, ``pos - j < window``."""
    pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    key = torch.arange(k_len, device=device)[None, :]
    allowed = key <= pos
    return allowed & (pos - key < window) if window > 0 else allowed


def decoder_mask(key_mask, q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """[B|1, 1, Sq, Sk] bool: the causal band (:func:`causal_band`) and the key mask ([B, Sk] bool or None)."""
    band = causal_band(q_len, k_len, window, device)[None, None]
    return band if key_mask is None else band & key_mask[:, None, None, :].to(torch.bool)


def gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, window: int = -1, key_mask=None,
                            attn_mask=None, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Grouped-query attention of the active heads and the gated output projection: ``[B, Sq, E]`` (bias included).

    The reference repeats each KV head for its query heads (``index_select``). ``attn_mask`` (HF's 4D mask, bool or
    additive) takes precedence over ``key_mask`` and ``window``; ``impl`` "eager" computes as HF's eager layers."""
    B, A, Sq, D = q.shape
    if active_heads is None:
        active_heads = torch.arange(A, device=q.device)
    active_heads = active_heads.to(q.device)
    if A == 0:
        return F.linear(q.new_zeros(B, Sq, 0), wo[:, :0], bo)
    idx = q_to_kv.to(q.device)
    k, v = k.index_select(1, idx), v.index_select(1, idx)
    mask = attn_mask if attn_mask is not None else decoder_mask(key_mask, Sq, k.shape[2], window, q.device)
    if impl == "eager":
        scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill(
                ~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        ctx = torch.matmul(F.dropout(probs, p=dropout_p, training=dropout_p > 0), v)
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=D ** -0.5)
    ctx = ctx * head_gates.index_select(0, active_heads).to(ctx.dtype)[None, :, None, None]
    ctx = ctx.transpose(1, 2).reshape(B, Sq, A * D)
    return F.linear(ctx, wo.index_select(1, head_rows(active_heads, D)), bo)
