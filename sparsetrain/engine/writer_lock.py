"""Whether a temporary file's writer still lives: atomic_write holds an exclusive flock on its
`<path>.sparsetrain-tmp.<pid>` from its creation until it is renamed or removed, and the kernel
releases it when the process dies, however it dies (SIGKILL, OOM). A reader that takes the lock
without waiting knows the writer is gone; one that cannot, that it lives. The pid in the name is no
such proof (reused by another process, or the same small pid in every container). Where the lock
cannot tell (fcntl missing: Windows; ENOLCK: NFS without lockd; an unreadable file) the pid rule
stands: a writer lives while a process of its pid does, this process's own pid being a dead one's.
(On Windows a process's liveness is OpenProcess/GetExitCodeProcess's, never os.kill's signal 0.)
NFS: flock is emulated there by whole-file byte-range locks on the server, seen by every client that
locks (not with the mount option local_lock=flock or all, where another host's writer looks dead);
a crashed client's lock lasts until the server's lease expires (NFSv4: about 90 s).
In the engine since 2026-12-06: the auto policy's decision cache (policy._save_decision) locks its
temporary files the same way, and removes a dead writer's.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time

try:
    import fcntl
except ImportError:  # (Windows: the pid rule only)
    fcntl = None

_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def hold(fd: int, tmp: str, wait: float = 10.0):
    """Lock the just-created temporary file `tmp` open at `fd` for its writer: a duplicate of `fd`
    holding the flock (close it after tmp's rename or removal, not with the file: the lock lives as
    long as one descriptor of it does); None where the filesystem cannot lock, or another process held
    it past `wait` s (a recovery holds it while it finishes or removes a file); False where tmp was
    removed or replaced meanwhile (a recovery took a dead writer's file of the same name): open anew."""
    if fcntl is None:
        return None
    held, deadline = os.dup(fd), time.monotonic() + wait
    while True:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in _HELD or time.monotonic() > deadline:
                os.close(held)
                return None
            time.sleep(0.01)
    try:
        if os.path.samestat(os.fstat(held), os.stat(tmp)):
            return held
    except FileNotFoundError:
        pass
    os.close(held)
    return False


def _kernel32():
    """Windows's kernel32 (ctypes) and its last-error getter, None where there is none."""
    try:
        import ctypes
        k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        k32.OpenProcess.restype = ctypes.c_void_p  # (a HANDLE: pointer-wide, not the default int)
        k32.GetExitCodeProcess.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
        k32.CloseHandle.argtypes = [ctypes.c_void_p]
        return k32, ctypes.get_last_error
    except (ImportError, AttributeError, OSError):
        return None


def _pid_alive_windows(pid: int) -> bool:
    """pid_alive on Windows: os.kill(pid, 0) there sends CTRL_C_EVENT to process group `pid` (it would
    interrupt a living writer) instead of testing it; ask OpenProcess/GetExitCodeProcess instead. Where
    they cannot tell (no kernel32, another error) it is alive: its file is kept, the safe error."""
    import ctypes
    found = _kernel32()
    if found is None:
        return True
    k32, last_error = found
    # (PROCESS_QUERY_LIMITED_INFORMATION; ERROR_INVALID_PARAMETER: no such pid; STILL_ACTIVE: exit code 259)
    try:
        handle = k32.OpenProcess(0x1000, False, int(pid))
    except (ctypes.ArgumentError, OverflowError, TypeError):  # (a pid no DWORD holds: unknown)
        return True
    if not handle:
        return last_error() != 87
    try:
        code = ctypes.c_ulong(0)
        if not k32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # (an exited process whose handle another still holds: dead)
    finally:
        k32.CloseHandle(handle)


def pid_alive(pid: int) -> bool:
    """A process of `pid` exists (another user's too; on Windows one not yet exited)."""
    if os.name == "nt":
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # (EPERM: another user's process)
        return True
    return True


@contextlib.contextmanager
def claim(tmp: str, pid: int, locks: bool = True):
    """Yield whether `tmp`'s writer (pid `pid`, from its name) still lives, holding its lock through
    the body where it is gone (so no new writer of the same name starts on it meanwhile). `locks`
    False: the pid rule only (names of writers that never locked)."""
    fd = alive = None
    try:
        if locks and fcntl is not None:
            # (open for writing where it may be: NFS's flock, a byte-range lock, takes LOCK_EX on such a
            # descriptor only: EBADF on a read-only one fell back to the pid rule there, another host's
            # writer then dead; read-only for a file of another user or on a read-only mount)
            for mode in (os.O_RDWR, os.O_RDONLY):
                with contextlib.suppress(OSError):
                    fd = os.open(tmp, mode)
                    break
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alive = False
            except OSError as e:
                alive = True if e.errno in _HELD else None
        if alive is None:  # (the lock cannot tell: the pid rule)
            alive = pid != os.getpid() and pid_alive(pid)
        yield alive
    finally:
        if fd is not None:
            os.close(fd)


def writer_alive(tmp: str, pid: int, locks: bool = True) -> bool:
    """claim's answer, the lock released at once."""
    with claim(tmp, pid, locks) as alive:
        return alive
