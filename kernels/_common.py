"""Shared pieces of the Triton kernels: the gathered GEMM, launch configs, dtype helpers and the tensor check of the
gate sampler (the gated ops' input checks are structprune/_input_checks.py, shared by every backend).

The gathered GEMM computes ``C[M, N] = A[M, K] @ B[K, N]`` for operands given by pointer + strides
(so transposes are free), where *one* of four dimensions may be addressed through an index list instead
of directly: ``B``'s reduction rows (``GATHER_BK``), ``B``'s columns (``GATHER_BN``), or ``C``'s rows /
columns for a scattered store (``SCATTER_CM`` / ``SCATTER_CN``). Logical position ``p`` of the indexed
dimension maps to ``idx[p // GROUP] * GROUP + p % GROUP``: ``GROUP = 1`` for FFN units, ``GROUP = head_dim``
for attention heads, so the list of active heads is used directly and no per-call index tensor (nor a
copy of any weight) is ever built.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from structprune.ops.activations import ACTIVATIONS

from . import _configs

# Which dimension of the GEMM goes through the index list.
NO_GATHER, GATHER_BK, GATHER_BN, SCATTER_CM, SCATTER_CN = 0, 1, 2, 3, 4

# Activation codes of the fused epilogues (``ACT`` of :func:`_act_fwd` / :func:`_act_bwd`), one per name of
# structprune/ops/activations.py, which says which activations exist.
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SILU = 0, 1, 2, 3, 4
ACTIVATION_CODES = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU, "silu": ACT_SILU}
if set(ACTIVATION_CODES) != set(ACTIVATIONS):
    raise ImportError(f"kernels/_common.py: epilogue codes for {sorted(ACTIVATION_CODES)}, but structprune.ops.activations "
                      f"lists {sorted(ACTIVATIONS)}")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Kernels are built for the interpreter or for the GPU when they are decorated (triton reads the
# variable then), so the mode is fixed at import of this package.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def gemm_config(device: torch.device, M: int, N: int, K: int, dtype: torch.dtype = torch.float32) -> dict:
    """Block sizes of the gathered GEMM (and of the FFN backward's GEMM + epilogue kernel) for operands of
    ``dtype``.

    Under the interpreter each program is run one after another by numpy, so fewer, larger tiles are faster;
    32 keeps the masking paths exercised by the tiny test shapes. On GPU the largest 64/128 tile whose shared
    memory fits the target (:mod:`._configs`).
    """
    cc = _configs.capability(device, INTERPRET)
    if cc is None:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)
    return _configs.gemm_config(cc, M, N, dtype)


def glu_config(device: torch.device, M: int, N: int, dtype: torch.dtype = torch.float32) -> dict:
    """Block sizes of the GLU forward kernel (two weight tiles per step): :func:`gemm_config`'s on the
    interpreter, else the largest tile whose shared memory fits the target (:func:`._configs.glu_config`)."""
    cc = _configs.capability(device, INTERPRET)
    if cc is None:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)
    return _configs.glu_config(cc, M, N, dtype)


def flash_config(device: torch.device, D: int, dtype: torch.dtype, backward: bool) -> dict:
    """Block sizes of the flash-attention forward, or of its backward kernels (dq, dk/dv and the ``Delta``
    pre-pass share one config), for head_dim ``D`` and operands of ``dtype``: under the interpreter 32 x 32
    (fewer, larger programs are faster, and S = 33 or 40 still spans two key blocks, so the online-softmax
    rescaling and the tail masks are exercised by the tests); on GPU the largest tile that fits the target."""
    cc = _configs.capability(device, INTERPRET)
    if cc is None:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=1, num_stages=1)
    fma = dtype == torch.float32 and dot_mode(dtype) == DOT_IEEE  # fp32 dots on CUDA cores
    return _configs.flash_config(cc, D, dtype, backward, fma=fma)


def rotary_flash_config(device: torch.device, D: int, dtype: torch.dtype, backward: bool) -> dict:
    """:func:`flash_config` for the rotary flash kernels, whose cos / sin tiles take shared memory too
    (:func:`._configs.rotary_flash_config`); the interpreter's config is the same."""
    cc = _configs.capability(device, INTERPRET)
    if cc is None:
        return flash_config(device, D, dtype, backward)
    fma = dtype == torch.float32 and dot_mode(dtype) == DOT_IEEE
    return _configs.rotary_flash_config(cc, D, dtype, backward, fma=fma)


# How the kernels' ``tl.dot`` multiplies (the ``DOT`` constexpr of every kernel, see :func:`dot_mode`).
DOT_IEEE, DOT_UPCAST, DOT_TF32 = 0, 1, 2


def dot_mode(dtype: torch.dtype) -> int:
    """``DOT`` mode of the kernels for inputs of ``dtype``.

    fp32 follows :func:`torch.get_float32_matmul_precision` as torch's own matmuls do: ``"highest"`` (the
    default) multiplies in full fp32 (``input_precision="ieee"``), ``"high"`` / ``"medium"`` allow TF32
    tensor cores (``"tf32"``). fp16/bf16 multiply natively with fp32 accumulation, except that the
    interpreter's ``tl.dot`` multiplies bf16 bit patterns as integers (triton 3.x), so there bf16 tiles are
    widened to fp32 first (exact: bf16 products fit in fp32).
    """
    if dtype == torch.float32:
        return DOT_IEEE if torch.get_float32_matmul_precision() == "highest" else DOT_TF32
    return DOT_UPCAST if INTERPRET and dtype == torch.bfloat16 else DOT_IEEE


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


# ------------------------------------------------------------------------------------------ launching
def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA tensors (Triton launches on the current device), else nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_device_of_first_arg(fn):
    """Run the launcher ``fn`` with the current CUDA device set to that of its first (tensor) argument, so a
    tensor on ``cuda:1`` is not launched on ``cuda:0``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with device_guard(args[0].device):
            return fn(*args, **kwargs)

    # annotations resolved in fn's module, for torch.library.custom_op's schema inference
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)
    return wrapper


# --------------------------------------------------------------------------------------------- checks
def check_tensor(name: str, t, shape: tuple | None, dtypes, device: torch.device, ndim: int | None = None):
    """Raise a ValueError naming ``name`` unless ``t`` is a tensor of the expected shape/dtype/device.

    ``shape`` entries of ``None`` are free; ``dtypes`` is a dtype or a tuple of accepted dtypes.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,)
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x), got {t.device}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    elif ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")


