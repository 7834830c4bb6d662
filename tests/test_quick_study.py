"""The `quick` profile end to end on the real Fashion-MNIST (~6 min): `make test-slow`. The study runs once;
every file the README promises of its run directory is then checked against the others and against
sparsetrain's own accounting (the settings, the pruning schedule, FLOPs of each round's checkpoint, the
summary's numbers), and the finished run invoked again must do no work and change no file."""
import csv
import hashlib
import json
import math
import os
import re

import pytest
import torch

import sparsetrain
from sparsetrain.engine.nn import is_sparse, model_sparsity, prunable_layers, weight_count
from sparsetrain.experiment import datasets, loop, study
from sparsetrain.experiment.checkpoint import load_model
from sparsetrain.experiment.config import config_from_args
from sparsetrain.experiment.devices import git_commit
from sparsetrain.experiment.flops import forward_flops, paper_macs, paper_round_flops, training_flops
from sparsetrain.experiment.metrics import best_index
from sparsetrain.experiment.models import build_model
from sparsetrain.experiment.train import evaluate, steps_per_epoch
from sparsetrain.prune.base import count_of

# Debian's dataset-fashion-mnist, which conftest hides from every test (read here before it does so): without it
# this test looked in ./data and tried to download, so `make test-slow` failed on a machine without network
SYSTEM_FASHION = datasets.FASHION_SYSTEM_DIR
# metrics.csv's columns (README, Outputs: "one row per round: ..."), then entropy/<layer> per ReLU
COLUMNS = ["seed", "phase", "round", "sparsity", "epochs", "train_loss", "train_acc", "val_loss", "val_acc",
           "test_loss", "test_acc", "entropy_mean", "fwd_flops", "round_flops", "cum_flops", "paper_round_flops",
           "paper_cum_flops", "teacher_flops", "teacher_cost", "teacher_paper_flops", "teacher_paper_cost", "wall_s",
           "sec_per_epoch", "sparse_layers", "is_best"]
SHAPE = (1, 28, 28)


def _rows(pdir):
    with open(os.path.join(pdir, "metrics.csv"), newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _snapshot(rd):
    """{path under rd: sha256 of the file, or the link's target} of everything in rd but .lock (the pid of the
    last process that held the run: each invocation writes its own)."""
    out = {}
    for d, dirs, files in os.walk(rd):
        for name in dirs + files:
            p = os.path.join(d, name)
            if os.path.islink(p):
                out[os.path.relpath(p, rd)] = ("link", os.readlink(p))
            elif os.path.isfile(p) and p != os.path.join(rd, ".lock"):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, rd)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _survivors(n, rate, rounds):
    """Weights left after each round of `rate` of the survivors (floor, as the magnitude rule counts)."""
    left = [n]
    for _ in range(rounds):
        left.append(left[-1] - count_of(rate, left[-1]))
    return left


def check_config(rd, cfg):
    """config.json: the resolved settings that name the run, the commit and versions it ran with."""
    with open(os.path.join(rd, "config.json")) as f:
        conf = json.load(f)
    for k, v in study.result_settings(cfg).items():
        assert conf[k] == v, k
    assert os.path.basename(rd) == os.path.basename(study.run_dir_of(cfg))
    assert conf["git_commit"] == git_commit() and re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", conf["git_commit"])
    assert conf["sparsetrain_version"] == sparsetrain.__version__
    assert conf["versions"]["torch"] == torch.__version__ and conf["world_size"] == 1
    assert conf["torch_threads"] == torch.get_num_threads() and conf["ran_on"] == "cpu, fp32"
    assert "resumed_with" not in conf and re.fullmatch(r"[0-9a-f]+", conf["data_fingerprint"])
    return conf


