"""Checkpoints of :func:`structprune.qa.train.train_qa`: what a resumed run reloads, written crash-safely.

``output_dir/checkpoint/`` holds the model, optimizer, scheduler, RNG states, the optimizer parameters outside
the model (the L0 multipliers) and ``state.json``; it is written to ``checkpoint.tmp``, fsynced and renamed in,
so an interrupted save leaves the previous one usable, and a damaged one is reported with what is wrong.
``output_dir/best/`` keeps the weights of the best evaluation; ``log.jsonl`` the run's log lines.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch
import torch

CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
LOG_FILE = "log.jsonl"
EXTRA_PARAMS = "extra_params.safetensors"  # checkpointed optimizer parameters outside the model (L0 multipliers)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


def _checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with the checkpoint folder ``ckpt`` (a missing, truncated or corrupted file), or None.
    Cheap: JSON parsed, safetensors header checked against the file size, torch zip directories read."""
    import zipfile

    from structprune.model.io import _safetensors_header

    optional = (EXTRA_PARAMS,) if (ckpt / EXTRA_PARAMS).exists() else ()
    for name in _CHECKPOINT_FILES + optional:
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            if name == "state.json":
                state = json.loads(path.read_text())
                if not isinstance(state, dict) or not {"step", "settings"} <= set(state):
                    return f"{path} lacks step/settings"
            elif name.endswith(".safetensors"):
                _safetensors_header(path)
            else:
                with zipfile.ZipFile(path) as z:
                    z.namelist()
        except (ValueError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            return f"{path} is truncated or corrupted ({exc})"
    return None


def _find_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: ``checkpoint/``, else ``checkpoint.old/`` (left by a save interrupted
    between its renames); None when there is none. A damaged one raises an error naming the bad file."""
    problems = []
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        ckpt = output_dir / name
        if not ckpt.is_dir():
            continue
        problem = _checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        problems.append(problem)
    if problems:
        from structprune.atomic import CorruptFileError

        raise CorruptFileError(f"cannot resume from {output_dir}: {'; '.join(problems)}; delete "
                               f"{output_dir / CHECKPOINT_DIR} to start over")
    return None


def checkpoint_state(output_dir: str | os.PathLike) -> dict | None:
    """The ``state.json`` of the checkpoint in ``output_dir`` (``step``, ``total_steps``, ``finished``,
    ``elapsed``, ``settings``), or ``None`` when there is none."""
    ckpt = _find_checkpoint(Path(output_dir))
    return None if ckpt is None else json.loads((ckpt / "state.json").read_text())


def load_checkpoint_weights(model: torch.nn.Module, output_dir: str | os.PathLike, device=None) -> torch.nn.Module:
    """Load the model weights of the checkpoint in ``output_dir`` into ``model`` (same architecture)."""
    ckpt = _find_checkpoint(Path(output_dir))
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {output_dir} (expected {CHECKPOINT_DIR}/state.json)")
    device = device if device is not None else _model_device(model)
    safetensors.torch.load_model(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
    return model


def _extra_params(model, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's parameters that are not the model's (e.g. L0 Lagrange multipliers), keyed by
    ``"<group>.<index>"``: their values are checkpointed beside the model's."""
    own = {id(p) for p in model.parameters()}
    return {f"{g}.{i}": p for g, group in enumerate(optimizer.param_groups)
            for i, p in enumerate(group["params"]) if id(p) not in own}


def _load_extra_params(ckpt: Path, model, optimizer) -> None:
    """Restore the values :func:`_extra_params` names from ``ckpt`` (written by :func:`_save_checkpoint`)."""
    params = _extra_params(model, optimizer)
    path = ckpt / EXTRA_PARAMS
    if not params:
        return
    if not path.is_file():  # a checkpoint from before they were saved: resume, but say it is not exact
        import warnings

        warnings.warn(f"{ckpt} holds no {EXTRA_PARAMS}: the optimizer's {len(params)} parameters outside the model "
                      "(e.g. L0 multipliers) keep their current values, so this resume is not exact", stacklevel=3)
        return
    saved = safetensors.torch.load_file(str(path))
    with torch.no_grad():
        for key, p in params.items():
            if key not in saved or saved[key].shape != p.shape:
                got = tuple(saved[key].shape) if key in saved else "missing"
                raise ValueError(f"{path} does not match the optimizer's parameters outside the model "
                                 f"({key}: {got} vs {tuple(p.shape)})")
            p.copy_(saved[key])


def _swap_dir(output_dir: Path, name: str, write: Callable[[Path], None]) -> None:
    """Write ``output_dir/name`` whole or not at all: ``write`` fills ``name.tmp``, which is fsynced and swapped in
    by renames (the previous version stays as ``name.old`` until the new one is in place)."""
    from structprune import atomic

    tmp, final, old = (output_dir / (name + suffix) for suffix in (".tmp", "", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    atomic.set_default_mode(*(p for p in tmp.rglob("*") if p.is_file()))  # safetensors writes 0600
    atomic.fsync_tree(tmp)  # on disk before it is renamed in: a crash never leaves a torn directory
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    atomic.fsync_dir(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def _latest_dir(output_dir: Path, name: str, marker: str) -> Path | None:
    """``output_dir/name``, or ``name.old`` when a swap was interrupted between its renames; None when neither
    holds ``marker``."""
    for candidate in (name, name + ".old"):
        if (output_dir / candidate / marker).is_file():
            return output_dir / candidate
    return None


def _save_checkpoint(output_dir: Path, model, optimizer, scheduler, state: dict) -> None:
    def write(tmp: Path) -> None:
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        extra = _extra_params(model, optimizer)
        if extra:
            safetensors.torch.save_file({k: p.detach().cpu().contiguous() for k, p in extra.items()},
                                        str(tmp / EXTRA_PARAMS))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    _swap_dir(output_dir, CHECKPOINT_DIR, write)


def _save_best(output_dir: Path, model, record: dict) -> None:
    """Keep ``model``'s weights as the best so far in ``output_dir/best/``."""
    def write(tmp: Path) -> None:
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        (tmp / "eval.json").write_text(json.dumps(record, indent=1))

    _swap_dir(output_dir, BEST_DIR, write)


def load_best_weights(model: torch.nn.Module, output_dir: str | os.PathLike) -> dict | None:
    """Load the best evaluated weights kept in ``output_dir/best/`` into ``model``; returns that evaluation's
    record (``step``, ``metrics``), or ``None`` (model untouched) when the run kept none."""
    best = _latest_dir(Path(output_dir), BEST_DIR, "eval.json")
    if best is None:
        return None
    safetensors.torch.load_model(model, str(best / "model.safetensors"), strict=True,
                                 device=str(_model_device(model)))
    return json.loads((best / "eval.json").read_text())


def _log(output_dir: Path, record: dict) -> None:
    with open(output_dir / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
