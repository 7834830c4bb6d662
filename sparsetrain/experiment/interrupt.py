"""Ctrl-C while a command still loads (torch, Ray, the study's modules): one line and exit 130; SIGTERM
while a run trains: stopped as Ctrl-C stops it.

A KeyboardInterrupt raised by the signal there can land in a callback whose exceptions Python
ignores (an import lock's weakref callback prints "Exception ignored in ..."), and the command then
ran on as if never interrupted; so during loading SIGINT ends the process from its handler at once.
Nothing has been written yet, so there is nothing to clean up."""
from __future__ import annotations

import contextlib
import os
import signal
import sys


@contextlib.contextmanager
def exit_on_ctrl_c(what: str):
    """SIGINT (or a KeyboardInterrupt raised in the body) -> "interrupted before the `what` started:
    nothing was written" on stderr and exit code 130; the previous handler is back after the body. A process
    started with SIGINT ignored (a shell's background job) keeps ignoring it, as Python does (it died of the
    terminal's Ctrl-C while loading, then ignored it once training, before 2026-12-07)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return

    def stop(signum=None, frame=None):
        os.write(2, f"interrupted before the {what} started: nothing was written\n".encode())
        os._exit(130)
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    except KeyboardInterrupt:
        stop()
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM (`kill`, `timeout`, a scheduler's preemption) in the body raises KeyboardInterrupt("SIGTERM"),
    so a run stops as on Ctrl-C (its seed recorded stopped, the "interrupted: ..." line); the process then
    dies of SIGTERM as before (exit status 143 in a shell). Not under torchrun (WORLD_SIZE > 1), whose ranks
    SIGTERM may reach inside a collective: there the default action stays."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        yield
        return
    got = []

    def stop(signum, frame):
        if not got:  # (a second SIGTERM, during the stop, kills at once: the default action)
            got.append(signum)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if not got:
            signal.signal(signal.SIGTERM, previous)
        else:  # (the exit status says SIGTERM, as for a process it killed: a sweep's log names the signal)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.kill(os.getpid(), signal.SIGTERM)
