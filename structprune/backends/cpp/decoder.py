"""The "cpp" backend's decoder ops (Llama, Mistral, Qwen2, Qwen3): grouped-query attention as ATen compositions on
the kept heads, so that on the CPU a kernel backend, not the reference, runs a gated decoder layer.

``gated_decoder_qkv`` projects with one GEMM over the packed rows of the active query heads of ``wq`` and of the
active KV heads of ``wk``/``wv`` (pruned heads cost nothing), then applies Qwen3's per-head RMSNorm and the
rotary positions as HF does: without gradients in one pass, the C++ epilogue ``cpp_decoder_rotary``
(``csrc/cpu/decoder_cpu.cpp``: fp32 math rounded once, the [B, H, S, D] layout written directly). The packed weights are cached per (weights, versions, kept heads) while no gradient
is needed (inference, generation), under autocast in the autocast dtype (cast once per weight version, not at
every call); in training they are gathered per call so that gradients reach the full weights. GEMMs run on 2-D
rows (a 3-D one-row bf16 input takes a batched matmul that copies the transposed weight on the CPU).

``gated_decoder_attention`` never materialises ``repeat_kv``. Without gradients and with at most
``_DECODE_MAX_QUERIES`` queries per head (decode steps, short chunks) it runs the C++ kernel
``cpp_decoder_decode_attention`` (``csrc/cpu/decoder_cpu.cpp``): each query row reads its KV head through the map,
the causal band, window and key padding come from indices, the softmax is online in fp32, and a small problem
runs in the calling thread (no parallel region). Otherwise the query heads of each KV head are folded into the
query axis (group ``j``'s ``g_j`` heads become ``g_j * Sq`` query rows against KV head ``j``, as HF's decode path
``pack_gqa`` does for one query), padded to the largest group ``G`` of the layer with zero queries whose rows are
dropped afterwards (groups may be unequal after pruning), and one ``scaled_dot_product_attention`` call runs over
the ``Akv`` KV heads with the causal band, the window and the key padding as one boolean ``[B, 1, G*Sq, Sk]`` mask
(a query with no visible key gets a zero context; no mask for a decode step that sees every key). The contexts
are gated and projected with the kept columns of ``wo`` (cached like the input weights). Autograd runs through
the ATen ops.

What a fused prefill kernel (C++) would still have to do: one flash-attention pass per (batch, KV head, query
tile) whose row tile holds the group's query heads (no padding rows, no mask tensor, fully masked tiles skipped:
the Triton kernels of ``kernels/decoder_attention.py`` do this on GPU), the q/k/v GEMM with the RMSNorm + rotary
epilogue writing k/v straight into the cache buffer, the packed weights kept in the C++ pack cache (keyed like
``csrc/pack_cache.cpp``), and a backward that recomputes the probabilities.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from structprune.backends.cpp.build import _require
from structprune.ops.checks import check_decoder_attention_inputs, check_decoder_qkv_inputs
from structprune.ops.reference import apply_rotary_native, decoder_mask, head_rows, rms_norm

__all__ = ["gated_decoder_qkv", "gated_decoder_attention", "clear_pack_cache"]

_PACKS: dict = {}  # key -> (weak references to the source tensors, packed tensor), while no gradient is needed
_MAX_PACKS = 512


def clear_pack_cache() -> None:
    """Drop the packed decoder weights (``sp.clear_cache()`` also drops them)."""
    _PACKS.clear()


def _tensor_key(t):
    if t is None:
        return None
    version = None if t.is_inference() else t._version  # inference tensors have none (and _packed never caches them)
    return (id(t), t.data_ptr(), version, tuple(t.shape), t.dtype, t.device)


def _index_key(idx):
    return None if idx is None else tuple(idx.tolist())


def _packed(key, make, tensors):
    """``make()``, cached under ``key`` when no gradient flows to ``tensors`` (a fresh gather otherwise)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return make()
    if any(t is not None and t.is_inference() for t in tensors) or torch.compiler.is_compiling():
        return make()
    live = [t for t in tensors if t is not None]
    hit = _PACKS.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], live)):  # the very tensors, still alive
        return hit[1]
    if len(_PACKS) >= _MAX_PACKS:
        _PACKS.clear()
    value = make()
    _PACKS[key] = ([weakref.ref(t) for t in live], value)
    return value


