"""Batch-parallel serving threads: a batch is split into one contiguous chunk per thread, and each chunk runs the
whole model on its own worker thread with ONE intra-op thread (no OpenMP barrier between the ops).

Why: torch's intra-op parallelism (OpenMP, static partition) meets at a barrier after every op, about 50 per
forward of a 6-layer encoder; on a busy machine one descheduled thread stalls every op for a scheduler time slice
(measured: ~12 ms per op, even for an embedding lookup, at load 6 on 2 cores). ONNX Runtime and OpenVINO fuse
more and schedule dynamically. Splitting the batch keeps the thread count (``torch.get_num_threads()`` workers)
and lets each worker run its ops back to back; the GEMMs stay large (M = tokens of the chunk).

A batch of ONE sequence is split by rows (tokens) instead: each worker runs the GEMMs, LayerNorms and its own
queries' attention on its block of rows, and the workers exchange K/V once per layer (one barrier per layer instead
of one per op; ``ServingModel._forward_rows``).

The workers' intra-op count is set with libgomp's ``omp_set_num_threads`` (a per-thread setting), not
``torch.set_num_threads`` (which would change every thread's count). Where torch does not run on libgomp (Intel
OpenMP, another threading backend), :func:`pool` returns None and the model runs in the calling thread as usual.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
_OMP = None


def _omp():
    """The OpenMP runtime torch uses (libgomp shipped in torch/lib, or the system's), or None."""
    global _OMP
    if _OMP is None:
        candidates = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*"))
        candidates += ["libgomp.so.1"]
        _OMP = False
        for name in candidates:
            try:
                lib = ctypes.CDLL(name, mode=ctypes.RTLD_NOLOAD) if name == "libgomp.so.1" else ctypes.CDLL(name)
                lib.omp_set_num_threads  # noqa: B018  (raises AttributeError where it is missing)
                _OMP = lib
                break
            except (OSError, AttributeError):
                continue
    return _OMP or None


def _one_thread() -> None:
    torch.get_num_threads()  # torch's lazy per-thread OpenMP set-up first, so it does not undo the line below
    _omp().omp_set_num_threads(1)


def pool(threads: int) -> ThreadPoolExecutor | None:
    """A pool of ``threads`` workers with one intra-op thread each (shared by every served model), or None where
    the per-thread setting is not available (see the module docstring)."""
    if threads < 2 or _omp() is None or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    with _LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="structprune-serve",
                                                 initializer=_one_thread)
        return _POOLS[threads]
