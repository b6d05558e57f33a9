"""What a run ran on: CPU/GPU, versions, commit, available backends -- the one collector behind ``structprune info``,
every benchmark result and the latency tables' cache keys."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from structprune.ops import dispatch as ops


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]  # the repository (structprune/tools/machine.py)
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
    """Everything a result depends on besides its own inputs, for ``device``."""
    from structprune._version import __version__

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": version("transformers"),
        "triton": version("triton"),
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
