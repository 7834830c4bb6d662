"""Data parallelism with torchrun on CPUs (gloo): two processes follow one, round by round, and a
2-process run killed mid-way resumes under torchrun to the uninterrupted run's curves.

The 2-process run splits every global batch across the ranks; losses, accuracies, sparsity and
the entropy (ReLU counts summed over ranks) must equal the 1-process run's up to float summation
order, over several pruning rounds, for the teacher and the distilled student."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cli_forks
from conftest import run_dir

KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "entropy_mean", "fwd_flops",
        "round_flops", "cum_flops", "paper_cum_flops", "teacher_flops", "teacher_cost")  # (FLOPs: global, not per rank)


@pytest.fixture(scope="module")
def forks():
    """The module's `python -m torch.distributed.run ...` launchers and one-process studies, each forked
    from one process that imported torch, torchrun and the study once (tests/cli_forks.py): ~2.5 s of
    a fresh launcher's start, before its workers (fresh processes, as torchrun starts them) could
    start, paid once instead of per launch (~20 launches)."""
    with cli_forks.Server(preload=["torch.distributed.run", "sparsetrain.experiment.study"]) as server:
        yield server


def _rows(out, phase):
    with open(run_dir(out) / "seed0" / phase / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _why(stderr: str) -> str:
    """What a failed torchrun run's workers said: its stderr without torchrun's own traceback (the
    launcher's frames, ~2 KB, would fill an assertion message's tail), keeping its table of the
    workers' exit codes."""
    cut = stderr.rfind("Traceback (most recent call last):")
    if cut >= 0 and "torch/distributed/run.py" in stderr[cut:]:
        table = stderr.find("ChildFailedError:", cut)
        stderr = stderr[:cut] + (stderr[table:] if table > cut else "")
    return stderr[-6000:]


def _children(pid):
    """The live processes whose parent is `pid` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if d.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_two_gloo_processes_follow_one(mnist_dir, study_args, forks):
    base = study_args(mnist_dir, "--teachers", "dense", "--engine", "sparse")
    one = forks.run("sparsetrain.experiment", [*base, "--out", str(mnist_dir / "one")], timeout=600)
    assert one.returncode == 0, _why(one.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                              "-m", "sparsetrain.experiment", *base, "--out", str(mnist_dir / "two")],
                    timeout=600, env=env)
    assert two.returncode == 0, _why(two.stderr)
    assert "data parallel: 2 ranks (gloo)" in two.stdout
    assert "1 CPU thread(s) per rank (--threads)" in two.stdout  # (torchrun's OMP_NUM_THREADS=1, said)
    assert "broadcast_buffers" not in two.stderr, two.stderr[-2000:]  # (its deprecation warning, every rank)
    for phase in ("teacher", "distill-dense"):
        a, b = _rows(mnist_dir / "one", phase), _rows(mnist_dir / "two", phase)
        assert len(a) == len(b) == 5  # rounds 0..4: four pruning rounds
        for ra, rb in zip(a, b):
            assert float(ra["sparsity"]) == float(rb["sparsity"]) and ra["sparse_layers"] == rb["sparse_layers"]
            for k in KEYS:
                assert float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-4, abs=1e-5), (phase, ra["round"], k)
    # rank 0 alone wrote the run: one set of files, no leftovers of the other rank
    assert [p.name for p in (mnist_dir / "two").iterdir()] == [run_dir(mnist_dir / "two").name]

    # killed under torchrun (every process, at once) once the teacher's rounds 0 and 1 are in its
    # metrics (round 2 running), then resumed under torchrun: the same curves as the uninterrupted
    # 2-process run. (The rows are a cheap read polled every 10 ms: polling state.pt, loaded and
    # checked each time and removed when the teacher ends, missed a fast machine's rounds 2-4.)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sparsetrain.experiment", *base, "--out", str(mnist_dir / "killed")]
    killed_log = mnist_dir / "killed.err"
    with open(killed_log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    seen, deadline = False, time.time() + 300
    while time.time() < deadline and p.poll() is None:
        for metrics in (mnist_dir / "killed").glob("*/seed0/teacher/metrics.csv"):
            try:
                seen = metrics.read_text().count("\n") - 1 >= 2  # (header, then one line per round)
            except OSError:  # (being replaced right now)
                pass
        if seen:
            break
        time.sleep(0.01)
    workers = _children(p.pid)  # (torchrun starts each worker in a session of its own: killpg misses them)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:  # (the run had ended: the assertion below says so)
        pass
    p.wait()
    assert seen, "the run ended before round 2 could be interrupted"
    # killed while it ran: mid-teacher on an idle machine (its later rounds take ~0.1 s each here),
    # in the distillation or the report when this process was slow to see the rows: each resumes
    assert p.returncode == -signal.SIGKILL and len(workers) == 2, (p.returncode, workers, _why(killed_log.read_text()))
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    resumed = forks.run("torch.distributed.run", cmd[3:] + ["--resume"], timeout=600, env=env)
    assert resumed.returncode == 0, _why(resumed.stderr) + "\n(the killed run said:)\n" + _why(killed_log.read_text())
    for phase in ("teacher", "distill-dense"):
        a, b = _rows(mnist_dir / "two", phase), _rows(mnist_dir / "killed", phase)
        assert len(a) == len(b) == 5
        for ra, rb in zip(a, b):
            assert all(float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-6, abs=1e-7) for k in KEYS), (phase, ra["round"])


_MASKS_SCRIPT = """
import sys, torch
from sparsetrain.experiment import distributed as dist
from sparsetrain.experiment.models import build_model
from sparsetrain.prune import make_rule
dist.init_group("gloo")
for scope in ("layer", "global"):
    for same in (True, False):
        torch.manual_seed(0 if same else 100 + dist.rank())
        m = build_model("lenet300", 10, 1, 28)
        masks = make_rule("unstructured", scope=scope).prune(m, {}, 0.5)
        try:
            dist.check_masks_agree(m, masks)
            got = "agree"
        except RuntimeError:
            got = "differ"
        with open(f"{sys.argv[1]}/rank{dist.rank()}.txt", "a") as f:  # (one file each: no interleaved lines)
            f.write(f"{dist.rank()} {scope} {same} {got}\\n")
