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
:func:`structprune.reference.attention_flops` / :func:`~structprune.reference.ffn_flops`; bytes = weights of the
kept heads/units + activations in and out of each op; training counts 3x both), the speedup vs ``dense-sdpa``
and vs ``compacted`` measured in the same run, and the fraction of the FLOP-proportional ideal speedup reached.

Library use::

    from structprune.benchmark import BenchConfig, run_benchmark
    result = run_benchmark(BenchConfig(shapes=["bert-base"], modes=["inference"]))
    print(result.table()); result.write("bench-out")
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import atomic, ops, profiling, timing
from .compaction import compact
from .masks import set_masks
from .patching import patch, set_gate_sampling
from .reference import attention_flops, ffn_flops


# ----------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    ffn: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    "tiny": Shape("tiny", 64, 4, 128),
    "bert-base": Shape("bert-base", 768, 12, 3072),
    "bert-large": Shape("bert-large", 1024, 16, 4096),
}
VARIANT_KINDS = ("dense-eager", "dense-sdpa", "compacted", "pruned")
BASELINE = "dense-sdpa"
MODES = ("inference", "training")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_HEAD_FRACS = (1.0, 0.75, 0.5, 0.25)
DEFAULT_FFN_FRACS = (1.0, 0.5, 0.3, 0.1)
QUICK_FRACS = (1.0, 0.5)
DEFAULTS = {  # per device type: batch, seq, dtypes, warmup calls, repeats
    "cpu": dict(batch=8, seq=128, dtypes=["fp32"], warmup=3, repeats=10),
    "cuda": dict(batch=32, seq=384, dtypes=["fp16"], warmup=10, repeats=100),
}


def parse_shape(spec: str | Shape) -> Shape:
    """A shape name (``tiny``, ``bert-base``, ``bert-large``) or ``HIDDENxHEADSxFFN`` (e.g. ``512x8x2048``)."""
    if isinstance(spec, Shape):
        return spec
    if spec in SHAPES:
        return SHAPES[spec]
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", spec)
    if not m:
        raise ValueError(f"unknown shape {spec!r}: expected one of {sorted(SHAPES)} or HIDDENxHEADSxFFN")
    hidden, heads, ffn = map(int, m.groups())
    if hidden % heads:
        raise ValueError(f"shape {spec!r}: hidden size {hidden} is not a multiple of the head count {heads}")
    return Shape(spec, hidden, heads, ffn)


@dataclass
class BenchConfig:
    """What to run. ``None`` fields take the device's default (see ``DEFAULTS``)."""

    shapes: list = field(default_factory=lambda: ["bert-base"])
    batch: int | None = None
    seq: int | None = None
    dtypes: list[str] | None = None
    device: str = "auto"
    threads: int | None = None  # CPU threads (torch.set_num_threads); default: the cores this process may use
    head_fracs: tuple = DEFAULT_HEAD_FRACS
    ffn_fracs: tuple = DEFAULT_FFN_FRACS
    variants: tuple = VARIANT_KINDS
    backends: tuple | None = None  # None: every backend available on the device (triton on CPU only if named)
    compile: bool = True
    modes: tuple = MODES
    warmup: int | None = None
    repeats: int | None = None
    min_time: float = 0.0  # CPU: seconds per sample (calls per sample grow to reach it); 0 = one call per sample
    cuda_timer: str = "auto"  # "do_bench" (triton.testing, L2 flushed), "events" (CUDA events, L2 flushed), "auto"
    seed: int = 0
    padding: float = 0.0  # fraction of key positions masked out as padding (0: no attention mask)
    check: bool = True  # compare each pruned / compiled output with the compacted layer's (max abs error)
    profile_dir: str | None = None  # write Chrome traces here (torch.profiler)
    profile_iters: int = 2
    nvtx: bool = False  # NVTX ranges per op during timing (for nsys); case-level ranges are always on CUDA
    strict: bool = False  # re-raise a failing case instead of recording it
    quiet: bool = False

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class Case:
    shape: Shape
    dtype: str
    mode: str
    variant: str  # full name, e.g. "pruned[cpp]+compile"
    kind: str  # dense-eager | dense-sdpa | compacted | pruned
    backend: str | None
    compiled: bool
    head_frac: float
    ffn_frac: float

    @property
    def label(self) -> str:
        return f"{self.variant}|h{self.head_frac:.2f}|f{self.ffn_frac:.2f}|{self.mode}"