def unpack_output_mask(output_mask) -> tuple[bool, bool, bool]:
    """A backward op's ``output_mask`` as (x, weights and biases, gates); None means all three."""
    if output_mask is None:
        return True, True, True
    if len(output_mask) != 3:
        raise ValueError("output_mask must have 3 entries (x, weights and biases, gates), "
                         f"got {list(output_mask)}")
    return tuple(bool(m) for m in output_mask)


# ------------------------------------------------------------------------------------ Triton helpers
# The interpreter (triton 3.x) converts fp32 -> bf16 by truncation, where the GPU rounds to nearest even;
# under the interpreter the kernels round by hand so that bf16 results match what the GPU computes.
_BF16_RNE_BY_HAND: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def _round_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (so the following truncating cast is exact)."""
    b = x.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return ((b >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def cast_like(x, ref):
    """``x.to(ref.dtype)`` rounding to nearest even also under the interpreter."""
    if tl.constexpr(_BF16_RNE_BY_HAND) and tl.constexpr(ref.dtype == tl.bfloat16):
        x = _round_bf16(x.to(tl.float32))
    return x.to(ref.dtype)


@triton.jit
def cast_ptr(x, ptr):
    """``x.to(<element type of ptr>)`` rounding to nearest even also under the interpreter."""
    if tl.constexpr(_BF16_RNE_BY_HAND) and tl.constexpr(ptr.dtype.element_ty == tl.bfloat16):
        x = _round_bf16(x.to(tl.float32))
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` in fp32; ``DOT`` from :func:`dot_mode` (fp32 inputs in IEEE fp32 or TF32)."""
    if DOT == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == 2:
        return tl.dot(a, b.to(a.dtype), acc, input_precision="tf32")
    else:
        return tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")