dist.teardown()
"""


_TEARDOWN_SCRIPT = """
import gc, os, sys, weakref, torch
from sparsetrain.experiment import distributed as dist
from sparsetrain.experiment.models import build_model
from sparsetrain.testing import gloo_threads

gc.disable()  # (the DDP wrappers, in reference cycles, are then freed by teardown's collection alone)
dist.setup(torch.device("cpu"))
started = gloo_threads()
model = build_model("lenet300", 10, 1, 28)

def train_round():  # (as the study's: a DDP wrapper of its own, dropped when the round returns)
    forward = dist.wrap(model)
    forward(torch.randn(4, 1, 28, 28)).sum().backward()
    return weakref.ref(forward), type(forward).__name__

rounds = [train_round() for _ in range(2)]
alive = [f"{name}:{'alive' if ref() is not None else 'freed'}" for ref, name in rounds]
dist.teardown()
with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.txt", "w") as f:
    f.write(f"{started} {gloo_threads()} {' '.join(alive)}")
"""


def _run_script(forks, folder, source: str) -> None:
    """`source` as a script under torchrun, 2 gloo processes, its one argument `folder`."""
    script = folder / "script.py"
    script.write_text(source)
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2", str(script), str(folder)],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, _why(out.stderr)


def test_check_masks_agree_compares_the_masks_not_their_counts(tmp_path, forks):
    """Two ranks pruning different weights per layer keep the same counts (--scope layer): the
    check must still see that their masks differ."""
    _run_script(forks, tmp_path, _MASKS_SCRIPT)
    lines = sorted((tmp_path / "rank0.txt").read_text().split("\n") + (tmp_path / "rank1.txt").read_text().split("\n"))
    expected = sorted(f"{r} {scope} {same} {'agree' if same else 'differ'}" for r in (0, 1)
                      for scope in ("layer", "global") for same in (True, False))
    assert [ln for ln in lines if ln] == expected


_DOWNLOAD_SCRIPT = """
import sys, time, torch
from pathlib import Path
from sparsetrain.experiment import datasets as ds, distributed as dist, study
from sparsetrain.experiment.config import config_from_args
from sparsetrain.testing import write_mnist
folder = Path(sys.argv[1])
def fake_download(cls_name, data_dir):  # a download that takes a while, then leaves the files
    (folder / f"downloaded{dist.rank()}.txt").write_text(cls_name)
    time.sleep(1.0)
    write_mnist(Path(data_dir) / "mnist", gz=False, n_train=40, n_test=10)
