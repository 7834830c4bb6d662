"""Executing a plan on Ray: one Ray task per run, each an ordinary `python -m sparsetrain.experiment`
process with its own log, submitted once the runs it depends on have finished.

Ray places the tasks (`--cpus-per-run`, `--gpus-per-run` as task resources, on this machine or on
a cluster with `--address`) and retries a failed one (`--retries`: Ray's task retries on
`RunFailed`; the experiment resumes from its last completed epoch, so a retry continues). A run
that exits 2 (a usage error: retrying cannot help) is not retried. Ctrl-C cancels the running
tasks, which stop their experiment process: each loses at most its current epoch, and re-running
the sweep resumes it (SIGTERM too; a task still running CANCEL_GRACE_S after the cancel is
forced, its process stopped by the sweep). A run another process took first (the experiment's exit
EXIT_BUSY) waits for that process, as one seen busy before submitting does.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from ..experiment.files import (EXIT_BUSY, Busy, ReadFailed, RemoveFailed, WriteFailed, finish_interrupted_writes,
                                 folder_busy, folder_lock, remove_file, write_json)
from ..experiment.reuse import phase_done
from .cancel import cancel_runs
from .plan import Run
from .runlog import (cancelled_line, end_line, error_line, exception_line, last_line, locked, name_process, open_log,
                     remove_marker, stop_group, write_marker)

__all__ = ["execute", "shutdown_ray", "RunFailed", "UsageFailed", "RunBusy", "SweepError", "run_experiment"]


class SweepError(Exception):
    """A sweep cannot start (e.g. Ray is not installed): one line and exit 2."""


class RunFailed(RuntimeError):
    """The experiment process exited with an error (retried by Ray)."""


class UsageFailed(RuntimeError):
    """The experiment rejected its arguments or its files (exit 2; not retried)."""


class RunBusy(RuntimeError):
    """Another process (another sweep) took the run's directory first (exit EXIT_BUSY): the sweep
    waits for it, as for a run it saw busy before submitting."""


CANCEL_GRACE_S = 10  # (s) for the running tasks to stop their processes on the sweep's cancel, before it forces them


def run_experiment(argv: list[str], log: str, threads: int, cwd: str, program: str = "sparsetrain.experiment",
                   gpus: float = 0) -> tuple[float, str]:
    """One experiment process (`python -m <program> <argv>`, or a script path), its output appended
    to `log`; returns its seconds and "" or why its log's last line could not be written (runlog.end_line), or
    its `.running` marker removed (runlog.remove_marker).
    Runs inside a Ray worker: a cancel (KeyboardInterrupt) stops the process and its children (its process group,
    runlog.stop_group: it runs in a session of its own), which resumes on the next attempt. Without a GPU share,
    CUDA is hidden from it (Ray sets CUDA_VISIBLE_DEVICES only for tasks that ask for GPUs: the others would all
    use GPU 0)."""
    marker, t0 = log + ".running", time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the run's CPU share (its --threads too)
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [program] if program.endswith(".py") else ["-m", program]
    cwd, moved = _run_folder(cwd, log, env)
    f = open_log(log, f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} python {shlex.join(cmd + argv)}\n{moved}")
    with f:
        start = f.tell()  # (this attempt's output: its one-line error, if any)
        try:
            write_marker(marker)  # (before the process: one it cannot write was left running unwatched)
            # (its own session: a stop reaches its children; a terminal's Ctrl-C reaches the sweep, which cancels this)
            proc = subprocess.Popen([sys.executable, *cmd, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    start_new_session=True)
        except BaseException:
            remove_marker(marker)
            raise
        try:
            name_process(marker, proc.pid)  # (for the sweep to stop it where this task's cancel comes too late)
            while True:  # (polled: a cancel's KeyboardInterrupt lands only while Python runs)
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
            with locked(f):  # (before the marker goes: the sweep's stop, finding none, looks for this line)
                # the sweep stopped it (runlog.stop_processes, where this task's cancel was lost) and ended its log
                # "cancelled": an exit line after it contradicted it (this loop wakes up to 0.5 s late)
                swept = last_line(log).startswith("=== cancelled after")
                lost = "" if swept else end_line(f, log, f"=== exit code {rc} after {time.time() - t0:.0f} s\n")
        except BaseException:  # cancelled: stop the experiment and its children (atomic files; it resumes later)
            stop_group(proc.pid, grace=60)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            end_line(f, log, cancelled_line(time.time() - t0))
            raise  # (cancelled, whether or not its log could say so)
        finally:  # (one that cannot be removed: the outcome stands, naming it, as for a lost last line)
            if stale := remove_marker(marker):
                end_line(f, log, f"=== {stale}\n")
        lost = "; ".join(w for w in (lost, stale) if w)
    see = f"see {log}" + (f"; {lost}" if lost else "")
    if rc == EXIT_BUSY:
        raise RunBusy(f"exit code {rc}: its run directory was in use by another process ({see})")
    if rc == 2:  # (the experiment's one line, "error: ...", or "training diverged ...")
        raise UsageFailed(f"exit code 2{error_line(log, start)} ({see})")
    if rc != 0:  # (a crash's exception line, or the signal that killed it: "exit code 1" alone said neither)
        why = f" ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals() else exception_line(log, start)
        raise RunFailed(f"exit code {rc}{why} ({see})")
    return time.time() - t0, lost


def _run_folder(cwd: str, log: str, env: dict) -> tuple[str, str]:
    """The folder the run starts in: the sweep's own (`cwd`), or, on a node without it (a cluster's other
    machine: a bare FileNotFoundError before 2026-12-06), the log's folder (on the shared --out; every path
    of a run is absolute), `env`'s PYTHONPATH then leading to the sparsetrain this worker runs (`-m` found it
    from `cwd`); returns it and a log line saying so ("" for `cwd`)."""
    if os.path.isdir(cwd):
        return cwd, ""
    here = os.path.dirname(os.path.abspath(log))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (holds sparsetrain/)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return here, f"=== {cwd} (where the sweep started) does not exist on this node: the run starts in {here}\n"


def _error_text(e: BaseException) -> str:
    """The root message of a Ray task error (its cause), one line."""
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


class _Progress:
    """The live line: done / running / failed / queued and an ETA. On a terminal a tqdm bar (its ETA:
    the mean time per finished run); in a log file one plain line per change (at most every 10 s)."""

    def __init__(self, total: int, skipped: int):
        from tqdm import tqdm
        self.tty, self.t0, self.last = sys.stderr.isatty(), time.time(), ("", 0.0)
        self.bar = tqdm(total=total, desc="sweep", unit="run", dynamic_ncols=True, file=sys.stderr,
                        disable=not self.tty)
        if skipped:
            self.write(f"sweep: {skipped} run(s) already finished (skipped)")

    def update(self, done: int, running: int, failed: int, queued: int) -> None:
        self.bar.set_postfix_str(f"running {running}, failed {failed}, queued {queued}", refresh=False)
        self.bar.update(done + failed - self.bar.n)
        line = f"{done + failed}/{self.bar.total} runs: {done} done, {running} running, {failed} failed, {queued} queued"
        now, finished = time.time(), done + failed
        if self.tty or line == self.last[0] or (now - self.last[1] < 10 and finished < self.bar.total):
            return
        left = (now - self.t0) / finished * (self.bar.total - finished) if finished else 0
        print(f"sweep: {line}, {now - self.t0:.0f} s" + (f", ETA ~{left / 60:.0f} min" if left else ""),
              file=sys.stderr, flush=True)
        self.last = (line, now)

    def write(self, msg: str) -> None:
        self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _check_reachable(address: str) -> None:
    """A HOST:PORT --address answers a TCP connection within 10 s, or SweepError at once (ray.init
    retries an unreachable one for ~14 minutes before it fails)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:  # ('auto', ray://: Ray's own resolution)
        return
    import socket
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError) as e:
        raise _unreachable(address, e.strerror or e) from None


