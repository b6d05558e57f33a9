"""The "cpp" kernel backend: the compiled extension (``csrc/``) behind ``torch.ops.structprune``.

Loading, in order (importing this module never fails because the extension is missing):

1. ``structprune._C``, built by ``setup.py`` at install time (``pip install --no-build-isolation .``);
2. a JIT build of ``csrc/`` with :func:`torch.utils.cpp_extension.load` (ninja), cached under
   ``$STRUCTPRUNE_BUILD_DIR`` or torch's default extensions directory (``$TORCH_EXTENSIONS_DIR``); the CUDA
   sources are compiled only when torch itself has CUDA (and fall back to a CPU-only build if that fails).
   Sources, flags, CUDA arch list and ``MAX_JOBS`` default are ``csrc/build_recipe.py``'s, as for setup.py; a
   build that compiles (not one loaded from the cache) says so on stderr first, unless ``STRUCTPRUNE_QUIET=1``;
3. otherwise the reason is recorded: :func:`availability` returns it (``structprune.ops.dispatch`` reports it) and it is
   logged once.

Ops (``torch.ops.structprune.*``): ``cpp_gated_attention``, ``cpp_gated_attention_backward``, ``cpp_gated_ffn``,
``cpp_gated_ffn_backward``, ``cpp_hard_concrete_sample``, ``cpp_hard_concrete_sample_backward`` and helpers
``attention_dropout_scale``, ``pack_cache_clear``, ``pack_cache_size``, ``build_info``, ``activation_names``,
``philox4x32_10``. Fake kernels, autograd formulas (calling the C++ backward ops) and autocast rules are registered
here. The op entries (:func:`gated_attention`, :func:`gated_ffn`) check their inputs with
:mod:`structprune._input_checks`, as every backend does; the C++ ops keep only the checks that guard memory.

The backward ops take ``output_mask`` = (x, all weights and biases, gates): the autograd formulas build it from
``ctx.needs_input_grad``, so frozen weights (e.g. an L0 selection phase training only the gates) cost no weight
gradient GEMMs. Masked-out outputs are empty ``[0]`` tensors, returned to autograd as None.

Saved tensors: the forward ops take ``save_for_backward`` (set by :func:`gated_attention` / :func:`gated_ffn` when a
gradient is needed) and then also return what their backward needs (attention: packed q|k|v, the ungated
context, the softmax log-sum-exp; FFN: pre-activation and activation), so the backward recomputes nothing and
reuses the cached packed weights; under ``no_grad`` these outputs are empty.

Packed-weight cache: the kept rows/columns of each layer's weights are packed once and reused while the weights
are unchanged (same storage, data pointer, shape and ``_version``, and on CPU the same values at 32 sampled
positions), the kept index has the same content and the gate values folded into the packed output weights are
equal. In-place updates PyTorch tracks (optimizer steps, ``with torch.no_grad(): w.add_(...)``, ``copy_``,
``load_state_dict``) invalidate it, and so, on CPU, does rewriting a whole weight through ``w.data`` (which
bypasses the version counter); after writing only part of a weight through ``.data`` call
``structprune.clear_cache()`` (or set ``STRUCTPRUNE_PACK_CACHE_SIZE=0``). One entry per layer (at most
``STRUCTPRUNE_PACK_CACHE_SIZE``, default 256, least recently used dropped; entries of freed weights dropped), so
mask changes rebuild an entry instead of adding one. The cache is guarded by a mutex: threads may run the same
patched model at once.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from structprune.ops.checks import check_attention_inputs, check_dropout, check_ffn_inputs
from structprune.ops.support import (Backend, grad_output_mask, masked_grads,
                          register_autocast)

__all__ = ["BACKEND", "availability", "gated_attention", "gated_ffn", "hard_concrete_sample", "hard_concrete_uniform",
           "clear_cache", "cache_size", "build_info", "load_error", "supports_attention_dropout",
           "attention_dropout_scale"]

_log = logging.getLogger("structprune")

_OPS = ("cpp_gated_attention", "cpp_gated_attention_backward", "cpp_gated_ffn", "cpp_gated_ffn_backward",
        "cpp_hard_concrete_sample", "cpp_hard_concrete_sample_backward")

_error: str | None = None  # why the extension could not be loaded (None when loaded)
_origin: str = ""  # how it was loaded: "prebuilt structprune._C" or "JIT build in <dir>"
_build_seconds: float | None = None


def _ops_registered() -> bool:
    try:
        return hasattr(torch.ops.structprune, "cpp_gated_ffn")
    except Exception:
        return False


def _csrc_dir() -> Path | None:
    package = Path(__file__).resolve().parents[2]  # structprune/ (this file: structprune/backends/cpp/ops.py)
    for cand in (package / "csrc", package.parent / "csrc"):  # installed as structprune/csrc; a checkout's csrc/
        if (cand / "register.cpp").is_file():
            return cand
    return None


def _load_recipe(src: Path):
    """csrc/build_recipe.py (the build recipe setup.py reads too), loaded by its path."""
    spec = importlib.util.spec_from_file_location("structprune_build_recipe", src / "build_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _environ(values: dict):
    """os.environ with ``values`` set for the duration (torch's build reads MAX_JOBS, TORCH_CUDA_ARCH_LIST)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _needs_compile(build_dir: Path, name: str, src: Path) -> bool:
    """Whether loading ``name`` from ``build_dir`` will compile: no library there yet, or one older than a
    source or header (ninja then rebuilds)."""
    lib = build_dir / f"{name}.so"
    if not lib.is_file():
        return True
    newest = max((p.stat().st_mtime for p in src.rglob("*") if p.suffix in (".cpp", ".h", ".cu")), default=0.0)
    return lib.stat().st_mtime < newest


def _build_notice(where: Path) -> None:
    """One line on stderr before a JIT build compiles (it takes about a minute, silent otherwise)."""
    if os.environ.get("STRUCTPRUNE_QUIET") != "1":
        print(f"structprune: building the C++ extension (first use, about a minute; cached under {where})",
              file=sys.stderr, flush=True)


def _jit_build() -> str:
    """JIT-build csrc/ with ninja; returns where it was built. Raises with the reason when it cannot."""
    from torch.utils import cpp_extension

    src = _csrc_dir()
    if src is None:
        raise RuntimeError("the csrc/ sources are not shipped with this install (reinstall from a source checkout "
                           "or with `pip install --no-build-isolation .` to prebuild structprune._C)")
    cpp_extension.verify_ninja_availability()  # raises RuntimeError("Ninja is required to load C++ extensions")
    recipe = _load_recipe(src)
    sanitizers = sanitize_flags()
    attempts = []
    if torch.version.cuda is not None and not recipe.skip_cuda(os.environ) and not sanitizers:
        attempts.append(True)
    attempts.append(False)
    verbose = os.environ.get("STRUCTPRUNE_BUILD_VERBOSE") == "1"
    errors = []
    noticed = False
    for with_cuda in attempts:
        name = "structprune_ext_cuda" if with_cuda else "structprune_ext_cpu"
        if sanitizers:  # its own name (and so its own build directory): never mixed with the optimized build
            name += "_" + "_".join(sanitizers)
        root = os.environ.get("STRUCTPRUNE_BUILD_DIR")
        build_dir = Path(root, name) if root else Path(cpp_extension._get_build_directory(name, verbose))
        build_dir.mkdir(parents=True, exist_ok=True)
        if not noticed and _needs_compile(build_dir, name, src):
            _build_notice(build_dir)
            noticed = True
        try:
            with _environ(recipe.build_env(os.environ, with_cuda)):  # MAX_JOBS default, TORCH_CUDA_ARCH_LIST
                cpp_extension.load(name=name, sources=[str(src / s) for s in recipe.sources(with_cuda)],
                                   extra_cflags=recipe.cxx_flags(with_cuda, sanitizers=sanitizers),
                                   extra_cuda_cflags=recipe.nvcc_flags(), extra_ldflags=recipe.ld_flags(sanitizers),
                                   extra_include_paths=[str(src)], build_directory=str(build_dir),
                                   is_python_module=False, verbose=verbose)
            if errors:  # the CUDA build failed and this CPU-only build stands in: say so, don't drop it silently
                _record_cuda_build_error(errors[0])
            return str(build_dir)
        except Exception as exc:  # compiler missing, compile error, CUDA toolkit missing, ...
            errors.append(f"{'CUDA' if with_cuda else 'CPU'} build: {type(exc).__name__}: {str(exc)[-2000:]}")
    raise RuntimeError("JIT build of csrc/ failed; " + " | ".join(errors))


_cuda_build_error: str | None = None  # why the CUDA JIT build failed when a CPU-only build was used instead


def _record_cuda_build_error(message: str) -> None:
    global _cuda_build_error
    _cuda_build_error = message
    warnings.warn(f"structprune: the CUDA build of the C++ extension failed, using a CPU-only build (the 'cpp' "
                  f"backend has no CUDA kernels; see `structprune info`): {message}", RuntimeWarning, stacklevel=2)


_SANITIZERS = ("address", "undefined")


def sanitize_flags() -> list[str]:
    """The sanitizers asked for by ``STRUCTPRUNE_SANITIZE`` (comma-separated, from "address", "undefined"); the
    JIT build then compiles the CPU sources with them (-O1 -g) under its own name. Python must then run with the
    sanitizer runtime preloaded: see ``csrc/run_sanitized_tests.sh``."""
    text = os.environ.get("STRUCTPRUNE_SANITIZE", "").strip()
    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in _SANITIZERS]
    if bad:
        raise ValueError(f"STRUCTPRUNE_SANITIZE={text!r}: unknown sanitizer(s) {bad}; expected a comma-separated "
                         f"subset of {list(_SANITIZERS)}")
    return sorted(set(names), key=_SANITIZERS.index)


