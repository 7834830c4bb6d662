"""Files that survive a kill: every file a run writes goes through `atomic_write`.

The data goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the target (`os.replace` is atomic on POSIX within one filesystem): a reader sees the old file or
the new one, never a torn one; the folder is fsynced after the rename, so a power loss or a host
crash (not just a killed process) keeps the new name, not only the new bytes. With `checksum=True`
(checkpoints) the size and sha256 of what was written go to `<path>.sha256` before the rename, and
`verify(path)` later proves the file is still what was written (a kill between the two renames is
finished by verify: the new file is the temporary one whose checksum matches;
`finish_interrupted_writes` does it for a whole run directory when a run starts, and removes the
temporary files of writes a kill cut short). No torch import here: the report uses it too.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import io
import json
import os
import re
import time
import warnings
from typing import Callable

from ..engine import writer_lock
from ..engine.durable import fsync_dir as _fsync_dir, make_dirs
from .file_errors import (EXIT_BUSY, Busy, CorruptFile, ReadFailed, RemoveFailed, WriteFailed,  # noqa: F401
                          remove_file)  # (re-exported: files' errors)

__all__ = ["atomic_write", "write_json", "write_csv", "verify", "finish_interrupted_writes", "CorruptFile",
           "WriteFailed", "ReadFailed", "make_folder", "make_link", "Busy", "EXIT_BUSY", "folder_lock",
           "folder_busy", "remove_empty_folder", "RemoveFailed", "remove_file"]



@contextlib.contextmanager
def folder_lock(folder: str):
    """Hold an exclusive lock (fcntl, released by the kernel when the process dies) on `folder`/.lock
    while the body runs: two processes writing one run's files would overwrite each other's
    checkpoints and metrics. Busy at once when another process holds it; no lock where the folder
    cannot be made (the caller's own checks say why), fcntl is missing or the filesystem does not
    lock (a warning); WriteFailed where the folder exists but its .lock cannot be opened (a folder in
    its place, no permission: it ran without a lock before 2026-12-05, so twice at once)."""
    try:
        import fcntl
        f, taken = _open_lock(folder)
    except ImportError:
        yield
        return
    except OSError as e:
        if not os.path.isdir(folder):
            yield
            return
        failed = WriteFailed(e.errno, e.strerror or str(e), os.path.join(folder, ".lock"))
        failed.advice = ("the run's lock (no two processes may run this folder at once) cannot be taken: remove it "
                         "or fix its permissions, then run the same command")
        raise failed from None
    with f:
        if taken is None:
            warnings.warn(f"{folder}: no lock (the filesystem does not lock): do not run this command twice at once")
            yield
            return
        if not taken:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise Busy(f"{folder} is in use by another process (pid {holder}): wait for it to finish, or stop it "
                       "and run the command again to resume") from None
        with contextlib.suppress(OSError):  # (the pid only names the holder in Busy's message: a full disk still locks)
            f.truncate(0)
            os.write(f.fileno(), str(os.getpid()).encode())  # (unbuffered: no write left for close() to fail on)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _open_lock(folder: str, name: str = ".lock", wait: bool = False):
    """folder/name opened and _try_flock'ed (with `wait`, locked once its holder lets go): (file, taken).
    A lock taken on a file its holder removed meanwhile (remove_empty_folder, the folder then gone; a
    finished download's lock file) guards nothing: taken again on the new one."""
    for _ in range(10):
        make_dirs(folder)  # (the run directory: created here first, fsynced into its parent)
        try:
            f = open(os.path.join(folder, name), "a+")
        except FileNotFoundError:  # (the folder removed between the two calls)
            continue
        taken = _wait_flock(f) if wait else _try_flock(f)
        try:
            if taken is not True or os.path.samestat(os.fstat(f.fileno()), os.stat(f.name)):
                return f, taken
        except FileNotFoundError:
            pass
        f.close()
    raise Busy(f"{folder} is being created and removed by other processes: run the command again")


def remove_empty_folder(folder: str) -> None:
    """Remove `folder` if it holds nothing but its .lock (a run refused before it wrote anything), while
    holding folder_lock (a process that took the old lock then takes the new folder's); kept otherwise."""
    with contextlib.suppress(OSError):
        if set(os.listdir(folder)) <= {".lock"}:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, ".lock"))
            os.rmdir(folder)  # (refused if a file appeared meanwhile: the folder stays)


