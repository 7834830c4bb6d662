"""Durable names: a file's or folder's name lives in its folder's entries, not in its own data, so
fsyncing a file keeps its bytes but not its name. After a rename (atomic_write) the folder is fsynced,
and after a folder is created (make_dirs) its parent is: after a power loss a file fsynced inside a
folder whose own entry never reached the disk vanishes with that folder. No torch import here. In the
engine (since 2026-12-06) so that the auto policy's decision cache (policy._save_decision) fsyncs its folder
too, as the study's files (experiment/files.py) do."""
from __future__ import annotations

import errno
import os

__all__ = ["fsync_dir", "make_dirs"]

# a folder that cannot be opened or fsynced at all (no read permission; some network and FUSE
# mounts, Windows): the rename is as durable as that filesystem makes it; other errors (EIO) raise
_NO_DIR_FSYNC = {errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (the rename lives in the folder's entries, not the file's data)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def make_dirs(path: str) -> None:
    """os.makedirs(path, exist_ok=True), then the parent of each folder it created fsynced, outermost
    first (a folder's entry is durable once its parent's is); nothing more where `path` is a folder
    already (one stat: atomic_write calls it for every file)."""
    new, folder = [], os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        new.append(folder)
        folder = os.path.dirname(folder)
    if not new:
        return
    os.makedirs(path, exist_ok=True)
    for folder in reversed(new):
        fsync_dir(os.path.dirname(folder))