def _load() -> None:
    global _error, _origin, _build_seconds
    if os.environ.get("STRUCTPRUNE_DISABLE_EXT") == "1":
        _error = "disabled by STRUCTPRUNE_DISABLE_EXT=1"
        return
    if _ops_registered():
        _origin = "already registered in torch.ops.structprune"
        return
    prebuilt_error = None
    try:
        if sanitize_flags():  # the prebuilt module is not instrumented: JIT-build the sanitized one
            raise ModuleNotFoundError("structprune._C", name="structprune._C")
        importlib.import_module("structprune._C")
        _origin = "prebuilt structprune._C"
        return
    except ModuleNotFoundError:
        pass
    except Exception as exc:  # built against another torch, missing symbols, ...
        prebuilt_error = f"structprune._C failed to load ({type(exc).__name__}: {exc})"
    if _ops_registered():
        return
    t0 = time.perf_counter()
    try:
        where = _jit_build()
        _origin = f"JIT build in {where}"
        _build_seconds = time.perf_counter() - t0
    except Exception as exc:
        _error = (prebuilt_error + "; " if prebuilt_error else "") + f"{type(exc).__name__}: {exc}"
        _log.warning("structprune: the C++ extension is unavailable: %s", _error)


_load()


def load_error() -> str | None:
    """Why the extension could not be loaded, or None."""
    return _error


