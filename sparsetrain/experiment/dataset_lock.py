"""The lock that processes downloading or extracting into one data folder take turns under, and the
timeout a download's sockets wait with (download_guard: both, around torchvision's download)."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from .files import _open_lock

__all__ = ["LOCK_NAME", "DOWNLOAD_TIMEOUT", "download_lock", "download_guard"]

LOCK_NAME = ".sparsetrain-download.lock"
DOWNLOAD_TIMEOUT = 60.0  # seconds a download's socket waits for the server's answer


@contextlib.contextmanager
def download_lock(data_dir: Path):
    """Hold an exclusive lock (fcntl, waiting for its holder: files._open_lock) on
    data_dir/.sparsetrain-download.lock while the body runs (unguarded where fcntl is missing or the
    filesystem does not lock). The holder removes the file before it lets go, and data_dir too where
    this call made it and it is left empty, but for empty folders (a failed download left them behind); a process that waited
    on the removed file takes the new one."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # (no fcntl: unguarded, as before)
        yield
        return
    data_dir, made = Path(data_dir), not Path(data_dir).exists()
    lock, taken = _open_lock(str(data_dir), LOCK_NAME, wait=True)
    with lock:
        try:
            yield
        finally:
            if taken:
                with contextlib.suppress(OSError):
                    os.remove(data_dir / LOCK_NAME)
                if made:  # (bottom-up, each refused unless empty: torchvision makes e.g. FashionMNIST/raw first)
                    for folder, _, _ in os.walk(data_dir, topdown=False):
                        with contextlib.suppress(OSError):
                            os.rmdir(folder)


@contextlib.contextmanager
def download_guard(data_dir: Path):
    """download_lock(data_dir), and every socket opened meanwhile waits DOWNLOAD_TIMEOUT seconds for an
    answer (torchvision's urlopen has no timeout: a server or proxy that never answers blocked the run,
    and every run waiting for this lock, forever; process-wide, so restored at once)."""
    with download_lock(data_dir):
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
        try:
            yield
        finally:
            socket.setdefaulttimeout(previous)
