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
    assert "| 0 | done | teacher |" in text
    assert "| 1 | failed: RuntimeError: disk on fire (pid " in text and f"on {socket.gethostname()}" in text
    assert "Seeds whose curve is missing or unfinished: seed 1: failed: RuntimeError: disk on fire" in text

    monkeypatch.setattr(study, "run_phase", real)  # the same command resumes: seed 1 runs again, done
    assert study.main(args) == 0
    assert _status(rd, 1)["state"] == "done"
    text = (rd / "summary.md").read_text()
    assert "| 1 | done | teacher |" in text and "missing or unfinished" not in text


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
            del record["ended"]
            (rd / f"seed{seed}" / "status.json").write_text(json.dumps(record))
        (rd / "seed3").mkdir()  # (a seed folder with no record: an older run's)
        text = open(report.write_report(rd)).read()
    finally:
        living.kill()
        living.wait()
    assert f"| 1 | stopped (pid {dead.pid} gone; started 2026-12-06 10:00:00 +0000) | teacher |" in text
    assert f"| 2 | running (pid {living.pid} on {socket.gethostname()}, since 2026-12-06 10:00:00 +0000) |" in text
    assert "| 0 | done | teacher |" in text
    # (another host's pid cannot be checked: running as recorded)
    record = {**_status(rd, 1), "host": "elsewhere"}
    (rd / "seed1" / "status.json").write_text(json.dumps(record))
    assert f"| 1 | running (pid {dead.pid} on elsewhere," in open(report.write_report(rd)).read()


def test_an_interrupted_seed_is_stopped(mnist_dir, study_args, interrupted):
    args = study_args(mnist_dir, "--phases", "teacher")
    interrupted(args, 3)
    rd = run_dir(mnist_dir / "runs")
    assert _status(rd, 0)["state"] == "stopped" and _status(rd, 0)["error"] == "KeyboardInterrupt"
    text = open(report.write_report(rd)).read()
    assert "| 0 | stopped: KeyboardInterrupt (pid " in text
    assert "Seeds whose curve is missing or unfinished: seed 0: stopped: KeyboardInterrupt" in text
