"""A seed's status record, RUN/seed{S}/status.json: whether a seed whose phases lack results failed, still
runs or was stopped (its folder alone cannot tell). Written atomically (files.write_json) on rank 0: "running"
with pid, host and start time as the seed starts (a resumed seed overwrites it), "failed" with the one line
of the error it raised, "stopped" where it was interrupted (Ctrl-C), "done" once its phases finished. A
killed process (SIGKILL, OOM) leaves "running": the report says "stopped (pid N gone)" where no process of
that pid lives on this host, or (Linux, since 2026-12-06: the record's boot id and the process's start time, in
clock ticks since boot, /proc/<pid>/stat's field 22) one does but is another process (a reused pid) or the host
restarted since; another host's cannot be checked: "running on HOST (not checkable from here)". A record
without those fields (an older one, another OS's) is checked by the pid alone."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from ..engine.writer_lock import pid_alive
from . import distributed as dist
from .files import WriteFailed, write_json
from .reuse import phase_done

__all__ = ["STATUS", "SeedStatus", "read_status", "describe", "proc_stat", "process_running", "start_ticks", "ticks_of"]

STATUS = "status.json"


def _boot_id() -> str | None:
    """This host's boot id (Linux; None elsewhere): a process start time counts clock ticks since this boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def proc_stat(pid: int) -> list[str] | None:
    """Process `pid`'s /proc/<pid>/stat fields from the third (its state) on, those after the name's closing ")"
    (Linux); None where there is no such process or no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return None


def process_running(pid: int) -> bool:
    """A process of `pid` runs: one that ended but is not yet reaped by its parent (a zombie, /proc's state Z or X)
    does not; without /proc, pid_alive."""
    fields = proc_stat(pid)
    return fields[0] not in ("Z", "X") if fields else pid_alive(pid)


def start_ticks(pid: int) -> int | None:
    """Process `pid`'s start time, clock ticks since boot (Linux: /proc/<pid>/stat's field 22); None where there is
    no such process or no /proc."""
    return ticks_of(proc_stat(pid))


def ticks_of(fields: list[str] | None) -> int | None:
    """The start time in proc_stat's `fields` (field 22, clock ticks since boot); None without it."""
    try:
        return int(fields[22 - 3]) if fields is not None else None
    except (ValueError, IndexError):
        return None


def _run_gone(record: dict) -> bool:
    """Whether the recorded running process on this host no longer runs: the boot or the pid's start time differ
    (a reused pid, this process's own included) where both are recorded and readable, else no process of the pid
    lives (this process's own pid: a dead one's reused)."""
    pid, boot, ticks = record.get("pid"), record.get("boot_id"), record.get("start_ticks")
    if type(pid) is not int or pid <= 0:
        return False
    here = _boot_id()
    if isinstance(boot, str) and type(ticks) is int and here is not None:
        return boot != here or start_ticks(pid) != ticks
    return pid == os.getpid() or not pid_alive(pid)


def _error_line(e: BaseException) -> str:
    """`Type: the message's first line` (a traceback's last line, as the sweep's runs say theirs)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class SeedStatus:
    """The status record of the seed in progress: start(sd, phases) at its start, done() at its end; a
    context manager whose exit marks the seed in progress failed (an exception) or stopped (KeyboardInterrupt,
    SystemExit). A record that cannot be written (a full disk) never hides the run's own error."""

    def __init__(self):
        self._sd, self._record = None, {}

    def _write(self, state: str, everywhere: bool = True, **more) -> None:
        """Rank 0 writes the record; `everywhere` (start, done: every rank calls them) its WriteFailed is raised on
        every rank (a collective: raised on rank 0 alone, the others died on their next collective with a
        traceback); not on the way out of an error (__exit__), where the ranks may be out of step."""
        if self._sd is None:
            return
        write = lambda: write_json(os.path.join(self._sd, STATUS), {**self._record, "state": state, **more})  # noqa: E731
        if everywhere:
            dist.on_main(write, (WriteFailed,))
        elif dist.is_main():
            write()

    def start(self, sd: str, phases) -> None:
        """Record the seed of folder `sd` as running its `phases` in this process; a seed recorded done whose
        phases have all finished (a finished run invoked again: nothing runs) keeps its record and gets no other."""
        record = read_status(sd)
        if record and record["state"] == "done" and all(phase_done(os.path.join(sd, p)) for p in phases):
            self._sd = None  # (its pid and times were the no-op's before 2026-12-07, not those of the seed's run)
            return
        self._sd = sd
        self._record = {"pid": os.getpid(), "host": socket.gethostname(), "phases": list(phases),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        boot, ticks = _boot_id(), start_ticks(os.getpid())
        if boot is not None and ticks is not None:  # (Linux: a reader tells a reused pid, a restarted host)
            self._record.update(boot_id=boot, start_ticks=ticks)
        self._write("running")

    def done(self) -> None:
        """Record the seed in progress as done (its phases finished)."""
        self._write("done", ended=time.strftime("%Y-%m-%d %H:%M:%S %z"))
        self._sd = None

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb) -> None:
        if self._sd is not None and e is not None:
            with contextlib.suppress(OSError):  # (WriteFailed is an OSError: the run's error stays the one told)
                # (under torchrun, another rank killed: gloo's "Connection reset/closed by peer" here, recorded as
                # this rank's own failure before 2026-12-07)
                peer = dist.world() > 1 and isinstance(e, RuntimeError) and "by peer" in str(e)
                stopped = isinstance(e, (KeyboardInterrupt, SystemExit)) or peer
                self._write("stopped" if stopped else "failed", everywhere=False,
                            error=("another rank ended: " if peer else "") + _error_line(e),
                            ended=time.strftime("%Y-%m-%d %H:%M:%S %z"))
        self._sd = None


def read_status(sd: str) -> dict | None:
    """The seed folder `sd`'s status record; None where there is none (an older run's, a seed not started)
    or it does not parse as one."""
    try:
        with open(os.path.join(sd, STATUS)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("state"), str) else None


def describe(record: dict | None) -> str:
    """A status record in words: done, running (pid, host, since), running on HOST (not checkable from here),
    stopped (pid N gone), failed: error."""
    if record is None:
        return "no status record"
    state, pid, host = record["state"], record.get("pid"), record.get("host")
    where = f"pid {pid} on {host}, since {record.get('started', '?')}"
    if state == "running":
        if isinstance(host, str) and host != socket.gethostname():  # (its pid means nothing here)
            return f"running on {host} (not checkable from here; pid {pid}, since {record.get('started', '?')})"
        gone = host == socket.gethostname() and _run_gone(record)
        return f"stopped (pid {pid} gone; started {record.get('started', '?')})" if gone else f"running ({where})"
    if state in ("failed", "stopped"):
        return f"{state}: {record.get('error', '?')} ({where})"
    return state
