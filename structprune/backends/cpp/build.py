"""Finding, building and loading the C++/CUDA extension of ``csrc/`` (the "cpp" backend's build; its ops are
:mod:`structprune.backends.cpp.ops`).

Loading, in order (importing this module never fails because the extension is missing):

1. ``structprune._C``, built by ``setup.py`` at install time (``pip install --no-build-isolation .``);
2. a JIT build of ``csrc/`` with :func:`torch.utils.cpp_extension.load` (ninja), cached under
   ``$STRUCTPRUNE_BUILD_DIR`` or torch's default extensions directory (``$TORCH_EXTENSIONS_DIR``); the CUDA
   sources are compiled only when torch itself has CUDA (and fall back to a CPU-only build if that fails).
   Sources, flags, CUDA arch list and ``MAX_JOBS`` default are ``csrc/build_recipe.py``'s, as for setup.py; a
   build that compiles (not one loaded from the cache) says so on stderr first, unless ``STRUCTPRUNE_QUIET=1``.
   Builds of one directory are serialised by an OS lock, so a build killed part-way blocks nothing after it;
3. otherwise the reason is recorded: :func:`availability` returns it (``structprune.ops.dispatch`` reports it) and it is
   logged once.

Packed-weight cache (kept in the extension, cleared here): the kept rows/columns of each layer's weights are packed once and reused while the weights
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
import os
import sys
import time
import warnings
from pathlib import Path

import torch

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


_TORCH_BATON = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory (polled, never expires)


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an exclusive OS lock on ``build_dir`` (``flock``: released when its holder exits, even killed by
    SIGKILL) for one JIT build, and clear torch's own lock file when it is stale.

    torch's ``FileBaton`` is a plain file that a build killed part-way leaves behind; every later build of that
    directory then waits on it forever. Every structprune build holds this lock first, so a baton found while
    holding it was left by a dead process: it is removed, with a warning. A live build elsewhere is waited for
    (said once on stderr)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's baton alone
        yield
        return
    with open(build_dir / ".structprune_build.flock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if os.environ.get("STRUCTPRUNE_QUIET") != "1":
                print(f"structprune: waiting for another process building the C++ extension in {build_dir}",
                      file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            baton = build_dir / _TORCH_BATON
            if baton.exists():
                baton.unlink(missing_ok=True)
                warnings.warn(f"structprune: removed a stale build lock {baton} (left by a build that was killed "
                              f"part-way; torch would have waited on it forever)", RuntimeWarning, stacklevel=3)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
            with _build_lock(build_dir), _environ(recipe.build_env(os.environ, with_cuda)):  # MAX_JOBS, arch list
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


def record_error(message: str) -> None:
    """Mark the extension unavailable for ``message`` (a failure after loading, e.g. registering its Python parts)."""
    global _error
    _error = message
    _log.warning("structprune: the C++ extension is unavailable: %s", _error)


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