def availability(device: torch.device) -> str | None:
    """None when the extension can run ops on ``device``, else the reason."""
    if _error is not None:
        return f"C++ extension not loaded: {_error}"
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("structprune::cpp_gated_ffn", "CUDA"):
            if _cuda_build_error is not None:
                return f"the CUDA build of the C++ extension failed ({_cuda_build_error})"
            return ("the C++ extension was built without CUDA (torch without CUDA, STRUCTPRUNE_SKIP_CUDA_BUILD=1, "
                    "or the CUDA build failed)")
        return None
    return f"the C++ extension has no kernels for {device.type} tensors"


def build_info() -> dict:
    """How the extension was obtained (for ``structprune info``)."""
    info = {"loaded": _error is None, "origin": _origin, "error": _error, "jit_build_seconds": _build_seconds,
            "cuda_build_error": _cuda_build_error}
    if _error is None:
        info["build"] = torch.ops.structprune.build_info()
        info["cuda_kernels"] = availability(torch.device("cuda")) is None
    return info


def _require() -> None:
    if _error is not None:
        raise RuntimeError(f"structprune C++ extension not loaded: {_error}")


def clear_cache() -> None:
    """Drop every packed-weight cache entry (needed only after writes through ``tensor.data``)."""
    _require()
    torch.ops.structprune.pack_cache_clear()