CSV_COLUMNS = (
    "shape", "hidden", "heads", "ffn", "batch", "seq", "dtype", "device", "mode", "variant", "kind", "backend",
    "compiled", "head_frac", "ffn_frac", "heads_kept", "units_kept", "median_ms", "q1_ms", "q3_ms", "iqr_ms",
    "min_ms", "samples", "calls_per_sample", "flops", "bytes", "gflop_per_s", "gb_per_s", "speedup_vs_dense",
    "speedup_vs_compacted", "ideal_speedup", "fraction_of_ideal", "max_abs_err", "ran_backends", "compile_s",
    "graph_breaks", "dynamo_graphs",
)


# ----------------------------------------------------------------------------------------------- machine info
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def backend_reasons(device: torch.device) -> dict[str, str | None]:
    """{backend: None if it can run on ``device``, else why not}; a broken backend module is reported, not raised."""
    reasons = {}
    for name in ops.BACKENDS:
        try:
            reasons[name] = ops.availability(name, device)
        except Exception as exc:  # a backend module still being written, or a failing probe
            reasons[name] = f"availability check failed: {type(exc).__name__}: {exc}"
    return reasons


def machine_info(device: torch.device) -> dict:
    from . import __version__

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "structprune": __version__,
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "backends": {k: (v or "available") for k, v in backend_reasons(device).items()},
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


# ----------------------------------------------------------------------------------------------- building layers
class _SingleLayerModel(nn.Module):
    """The smallest thing :func:`structprune.patch` accepts: ``.config`` and ``.encoder.layer``."""

    def __init__(self, config, layer: nn.Module):
        super().__init__()
        self.config = config
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([layer])

    @property
    def layer(self) -> nn.Module:
        return self.encoder.layer[0]


def bert_config(shape: Shape, attn_implementation: str = "sdpa"):
    from transformers import BertConfig

    return BertConfig(hidden_size=shape.hidden, num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                      num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      attn_implementation=attn_implementation)


def base_state(shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    """fp32 CPU weights of one HF ``BertLayer`` (BERT's init), shared by every variant of a shape."""
    from transformers.models.bert.modeling_bert import BertLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = BertLayer(bert_config(shape))
        # BERT init leaves biases and LayerNorm at 0/1; small random values make the output check meaningful.
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.02)
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def keep_count(n: int, frac: float) -> int:
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"kept fraction must be in [0, 1], got {frac}")
    return min(n, max(1, round(frac * n))) if frac > 0 else 0


