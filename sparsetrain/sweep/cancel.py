"""The sweep's stop of its running runs (Ctrl-C, SIGTERM, a status.json it cannot write): every Ray task
cancelled; one still running after the grace (a cancel Ray lost or delivered late under load) cancelled by force
and its experiment process stopped by the sweep itself (runlog.stop_processes: all of them at once). A further Ctrl-C
or SIGTERM meanwhile only cuts the waits short: the stop itself always happens."""
from __future__ import annotations

import signal
import time

from .runlog import stop_processes

__all__ = ["cancel_runs"]


def cancel_runs(ray, logs: dict, grace: float, stop_grace: float = 5.0) -> None:
    """Cancel the Ray tasks of `logs` ({task ref: its run's log}); a task still running `grace` s later is
    cancelled by force and its run's process (named by the log's `.running` marker) stopped. A second Ctrl-C or
    SIGTERM while this waits forces every task not yet seen ended at once (it skipped the forced cancel and the
    stop before 2026-12-07: the experiments ran on). The late runs' processes are stopped together, bounded once
    whatever their number (runlog.stop_processes: SIGKILL `stop_grace` s after the SIGTERM, then at most `stop_grace`
    s more; one run after another before 2026-12-07, up to 2 x `stop_grace` s each)."""
    hurry = {"waiting": False, "signals": 0}  # (a further interrupt raises only to end a wait)

    def note(signum, frame):
        hurry["signals"] += 1
        if hurry["waiting"]:
            raise KeyboardInterrupt
    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # (a KeyboardInterrupt out of here skipped the stop)
        try:
            before[sig] = signal.signal(sig, note)
        except ValueError:  # (not the main thread, where signals land)
            pass
    try:
        refs = list(logs)
        for ref in refs:
            ray.cancel(ref)
        late = _wait(ray, refs, grace, hurry)
        for ref in late:  # Ray kills the task's worker; the sweep its experiment process
            ray.cancel(ref, force=True)
        if late and not hurry["signals"]:
            _wait(ray, late, 5, hurry)
        stop_processes([logs[ref] for ref in late], stop_grace)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _wait(ray, refs: list, timeout: float, hurry: dict) -> list:
    """The tasks of `refs` still running after `timeout` s, or all of them once an interrupt comes (`hurry`)."""
    if hurry["signals"]:
        return refs
    try:
        hurry["waiting"] = True
        return ray.wait(refs, num_returns=len(refs), timeout=timeout)[1]
    except KeyboardInterrupt:
        return refs
    finally:
        hurry["waiting"] = False
