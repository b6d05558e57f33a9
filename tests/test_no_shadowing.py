"""The top-level kernels/ folder never shadows an installed package named ``kernels`` (Hugging Face's kernel hub,
which transformers >= 5.25 imports), from the repository root or anywhere; the Triton kernels import only as
``structprune._kernels``, in a checkout and in a wheel."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_in_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _installed_kernels_package() -> bool:
    out = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; m.distribution('kernels')"],
                         cwd="/", capture_output=True)
    return out.returncode == 0


def test_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow the PyPI `kernels`"


@pytest.mark.skipif(not _installed_kernels_package(), reason="the PyPI `kernels` package is not installed")
def test_transformers_imports_from_the_repo_root():
    out = _run_in_root("-c", "import transformers.models.bert.modeling_bert, kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not Path(out.stdout.strip()).resolve().is_relative_to(ROOT), out.stdout


def test_module_entry_point_from_the_repo_root():
    out = _run_in_root("-m", "structprune", "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage: structprune" in out.stdout


def test_kernels_import_as_structprune_kernels_from_the_repo_root():
    out = _run_in_root("-c", "import structprune.backends.triton as t; assert t._IMPORT_ERROR is None, "
                             "t._IMPORT_ERROR; import structprune._kernels.attention as a; print(a.__file__)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip()).resolve().parent == ROOT / "kernels"


@pytest.mark.slow
def test_wheel_carries_the_kernels_under_structprune(tmp_path):
    env = {**os.environ, "STRUCTPRUNE_SKIP_EXT": "1"}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("structprune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.rpartition("/")[2] for n in names if n.startswith("structprune/_kernels/")) == sorted(
        kernels + ["__init__.py"])
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ package in the wheel"