def _head_rows(heads, head_dim: int, device):
    """:func:`~structprune.ops.reference.head_rows` of ``heads`` (None: None), cached with that very index tensor
    (the gates' kept indices live as long as their masks) while no gradient is needed."""
    if heads is None:
        return None
    return _packed(("rows", _tensor_key(heads), head_dim, device), lambda: head_rows(heads.to(device), head_dim),
                   (heads,))


def _cast_dtype(x, tensors):
    """The autocast dtype when ``x``'s device is under autocast and no gradient flows to ``tensors`` (the packed
    weights are then cached in that dtype instead of cast at every call), else None."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind) or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    dt = torch.get_autocast_dtype(kind)
    return dt if x.is_floating_point() and x.dtype != torch.float64 else None


def _linear(x, w, b):
    """``F.linear`` over the rows of ``x`` as one 2-D GEMM (a 3-D bf16 input with one row goes through a batched
    matmul that copies the transposed weight on the CPU)."""
    return F.linear(x.reshape(-1, x.shape[-1]), w, b).reshape(*x.shape[:-1], w.shape[0])


def _rows(t, rows):
    return t if rows is None or t is None else t.index_select(0, rows)


def gated_decoder_qkv(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim: int, active_heads=None,
                      active_kv=None):
    """(q, k, v) equal to :func:`structprune.ops.reference.gated_decoder_qkv`, from one GEMM over the packed rows of
    the active heads."""
    _require()
    check_decoder_qkv_inputs(x, wq, bq, wk, bk, wv, bv, q_norm, k_norm, eps, cos, sin, head_dim, active_heads,
                             active_kv)
    B, S, _ = x.shape
    D = head_dim
    rq, rkv = _head_rows(active_heads, D, x.device), _head_rows(active_kv, D, x.device)
    nq = wq.shape[0] if rq is None else rq.numel()
    nkv = wk.shape[0] if rkv is None else rkv.numel()

    def weight():
        return torch.cat([_rows(wq, rq), _rows(wk, rkv), _rows(wv, rkv)])

    def bias():
        parts = [(_rows(b, r) if b is not None else x.new_zeros(n)) for b, r, n in
                 ((bq, rq, nq), (bk, rkv, nkv), (bv, rkv, nkv))]
        return torch.cat(parts)

    tensors = (wq, wk, wv, bq, bk, bv)
    dt = _cast_dtype(x, tensors)
    key = ("qkv", dt) + tuple(_tensor_key(t) for t in tensors) + (_index_key(active_heads), _index_key(active_kv))
    w = _packed(key + ("w",), weight if dt is None else lambda: weight().to(dt), tensors)
    b = None if bq is None and bk is None and bv is None else _packed(
        key + ("b",), bias if dt is None else lambda: bias().to(dt), tensors)
    qkv = _linear(x if dt is None else x.to(dt), w, b)
    norms = [t for t in (q_norm, k_norm) if t is not None]
    if not _needs_grad(x, wq, wk, wv, bq, bk, bv, q_norm, k_norm, cos, sin) and qkv.device.type == "cpu" and \
            all(t.dtype == qkv.dtype for t in norms) and _has_op("cpp_decoder_rotary"):  # the epilogue in one pass: csrc/cpu/decoder_cpu.cpp
        return torch.ops.structprune.cpp_decoder_rotary(qkv, cos, sin, q_norm, k_norm, float(eps), D, nq // D,
                                                        nkv // D)
    q, k, v = qkv.split([nq, nkv, nkv], dim=-1)

    def heads(t, norm):
        t = t.reshape(B, S, t.shape[-1] // D, D)
        return (t if norm is None else rms_norm(t, norm, eps)).transpose(1, 2)

    return (apply_rotary_native(heads(q, q_norm), cos, sin), apply_rotary_native(heads(k, k_norm), cos, sin),
            heads(v, None))


def _group_layout(q_to_kv: torch.Tensor, num_kv: int):
    """(G, pos): the largest group size and, for each active head, its slot ``kv * G + rank`` in the padded
    [Akv * G] head axis (``rank``: its place among the heads of its KV head)."""
    onehot = torch.nn.functional.one_hot(q_to_kv, num_kv)  # [A, Akv]
    counts = onehot.sum(0)
    G = int(counts.max()) if q_to_kv.numel() else 1
    rank = (onehot.cumsum(0) - 1).gather(1, q_to_kv[:, None]).squeeze(1)
    return G, q_to_kv * G + rank


_DECODE_MAX_QUERIES = 16  # queries per head up to which the C++ decode kernel runs (one pass per query row)


_OPS: dict = {}


def _has_op(name: str) -> bool:
    """Whether the loaded extension has ``structprune::name`` (an extension built before it was added lacks it: the
    ATen compositions then run)."""
    if name not in _OPS:
        _OPS[name] = hasattr(torch.ops.structprune, name)
    return _OPS[name]


def _needs_grad(*tensors) -> bool:
    """Whether a gradient flows to one of ``tensors`` (or we are compiling): the forward-only kernels then stand
    aside for the ATen compositions."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors))


