"""Save and load patched (and possibly compacted) models: HF config + safetensors + per-layer shapes."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from structprune import atomic
from structprune._version import __version__
from structprune.atomic import CorruptFileError
from structprune.model.cofi import hidden_gate
from structprune.model.compaction import slice_hidden, slice_layer
from structprune.model.families import Family, family_for_type, family_of
from structprune.model.patching import layer_parts, patch

STRUCTPRUNE_CONFIG = "structprune_config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
MODELING_FILE = "modeling_structprune.py"
_MODELING_TEMPLATE = Path(__file__).with_name("templates") / MODELING_FILE
_AUTO_CLASSES = {"Model": "AutoModel", "ForQuestionAnswering": "AutoModelForQuestionAnswering",
                 "ForSequenceClassification": "AutoModelForSequenceClassification",
                 "ForTokenClassification": "AutoModelForTokenClassification", "ForMaskedLM": "AutoModelForMaskedLM",
                 "ForMultipleChoice": "AutoModelForMultipleChoice", "ForPreTraining": "AutoModelForPreTraining",
                 "ForNextSentencePrediction": "AutoModelForNextSentencePrediction", "ForCausalLM": "AutoModelForCausalLM"}
_STANDALONE_KEYS = ("auto_map", "structprune_heads_per_layer", "structprune_ffn_units_per_layer",
                    "structprune_hidden_size", "structprune_skip_attention", "structprune_skip_ffn",
                    "structprune_kv_heads_per_layer", "structprune_kv_index_per_layer", "structprune_modeling_version")


def modeling_version() -> str:
    """Version of the plain-PyTorch modeling file template (also written to ``config.json``)."""
    m = re.search(r'^STRUCTPRUNE_MODELING_VERSION = "([^"]+)"', _MODELING_TEMPLATE.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"{_MODELING_TEMPLATE} has no STRUCTPRUNE_MODELING_VERSION")
    return m.group(1)


def is_standalone_exportable(model: nn.Module) -> bool:
    """True when every kept gate is exactly 1 and nothing is masked (a compacted model, or one with nothing
    pruned): the model then computes what plain Hugging Face layers of its per-layer sizes compute."""
    gates = [gate for parts in layer_parts(model) for gate in parts.gates]
    gate = hidden_gate(model)
    subs = [g for parts in layer_parts(model) for g in parts.all_gates[2:]]  # may be closed: a skipped sublayer
    return (all(bool(torch.all(g.mask == 1)) and g.is_fully_open() for g in gates + ([gate] if gate else []))
            and all(bool(g.mask.item() == 0) or g.is_fully_open() for g in subs))


def _standalone_config(model: nn.Module, structure: dict):
    """A copy of ``model.config`` with the per-layer sizes and the ``auto_map`` of the modeling file, or
    without them when the model still has gates to apply (see :func:`is_standalone_exportable`)."""
    config = copy.deepcopy(model.config)
    for key in _STANDALONE_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    if not is_standalone_exportable(model):
        return config, False
    family = family_of(model).class_prefixes[structure["model_type"]]
    template = _MODELING_TEMPLATE.read_text()  # the classes it defines: its _BASES
    config.auto_map = {auto: f"{MODELING_FILE[:-3]}.Pruned{family}{suffix}"
                       for suffix, auto in _AUTO_CLASSES.items() if f'"{family}{suffix}"' in template}
    config.structprune_heads_per_layer = structure["heads_per_layer"]
    config.structprune_ffn_units_per_layer = structure["ffn_units_per_layer"]
    if structure.get("hidden_kept") is not None:
        config.structprune_hidden_size = structure["hidden_kept"]
    if structure.get("attn_sublayers_kept") is not None:
        config.structprune_skip_attention = [not k for k in structure["attn_sublayers_kept"]]
        config.structprune_skip_ffn = [not k for k in structure["ffn_sublayers_kept"]]
    if "kv_heads_per_layer" in structure:  # grouped-query attention: each layer's KV heads and head -> KV-head map
        config.structprune_kv_heads_per_layer = structure["kv_heads_per_layer"]
        config.structprune_kv_index_per_layer = [p.kv_index.tolist() for p in layer_parts(model)]
    config.structprune_modeling_version = modeling_version()
    return config, True


def _structure(model: nn.Module) -> dict:
    parts = layer_parts(model)
    structure = {
        "format_version": FORMAT_VERSION,
        "structprune_version": __version__,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "heads_per_layer": [p.num_heads for p in parts],
        "ffn_units_per_layer": [p.unit_gate.n for p in parts],
        "gate_sampling": [p.head_gate.sampling for p in parts],
        **_full_structure(model, parts),
    }
    if all(p.kv_index is not None for p in parts):
        structure["kv_heads_per_layer"] = [p.num_kv_heads for p in parts]
    return structure


def _full_structure(model: nn.Module, parts) -> dict:
    """The sublayer and hidden-dimension gates' part of the structure record (empty without them)."""
    out = {}
    gate = hidden_gate(model)
    if gate is not None:
        out["hidden_kept"] = gate.n  # the width the tensors have (all of it, unless compacted)
    subs = [(p.get("attn_sublayer_gate"), p.get("ffn_sublayer_gate")) for p in parts]
    if subs and all(a is not None and f is not None for a, f in subs):
        out["attn_sublayers_kept"] = [bool(a.mask.item() != 0) for a, _ in subs]
        out["ffn_sublayers_kept"] = [bool(f.mask.item() != 0) for _, f in subs]
    return out


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False,
                    tokenizer=None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (gates included) and ``structprune_config.json``.

    For a compacted model (every kept gate exactly 1, see :func:`is_standalone_exportable`) it also writes
    ``modeling_structprune.py`` (plain PyTorch) and an ``auto_map`` in ``config.json``, so that
    ``transformers.AutoModelFor<Task>.from_pretrained(directory, trust_remote_code=True)`` loads the model
    without structprune. A model that still has masked or fractional gates gets neither: compact it first.

    The files are written to a temporary directory, fsynced, and swapped in by renames, so a crash or a
    failed save never leaves a half-written model: the previous one stays readable. A non-empty directory
    that is not a structprune save is refused unless
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
        config, standalone = _standalone_config(model, structure)
        config.save_pretrained(tmp)
        if standalone:
            shutil.copyfile(_MODELING_TEMPLATE, tmp / MODELING_FILE)
        save_model(model, str(tmp / WEIGHTS))
        atomic.set_default_mode(tmp / WEIGHTS)  # safetensors writes 0600
        (tmp / STRUCTPRUNE_CONFIG).write_text(json.dumps(structure, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _backup(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def _swap_in(tmp: Path, target: Path) -> None:
    """Make the fully written ``tmp`` the model directory ``target``: files of ``target`` the save does not
    replace are carried over, everything is fsynced, then ``target`` is renamed to a backup, ``tmp`` to
    ``target``, and the backup removed. A crash between the two renames leaves the backup, which
    :func:`from_pretrained` falls back to; at any point one complete model is readable."""
    backup = _backup(target)
    # the previous version: the directory, or the backup of a save interrupted between its renames
    previous = target if target.exists() else backup if backup.is_dir() else None
    mode = (previous.stat().st_mode if previous is not None else 0o777 & ~_umask()) & 0o7777
    if previous is not None:
        for item in previous.iterdir():
            if not (tmp / item.name).exists():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    os.chmod(tmp, mode)  # mkdtemp made it 0700
    atomic.fsync_tree(tmp)
    if target.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(target, backup)
    os.replace(tmp, target)
    atomic.fsync_dir(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _umask() -> int:
    return atomic.umask()


# Upper bounds of "not absurd" for a BERT-family config (far above any released model), by size name.
_LIMITS = {"hidden": 1 << 16, "heads": 1 << 10, "layers": 1 << 10, "intermediate": 1 << 20}
_COMMON_LIMITS = {"vocab_size": 1 << 24, "max_position_embeddings": 1 << 20}
_MAX_HEADER = 100 << 20  # bytes of a safetensors JSON header


def _int_list(meta: dict, key: str, path: Path, n: int | None = None) -> list[int]:
    value = meta.get(key)
    if (not isinstance(value, list) or (n is not None and len(value) != n)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        want = f"a list of {n} " if n is not None else "a list of "
        raise CorruptFileError(f"{path}: {key} should be {want}non-negative ints, found {value!r}")
    return value


def _check_meta(meta: dict, path: Path) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')!r}; this structprune "
                         f"reads version {FORMAT_VERSION}")
    for key in ("architecture", "model_type"):
        if not isinstance(meta.get(key), str):
            raise CorruptFileError(f"{path}: {key} should be a string, found {meta.get(key)!r}")
    heads = _int_list(meta, "heads_per_layer", path)
    _int_list(meta, "ffn_units_per_layer", path, len(heads))
    hidden = meta.get("hidden_kept")
    if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 0):
        raise CorruptFileError(f"{path}: hidden_kept should be a non-negative int, found {hidden!r}")
    for key in ("attn_sublayers_kept", "ffn_sublayers_kept"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != len(heads)
                                  or not all(isinstance(v, bool) for v in value)):
            raise CorruptFileError(f"{path}: {key} should be a list of {len(heads)} booleans, found {value!r}")
    if "kv_heads_per_layer" in meta:
        _int_list(meta, "kv_heads_per_layer", path, len(heads))
    sampling = meta.get("gate_sampling")
    if not isinstance(sampling, list) or len(sampling) != len(heads) or not all(isinstance(v, bool) for v in sampling):
        raise CorruptFileError(f"{path}: gate_sampling should be a list of {len(heads)} booleans, found {sampling!r}")


def _check_config(config: dict, meta: dict, path: Path, meta_path: Path) -> Family:
    """Sizes in ``config.json`` positive, below ``_LIMITS`` and consistent with ``structprune_config.json``;
    returns the model's family."""
    if config.get("model_type") != meta["model_type"]:
        raise ValueError(f"{path} has model_type {config.get('model_type')!r} but {meta_path} says "
                         f"{meta['model_type']!r}; the two files come from different models")
    try:
        family = family_for_type(meta["model_type"])
    except TypeError as exc:
        raise ValueError(f"{meta_path}: {exc}") from None
    keys = family.config_keys
    for key, limit in [(keys[size], limit) for size, limit in _LIMITS.items()] + list(_COMMON_LIMITS.items()):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise CorruptFileError(f"{path}: {key} should be an int in [1, {limit}], found {value!r}")
    sizes = family.sizes(config)
    if sizes.explicit_head_dim is None and sizes.hidden % sizes.heads:
        raise CorruptFileError(f"{path}: {keys['hidden']} {sizes.hidden} is not a multiple of {keys['heads']} "
                               f"{sizes.heads}")
    layers = len(meta["heads_per_layer"])
    if sizes.layers != layers:
        raise ValueError(f"{meta_path} describes {layers} layers, {path} has {keys['layers']} {sizes.layers}")
    if meta.get("hidden_kept") is not None and meta["hidden_kept"] > sizes.hidden:
        raise ValueError(f"{meta_path}: keeps {meta['hidden_kept']} hidden dimensions, more than {path}'s "
                         f"{keys['hidden']} {sizes.hidden}")
    for i, (h, u) in enumerate(zip(meta["heads_per_layer"], meta["ffn_units_per_layer"])):
        if h > sizes.heads or u > sizes.intermediate:
            raise ValueError(f"{meta_path}: layer {i} keeps {h} heads and {u} FFN units, more than {path} allows "
                             f"({sizes.heads} heads, {keys['intermediate']} {sizes.intermediate})")
    if family.grouped_kv != ("kv_heads_per_layer" in meta):
        raise CorruptFileError(f"{meta_path}: kv_heads_per_layer is {'missing' if family.grouped_kv else 'unexpected'}"
                               f" for model_type {meta['model_type']!r}")
    for i, kv in enumerate(meta.get("kv_heads_per_layer", [])):
        if kv > (sizes.kv_heads or sizes.heads) or kv > max(meta["heads_per_layer"][i], 1) or \
                (kv == 0) != (meta["heads_per_layer"][i] == 0):
            raise ValueError(f"{meta_path}: layer {i} keeps {kv} KV heads for {meta['heads_per_layer'][i]} heads "
                             f"(the config has {sizes.kv_heads} KV heads)")
    return family


def _safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's size (truncation, garbage)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptFileError(f"{path} is truncated ({size} bytes): no safetensors header")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise CorruptFileError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                                   f"the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{path} has a corrupted safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path} has a corrupted safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path} has a corrupted safetensors header (entry {name!r})") from exc
        if not 0 <= begin <= stop or any(d < 0 for d in shape):
            raise CorruptFileError(f"{path} has a corrupted safetensors header (entry {name!r}: {info})")
        end = max(end, stop)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its header says (corrupted)"
        raise CorruptFileError(f"{path} is {what}: the header describes {8 + n + end} bytes, the file has {size}")
    return header


def _expected_layer_shapes(family: Family, hidden: int, head_dim: int, heads: int, units: int,
                           kv_heads: int | None = None) -> dict:
    """Tensor name inside a layer -> the shape a save with ``heads`` heads and ``units`` FFN units gives it."""
    if kv_heads is None:
        return family.layer_shapes(hidden, head_dim, heads, units)
    return family.layer_shapes(hidden, head_dim, heads, units, kv_heads=kv_heads)


def _check_weights(header: dict, family: Family, config: dict, meta: dict, path: Path) -> None:
    """Every per-layer tensor in the weights file has the shape the two configs give it."""
    sizes = family.sizes(config)
    layers = len(meta["heads_per_layer"])
    layer_tensor = re.compile(rf"(?:^|\.){re.escape(family.layers_path)}\.(\d+)\.(.+)$")
    for name, info in header.items():
        m = layer_tensor.search(name)
        if m is None:
            continue
        i = int(m.group(1))
        if i >= layers:
            raise ValueError(f"{path} holds {name} but the configs describe {layers} layers")
        width = meta["hidden_kept"] if meta.get("hidden_kept") is not None else sizes.hidden
        kv = meta["kv_heads_per_layer"][i] if "kv_heads_per_layer" in meta else None
        want = _expected_layer_shapes(family, width, sizes.head_dim, meta["heads_per_layer"][i],
                                      meta["ffn_units_per_layer"][i], kv).get(m.group(2))
        if want is not None and tuple(info["shape"]) != want:
            raise ValueError(f"{path}: {name} has shape {tuple(info['shape'])}, the configs say {want} "
                             "(files from different saves?)")


def _model_dir(directory: Path) -> Path:
    """``directory``, or the backup left by a save interrupted between its renames (see :func:`_swap_in`)."""
    if not (directory / STRUCTPRUNE_CONFIG).is_file() and (_backup(directory) / STRUCTPRUNE_CONFIG).is_file():
        warnings.warn(f"{directory} is incomplete (a save was interrupted); loading the previous version from "
                      f"{_backup(directory)}", stacklevel=3)
        return _backup(directory)
    return directory


def from_pretrained(directory: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model written by :func:`save_pretrained`, per-layer shapes and gate state included.

    Only safetensors are read (no pickle). ``structprune_config.json``, ``config.json`` and the weights file's
    header are validated against each other before anything is allocated; a missing, truncated or corrupted
    file raises an error naming it (:class:`~structprune.atomic.CorruptFileError`, a ``ValueError``).
    """
    directory = _model_dir(Path(directory))
    meta_path, config_path, weights = directory / STRUCTPRUNE_CONFIG, directory / "config.json", directory / WEIGHTS
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (the model folder does not exist)" if not
                                directory.exists() else f"{directory} is a file, not a model directory")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a structprune model directory: {STRUCTPRUNE_CONFIG} is missing "
                                "(save with structprune.save_pretrained)")
    meta = atomic.read_json(meta_path, "structprune model description")
    _check_meta(meta, meta_path)
    config_dict = atomic.read_json(config_path, "model config")
    family = _check_config(config_dict, meta, config_path, meta_path)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    _check_weights(_safetensors_header(weights), family, config_dict, meta, weights)
    model_cls = getattr(transformers, meta["architecture"], None)
    if model_cls is None:
        raise ValueError(f"unknown architecture {meta['architecture']!r} in {meta_path}")
    config = transformers.AutoConfig.from_pretrained(directory)
    model = model_cls(config)
    patch(model, sublayers=meta.get("attn_sublayers_kept") is not None, hidden=meta.get("hidden_kept") is not None)
    parts = layer_parts(model)
    if len(parts) != len(meta["heads_per_layer"]):
        raise ValueError(f"{meta_path} describes {len(meta['heads_per_layer'])} layers, config has {len(parts)}")
    kv_heads = meta.get("kv_heads_per_layer", [None] * len(parts))
    for layer, heads, units, sampling, kv in zip(parts, meta["heads_per_layer"], meta["ffn_units_per_layer"],
                                                 meta["gate_sampling"], kv_heads):
        slice_layer(layer, torch.arange(heads), torch.arange(units),  # values (and a decoder's head -> KV-head
                    None if kv is None else torch.arange(kv))  # map) are loaded below
        for gate in layer.all_gates:
            gate.sampling = sampling
    if meta.get("hidden_kept") is not None:
        slice_hidden(model, torch.arange(meta["hidden_kept"]))
        hidden_gate(model).sampling = bool(meta["gate_sampling"][0]) if meta["gate_sampling"] else False
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:  # a bad file, a strict-load mismatch
        raise CorruptFileError(f"{weights} cannot be loaded: {' '.join(str(exc).split())}") from exc
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model
