"""Crash-safe files: a crash mid-save leaves the previous version readable, and a truncated or corrupted file
gives an error naming it before anything is allocated."""
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

import structprune as sp
from structprune import atomic
from structprune.atomic import CorruptFileError
from structprune.model.io import STRUCTPRUNE_CONFIG, WEIGHTS, _umask
from helpers.models import outputs, tiny_batch, tiny_model


class Crash(Exception):
    pass


def crash_on_call(monkeypatch, module, name, n):
    """Make ``module.name`` raise Crash on its n-th call (1-based); earlier calls go through."""
    real = getattr(module, name)
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"simulated crash in {name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)


# ------------------------------------------------------------------------------------------- atomic.py
def test_write_json_crash_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic.write_json(path, {"v": 1})
    crash_on_call(monkeypatch, os, "replace", 1)
    with pytest.raises(Crash):
        atomic.write_json(path, {"v": 2})
    assert atomic.read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("content, match", [(b'{"v": ', "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                                            (b"[1, 2]", "should hold a JSON dict")])
def test_read_json_names_the_bad_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError, match=match) as info:
        atomic.read_json(path, "run config")
    assert str(path) in str(info.value) and "run config" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        atomic.read_json(tmp_path / "nope.json")


def test_qa_result_files_are_atomic(tmp_path, monkeypatch):
    from structprune.qa.runs import _write_json

    _write_json(tmp_path / "metrics.json", {"f1": 1.0})
    crash_on_call(monkeypatch, os, "replace", 1)
    with pytest.raises(Crash):
        _write_json(tmp_path / "metrics.json", {"f1": 2.0})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"f1": 1.0}


# ------------------------------------------------------------------------------------------- models
def pruned(seed: int):
    model = sp.patch(tiny_model(layers=2, seed=seed))
    g = torch.Generator().manual_seed(seed)
    sp.set_masks(model, heads=torch.rand(2, 4, generator=g) < 0.6, ffn=torch.rand(2, 96, generator=g) < 0.5)
    return sp.compact(model)


@pytest.fixture
def saved(tmp_path):
    """A compacted tiny model saved to tmp_path/m, and its outputs."""
    model = pruned(0)
    sp.save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        return tmp_path / "m", outputs(model, tiny_batch())


def assert_loads_as(path, expected):
    with torch.no_grad():
        torch.testing.assert_close(outputs(sp.from_pretrained(path), tiny_batch()), expected)


@pytest.mark.parametrize("crash", [("os", "replace", 1), ("os", "replace", 2), ("io", "save_model", 1),
                                   ("atomic", "fsync_tree", 1)])
def test_crash_mid_save_leaves_the_previous_model_loadable(saved, monkeypatch, crash):
    import structprune.model.io as spio

    path, before = saved
    (path / "notes.txt").write_text("kept")  # a file the save does not own is carried over
    module = {"os": os, "io": spio, "atomic": atomic}[crash[0]]
    crash_on_call(monkeypatch, module, crash[1], crash[2])
    with pytest.raises(Crash):
        sp.save_pretrained(pruned(1), path)
    monkeypatch.undo()
    if crash == ("os", "replace", 2):  # between the renames: the previous model is the backup
        with pytest.warns(UserWarning, match="interrupted"):
            assert_loads_as(path, before)
    else:
        assert_loads_as(path, before)
    new = pruned(1)
    sp.save_pretrained(new, path)  # the next save repairs everything
    with torch.no_grad():
        assert_loads_as(path, outputs(new, tiny_batch()))
    assert (path / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m"]  # no temp or backup left
    assert oct(path.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700


def _truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path: Path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


CORRUPTIONS = {
    "meta truncated": (lambda p: _truncate(p / STRUCTPRUNE_CONFIG, 0.5), STRUCTPRUNE_CONFIG, "not valid JSON"),
    "meta negative": (lambda p: _edit_json(p / STRUCTPRUNE_CONFIG, heads_per_layer=[-1, 2]), STRUCTPRUNE_CONFIG,
                      "non-negative"),
    "meta layer count": (lambda p: _edit_json(p / STRUCTPRUNE_CONFIG, heads_per_layer=[1, 1, 1],
                                              ffn_units_per_layer=[1, 1, 1], gate_sampling=[False] * 3),
                         "config.json", "describes 3 layers"),
    "meta more heads than config": (lambda p: _edit_json(p / STRUCTPRUNE_CONFIG, heads_per_layer=[9, 1]),
                                    STRUCTPRUNE_CONFIG, "keeps 9 heads"),
    "config truncated": (lambda p: _truncate(p / "config.json", 0.3), "config.json", "not valid JSON"),
    "config absurd": (lambda p: _edit_json(p / "config.json", hidden_size=10**9), "config.json", "hidden_size"),
    "config zero heads": (lambda p: _edit_json(p / "config.json", num_attention_heads=0), "config.json",
                          "num_attention_heads"),
    "config other model": (lambda p: _edit_json(p / "config.json", model_type="roberta"), "config.json",
                           "different models"),
    "weights truncated": (lambda p: _truncate(p / WEIGHTS, 0.9), WEIGHTS, "truncated"),
    "weights empty": (lambda p: _truncate(p / WEIGHTS, 0.0), WEIGHTS, "truncated"),
    "weights header garbage": (lambda p: (p / WEIGHTS).write_bytes(b"\xff" * 8 + (p / WEIGHTS).read_bytes()[8:]),
                               WEIGHTS, "header"),
    "weights from another save": (lambda p: os.replace(sp.save_pretrained(pruned(2), p.parent / "other") / WEIGHTS,
                                                       p / WEIGHTS), WEIGHTS, "shape"),
    "weights missing": (lambda p: (p / WEIGHTS).unlink(), WEIGHTS, "missing"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_model_files_name_the_file_before_allocating(saved, monkeypatch, name):
    corrupt, file, match = CORRUPTIONS[name]
    path, _ = saved
    corrupt(path)

    def no_allocation(*a, **k):
        raise AssertionError("the model was allocated before its files were validated")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_allocation)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        sp.from_pretrained(path)
    assert file in str(info.value)


def test_weights_with_flipped_tensor_names_fail_cleanly(saved):
    """A header that passes the shape checks but lists other names: the strict load's error names the file."""
    path, _ = saved
    data = bytearray((path / WEIGHTS).read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8:8 + n] = data[8:8 + n].replace(b"qa_outputs.bias", b"qa_outputs.bia_")
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="cannot be loaded") as info:
        sp.from_pretrained(path)
    assert WEIGHTS in str(info.value)


# ------------------------------------------------------------------------------------------- training checkpoints
def _checkpoint(tmp_path, step):
    from structprune.qa.checkpoints import _save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _save_checkpoint(tmp_path, model, opt, sched, {"step": step, "settings": {}})


@pytest.mark.parametrize("n", [1, 2])
def test_crash_mid_checkpoint_keeps_the_previous(tmp_path, monkeypatch, n):
    from structprune.qa.checkpoints import checkpoint_state

    _checkpoint(tmp_path, 1)
    crash_on_call(monkeypatch, os, "replace", n)
    with pytest.raises(Crash):
        _checkpoint(tmp_path, 2)
    monkeypatch.undo()
    assert checkpoint_state(tmp_path)["step"] == 1
    _checkpoint(tmp_path, 3)
    assert checkpoint_state(tmp_path)["step"] == 3


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"])
def test_damaged_checkpoint_names_the_file(tmp_path, file):
    from structprune.qa.checkpoints import checkpoint_state

    _checkpoint(tmp_path, 1)
    _truncate(tmp_path / "checkpoint" / file, 0.5)
    with pytest.raises(CorruptFileError, match="truncated or corrupted") as info:
        checkpoint_state(tmp_path)
    assert file in str(info.value) and "to start over" in str(info.value)


def test_checkpoint_keeps_optimizer_parameters_outside_the_model(tmp_path):
    """L0 multipliers live in the optimizer, not the model: their values are checkpointed and restored."""
    from structprune.qa.checkpoints import _find_checkpoint, _load_extra_params, _save_checkpoint

    model, lam = torch.nn.Linear(3, 2), torch.nn.Parameter(torch.tensor([1.5, -2.0]))
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, {"params": [lam]}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _save_checkpoint(tmp_path, model, opt, sched, {"step": 1, "settings": {}})
    with torch.no_grad():
        lam.zero_()
    _load_extra_params(_find_checkpoint(tmp_path), model, opt)
    assert lam.tolist() == [1.5, -2.0]
