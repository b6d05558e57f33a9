"""Attention-probability dropout of the Triton flash kernels: the Philox stream shared with the ``cpp`` backend.

:func:`_dropout_tile` gives the multipliers (0 or 1 / (1 - p)) of one tile of probabilities inside the flash
forward and backward kernels of :mod:`.attention`; the forward applies them, the backward regenerates them from the
seed instead of storing a mask. :func:`attention_dropout_scale` materialises the whole mask, the tests' oracle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from structprune.ops.checks import check_dropout

from . import _common as C


@triton.jit
def _dropout_scale(seed, offset, n, drop_p, inv_keep):
    """Dropout multiplier (0 or ``inv_keep`` = 1 / (1 - p)) of the probabilities with linear index ``n`` (int64
    block, see :func:`_dropout_index`): uniform ``u`` from word ``n % 4`` of Philox4x32-10 at counter
    ``(n // 4, offset)`` and key ``seed``, kept when ``u >= p``; the stream of ``csrc/philox.h`` (``philox_block``,
    ``philox_to_uniform``), so the ``cpp`` backend draws the same mask."""
    blk = n >> 2
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + offset, zero)
    w = n & 3
    word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    u = ((word >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return tl.where(u >= drop_p, inv_keep, 0.0)


@triton.jit
def _dropout_index(b, h, H, S, offs_m, offs_n):
    """Linear index ``((b * H + h) * S + i) * S + j`` of the probabilities of rows ``offs_m``, keys ``offs_n``
    of head ``h`` (among all ``H``) in sequence ``b``."""
    rows = ((b.to(tl.int64) * H + h) * S + offs_m.to(tl.int64)) * S
    return rows[:, None] + offs_n.to(tl.int64)[None, :]


@triton.jit
def _dropout_tile(seed, offset, b, h, H, S, offs_m, n_start, drop_p, inv_keep, BLOCK_N: tl.constexpr):
    """Dropout multipliers of the tile of rows ``offs_m`` and keys ``n_start + arange(BLOCK_N)``, one Philox call
    per element. (Sharing one call between 4 consecutive keys when S % 4 == 0 was tried: a quarter of the Philox
    arithmetic, but interleaving the words back into the tile raised register use and spills in the compiled
    sm_80/sm_90 kernels, so it is not used without a GPU measurement.)"""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    return _dropout_scale(seed, offset, _dropout_index(b, h, H, S, offs_m, offs_n), drop_p, inv_keep)


def _dropout_args(num_heads, dropout_p, seed):
    """The kernels' (H, seed, drop_offset, drop_p, inv_keep) arguments."""
    return num_heads, seed, 0, float(dropout_p), 1.0 / (1.0 - dropout_p)


def supports_attention_dropout(device: torch.device) -> bool:
    """:func:`gated_attention` takes ``dropout_p > 0`` (Philox dropout fused in the flash kernels)."""
    return True


@triton.jit
def _dropout_scale_kernel(out_ptr, act_ptr, total, A, S, H, seed, drop_offset, drop_p, inv_keep,
                          BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    j = e % S
    i = (e // S) % S
    a = (e // (S * S)) % A
    b = e // (S * S * A)
    h = tl.load(act_ptr + a, mask=mask, other=0)
    n = ((b * H + h) * S + i) * S + j
    tl.store(out_ptr + e, _dropout_scale(seed, drop_offset, n, drop_p, inv_keep), mask=mask)


def attention_dropout_scale(batch: int, num_heads: int, seq: int, heads: torch.Tensor, p: float, seed: int,
                            offset: int = 0) -> torch.Tensor:
    """The dropout multipliers [B, A, S, S] fp32 (0 or 1 / (1 - p)) that :func:`gated_attention` applies to the
    probabilities of the active ``heads`` for ``seed``: the oracle of the tests. Element (b, h, i, j) of the
    layer's [B, H, S, S] probabilities uses the Philox stream of ``csrc/philox.h`` at index
    ``((b * H + h) * S + i) * S + j``, so this equals the ``cpp`` backend's mask."""
    check_dropout(p, seed)
    if offset != 0:
        raise ValueError("the Triton attention dropout uses offset 0")
    A = heads.numel()
    out = torch.empty((batch, A, seq, seq), dtype=torch.float32, device=heads.device)
    total = out.numel()
    if total:
        with C.device_guard(heads.device):
            _dropout_scale_kernel[(triton.cdiv(total, 1024),)](
                out, heads, total, A, seq, *_dropout_args(num_heads, p, seed), BLOCK=1024)
    return out