@triton.jit
def _erf(x):
    # libdevice erf on GPU, math.erf (vectorised) under the interpreter.
    return tl.math.erf(x)


@triton.jit
def _tanh(x):
    # tanh(x) = 2 * sigmoid(2x) - 1, stable for large |x|.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act_fwd(a, ACT: tl.constexpr):
    """Activation of the fp32 pre-activation ``a``."""
    if ACT == 1:  # exact gelu
        return 0.5 * a * (1.0 + _erf(a * 0.7071067811865476))
    elif ACT == 2:  # tanh gelu
        return 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))
    elif ACT == 3:
        return tl.maximum(a, 0.0)
    elif ACT == 4:  # silu
        return a * tl.sigmoid(a)
    else:
        return a


@triton.jit
def _act_bwd(a, ACT: tl.constexpr):
    """Derivative of the activation at the fp32 pre-activation ``a``."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + _erf(a * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * a * a)
        return cdf + a * pdf
    elif ACT == 2:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = _tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * a * a)
    elif ACT == 3:
        return tl.where(a > 0.0, 1.0, 0.0)
    elif ACT == 4:  # silu: sigmoid(a) * (1 + a * (1 - sigmoid(a)))
        sg = tl.sigmoid(a)
        return sg * (1.0 + a * (1.0 - sg))
    else:
        return a * 0.0 + 1.0


@triton.jit
def _mapped(idx_ptr, p, mask, GROUP: tl.constexpr):
    """Physical position of logical positions ``p`` of the indexed dimension (int64)."""
    if GROUP == 1:
        return tl.load(idx_ptr + p, mask=mask, other=0)
    else:
        return tl.load(idx_ptr + p // GROUP, mask=mask, other=0) * GROUP + (p % GROUP)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile of an [M, N] output (program axes 0 and 1):
    ``(pid_m, offs_m, offs_n, mask_m, mask_n)``."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _tile_ptrs(ptr, offs_m, offs_n, stride_m, stride_n):
    """Pointers [len(offs_m), len(offs_n)] of rows ``offs_m``, columns ``offs_n`` (int64 offsets)."""
    return ptr + offs_m.to(tl.int64)[:, None] * stride_m + offs_n.to(tl.int64)[None, :] * stride_n


@triton.jit
def _gemm_tile(a_ptr, b_ptr, idx_ptr, M, N, K,
               stride_am, stride_ak, stride_bk, stride_bn,
               offs_m, offs_n, GATHER: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """fp32 tile ``A[offs_m, :] @ B[:, offs_n]`` with the gather of ``GATHER`` applied."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GATHER == 2:
        cols_b = _mapped(idx_ptr, offs_n, mask_n, GROUP)
    else:
        cols_b = offs_n.to(tl.int64)
    a_rows = offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = cols_b[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if GATHER == 1:
            rows_b = _mapped(idx_ptr, offs_k, mask_k, GROUP)
        else:
            rows_b = offs_k.to(tl.int64)
        a = tl.load(a_ptr + a_rows + offs_k.to(tl.int64)[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + rows_b[:, None] * stride_bk + b_cols,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT)
    return acc


@triton.jit
def _unit_grad_tile(dy_ptr, w2_ptr, idx_ptr, gate_ptr, M, N, E, stride_dym, stride_dye, stride_w2e, stride_w2i,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """Prologue of the FFN backward epilogue kernels: this program's tile of ``dh = dy @ w2[:, kept]`` (M rows x N
    kept units, reduction over E; fp32) and its units' gates: ``(pid_m, offs_m, offs_n, mask_n, mask, dh, gate)``."""
    pid_m, offs_m, offs_n, mask_m, mask_n = _tile(M, N, BLOCK_M, BLOCK_N)
    dh = _gemm_tile(dy_ptr, w2_ptr, idx_ptr, M, N, E, stride_dym, stride_dye, stride_w2e, stride_w2i,
                    offs_m, offs_n, 2, 1, BLOCK_M, BLOCK_N, BLOCK_K, DOT)
    mask = mask_m[:, None] & mask_n[None, :]
    units = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
    gate = tl.load(gate_ptr + units, mask=mask_n, other=0.0).to(tl.float32)
    return pid_m, offs_m, offs_n, mask_n, mask, dh, gate


@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, idx_ptr, bias_ptr, gate_ptr, pre_ptr,
                M, N, K,
                stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_pm, stride_pn,
                GATHER: tl.constexpr, GROUP: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, ACT: tl.constexpr,
                STORE_PRE: tl.constexpr, ACCUMULATE: tl.constexpr, DOT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``C = epilogue(A @ B)`` with one gathered/scattered dimension (see the module docstring).

    Epilogue, in order: ``+ bias[col]`` (bias gathered like B's columns when ``GATHER_BN``); optional store of
    the pre-activation to ``pre``; activation ``ACT``; ``* gate[col]`` (gathered likewise); ``+ C`` when
    ``ACCUMULATE`` (C read back, so several GEMMs can sum into one fp32 buffer); store, cast to C's dtype.
    """
    _, offs_m, offs_n, mask_m, mask_n = _tile(M, N, BLOCK_M, BLOCK_N)
    acc = _gemm_tile(a_ptr, b_ptr, idx_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                     offs_m, offs_n, GATHER, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, DOT)
    if GATHER == 2:
        cols = _mapped(idx_ptr, offs_n, mask_n, GROUP)
    else:
        cols = offs_n.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(_tile_ptrs(pre_ptr, offs_m, offs_n, stride_pm, stride_pn), cast_ptr(acc, pre_ptr), mask=mask)
    acc = _act_fwd(acc, ACT)
    if HAS_GATE:
        acc *= tl.load(gate_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATHER == 3:
        rows_c = _mapped(idx_ptr, offs_m, mask_m, GROUP)
    else:
        rows_c = offs_m.to(tl.int64)
    if GATHER == 4:
        cols_c = _mapped(idx_ptr, offs_n, mask_n, GROUP)
    else:
        cols_c = offs_n.to(tl.int64)
    c_ptrs = c_ptr + rows_c[:, None] * stride_cm + cols_c[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, cast_ptr(acc, c_ptr), mask=mask)


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, M: int, N: int, K: int,
         a_strides, b_strides, out_strides, idx: torch.Tensor | None = None, gather: int = NO_GATHER,
         group: int = 1, bias: torch.Tensor | None = None, gate: torch.Tensor | None = None,
         act: int = ACT_NONE, pre: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """Launch :func:`gemm_kernel`; strides are ``(stride_m, stride_k)`` for A, ``(stride_k, stride_n)`` for B,
    ``(stride_m, stride_n)`` for ``out`` (and ``pre``, which must have out's logical layout [M, N])."""
    if M == 0 or N == 0:
        return out
    cfg = gemm_config(out.device, M, N, K, a.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    dummy = out
    pre_strides = (pre.stride(0), pre.stride(1)) if pre is not None else (0, 0)
    gemm_kernel[grid](
        a, b, out, idx if idx is not None else dummy, bias if bias is not None else dummy,
        gate if gate is not None else dummy, pre if pre is not None else dummy,
        M, N, K, a_strides[0], a_strides[1], b_strides[0], b_strides[1], out_strides[0], out_strides[1],
        pre_strides[0], pre_strides[1],
        GATHER=gather, GROUP=group, HAS_BIAS=bias is not None, HAS_GATE=gate is not None, ACT=act,
        STORE_PRE=pre is not None, ACCUMULATE=accumulate, DOT=dot_mode(a.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