def folder_busy(folder: str) -> bool:
    """Another process holds `folder`'s lock (folder_lock) right now (False where there is no lock
    file or the filesystem cannot lock)."""
    try:
        import fcntl
        with open(os.path.join(folder, ".lock"), "a+") as f:
            taken = _try_flock(f)
            if taken:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return taken is False
    except (ImportError, OSError):
        return False


def _try_flock(f):
    """Take f's exclusive lock without waiting: True taken, False another process holds it, None the
    filesystem cannot lock (ENOLCK: NFS without lockd)."""
    import fcntl
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        return False if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None


def _wait_flock(f):
    """Take f's exclusive lock, waiting for its holder: True, or None where the filesystem cannot lock."""
    import fcntl
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        return True
    except OSError:
        return None


def _digest(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def _recorded(path: str) -> dict | None:
    """The size and sha256 `<path>.sha256` records (None: no record; CorruptFile: unreadable, or the record
    of a file of another name: since 2026-12-06 a record names its file, so one copied or renamed beside
    another file with it is refused; an older record names none; or of another place: a record written
    with `where` (a finished phase's metrics.csv: run directory/seed/phase) copied into another folder)."""
    record = path + ".sha256"
    if not os.path.exists(record):
        return None
    try:
        with open(record) as f:
            want = json.load(f)
        digest, name, where = {"size": int(want["size"]), "sha256": str(want["sha256"])}, want.get("name"), \
            want.get("where")
        if where is not None and (not isinstance(where, str) or not where.strip("/")):
            raise TypeError("where")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # (EACCES, EIO: it may be intact)
            raise ReadFailed(e.errno, e.strerror or str(e), record) from e
        raise CorruptFile(f"{record} (the checksum of {path}) is unreadable") from None
    if name is not None and name != os.path.basename(path):
        raise CorruptFile(f"{record} is the record of {name!r}, not of {os.path.basename(path)!r}: it and its file "
                          "were copied or renamed from another file's")
    if where is not None and not _placed(path, where):
        raise CorruptFile(f"{record} is the record of {where}/{os.path.basename(path)}, not of {path}: it and its file "
                          "were copied from another run, seed or phase")
    return digest


def _placed(path: str, where: str) -> bool:
    """`path`'s folder (its real one, a --reuse link's target, or as named) ends with `where`'s folders."""
    parts = where.strip("/").split("/")
    folder = os.path.dirname(os.path.abspath(path))
    return any(os.path.normpath(d).split(os.sep)[-len(parts):] == parts for d in (os.path.realpath(folder), folder))


def verify(path: str) -> bool:
    """Check `path` against `<path>.sha256` (False: no record, e.g. a file from elsewhere; True:
    it matches). CorruptFile when it does not match and no interrupted write can be finished;
    WriteFailed naming the temporary file where one can but the folder refuses its rename (read-only)."""
    want = _recorded(path)
    if want is None:
        return False
    try:
        if os.path.exists(path) and _digest(path) == want:
            return True
    except OSError as e:  # (EACCES, EIO: not a corrupt file; a vanished one is checked below)
        if not isinstance(e, FileNotFoundError):
            raise ReadFailed(e.errno, e.strerror or str(e), path) from e
    leftovers = glob.glob(glob.escape(path) + f".{TMP_TAG}.*") + glob.glob(glob.escape(path) + ".tmp.*")
    for tmp in sorted(leftovers):  # killed between the two renames, or a living writer between them
        match = _TMP.fullmatch(os.path.basename(tmp))
        pid = int(match[3]) if match else 0
        if match and pid <= 1 << 22 and writer_lock.writer_alive(tmp, pid, match[2] == TMP_TAG):
            # its own rename is imminent: wait for it (taking the file would fail that writer's rename);
            # still there after the wait (a writer stopped, or by the pid rule a dead one's under a
            # reused pid): finished below, its writer's rename then taking the file for done
            if _landed(path, tmp, pid, want):
                return True
        try:
            if _digest(tmp) == want:
                os.replace(tmp, path)
                _fsync_dir(os.path.dirname(os.path.abspath(path)))
                return True
        except FileNotFoundError:  # (another reader, or its writer, finished it first)
            if os.path.exists(path) and _digest(path) == want:
                return True
        except OSError as e:  # (a read-only folder: one line naming the file, as finish_interrupted_writes')
            failed = WriteFailed(e.errno, e.strerror or str(e), tmp)  # (a rename needs no space; no run to resume)
            failed.advice = (f"it finishes {path}'s interrupted write: fix the folder's permissions and run the same "
                             "command again")
            raise failed from e
    if not os.path.exists(path):
        got = "missing"
    elif os.path.getsize(path) == want["size"]:  # (the bytes changed, not the length)
        got = f"its sha256 is {_digest(path)['sha256'][:12]}…"
    else:
        got = f"{os.path.getsize(path)} bytes"
    raise CorruptFile(f"{path} is corrupt: {got}, not the {want['size']} bytes (sha256 {want['sha256'][:12]}…) "
                      "written")


def _landed(path: str, tmp: str, pid: int, want: dict, timeout: float = 10.0) -> bool:
    """Wait (up to `timeout` s) while a living writer (pid `pid`) still holds `tmp`; then whether `path`
    is the recorded file."""
    deadline = time.monotonic() + timeout
    locks = _TMP.fullmatch(os.path.basename(tmp))[2] == TMP_TAG
    while os.path.exists(tmp) and writer_lock.writer_alive(tmp, pid, locks) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.path.exists(path) and _digest(path) == want


def make_folder(path: str) -> None:
    """os.makedirs(exist_ok=True) for the run's folders, each new one fsynced into its parent (durable.make_dirs);
    an OSError (disk full, read-only) is WriteFailed."""
    try:
        make_dirs(path)
    except OSError as e:
        raise WriteFailed(e.errno, e.strerror or str(e), path) from e


def make_link(target: str, path: str) -> None:
    """os.symlink to a folder of the run, fsynced into its folder (as a new folder is); an OSError (disk
    full, read-only) is WriteFailed."""
    try:
        os.symlink(target, path, target_is_directory=True)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise WriteFailed(e.errno, e.strerror or str(e), path) from e


def atomic_write(path: str, data: str | bytes | Callable, *, binary: bool | None = None,
                 checksum: bool = False, where: str | None = None) -> None:
    """Write `data` (text, bytes, or a function writing to an open file) to `path` atomically;
    `checksum`: record its size and sha256 for `verify`, and `where` (the last folders of `path`'s, e.g. run
    directory/seed/phase) too: verify refuses the two copied into another folder. An OSError (ENOSPC, EROFS,
    EIO...) is raised as WriteFailed naming `path`."""
    path = os.fspath(path)
    try:
        _atomic_write(path, data, binary, checksum, where)
    except WriteFailed:
        raise
    except OSError as e:
        raise WriteFailed(e.errno, e.strerror or str(e), path) from e


def _atomic_write(path: str, data, binary: bool | None, checksum: bool, where: str | None = None) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    make_dirs(folder)
    binary = isinstance(data, bytes) if binary is None else binary
    tmp = f"{path}.{TMP_TAG}.{os.getpid()}"
    recorded = False  # the checksum names tmp's data: from then on the write is finished, not undone
    held = None  # a descriptor locking tmp, the sign this writer lives (writer_lock): kept past the rename
    try:
        for attempt in range(10):  # (anew where a recovery took a dead writer's file of tmp's name meanwhile;
            # a filesystem whose inode numbers change: unlocked after 10 tries, as before 2026-12-06)
            f = open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""}))
            held = writer_lock.hold(f.fileno(), tmp)
            if held is not False or attempt == 9:
                break
            f.close()
        held = None if held is False else held
        with f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if checksum:
            atomic_write(path + ".sha256", json.dumps({**_digest(tmp), "name": os.path.basename(path),
                                                       **({"where": where} if where else {})}))
            recorded = True
        try:
            os.replace(tmp, path)
        except FileNotFoundError:  # a reader (verify) on another host moved the finished file in
            if not (checksum and os.path.exists(path) and _names(path, path)):  # (a record unreadable since: failed)
                raise
        _fsync_dir(folder)
    finally:
        try:
            if os.path.exists(tmp):  # (an exception, or Ctrl-C, before the data's rename)
                # finished once the record names tmp's data, which Ctrl-C can leave unflagged (between
                # the record's rename and `recorded = True`): then tmp is the file, else it never was
                os.replace(tmp, path) if recorded or (checksum and _names(path, tmp)) else os.remove(tmp)
        finally:
            if held is not None:
                os.close(held)


