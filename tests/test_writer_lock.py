"""Whether a temporary file's writer lives is its lock (engine/writer_lock.py), not the pid in its
name: real child processes write with atomic_write and are stopped mid-write, between the two renames,
or killed (SIGKILL); the recovery (finish_interrupted_writes, verify) must leave a living writer's file
and finish or remove a dead one's, whatever process the pid in the name belongs to now."""
import errno
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

from sparsetrain.engine import writer_lock
from sparsetrain.experiment import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(files.__file__)))
# argv: path, where to stop ("write": half the data written; "renames": the record renamed, not the data),
# the pid its temporary file is named with (0: its own; another: a run in another pid namespace)
CHILD = """
import os, sys
from sparsetrain.experiment import files
path, where, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
if pid:
    os.getpid = lambda: pid
def gate():
    print("ready", flush=True)
    sys.stdin.readline()
real = os.replace
def replace(src, dst):
    if where == "renames" and not dst.endswith(".sha256"):
        gate()
    real(src, dst)
os.replace = replace
def data(f):
    f.write(b"half")
    if where == "write":
        f.flush()
        gate()
    f.write(b" and the rest")
files.atomic_write(path, data, binary=True, checksum=True)
print("done", flush=True)
"""
NEW = b"half and the rest"


def _writer(path, where, pid=0):
    """A child process stopped inside atomic_write(path) at `where` (see CHILD)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), where, str(pid)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    return child


def _stop(child):
    child.kill()
    child.wait()
    for pipe in (child.stdin, child.stdout):
        pipe.close()


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _record(path, data):
    record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    files.atomic_write(str(path) + ".sha256", json.dumps(record))


def test_a_living_writer_s_file_is_kept_whatever_pid_names_it(tmp_path):
    """A writer whose pid in the name is dead here (another pid namespace: a --report-only in another
    container) was taken for dead: its half-written file removed, its file between the renames moved into
    place by a reader, and the writer's own rename then failed. Its lock says it lives: both are left to it."""
    p = tmp_path / "state.pt"
    files.atomic_write(str(p), b"old", checksum=True)
    dead = _dead_pid()
    tmp = tmp_path / f"state.pt.{files.TMP_TAG}.{dead}"
    writer = _writer(p, "write", dead)
    try:
        files.finish_interrupted_writes(str(tmp_path))
        assert tmp.read_bytes() == b"half", "a living writer's file must be left to it"
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "done\n" and writer.wait(30) == 0
    finally:
        _stop(writer)
    assert files.verify(str(p)) and p.read_bytes() == NEW
    assert sorted(os.listdir(tmp_path)) == ["state.pt", "state.pt.sha256"]
    files.atomic_write(str(p), b"old", checksum=True)
    writer = _writer(p, "renames", dead)  # the record names the new data, which waits as tmp
    try:
        got = []
        reader = threading.Thread(target=lambda: got.append(files.verify(str(p))))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and tmp.exists(), "the reader must wait for a living writer's rename"
        files.finish_interrupted_writes(str(tmp_path))
        assert tmp.read_bytes() == NEW and p.read_bytes() == b"old"
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "done\n" and writer.wait(30) == 0  # (its own rename succeeded)
        reader.join(30)
        assert got == [True]
    finally:
        _stop(writer)
    assert p.read_bytes() == NEW and not tmp.exists()


@pytest.mark.parametrize("where", ["write", "renames"])
def test_a_killed_writer_s_file_is_finished_while_its_pid_still_exists(tmp_path, where):
    """SIGKILL: the kernel drops the writer's lock at once, but its pid lives on (a zombie its parent has not
    reaped, a sweep's runner; later a reused pid), and the pid rule kept its file. Now a half-written file is
    removed and one between the renames (its record names it) renamed into place."""
    p = tmp_path / "metrics.csv"
    files.atomic_write(str(p), b"old", checksum=True)
    writer = _writer(p, where)
    tmp = tmp_path / f"metrics.csv.{files.TMP_TAG}.{writer.pid}"
    try:
        writer.kill()
        os.waitid(os.P_PID, writer.pid, os.WEXITED | os.WNOWAIT)  # (dead, not reaped: the pid still exists)
        assert writer_lock.pid_alive(writer.pid) and tmp.exists()
        files.finish_interrupted_writes(str(tmp_path))
    finally:
        _stop(writer)
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "metrics.csv.sha256"]
    assert files.verify(str(p)) and p.read_bytes() == (b"old" if where == "write" else NEW)