def cache_size() -> int:
    _require()
    return int(torch.ops.structprune.pack_cache_size())


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads: int,
                    dropout_p: float = 0.0, seed: int = 0, offset: int = 0):
    """Gated self-attention projection, equal to :func:`structprune.ops.reference.gated_attention` (the gate gradient
    of pruned heads, which the reference computes from contexts this op never forms, is returned as 0).

    When a gradient is needed the op keeps q|k|v, the context and the softmax log-sum-exp for the backward
    (``save_for_backward``), which then recomputes nothing; under ``no_grad`` it keeps nothing.
    ``dropout_p > 0``: attention-probability dropout with the Philox stream ``(seed, offset)`` (the mask is
    :func:`attention_dropout_scale`; the backward regenerates it). ``seed`` may be a one-element int64 CPU tensor
    (the seed a ``torch.compile`` graph draws, a graph value rather than a constant): the op is then
    ``cpp_gated_attention_seeded``, the same kernels."""
    _require()
    check_attention_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, num_heads, key_bias=key_bias,
                           dropout_p=dropout_p, seed=seed, offset=offset, kernel=True)
    save = _needs_grad(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates)
    if isinstance(seed, torch.Tensor):  # the seed drawn inside a torch.compile graph: see _register_seeded_parts
        return torch.ops.structprune.cpp_gated_attention_seeded(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates,
                                                                active_heads, key_bias, int(num_heads), save,
                                                                float(dropout_p), seed, int(offset))[0]
    return torch.ops.structprune.cpp_gated_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                                                     key_bias, int(num_heads), save, float(dropout_p), int(seed),
                                                     int(offset))[0]


def supports_attention_dropout(device: torch.device) -> bool:
    """Whether :func:`gated_attention` takes ``dropout_p > 0`` on ``device`` (CPU and CUDA: yes)."""
    return availability(device) is None


def attention_dropout_scale(batch: int, num_heads: int, seq: int, heads: torch.Tensor, p: float, seed: int,
                            offset: int = 0) -> torch.Tensor:
    """The dropout multipliers [B, A, S, S] fp32 (0 or 1 / (1 - p)) that :func:`gated_attention` applies to the
    softmax probabilities of the active ``heads`` for ``(seed, offset)``; element (b, h, i, j) of the layer's
    [B, H, S, S] probabilities uses Philox4x32-10 output ``n = ((b * H + h) * S + i) * S + j`` (csrc/gated_core.h)."""
    _require()
    check_dropout(p, seed, offset)
    return torch.ops.structprune.attention_dropout_scale(batch, num_heads, seq, heads, float(p), int(seed),
                                                         int(offset))


def gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation: str = "gelu"):
    """Gated FFN projection, equal to :func:`structprune.ops.reference.gated_ffn` (pruned units' gate gradient: 0).
    Keeps the pre-activation and the activation for the backward when a gradient is needed. ``x`` may be
    [..., E] (the op takes [B, S, E]: other shapes run as [1, N, E])."""
    _require()
    check_ffn_inputs(x, w1, b1, w2, b2, unit_gates, kept_units, activation, kernel=True)
    save = _needs_grad(x, w1, b1, w2, b2, unit_gates)
    if x.dim() == 3:
        return torch.ops.structprune.cpp_gated_ffn(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save)[0]
    x3 = x.reshape(1, math.prod(x.shape[:-1]), x.shape[-1])
    y = torch.ops.structprune.cpp_gated_ffn(x3, w1, b1, w2, b2, unit_gates, kept_units, activation, save)[0]
    return y.reshape(x.shape)