def random_mask(n: int, frac: float, seed: int) -> torch.Tensor:
    """0/1 float mask keeping ``round(frac * n)`` entries chosen at random; nested across fractions for a seed."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    mask = torch.zeros(n)
    mask[order[:keep_count(n, frac)]] = 1.0
    return mask


def build_layer(shape: Shape, kind: str, state: dict, *, head_frac: float = 1.0, ffn_frac: float = 1.0,
                mode: str = "inference", dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> nn.Module:
    """One encoder layer of the given kind ("dense-eager", "dense-sdpa", "compacted", "pruned"), set up for ``mode``."""
    from transformers.models.bert.modeling_bert import BertLayer

    if kind not in VARIANT_KINDS:
        raise ValueError(f"unknown variant kind {kind!r}; expected one of {VARIANT_KINDS}")
    config = bert_config(shape, "eager" if kind == "dense-eager" else "sdpa")
    layer = BertLayer(config)
    layer.load_state_dict(state)
    layer.to(device=device, dtype=dtype)
    if kind in ("compacted", "pruned"):
        model = _SingleLayerModel(config, layer)
        patch(model)
        set_masks(model, heads=random_mask(shape.heads, head_frac, seed)[None],
                  ffn=random_mask(shape.ffn, ffn_frac, seed + 1)[None])
        if kind == "compacted":
            compact(model)
        # the pruned layer samples its gates in training (L0 pruning); the compacted one is a plain smaller layer
        set_gate_sampling(model, kind == "pruned" and mode == "training")
        layer = model.layer
    layer.train(mode == "training")
    return layer


def flop_byte_model(shape: Shape, batch: int, seq: int, heads_kept: int, units_kept: int, elem_bytes: int,
                     training: bool) -> tuple[int, int]:
    """(FLOPs, bytes) of one layer call. Bytes: weights + biases of the kept heads/units, plus each op's
    activations in and out; training counts forward + backward as 3x the forward for both."""
    e, tokens = shape.hidden, batch * seq
    inner = heads_kept * shape.head_dim
    flops = attention_flops(batch, seq, e, heads_kept, shape.head_dim) + ffn_flops(batch, seq, e, units_kept)
    attn_bytes = (4 * e * inner + 3 * inner + e) + 2 * tokens * e
    ffn_bytes = (2 * e * units_kept + units_kept + e) + 2 * tokens * e
    nbytes = (attn_bytes + ffn_bytes) * elem_bytes
    factor = 3 if training else 1
    return flops * factor, nbytes * factor


def make_inputs(shape: Shape, batch: int, seq: int, dtype: torch.dtype, device, seed: int, padding: float = 0.0,
                training: bool = False):
    """(hidden states, 4D additive attention mask or None, gradient of the output or None)."""
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(batch, seq, shape.hidden, generator=gen).to(device=device, dtype=dtype)
    mask = None
    if padding > 0:
        pad = min(seq - 1, round(padding * seq))
        mask = torch.zeros(batch, 1, 1, seq, dtype=dtype)
        mask[..., seq - pad:] = torch.finfo(dtype).min
        mask = mask.to(device)
    grad = None
    if training:
        x.requires_grad_(True)
        grad = (torch.randn(batch, seq, shape.hidden, generator=gen) * 0.1).to(device=device, dtype=dtype)
    return x, mask, grad


def make_step(module: Callable, params: list, x: torch.Tensor, mask, grad, training: bool) -> Callable[[], object]:
    """The timed callable: a no_grad forward, or forward + backward with gradients reset to None first."""
    if not training:
        def step():
            with torch.no_grad():
                return module(x, mask)
        return step

    def train_step():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x, mask)
        out.backward(grad)
        return out
    return train_step


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn: Callable, warmup: int, repeats: int, min_time: float = 0.0) -> tuple[list[float], int]:
    """Per-call seconds of ``repeats`` samples (perf_counter, gc off), after ``warmup`` calls; (samples, calls/sample).
    See :func:`structprune.timing.sample` (and :func:`structprune.timing.compare` to alternate two sides)."""
    return timing.sample(fn, warmup=warmup, repeats=repeats, min_time=min_time)


def time_cuda(fn: Callable, warmup: int, repeats: int, timer: str = "auto", grad_to_none=None) -> tuple[list[float], int]:
    """Per-call seconds on CUDA with the L2 cache flushed before each call: ``triton.testing.do_bench``
    (``timer="do_bench"``, time-based warm-up 25 ms / repeats 100 ms) or CUDA events (``"events"``)."""
    if timer in ("auto", "do_bench"):
        try:
            from triton.testing import do_bench
        except ImportError:
            if timer == "do_bench":
                raise
        else:
            try:
                ms = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="all")
            except (TypeError, AssertionError):  # older triton without return_mode="all"
                ms = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.25, 0.5, 0.75])
            return [t / 1e3 for t in ms], 1
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2 (H100: 50 MB)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], 1


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> dict[str, int]:
    """Dynamo's graph-break counts by reason (first line of each reason)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    out: dict[str, int] = {}
    for reason, n in counters["graph_break"].items():
        key = str(reason).strip().splitlines()[0][:160]
        out[key] = out.get(key, 0) + int(n)
    return out