def _decode_kernel(q, k, v, head_gates, wo, bo) -> bool:
    """Whether :func:`gated_decoder_attention` runs ``cpp_decoder_decode_attention``: CPU tensors, at most
    ``_DECODE_MAX_QUERIES`` queries per head, and no gradient to any input (the kernel has no backward)."""
    return q.device.type == "cpu" and q.shape[2] <= _DECODE_MAX_QUERIES and not _needs_grad(
        q, k, v, head_gates, wo, bo) and _has_op("cpp_decoder_decode_attention")


_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def inference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """HF's RMSNorm of ``x`` over its last axis (:func:`structprune.ops.reference.rms_norm`) by the one-pass kernel
    ``cpp_rms_norm`` (``csrc/cpu/norm_cpu.cpp``: fp32 statistics, vectorised for the CPU found at load time, one
    parallel region at most); None where it does not apply (a gradient to ``x`` or ``weight``, torch.compile
    tracing, a non-CPU tensor, a dtype it does not take, an extension built before it): the caller then runs the
    reference."""
    if _needs_grad(x, weight) or x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() == 0 or \
            x.shape[-1] == 0 or weight.shape != x.shape[-1:] or x.dtype not in _NORM_DTYPES or \
            weight.dtype not in _NORM_DTYPES or (weight.dtype not in (x.dtype, torch.float32) and
                                                 x.dtype != torch.float32) or not _has_op("cpp_rms_norm"):
        return None
    return torch.ops.structprune.cpp_rms_norm(x, weight, float(eps))


def inference_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> torch.Tensor | None:
    """``F.layer_norm(x, x.shape[-1:], weight, bias, eps)`` for a float32 or bfloat16 ``x`` with float32 weight and
    bias, by the kernel ``cpp_layer_norm`` (``csrc/cpu/norm_cpu.cpp``); None where it does not apply (as
    :func:`inference_rms_norm`)."""
    if weight is None or bias is None or _needs_grad(x, weight, bias) or \
            any(t.device.type != "cpu" for t in (x, weight, bias)) or x.dim() == 0 or x.shape[-1] == 0 or \
            x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != torch.float32 or \
            bias.dtype != torch.float32 or weight.shape != x.shape[-1:] or bias.shape != x.shape[-1:] or \
            not _has_op("cpp_layer_norm"):
        return None
    return torch.ops.structprune.cpp_layer_norm(x, weight, bias, float(eps))


def inference_embedding_layer_norm(ids, type_ids, position_ids, word, types, positions, weight, bias, eps: float,
                                   bf16_out: bool) -> torch.Tensor | None:
    """``LayerNorm((word[ids] + types[type_ids]) + positions[position_ids])`` as ``[ids.numel(), E]`` (fp32, or bf16
    when ``bf16_out``) by ``cpp_embedding_layer_norm`` (``csrc/cpu/norm_cpu.cpp``); None where it does not apply
    (fp32 CPU tables, int64 CPU indices of one size, no gradient, the op built)."""
    tables = [t for t in (word, types, positions, weight, bias) if t is not None]
    index = [i for i in (ids, type_ids, position_ids) if i is not None]
    if _needs_grad(*tables) or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tables) or \
            any(i.device.type != "cpu" or i.dtype != torch.int64 or i.shape != ids.shape for i in index) or \
            (types is None) != (type_ids is None) or not _has_op("cpp_embedding_layer_norm"):
        return None
    return torch.ops.structprune.cpp_embedding_layer_norm(ids, type_ids, position_ids, word, types, positions,
                                                          weight, bias, float(eps), bool(bf16_out))


