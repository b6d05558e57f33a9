"""The JIT build's directory lock: a build killed part-way must not make every later build wait forever on the
lock file torch's ``FileBaton`` left behind, and a live build elsewhere must still be waited for."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest

from structprune.backends.cpp import build

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

# Another process building in the same directory: holds the lock, writes torch's baton, says so, then sleeps.
_HOLDER = textwrap.dedent("""
    import fcntl, sys, time
    from pathlib import Path
    d = Path(sys.argv[1])
    handle = open(d / ".structprune_build.flock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    (d / "lock").touch()
    print("held", flush=True)
    time.sleep(120)
""")


def _start_holder(build_dir):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(build_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _enter_in_thread(build_dir):
    """Enter the build lock on a thread; returns (entered event, caught warnings, thread)."""
    entered, caught = threading.Event(), []

    def run():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with build._build_lock(build_dir):
                caught.append((build_dir / "lock").exists())
                entered.set()
        caught.extend(str(w.message) for w in seen)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return entered, caught, thread


def test_a_stale_baton_is_removed_with_a_warning(tmp_path):
    (tmp_path / "lock").touch()  # left by a build that was killed
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        with build._build_lock(tmp_path):
            assert not (tmp_path / "lock").exists()


def test_no_baton_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with build._build_lock(tmp_path):
            pass
    with build._build_lock(tmp_path):  # released: taken again at once
        pass


def test_a_live_build_is_waited_for_and_its_baton_kept(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        entered, caught, thread = _enter_in_thread(tmp_path)
        assert not entered.wait(0.5), "entered while another process held the build lock"
        assert (tmp_path / "lock").exists(), "a live build's baton was removed"
        # The other build finishes: removes its baton, releases the lock (by exiting).
        (tmp_path / "lock").unlink()
        holder.send_signal(signal.SIGTERM)
        assert entered.wait(10), "never entered after the other build finished"
        thread.join(10)
        assert caught == [False], caught  # no baton inside, no warning
    finally:
        holder.kill()
        holder.wait()


def test_a_build_killed_while_holding_the_lock_does_not_block_the_next(tmp_path):
    holder = _start_holder(tmp_path)
    entered, caught, thread = _enter_in_thread(tmp_path)
    assert not entered.wait(0.3)
    holder.send_signal(signal.SIGKILL)  # killed part-way: its baton stays, the OS releases its flock
    holder.wait()
    assert entered.wait(10), "waited on a killed build's lock"
    thread.join(10)
    assert caught[0] is False, "the stale baton was still there inside the lock"
    assert any("stale build lock" in m for m in caught[1:]), caught
    assert not (tmp_path / "lock").exists()
