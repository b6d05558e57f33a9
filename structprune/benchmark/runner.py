"""Running a benchmark: the cases of a config, each built, checked against the compacted layer and timed."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from structprune.ops import dispatch as ops
from structprune.tools import profiling
from structprune.benchmark.config import BASELINE, DEFAULTS, DTYPES, MODES, VARIANT_KINDS, BenchConfig, Case, parse_shape
from structprune.benchmark.layers import base_state, build_layer, flop_byte_model, keep_count, make_inputs, make_step
from structprune.tools.machine import backend_reasons, machine_info
from structprune.benchmark.measure import _dynamo_graphs, _graph_breaks, _sync, time_cpu, time_cuda
from structprune.benchmark.results import BenchResult, _compute_ratios
from structprune.benchmark.traces import _merge_traces, _profile_case


class _Progress:
    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.perf_counter()

    def __call__(self, case: Case, msg: str) -> None:
        self.done += 1
        if not self.quiet:
            el = time.perf_counter() - self.t0
            print(f"[{self.done:>3}/{self.total}] {el:6.0f}s {case.shape.name} {case.dtype} {case.mode:<9} "
                  f"{case.variant:<24} heads {case.head_frac:.2f} ffn {case.ffn_frac:.2f}: {msg}",
                  file=sys.stderr, flush=True)


def plan(cfg: BenchConfig) -> tuple[list[Case], list[dict]]:
    """Every case to run, in order, and the skipped ones with their reason."""
    device = cfg.resolved_device()
    dtypes = cfg.dtypes or DEFAULTS[device.type]["dtypes"]
    for kind in cfg.variants:
        if kind not in VARIANT_KINDS:
            raise ValueError(f"unknown variant {kind!r}; expected some of {VARIANT_KINDS}")
    for mode in cfg.modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected some of {MODES}")
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"unknown dtype {dt!r}; expected some of {sorted(DTYPES)}")
    skipped: list[dict] = []
    backends: list[str] = []
    if "pruned" in cfg.variants:
        explicit = cfg.backends is not None
        reasons = backend_reasons(device)
        for name in (cfg.backends if explicit else ops.BACKENDS):
            if name not in ops.BACKENDS:
                raise ValueError(f"unknown backend {name!r}; expected some of {ops.BACKENDS}")
            reason = reasons[name]
            if reason is None and name == "triton" and device.type == "cpu" and not explicit:
                reason = ("Triton on CPU runs in the interpreter (TRITON_INTERPRET=1), far too slow to time; "
                          "name it with --backend triton to run it anyway")
            if reason is None:
                backends.append(name)
            else:
                skipped.append({"variant": f"pruned[{name}]", "mode": None, "reason": reason})
    cases: list[Case] = []
    fracs = [(h, f) for h in cfg.head_fracs for f in cfg.ffn_fracs]
    for spec in cfg.shapes:
        shape = parse_shape(spec)
        for dt in dtypes:
            for mode in cfg.modes:
                for kind in ("dense-eager", "dense-sdpa"):
                    if kind in cfg.variants:
                        cases.append(Case(shape, dt, mode, kind, kind, None, False, 1.0, 1.0))
                for hf, ff in fracs:
                    if BASELINE in cfg.variants and (hf, ff) != (1.0, 1.0):
                        # re-time the baseline beside every group, so each ratio compares measurements taken
                        # moments apart (CPU load drifts over a long sweep)
                        cases.append(Case(shape, dt, mode, BASELINE, BASELINE, None, False, hf, ff))
                    if "compacted" in cfg.variants:
                        cases.append(Case(shape, dt, mode, "compacted", "compacted", "torch", False, hf, ff))
                        if cfg.compile:
                            cases.append(Case(shape, dt, mode, "compacted+compile", "compacted", "torch", True, hf, ff))
                    for b in backends:
                        cases.append(Case(shape, dt, mode, f"pruned[{b}]", "pruned", b, False, hf, ff))
                        if cfg.compile:
                            cases.append(Case(shape, dt, mode, f"pruned[{b}]+compile", "pruned", b, True, hf, ff))
    return cases, skipped


def run_benchmark(cfg: BenchConfig, checkpoint: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """Run every case of ``cfg``; returns the rows with ratios computed (nothing is written).

    ``checkpoint(result)``, if given, is called after each case with the rows so far (ratios computed), so a
    long sweep that dies still leaves its numbers behind."""
    device = cfg.resolved_device()
    defaults = DEFAULTS[device.type]
    batch = cfg.batch or defaults["batch"]
    seq = cfg.seq or defaults["seq"]
    warmup = defaults["warmup"] if cfg.warmup is None else cfg.warmup
    repeats = cfg.repeats or defaults["repeats"]
    saved_threads = torch.get_num_threads()
    if device.type == "cpu":
        threads = cfg.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        cases, skipped = plan(cfg)
        config = {k: v for k, v in asdict(cfg).items() if k != "shapes"}
        config.update(shapes=[asdict(parse_shape(s)) for s in cfg.shapes], device=str(device), batch=batch, seq=seq,
                      dtypes=cfg.dtypes or defaults["dtypes"], warmup=warmup, repeats=repeats,
                      threads=torch.get_num_threads())
        result = BenchResult(machine=machine_info(device), config=config, skipped=skipped)
        progress = _Progress(len(cases), cfg.quiet)
        if not cfg.quiet:
            where = result.machine.get("gpu") or result.machine["cpu"]
            print(f"structprune bench: {len(cases)} cases on {device} ({where}), "
                  f"threads {torch.get_num_threads()}, batch {batch}, seq {seq}", file=sys.stderr, flush=True)
            for s in skipped:
                print(f"  skipping {s['variant']}: {s['reason']}", file=sys.stderr)
        _run_cases(cfg, cases, device, batch, seq, warmup, repeats, result, progress, checkpoint)
        _compute_ratios(result.rows)
        if cfg.profile_dir:
            _merge_traces(Path(cfg.profile_dir))
    finally:
        torch.set_num_threads(saved_threads)
    result.elapsed_s = time.perf_counter() - t_start
    return result


def _run_cases(cfg, cases, device, batch, seq, warmup, repeats, result, progress, checkpoint=None) -> None:
    states: dict[str, dict] = {}
    inputs: dict[tuple, tuple] = {}
    built: dict[tuple, nn.Module] = {}  # eager layers of the current (shape, dtype, mode, fractions)
    reference_out: dict[tuple, torch.Tensor] = {}
    for case in cases:
        shape, dtype = case.shape, DTYPES[case.dtype]
        training = case.mode == "training"
        group = (shape, case.dtype, case.mode, case.head_frac, case.ffn_frac)
        if any(k[:5] != group for k in built):  # new group: drop layers of the previous one
            new_shape = any(k[:2] != group[:2] for k in built)
            built.clear()
            reference_out.clear()
            if new_shape or device.type == "cuda":  # gc.collect costs ~0.1-1 s with transformers loaded
                gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if shape.name not in states:
            states.clear()
            states[shape.name] = base_state(shape, cfg.seed)
        ikey = (shape, case.dtype, case.mode)
        if ikey not in inputs:
            inputs.clear()
            inputs[ikey] = make_inputs(shape, batch, seq, dtype, device, cfg.seed, cfg.padding, training)
        x, mask, grad = inputs[ikey]
        heads_kept = shape.heads if case.kind.startswith("dense") else keep_count(shape.heads, case.head_frac)
        units_kept = shape.ffn if case.kind.startswith("dense") else keep_count(shape.ffn, case.ffn_frac)
        row_base = dict(shape=shape.name, hidden=shape.hidden, heads=shape.heads, ffn=shape.ffn, batch=batch, seq=seq,
                        dtype=case.dtype, device=str(device), mode=case.mode, variant=case.variant, kind=case.kind,
                        backend=case.backend, compiled=case.compiled, head_frac=case.head_frac,
                        ffn_frac=case.ffn_frac, heads_kept=heads_kept, units_kept=units_kept)
        try:
            # the pruned variants run on their backend; the dense ones (backend None) need no choice
            with ops.use_backend(case.backend) if case.backend else contextlib.nullcontext():
                row = _run_case(cfg, case, device, state=states[shape.name], x=x, mask=mask, grad=grad,
                                training=training, warmup=warmup, repeats=repeats, built=built,
                                reference_out=reference_out, group=group)
        except Exception as exc:
            if cfg.strict:
                raise
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
            result.skipped.append({"variant": case.variant, "mode": case.mode, "head_frac": case.head_frac,
                                   "ffn_frac": case.ffn_frac, "shape": shape.name, "dtype": case.dtype,
                                   "reason": reason, "error": True})
            progress(case, f"FAILED ({reason[:120]})")
            continue
        flops, nbytes = flop_byte_model(shape, batch, seq, heads_kept, units_kept, dtype.itemsize, training)
        flops_dense, _ = flop_byte_model(shape, batch, seq, shape.heads, shape.ffn, dtype.itemsize, training)
        med = row["median_ms"] / 1e3
        row_base.update(row)
        row_base.update(flops=flops, flops_dense=flops_dense, bytes=nbytes, gflop_per_s=flops / med / 1e9,
                        gb_per_s=nbytes / med / 1e9)
        result.rows.append(row_base)
        iqr_pct = 100 * row["iqr_ms"] / row["median_ms"] if row["median_ms"] else 0.0
        extra = f", compiled in {row['compile_s']:.1f}s" if row.get("compile_s") is not None else ""
        progress(case, f"{row['median_ms']:9.3f} ms  IQR {iqr_pct:4.1f}%{extra}")
        if checkpoint is not None:
            _compute_ratios(result.rows)
            result.elapsed_s = time.perf_counter() - progress.t0
            checkpoint(result)


def _run_case(cfg, case: Case, device, *, state, x, mask, grad, training, warmup, repeats, built, reference_out,
              group) -> dict:
    shape, dtype = case.shape, DTYPES[case.dtype]
    bkey = group + (case.kind,)
    if bkey not in built:
        built[bkey] = build_layer(shape, case.kind, state, head_frac=case.head_frac, ffn_frac=case.ffn_frac,
                                  mode=case.mode, dtype=dtype, device=device, seed=cfg.seed)
    layer = built[bkey]
    params = [p for p in layer.parameters() if p.requires_grad]
    module = layer
    compile_s = graph_breaks = break_reasons = graphs = None
    if case.compiled:
        import torch._dynamo

        torch._dynamo.reset()  # a fresh cache per case: shapes differ, and the recompile limit must not kick in
        module = torch.compile(layer)
    step = make_step(module, params, x, mask, grad, training)
    # first call (compiles), then which backend ran and the output check
    breaks0, graphs0 = _graph_breaks(), _dynamo_graphs()
    # forget which backends earlier cases ran
    ops.reset_last_backends()
    t0 = time.perf_counter()
    out = step()
    _sync(device)
    if case.compiled:
        compile_s = time.perf_counter() - t0
        after = _graph_breaks()
        break_reasons = {k: n - breaks0.get(k, 0) for k, n in after.items() if n - breaks0.get(k, 0) > 0}
        graph_breaks = sum(break_reasons.values())
    if case.compiled:
        # graphs compiled during warm-up and timing too: more than a few means recompiles (see recompile_limit)
        graphs_after_first = _dynamo_graphs() - graphs0
    ran = None
    if case.kind in ("compacted", "pruned"):
        last = ops.last_backends()
        ran = ",".join(f"{k}={v}" for k, v in sorted(last.items())) or None
        if case.kind == "pruned" and not case.compiled and any(v != case.backend for v in last.values()):
            ran = (ran or "") + " (MISMATCH)"
    err = None
    if cfg.check and not training and case.kind in ("compacted", "pruned"):
        rkey = group
        if case.variant == "compacted":
            reference_out[rkey] = out.detach().float()
        elif rkey in reference_out:
            err = float((out.detach().float() - reference_out[rkey]).abs().max())
    del out
    nvtx = device.type == "cuda"
    annotation = profiling.annotate_layer(layer, case.variant, nvtx=True) if cfg.nvtx and not case.compiled else None
    try:
        with profiling.annotate(case.label, nvtx=nvtx):
            if device.type == "cuda":
                grads = params + [x] if training else None
                samples, number = time_cuda(step, warmup, repeats, cfg.cuda_timer, grad_to_none=grads)
            else:
                samples, number = time_cpu(step, warmup, repeats, cfg.min_time)
    finally:
        if annotation is not None:
            annotation.remove()
    if case.compiled:
        graphs = _dynamo_graphs() - graphs0
        if graphs > graphs_after_first:
            break_reasons = {**(break_reasons or {}),
                             f"recompiled while timing: {graphs - graphs_after_first} more graphs": 0}
    if cfg.profile_dir:
        _profile_case(cfg, case, layer, step, device)
    q1, med, q3 = np.percentile(np.asarray(samples) * 1e3, [25, 50, 75])
    return dict(median_ms=float(med), q1_ms=float(q1), q3_ms=float(q3), iqr_ms=float(q3 - q1),
                min_ms=float(min(samples) * 1e3), samples=len(samples), calls_per_sample=number,
                max_abs_err=err, ran_backends=ran, compile_s=compile_s, graph_breaks=graph_breaks,
                dynamo_graphs=graphs, graph_break_reasons=break_reasons)
