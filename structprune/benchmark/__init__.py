"""Layer benchmarks: is a pruned BERT layer really faster? (``structprune bench``)

One Hugging Face ``BertLayer`` of a chosen shape is timed in several variants, on the same weights and input:

    dense-eager, dense-sdpa     the unpatched HF layer (attn_implementation "eager" / "sdpa")
    compacted                   patched, masked and ``sp.compact``-ed: a physically smaller dense layer,
                                run on the "torch" backend (cuBLAS/MKL matmuls + SDPA)
    compacted+compile           ``torch.compile`` of the compacted layer
    pruned[<backend>]           patched and masked, not compacted, with ``sp.set_backend(<backend>)``:
                                the kernels skip the pruned heads / units ("torch" computes everything)
    pruned[<backend>]+compile   ``torch.compile`` of that

Kept heads and FFN units are chosen at random with a fixed seed (structured sparsity after L0 training is
irregular), nested across fractions. Modes: ``inference`` (forward under ``no_grad``) and ``training`` (forward
+ backward; the pruned layer samples its hard-concrete gates, dropout is 0 everywhere so kernels can run).

Every row carries the median time and IQR, achieved FLOP/s and bytes/s from a simple model (FLOPs from
:func:`structprune.ops.reference.attention_flops` / :func:`~structprune.ops.reference.ffn_flops`; bytes = weights of the
kept heads/units + activations in and out of each op; training counts 3x both), the speedup vs ``dense-sdpa``
and vs ``compacted`` measured in the same run, and the fraction of the FLOP-proportional ideal speedup reached.

``--shape modernbert-base`` (or ``modernbert-tiny``) times a ModernBERT layer instead, global and local, masked vs
compacted vs dense HF with paired interleaved ratios: :mod:`structprune.benchmark.modernbert`.

Library use::

    from structprune.benchmark import BenchConfig, run_benchmark
    result = run_benchmark(BenchConfig(shapes=["bert-base"], modes=["inference"]))
    print(result.table()); result.write("bench-out")

The package, one job per module: :mod:`.config` (shapes, variants, defaults, ``BenchConfig``), :mod:`.layers`
(building the layer variants, inputs, the timed step, the FLOP/byte model), :mod:`structprune.tools.machine` (what it ran on),
:mod:`.measure` (timing, through :mod:`structprune.tools.timing` on CPU), :mod:`.runner` (the cases, checks and rows),
:mod:`.results` (JSON, CSV, table), :mod:`.plots`, :mod:`.traces` (``--profile``), :mod:`.command` (the CLI).
"""
from structprune.benchmark.command import add_arguments, command, config_from_args, main, register
from structprune.benchmark.config import (BASELINE, DEFAULT_FFN_FRACS, DEFAULT_HEAD_FRACS, DEFAULTS, DTYPES, MODES, QUICK_FRACS, SHAPES,
                     VARIANT_KINDS, BenchConfig, Case, Shape, parse_shape)
from structprune.benchmark.layers import (base_state, bert_config, build_layer, flop_byte_model, keep_count, make_inputs, make_step,
                     random_mask)
from structprune.tools.machine import backend_reasons, machine_info
from structprune.benchmark.measure import time_cpu, time_cuda
from structprune.benchmark.plots import plot_results
from structprune.benchmark.results import CSV_COLUMNS, BenchResult, format_table
from structprune.benchmark.runner import plan, run_benchmark

__all__ = [
    "BenchConfig", "BenchResult", "Case", "Shape", "run_benchmark", "plan", "parse_shape", "format_table",
    "plot_results", "machine_info", "backend_reasons", "build_layer", "base_state", "bert_config", "make_inputs",
    "make_step", "flop_byte_model", "keep_count", "random_mask", "time_cpu", "time_cuda",
    "add_arguments", "config_from_args", "command", "register", "main",
    "SHAPES", "VARIANT_KINDS", "BASELINE", "MODES", "DTYPES", "DEFAULTS", "DEFAULT_HEAD_FRACS", "DEFAULT_FFN_FRACS",
    "QUICK_FRACS", "CSV_COLUMNS",
]
