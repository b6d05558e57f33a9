"""The registry of kernel backends: which exist, where they live, and in which order "auto" tries them.

A backend is a module defining ``BACKEND`` (a :class:`structprune.ops.support.Backend`) and one
:func:`register` line. The module is imported on first use, so an optional dependency that is missing (triton,
a C++ compiler) costs nothing until the backend is asked for, and a module that fails to import makes the
backend unavailable with the reason, never an import error of structprune.

"auto" runs, for the tensors at hand, the highest-priority backend that is available on their device, takes
part in "auto" there (``auto_devices``) and reports no reason against the inputs; the "torch" reference
(priority 0) runs when none does.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from structprune.ops.support import Backend


@dataclass(frozen=True)
class Registration:
    name: str
    module: str  # import path of the module defining BACKEND
    priority: int  # "auto" tries higher first
    auto_devices: tuple  # device types on which "auto" considers it
    how_to_enable: str  # said when an explicit request finds it unavailable


_registry: dict[str, Registration] = {}
_loaded: dict[str, Backend] = {}
_errors: dict[str, str] = {}
_orders: dict[str, list] = {}  # device type -> auto_order, until the next register()


def register(name: str, module: str, priority: int, auto_devices: tuple = ("cpu", "cuda"),
             how_to_enable: str = "") -> None:
    """Add backend ``name``, defined by ``BACKEND`` in ``module`` (imported on first use)."""
    if name == "auto":
        raise ValueError("'auto' is not a backend name: it chooses among the registered backends")
    _registry[name] = Registration(name, module, int(priority), tuple(auto_devices), how_to_enable)
    _loaded.pop(name, None)
    _errors.pop(name, None)
    _orders.clear()


def names() -> tuple[str, ...]:
    """Every registered backend, in registration order ("torch" first)."""
    return tuple(_registry)


def registration(name: str) -> Registration:
    if name not in _registry:
        raise ValueError(f"unknown backend {name!r}; expected one of {names() + ('auto',)}")
    return _registry[name]


def load(name: str) -> Backend | None:
    """The backend object of ``name``, or None when its module failed to load (:func:`load_error` says why)."""
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    reg = registration(name)
    try:
        backend = importlib.import_module(reg.module).BACKEND
    except Exception as exc:  # a missing optional dependency or a failed build
        _errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    if not isinstance(backend, Backend) or backend.name != name:
        _errors[name] = f"{reg.module}.BACKEND is not a Backend named {name!r} (got {backend!r:.80})"
        return None
    _loaded[name] = backend
    return backend


def load_error(name: str) -> str | None:
    """Why backend ``name`` failed to load, or None (also when it was not loaded yet)."""
    return _errors.get(name)


def module(name: str):
    """The Python module behind backend ``name`` (for its extras, e.g. ``attention_dropout_scale``), or None."""
    backend = load(name)
    return None if backend is None else backend.module


def availability(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else the reason it cannot."""
    backend = load(name)
    if backend is None:
        return f"{name} backend failed to load ({_errors[name]})"
    return backend.availability(device)


def auto_order(device_type: str) -> list[str]:
    """The backends "auto" considers on ``device_type``, highest priority first (the reference not included)."""
    if device_type not in _orders:
        regs = [r for r in _registry.values() if r.name != "torch" and device_type in r.auto_devices]
        _orders[device_type] = [r.name for r in sorted(regs, key=lambda r: -r.priority)]
    return list(_orders[device_type])


register("torch", "structprune.backends.pytorch", priority=0)
register("triton", "structprune.backends.triton", priority=30, auto_devices=("cuda",),
         how_to_enable="install triton and use CUDA tensors (or set TRITON_INTERPRET=1 before importing to run on "
                       "CPU)")
register("cpp", "structprune.backends.cpp.ops", priority=20,
         how_to_enable="install a C++ compiler and ninja so the extension can be JIT-built, or reinstall with "
                       "`pip install --no-build-isolation .`; see `structprune info`")