ds._download = fake_download
dist.setup(torch.device("cpu"))
cfg, _ = config_from_args(["mnist", "--data-dir", str(folder / "data"), "--subset", "30"])
splits = study.load_splits(cfg, 0)
(folder / f"rank{dist.rank()}.txt").write_text(f"{len(splits.train)} {int(splits.train.x.long().sum())}")
dist.teardown()
"""


def test_only_rank_0_downloads_the_dataset(tmp_path, forks):
    """Every rank downloaded a missing dataset at once into one folder (torchvision writes the
    archive in place, then checks and extracts it: a rank could read the other's half-written file);
    now rank 0 loads first and the others read its files."""
    _run_script(forks, tmp_path, _DOWNLOAD_SCRIPT)
    assert sorted(p.name for p in tmp_path.glob("downloaded*.txt")) == ["downloaded0.txt"]
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()


_SNAPSHOT_SCRIPT = """
import sys, torch
from sparsetrain.experiment import distributed as dist
from sparsetrain.experiment.models import build_model
dist.init_group("gloo")
torch.manual_seed(0)
m = build_model("vgg_d1g5", 10, 1, 28)
for b in m.modules():  # each rank's own statistics, as mid-epoch
    if isinstance(b, torch.nn.BatchNorm2d):
        b.running_mean.fill_(dist.rank() + 1.0)
snap = dist.averaged_state(m)
means = [v for k, v in snap.items() if k.endswith("running_mean")]
w = [v for k, v in snap.items() if k.endswith("conv.weight")][0]
ok = all(torch.equal(v, torch.full_like(v, 1.5)) for v in means) and torch.equal(w, m.block1_1.conv.weight)
ok = ok and float(m.block1_1.bn.running_mean[0]) == dist.rank() + 1.0  # (the model itself untouched)
open(f"{sys.argv[1]}/rank{dist.rank()}.txt", "w").write(str(ok))
dist.teardown()
"""


def test_the_rewind_snapshot_averages_the_ranks_batchnorm_statistics(tmp_path, forks):
    """--perturb rewind snapshots mid-epoch, when each rank's BN running statistics are its own: the
    snapshot holds their mean (as at an epoch's end), so every rank, and a resume from rank 0's saved
    copy, rewinds to the same statistics (a resumed run's curves differed from the next round on)."""
    _run_script(forks, tmp_path, _SNAPSHOT_SCRIPT)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["True", "True"]


def test_a_corrupt_checkpoint_stops_every_rank_with_the_error(mnist_dir, study_args, forks):
    """verify_phase runs on rank 0; its CorruptFile reaches every rank as the one-line error (rank 1
    died in the barrier after it with a gloo traceback)."""
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher", "--wall", "0.6")
    assert forks.run("sparsetrain.experiment", base, timeout=300).returncode == 0
    ckpt = sorted((mnist_dir / "runs").glob("*/seed0/teacher/ckpt/round_01.pt"))[0]
    data = bytearray(ckpt.read_bytes())
    data[100] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                              "-m", "sparsetrain.experiment", *base, "--resume"],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert out.stderr.count("round_01.pt is corrupt: its sha256 is") == 2, _why(out.stderr)
    assert "gloo" not in out.stderr.lower() and "sparsetrain/experiment/" not in out.stderr  # (no rank's traceback)
    assert "exitcode  : 2" in out.stderr


def test_fewer_training_images_than_ranks_is_refused(mnist_dir, study_args, forks):
    base = study_args(mnist_dir, "--teachers", "dense", "--val-fraction", "0.5")
    base[base.index("--subset") + 1] = "2"  # one training image, one validation image
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                              "-m", "sparsetrain.experiment", *base],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "error: 1 training images for 2 ranks: every rank needs rows of its own" in out.stderr


def test_a_run_directory_in_use_stops_every_rank_with_the_error(mnist_dir, study_args, forks):
    """Rank 0 holds the run's lock; when another process has it, every rank stops with the one-line
    error (the other ranks used to die on their next collective with a gloo traceback)."""
    import fcntl
    base = study_args(mnist_dir, "--teachers", "dense")
    rd = forks.run("sparsetrain.experiment", [*base, "--print-config"])
    assert rd.returncode == 0, rd.stderr
    import json
    run = json.loads(rd.stdout)["run_dir"]
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, ".lock"), "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                                  "-m", "sparsetrain.experiment", *base],
                        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert out.stderr.count("is in use by another process") == 2, _why(out.stderr)
    assert "Connection reset" not in out.stderr and "gloo" not in out.stderr.lower()


def test_rounds_free_their_wrapper_and_teardown_ends_the_group_threads(tmp_path, forks):
    """With the cycle collector off: each DDP round's wrapper is freed when the round returns (the
    first one, whose construction imported torch._dynamo, was left in cyclic garbage with its
    gradient buckets until a collection), and after the rounds teardown leaves no gloo thread
    running: a group kept alive past it (torch.distributed.nn.functional's default arguments, bound
    to the group when DDP first imported them; a wrapper awaiting the collector) ran its threads into
    the C++ exit handlers, which at times aborted a rank after its work was done and failed the run."""
    _run_script(forks, tmp_path, _TEARDOWN_SCRIPT)
    for r in (0, 1):
        started, left, *rounds = (tmp_path / f"rank{r}.txt").read_text().split()
        assert int(started) > 0 and int(left) == 0, (r, started, left)
        assert rounds == ["DistributedDataParallel:freed"] * 2, (r, rounds)


_WRITE_FAILS_SCRIPT = """
import errno, os, sys
from sparsetrain.experiment import files, loop, seed_status, study
module = {"loop": loop, "study": study, "seed_status": seed_status}[sys.argv[1]]
target, name = sys.argv[2], sys.argv[3]
if os.environ["RANK"] == "0":  # rank 0 alone writes: its first write of the file `name` finds the disk full
    real, failed = getattr(module, target), []
    def failing(*a, **k):
        path = next(p for p in a if isinstance(p, str))
        if os.path.basename(path) == name and not failed:
            failed.append(path)
            if target == "remove_file":  # (a read-only phase folder: a finished phase's leftover state.pt)
                raise files.RemoveFailed(errno.EACCES, os.strerror(errno.EACCES), path)
            raise files.WriteFailed(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(*a, **k)
    setattr(module, target, failing)
sys.exit(study.main(sys.argv[4:]))
"""


