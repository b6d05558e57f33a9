"""Launch configs of the Triton kernels, chosen per GPU target from what fits.

Every kernel family has a list of candidate configs, best first (large tiles, software pipelining); the
chooser takes the first whose shared-memory estimate fits the target's per-block limit. The estimate
counts every tile a kernel keeps in shared memory, without reuse, and is meant as an upper bound of what
Triton allocates: ``structprune kernels`` compiles the chosen configs for the targets it is given, fails if
the compiler needs more than the target has, and reports the estimate beside the compiler's figure.

The target is the device's compute capability, or the one set with :func:`target` (``structprune kernels``
uses it to choose configs for a GPU it does not have). No GPU, no target: the interpreter configs.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

KB = 1024
# Shared memory one block may use (the opt-in maximum) per compute capability, from the CUDA C++ Programming
# Guide's table of technical specifications. A live GPU reports its own value (see :func:`smem_limit`).
SMEM_LIMITS = {(7, 0): 96 * KB, (7, 5): 64 * KB, (8, 0): 163 * KB, (8, 6): 99 * KB, (8, 7): 163 * KB,
               (8, 9): 99 * KB, (9, 0): 227 * KB, (10, 0): 227 * KB, (10, 3): 227 * KB, (12, 0): 99 * KB,
               (12, 1): 99 * KB}

_target: contextvars.ContextVar = contextvars.ContextVar("structprune_kernel_target", default=None)


@contextlib.contextmanager
def target(capability: tuple[int, int]):
    """Choose configs for compute capability ``capability`` (e.g. ``(9, 0)``) inside the block, whatever the
    tensors' device (used to compile kernels for a GPU that is not there)."""
    token = _target.set(tuple(capability))
    try:
        yield
    finally:
        _target.reset(token)


def capability(device: torch.device, interpret: bool) -> tuple[int, int] | None:
    """The compute capability configs are chosen for: the :func:`target` override, else the CUDA device's;
    None for the interpreter or non-CUDA tensors."""
    override = _target.get()
    if override is not None:
        return override
    if interpret or device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _device_limit(index: int) -> tuple[tuple[int, int], int | None]:
    """(capability, opt-in shared memory per block as the driver reports it, or None) of CUDA device ``index``."""
    cc = torch.cuda.get_device_capability(index)
    try:
        import triton
        return cc, int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # no driver utils in this triton: use the table
        return cc, None


def smem_limit(cc: tuple[int, int]) -> int:
    """Bytes of shared memory a block may use on compute capability ``cc``: the live device's own limit when
    it has that capability, else the table; an unknown capability gets the smallest limit of its major."""
    if _target.get() is None and torch.cuda.is_available():
        live_cc, live = _device_limit(torch.cuda.current_device())
        if live is not None and live_cc == tuple(cc):
            return live
    if tuple(cc) in SMEM_LIMITS:
        return SMEM_LIMITS[tuple(cc)]
    same_major = [v for (major, _), v in SMEM_LIMITS.items() if major == cc[0]]
    return min(same_major) if same_major else min(SMEM_LIMITS.values())


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------- GEMM
# Shared memory holds the operand tiles of every ``tl.dot`` (in the layout the dot reads, one buffer per use of
# a tile), the extra pipeline buffers of the tiles loaded in the loop (``num_stages - 1`` more each) and, after
# the loop, the output tile re-laid out for the store. The estimates below count all of these without reuse,
# plus 1 KB for small vectors: an upper bound that ``structprune kernels`` checks against the compiler.
_SLACK = 1024


def gemm_smem(cfg: dict, dtype: torch.dtype) -> int:
    """Shared-memory bound of the gathered GEMM (and of the FFN backward's GEMM + epilogue kernel): A and B
    tiles per pipeline stage, or the fp32 output tile staged for the store, whichever is larger."""
    tiles = max(cfg["num_stages"], 1) * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * _esize(dtype)
    return max(tiles, cfg["BLOCK_M"] * cfg["BLOCK_N"] * 4) + _SLACK


def gemm_candidates(M: int, N: int) -> list[dict]:
    """Best first: 128-wide tiles when the problem is that large, 3 stages; then fewer stages, then smaller
    tiles."""
    bm = 128 if M >= 128 else 64
    bn = 128 if N >= 128 else 64
    out = []
    for tile_m, tile_n in ((bm, bn), (bm, 64), (64, 64), (64, 32), (32, 32)):
        for stages in (3, 2, 1):
            warps = 8 if tile_m * tile_n >= 128 * 128 else 4
            cfg = dict(BLOCK_M=tile_m, BLOCK_N=tile_n, BLOCK_K=32, num_warps=warps, num_stages=stages)
            if cfg not in out:
                out.append(cfg)
    return out


def gemm_config(cc: tuple[int, int], M: int, N: int, dtype: torch.dtype) -> dict:
    """The first GEMM candidate whose shared memory fits compute capability ``cc``."""
    return _first_fit(gemm_candidates(M, N), lambda c: gemm_smem(c, dtype), smem_limit(cc), "gemm", cc, dtype)


def glu_smem(cfg: dict, dtype: torch.dtype) -> int:
    """Shared-memory bound of the GLU forward (``kernels/glu_ffn.py``): the GEMM's, with two B tiles per stage
    (the input and gate halves of the kept units) and two output tiles."""
    return gemm_smem(dict(cfg, BLOCK_N=2 * cfg["BLOCK_N"]), dtype)


