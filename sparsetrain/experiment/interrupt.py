"""Ctrl-C while a command still loads (torch, Ray, the study's modules): one line and exit 130.

A KeyboardInterrupt raised by the signal there can land in a callback whose exceptions Python
ignores (an import lock's weakref callback prints "Exception ignored in ..."), and the command then
ran on as if never interrupted; so during loading SIGINT ends the process from its handler at once.
Nothing has been written yet, so there is nothing to clean up."""
from __future__ import annotations

import contextlib
import os
import signal


@contextlib.contextmanager
def exit_on_ctrl_c(what: str):
    """SIGINT (or a KeyboardInterrupt raised in the body) -> "interrupted before the `what` started:
    nothing was written" on stderr and exit code 130; the previous handler is back after the body."""
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
