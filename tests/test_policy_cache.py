"""The auto policy's decision cache file stays bounded over a long pruning run (engine/policy_cache.py):
a layer timed again at every round it stays dense added one entry per (layer, nonzeros) for good."""
import ast
import json

import torch
from torch import nn

from sparsetrain.engine import policy, policy_cache
from sparsetrain.engine.nn import is_sparse


def _mask(score, k):
    """The k largest of `score`: a magnitude pruning round's mask with k nonzeros."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[score.flatten().argsort(descending=True)[:k]] = True
    return mask.view_as(score)


def test_the_decision_cache_keeps_each_layer_s_newest_decisions(monkeypatch, tmp_path):
    """Each dense layer past MEASURE_FROM is timed once per round (its nonzeros shrink): the file grew by one
    entry per round and per run for good; now each layer keeps its KEEP_PER_LAYER newest, the rest measured
    again when asked for, another layer's and an entry of another form kept."""
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    monkeypatch.setattr(policy_cache, "KEEP_PER_LAYER", 4)
    timed = []

    def fake_seconds(layer, x, step):  # (dense always faster: the layer stays dense, timed every round)
        timed.append(layer.weight.shape)
        return 3.0 if is_sparse(layer) else 2.0

    monkeypatch.setattr(policy, "_step_seconds", fake_seconds)
    (tmp_path / "engine_auto.json").write_text(json.dumps({"an edited entry": True}))
    big, small = nn.Linear(64, 32), nn.Linear(16, 8)
    score, other = torch.rand(big.weight.shape), torch.rand(small.weight.shape)
    rounds = [int(big.weight.numel() * 0.8 ** r) for r in range(4, 14)]  # (10 rounds past 50% at rate 0.2)
    for k in rounds:
        assert not policy.sparse_is_faster(big, _mask(score, k), (2, 64), reps=1)
    for k in (60, 50):
        policy.sparse_is_faster(small, _mask(other, k), (2, 16), reps=1)
    cache = json.loads((tmp_path / "engine_auto.json").read_text())
    nnz = lambda shape: [ast.literal_eval(k)[6] for k in cache if k.startswith(f"('Linear', {shape}")]  # noqa: E731 (its nonzeros)
    assert nnz((32, 64)) == rounds[-4:] and nnz((8, 16)) == [60, 50] and cache["an edited entry"] is True
    assert len(cache) == 4 + 2 + 1
    # a new process: the newest are taken from the file; an evicted one is timed again (dense and sparse)
    monkeypatch.setattr(policy, "_DECISIONS", {})
    n = len(timed)
    policy.sparse_is_faster(big, _mask(score, rounds[-1]), (2, 64), reps=1)
    assert len(timed) == n
    policy.sparse_is_faster(big, _mask(score, rounds[0]), (2, 64), reps=1)
    assert len(timed) == n + 4
    cache = json.loads((tmp_path / "engine_auto.json").read_text())
    assert nnz((32, 64)) == rounds[-3:] + rounds[:1]  # (the re-timed one is the newest now)


def _cached_run(monkeypatch, tmp_path):
    """A layer decided once (dense faster) into tmp_path's cache file; (layer, mask, times timed)."""
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    timed = []

    def fake_seconds(layer, x, step):
        timed.append(layer)
        return 3.0 if is_sparse(layer) else 2.0

    monkeypatch.setattr(policy, "_step_seconds", fake_seconds)
    layer = nn.Linear(64, 32)
    mask = _mask(torch.rand(layer.weight.shape), 300)
    assert not policy.sparse_is_faster(layer, mask, (2, 64), reps=1)
    return layer, mask, timed


def test_a_cache_read_removes_old_leftovers_of_killed_writers(monkeypatch, tmp_path):
    """A killed writer's .engine_auto.* temporary file was removed only when a new decision was saved: runs whose
    decisions were all cached kept them for good. A read now removes those older than LEFTOVER_AGE_S whose writer
    is gone (its lock free), and keeps a younger one (an older sparsetrain's unlocked file may be in progress)."""
    import os
    import subprocess
    import sys
    import time
    layer, mask, timed = _cached_run(monkeypatch, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - policy.LEFTOVER_AGE_S - 60
    for name in (f".engine_auto.{dead.pid}.x1y2z3", ".engine_auto.k3j4h5g6", ".engine_auto.young1"):
        (tmp_path / name).write_text('{"hal')
        if "young" not in name:
            os.utime(tmp_path / name, (old, old))
    (tmp_path / "notes.txt").write_text("mine")  # (not the cache's: kept, however old)
    os.utime(tmp_path / "notes.txt", (old, old))
    n = len(timed)
    monkeypatch.setattr(policy, "_DECISIONS", {})  # (a new process: every decision read from the file)
    monkeypatch.setattr(policy, "_save_decision", lambda *a: (_ for _ in ()).throw(AssertionError("saved")))
    assert not policy.sparse_is_faster(layer, mask, (2, 64), reps=1)
    assert len(timed) == n  # (read, not measured nor saved)
    assert sorted(os.listdir(tmp_path)) == sorted([".engine_auto.young1", "engine_auto.json", "engine_auto.json.lock",
                                                   "notes.txt"])


def test_the_cache_file_and_its_rename_are_fsynced(monkeypatch, tmp_path):
    """The cache file was renamed into its folder without fsyncing the folder (the rename lives in its entries:
    a crash could lose it) nor the file's bytes first; now the temporary file is fsynced, renamed, then the
    folder fsynced (engine/durable.py, as the study's atomic_write does)."""
    import os
    events, real_fsync, real_replace, real_dir = [], os.fsync, os.replace, policy.fsync_dir

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    def fsync_dir(folder):
        events.append(("fsync_dir", folder))
        return real_dir(folder)

    monkeypatch.setattr(policy.os, "fsync", fsync)
    monkeypatch.setattr(policy.os, "replace", replace)
    monkeypatch.setattr(policy, "fsync_dir", fsync_dir)
    _cached_run(monkeypatch, tmp_path)
    mine = [e for e in events if e[0] != "fsync" or e[1].startswith(".engine_auto.")]
    assert [e[0] for e in mine] == ["fsync", "replace", "fsync_dir"]
    assert mine[1][1] == "engine_auto.json" and mine[2][1] == str(tmp_path)
    assert json.loads((tmp_path / "engine_auto.json").read_text()) == {k: False for k in policy._DECISIONS}
