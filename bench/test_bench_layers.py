"""One BERT encoder layer per variant, grouped by shape, mode and kept fraction (see conftest.py for the sizes).

    pytest bench/ --benchmark-only                                   # tiny smoke run, seconds
    STRUCTPRUNE_BENCH_SHAPE=bert-base pytest bench/ --benchmark-only --benchmark-columns=median,iqr,rounds
    pytest bench/ --benchmark-disable                                # each case runs once, no timing

Each group holds the dense baselines next to the compacted and pruned variants at one kept fraction, so
pytest-benchmark's comparison inside a group is the speedup. FLOPs and bytes of the case are in ``extra_info``.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import structprune.ops.dispatch as ops
from structprune import benchmark as bm

from conftest import SETTINGS

VARIANTS = ["dense-eager", "dense-sdpa", "compacted"] + [f"pruned[{b}]" for b in ops.BACKENDS]
if SETTINGS.compile:
    VARIANTS += ["compacted+compile"] + [f"pruned[{b}]+compile" for b in ops.BACKENDS]


@functools.lru_cache(maxsize=1)
def _state():
    return bm.base_state(SETTINGS.shape, seed=0)


def _skip_reason(backend: str | None) -> str | None:
    if backend is None or backend == "torch":
        return None
    reason = bm.backend_reasons(SETTINGS.device)[backend]
    if reason is None and backend == "triton" and SETTINGS.device.type == "cpu" and not SETTINGS.triton_cpu:
        reason = "triton on CPU is the interpreter; set STRUCTPRUNE_BENCH_TRITON_CPU=1 to run it"
    return reason


@pytest.mark.parametrize("mode", SETTINGS.modes)
@pytest.mark.parametrize("fracs", SETTINGS.fracs, ids=lambda hf: f"h{hf[0]:g}-f{hf[1]:g}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_layer(benchmark, settings, variant, fracs, mode):
    compiled = variant.endswith("+compile")
    name = variant.removesuffix("+compile")
    kind = "pruned" if name.startswith("pruned[") else name
    backend = name[len("pruned["):-1] if kind == "pruned" else ("torch" if kind == "compacted" else None)
    reason = _skip_reason(backend)
    if reason:
        pytest.skip(f"{variant}: {reason}")
    head_frac, ffn_frac = fracs
    shape, dtype, training = settings.shape, bm.DTYPES[settings.dtype], mode == "training"
    benchmark.group = f"{shape.name}-{settings.dtype}-{mode}-heads{head_frac:g}-ffn{ffn_frac:g}"

    with ops.use_backend(backend) if backend else contextlib.nullcontext():
        layer = bm.build_layer(shape, kind, _state(), head_frac=head_frac, ffn_frac=ffn_frac, mode=mode,
                               dtype=dtype, device=settings.device)
        module = layer
        if compiled:
            torch._dynamo.reset()
            module = torch.compile(layer)
        x, mask, grad = bm.make_inputs(shape, settings.batch, settings.seq, dtype, settings.device, 0, 0.0, training)
        step = bm.make_step(module, [p for p in layer.parameters() if p.requires_grad], x, mask, grad, training)
        if settings.device.type == "cuda":
            inner = step

            def step():
                inner()
                torch.cuda.synchronize()

        step()  # build / compile outside the timing
        dense = kind.startswith("dense")
        heads = shape.heads if dense else bm.keep_count(shape.heads, head_frac)
        units = shape.ffn if dense else bm.keep_count(shape.ffn, ffn_frac)
        flops, nbytes = bm.flop_byte_model(shape, settings.batch, settings.seq, heads, units, dtype.itemsize, training)
        benchmark.extra_info.update(variant=variant, mode=mode, heads_kept=heads, units_kept=units, flops=flops,
                                    bytes=nbytes, batch=settings.batch, seq=settings.seq, dtype=settings.dtype,
                                    ran=ops.last_backends() if not dense else {})
        if settings.rounds:
            benchmark.pedantic(step, rounds=settings.rounds, warmup_rounds=1, iterations=1)
        else:
            benchmark(step)