def check_phase(pdir, cfg, splits, teacher_rows=None):
    """One phase's metrics.csv against its checkpoints, the pruning schedule and the FLOPs accounting; returns
    its rows (floats, ints where whole)."""
    phase, role = os.path.basename(pdir), "teacher" if teacher_rows is None else "student"
    hp = cfg.hyper(role)
    header, raw = _rows(pdir)
    dense = build_model("lenet300", num_classes=10, in_channels=1, image_size=28)
    relus = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.ReLU)]
    assert header == COLUMNS + [f"entropy/{n}" for n in relus]
    rows = [{k: (v if k == "phase" else float(v)) for k, v in r.items()} for r in raw]
    K = len(rows) - 1
    assert [r["round"] for r in rows] == list(range(K + 1))
    assert all(r["seed"] == 0 and r["phase"] == phase and r["epochs"] == hp.epochs == 30 for r in rows)
    # Algorithm 1's schedule: each round prunes 20% of the survivors, until the next target reaches the wall
    n = weight_count(dense)
    left = _survivors(n, cfg.rate, K)
    assert [r["sparsity"] for r in rows] == [1 - k / n for k in left]
    nxt = [1 - (1 - r["sparsity"]) * (1 - cfg.rate) for r in rows]  # (each round's next target)
    assert nxt[K] >= cfg.wall > nxt[K - 1]
    assert (cfg.rate, cfg.wall, K) == (0.2, 0.996, 24)
    n_train = min(len(splits.train), steps_per_epoch(len(splits.train), hp.batch_size) * hp.batch_size)
    paper_round = paper_round_flops(dense, SHAPE, len(splits.train) + len(splits.val), hp.epochs)
    cum = 0
    for k, r in enumerate(rows):
        model, masks, payload = load_model(os.path.join(pdir, "ckpt", f"round_{k:02d}.pt"))
        assert payload["round"] == k and model_sparsity(model, masks, n) == pytest.approx(r["sparsity"], abs=1e-12)
        fwd = forward_flops(model, SHAPE, masks)["total"]
        cum += training_flops(fwd, n_train, hp.epochs)
        flops = (fwd, training_flops(fwd, n_train, hp.epochs), cum)
        assert (r["fwd_flops"], r["round_flops"], r["cum_flops"]) == flops, k
        assert (r["paper_round_flops"], r["paper_cum_flops"]) == (paper_round, (k + 1) * paper_round), k
        assert r["sparse_layers"] == sum(is_sparse(m) for _, m in prunable_layers(model)), k
        ent = [r[f"entropy/{x}"] for x in relus]
        assert all(0 <= e <= 1 for e in ent) and r["entropy_mean"] == pytest.approx(sum(ent) / len(ent), rel=1e-12)
        assert r["wall_s"] > 0 and r["sec_per_epoch"] > 0 and 0 <= r["test_acc"] <= 1
        if k in (0, K):  # the checkpoint is the round's model: its accuracies, bit for bit
            model.eval()
            for split, key in ((splits.val, "val_acc"), (splits.test, "test_acc")):
                assert evaluate(model, split)["acc"] == r[key], (k, key)
    assert rows[0]["sparse_layers"] == 0 and rows[K]["sparse_layers"] >= 2  # the sparse engine takes over
    if teacher_rows is None:
        assert all(r[c] == 0 for r in rows for c in ("teacher_flops", "teacher_cost", "teacher_paper_flops",
                                                     "teacher_paper_cost"))
    else:  # distilled from the dense teacher: its cost up to round 0, its forward per sample trained
        teacher, _, _ = load_model(os.path.join(os.path.dirname(pdir), "teacher", "ckpt", "round_00.pt"))
        t = forward_flops(teacher, SHAPE)["total"] * n_train * hp.epochs
        tp = paper_macs(dense, SHAPE) * (len(splits.train) + len(splits.val)) * hp.epochs
        assert all((r["teacher_flops"], r["teacher_cost"], r["teacher_paper_flops"], r["teacher_paper_cost"]) ==
                   (t, teacher_rows[0]["cum_flops"], tp, teacher_rows[0]["paper_cum_flops"]) for r in rows)
    # the best-validation round (first of ties) marked once, and best.json says the same; the phase ended at the wall
    b = best_index(rows)
    assert [r["is_best"] for r in rows] == [int(k == b) for k in range(K + 1)]
    with open(os.path.join(pdir, "best.json")) as f:
        best = json.load(f)
    assert {k: best[k] for k in ("round", "val_acc", "test_acc", "sparsity", "path", "stop")} == {
        "round": b, "val_acc": rows[b]["val_acc"], "test_acc": rows[b]["test_acc"], "sparsity": rows[b]["sparsity"],
        "path": f"ckpt/round_{b:02d}.pt", "stop": "wall"}
    # finished: results with their checksum records, no resume state
    assert sorted(os.listdir(pdir)) == ["best.json", "best.json.sha256", "ckpt", "metrics.csv", "metrics.csv.sha256"]
    assert sorted(os.listdir(os.path.join(pdir, "ckpt"))) == sorted(
        f"round_{k:02d}.pt{x}" for k in range(K + 1) for x in ("", ".sha256"))
    return rows


def _fmt(v, nd):
    return f"{v:.{nd}f}"


