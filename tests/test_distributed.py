"""Data parallelism with torchrun on CPUs (gloo): two processes follow one, round by round, and a
2-process run killed mid-way resumes under torchrun to the uninterrupted run's curves.

The 2-process run splits every global batch across the ranks; losses, accuracies, sparsity and
the entropy (ReLU counts summed over ranks) must equal the 1-process run's up to float summation
order, over several pruning rounds, for the teacher and the distilled student."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_dir

KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "entropy_mean", "fwd_flops")


def _rows(out, phase):
    with open(run_dir(out) / "seed0" / phase / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_two_gloo_processes_follow_one(mnist_dir, study_args):
    base = study_args(mnist_dir, "--teachers", "dense", "--engine", "sparse")
    one = subprocess.run([sys.executable, "-m", "sparsetrain.experiment", *base, "--out", str(mnist_dir / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "sparsetrain.experiment", *base, "--out", str(mnist_dir / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data parallel: 2 ranks (gloo)" in two.stdout
    for phase in ("teacher", "distill-dense"):
        a, b = _rows(mnist_dir / "one", phase), _rows(mnist_dir / "two", phase)
        assert len(a) == len(b) == 5  # rounds 0..4: four pruning rounds
        for ra, rb in zip(a, b):
            assert float(ra["sparsity"]) == float(rb["sparsity"]) and ra["sparse_layers"] == rb["sparse_layers"]
            for k in KEYS:
                assert float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-4, abs=1e-5), (phase, ra["round"], k)
    # rank 0 alone wrote the run: one set of files, no leftovers of the other rank
    assert [p.name for p in (mnist_dir / "two").iterdir()] == [run_dir(mnist_dir / "two").name]

    # killed under torchrun (every process, at once) in the teacher's round 2, then resumed under
    # torchrun: the same curves as the uninterrupted 2-process run
    from sparsetrain.experiment.checkpoint import safe_load
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sparsetrain.experiment", *base, "--out", str(mnist_dir / "killed")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    state, deadline = None, time.time() + 300
    while time.time() < deadline and p.poll() is None:
        dirs = list((mnist_dir / "killed").glob("*/seed0/teacher/state.pt"))
        try:
            if dirs and safe_load(str(dirs[0]))["round"] >= 2:
                state = dirs[0]
                break
        except (ValueError, OSError):  # (being replaced right now)
            pass
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert state is not None, "the run ended before round 2 could be interrupted"
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for phase in ("teacher", "distill-dense"):
        a, b = _rows(mnist_dir / "two", phase), _rows(mnist_dir / "killed", phase)
        assert len(a) == len(b) == 5
        for ra, rb in zip(a, b):
            assert all(float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-6, abs=1e-7) for k in KEYS), (phase, ra["round"])
