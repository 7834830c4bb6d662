"""A run's log in the sweep's folder (OUT/<sweep>/logs/<run>.log): opened to append, its `.running`
marker (the experiment process has started; it names the process, for the sweep to stop one whose cancel
came too late), and the one line of an error the process wrote there."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time

from ..experiment.files import WriteFailed
from ..experiment.seed_status import proc_stat, process_running, start_ticks, ticks_of

__all__ = ["open_log", "end_line", "write_marker", "remove_marker", "log_lines", "error_line", "exception_line",
           "cancelled_line", "name_process", "stop_process", "stop_processes", "stop_group", "stop_groups"]


def open_log(log: str, header: str):
    """The run's log opened to append, `header` written; WriteFailed naming the file where it cannot be
    (a read-only or full disk: a bare OSError before 2026-12-06)."""
    try:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        f = open(log, "a")
    except OSError as e:
        raise WriteFailed(e.errno, e.strerror or str(e), log) from None
    try:
        f.write(header)
        f.flush()
        return f
    except OSError as e:
        f.close()
        raise WriteFailed(e.errno, e.strerror or str(e), log) from None


def end_line(f, log: str, line: str) -> str:
    """`line` appended to the open log `f` (`log`) after its process ended; "" or, where it cannot be written
    (a full disk), "cannot write LOG: why" for the run's outcome to name. Unbuffered: a failed write leaves
    nothing for closing `f` to flush again (a bare OSError there replaced the run's outcome before 2026-12-06:
    a finished run was failed, a cancelled one no longer cancelled)."""
    try:
        os.write(f.fileno(), line.encode())
        return ""
    except OSError as e:
        return f"cannot write {log}: {e.strerror or e}"


@contextlib.contextmanager
def locked(f):
    """The open log `f` locked (flock; unlocked where the filesystem cannot) while its last line is chosen and written:
    the run's own exit line (run_experiment) and the sweep's stop's cancelled one (stop_processes) each see the other's
    (before 2026-12-08 the stop's could come first and the exit line after it: seen under load)."""
    try:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except (ImportError, OSError):
        yield f
        return
    try:
        yield f
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def last_line(log: str) -> str:
    """The log's last line ("" where it cannot be read): its last 4 KiB read."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            return (f.read().decode(errors="replace").splitlines() or [""])[-1]
    except OSError:
        return ""


def write_marker(marker: str) -> None:
    """The log's `.running` marker (its process has started); WriteFailed naming it where it cannot be written."""
    try:
        open(marker, "w").close()
    except OSError as e:
        raise WriteFailed(e.errno, e.strerror or str(e), marker) from None


def cancelled_line(seconds: float) -> str:
    """The log's last line of a run the sweep stopped."""
    return f"=== cancelled after {seconds:.0f} s (the sweep was stopped; its re-run resumes)\n"


def name_process(marker: str, pid: int) -> None:
    """The `.running` marker names the experiment's process ("PID HOST TICKS": its start, clock ticks since boot
    (Linux; without /proc "PID HOST"), for stop_process to tell a pid reused since); a marker that
    cannot be written keeps its earlier (empty) content: the sweep then leaves the stop to Ray."""
    ticks = start_ticks(pid)
    try:
        with open(marker, "w") as f:
            f.write(f"{pid} {socket.gethostname()}" + (f" {ticks}" if ticks is not None else "") + "\n")
    except OSError:
        pass


def stop_process(log: str, grace: float = 5.0) -> None:
    """A run whose Ray task did not stop in time on the sweep's cancel (a cancel lost or late under load:
    the sweep waited 90 s for it, past a scheduler's patience, before 2026-12-06): the process its log's
    `.running` marker names (name_process; on this machine only) and its children (the process group it leads:
    stop_group; before 2026-12-07 the process alone) get SIGTERM, SIGKILL after `grace` s,
    then the log ends with cancelled_line and the marker is removed; a process of the pid that started at another
    time than the marker records is another (a reused pid: signalled before 2026-12-07) and is left alone. Nothing
    to do without a marker (its task cleaned up), but for a log whose last line says a signal ended the process (Ray's
    forced cancel kills it with its worker, which may still write that line): cancelled after it. Several runs:
    stop_processes."""
    stop_processes([log], grace)


def stop_processes(logs: list, grace: float = 5.0) -> None:
    """stop_process for each log of `logs` at once: every process signalled first, then one wait (at most `grace` s
    after the SIGTERM, `grace` s after the SIGKILL) whatever their number (one at a time before 2026-12-07: up to
    2 x `grace` s per run, so N late runs kept the sweep N x 10 s past a Ctrl-C, a scheduler's patience ~30 s)."""
    targets, ends = [], []
    for log in logs:
        marker = log + ".running"
        try:
            with open(marker) as f:
                pid, host, ticks = (f.read().split() + ["", "", ""])[:3]
            ends.append((log, marker, time.time() - os.path.getmtime(marker)))
        except OSError:  # (ended: its log ends "exit code -9" where Ray's forced cancel killed it with its worker,
            # the worker still writing, before 2026-12-08 the log's last line; cancelled after that line now)
            if (seconds := _killed_after(log)) is not None:
                ends.append((log, None, seconds))
            continue
        if pid.isdigit() and int(pid) > 1 and host == socket.gethostname():  # (0, 1: never a run's process)
            fields = proc_stat(int(pid))  # (a run's leads its own group, run_experiment; an older marker's may not)
            # a live process of the pid started at another time than the marker's: the pid was reused, never signalled
            if not (ticks.isdigit() and fields is not None and ticks_of(fields) != int(ticks)):
                targets.append((int(pid), fields is None or len(fields) < 3 or fields[2] == pid))
    stop_groups(targets, grace)
    for log, marker, seconds in ends:
        try:
            with open(log, "a") as f, locked(f):
                f.write(cancelled_line(seconds))
        except OSError:
            pass
        if marker:
            remove_marker(marker)


def _killed_after(log: str) -> float | None:
    """The seconds of a run whose log's last line says a signal ended it ("=== exit code -9 after 11 s"), else None."""
    m = re.fullmatch(r"=== exit code -[0-9]+ after ([0-9]+) s", last_line(log))
    return float(m.group(1)) if m else None


def stop_group(pid: int, grace: float, group: bool = True) -> None:
    """SIGTERM to process `pid` and, with `group`, every process of the group it leads (a run's: started in its own
    session, so its children (a DataLoader's workers) are in it) and every descendant of them (Linux: torchrun's
    ranks, in sessions of their own), SIGKILL after `grace` s to what still runs; returns once nothing of it runs, or
    after another `grace` s (stop_groups)."""
    stop_groups([(pid, group)], grace)


def stop_groups(targets: list, grace: float) -> None:
    """stop_group for each `(pid, group)` of `targets` at once: SIGTERM to all, SIGKILL to what still runs after
    `grace` s; returns once nothing of them runs, or after another `grace` s. Their descendants (by parent pid,
    collected before each signal: one whose parent died is reparented, out of reach) are signalled and waited for
    too (before 2026-12-07 the group alone: torchrun's ranks, in sessions of their own, ran on, orphaned, where
    torchrun needed the SIGKILL)."""
    tracked = {}  # {pid: start ticks} of every process of theirs seen (a pid reused since is not theirs)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = _processes()
        tree = _tree(procs, targets, tracked) if procs is not None else {}
        tracked.update(tree)
        for pid, group in targets:  # (the group's: also a process forked since the snapshot)
            if group or procs is None:
                _signalled(os.killpg if group else os.kill, pid, sig)
        groups = _groups(targets)
        for pid in tree:  # (those of a group were signalled with it)
            if procs[pid][2] not in groups:
                _signalled(os.kill, pid, sig)
        end = time.time() + grace
        while _stopping(targets, tracked) and time.time() < end:
            time.sleep(0.05)
        if not _stopping(targets, tracked):
            return


def _groups(targets: list) -> set:
    """The process group ids (as /proc writes them) of the `(pid, group)` targets that lead one."""
    return {str(pid) for pid, group in targets if group}


def _signalled(kill, pid: int, sig: int) -> bool:
    """kill(pid, sig) went through (False: gone, or no longer ours; sig 0: whether it can be signalled)."""
    try:
        kill(pid, sig)
        return True
    except OSError:
        return False


def _processes() -> dict | None:
    """{pid: (state, parent pid, process group, start ticks)} of every process (Linux: /proc/<pid>/stat's fields 3,
    4, 5 as strings and 22, seed_status.ticks_of); None without /proc."""
    if not os.path.isdir("/proc"):
        return None
    out = {}
    for name in os.listdir("/proc"):
        fields = proc_stat(int(name)) if name.isdigit() else None
        if (ticks := ticks_of(fields)) is not None:  # (a stat without its field 22 is none of ours to track)
            out[int(name)] = (fields[0], fields[1], fields[2], ticks)
    return out


def _tree(procs: dict, targets: list, tracked: dict) -> dict:
    """{pid: start ticks} of the live processes of `targets` in `procs` (_processes): each target's process, its
    group's (with `group`), those of `tracked` (same start) and all their descendants."""
    groups = _groups(targets)
    live = {pid for pid, p in procs.items() if p[0] not in ("Z", "X")}
    todo = [pid for pid, _ in targets if pid in live]
    todo += [pid for pid in live if procs[pid][2] in groups or tracked.get(pid) == procs[pid][3]]
    children = {}
    for pid in live:
        children.setdefault(procs[pid][1], []).append(pid)
    tree = {}
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree[pid] = procs[pid][3]
            todo += children.get(str(pid), [])
    return tree


def _stopping(targets: list, tracked: dict) -> bool:
    """A process of `targets` still runs: one of `tracked` ({pid: start ticks}) or of a target's group (Linux), else
    (no /proc) whether a target's group or process runs."""
    procs = _processes()
    if procs is None:  # (a group can be signalled while a process of it lives, a zombie too)
        return any(_signalled(os.killpg, pid, 0) if group else process_running(pid) for pid, group in targets)
    groups = _groups(targets)
    return any(p[0] not in ("Z", "X") and (tracked.get(pid) == p[3] or p[2] in groups) for pid, p in procs.items())


def remove_marker(marker: str) -> str:
    """The log's `.running` marker removed (its process has ended), if there; "" or, where it cannot be (a
    read-only logs/ folder), "cannot remove MARKER: why" for the run's outcome to name (a bare OSError there
    replaced the run's outcome before 2026-12-06, as end_line's did; the sweep's next start removes it)."""
    try:
        if os.path.isfile(marker):
            os.remove(marker)
        return ""
    except OSError as e:
        return f"cannot remove {marker}: {e.strerror or e}"


def log_lines(log: str, start: int) -> list[str]:
    """The lines the process wrote after `start` in its log ([] if it cannot be read)."""
    try:
        with open(log, errors="replace") as f:
            f.seek(start)
            return f.read().splitlines()
    except OSError:
        return []


def error_line(log: str, start: int) -> str:
    """': <the last "error: " line>' the process wrote after `start` in its log, or ''."""
    lines = [ln.strip() for ln in log_lines(log, start) if ln.startswith("error: ")]
    return f": {lines[-1][len('error: '):][:300]}" if lines else ""


def exception_line(log: str, start: int) -> str:
    """': <the exception line>' ending the last traceback the process wrote after `start` in its log, or ''."""
    lines = log_lines(log, start)
    tb = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last):")), default=None)
    if tb is None:
        return ""
    # (the exception line: the first unindented one after the frames; a message's further lines follow it)
    ends = [ln.strip() for ln in lines[tb + 1:] if ln.strip() and not ln[0].isspace() and not ln.startswith("=== ")]
    return f": {ends[0][:300]}" if ends else ""