def register() -> None:
    """The fake kernels of ``cpp_decoder_decode_attention``, ``cpp_decoder_rotary``, ``cpp_rms_norm``,
    ``cpp_layer_norm`` and ``cpp_embedding_layer_norm`` (called once, when the extension loads)."""
    def _decode_fake(q, k, v, q_to_kv, key_mask, window, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    def _rotary_fake(qkv, cos, sin, q_norm, k_norm, eps, head_dim, num_q, num_kv):
        B, S = qkv.shape[:2]
        return (qkv.new_empty(B, num_q, S, head_dim), qkv.new_empty(B, num_kv, S, head_dim),
                qkv.new_empty(B, num_kv, S, head_dim))

    def _rms_fake(x, weight, eps):
        return x.new_empty(x.shape, dtype=torch.result_type(weight, x))

    def _ln_fake(x, weight, bias, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _embed_fake(ids, type_ids, position_ids, word, types, positions, weight, bias, eps, bf16_out):
        return word.new_empty((ids.numel(), word.shape[1]), dtype=torch.bfloat16 if bf16_out else torch.float32)

    for name, fake in (("cpp_decoder_decode_attention", _decode_fake), ("cpp_decoder_rotary", _rotary_fake),
                       ("cpp_rms_norm", _rms_fake), ("cpp_layer_norm", _ln_fake),
                       ("cpp_embedding_layer_norm", _embed_fake)):
        if _has_op(name):
            torch.library.register_fake("structprune::" + name)(fake)


def gated_decoder_attention(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, key_mask, window: int):
    """Equal to :func:`structprune.ops.reference.gated_decoder_attention` with ``key_mask`` and ``window``, without
    repeating k and v (see the module docstring). Biases may be None."""
    _require()
    check_decoder_attention_inputs(q, k, v, wo, bo, head_gates, active_heads, q_to_kv, window, key_mask)
    B, A, Sq, D = q.shape
    Akv, Sk = k.shape[1], k.shape[2]
    active = _packed(("all heads", A, q.device, torch.is_inference_mode_enabled()), lambda: torch.arange(A, device=q.device), ()) \
        if active_heads is None else active_heads.to(q.device)
    if A == 0:
        return F.linear(q.new_zeros(B, Sq, 0), wo[:, :0], bo)
    if _decode_kernel(q, k, v, head_gates, wo, bo):  # a few queries, no gradient: csrc/cpu/decoder_cpu.cpp
        ctx = torch.ops.structprune.cpp_decoder_decode_attention(
            q, k.to(q.dtype), v.to(q.dtype), _packed(("map", _tensor_key(q_to_kv)), lambda: q_to_kv.cpu().long(),
                                                     (q_to_kv,)),
            None if key_mask is None else key_mask.to(torch.bool), int(window), D ** -0.5)
        return _project(ctx, wo, bo, head_gates, active, D)
    G, pos = _packed(("layout", _tensor_key(q_to_kv), Akv, q.device), lambda: _group_layout(q_to_kv.to(q.device), Akv),
                     (q_to_kv,))
    if G * Akv == A and bool((pos == torch.arange(A, device=q.device)).all()):
        q_pad = q  # equal groups in order: the fold is a view
    else:
        q_pad = q.new_zeros(B, Akv * G, Sq, D).index_copy(1, pos, q)
    if Sq == 1 and key_mask is None and (window <= 0 or Sk <= window):
        mask = None  # a decode step that sees every key
    else:
        mask = decoder_mask(key_mask, Sq, Sk, window, q.device).repeat(1, 1, G, 1)  # [B|1, 1, G*Sq, Sk]
    ctx = F.scaled_dot_product_attention(q_pad.reshape(B, Akv, G * Sq, D), k, v, attn_mask=mask, scale=D ** -0.5)
    ctx = ctx.reshape(B, Akv * G, Sq, D)
    if ctx.shape[1] != A or q_pad is not q:
        ctx = ctx.index_select(1, pos)
    return _project(ctx, wo, bo, head_gates, active, D)


def _project(ctx, wo, bo, head_gates, active, D: int):
    """The gated contexts [B, A, Sq, D] of the heads ``active`` through their columns of ``wo``: [B, Sq, E]."""
    B, A, Sq, _ = ctx.shape
    ctx = ctx * head_gates.index_select(0, active).to(ctx.dtype)[None, :, None, None]
    cols = _head_rows(active, D, ctx.device)
    dt = _cast_dtype(ctx, (wo, bo))
    w = _packed(("wo", dt, _tensor_key(wo), _index_key(active)),
                lambda: wo.index_select(1, cols) if dt is None else wo.index_select(1, cols).to(dt), (wo,))
    if dt is not None:
        ctx = ctx.to(dt)
        bo = None if bo is None else _packed(("bo", dt, _tensor_key(bo)), lambda: bo.to(dt), (bo,))
    return _linear(ctx.transpose(1, 2).reshape(B, Sq, A * D), w, bo)