def hard_concrete_sample(log_alpha, seed: int, offset: int, beta: float = 2.0 / 3.0, mask=None):
    """Hard-concrete gates with Philox4x32-10 noise, reproducible for (seed, offset) and identical on CPU and CUDA.

    Element i uses uniform noise u_i (clamped to [1e-6, 1 - 1e-6] like :class:`structprune.model.gates.HardConcreteGate`)
    and returns ``hard_concrete_from_uniform(log_alpha, u, beta) * mask``; differentiable in ``log_alpha``.
    """
    _require()
    return torch.ops.structprune.cpp_hard_concrete_sample(log_alpha, int(seed), int(offset), float(beta), mask)


def hard_concrete_uniform(n: int, seed: int, offset: int, device) -> torch.Tensor:
    """The fp32 uniform noise [n] (clamped to [1e-6, 1 - 1e-6]) that :func:`hard_concrete_sample` uses for
    ``(seed, offset)``: element i is word ``i % 4`` of Philox4x32-10 block ``(i // 4, offset)`` under key ``seed``,
    ``((word >> 9) + 0.5) / 2**23``. One op call per block: for tests and small ``n``."""
    _require()
    m = 0xFFFFFFFF
    words = []
    for blk in range((n + 3) // 4):
        words += torch.ops.structprune.philox4x32_10([blk & m, blk >> 32, offset & m, offset >> 32],
                                                     [seed & m, seed >> 32])
    w = torch.tensor(words[:n], dtype=torch.int64)
    return (((w >> 9).double() + 0.5) / 2**23).float().clamp(1e-6, 1 - 1e-6).to(device)


# --- fake kernels and autograd --------------------------------------------------------------------------------------

def _empty(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _masked_grads_fake(output_mask, x, weights, gates):
    """Gradients shaped like (x, *weights, gates), or [0] where ``output_mask`` leaves them out."""
    need_x, need_w, need_g = output_mask

    def grad(t, need):
        return _empty(t) if need else t.new_empty((0,))

    return (grad(x, need_x), *(grad(w, need_w) for w in weights), grad(gates, need_g))


def _attention_saved_shapes(x, wq, active_heads, num_heads, save):
    """Shapes of the saved outputs (qkv, ctx, lse) of cpp_gated_attention; [0] each when not saving."""
    if not save:
        return (0,), (0,), (0,)
    B, S, _ = x.shape
    R = active_heads.shape[0] * (wq.shape[0] // num_heads)
    return (B * S, 3 * R), (B * S, R), (B, S, active_heads.shape[0])


def _register_python_parts() -> None:
    lib = "structprune::"

    @torch.library.register_fake(lib + "cpp_gated_attention")
    def _attn_fake(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads,
                   save_for_backward=False, dropout_p=0.0, seed=0, offset=0):
        qkv, ctx, lse = _attention_saved_shapes(x, wq, active_heads, num_heads, save_for_backward)
        return (_empty(x), x.new_empty(qkv), x.new_empty(ctx), x.new_empty(lse, dtype=torch.float32))

    @torch.library.register_fake(lib + "cpp_gated_attention_backward")
    def _attn_bwd_fake(grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads,
                       qkv=None, ctx=None, lse=None, output_mask=(True, True, True), dropout_p=0.0, seed=0,
                       offset=0):
        return _masked_grads_fake(output_mask, x, (wq, bq, wk, bk, wv, bv, wo, bo), head_gates)

    @torch.library.register_fake(lib + "cpp_gated_ffn")
    def _ffn_fake(x, w1, b1, w2, b2, unit_gates, kept_units, activation, save_for_backward=False):
        shape = (x.shape[0] * x.shape[1], kept_units.shape[0]) if save_for_backward else (0,)
        return _empty(x), x.new_empty(shape), x.new_empty(shape)

    @torch.library.register_fake(lib + "cpp_gated_ffn_backward")
    def _ffn_bwd_fake(grad_out, x, w1, b1, w2, b2, unit_gates, kept_units, activation, pre=None, h=None,
                      output_mask=(True, True, True)):
        return _masked_grads_fake(output_mask, x, (w1, b1, w2, b2), unit_gates)

    @torch.library.register_fake(lib + "cpp_hard_concrete_sample")
    def _hc_fake(log_alpha, seed, offset, beta, mask=None):
        return _empty(log_alpha)

    @torch.library.register_fake(lib + "cpp_hard_concrete_sample_backward")
    def _hc_bwd_fake(grad, log_alpha, seed, offset, beta, mask=None):
        return _empty(log_alpha)

    # Forward ops called with save_for_backward=True return what their backward needs (saved here, beside the
    # inputs); called without it (directly, e.g. by opcheck) the backward recomputes the forward. The saved
    # outputs are not differentiable, and no zero gradients are materialized for them (grad is None when the
    # output itself was not used).
    def _attn_setup(ctx, inputs, output):
        *tensors, num_heads, save, dropout_p, seed, offset = inputs
        ctx.num_heads = num_heads
        ctx.dropout = (dropout_p, seed, offset)
        ctx.saved_outputs = bool(save)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        # x, weights, biases, head_gates, active_heads, key_bias (may be None) [, qkv, ctx, lse]
        ctx.save_for_backward(*tensors, *(output[1:] if save else ()))

    def _attn_backward(ctx, grad, *_unused):
        if grad is None:
            return (None,) * 17
        saved = ctx.saved_tensors
        *tensors, qkv, c, lse = saved if ctx.saved_outputs else (*saved, None, None, None)
        grads = torch.ops.structprune.cpp_gated_attention_backward(
            grad.to(tensors[0].dtype).contiguous(), *tensors, ctx.num_heads, qkv, c, lse,
            output_mask=grad_output_mask(ctx.needs_input_grad, 8), dropout_p=ctx.dropout[0], seed=ctx.dropout[1],
            offset=ctx.dropout[2])
        return masked_grads(grads, ctx.needs_input_grad)  # None for active_heads, key_bias, num_heads, save, ...

    torch.library.register_autograd(lib + "cpp_gated_attention", _attn_backward, setup_context=_attn_setup)

    def _ffn_setup(ctx, inputs, output):
        *tensors, activation, save = inputs
        ctx.activation = activation
        ctx.saved_outputs = bool(save)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, *(output[1:] if save else ()))  # ..., kept_units [, pre, h]

    def _ffn_backward(ctx, grad, *_unused):
        if grad is None:
            return (None,) * 9
        saved = ctx.saved_tensors
        *tensors, pre, h = saved if ctx.saved_outputs else (*saved, None, None)
        grads = torch.ops.structprune.cpp_gated_ffn_backward(
            grad.to(tensors[0].dtype).contiguous(), *tensors, ctx.activation, pre, h,
            output_mask=grad_output_mask(ctx.needs_input_grad, 4))
        return masked_grads(grads, ctx.needs_input_grad)  # None for kept_units, activation, save

    torch.library.register_autograd(lib + "cpp_gated_ffn", _ffn_backward, setup_context=_ffn_setup)

    def _hc_setup(ctx, inputs, output):
        log_alpha, seed, offset, beta, mask = inputs
        ctx.args = (seed, offset, beta)
        ctx.save_for_backward(log_alpha, mask)

    def _hc_backward(ctx, grad):
        log_alpha, mask = ctx.saved_tensors
        seed, offset, beta = ctx.args
        g = torch.ops.structprune.cpp_hard_concrete_sample_backward(grad, log_alpha, seed, offset, beta, mask)
        return g, None, None, None, None

    torch.library.register_autograd(lib + "cpp_hard_concrete_sample", _hc_backward, setup_context=_hc_setup)

    # Autocast: x, weights and biases in the region's dtype; gates and the fp32 key bias as they are. The gate
    # sampler has no rule: it runs in fp32 under autocast, like the reference's elementwise math.
    register_autocast(lib + "cpp_gated_attention", keep=("head_gates", "key_bias"))
    register_autocast(lib + "cpp_gated_ffn", keep=("unit_gates",))


def _register_seeded_parts() -> None:
    """``cpp_gated_attention_seeded`` and its backward: ``cpp_gated_attention`` with the Philox seed as a tensor.

    Under ``torch.compile`` the dispatcher draws the dropout seed inside the graph (``torch.randint`` on the CPU,
    from torch's default generator), so that it is a value of each run, neither a constant baked into the graph
    nor a host read that breaks it. The C++ ops take the seed as an ``int``; these opaque custom ops read it from
    the tensor when they run (a one-element CPU tensor: no device sync) and call the same kernels. The autograd
    formula is that of ``cpp_gated_attention``: the forward returns what the backward needs, nothing recomputed."""
    @torch.library.custom_op("structprune::cpp_gated_attention_seeded", mutates_args=())
    def _seeded(x: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, wo: Tensor,
                bo: Tensor, head_gates: Tensor, active_heads: Tensor, key_bias: Optional[Tensor], num_heads: int,
                save_for_backward: bool, dropout_p: float, seed: Tensor,
                offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(torch.ops.structprune.cpp_gated_attention(
            x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, save_for_backward,
            dropout_p, int(seed.item()), offset))

    @_seeded.register_fake
    def _(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, save_for_backward,
          dropout_p, seed, offset):
        qkv, ctx, lse = _attention_saved_shapes(x, wq, active_heads, num_heads, save_for_backward)
        return (_empty(x), x.new_empty(qkv), x.new_empty(ctx), x.new_empty(lse, dtype=torch.float32))

    @torch.library.custom_op("structprune::cpp_gated_attention_seeded_backward", mutates_args=())
    def _seeded_backward(grad_out: Tensor, x: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor,
                         bv: Tensor, wo: Tensor, bo: Tensor, head_gates: Tensor, active_heads: Tensor,
                         key_bias: Optional[Tensor], num_heads: int, qkv: Optional[Tensor], ctx: Optional[Tensor],
                         lse: Optional[Tensor], output_mask: list[bool], dropout_p: float, seed: Tensor,
                         offset: int) -> list[Tensor]:
        return list(torch.ops.structprune.cpp_gated_attention_backward(
            grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, qkv, ctx,
            lse, output_mask=output_mask, dropout_p=dropout_p, seed=int(seed.item()), offset=offset))

    @_seeded_backward.register_fake
    def _(grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads, qkv, ctx, lse,
          output_mask, dropout_p, seed, offset):
        return list(_masked_grads_fake(output_mask, x, (wq, bq, wk, bk, wv, bv, wo, bo), head_gates))

    def _setup(ctx, inputs, output):
        *tensors, num_heads, save, dropout_p, seed, offset = inputs
        ctx.num_heads = num_heads
        ctx.dropout = (dropout_p, offset)
        ctx.saved_outputs = bool(save)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(seed, *tensors, *(output[1:] if save else ()))

    def _backward(ctx, grad, *_unused):
        if grad is None:
            return (None,) * 17
        seed, *saved = ctx.saved_tensors
        *tensors, qkv, c, lse = saved if ctx.saved_outputs else (*saved, None, None, None)
        grads = _seeded_backward(grad.to(tensors[0].dtype).contiguous(), *tensors, ctx.num_heads, qkv, c, lse,
                                 grad_output_mask(ctx.needs_input_grad, 8), ctx.dropout[0], seed, ctx.dropout[1])
        return masked_grads(grads, ctx.needs_input_grad)

    _seeded.register_autograd(_backward, setup_context=_setup)
    register_autocast("structprune::cpp_gated_attention_seeded", keep=("head_gates", "key_bias"))


if _error is None:
    try:
        _register_python_parts()
        _register_seeded_parts()
    except Exception as exc:  # e.g. an incompatible torch.library
        if "already" in str(exc):  # this module was reloaded: the registrations from the first import stand
            pass
        else:
            _error = f"registering fake/autograd kernels failed ({type(exc).__name__}: {exc})"
            _log.warning("structprune: the C++ extension is unavailable: %s", _error)


BACKEND = Backend(name="cpp", availability=availability, supports_attention_dropout=supports_attention_dropout,
                  takes_tensor_seed=True,
                  gated_attention=gated_attention, gated_ffn=gated_ffn, hard_concrete_sample=hard_concrete_sample,
                  hard_concrete_uniform=hard_concrete_uniform, module=sys.modules[__name__])
