"""Save and load patched (and possibly compacted) models: HF config + safetensors + per-layer shapes."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn

from . import __version__
from .compaction import _select_linear
from .patching import gated_layers, patch

STRUCTPRUNE_CONFIG = "structprune_config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def _structure(model: nn.Module) -> dict:
    layers = gated_layers(model)
    return {
        "format_version": FORMAT_VERSION,
        "structprune_version": __version__,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "heads_per_layer": [layer.attention.self.num_heads for layer in layers],
        "ffn_units_per_layer": [layer.intermediate.unit_gate.n for layer in layers],
        "gate_sampling": [layer.attention.self.head_gate.sampling for layer in layers],
    }


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False,
                    tokenizer=None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (gates included) and ``structprune_config.json``.

    The files are written to a temporary directory first and moved in place, so a failed save never
    leaves a half-written model. A non-empty directory that is not a structprune save is refused unless
    ``overwrite=True``.
    """
    target = Path(save_directory)
    if target.exists() and any(target.iterdir()) and not (target / STRUCTPRUNE_CONFIG).exists() and not overwrite:
        raise FileExistsError(f"{target} is not empty and does not hold a structprune model; refusing to write "
                              "into it (pass overwrite=True to replace its model files)")
    structure = _structure(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".structprune-", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS))
        (tmp / STRUCTPRUNE_CONFIG).write_text(json.dumps(structure, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        target.mkdir(exist_ok=True)
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resize_layer(layer: nn.Module, heads: int, units: int) -> None:
    """Shrink a freshly built gated layer to the saved shapes (values are loaded afterwards)."""
    attn = layer.attention.self
    index = torch.arange(heads)
    rows = torch.arange(heads * attn.head_dim)
    attn.query = _select_linear(attn.query, rows=rows)
    attn.key = _select_linear(attn.key, rows=rows)
    attn.value = _select_linear(attn.value, rows=rows)
    layer.attention.output.dense = _select_linear(layer.attention.output.dense, cols=rows)
    attn.num_heads = heads
    attn.head_gate.keep_only_(index)
    unit_index = torch.arange(units)
    layer.intermediate.dense = _select_linear(layer.intermediate.dense, rows=unit_index)
    layer.output.dense = _select_linear(layer.output.dense, cols=unit_index)
    layer.intermediate.unit_gate.keep_only_(unit_index)


def from_pretrained(directory: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model written by :func:`save_pretrained`, per-layer shapes and gate state included.

    Only safetensors are read (no pickle).
    """
    directory = Path(directory)
    meta_path = directory / STRUCTPRUNE_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a structprune model directory: {STRUCTPRUNE_CONFIG} is missing "
                                "(save with structprune.save_pretrained)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta.get('format_version')!r}; this structprune "
                         f"reads version {FORMAT_VERSION}")
    if not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{directory / WEIGHTS} is missing")
    config = transformers.AutoConfig.from_pretrained(directory)
    model_cls = getattr(transformers, meta["architecture"], None)
    if model_cls is None:
        raise ValueError(f"unknown architecture {meta['architecture']!r} in {meta_path}")
    model = model_cls(config)
    patch(model)
    layers = gated_layers(model)
    if len(layers) != len(meta["heads_per_layer"]):
        raise ValueError(f"{meta_path} describes {len(meta['heads_per_layer'])} layers, config has {len(layers)}")
    for layer, heads, units, sampling in zip(layers, meta["heads_per_layer"], meta["ffn_units_per_layer"],
                                             meta["gate_sampling"]):
        _resize_layer(layer, heads, units)
        layer.attention.self.head_gate.sampling = sampling
        layer.intermediate.unit_gate.sampling = sampling
    load_model(model, str(directory / WEIGHTS), strict=True)
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model
