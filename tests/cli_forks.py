"""Many `python -m <module> ...` commands, each its own process, for the price of one start.

A CLI process spends ~3 s starting the interpreter and importing torch before it reads its first
argument; the error-path tests run dozens of them. Here one fresh driver process imports the CLI's
dependencies once, then forks one child per command: the child changes to the command's folder,
writes to its own stdout/stderr files and runs the module as `python -m` would (runpy, __main__,
sys.path[0] the folder), and ends as the interpreter would: non-daemon threads joined, atexit
handlers run, the status sys.exit's (an uncaught exception prints its traceback, status 1; an
uncaught KeyboardInterrupt dies of SIGINT). What the imports print is printed once, by the driver:
run() refuses it (a real process would print it in every command's stderr).

    results = run(module, [(cwd, argv), ...], preload=[...])  # [CompletedProcess(args, returncode, stdout, stderr)]

Server(preload) keeps such a driver for commands given one at a time (a module fixture's: each command
known only once its test has set up its files), each with its own environment if given:

    with Server(preload=[...]) as forks:
        forks.run(module, argv, cwd=None, env=None, timeout=300)  # CompletedProcess, as subprocess.run(text=True)
"""
import json
import os
import select
import signal
import subprocess
import sys

HERE = os.path.abspath(__file__)


def run(module: str, commands, preload=(), jobs: int = 2, timeout: float = 300):
    """`preload`: modules the driver imports before forking (what the CLI imports once it runs)."""
    payload = json.dumps({"module": module, "commands": [(str(cwd), list(argv)) for cwd, argv in commands],
                          "preload": list(preload), "jobs": jobs})
    proc = subprocess.Popen([sys.executable, HERE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(payload, timeout=timeout)
    except BaseException:  # (a timeout, Ctrl-C: the driver and every child it forked, one process group)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0 or stderr:
        raise RuntimeError(f"the CLI fork driver failed or its imports printed (rc {proc.returncode}):\n"
                           f"{stdout}\n{stderr}")
    return [subprocess.CompletedProcess([sys.executable, "-m", module, *argv], rc, out, err)
            for (_, argv), (rc, out, err) in zip(commands, json.loads(stdout))]


class Server:
    """One driver for many commands, forked one at a time (see the module's docstring)."""

    def __init__(self, preload=()):
        self.proc = subprocess.Popen([sys.executable, HERE, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self._send({"preload": list(preload)})

    def _send(self, obj):
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def run(self, module: str, argv, cwd=None, env=None, timeout: float = 300):
        """`python -m module *argv` in `cwd` (this process's by default) with `env` (os.environ by
        default): a timeout ends the driver and the command (one process group)."""
        args = [sys.executable, "-m", module, *map(str, argv)]
        self._send({"module": module, "cwd": str(cwd or os.getcwd()), "argv": args[3:],
                    "env": dict(os.environ if env is None else env)})
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.close(kill=True)
            raise subprocess.TimeoutExpired(args, timeout)
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate()
            raise RuntimeError(f"the CLI fork driver died (rc {self.proc.returncode}):\n{err}")
        rc, out, err = json.loads(line)
        return subprocess.CompletedProcess(args, rc, out, err)

    def close(self, kill=False):
        if kill:
            os.killpg(self.proc.pid, signal.SIGKILL)
        _, stderr = self.proc.communicate()  # (stdin closed: the driver ends)
        if not kill and (self.proc.returncode != 0 or stderr):
            raise RuntimeError(f"the CLI fork driver failed or its imports printed (rc {self.proc.returncode}):\n"
                               f"{stderr}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(kill=exc[0] is not None)


def _child(module, cwd, argv, out_path, err_path):  # (never returns)
    import atexit
    import runpy
    import threading
    import traceback
    code = 1
    try:
        os.chdir(cwd)
        sys.path[0] = os.getcwd()  # (python -m's first entry)
        for fd, path in ((1, out_path), (2, err_path)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        sys.argv = [module, *argv]
        if module in sys.modules and not hasattr(sys.modules[module], "__path__"):
            del sys.modules[module]  # (preloaded for its imports: as `python -m`, run fresh; runpy warns otherwise)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # (as the interpreter reads sys.exit's argument)
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
        for t in threading.enumerate():  # the interpreter's exit: non-daemon threads, then atexit
            if t is not threading.current_thread() and not t.daemon:
                t.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code == -signal.SIGINT:  # (dies of it, as an uncaught KeyboardInterrupt does)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def _driver():
    import shutil
    import tempfile
    spec = json.load(sys.stdin)
    module, commands, jobs = spec["module"], spec["commands"], max(1, spec["jobs"])
    for name in ("torch", module, *spec["preload"]):  # once; each child runs the module's __main__
        __import__(name)
    tmp = tempfile.mkdtemp()  # (not TemporaryDirectory: its atexit finalizer would run in each child)
    try:
        running, results = {}, [None] * len(commands)
        for i in range(len(commands) + jobs):
            while running and (len(running) >= jobs or i >= len(commands)):
                pid, status = os.wait()
                j = running.pop(pid)
                out, err = (open(os.path.join(tmp, f"{j}.{s}")).read() for s in ("out", "err"))
                results[j] = (os.waitstatus_to_exitcode(status), out, err)
            if i < len(commands):
                sys.stdout.flush(), sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    cwd, argv = commands[i]
                    _child(module, cwd, argv, os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err"))
                running[pid] = i
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    json.dump(results, sys.stdout)


def _serve():
    import shutil
    import tempfile
    for name in ("torch", *json.loads(sys.stdin.readline())["preload"]):
        __import__(name)
    tmp = tempfile.mkdtemp()
    try:
        for line in iter(sys.stdin.readline, ""):
            cmd = json.loads(line)
            out, err = (os.path.join(tmp, s) for s in ("out", "err"))
            sys.stdout.flush(), sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.environ.clear()
                os.environ.update(cmd["env"])
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # (the driver's commands are not the command's input)
                _child(cmd["module"], cmd["cwd"], cmd["argv"], out, err)
            _, status = os.waitpid(pid, 0)
            result = [os.waitstatus_to_exitcode(status)] + [open(p).read() for p in (out, err)]
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _serve() if sys.argv[1:] == ["--serve"] else _driver()