# ----------------------------------------------------------------------------------------------- results
@dataclass
class BenchResult:
    machine: dict
    config: dict
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    files: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> "BenchResult":
        return cls(machine=data["machine"], config=data["config"], rows=data["rows"],
                   skipped=data.get("skipped", []), elapsed_s=data.get("elapsed_s", 0.0))

    def to_json(self) -> dict:
        return {"schema": 1, "machine": self.machine, "config": self.config, "rows": self.rows,
                "skipped": self.skipped, "elapsed_s": round(self.elapsed_s, 2)}

    def table(self) -> str:
        return format_table(self)

    def write(self, out_dir: str | os.PathLike, plots: bool = True) -> list[str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = []
        path = out / "results.json"
        path.write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")
        files.append(str(path))
        path = out / "results.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
        files.append(str(path))
        path = out / "table.txt"
        path.write_text(self.table() + "\n")
        files.append(str(path))
        if plots:
            files += plot_results(self, out)
        self.files = files
        return files


def _fmt(value, spec: str, suffix: str = "") -> str:
    """``format(value, spec) + suffix``, or "-" padded to the same width when there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        width = int(re.match(r"\d*", spec).group() or 1) + len(suffix)
        return "-".rjust(width)
    return format(value, spec) + suffix


def format_table(result: BenchResult) -> str:
    cuda = result.config.get("device", "cpu").startswith("cuda")
    unit, scale = ("TFLOP/s", 1e-3) if cuda else ("GFLOP/s", 1.0)
    m = result.machine
    lines = [f"structprune bench -- {m.get('gpu') or m.get('cpu')} | {m.get('device')} | threads {m.get('threads')} | "
             f"torch {m.get('torch')} | commit {str(m.get('git_commit') or '?')[:10]}"
             f"{' (dirty)' if m.get('git_dirty') else ''}"]
    groups: dict[tuple, list[dict]] = {}
    for row in result.rows:
        groups.setdefault((row["shape"], row["dtype"], row["mode"], row["batch"], row["seq"]), []).append(row)
    header = (f"{'variant':<26} {'heads':>5} {'ffn':>5} {'median ms':>10} {'IQR%':>5} {unit:>8} {'GB/s':>7} "
              f"{'vs dense':>8} {'vs compact':>10} {'ideal':>6} {'%ideal':>6} {'max err':>8}  ran")
    for (shape, dtype, mode, batch, seq), rows in groups.items():
        lines += ["", f"== {shape} {dtype} {mode}  batch {batch} seq {seq} " + "=" * 40, header, "-" * len(header)]
        last_fracs = None
        for r in rows:
            fracs = (r["head_frac"], r["ffn_frac"])
            if last_fracs is not None and fracs != last_fracs:
                lines.append("")
            last_fracs = fracs
            iqr_pct = 100.0 * r["iqr_ms"] / r["median_ms"] if r["median_ms"] else None
            pct_ideal = None if r["fraction_of_ideal"] is None else 100 * r["fraction_of_ideal"]
            lines.append(
                f"{r['variant']:<26} {r['head_frac']:>5.2f} {r['ffn_frac']:>5.2f} {r['median_ms']:>10.3f} "
                f"{_fmt(iqr_pct, '5.1f')} {_fmt(r['gflop_per_s'] * scale, '8.1f')} {_fmt(r['gb_per_s'], '7.1f')} "
                f"{_fmt(r['speedup_vs_dense'], '7.2f', 'x')} {_fmt(r['speedup_vs_compacted'], '9.2f', 'x')} "
                f"{_fmt(r['ideal_speedup'], '5.2f', 'x')} {_fmt(pct_ideal, '5.0f', '%')} "
                f"{_fmt(r['max_abs_err'], '8.1e')}  {r.get('ran_backends') or ''}")
    if result.skipped:
        lines += ["", "skipped:"]
        seen = set()
        for s in result.skipped:
            key = (s["variant"], s.get("mode"), s["reason"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"  {s['variant']} ({s.get('mode') or 'all modes'}): {s['reason']}")
    return "\n".join(lines)


def _compute_ratios(rows: list[dict]) -> None:
    key = lambda r: (r["shape"], r["dtype"], r["mode"], r["batch"], r["seq"])  # noqa: E731
    dense = {key(r) + (r["head_frac"], r["ffn_frac"]): r["median_ms"] for r in rows if r["variant"] == BASELINE}
    dense_flops = {key(r): r["flops"] for r in rows if r["variant"] == BASELINE}
    compacted = {key(r) + (r["head_frac"], r["ffn_frac"]): r["median_ms"] for r in rows if r["variant"] == "compacted"}
    for r in rows:
        d = dense.get(key(r) + (r["head_frac"], r["ffn_frac"])) or dense.get(key(r) + (1.0, 1.0))
        c = compacted.get(key(r) + (r["head_frac"], r["ffn_frac"]))
        full = dense_flops.get(key(r), r["flops_dense"])
        r["speedup_vs_dense"] = d / r["median_ms"] if d else None
        r["speedup_vs_compacted"] = c / r["median_ms"] if c else None
        r["ideal_speedup"] = full / r["flops"] if r["flops"] else None
        r["fraction_of_ideal"] = (r["speedup_vs_dense"] / r["ideal_speedup"]
                                  if r["speedup_vs_dense"] and r["ideal_speedup"] else None)


# ----------------------------------------------------------------------------------------------- plots
def _plain_log_ticks(axis) -> None:
    """Log axis labelled 0.5, 1, 2, 5, 10 rather than 5x10^-1."""
    import matplotlib.ticker as mt

    axis.set_major_locator(mt.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(mt.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mt.NullFormatter())


def plot_results(result: BenchResult, out_dir: Path) -> list[str]:
    """One PNG per (shape, dtype, mode): speedup vs dense-sdpa against the FFN kept fraction, one panel per head
    fraction, plus a panel against the kept FLOP fraction; dashed line = FLOP-proportional ideal."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files = []
    groups: dict[tuple, list[dict]] = {}
    for row in result.rows:
        if row["speedup_vs_dense"] is not None:
            groups.setdefault((row["shape"], row["dtype"], row["mode"]), []).append(row)
    for (shape, dtype, mode), rows in groups.items():
        pruned_rows = [r for r in rows if r["kind"] in ("compacted", "pruned")]
        if not pruned_rows:
            continue
        head_fracs = sorted({r["head_frac"] for r in pruned_rows}, reverse=True)
        variants = list(dict.fromkeys(r["variant"] for r in pruned_rows))
        fig, axes = plt.subplots(1, len(head_fracs) + 1, figsize=(4 * (len(head_fracs) + 1), 3.8), squeeze=False)
        axes = axes[0]
        styles = {}
        for i, v in enumerate(variants):
            if v == "compacted":
                styles[v] = dict(color="0.35", linewidth=2.5, marker="s")
            else:
                styles[v] = dict(color=f"C{i % 10}", linewidth=1.5, marker="o",
                                 linestyle="--" if v.endswith("+compile") else "-")
        for ax, hf in zip(axes, head_fracs):
            sub = [r for r in pruned_rows if r["head_frac"] == hf]
            ideal = sorted({(r["ffn_frac"], r["ideal_speedup"]) for r in sub if r["variant"] == "compacted"}
                           or {(r["ffn_frac"], r["ideal_speedup"]) for r in sub})
            ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k:", linewidth=1.5, label="ideal (FLOP-proportional)")
            for v in variants:
                pts = sorted((r["ffn_frac"], r["speedup_vs_dense"]) for r in sub if r["variant"] == v)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, **styles[v])
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.set_title(f"heads kept {hf:g}")
            ax.set_xlabel("FFN units kept")
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            ax.invert_xaxis()
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(f"speedup vs {BASELINE}")
        ax = axes[-1]
        full = {r["variant"]: r for r in rows if r["variant"] == BASELINE}.get(BASELINE)
        xs = sorted({1.0 / r["ideal_speedup"] for r in pruned_rows if r["ideal_speedup"]})
        ax.plot(xs, [1.0 / x for x in xs], "k:", linewidth=1.5, label="ideal (FLOP-proportional)")
        for v in variants:
            pts = sorted((1.0 / r["ideal_speedup"], r["speedup_vs_dense"]) for r in pruned_rows
                         if r["variant"] == v and r["ideal_speedup"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, **{**styles[v], "linestyle": "none"})
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.invert_xaxis()
        ticks = [t for t in (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02) if xs and min(xs) * 0.9 <= t <= 1.0]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("kept FLOP fraction")
        ax.set_title("all fractions")
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
        batch, seq = rows[0]["batch"], rows[0]["seq"]
        dense_ms = f", {BASELINE} {full['median_ms']:.3g} ms" if full else ""
        where = result.machine.get("gpu") or result.machine.get("cpu")
        fig.suptitle(f"{shape} {dtype} {mode}: batch {batch}, seq {seq} on {where}"
                     f"{dense_ms}", fontsize=10)
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        path = out_dir / f"speedup_{shape}_{dtype}_{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files


# ----------------------------------------------------------------------------------------------- the runner
@contextlib.contextmanager
def use_backend(name: str | None):
    saved = ops.get_backend()
    if name is not None:
        ops.set_backend(name)
    try:
        yield
    finally:
        ops.set_backend(saved)


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
            with use_backend(case.backend):
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


# ----------------------------------------------------------------------------------------------- profiling
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")


def _profile_case(cfg, case: Case, layer: nn.Module, step: Callable, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    out = Path(cfg.profile_dir) / "traces"
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    annotation = None if case.compiled else profiling.annotate_layer(layer, case.variant)
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(cfg.profile_iters):
                with profiling.annotate(f"{case.shape.name}|{case.dtype}|{case.label}"):
                    step()
                _sync(device)
    finally:
        if annotation is not None:
            annotation.remove()
    name = _slug(f"{case.shape.name}_{case.dtype}_{case.mode}_{case.variant}_h{case.head_frac:.2f}_f{case.ffn_frac:.2f}")
    prof.export_chrome_trace(str(out / f"{name}.json"))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(Path(cfg.profile_dir) / "profile.txt", "a") as f:
        f.write(f"\n==== {case.shape.name} {case.dtype} {case.label}\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=15) + "\n")


def _merge_traces(out_dir: Path) -> str | None:
    """Concatenate the per-case Chrome traces into ``trace.json`` (one timeline; open in Perfetto or chrome://tracing)."""
    trace_dir = out_dir / "traces"
    parts = sorted(trace_dir.glob("*.json")) if trace_dir.is_dir() else []
    if not parts:
        return None
    merged: dict = {"traceEvents": []}
    for part in parts:
        try:
            data = json.loads(part.read_text())
        except (OSError, ValueError):
            continue
        events = data.get("traceEvents", []) if isinstance(data, dict) else data
        merged["traceEvents"].extend(events)
        if isinstance(data, dict):
            for k, v in data.items():
                if k != "traceEvents" and k not in merged:
                    merged[k] = v
    path = out_dir / "trace.json"
    path.write_text(json.dumps(merged))
    return str(path)


# ----------------------------------------------------------------------------------------------- CLI
def _fracs(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in [0, 1], got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", nargs="+", default=None, metavar="SHAPE",
                   help=f"layer shapes: {', '.join(SHAPES)} or HIDDENxHEADSxFFN (default bert-base; tiny with --quick)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 128 on CPU, 384 on CUDA)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtypes (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch.set_num_threads (default: the cores this process may use)")
    p.add_argument("--heads-kept", type=_fracs, default=None, metavar="F,F,..",
                   help="kept fractions of attention heads (default 1,0.75,0.5,0.25)")
    p.add_argument("--ffn-kept", type=_fracs, default=None, metavar="F,F,..",
                   help="kept fractions of FFN units (default 1,0.5,0.3,0.1)")
    p.add_argument("--variants", nargs="+", choices=VARIANT_KINDS, default=None,
                   help="variant kinds to run (default all; speedups need dense-sdpa, 'vs compacted' needs compacted)")
    p.add_argument("--backend", nargs="+", choices=ops.BACKENDS, default=None,
                   help="backends for the pruned[...] variants (default: every one available; triton on CPU only when named)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=None, help="inference and/or training (default both)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile of compacted and pruned layers (default on, off with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3 on CPU, 10 on CUDA events)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples (default 10 on CPU, 100 on CUDA events)")
    p.add_argument("--min-time", type=float, default=0.0,
                   help="CPU: seconds per sample; short calls are repeated within a sample to reach it (default 0)")
    p.add_argument("--cuda-timer", choices=("auto", "do_bench", "events"), default="auto",
                   help="CUDA timing: triton.testing.do_bench or CUDA events, both flushing L2 (auto: do_bench if triton)")
    p.add_argument("--padding", type=float, default=0.0,
                   help="fraction of key positions masked as padding (default 0: no attention mask)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and the random masks")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing outputs with the compacted layer")
    p.add_argument("--out", default=None, help="write results.json, results.csv, table.txt and PNG plots here")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="with --out: skip the PNG plots")
    p.add_argument("--profile", action="store_true",
                   help="with --out: torch.profiler Chrome traces of each case (traces/*.json, merged trace.json, profile.txt)")
    p.add_argument("--profile-iters", type=int, default=2, help="calls recorded per case with --profile")
    p.add_argument("--nvtx", action="store_true", help="CUDA: NVTX ranges per op (attention/ffn) while timing, for nsys")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: tiny shape, batch 2, seq 16, fractions {1,0.5}, one warm-up and one repeat, no compile")
    p.add_argument("--strict", action="store_true", help="stop at the first failing case instead of recording it")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    if args.profile and not args.out:
        raise SystemExit("structprune bench: --profile needs --out DIR")
    return BenchConfig(
        shapes=args.shape or (["tiny"] if quick else ["bert-base"]),
        batch=args.batch or (2 if quick else None),
        seq=args.seq or (16 if quick else None),
        dtypes=args.dtype,
        device=args.device,
        threads=args.threads,
        head_fracs=args.heads_kept or (QUICK_FRACS if quick else DEFAULT_HEAD_FRACS),
        ffn_fracs=args.ffn_kept or (QUICK_FRACS if quick else DEFAULT_FFN_FRACS),
        variants=tuple(args.variants or VARIANT_KINDS),
        backends=tuple(args.backend) if args.backend else None,
        compile=(not quick) if args.compile is None else args.compile,
        modes=tuple(args.mode or MODES),
        warmup=args.warmup if args.warmup is not None else (1 if quick else None),
        repeats=args.repeats or (1 if quick else None),
        min_time=args.min_time,
        cuda_timer=args.cuda_timer,
        seed=args.seed,
        padding=args.padding,
        check=args.check,
        profile_dir=args.out if args.profile else None,
        profile_iters=args.profile_iters,
        nvtx=args.nvtx,
        strict=args.strict,
        quiet=args.quiet,
    )


def command(args: argparse.Namespace) -> int:
    os.environ.setdefault("STRUCTPRUNE_QUIET", "1")  # the auto-backend warning is noise here: backends are explicit
    cfg = config_from_args(args)
    if cfg.backends and "triton" in cfg.backends and cfg.resolved_device().type == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton runs CPU tensors only in its interpreter
    if cfg.profile_dir:
        prof_txt = Path(cfg.profile_dir) / "profile.txt"
        if prof_txt.exists():
            prof_txt.unlink()
    def checkpoint(partial: BenchResult) -> None:  # results so far, replaced by the full files at the end
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic.write_json(Path(args.out) / "results.partial.json", {**partial.to_json(), "partial": True}, indent=1)

    result = run_benchmark(cfg, checkpoint if args.out else None)
    if args.out and (Path(args.out) / "results.partial.json").exists():
        (Path(args.out) / "results.partial.json").unlink()
    print(result.table())
    if args.out:
        files = result.write(args.out, plots=args.plot)
        if cfg.profile_dir and (Path(cfg.profile_dir) / "trace.json").exists():
            files.append(str(Path(cfg.profile_dir) / "trace.json"))
        print(f"\nwrote {', '.join(files)}")
    failed = [s for s in result.skipped if s.get("error")]
    print(f"\n{len(result.rows)} rows in {result.elapsed_s:.0f}s" + (f"; {len(failed)} cases failed" if failed else ""))
    return 1 if failed and not result.rows else 0


_DESCRIPTION = ("Time one BERT encoder layer dense, compacted and pruned (per kernel backend, eager and compiled) "
                "over kept fractions of heads and FFN units; see bench/README.md.")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time dense, compacted and pruned BERT layers per backend",
                              description=_DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="structprune bench", description=_DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
