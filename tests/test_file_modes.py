"""Files structprune saves get the mode the umask gives a new file (0644 under umask 022), not the 0600 of
``tempfile.mkstemp`` or of safetensors' writer."""
import os
import stat

import pytest
import torch

import structprune as sp
from structprune import atomic
from structprune.training.distill import TeacherCache
from structprune.model.io import STRUCTPRUNE_CONFIG, WEIGHTS
from structprune.qa.checkpoints import _save_checkpoint

from helpers.models import tiny_model


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_save_pretrained_files_follow_the_umask(tmp_path, umask):
    model = sp.patch(tiny_model("bert", "qa", layers=1))
    sp.save_pretrained(model, tmp_path / "m")
    for name in (WEIGHTS, "config.json", STRUCTPRUNE_CONFIG):
        assert oct(mode(tmp_path / "m" / name)) == oct(0o666 & ~umask), name


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    import safetensors.torch

    atomic.write_json(tmp_path / "a.json", {"x": 1})
    with atomic.replacing(tmp_path / "w.safetensors") as tmp:
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp))
    cache = TeacherCache()
    cache.add(torch.tensor([0]), torch.zeros(1, 3), torch.zeros(1, 3))
    cache.save(tmp_path / "logits.safetensors")
    for name in ("a.json", "w.safetensors", "logits.safetensors"):
        assert oct(mode(tmp_path / name)) == oct(0o666 & ~umask), name


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = atomic.write_json(tmp_path / "a.json", {"x": 1})
    os.chmod(path, 0o640)
    atomic.write_json(path, {"x": 2})
    assert mode(path) == 0o640


def test_training_checkpoints_follow_the_umask(tmp_path, umask):
    model = tiny_model("bert", "qa", layers=1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    _save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 0})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    for p in files:
        assert oct(mode(p)) == oct(0o666 & ~umask), p
