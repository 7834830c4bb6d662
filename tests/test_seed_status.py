"""A seed's status record (experiment/seed_status.py): the report tells a seed that failed, one still running
and one whose process was killed apart, where their folders alone (no results yet) looked the same."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import run_dir
from sparsetrain.experiment import report, study


def _status(rd, seed):
    return json.loads((rd / f"seed{seed}" / "status.json").read_text())


def test_a_failed_seed_is_reported_failed_and_a_resume_marks_it_done(mnist_dir, study_args, monkeypatch):
    args = study_args(mnist_dir, "--phases", "teacher", "--seeds", "0", "1")
    real = study.run_phase

    def failing(cfg, role, splits, seed, *a, **k):
        if seed == 1:
            raise RuntimeError("disk on fire\nsecond line")
        return real(cfg, role, splits, seed, *a, **k)

    monkeypatch.setattr(study, "run_phase", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        study.main(args)
    rd = run_dir(mnist_dir / "runs")
    s0, s1 = _status(rd, 0), _status(rd, 1)
    assert s0["state"] == "done" and s0["pid"] == os.getpid() and s0["phases"] == ["teacher"]
    assert s1["state"] == "failed" and s1["error"] == "RuntimeError: disk on fire"
    assert s1["host"] == socket.gethostname() and s1["pid"] == os.getpid()
    text = open(report.write_report(rd)).read()
    assert "| 0 | done | 'teacher' |" in text
    assert "| 1 | failed: RuntimeError: disk on fire (pid " in text and f"on {socket.gethostname()}" in text
    assert "Seeds whose curve is missing or unfinished: seed 1: failed: RuntimeError: disk on fire" in text

    monkeypatch.setattr(study, "run_phase", real)  # the same command resumes: seed 1 runs again, done
    assert study.main(args) == 0
    assert _status(rd, 1)["state"] == "done"
    text = (rd / "summary.md").read_text()
    assert "| 1 | done | 'teacher' |" in text and "missing or unfinished" not in text


def test_a_killed_seed_is_stopped_and_a_living_one_running(mnist_dir, study_args):
    args = study_args(mnist_dir, "--phases", "teacher", "--seeds", "0", "1", "2")
    assert study.main(args) == 0
    rd = run_dir(mnist_dir / "runs")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for seed, pid in ((1, dead.pid), (2, living.pid)):  # (as a kill mid-seed leaves them: "running")
            record = {**_status(rd, seed), "state": "running", "pid": pid, "started": "2026-12-06 10:00:00 +0000"}
            record["start_ticks"] = _ticks(pid) if pid == living.pid else record["start_ticks"]
            del record["ended"]
            (rd / f"seed{seed}" / "status.json").write_text(json.dumps(record))
        (rd / "seed3").mkdir()  # (a seed folder with no record: an older run's)
        text = open(report.write_report(rd)).read()
    finally:
        living.kill()
        living.wait()
    assert f"| 1 | stopped (pid {dead.pid} gone; started 2026-12-06 10:00:00 +0000) | 'teacher' |" in text
    assert f"| 2 | running (pid {living.pid} on {socket.gethostname()}, since 2026-12-06 10:00:00 +0000) |" in text
    assert "| 0 | done | 'teacher' |" in text
    # (another host's pid cannot be checked: running as recorded, said so)
    record = {**_status(rd, 1), "host": "elsewhere"}
    (rd / "seed1" / "status.json").write_text(json.dumps(record))
    assert f"| 1 | running on elsewhere (not checkable from here; pid {dead.pid}, since 2026-12-06 10:00:00 +0000) |" \
        in open(report.write_report(rd)).read()


def _ticks(pid: int) -> int:
    """Process `pid`'s start time in clock ticks since boot: /proc/<pid>/stat's field 22 (proc(5))."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # (field 3, the state, first)
    return int(fields[22 - 3])


