"""A seed's status record, RUN/seed{S}/status.json: whether a seed whose phases lack results failed, still
runs or was stopped (its folder alone cannot tell). Written atomically (files.write_json) on rank 0: "running"
with pid, host and start time as the seed starts (a resumed seed overwrites it), "failed" with the one line
of the error it raised, "stopped" where it was interrupted (Ctrl-C), "done" once its phases finished. A
killed process (SIGKILL, OOM) leaves "running": the report says "stopped (pid N gone)" where no process of
that pid lives on this host (another host's cannot be checked: still "running" there)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from ..engine.writer_lock import pid_alive
from . import distributed as dist
from .files import write_json

__all__ = ["STATUS", "SeedStatus", "read_status", "describe"]

STATUS = "status.json"


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

    def _write(self, state: str, **more) -> None:
        if self._sd is not None and dist.is_main():
            write_json(os.path.join(self._sd, STATUS), {**self._record, "state": state, **more})

    def start(self, sd: str, phases) -> None:
        """Record the seed of folder `sd` as running its `phases` in this process."""
        self._sd = sd
        self._record = {"pid": os.getpid(), "host": socket.gethostname(), "phases": list(phases),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
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
                stopped = isinstance(e, (KeyboardInterrupt, SystemExit))
                self._write("stopped" if stopped else "failed", error=_error_line(e),
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
    """A status record in words: done, running (pid, host, since), stopped (pid N gone), failed: error."""
    if record is None:
        return "no status record"
    state, pid, host = record["state"], record.get("pid"), record.get("host")
    where = f"pid {pid} on {host}, since {record.get('started', '?')}"
    if state == "running":
        alive = not (host == socket.gethostname() and type(pid) is int and pid > 0
                     and (pid == os.getpid() or not pid_alive(pid)))  # (this process's pid: a dead one's reused)
        return f"running ({where})" if alive else f"stopped (pid {pid} gone; started {record.get('started', '?')})"
    if state in ("failed", "stopped"):
        return f"{state}: {record.get('error', '?')} ({where})"
    return state