def _unreachable(address: str, why) -> SweepError:
    return SweepError(f"--address {address}: no Ray cluster reachable there ({why}); start one with "
                      "`ray start --head`, or leave --address out for a local Ray")


def execute(plan: list[Run], sweep_dir: str, **options) -> dict:
    """Run every unfinished run of `plan` on Ray; returns {run name: status} (also written to
    SWEEP/status.json after every change): state queued (waiting for its dependencies) | submitted
    (to Ray, which may hold it for resources) | running (its process started) | done | failed |
    skipped (finished earlier) | interrupted, seconds (of its last attempt: a retry resumes the run), log
    path, error. Options: cpus, gpus (per run), max_concurrent, retries, address (of a Ray cluster). One
    sweep at a time per folder (its lock)."""
    try:
        with folder_lock(os.path.abspath(sweep_dir)):
            return _execute(plan, sweep_dir, **options)
    except (Busy, WriteFailed) as e:  # (another sweep holds the folder; a file, its lock too, cannot be written)
        raise SweepError(str(e)) from None


def _execute(plan: list[Run], sweep_dir: str, *, cpus: float = 1, gpus: float = 0, max_concurrent: int = 0,
             retries: int = 1, address: str = "") -> dict:
    logs = os.path.join(os.path.abspath(sweep_dir), "logs")  # (absolute: Ray workers have their own cwd)
    status = {r.name: {"state": "skipped" if r.done() else "queued", "kind": r.kind, "run_dir": r.run_dir,
                       "log": os.path.join(logs, f"{r.name}.log"), "deps": r.deps} for r in plan}
    try:
        os.makedirs(logs, exist_ok=True)
    except OSError as e:  # (a traceback before 2026-12-06)
        raise WriteFailed(e.errno, e.strerror or str(e), logs) from None
    # what a killed sweep left half-written (status.json's, the report's temporary files: they piled up before
    # 2026-12-06), under the folder's lock as a run start does
    finish_interrupted_writes(os.path.abspath(sweep_dir))
    try:
        leftover = [f for f in os.listdir(logs) if f.endswith(".running")]
    except OSError as e:  # (an unreadable logs/: a traceback before 2026-12-06)
        raise ReadFailed(e.errno, e.strerror or str(e), logs) from None
    for f in leftover:  # markers a killed worker left behind: nothing of this sweep runs yet
        # (a read-only logs/: a traceback, then "cannot write" the marker it could not remove, before 2026-12-06)
        remove_file(os.path.join(logs, f), RemoveFailed)
    for r in plan:
        if r.error:  # rejected by the experiment's parser: nothing ran; the log says why
            status[r.name].update(state="failed", error=r.error, point={k: str(v) for k, v in r.point.items()})
            open_log(status[r.name]["log"], f"=== not run: the experiment rejects this grid point {r.point}\n"
                      f"{r.error}\n").close()
    try:  # a finished run keeps the seconds an earlier invocation measured
        with open(os.path.join(sweep_dir, "status.json")) as f:
            before = json.load(f)
        for name, s in status.items():
            if s["state"] == "skipped" and "seconds" in before.get(name, {}):
                s["seconds"] = before[name]["seconds"]
    except (OSError, ValueError, AttributeError, TypeError):  # (none, or a hand-edited one: not its seconds)
        pass
    written = {}

    def save():  # status.json after a change only (the loop polls Ray every second)
        if status != written.get("last"):
            write_json(os.path.join(sweep_dir, "status.json"), status)
            written["last"] = json.loads(json.dumps(status))
    todo = [r for r in plan if status[r.name]["state"] == "queued"]
    save()
    if not todo:
        return status
    try:
        import ray
    except ImportError as e:
        # (sparsetrain is installed from its checkout, not an index: 'sparsetrain[sweep]' named a package of PyPI's)
        raise SweepError(f"running a sweep needs Ray ({e}): pip install ray (or, in the sparsetrain checkout, "
                         "pip install --no-build-isolation '.[sweep]'; make install installs it)") from None
    if not ray.is_initialized():
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False, logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise _unreachable(address, e) from None
        else:
            ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    # a request the local Ray can never meet would wait forever (a cluster given by --address may scale)
    offered = ray.cluster_resources()
    for flag, want, key in (("--cpus-per-run", cpus, "CPU"), ("--gpus-per-run", gpus, "GPU")):
        if not address and want > offered.get(key, 0):
            raise SweepError(f"{flag} {want:g}: this machine's Ray offers {offered.get(key, 0):g} {key}s in all, so "
                             "no run could ever start; ask for less")
    task = ray.remote(run_experiment).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                                               retry_exceptions=[RunFailed])
    threads = max(1, int(cpus))
    cwd = os.getcwd()
    running: dict = {}  # ObjectRef -> run
    progress = _Progress(len(todo), sum(s["state"] == "skipped" for s in status.values()))
    by_name = {r.name: r for r in plan}
    # a dep that finished every phase this run links from it (a study's vanilla, before one of its distillations
    # diverged) serves it as a finished one does, whatever its state: failed ("not run" before 2026-12-06), or
    # queued or running (a partly finished study of an earlier sweep owns its finished vanilla, plan.py)
    served = lambda d, r: by_name[d].run_dir and d in r.needs and all(  # noqa: E731
        phase_done(os.path.join(by_name[d].run_dir, f"seed{r.seed}", p)) for p in r.needs[d])
    ok = lambda d, r: status[d]["state"] in ("done", "skipped") or served(d, r)  # noqa: E731
    before_term = signal.getsignal(signal.SIGTERM)  # (Ray's, set by ray.init; None: set from C)
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # (not the main thread, where signals land)
        before_term = _terminate
    try:
        while todo or running:
            for r in list(todo):
                failed = [d for d in r.deps if status[d]["state"] == "failed" and not served(d, r)]
                if failed:
                    status[r.name].update(state="failed", error=f"not run: {', '.join(failed)} failed",
                                          log=status[failed[0]]["log"])  # (it has none: the failure's)
                    todo.remove(r)
                elif all(ok(d, r) for d in r.deps) and (not max_concurrent or len(running) < max_concurrent):
                    if r.run_dir and folder_busy(r.run_dir):  # another sweep (same --out) is running it: wait
                        status[r.name]["waiting"] = "another process is running this run"
                        continue
                    if status[r.name].pop("waiting", None) and r.done():  # ... and it finished it
                        status[r.name].update(state="skipped", finished_elsewhere=True)
                        todo.remove(r)
                        continue
                    running[task.remote(r.argv, status[r.name]["log"], threads, cwd, r.program, gpus)] = r
                    status[r.name].update(state="submitted", submitted=time.time())  # (running once it starts)
                    todo.remove(r)
            save()
            if running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            else:  # (only runs another sweep holds, or none startable: poll once a second, not spin)
                ready = []
                time.sleep(1.0)
            for ref in ready:
                r = running.pop(ref)
                try:
                    seconds, lost = ray.get(ref)
                    status[r.name].update(state="done", seconds=round(seconds))
                    status[r.name].update({"warning": lost} if lost else {})
                    if lost:  # (the run finished: only its log lacks its last line)
                        progress.write(f"sweep: {r.name} finished, but {lost}")
                except Exception as e:  # noqa: BLE001 (RayTaskError wrapping RunFailed/UsageFailed, or a lost worker)
                    if ((isinstance(e, RunBusy) or isinstance(getattr(e, "cause", None), RunBusy))
                            and r.run_dir and (folder_busy(r.run_dir) or r.done())):  # (taken between our check and its start)
                        status[r.name].update(state="queued", waiting="another process is running this run")
                        todo.append(r)  # (waits for it, as above; else a failure like any other)
                        continue
                    status[r.name].update(state="failed", error=_error_text(e))
                    progress.write(f"sweep: {r.name} failed: {status[r.name]['error']}")
            started = _mark_started(status, running.values())
            progress.update(sum(status[r.name]["state"] == "done" or "finished_elsewhere" in status[r.name]
                                for r in plan),
                            started, sum(status[r.name]["state"] == "failed" and not r.error for r in plan),
                            len(todo) + len(running) - started)
    except (KeyboardInterrupt, WriteFailed) as e:
        # a status.json that cannot be written (a full disk) stops the sweep as Ctrl-C does: its running runs
        # are cancelled (they went on unwatched until Ray shut down before 2026-12-06), so the next sweep resumes them.
        # A task Ray still held for resources never started its process: it stays queued, not "interrupted"
        # (its point reported failed, the progress line counting it as stopped, before 2026-12-06)
        held = {r.name for r in running.values() if status[r.name]["state"] == "submitted"
                and not os.path.exists(status[r.name]["log"] + ".running")}
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e).split(";")[0]
        progress.write(f"sweep: {why}: stopping {len(running) - len(held)} running run(s) (each keeps its "
                       "last completed epoch; re-run the same command to resume)")
        try:  # (bounded: a cancel lost or late under load kept the sweep in ray.wait for 90 s before 2026-12-06)
            cancel_runs(ray, {ref: status[r.name]["log"] for ref, r in running.items()}, CANCEL_GRACE_S)
        finally:  # (status.json says what each run became)
            for ref, r in running.items():
                status[r.name]["state"] = "queued" if r.name in held else "interrupted"
                try:  # a run that finished before the cancel reached it
                    status[r.name].update(state="done", seconds=round(ray.get(ref, timeout=0)[0]))
                except Exception:  # noqa: BLE001 (cancelled, failed, or not finished)
                    pass
            try:
                save()
            except WriteFailed:
                if not isinstance(e, WriteFailed):  # (the disk still full: its first error stands)
                    raise
        raise
    finally:
        progress.close()
        if before_term is not _terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before_term is None else before_term)
    save()
    return status


def shutdown_ray() -> None:
    """Ray's shutdown where this process started or joined it, run by the CLI before it exits, SIGINT ignored for
    its second or two: left to Ray's atexit hook, a Ctrl-C landing there printed a KeyboardInterrupt traceback
    ("Exception ignored in atexit callback") and the sweep exited 0 as if it had not come (before 2026-12-07)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)


def _mark_started(status: dict, runs) -> int:
    """Submitted runs whose experiment process has started (its log's `.running` marker) become
    "running" (until then Ray may hold the task for resources: it is "submitted"); returns how many
    of `runs` have started."""
    n = 0
    for r in runs:
        s = status[r.name]
        if os.path.exists(s["log"] + ".running"):
            n += 1
            if s["state"] == "submitted":
                s.update(state="running", started=time.time())
    return n


def _terminate(signum, frame):
    raise KeyboardInterrupt  # (SIGTERM, a scheduler's preemption: stop the runs as Ctrl-C does)