@pytest.mark.parametrize("module,target,name", [
    ("loop", "atomic_save", "state.pt"), ("loop", "save_model", "round_01.pt"), ("loop", "write_csv", "metrics.csv"),
    ("loop", "write_json", "best.json"), ("study", "write_json", "noise.json"),
    ("seed_status", "write_json", "status.json"), ("loop", "remove_file", "state.pt")])
def test_rank_0_failing_to_write_stops_every_rank_with_the_error(mnist_dir, study_args, module, target, name, forks):
    """Rank 0 writes state.pt (atomic_save), a round's checkpoint (save_model), metrics.csv (a round's
    row), best.json (the finished phase), the seed's noise.json and status.json alone, and removes a finished
    phase's leftover state.pt; its WriteFailed (disk full; RemoveFailed, a read-only folder) ended rank 0 with the
    one-line error while rank 1 went on into its next collective and died there with a gloo traceback ("Connection
    closed by peer"): every rank now stops with the one line, exit 2 (status.json and the removal since 2026-12-07)."""
    script = mnist_dir / "script.py"
    script.write_text(_WRITE_FAILS_SCRIPT)
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher")
    if target == "remove_file":  # (a finished phase whose state.pt a kill after best.json left: removed at the start)
        from sparsetrain.experiment import study
        assert study.main(base) == 0
        (pd := run_dir(mnist_dir / "runs") / "seed0" / "teacher" / "state.pt").write_bytes(b"left")
        assert (pd.parent / "best.json").exists()
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                              str(script), module, target, name, *base],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    verb, why = ("remove", "Permission denied; fix") if target == "remove_file" else ("write", "No space left on device; free")
    assert out.stderr.count(f"error: cannot {verb} ") == 2, _why(out.stderr)
    assert out.stderr.count(f"{os.sep}{name}: {why}") == 2, _why(out.stderr)
    assert "gloo" not in out.stderr.lower() and "sparsetrain/experiment/" not in out.stderr, _why(out.stderr)
    assert "exitcode  : 2" in out.stderr, _why(out.stderr)


_RANK_1_OVERFLOWS_SCRIPT = """
import os, sys, torch
from sparsetrain.experiment import loop, study
real = loop.train_epoch
def overflowing(model, *a, **k):  # rank 1's own BatchNorm statistics overflow in the second epoch
    out = real(model, *a, **k)
    if os.environ["RANK"] == "1" and k["epoch"] == 1:
        next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("inf"))
    return out
loop.train_epoch = overflowing
sys.exit(study.main(sys.argv[2:]))
"""


def test_one_ranks_overflowed_batchnorm_statistics_stop_every_rank(mnist_dir, study_args, forks):
    """The divergence check read each rank's own BatchNorm running statistics, before they were
    averaged: rank 1 alone stopped ("training diverged") and rank 0 died in the averaging's
    collective with a gloo traceback. The statistics are averaged first (an overflow on any rank
    reaches every rank's), so every rank stops with the one line."""
    script = mnist_dir / "script.py"
    script.write_text(_RANK_1_OVERFLOWS_SCRIPT)
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher", "--model", "vgg_d1g1")
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                              str(script), "x", *base],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert out.stderr.count("training diverged (") == 2 and "in epoch 2)" in out.stderr, _why(out.stderr)
    assert "gloo" not in out.stderr.lower() and "sparsetrain/experiment/" not in out.stderr, _why(out.stderr)


_RANK_1_KILLED_SCRIPT = """
import os, signal, sys
from sparsetrain.experiment import loop, study
real = loop.train_epoch
def killed(model, *a, **k):  # rank 1 killed (SIGKILL: the OOM killer) after its first epoch
    out = real(model, *a, **k)
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
loop.train_epoch = killed
sys.exit(study.main(sys.argv[2:]))
"""


def test_a_killed_rank_leaves_the_seed_stopped_not_failed(mnist_dir, study_args, forks):
    """Rank 1 killed: rank 0's next collective fails with gloo's "Connection closed by peer", which its seed's
    status.json recorded as the seed's own failure ("failed: RuntimeError: [...pair.cc...]"); it is `stopped`,
    another rank having ended, as a killed process's seed reads (torchrun's monitor slowed so that rank 0 meets
    the closed connection before torchrun stops it)."""
    script = mnist_dir / "script.py"
    script.write_text(_RANK_1_KILLED_SCRIPT)
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher")
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "20",
                                              str(script), "x", *base],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    status = json.loads((run_dir(mnist_dir / "runs") / "seed0" / "status.json").read_text())
    assert status["state"] == "stopped" and status["error"].startswith("another rank ended: "), (status, _why(out.stderr))


