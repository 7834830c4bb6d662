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
