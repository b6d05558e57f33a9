"""Crash-safe files: write to a temporary file in the same directory, flush, fsync, rename over the target, fsync
the directory. A crash at any point leaves either the previous version or the new one, never a torn file.

    from structprune import atomic
    atomic.write_json(path, {"step": 3})
    with atomic.replacing(path) as tmp:      # for writers that take a path (torch.save, safetensors)
        torch.save(state, tmp)
    obj = atomic.read_json(path)             # errors name the file and say what is wrong
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["CorruptFileError", "fsync_dir", "fsync_tree", "read_json", "replacing", "set_default_mode", "umask",
           "write_bytes", "write_json", "write_text"]


class CorruptFileError(ValueError):
    """A file that exists but cannot be read back: truncated, corrupted, or not what it should hold."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (before renaming a freshly written directory into place)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(*paths: str | os.PathLike) -> None:
    """Give freshly written files the mode a plain ``open(path, "w")`` would: ``0o666`` less the umask (``0644``
    under umask 022). ``tempfile.mkstemp`` and safetensors' writers create ``0600`` files."""
    mode = 0o666 & ~umask()
    for path in paths:
        os.chmod(path, mode)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception the file written there is
    given ``path``'s mode (a new file: the umask's), fsynced and renamed over ``path`` (then the directory is
    fsynced). On an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_file():  # the mode of the file it replaces, as writing it in place would keep
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:  # not mkstemp's 0600
            set_default_mode(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2, default=str) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``default=str`` for paths and other simple objects)."""
    return write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file", expect: type | None = dict):
    """Read a JSON file; a missing, truncated or corrupted one raises an error naming ``path`` and what it
    should hold (``what``), and one whose top level is not ``expect`` raises :class:`CorruptFileError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{what} {path} is not valid JSON (truncated or corrupted? {exc})") from exc
    if expect is not None and not isinstance(obj, expect):
        raise CorruptFileError(f"{what} {path} should hold a JSON {expect.__name__}, found {type(obj).__name__}")
    return obj