def test_more_ranks_on_a_node_than_gpus_is_refused(mnist_dir, study_args, monkeypatch, capsys):
    """torchrun --nproc-per-node 2 on a node with one GPU: the rank without a GPU of its own died in
    torch.cuda.set_device with a traceback ("invalid device ordinal"); every rank now stops with one
    line naming the counts (checked before the process group: no rank waits in a rendezvous)."""
    import torch
    from sparsetrain.experiment import study
    monkeypatch.setattr(study, "resolve_device", lambda spec: torch.device("cuda"))  # (a CPU machine: a GPU node)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) was called"))
    for local in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", local)
        monkeypatch.setenv("LOCAL_RANK", local)
        assert study.main(study_args(mnist_dir, "--teachers", "dense")) == 2
        err = capsys.readouterr().err
        assert "error: torchrun started 2 processes on this node, which has 1 CUDA device(s): one GPU per rank; " \
               "use --nproc-per-node 1 or fewer, or --device cpu" in err, err
    # a launcher that sets LOCAL_RANK but not LOCAL_WORLD_SIZE: local rank 1 of a 1-GPU node still refused
    # (set_device's traceback before), local rank 0 passes on to the rendezvous (refused below: no RANK)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert study.main(study_args(mnist_dir, "--teachers", "dense")) == 2
    assert "error: torchrun started 2 processes on this node, which has 1 CUDA device(s)" in capsys.readouterr().err
    assert not (mnist_dir / "runs").exists() or not any((mnist_dir / "runs").iterdir())


def test_world_size_without_torchrun_is_refused(mnist_dir, study_args, monkeypatch, capsys):
    """WORLD_SIZE=2 without torchrun's other variables (set by hand, or left over from a parent job):
    init_process_group's env:// rendezvous raised a ValueError traceback; now one line, exit 2."""
    from sparsetrain.experiment import study
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    assert study.main(study_args(mnist_dir, "--teachers", "dense")) == 2
    err = capsys.readouterr().err
    assert "error: WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set: start the processes with torchrun" in err, err
    assert "Traceback" not in err
    for bad in ("two", "-1", "1.5", "²"):  # (int()'s ValueError traceback before; "²": int()'s message)
        monkeypatch.setenv("WORLD_SIZE", bad)
        assert study.main(study_args(mnist_dir, "--teachers", "dense")) == 2
        err = capsys.readouterr().err
        assert f"error: WORLD_SIZE={bad!r} is not a whole number: start the processes with torchrun, which sets " \
               "it, or unset it" in err and "Traceback" not in err, err


def test_a_batch_under_two_rows_per_rank_is_noted(mnist_dir, study_args, forks):
    """--batch-size 3 on 2 ranks: every batch is under 2 rows a rank, so each rank trains it whole
    (dist.shard): correct, but N times the work of one process for nothing, and nothing said so."""
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher", "--wall", "0.4")
    base[base.index("--batch-size") + 1] = "3"
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                              "-m", "sparsetrain.experiment", *base],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, _why(out.stderr)
    note = ("note: --teacher-batch-size 3 is under 2 rows per rank: each of the 2 ranks trains every batch whole "
            "(the same results, no faster than one process); give 4 or more, or fewer processes")
    assert out.stderr.count(note) == 1, _why(out.stderr)  # (rank 0's alone)
    assert len(_rows(mnist_dir / "runs", "teacher")) == 1  # (round 0: the wall 0.4 stops the next, at 50%)


def test_a_phase_that_prunes_nothing_more_says_so_once(mnist_dir, study_args, forks):
    """--rate 1e-6 prunes no weight of LeNet-300-100 in round 1: the phase ends with one line, which
    every rank printed (rank 0 alone prints the rounds' lines)."""
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher")
    base[base.index("--rate") + 1] = "0.000001"
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                              "-m", "sparsetrain.experiment", *base],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, _why(out.stderr)
    assert out.stdout.count("[teacher seed 0] round  0 sparsity") == 1, out.stdout
    assert out.stdout.count("[teacher seed 0] round 1 would prune nothing more: the phase ends") == 1, out.stdout
    assert len(_rows(mnist_dir / "runs", "teacher")) == 1


def test_print_config_and_report_only_under_torchrun_run_on_rank_0_alone(mnist_dir, study_args, forks):
    """--print-config printed its JSON once per rank (a reader such as jq got N documents), and
    --report-only wrote the report from every rank at once: rank 0 alone does either now."""
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher", "--wall", "0.4")
    assert forks.run("sparsetrain.experiment", base, timeout=300).returncode == 0
    launch = ["--standalone", "--nproc-per-node", "2", "-m", "sparsetrain.experiment", *base]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shown = forks.run("torch.distributed.run", launch + ["--print-config"], timeout=300, env=env)
    assert shown.returncode == 0, _why(shown.stderr)
    assert json.loads(shown.stdout)["run_dir"] == str(run_dir(mnist_dir / "runs"))  # (one JSON document)
    summary = run_dir(mnist_dir / "runs") / "summary.md"
    summary.unlink()
    reported = forks.run("torch.distributed.run", launch + ["--report-only"], timeout=300, env=env)
    assert reported.returncode == 0, _why(reported.stderr)
    assert reported.stdout.split() == [str(summary)] and summary.is_file()


_OTHER_DATA_SCRIPT = """
import os, sys
from sparsetrain.experiment import data as D, study
real = D.load_dataset
def other(*a, **k):  # rank 1 reads other labels (a node whose --data-dir holds other files)
    if os.environ["RANK"] == "1":
        k["eps"] = 0.4
    return real(*a, **k)
D.load_dataset = other
sys.exit(study.main(sys.argv[1:]))
"""