def test_a_finished_run_invoked_again_keeps_its_seeds_records(mnist_dir, study_args):
    """A finished run invoked again (nothing to train) rewrote each seed's status.json with its own pid and times, as
    if the seed had run then; the record of the process that trained it now stays, byte for byte. A seed whose
    phases finished but whose record is not `done` (stopped just after) is still recorded done by this process."""
    args = study_args(mnist_dir, "--phases", "teacher")
    assert study.main(args) == 0
    rd = run_dir(mnist_dir / "runs")
    path = rd / "seed0" / "status.json"
    earlier = json.dumps({**_status(rd, 0), "pid": 1, "started": "2026-12-06 10:00:00 +0000",
                          "ended": "2026-12-06 10:05:00 +0000"}, indent=1)
    path.write_text(earlier)
    assert study.main(args) == 0
    assert path.read_text() == earlier
    path.write_text(json.dumps({**json.loads(earlier), "state": "stopped", "error": "KeyboardInterrupt"}))
    assert study.main(args) == 0
    assert (_status(rd, 0)["state"], _status(rd, 0)["pid"], "error" in _status(rd, 0)) == ("done", os.getpid(), False)


def test_a_reused_pid_or_a_restarted_host_is_stopped_and_an_older_record_keeps_the_pid_rule(tmp_path):
    """A "running" record's pid was checked for a living process alone: a killed seed whose pid now belongs to
    another process (or, after a restart, any process) read "running". A record holds the boot id and the
    process's start time since 2026-12-06: a living process of another start time, or another boot, is the
    killed seed's "stopped (pid N gone)"; a record without them (an older one) keeps the pid rule."""
    from sparsetrain.experiment import seed_status
    seed_status.SeedStatus().start(str(tmp_path), ["teacher"])
    mine = json.loads((tmp_path / "status.json").read_text())
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert (mine["boot_id"], mine["start_ticks"], mine["pid"]) == (boot, _ticks(os.getpid()), os.getpid())
    assert seed_status.describe(mine).startswith(f"running (pid {os.getpid()} on ")  # (this very process: alive)
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        at = "2026-12-06 10:00:00 +0000"
        own = {**mine, "pid": living.pid, "start_ticks": _ticks(living.pid), "started": at}
        host = socket.gethostname()
        assert seed_status.describe(own) == f"running (pid {living.pid} on {host}, since {at})"
        gone = f"stopped (pid {living.pid} gone; started {at})"
        assert seed_status.describe({**own, "start_ticks": own["start_ticks"] - 1}) == gone  # (a reused pid)
        assert seed_status.describe({**own, "boot_id": "another-boot"}) == gone  # (the host restarted since)
        older = {k: v for k, v in own.items() if k not in ("boot_id", "start_ticks")}
        assert seed_status.describe(older) == f"running (pid {living.pid} on {host}, since {at})"
        assert seed_status.describe({**older, "pid": os.getpid()}) == f"stopped (pid {os.getpid()} gone; started {at})"
    finally:
        living.kill()
        living.wait()


def test_an_interrupted_seed_is_stopped(mnist_dir, study_args, interrupted):
    args = study_args(mnist_dir, "--phases", "teacher")
    interrupted(args, 3)
    rd = run_dir(mnist_dir / "runs")
    assert _status(rd, 0)["state"] == "stopped" and _status(rd, 0)["error"] == "KeyboardInterrupt"
    text = open(report.write_report(rd)).read()
    assert "| 0 | stopped: KeyboardInterrupt (pid " in text
    assert "Seeds whose curve is missing or unfinished: seed 0: stopped: KeyboardInterrupt" in text


def test_sigterm_stops_a_run_as_ctrl_c_does(mnist_dir, study_args):
    """SIGTERM (`timeout`, `kill`, a scheduler's preemption) mid-run: the seed is recorded stopped and the run says
    where its epochs are saved, as on Ctrl-C, and the process still dies of SIGTERM (before, it died at once: the
    seed stayed `running`, nothing was said)."""
    import signal
    import time
    args = study_args(mnist_dir, "--phases", "teacher", "--epochs", "300", "--milestones", "100")
    proc = subprocess.Popen([sys.executable, "-m", "sparsetrain.experiment", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list((mnist_dir / "runs").glob("*/seed0/teacher/state.pt")) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err
    rd = run_dir(mnist_dir / "runs")
    assert err.strip().splitlines()[-1] == f"interrupted: every finished epoch is saved in {rd}; the same command resumes"
    status = _status(rd, 0)
    assert status["state"] == "stopped" and status["error"] == "KeyboardInterrupt: SIGTERM", status
    assert "Traceback" not in err
