"""Write a file so that a reader never sees half of it: into a temporary file in the same folder, then
``os.replace`` over the target (atomic on POSIX and Windows within one file system).

The one place for it: checkpoints, weight files, caches, status JSON polled by a server and published weights
all go through :func:`atomic_write`. The temporary file is flushed to the disk (``fsync``) before the rename and
the folder after it: without that, a power cut soon after the rename can leave the final name holding an empty or
partial file (the rename reaches the disk before the data), e.g. a published weight file, or a batch output that
its rerun would take as done (:func:`fsync_path` for writers that rename files of their own).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_copy", "atomic_torch_save",
           "atomic_numpy_save", "fsync_path"]


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries (a rename, a new file), to the disk. A folder cannot be opened
    for that on Windows: there it is left to the file system."""
    if os.name == "nt" and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mode_for(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # /proc first: os.umask() can only be read by setting it, which races with other threads creating files
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then rename it over ``path``.

    The parent folder is created. On any failure (the exception propagates) the temporary file is removed and
    ``path`` is left as it was. Returns ``path``.
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix: numpy.save appends ".npy" to a name without it
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{''.join(target.suffixes[-1:])}",
                                dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would (or the replaced file's)
        os.chmod(tmp, _mode_for(target))
        fsync_path(tmp)  # the data on the disk before the name points at it
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_json(path: str | os.PathLike, payload: Any, indent: int = 1) -> Path:
    """JSON with ``default=str`` (paths, numpy scalars and dates are written as text)."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, default=str))


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def atomic_numpy_save(path: str | os.PathLike, array) -> Path:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: numpy.save adds no suffix
            np.save(handle, array)

    return atomic_write(path, write)