def test_a_file_under_a_reused_pid_without_its_lock_is_finished(tmp_path, monkeypatch):
    """A dead writer's files whose pid now names another living process (pid reuse): finished or removed
    by the next start, and finished by a reader at once (it waited for that process before)."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # (not a writer)
    try:
        tag = f"{files.TMP_TAG}.{other.pid}"
        files.atomic_write(str(tmp_path / "summary.md"), "# done")
        (tmp_path / f"summary.md.{tag}").write_text("# half")
        files.atomic_write(str(tmp_path / "best.json"), b"{}", checksum=True)
        (tmp_path / f"best.json.{tag}").write_bytes(b'{"round": 1}')
        _record(tmp_path / "best.json", b'{"round": 1}')
        files.finish_interrupted_writes(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == ["best.json", "best.json.sha256", "summary.md"]
        assert (tmp_path / "summary.md").read_text() == "# done"
        assert files.verify(str(tmp_path / "best.json")) and (tmp_path / "best.json").read_bytes() == b'{"round": 1}'
        (tmp_path / f"best.json.{tag}").write_bytes(b'{"round": 2}')
        _record(tmp_path / "best.json", b'{"round": 2}')

        def no_wait(*a, **k):
            raise AssertionError("no writer lives: nothing to wait for")
        monkeypatch.setattr(files, "_landed", no_wait)
        assert files.verify(str(tmp_path / "best.json")) and (tmp_path / "best.json").read_bytes() == b'{"round": 2}'
        assert not (tmp_path / f"best.json.{tag}").exists()
    finally:
        other.kill()
        other.wait()


class _NoLocks:
    """fcntl on a filesystem that cannot lock (NFS without lockd)."""
    LOCK_EX, LOCK_NB, LOCK_UN = 2, 4, 8

    @staticmethod
    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


@pytest.mark.parametrize("fcntl", [None, _NoLocks], ids=["no fcntl", "ENOLCK"])
def test_without_locks_the_pid_rule_stands(tmp_path, monkeypatch, fcntl):
    """fcntl missing (Windows) or no locks on the filesystem: atomic_write still writes, and the recovery
    goes by the pid in the name as before (a living process's file kept, a dead one's and this process's
    own removed)."""
    monkeypatch.setattr(writer_lock, "fcntl", fcntl)
    p = tmp_path / "state.pt"
    files.atomic_write(str(p), b"epoch 1", checksum=True)
    assert files.verify(str(p)) and p.read_bytes() == b"epoch 1"
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (living.pid, _dead_pid(), os.getpid()):
            (tmp_path / f"plot.png.{files.TMP_TAG}.{pid}").write_text("half")
        files.finish_interrupted_writes(str(tmp_path))
    finally:
        living.kill()
        living.wait()
    assert sorted(os.listdir(tmp_path)) == [f"plot.png.{files.TMP_TAG}.{living.pid}", "state.pt", "state.pt.sha256"]


class _NFSLocks:
    """fcntl on NFS: flock is a whole-file byte-range lock there, whose LOCK_EX needs a descriptor open for
    writing (EBADF on a read-only one)."""
    LOCK_EX, LOCK_NB, LOCK_UN = 2, 4, 8

    @staticmethod
    def flock(fd, op):
        import fcntl
        if op & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return fcntl.flock(fd, op)


def test_on_nfs_the_lock_tells_not_the_pid(tmp_path, monkeypatch):
    """The recovery opened a temporary file read-only to take its lock: on NFS (an exclusive flock there needs
    a descriptor open for writing) that was EBADF, and the pid rule decided, where the lock is seen by every
    client: another host's living writer, whose pid is none here, lost its file. Opened for writing now, the
    lock tells: a living writer's file stays, a dead one's goes, whatever the pid in the name."""
    monkeypatch.setattr(writer_lock, "fcntl", _NFSLocks)
    living = tmp_path / f"plot.png.{files.TMP_TAG}.{_dead_pid()}"  # (another host's writer: its pid dead here)
    dead = tmp_path / f"cum.png.{files.TMP_TAG}.{os.getppid()}"  # (a killed writer's, its pid reused by a process)
    for p in (living, dead):
        p.write_text("half")
    with open(living, "a") as held:
        _NFSLocks.flock(held.fileno(), _NFSLocks.LOCK_EX)
        assert writer_lock.writer_alive(str(living), _dead_pid()) is True
        files.finish_interrupted_writes(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == [living.name]
    real = os.open

    def not_writable(path, flags, *a):  # (another user's file, a read-only mount: opened read-only, as before)
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path, flags, *a)
    monkeypatch.setattr(os, "open", not_writable)
    assert writer_lock.writer_alive(str(living), os.getppid()) is True  # (EBADF again: the pid rule, a living pid)
    assert writer_lock.writer_alive(str(living), _dead_pid()) is False


def test_a_write_whose_new_file_a_recovery_removed_starts_anew(tmp_path, monkeypatch):
    """A recovery may take the lock of a temporary file between its creation and its writer's lock (the
    file of a dead writer of the same name: a reused pid) and remove it: the writer then wrote into a removed
    file and its rename failed (WriteFailed). It notices and creates the file anew."""
    p = tmp_path / "state.pt"
    files.atomic_write(str(p), b"epoch 1", checksum=True)
    real, removed = open, []

    def open_then_recovered(path, *a, **k):
        f = real(path, *a, **k)
        if files.TMP_TAG in str(path) and not removed:
            with writer_lock.claim(str(path), os.getpid()) as alive:  # (a recovery's, before the writer locks)
                assert alive is False
                os.remove(path)
                removed.append(path)
        return f
    monkeypatch.setattr(files, "open", open_then_recovered, raising=False)
    files.atomic_write(str(p), b"epoch 2", checksum=True)
    assert removed and files.verify(str(p)) and p.read_bytes() == b"epoch 2"
    assert sorted(os.listdir(tmp_path)) == ["state.pt", "state.pt.sha256"]


def test_the_writer_holds_its_lock_from_the_file_s_creation_to_its_rename(tmp_path, monkeypatch):
    """The lock is taken before any data and held past the data's rename (between the renames a reader must
    wait), then released (no descriptor left open)."""
    p = tmp_path / "state.pt"
    seen, real = [], os.replace
    fds = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    def data(f):
        seen.append(writer_lock.writer_alive(f.name, os.getpid()))
        f.write(b"epoch 1")

    def replace(src, dst):
        if not dst.endswith(".sha256"):
            seen.append(writer_lock.writer_alive(src, os.getpid()))
        real(src, dst)
    monkeypatch.setattr(files.os, "replace", replace)
    files.atomic_write(str(p), data, binary=True, checksum=True)
    assert seen == [True, True] and files.verify(str(p))
    assert writer_lock.writer_alive(str(p), _dead_pid()) is False  # (released after the rename)
    if fds is not None:
        assert set(os.listdir("/proc/self/fd")) == fds


def test_a_filesystem_whose_inode_numbers_change_still_writes(tmp_path, monkeypatch):
    """Where a file's fstat and stat never agree (some FUSE and network mounts), the writer cannot tell its
    file from a new one: after its tries it writes unlocked, as before, rather than failing every write."""
    monkeypatch.setattr(writer_lock.os.path, "samestat", lambda a, b: False)
    p = tmp_path / "state.pt"
    fds = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    files.atomic_write(str(p), b"epoch 1", checksum=True)
    assert files.verify(str(p)) and p.read_bytes() == b"epoch 1"
    assert sorted(os.listdir(tmp_path)) == ["state.pt", "state.pt.sha256"]
    if fds is not None:
        assert set(os.listdir("/proc/self/fd")) == fds


def test_a_temporary_file_gone_since_the_listing_is_left_alone(tmp_path, monkeypatch):
    """A writer's file renamed into place (or another recovery's) between the folder's listing and its
    recovery: the run start failed with 'cannot write <tmp>: No such file or directory' (exit 2), a file of
    a writer in another pid namespace or without locks. Nothing is left to finish: it goes on."""
    files.atomic_write(str(tmp_path / "summary.md"), "# done")
    tmp = tmp_path / f"summary.md.{files.TMP_TAG}.{_dead_pid()}"
    tmp.write_text("# new")
    real = os.walk

    def renamed_meanwhile(folder):
        for entry in real(folder):
            if tmp.exists():
                os.replace(tmp, tmp_path / "summary.md")  # (its writer's rename, after the listing)
            yield entry
    monkeypatch.setattr(files.os, "walk", renamed_meanwhile)
    files.finish_interrupted_writes(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["summary.md"] and (tmp_path / "summary.md").read_text() == "# new"


class _FakeKernel32:
    """OpenProcess/GetExitCodeProcess of a fake Windows: `procs` maps pid -> exit code (259: running)."""

    def __init__(self, procs, error=87):
        self.procs, self.error, self.closed = procs, error, []

    def OpenProcess(self, access, inherit, pid):
        return pid + 1000 if pid in self.procs else 0

    def GetExitCodeProcess(self, handle, code):
        code._obj.value = self.procs[handle - 1000]
        return 1

    def CloseHandle(self, handle):
        self.closed.append(handle)


def test_pid_alive_on_windows_never_signals(monkeypatch):
    """On Windows os.kill(pid, 0) sends CTRL_C_EVENT to process group `pid` (it would interrupt a living
    writer), no liveness test: OpenProcess/GetExitCodeProcess decide, and where they cannot, alive."""
    def kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) on Windows")
    k32 = _FakeKernel32({10: 259, 11: 0})
    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(writer_lock, "_kernel32", lambda: (k32, lambda: k32.error))
    monkeypatch.setattr(os, "name", "nt")
    got = [writer_lock.pid_alive(pid) for pid in (10, 11, 12)]  # running, exited, no such pid
    k32.error = 5  # (ERROR_ACCESS_DENIED: it exists)
    got.append(writer_lock.pid_alive(12))
    monkeypatch.setattr(writer_lock, "_kernel32", lambda: None)  # (no kernel32: unknown, kept)
    got.append(writer_lock.pid_alive(12))
    monkeypatch.undo()
    assert got == [True, False, False, True, True] and k32.closed == [1010, 1011]
