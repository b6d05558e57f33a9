"""pytest-benchmark suites of structprune layers. Sizes come from environment variables, so CI can run a
smoke pass in seconds and a person can run the real thing:

    STRUCTPRUNE_BENCH_SHAPE    tiny (default) | bert-base | bert-large | HIDDENxHEADSxFFN
    STRUCTPRUNE_BENCH_BATCH    batch size (default 2 for tiny, else 8 on CPU / 32 on CUDA)
    STRUCTPRUNE_BENCH_SEQ      sequence length (default 16 for tiny, else 128 on CPU / 384 on CUDA)
    STRUCTPRUNE_BENCH_DTYPE    fp32 (default on CPU) | fp16 (default on CUDA) | bf16
    STRUCTPRUNE_BENCH_DEVICE   cpu | cuda (default: cuda when available)
    STRUCTPRUNE_BENCH_THREADS  torch.set_num_threads on CPU (default: usable cores)
    STRUCTPRUNE_BENCH_FRACS    quick (default: 1/1, 0.5/0.5, 0.25/0.1) | all (4 x 4 grid) | "h/f,h/f,..."
    STRUCTPRUNE_BENCH_MODES    inference,training (default both)
    STRUCTPRUNE_BENCH_ROUNDS   fixed rounds via benchmark.pedantic (default 1 for tiny; else pytest-benchmark calibrates)
    STRUCTPRUNE_BENCH_COMPILE  1: also time torch.compile of compacted and pruned layers
    STRUCTPRUNE_BENCH_TRITON_CPU 1: run the triton backend on CPU (interpreter; very slow)

This directory is outside ``testpaths``: run it explicitly, ``pytest bench/ --benchmark-only``.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("STRUCTPRUNE_QUIET", "1")
if os.environ.get("STRUCTPRUNE_BENCH_TRITON_CPU") == "1" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton


class Settings:
    def __init__(self):
        from structprune import benchmark as bm

        env = os.environ.get
        self.device = torch.device(env("STRUCTPRUNE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.shape = bm.parse_shape(env("STRUCTPRUNE_BENCH_SHAPE", "tiny"))
        tiny = self.shape.name == "tiny"
        defaults = bm.DEFAULTS[self.device.type]
        self.batch = int(env("STRUCTPRUNE_BENCH_BATCH") or (2 if tiny else defaults["batch"]))
        self.seq = int(env("STRUCTPRUNE_BENCH_SEQ") or (16 if tiny else defaults["seq"]))
        self.dtype = env("STRUCTPRUNE_BENCH_DTYPE") or defaults["dtypes"][0]
        if self.dtype not in bm.DTYPES:
            raise pytest.UsageError(f"STRUCTPRUNE_BENCH_DTYPE must be one of {sorted(bm.DTYPES)}, got {self.dtype!r}")
        self.threads = int(env("STRUCTPRUNE_BENCH_THREADS") or len(os.sched_getaffinity(0)))
        fracs = env("STRUCTPRUNE_BENCH_FRACS", "quick")
        if fracs == "quick":
            self.fracs = [(1.0, 1.0), (0.5, 0.5), (0.25, 0.1)]
        elif fracs == "all":
            self.fracs = [(h, f) for h in bm.DEFAULT_HEAD_FRACS for f in bm.DEFAULT_FFN_FRACS]
        else:
            self.fracs = [tuple(float(v) for v in pair.split("/")) for pair in fracs.split(",")]
        self.modes = [m.strip() for m in env("STRUCTPRUNE_BENCH_MODES", "inference,training").split(",")]
        rounds = env("STRUCTPRUNE_BENCH_ROUNDS")
        self.rounds = int(rounds) if rounds else (1 if tiny else None)
        self.compile = env("STRUCTPRUNE_BENCH_COMPILE") == "1"
        self.triton_cpu = env("STRUCTPRUNE_BENCH_TRITON_CPU") == "1"

    def describe(self) -> str:
        return (f"structprune bench: shape {self.shape.name} ({self.shape.hidden}/{self.shape.heads}/{self.shape.ffn}), "
                f"batch {self.batch}, seq {self.seq}, {self.dtype} on {self.device}, threads {self.threads}, "
                f"rounds {self.rounds or 'auto'}, compile {self.compile}")


SETTINGS = Settings()


def pytest_report_header(config):
    return SETTINGS.describe()


@pytest.fixture(scope="session")
def settings():
    if SETTINGS.device.type == "cpu":
        torch.set_num_threads(SETTINGS.threads)
    return SETTINGS


@pytest.fixture(autouse=True)
def _restore_backend():
    import structprune.ops.dispatch as ops

    saved = ops.get_backend()
    yield
    ops.set_backend(saved)
