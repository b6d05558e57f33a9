"""What ``structprune bench`` runs: layer shapes, variants, modes, dtypes, per-device defaults, one case."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


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
# ModernBERT-shaped layers (GLU FFN of ``ffn`` units, rotary positions, global and local attention): timed by
# :mod:`structprune.benchmark.modernbert` (paired, interleaved ratios), not by the BERT-layer runner.
MODERNBERT_SHAPES = {
    "modernbert-base": Shape("modernbert-base", 768, 12, 1152),
    "modernbert-tiny": Shape("modernbert-tiny", 64, 4, 48),
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