def test_ranks_that_loaded_different_data_stop(mnist_dir, study_args, forks):
    """Each rank reads the data itself (rank 0 first): a rank whose files differ (another node's copy)
    trained on them silently, its rows of every batch and its shares of the sums from other images
    or labels. The ranks compare the data's fingerprints and every rank stops with the one line."""
    script = mnist_dir / "script.py"
    script.write_text(_OTHER_DATA_SCRIPT)
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher", "--wall", "0.4")
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "2",
                                              str(script), *base],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert out.stderr.count("error: the 2 ranks loaded different data (seed 0: their data or label fingerprints "
                            "differ): every rank must read the same files of --data-dir") == 2, _why(out.stderr)
    assert "gloo" not in out.stderr.lower() and "sparsetrain/experiment/" not in out.stderr, _why(out.stderr)
    assert not list((mnist_dir / "runs").glob("*/seed0/teacher/metrics.csv"))


_AUTO_EXAMPLE_SCRIPT = """
import os, sys
from sparsetrain.experiment import loop, study
real = loop.apply_engine
def recording(model, masks, engine, example=None, **k):  # the batch --engine auto times on this rank
    with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.txt", "a") as f:
        f.write(f"{engine} {None if example is None else example.shape[0]}\\n")
    return real(model, masks, engine, example=example, **k)
loop.apply_engine = recording
sys.exit(study.main(sys.argv[2:]))
"""