def check_summary(rd, conf, curves):
    """summary.md: the settings are config.json's, and each per-round table's and Table 1's numbers the
    metrics files'."""
    text = open(os.path.join(rd, "summary.md")).read()
    settings = dict(re.findall(r"^\| (\w+) \| (.*) \|$", text.split("\n## ")[0], re.M))
    for k in ("dataset", "model", "student", "eps", "rate", "wall", "profile", "git_commit", "ran_on"):
        assert settings[k] == str(conf[k]), k
    assert re.search(r"^\| 0 \| done \| ", text, re.M)
    sections = dict(re.findall(r"^### Per round: (.*)\n\n((?:\|.*\n)+)", text, re.M))
    titles = {"teacher": "teacher (lenet300) = vanilla student",
              "distill-dense": "student (lenet300) distilled from the dense teacher"}
    assert set(titles.values()) <= set(sections)
    for phase, title in titles.items():
        rows = curves[phase]
        nd = int(min(8, max(2, 2 - math.floor(math.log10(max(r["cum_flops"] for r in rows) / 1e15)))))
        b = best_index(rows)
        lines = sections[title].strip("\n").split("\n")[2:]
        assert len(lines) == len(rows), phase
        for line, r in zip(lines, rows):
            c = [x.strip() for x in line.strip("|").split("|")]
            assert c[:5] == [str(int(r["round"])), _fmt(100 * r["sparsity"], 2), _fmt(100 * r["val_acc"], 2),
                             _fmt(100 * r["test_acc"], 2), _fmt(r["entropy_mean"], 3)], (phase, line)
            assert (c[8], c[9]) == (str(int(r["sparse_layers"])), _fmt(r["cum_flops"] / 1e15, nd)), (phase, line)
            assert ("best 1/1" in c[10]) == (r["round"] == b), (phase, line)
    # Table 1's rows without early stop: the whole curve's FLOPs (and the teacher's: its cost up to round 0 plus
    # its KD inference), the best-validation and the last model, the last round and its label
    table = text.split("## Results")[1].split("\n\n")[1].split("\n")[2:]
    t1 = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in table)}
    for name, phase in (("vanilla, no early stop", "teacher"),
                        ("distilled from the dense teacher, no early stop", "distill-dense")):
        rows, c = curves[phase], t1[name]
        b, K = best_index(rows), len(rows) - 1
        exact, paper = _sig(rows[K]["cum_flops"] / 1e15), _sig(rows[K]["paper_cum_flops"] / 1e15)
        if phase != "teacher":
            exact += f" (+{_sig((rows[0]['teacher_cost'] + sum(r['teacher_flops'] for r in rows)) / 1e15)})"
            paper += f" (+{_sig((rows[0]['teacher_paper_cost'] + sum(r['teacher_paper_flops'] for r in rows)) / 1e15)})"
        last_label = sections[titles[phase]].strip("\n").split("\n")[-1].split("|")[6].strip()
        assert c[4:12] == [exact, paper, _fmt(100 * rows[b]["test_acc"], 2), _fmt(100 * rows[K]["test_acc"], 2),
                           _fmt(100 * rows[b]["sparsity"], 2), _fmt(100 * rows[K]["sparsity"], 2), str(K),
                           last_label], name
    assert c[:4] == ["distilled from the dense teacher, no early stop", "", "✓", "dense"] and len(t1) == 9


def _sig(v):
    """v to 3 significant digits, at least 2 decimals (the report's FLOPs cells)."""
    return _fmt(v, int(min(8, max(2, 2 - math.floor(math.log10(abs(v)))))))


@pytest.mark.slow
def test_quick_study_shows_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", SYSTEM_FASHION)
    argv = ["fashion-mnist", "--profile", "quick", "--out", str(tmp_path)]
    assert study.main(argv) == 0
    check_resume(check_run(tmp_path, argv), argv, monkeypatch)


def check_run(out, argv):
    """Every check of the finished quick run in `out` (its one run directory, returned)."""
    cfg = config_from_args(argv)[0]
    rd = study.run_dir_of(cfg)
    assert os.listdir(out) == [os.path.basename(rd)]
    conf = check_config(rd, cfg)
    assert sorted(os.listdir(rd)) == [".lock", "accuracy_vs_sparsity.png", "config.json", "cum_pflops.png", "seed0",
                                      "summary.md"]
    for png in ("accuracy_vs_sparsity.png", "cum_pflops.png"):
        with open(os.path.join(rd, png), "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(os.path.join(rd, png)) > 1000
    sd = os.path.join(rd, "seed0")
    splits = study.load_splits(cfg, 0)
    with open(os.path.join(sd, "noise.json")) as f:
        noise = json.load(f)
    sizes = (len(splits.train), len(splits.val), len(splits.test))
    assert (noise["train"], noise["val"], noise["test"]) == sizes == (9000, 1000, 10000)
    assert noise["flipped"] == splits.flipped.tolist() and noise["train_flipped"] == len(noise["flipped"])
    with open(os.path.join(sd, "status.json")) as f:
        assert json.load(f)["state"] == "done"
    curves = {"teacher": check_phase(os.path.join(sd, "teacher"), cfg, splits)}
    curves["distill-dense"] = check_phase(os.path.join(sd, "distill-dense"), cfg, splits, curves["teacher"])
    # LeNet-300-100 is teacher and student on one schedule: the teacher run is the vanilla run
    assert sorted(os.listdir(sd)) == ["distill-best", "distill-dense", "noise.json", "status.json", "teacher"]
    if best_index(curves["teacher"]) == 0:  # the best teacher is the dense one: one student run, linked
        assert os.path.islink(os.path.join(sd, "distill-best"))
        assert os.readlink(os.path.join(sd, "distill-best")) == "distill-dense"
    else:
        curves["distill-best"] = check_phase(os.path.join(sd, "distill-best"), cfg, splits, curves["teacher"])
    check_summary(rd, conf, curves)
    assert "no early stop" in open(os.path.join(rd, "summary.md")).read()
    return rd


def check_resume(rd, argv, monkeypatch):
    """The finished run invoked again: nothing trains, no file changes (but .lock's pid)."""
    before = _snapshot(rd)

    def no_training(*a, **k):
        raise AssertionError("a finished run trained again")
    monkeypatch.setattr(loop, "train_round", no_training)
    assert study.main(argv) == 0
    assert _snapshot(rd) == before
