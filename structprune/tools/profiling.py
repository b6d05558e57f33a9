"""Named ranges for profilers: ``torch.profiler`` (Chrome traces) and NVTX (Nsight Systems / Nsight Compute).

    with profiling.annotate("pruned[triton]|h0.50|f0.30"):      # one range, both profilers
        layer(x)
    handle = profiling.annotate_layer(layer, "pruned[triton]")   # ranges ".../attention" and ".../ffn"
    ...
    handle.remove()

``annotate_layer`` works on plain Hugging Face layers and on patched ones alike: it times
``layer.attention`` (a module) with forward hooks and the feed-forward half named by the layer's family
(:attr:`~structprune.model.families.base.Family.ffn_block_name`): hooks when it is a module, a wrapper on the
instance when it is a method. Annotate eager modules only; ranges opened in hooks do not belong inside a
``torch.compile``d graph.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def nvtx_enabled() -> bool:
    return torch.cuda.is_available()


@contextlib.contextmanager
def annotate(name: str, nvtx: bool | None = None):
    """A ``record_function`` range (visible in torch.profiler traces) and, on CUDA, an NVTX range of the same name."""
    use_nvtx = nvtx_enabled() if nvtx is None else (nvtx and nvtx_enabled())
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.autograd.profiler.record_function(name):
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()


class _Range:
    """An open/close pair usable from two hooks (a context manager cannot span them)."""

    def __init__(self, name: str, nvtx: bool):
        self.name = name
        self.nvtx = nvtx
        self._stack: list[contextlib.ExitStack] = []

    def open(self, *_args, **_kwargs):
        stack = contextlib.ExitStack()
        stack.enter_context(annotate(self.name, self.nvtx))
        self._stack.append(stack)

    def close(self, *_args, **_kwargs):
        if self._stack:
            self._stack.pop().close()


class LayerAnnotation:
    """Returned by :func:`annotate_layer`; ``remove()`` restores the layer."""

    def __init__(self, layer: nn.Module, handles: list, wrapped_ffn: str | None):
        self._layer = layer
        self._handles = handles
        self._wrapped_ffn = wrapped_ffn

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._wrapped_ffn and self._wrapped_ffn in self._layer.__dict__:
            delattr(self._layer, self._wrapped_ffn)
        self._wrapped_ffn = None


def annotate_layer(layer: nn.Module, prefix: str, nvtx: bool = False) -> LayerAnnotation:
    """Add ranges ``{prefix}/attention`` and ``{prefix}/ffn`` around the two halves of a transformer layer."""
    from structprune.model.families import family_of_layer

    block = family_of_layer(layer).ffn_block_name
    handles = []
    for half, attr in (("attention", "attention"), ("ffn", block)):
        module = getattr(layer, attr, None)
        if isinstance(module, nn.Module):
            rng = _Range(f"{prefix}/{half}", nvtx)
            handles.append(module.register_forward_pre_hook(rng.open))
            handles.append(module.register_forward_hook(rng.close))
    wrapped = None
    method = getattr(layer, block, None)
    if not isinstance(method, nn.Module) and callable(method) and block not in layer.__dict__:
        name = f"{prefix}/ffn"

        # HF's apply_chunking_to_forward counts the parameters of this function: keep exactly one.
        def ffn_half(attention_output):
            with annotate(name, nvtx):
                return method(attention_output)

        setattr(layer, block, ffn_half)
        wrapped = block
    return LayerAnnotation(layer, handles, wrapped)