def test_engine_auto_times_the_rows_each_rank_trains(mnist_dir, study_args, forks):
    """--engine auto times a layer on a training batch of the rank's size. Under 2 rows a rank every
    rank trains the whole batch (dist.shard), but the example was the rank's share of it (dist.rows):
    on 3 ranks at --batch-size 2 rank 0's share was empty and sparse_is_faster's ValueError a
    traceback after round 0. Each rank now times the rows it trains: the whole batch of 2 here."""
    script = mnist_dir / "script.py"
    script.write_text(_AUTO_EXAMPLE_SCRIPT)
    base = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher", "--wall", "0.8", "--engine", "auto")
    base[base.index("--batch-size") + 1] = "2"
    out = forks.run("torch.distributed.run", ["--standalone", "--nproc-per-node", "3",
                                              str(script), str(mnist_dir), *base],
                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, _why(out.stderr)
    for r in range(3):  # rounds 1 and 2 (50%, 75%; the next, 87.5%, would pass the wall)
        assert (mnist_dir / f"rank{r}.txt").read_text().split("\n") == ["auto 2", "auto 2", ""]
    assert [float(row["sparsity"]) for row in _rows(mnist_dir / "runs", "teacher")] == [0.0, 0.5, 0.75]


_FORWARD_SCRIPT = """
import sys, torch
from sparsetrain.experiment import data as D, distributed as dist
from sparsetrain.experiment.models import build_model
from sparsetrain.experiment.train import train_epoch
dist.setup(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (24,), generator=g)
split = D.Split(x, y, y.clone(), torch.arange(24), torch.zeros(24, dtype=torch.bool), torch.tensor([0.5]),
                torch.tensor([0.25]))
out = []
for how in ("none", "model", "wrap"):
    torch.manual_seed(0)
    model = build_model("lenet300", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    forward = {"none": None, "model": model, "wrap": dist.wrap(model)}[how]
    try:
        train_epoch(model, split, opt, 8, epoch=0, seed=0, masks={}, forward=forward)
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        out.append(f"{how} trained {'same' if dist.same_everywhere(w.tolist()) else 'differ'}")
    except ValueError as e:
        out.append(f"{how} refused {e}")
from sparsetrain.engine.policy import apply_engine
from sparsetrain.prune import make_rule
masks = apply_engine(model, {}, "sparse")  # (the values Parameters: wrapped anew, then resized by a prune)
forward = dist.wrap(model)
make_rule("unstructured", scope="global").prune(model, masks, 0.5)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for how, fwd in (("stale", forward), ("rewrapped", dist.wrap(model))):
    try:
        train_epoch(model, split, opt, 8, epoch=1, seed=0, masks={}, forward=fwd)
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        out.append(f"{how} trained {'same' if dist.same_everywhere(w.tolist()) else 'differ'}")
    except (ValueError, RuntimeError) as e:
        out.append(f"{how} refused {str(e).splitlines()[0][:100]}")
open(f"{sys.argv[1]}/rank{dist.rank()}.txt", "w").write("\\n".join(out))
dist.teardown()
"""


def test_train_epoch_under_torchrun_needs_the_ddp_forward(tmp_path, forks):
    """Every rank takes its rows of each batch: train_epoch without a DistributedDataParallel forward
    stepped each rank on its own rows' gradient alone, and the ranks' weights differed after one
    epoch, silently; so did the first step of a wrapper built before a prune resized the values (the
    next raised DDP's "Expected to have finished reduction"). Both are refused now; with
    distributed.wrap(model), built after the prune, the ranks stay equal."""
    _run_script(forks, tmp_path, _FORWARD_SCRIPT)
    refused = ("refused forward must be the model in DistributedDataParallel under torchrun (2 ranks, each training "
               "on its rows of every batch): pass forward=distributed.wrap(model)")
    stale = "stale refused " + ("forward was wrapped before the model's parameters changed size (pruning, or a state "
                                "of another nnz loaded): wrap the model again")[:100]
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text().split("\n") == [f"none {refused}", f"model {refused}",
                                                                         "wrap trained same", stale, "rewrapped trained same"]


_EVALUATE_SCRIPT = """
import sys, torch
from sparsetrain.experiment import data as D, distributed as dist
from sparsetrain.experiment.models import build_model
from sparsetrain.experiment.train import evaluate
dist.setup(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (24,), generator=g)
split = D.Split(x, y, y.clone(), torch.arange(24), torch.zeros(24, dtype=torch.bool), torch.tensor([0.5]),
                torch.tensor([0.25]))
torch.manual_seed(0)
model = build_model("lenet300", 10, 1, 28)
xb, yb = next(D.iterate(split, 24))
with torch.no_grad():  # the reference: the whole split in one forward, dense PyTorch
    out = model.eval()(xb)
ref = (float(torch.nn.functional.cross_entropy(out, yb)), int((out.argmax(1) == yb).sum()) / 24)
def close(r):
    return abs(r["loss"] - ref[0]) < 1e-5 * abs(ref[0]) and r["acc"] == ref[1]
lines = []
if dist.rank() == 0:  # rank 0 alone, the others waiting in the barrier below: this hung in the all-reduce
    lines.append(f"alone {close(evaluate(model, split, batch_size=5))}")
dist.barrier()
lines.append(f"sharded {close(evaluate(model, split, batch_size=5, distributed=True))}")
try:
    evaluate(model, split, distributed="yes")
except TypeError as e:
    lines.append(str(e))
open(f"{sys.argv[1]}/rank{dist.rank()}.txt", "w").write("\\n".join(lines))
dist.teardown()
"""


def test_evaluate_on_rank_0_alone_is_local_and_the_studys_is_sharded(tmp_path, forks):
    """evaluate sharded its batches and all-reduced the sums whenever torchrun had started the process,
    so rank 0 calling it alone (a user's check, a report) waited for the other ranks forever. It
    evaluates the whole split locally now; distributed=True (the study's, every rank calling it)
    shards and sums: both equal the dense model's loss and accuracy over the whole split."""
    _run_script(forks, tmp_path, _EVALUATE_SCRIPT)
    flag = "distributed must be True or False, got 'yes'"
    assert (tmp_path / "rank0.txt").read_text().split("\n") == ["alone True", "sharded True", flag]
    assert (tmp_path / "rank1.txt").read_text().split("\n") == ["sharded True", flag]


def test_rank_is_parsed_and_a_single_process_is_rank_0(mnist_dir, study_args, monkeypatch, capsys):
    """main read RANK as a string before the group existed: a single process with a RANK left over from a
    parent job ("1"), or one that is no number ("x", "00"), took itself for another rank, and
    --print-config printed nothing, exit 0. A single process is rank 0 now; under WORLD_SIZE 2 a RANK
    that is no whole number is one line, exit 2."""
    import json
    from sparsetrain.experiment import study
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for leftover in ("1", "x", "00"):
        monkeypatch.setenv("RANK", leftover)
        assert study.main(study_args(mnist_dir, "--print-config")) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["config"]["dataset"] == "mnist", printed
    monkeypatch.setenv("WORLD_SIZE", "2")
    for bad in ("x", "-1"):
        monkeypatch.setenv("RANK", bad)
        assert study.main(study_args(mnist_dir, "--print-config")) == 2
        err = capsys.readouterr().err
        assert f"error: RANK={bad!r} is not a whole number: start the processes with torchrun" in err, err
    monkeypatch.setenv("RANK", "1")  # (rank 1 of 2: rank 0 alone prints the settings, as before)
    assert study.main(study_args(mnist_dir, "--print-config")) == 0
    assert capsys.readouterr().out == ""


_DROPOUT_SCRIPT = """
import sys, torch
from sparsetrain.experiment import data as D, distributed as dist
from sparsetrain.experiment.models import build_model
from sparsetrain.experiment.train import train_epoch
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (24,), generator=g)
split = D.Split(x, y, y.clone(), torch.arange(24), torch.zeros(24, dtype=torch.bool), torch.tensor([0.5]),
                torch.tensor([0.25]))
def trained(distributed):
    torch.manual_seed(0)
    model = build_model("lenet300", 10, 1, 28, dropout=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, split, opt, 3, epoch=0, seed=0, masks={}, forward=dist.wrap(model) if distributed else None)
    return torch.cat([p.detach().flatten() for p in model.parameters()])
ref = trained(False)  # one process (before the group exists): its seeded dropout masks
dist.setup(torch.device("cpu"))
got = trained(True)  # --batch-size 3 on 2 ranks: every batch whole on every rank
err = float((got - ref).abs().max())
open(f"{sys.argv[1]}/rank{dist.rank()}.txt", "w").write(f"{err < 1e-5} {err:.2e}")
dist.teardown()
"""


def test_dropout_under_two_rows_per_rank_draws_one_processs_masks(tmp_path, forks):
    """Under 2 rows a rank every rank trains each batch whole; with dropout each drew its own mask (seeded
    by rank), so DDP averaged the batch's gradient over N masks, no draw of one process's. Every rank
    draws rank 0's stream now, one process's: after an epoch at --batch-size 3 on 2 ranks the weights are
    the one-process run's."""
    _run_script(forks, tmp_path, _DROPOUT_SCRIPT)
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text().startswith("True "), (tmp_path / f"rank{r}.txt").read_text()


_STALE_DDP_SCRIPT = """
import sys, torch
from torch import nn
import sparsetrain
from sparsetrain.experiment import distributed as dist
from sparsetrain.prune import global_prune
dist.setup(torch.device("cpu"))
x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))  # 2 steps, each 8 rows split over ranks
out = []
def step(ddp, model, k):
    try:
        ddp(x[k].chunk(2)[dist.rank()]).square().mean().backward()
    except ValueError as e:
        return "refused " + str(e)[:110]
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return "averaged" if dist.same_everywhere(g.tolist()) else "not averaged"
for how in ("prune", "sparsify_", "freeze"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    masks = global_prune(model, {}, 0.3)
    if how != "sparsify_":
        sparsetrain.sparsify_(model, masks)
    ddp = nn.parallel.DistributedDataParallel(model)
    out.append(f"{how} before {step(ddp, model, 0)}")
    if how != "sparsify_":
        global_prune(model, masks, 0.5)  # (in place: the values shrink)
        model[0].bias.requires_grad_(how == "prune")  # (freeze: and a bias frozen since the DDP was built)
    else:
        sparsetrain.sparsify_(model, masks)  # (new Parameters)
    out.append(f"{how} stale {step(ddp, model, 1)}")
    out.append(f"{how} rebuilt {step(nn.parallel.DistributedDataParallel(model), model, 1)}")
open(f"{sys.argv[1]}/rank{dist.rank()}.txt", "w").write("\\n".join(out))
dist.teardown()
"""


def test_a_users_ddp_built_before_a_prune_or_swap_is_refused_at_its_next_forward(tmp_path, forks):
    """A user's own DistributedDataParallel not rebuilt after pruning resized the values (or after
    sparsify_ replaced the layers) ran its next step averaging no gradient, silently (its hooks sit on
    the old parameters' accumulators), then raised PyTorch's "Expected to have finished reduction". Its
    first forward is refused now, by name; a DDP built after averages as before. A bias frozen since (and a
    prune) is named as such (the message blamed the prune's size change before 2026-12-06)."""
    _run_script(forks, tmp_path, _STALE_DDP_SCRIPT)
    stale = "refused this DistributedDataParallel was built before the model's "
    for r in (0, 1):
        lines = (tmp_path / f"rank{r}.txt").read_text().split("\n")
        assert [lines[i] for i in (0, 2, 3, 5, 6, 8)] == [
            "prune before averaged", "prune rebuilt averaged", "sparsify_ before averaged", "sparsify_ rebuilt averaged",
            "freeze before averaged", "freeze rebuilt averaged"], lines
        assert lines[1].startswith(f"prune stale {stale}trainable parameters changed size"), lines
        assert lines[4].startswith(f"sparsify_ stale {stale}layers were replaced"), lines
        assert lines[7].startswith("freeze stale refused this DistributedDataParallel was built before requires_grad "
                                   "was changed on the model's parameters (4 -> 3"), lines


_ENTROPY_SCRIPT = """
import sys, torch
from sparsetrain.experiment import distributed as dist
from sparsetrain.experiment.entropy import activation_entropy
from sparsetrain.experiment.models import build_model
torch.manual_seed(0)
model = build_model("lenet300", 10, 1, 28)
x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
ref = activation_entropy(model, [x])  # one process (before the group exists), the whole batch
dist.setup(torch.device("cpu"))
lines = []
for n in (5, 1):  # 5 rows: 2 and 3 a rank; 1 row: rank 0 counts none
    try:
        got = activation_entropy(model, [x[:n][dist.rows(n)]], reduce=dist.all_sum)
        lines.append(f"{n} {abs(got['mean'] - ref['mean']) < 1e-12 and got['samples'] == 5}")
    except ValueError as e:
        lines.append(f"{n} refused {e}")
open(f"{sys.argv[1]}/rank{dist.rank()}.txt", "w").write("\\n".join(lines))
dist.teardown()
"""


def test_sharded_entropy_with_a_rank_without_samples_is_refused_on_every_rank(tmp_path, forks):
    """activation_entropy(reduce=all_sum) with a rank that got no sample (fewer rows than ranks): that rank
    had no layer's counts to reduce, so its reduces met the other rank's counts of other sizes and every
    rank died with a gloo error. Every rank now raises one ValueError; with rows on each rank the sharded
    entropy equals one process's."""
    _run_script(forks, tmp_path, _ENTROPY_SCRIPT)
    refused = ("1 refused 1 rank(s) got no sample in batches: every rank must count at least one (a data-parallel "
               "pass needs at least as many samples as ranks)")
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text().split("\n") == ["5 True", refused]