def glu_config(cc: tuple[int, int], M: int, N: int, dtype: torch.dtype) -> dict:
    """The first GEMM candidate whose GLU-forward shared memory fits compute capability ``cc``."""
    return _first_fit(gemm_candidates(M, N), lambda c: glu_smem(c, dtype), smem_limit(cc), "GLU gemm", cc, dtype)


# ---------------------------------------------------------------------------------------- flash attention
def flash_smem(cfg: dict, dtype: torch.dtype, backward: bool) -> int:
    """Shared-memory bound of the flash forward, or of the heavier backward kernel (dq or dk/dv).

    Forward: ``s = q k^T``, ``acc += p v`` (q resident; k, v loaded per key block). dq: ``s = q k^T``,
    ``dp = dO v^T``, ``dq += ds k`` (k used twice). dk/dv: ``s = q k^T``, ``dv += p^T dO``, ``dp = dO v^T``,
    ``dk += ds^T q`` (q and dO used twice, loaded per query block)."""
    bm, bn, bd = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    extra = max(cfg["num_stages"], 1) - 1
    e = _esize(dtype)
    rows_m, rows_n, score = bm * bd * e, bn * bd * e, bm * bn * e
    if not backward:
        return rows_m + 2 * rows_n + score + extra * 2 * rows_n + _SLACK
    dq = 2 * rows_m + 3 * rows_n + score + extra * 2 * rows_n
    dkdv = 4 * rows_m + 2 * rows_n + 2 * score + extra * 2 * rows_m
    return max(dq, dkdv) + _SLACK


def flash_candidates(D: int, fma: bool = False) -> list[dict]:
    """Best first: 64 x 64 tiles (64 x 32 for head_dim > 64), 2 stages; then 1 stage, then smaller tiles.

    ``fma``: the backward of fp32 without TF32 (``tl.dot`` on CUDA cores) takes 32 x 32 tiles or smaller with
    one stage: larger ones spill (``structprune kernels``, sm_80, bytes of stack per thread in the dk/dv
    kernel with the configs used before: 13,920 at head_dim 64 (64 x 64, 2 stages), 10,832 at head_dim 128
    (64 x 32, 2 stages); 5,792 at head_dim 128 with 32 x 32 and 2 stages; 32 x 32 with one stage: at most 8)."""
    block_d = max(16, _next_pow2(D))
    if fma:
        tiles, stage_list = ((32, 32), (32, 16), (16, 16)), (1,)
    else:
        first = (64, 64) if block_d <= 64 else (64, 32)
        tiles, stage_list = (first, (64, 32), (32, 32), (32, 16), (16, 16)), (2, 1)
    out = []
    for bm, bn in tiles:
        for stages in stage_list:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=4, num_stages=stages)
            if cfg not in out:
                out.append(cfg)
    return out


def flash_config(cc: tuple[int, int], D: int, dtype: torch.dtype, backward: bool, fma: bool = False) -> dict:
    """The first flash-attention candidate (forward, or the backward kernels) whose shared memory fits
    compute capability ``cc``; ``fma``: fp32 dots on CUDA cores (see :func:`flash_candidates`)."""
    return _first_fit(flash_candidates(D, fma=fma and backward), lambda c: flash_smem(c, dtype, backward),
                      smem_limit(cc), "flash attention", cc, dtype)


def rotary_flash_smem(cfg: dict, dtype: torch.dtype, backward: bool) -> int:
    """Shared-memory bound of the rotary flash kernels (``kernels/rotary_attention.py``): :func:`flash_smem`, plus
    the extra pipeline buffers of the fp32 cos and sin tiles of the rows each loop step loads and the rotated copy
    of that tile (``structprune kernels``, sm_90 bf16, head_dim 64, 64 x 64 with 2 stages: the forward takes 72 KB
    where :func:`flash_smem` counts 49)."""
    rows = max(cfg["BLOCK_M"], cfg["BLOCK_N"]) if backward else cfg["BLOCK_N"]
    tables = max(cfg["num_stages"] - 1, 0) * 2 * rows * cfg["BLOCK_D"] * 4
    return flash_smem(cfg, dtype, backward) + tables + rows * cfg["BLOCK_D"] * _esize(dtype)


def rotary_flash_config(cc: tuple[int, int], D: int, dtype: torch.dtype, backward: bool, fma: bool = False) -> dict:
    """:func:`flash_config` for the rotary flash kernels: the first candidate whose :func:`rotary_flash_smem` fits."""
    return _first_fit(flash_candidates(D, fma=fma and backward), lambda c: rotary_flash_smem(c, dtype, backward),
                      smem_limit(cc), "rotary flash attention", cc, dtype)


# ---------------------------------------------------------------------------------------------- helpers
def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _first_fit(candidates, smem, limit, what, cc, dtype) -> dict:
    for cfg in candidates:
        if smem(cfg) <= limit:
            return cfg
    raise RuntimeError(f"no {what} launch config fits the {limit // KB} KB of shared memory of sm_{cc[0]}{cc[1]} "
                       f"for {str(dtype).replace('torch.', '')} (smallest needs {smem(candidates[-1]) // KB} KB)")
