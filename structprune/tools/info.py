"""``structprune info``: versions, devices and which kernel backends can run (paste it into bug reports)."""
from __future__ import annotations

import os
import platform

import torch


def collect() -> dict:
    from structprune._version import __version__
    from structprune.ops import dispatch as ops
    from structprune.tools.machine import cpu_model, version

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "structprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "triton": version("triton"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "requested_backend": ops.get_backend(),
        "backends": {d: {b: ops.availability(b, d) or "available" for b in ops.BACKENDS} for d in devices},
        "auto_picks": {d: ops.resolve_backend(d) for d in devices},
        "cpp_extension": _cpp_build_info(),
    }


def _cpp_build_info():
    try:
        from structprune.backends.cpp import ops as _extension
    except Exception as exc:
        return f"unavailable ({type(exc).__name__}: {exc})"
    return _extension.build_info() if _extension.load_error() is None else _extension.load_error()


def run(args) -> int:
    for key, value in collect().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, devices and available kernel backends")
    p.set_defaults(func=run)