def _names(path: str, tmp: str) -> bool:
    """`<path>.sha256` records tmp's data (False also for an unreadable record)."""
    try:
        want = _recorded(path)
    except (CorruptFile, ReadFailed):
        return False
    return want is not None and _digest(tmp) == want


# atomic_write's `<path>.sparsetrain-tmp.<pid>` (Linux pids < 2^22); `<path>.tmp.<pid>` before
# 2026-12-03, a form a user's own files may have too: those are only ever finished, never removed
TMP_TAG = "sparsetrain-tmp"
_TMP = re.compile(rf"(.+)\.({TMP_TAG}|tmp)\.([1-9][0-9]{{0,6}})")


def finish_interrupted_writes(folder: str, names: tuple | None = None) -> None:
    """The temporary files of writes a killed process left under `folder` (call it holding the
    folder's lock): one that its record names is the newer file, renamed into place (a kill between
    the record and the data's rename); every other one never finished and is removed. A living
    writer's are left alone (a --report-only beside the run): one whose lock is held (writer_lock; the
    pid in the name is no proof: reused, or every container's), by the pid rule where the filesystem
    cannot lock; one beside an unreadable record too, and names that cannot be atomic_write's (a number
    past Linux's largest pid, 2^22). The older `<path>.tmp.<pid>` form (never locked: the pid rule) is
    finished where its record names it, never removed (a user's `notes.tmp.2024` looks the same).
    `names`: only those of these files directly in `folder` (the report's: --report-only, lockless)."""
    for dirpath, _, found in os.walk(folder) if names is None else [next(os.walk(folder), (folder, [], []))]:
        for name in found:
            match = _TMP.fullmatch(name)
            if match is None or int(match[3]) > 1 << 22 or (names is not None and match[1] not in names):
                continue
            tmp, path = os.path.join(dirpath, name), os.path.join(dirpath, match[1])
            with writer_lock.claim(tmp, int(match[3]), match[2] == TMP_TAG) as alive:
                if alive:
                    continue
                try:
                    want = _recorded(path)
                except (CorruptFile, ReadFailed):
                    continue
                try:  # (a run directory made read-only since: one line naming the file, as atomic_write's)
                    if want is not None and _digest(tmp) == want:
                        os.replace(tmp, path)
                        _fsync_dir(dirpath)  # (the new name durable, as verify's and atomic_write's)
                    elif match[2] == TMP_TAG:
                        os.remove(tmp)
                except FileNotFoundError:  # (renamed by its writer, or another recovery, since the listing)
                    continue
                except OSError as e:
                    raise WriteFailed(e.errno, e.strerror or str(e), tmp) from e


def write_json(path: str, obj, checksum: bool = False) -> None:
    atomic_write(path, json.dumps(obj, indent=1), checksum=checksum)


def write_csv(path: str, rows: list[dict], checksum: bool = False, where: str | None = None) -> None:
    """Rows as CSV; the header is the union of the rows' keys in first-seen order. `checksum`, `where`: as
    atomic_write's (a phase's results: verify refuses a torn or edited file, or one copied from another phase)."""
    keys = list(rows[0].keys()) if rows else []
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue(), checksum=checksum, where=where)
