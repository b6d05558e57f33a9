"""The one build recipe of the C++/CUDA extension: its sources, compiler flags, CUDA arch list and ninja job count.

Both builds read it: ``setup.py`` (``structprune._C`` at install time) and the JIT build of
``structprune/_extension.py`` (first use). Plain Python that imports nothing from torch or structprune, so that
either can load this file by its path (``importlib.util.spec_from_file_location``); it ships with the sources as
``structprune/csrc/build_recipe.py``. The knobs (``STRUCTPRUNE_CUDA_ARCH_LIST``, ``TORCH_CUDA_ARCH_LIST``,
``MAX_JOBS``, ``STRUCTPRUNE_SKIP_CUDA_BUILD``) are documented in csrc/README.md.
"""
from __future__ import annotations

import os
from typing import Mapping

# Translation units, relative to csrc/ (headers are found through the include path, csrc/ itself).
CPU_SOURCES = ("register.cpp", "attention.cpp", "ffn.cpp", "glu_ffn.cpp", "pack_cache.cpp", "checks.cpp",
               "cpu/ops_cpu.cpp", "cpu/modernbert_cpu.cpp", "cpu/decoder_cpu.cpp",
               "cpu/norm_cpu.cpp", "cpu/serving_attention_cpu.cpp", "cpu/serving_attention_bf16_cpu.cpp")
CUDA_SOURCES = ("cuda/kernels.cu", "cuda/ops_cuda.cpp")  # only with a CUDA torch and toolkit

CXX_FLAGS = ("-O3",)
NVCC_FLAGS = ("-O3",)
# A sanitized build (STRUCTPRUNE_SANITIZE, JIT only): debuggable code instead of -O3, plus -fsanitize=...
SANITIZE_CXX_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer")

# PTX of compute_90, not 90a: arch-specific PTX runs on sm_90 only; compute_90 PTX is JIT-compiled by the driver
# for newer GPUs (sm_100, sm_120).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a;9.0+PTX"
GIB_PER_JOB = 3  # memory one compiler process may take, nvcc included


def sources(with_cuda: bool) -> list[str]:
    """The translation units to compile, relative to csrc/."""
    return list(CPU_SOURCES + (CUDA_SOURCES if with_cuda else ()))


def cxx_flags(with_cuda: bool, python_module: bool = False, sanitizers: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Host compiler flags. ``python_module``: the setup.py build, whose library is also the module
    ``structprune._C``; ``sanitizers``: names for ``-fsanitize=`` (the JIT's sanitized build)."""
    if sanitizers:
        flags = [*SANITIZE_CXX_FLAGS, "-fsanitize=" + ",".join(sanitizers)]
    else:
        flags = list(CXX_FLAGS)
    if python_module:
        flags.append("-DSTRUCTPRUNE_PYTHON_MODULE")
    if with_cuda:
        flags.append("-DSTRUCTPRUNE_WITH_CUDA")
    return flags


def nvcc_flags() -> list[str]:
    return list(NVCC_FLAGS)


def ld_flags(sanitizers: tuple[str, ...] | list[str] = ()) -> list[str]:
    return ["-fsanitize=" + ",".join(sanitizers)] if sanitizers else []


def skip_cuda(env: Mapping[str, str]) -> bool:
    """STRUCTPRUNE_SKIP_CUDA_BUILD=1: the CPU kernels only, even with a CUDA torch."""
    return env.get("STRUCTPRUNE_SKIP_CUDA_BUILD") == "1"


def cuda_arch_list(env: Mapping[str, str]) -> str:
    """The CUDA arch list to build for: STRUCTPRUNE_CUDA_ARCH_LIST, else the user's TORCH_CUDA_ARCH_LIST, else
    DEFAULT_CUDA_ARCH_LIST."""
    for var in ("STRUCTPRUNE_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        if env.get(var, "").strip():
            return env[var].strip()
    return DEFAULT_CUDA_ARCH_LIST


def default_max_jobs() -> str:
    """Parallel ninja jobs when MAX_JOBS is not set: min(cores, memory / GIB_PER_JOB), at least 1."""
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return str(max(1, min(cores, int(mem_gib // GIB_PER_JOB))))


def build_env(env: Mapping[str, str], with_cuda: bool) -> dict[str, str]:
    """The environment variables torch's build reads that this recipe sets, given the current ``env``: MAX_JOBS
    (unless the user set it) and, for a CUDA build, TORCH_CUDA_ARCH_LIST (:func:`cuda_arch_list`)."""
    out = {}
    if not env.get("MAX_JOBS", "").strip():
        out["MAX_JOBS"] = default_max_jobs()
    if with_cuda:
        out["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(env)
    return out
