"""The experiment end to end on tiny IDX files written here: schedule, masks, best round, resume,
distillation, the CLI's errors."""
import copy
import csv
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsetrain
import cli_forks
from conftest import run_dir, strip_timing
from sparsetrain.engine.nn import masks_of
from sparsetrain.experiment import devices, files, report, study
from sparsetrain.experiment.checkpoint import load_model, safe_load
from sparsetrain.experiment.config import Config, build_parser, config_from_args
from sparsetrain.experiment.train import kd_loss


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_study_schedule_best_round_and_outputs(mnist_dir, study_args, capsys):
    assert study.main(study_args(mnist_dir, "--engine", "auto")) == 0
    rd = run_dir(mnist_dir / "runs")
    assert rd.name.startswith("mnist-eps0.2-quick-lenet300-")
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["git_commit"] and cfg["versions"]["torch"] and cfg["student"] == "lenet300"
    # the folder the data was read from, recorded and said once (a --data-dir without it may find another copy)
    assert cfg["data_source"] == str(mnist_dir / "data" / "mnist")
    assert capsys.readouterr().out.count(f"data: read from {mnist_dir / 'data' / 'mnist'}\n") == 1
    rows = read_rows(rd / "seed0" / "teacher" / "metrics.csv")
    # rounds 0..4: sparsity 1 - 0.5^k, stop after the first round reaching the wall (0.9375 >= 0.9)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4]
    for k, r in enumerate(rows):
        assert float(r["sparsity"]) == pytest.approx(1 - 0.5 ** k, abs=1e-3)
    flops = [float(r["fwd_flops"]) for r in rows]
    assert flops == sorted(flops, reverse=True) and flops[-1] < flops[0] / 4
    cum = [float(r["cum_flops"]) for r in rows]
    assert cum == pytest.approx(torch.tensor([float(r["round_flops"]) for r in rows], dtype=torch.float64).cumsum(0).tolist())
    assert all(0.0 <= float(r["entropy_mean"]) <= 1.0 for r in rows)
    # best round = argmax validation accuracy (first of ties), marked once, its checkpoint loads
    best = json.loads((rd / "seed0" / "teacher" / "best.json").read_text())
    vals = [float(r["val_acc"]) for r in rows]
    assert best["round"] == vals.index(max(vals)) and best["stop"] == "wall"  # (why it ended: the report's `†`)
    assert [int(r["is_best"]) for r in rows].count(1) == 1 and int(rows[best["round"]]["is_best"]) == 1
    assert not list(rd.glob("seed0/*/state.pt*"))  # finished phases keep no resume state (nor its checksum)
    model, masks, payload = load_model(str(rd / "seed0" / "teacher" / best["path"]))
    assert payload["round"] == best["round"]
    # masks only shrink, round over round
    prev = None
    for k in range(5):
        m = masks_of(*load_model(str(rd / "seed0" / "teacher" / "ckpt" / f"round_{k:02d}.pt"))[:2])
        if prev is not None:
            for n in m:
                assert not bool((m[n] & ~prev[n]).any())
        prev = m
    # the distilled student ran from the best teacher, with the teacher's cost recorded
    drows = read_rows(rd / "seed0" / "distill-best" / "metrics.csv")
    noise = json.loads((rd / "seed0" / "noise.json").read_text())
    # KD inference: the best teacher's forward FLOPs per sample x samples trained (batches of 16, a final
    # batch of one skipped) x 2 epochs, every student round
    n_train = noise["train"] - (noise["train"] % 16 == 1)
    assert len(drows) == 5 and all(int(r["teacher_flops"]) == int(rows[best["round"]]["fwd_flops"]) * n_train * 2
                                   for r in drows)
    assert float(drows[0]["teacher_cost"]) == pytest.approx(float(rows[best["round"]]["cum_flops"]))
    # symmetric noise flips exactly floor(eps * N) training labels, each once (--eps 0.2)
    assert len(noise["flipped"]) == len(set(noise["flipped"])) == noise["train_flipped"] == int(0.2 * noise["train"])
    assert (rd / "summary.md").exists()


def test_the_round_lines_give_accuracies_in_percent(mnist_dir, study_args, capsys):
    """Each round's log line printed the accuracies as fractions ("test 0.865") beside the sparsity in %;
    they are in % now, as every other output, and match metrics.csv."""
    assert study.main(study_args(mnist_dir, "--phases", "teacher")) == 0
    rows = read_rows(run_dir(mnist_dir / "runs") / "seed0" / "teacher" / "metrics.csv")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[teacher seed 0] round")]
    assert len(lines) == len(rows) == 5
    for ln, r in zip(lines, rows):
        got = re.search(r"sparsity +([\d.]+)%  train +([\d.]+)%  val +([\d.]+)%  test +([\d.]+)%  entropy", ln)
        assert got, ln
        want = [100 * float(r[k]) for k in ("sparsity", "train_acc", "val_acc", "test_acc")]
        assert [float(g) for g in got.groups()] == pytest.approx(want, abs=0.006), ln


def test_resume_after_kill_equals_uninterrupted(mnist_dir, study_args, kill_and_resume):
    # killed mid-way through round 3 of the teacher run
    kill_and_resume(mnist_dir, study_args(mnist_dir, "--teachers", "dense"), kill_at=7)


def test_a_seed_gives_the_same_curves_alone_or_beside_others_and_seeds_differ(mnist_dir, study_args):
    """Every draw of a seed (split, noise, initial model, each epoch's batches, reinit weights) comes from its
    own seeded stream: seed 1 run alone (as a sweep runs it) gives the rows it gives after seed 0 in one
    process (the sweep's report takes either for that seed), and seed 0's differ."""
    base = study_args(mnist_dir, "--teachers", "dense", "--perturb", "reinit")
    assert study.main(base + ["--seeds", "0", "1", "--out", str(mnist_dir / "both")]) == 0
    assert study.main(base + ["--seeds", "1", "--out", str(mnist_dir / "one")]) == 0
    for phase in ("teacher", "distill-dense"):
        both, one = (strip_timing(read_rows(run_dir(mnist_dir / d) / "seed1" / phase / "metrics.csv"))
                     for d in ("both", "one"))
        zero = strip_timing(read_rows(run_dir(mnist_dir / "both") / "seed0" / phase / "metrics.csv"))
        assert len(one) > 1 and both == one
        assert [r["train_loss"] for r in zero] != [r["train_loss"] for r in one]


def test_a_resumed_round_s_seconds_count_the_epochs_before_the_kill(mnist_dir, study_args, interrupted, monkeypatch):
    """wall_s (the per-round table's s/round) of a round killed and resumed counts its epochs trained
    before the kill, as sec_per_epoch does: it counted the resumed process's epochs alone. A fake clock
    that advances 10 s per training epoch only: every round's wall_s is its epochs' 10 s each."""
    from sparsetrain.experiment import loop

    clock, real = [0.0], loop.train_epoch

    def epoch(*a, **k):
        clock[0] += 10.0
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_epoch", epoch)
    monkeypatch.setattr(loop, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    args = study_args(mnist_dir, "--phases", "teacher")
    interrupted(args, kill_at=4)  # (round 1's second epoch: its first one was trained before the kill)
    assert study.main(args + ["--resume"]) == 0
    rows = read_rows(run_dir(mnist_dir / "runs") / "seed0" / "teacher" / "metrics.csv")
    assert len(rows) == 5
    for r in rows:
        assert float(r["sec_per_epoch"]) == pytest.approx(10.0)
        assert float(r["wall_s"]) == pytest.approx(10.0 * int(r["epochs"])), r["round"]


def test_engines_give_the_same_curve(mnist_dir, study_args):
    for engine in ("dense", "sparse"):
        assert study.main(study_args(mnist_dir, "--engine", engine, "--teachers", "dense",
                                     "--out", str(mnist_dir / engine))) == 0
    ra = read_rows(run_dir(mnist_dir / "dense") / "seed0" / "teacher" / "metrics.csv")
    rb = read_rows(run_dir(mnist_dir / "sparse") / "seed0" / "teacher" / "metrics.csv")
    assert len(ra) == len(rb) == 5  # rounds 0..4 on both engines (an empty or short curve fails)
    assert int(rb[-1]["sparse_layers"]) > 0 and all(int(r["sparse_layers"]) == 0 for r in ra)
    for a, b in zip(ra, rb):
        assert float(a["sparsity"]) == float(b["sparsity"])
        assert float(a["val_acc"]) == pytest.approx(float(b["val_acc"]), abs=0.05)
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=0.05)


def test_kd_loss_equals_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.1, -1.0, 3.0]])
    t = torch.tensor([[0.5, 1.5, 1.0], [2.0, 0.0, 1.0]])
    y = torch.tensor([1, 2])
    alpha, tau = 0.8, 10.0
    ce = -(torch.log_softmax(s, 1)[0, 1] + torch.log_softmax(s, 1)[1, 2]) / 2
    ps, pt = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    expected = (1 - alpha) * ce + alpha * tau ** 2 * kl
    torch.testing.assert_close(kd_loss(s, t, y, alpha, tau), expected)
    torch.testing.assert_close(kd_loss(s, t, y, 0.0, tau), F.cross_entropy(s, y))
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, t, y, 1.5, tau)
    for bad in (0.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="tau must be a number > 0 and finite"):
            kd_loss(s, t, y, 0.5, bad)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        kd_loss(s, t, y, True, tau)


def test_a_final_batch_of_one_sample_is_skipped(monkeypatch):
    """9 images in batches of 8: the 1-image batch would fail BatchNorm on a 1x1 map (VGG-like on
    28x28 images); the epoch trains on the first 8. Under torchrun a final batch under 2N rows runs
    whole on every rank (no rank gets a single row)."""
    from sparsetrain.experiment import data as D
    from sparsetrain.experiment import distributed as dist
    from sparsetrain.experiment.train import train_epoch
    g = torch.Generator().manual_seed(0)
    split = D.Split(torch.randint(0, 256, (9, 1, 2, 2), dtype=torch.uint8, generator=g), torch.arange(9) % 3,
                    torch.arange(9) % 3, torch.arange(9), torch.zeros(9, dtype=torch.bool), torch.tensor([0.5]),
                    torch.tensor([0.25]))
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 2), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = copy.deepcopy(model)
    out = train_epoch(model, split, opt, 8, epoch=0, seed=0, masks={})
    assert int(model[1].num_batches_tracked) == 1
    # the reference: one SGD step on the epoch's first batch of 8 (the same seeded draw), none on the 9th image
    x, y = next(D.iterate(split, 8, shuffle=True, augment=True, generator=D.epoch_generator(0, 0)))
    assert len(y) == 8
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    assert out["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    from sparsetrain.experiment.train import steps_per_epoch  # (what --rewind-iter is checked against)
    assert [steps_per_epoch(n, 8) for n in (9, 8, 10, 1, 17)] == [1, 1, 2, 1, 2]
    monkeypatch.setattr(dist, "world", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert dist.shard(3) == (slice(0, 3), 1.0) and dist.shard(4) == (slice(2, 4), 1.0)
    assert dist.shard(5) == (slice(2, 5), 1.2)


@pytest.mark.parametrize("argv,message", [
    (["nope"], "invalid choice: 'nope'"),
    (["mnist", "--eps", "1.0"], "--eps must be in"),
    (["mnist", "--rate", "0"], "--rate must be in"),
    (["mnist", "--wall", "0"], "--wall must be in"),
    (["mnist", "--alpha", "2"], "--alpha must be in"),
    (["mnist", "--tau", "0"], "--tau must be > 0"),
    (["mnist", "--tau", "inf"], "--tau must be > 0 and <= 1e+18"),
    (["mnist", "--tau", "1e19"], "--tau must be > 0 and <= 1e+18 (tau^2 scales the KD loss in float32)"),
    (["mnist", "--lr", "inf"], "--lr must be > 0 and finite in float32"),
    (["mnist", "--lr", "1e39"], "--lr must be > 0 and finite in float32 (<= 3.4e38), got 1e+39"),
    (["mnist", "--weight-decay", "1e39"], "--weight-decay must be >= 0 and finite in float32"),
    (["mnist", "--drop", "10"], "--drop must be in (0, 1], got 10.0"),
    (["mnist", "--val-fraction", "0"], "--val-fraction must be in (0, 1)"),
    (["mnist", "--epochs", "5", "--milestones", "3", "10"], "--milestones must be epochs in [1, 5)"),
    # (1 epoch: "[1, 1)" named an empty range; now what fits and what to give)
    (["mnist", "--epochs", "1", "--milestones", "1"], "--milestones: no milestone fits 1 epoch (--epochs 1, the teacher"),
    (["mnist", "--student-epochs", "1", "--student-milestones", "2"], "leave --student-milestones out, got 2"),
    # (round r's epoch e shuffles, augments and draws dropout from stream e + 1000 r: epoch 1000 of round 0
    # repeated round 1's first epoch)
    (["mnist", "--student-epochs", "1001"], "--student-epochs must be in [1, 1000]"),
    (["mnist", "--epochs", "1001"], "--epochs must be in [1, 1000]"),
    (["mnist", "--profile", "quick", "--student-milestones", "500"], "--student-milestones must be epochs in [1, 30)"),
    (["mnist", "--model", "alexnet"], "--model: unknown model 'alexnet'"),
    (["mnist", "--perturb", "shuffle"], "argument --perturb: invalid choice"),
    (["mnist", "--structure", "rows"], "argument --structure: invalid choice"),
    (["mnist", "--lr", "-1"], "--lr must be > 0"),
    (["mnist", "--subset", "-5"], "--subset must be >= 0"),
    (["mnist", "--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
    (["mnist", "--threads", "-1"], "--threads must be in [0, 4096]"),
    (["mnist", "--threads", "2147483648"], "--threads must be in [0, 4096]"),
    (["mnist", "--seeds", "-1"], "--seeds must be one or more distinct seeds in [0, 2^32)"),
    (["mnist", "--seeds", str(2**64)], "--seeds must be one or more distinct seeds in [0, 2^32)"),
    (["mnist", "--model", ""], "--model: unknown model ''"),
    (["mnist", "--batch-size", "1"], "--batch-size must be >= 2"),
    (["cifar10", "--label-file", "x.pt"], "--label-file is for cifar100n (human labels), not cifar10"),
    (["mnist", "--amp", "bf16", "--device", "cpu"], "--amp bf16 needs a CUDA device"),
    (["mnist", "--phases", "student"], "argument --phases: invalid choice: 'student'"),
    (["mnist", "--phases", "teacher", "teacher"], "--phases must be one or more distinct"),
    (["mnist", "--seeds", "0", "0"], "--seeds must be one or more distinct seeds"),
    (["mnist", "--teachers", "dense", "dense"], "--teachers must be one or more distinct"),
    (["mnist", "--milestones", "8", "8"], "--milestones must be increasing epochs >= 1, got (8, 8)"),
    (["mnist", "--student-milestones", "9", "3"], "--student-milestones must be increasing epochs"),
    (["mnist", "--t-e", "2"], "--t-e must be in (0, 1]"),
    (["mnist", "--t-a", "0"], "--t-a must be in (0, 1]"),
    (["mnist", "--model", "vgg_d5g40"], "VGG-like needs delta + gamma <= 14"),
])
def test_cli_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_print_config_shows_a_run_planned_for_a_gpu_this_machine_lacks(capsys):
    """--print-config reads no data and runs nothing: it shows a GPU run's settings on a machine without that GPU
    (it was "no CUDA device is available here", exit 2), checking --device and --amp as a sweep's plan does (their
    spelling; bf16/fp16 on the CPU run nowhere); a run itself still needs the device."""
    gpu = ["cifar10", "--eps", "0.5", "--device", f"cuda:{torch.cuda.device_count()}", "--amp", "fp16"]
    assert study.main([*gpu, "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["device"] == gpu[4] and shown["config"]["amp"] == "fp16"
    auto = config_from_args([*gpu[:3], "--amp", "fp16"], here=False)[0]  # (--device auto: not a result key)
    assert shown["run_dir"] == study.run_dir_of(auto)
    for argv, message in (([*gpu[:3], "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
                          ([*gpu[:3], "--device", "cpu", "--amp", "bf16"], "--amp bf16 needs a CUDA device"),
                          (gpu, "CUDA device")):  # (not --print-config: this machine must have it)
        with pytest.raises(SystemExit) as e:
            config_from_args([*argv, "--print-config"] if argv is not gpu else argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_given_milestones_past_the_epochs_are_refused_but_a_preset_run_round_trips(capsys):
    """--epochs alone keeps the preset's milestones (documented); a sweep run's argv writes every field
    out but those milestones, which come back from the preset (given, they are refused: every run of a
    sweep with --epochs failed after planning fine). Milestones given equal to the preset's were let
    through past the epochs (the LR never dropped)."""
    from sparsetrain.experiment.config_resolve import config_to_argv
    cfg = config_from_args(["fashion-mnist", "--profile", "quick", "--epochs", "5"])[0]
    argv = config_to_argv(cfg)
    assert cfg.hyper("teacher").milestones == (15, 22) and config_from_args(argv)[0] == cfg
    assert "--teacher-milestones" not in argv and "--teacher-epochs" in argv
    both = config_from_args(["fashion-mnist", "--profile", "quick", "--epochs", "25", "--milestones", "15", "22"])[0]
    assert "--teacher-milestones" in config_to_argv(both) and config_from_args(config_to_argv(both))[0] == both
    for bad in (["--milestones", "3", "9"], ["--milestones", "15", "22"], ["--student-milestones", "15", "22"]):
        with pytest.raises(SystemExit):
            config_from_args(["fashion-mnist", "--profile", "quick", "--epochs", "5", *bad])
        assert "milestones must be epochs in [1, 5)" in capsys.readouterr().err


def test_an_empty_student_is_the_teachers_model_on_its_own_schedule():
    """--student '' (the teacher's model) trains on that model's Table 4 row: it took the preset
    student's (VGG-like's lr 0.001 for a ResNet-18 student) and made a separate vanilla run."""
    for argv in (["--student", ""], ["--student", "resnet18"]):
        cfg = config_from_args(["cifar10", *argv])[0]
        assert cfg.hyper("student") == cfg.hyper("teacher") and not cfg.separate_vanilla(), argv
    assert config_from_args(["cifar10"])[0].hyper("student").lr == 0.001  # (the preset's VGG-like student)


def test_print_config_shows_what_runs_and_one_model_under_its_aliases(capsys):
    """--print-config lists the phases the command runs, under their directory names (a PATH
    teacher's distill-path-<stem>), the vanilla student that is the teacher run as that full run; a
    student named by an alias of the teacher's model, or whose schedule differs only in a setting
    the run ignores (--rewind-iter without rewind), is the teacher run; -0.0 is 0.0 (one run name)."""
    def phases(*argv):
        assert study.main(["mnist", "--profile", "quick", *argv, "--print-config"]) == 0
        return json.loads(capsys.readouterr().out)["phases"]
    assert list(phases("--phases", "teacher")) == ["teacher"]
    got = phases("--teachers", "dense", "/tmp/t/teach.pt")
    assert list(got) == ["teacher", "vanilla", "distill-dense", "distill-path-teach"]
    assert got["vanilla"]["run"].startswith("the teacher run") and got["vanilla"]["early_stop"].startswith("none")
    for argv in (["--student", "LeNet-300-100"], ["--student-rewind-iter", "7"]):
        assert not config_from_args(["mnist", "--profile", "quick", *argv])[0].separate_vanilla(), argv
    assert config_from_args(["mnist", "--profile", "quick", "--perturb", "rewind", "--student-rewind-iter", "7"]
                            )[0].separate_vanilla()
    assert study.run_dir_of(config_from_args(["cifar100n", "--eps", "-0.0"])[0]) == \
        study.run_dir_of(config_from_args(["cifar100n"])[0])


def test_cli_help_and_missing_dataset(tmp_path):
    helped, missing = cli_forks.run("sparsetrain.experiment", [
        (tmp_path, ["--help"]),
        (tmp_path, ["cifar10", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--profile", "quick",
                    "--no-download"])])
    assert helped.returncode == 0 and "--teachers" in helped.stdout and "--early-stop" in helped.stdout
    assert missing.returncode == 2 and str(tmp_path / "empty") in missing.stderr


def test_help_gives_every_flag_that_takes_a_value_its_default():
    """--epochs, --batch-size, --lr, --milestones, --weight-decay and --rewind-iter said no default in
    --help (unset: each role keeps its own), nor that a --teacher-/--student- flag given too wins."""
    parser = build_parser()
    valued = [a for a in parser._actions if a.option_strings and a.nargs != 0]  # (not --help, nor switches)
    assert len(valued) > 40
    for a in valued:
        assert "(default" in " ".join(a.help.split()), a.option_strings
    epochs = " ".join(next(a for a in valued if "--epochs" in a.option_strings).help.split())
    assert "--teacher-epochs / --student-epochs, given too, win" in epochs
    cfg, _ = config_from_args(["mnist", "--epochs", "2", "--teacher-epochs", "3", "--milestones", "1"])
    assert (cfg.teacher_epochs, cfg.student_epochs) == (3, 2)  # (what the help says)


def test_help_names_an_empty_default():
    """--label-file's help ended "(default )": an empty string default shown as nothing; it says empty."""
    empty = [f for f in dataclasses.fields(Config) if f.default == "" and not f.metadata.get("positional")]
    assert any(f.name == "label_file" for f in empty)
    helps = {a.dest: " ".join(a.help.split()) for a in build_parser()._actions}
    for f in empty:
        assert "(default )" not in helps[f.name] and "(default ," not in helps[f.name], f.name
    assert helps["label_file"].endswith("(default empty)")


def test_report_only_or_resume_under_other_flags_names_the_runs_out_holds(tmp_path, capsys):
    """--report-only (or --resume) given other flags than its run's looks in another directory: the error
    said only "run the same command without it to start one", as if there were no run; it now names the
    runs --out holds and that a run is found by the flags it was started with."""
    base = ["mnist", "--profile", "quick", "--out", str(tmp_path)]
    cfg, _ = config_from_args(base + ["--subset", "300"])
    held = os.path.basename(study.prepare_run_dir(cfg))
    for flag in ("--report-only", "--resume"):
        assert study.main(base + [flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no run to" in err[0] and f"{tmp_path} holds {held}:" in err[0], err
        assert "give the flags it was started with" in err[0]
    assert study.main(["mnist", "--profile", "quick", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds" not in capsys.readouterr().err  # (nothing to name)


def test_a_run_is_found_under_another_spelling_of_its_model(mnist_dir, study_args, interrupted, capsys):
    """The run name hashes the model's spelling: a run started as --model lenet_300_100 and run again as
    LeNet-300-100 (one architecture: models.canonical_name) started afresh in a second directory, and its --resume
    found no run. Now both spellings find the one run, which resumes to the uninterrupted run's rounds."""
    out = mnist_dir / "runs"
    interrupted(study_args(mnist_dir, "--model", "lenet_300_100"), kill_at=4)
    held = run_dir(out)
    assert study.run_dir_of(config_from_args(study_args(mnist_dir, "--model", "LeNet-300-100"))[0]) == str(held)
    assert study.main(study_args(mnist_dir, "--model", "LeNet-300-100", "--resume")) == 0
    assert run_dir(out) == held and os.path.isfile(held / "summary.md")
    assert json.loads((held / "config.json").read_text())["model"] == "lenet_300_100"  # (its own spelling kept)
    resumed = strip_timing(read_rows(held / "seed0" / "teacher" / "metrics.csv"))
    shutil.move(str(out), str(mnist_dir / "first"))
    assert study.main(study_args(mnist_dir, "--model", "lenet300")) == 0  # (uninterrupted, the canonical spelling)
    assert strip_timing(read_rows(run_dir(out) / "seed0" / "teacher" / "metrics.csv")) == resumed
    capsys.readouterr()
    assert study.main(study_args(mnist_dir, "--model", "vgg_d1g1", "--resume")) == 2  # (another model: no run)
    assert "no run to resume" in capsys.readouterr().err


def test_a_twin_under_another_spelling_is_a_folder_named_as_a_run_of_these_settings(tmp_path):
    """spelled_twin takes only a folder named as a run of this dataset, noise and profile with a hash: not one moved
    aside (RUN.old), a copy under another name, nor the hash-less naming of before 2026-12-01 (each was taken, the
    first in sorted order, by the first version); of two twins the one that recorded the names in their one spelling;
    a run continued under another spelling keeps its config.json's own."""
    argv = lambda out, model: ["mnist", "--profile", "quick", "--out", str(out), "--model", model]  # noqa: E731
    spelt = config_from_args(argv(tmp_path, "LeNet-300-100"))[0]
    rd = study.prepare_run_dir(config_from_args(argv(tmp_path, "lenet_300_100"))[0])
    assert study.run_dir_of(spelt) == rd
    own = os.path.join(tmp_path, os.path.basename(rd).replace("lenet_300_100", "LeNet-300-100").rsplit("-", 1)[0])
    os.rename(rd, rd + ".old")
    shutil.copytree(rd + ".old", tmp_path / "backup-of-a-run")
    shutil.copytree(rd + ".old", tmp_path / "mnist-eps0.2-quick")  # (the hash-less naming)
    assert study.run_dir_of(spelt).startswith(own + "-") and not os.path.exists(study.run_dir_of(spelt))
    os.rename(rd + ".old", rd)
    canonical = study.prepare_run_dir(config_from_args(argv(tmp_path / "elsewhere", "lenet300"))[0])
    shutil.move(canonical, tmp_path)  # (two twins: the canonical one's record wins, whatever the names' order)
    twin = os.path.join(tmp_path, os.path.basename(canonical))
    assert study.run_dir_of(spelt) == twin
    study.prepare_run_dir(spelt)
    with open(os.path.join(twin, "config.json")) as f:
        assert json.load(f)["model"] == "lenet300"


def test_corrupt_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not a torch file"):
        safe_load(str(bad))
    pickled = tmp_path / "script.pt"  # (a text file, e.g. a --teachers PATH given a script by mistake)
    pickled.write_text("import torch\n")
    with pytest.raises(ValueError) as e:  # (torch's first line told the user to retry with weights_only=False)
        safe_load(str(pickled))
    assert str(e.value) == f"checkpoint {pickled} is corrupt or not a torch file (UnpicklingError: Unsupported operand 105)"
    torch.save({"hello": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a sparsetrain checkpoint"):
        safe_load(str(tmp_path / "foreign.pt"))
    with pytest.raises(FileNotFoundError):
        safe_load(str(tmp_path / "missing.pt"))


def test_resume_refuses_a_corrupt_round_checkpoint(mnist_dir, study_args, interrupted, capsys):
    """Killed in round 3, the newest round checkpoint truncated: the resume refuses with a clear
    message (exit 2) instead of leaving an unreadable result behind."""
    base = study_args(mnist_dir, "--teachers", "dense")
    interrupted(base, kill_at=7)
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    newest = sorted((pd / "ckpt").glob("round_*.pt"))[-1]
    assert newest.name == "round_02.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    assert study.main(base) == 2
    err = capsys.readouterr().err
    assert "round_02.pt is corrupt" in err and "delete" in err and str(pd) in err
    # (the phase is running: the error called it "a finished phase" before 2026-12-06)
    assert "a finished phase" not in err and "a trained round cannot be rebuilt" in err, err


def test_a_finished_phase_with_damaged_results_is_refused(mnist_dir, study_args, capsys, monkeypatch):
    """A finished phase's metrics.csv and best.json carry checksums, its round checkpoints are checked
    against their records and its rows: a torn metrics.csv gave a silently wrong summary (exit 0), a
    lost round checkpoint went unnoticed. Each is one line naming the file and the folder to delete."""
    base = study_args(mnist_dir, "--teachers", "dense")
    assert study.main(base) == 0
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    metrics, ckpt = pd / "metrics.csv", pd / "ckpt" / "round_03.pt"
    assert (pd / "metrics.csv.sha256").exists() and (pd / "best.json.sha256").exists()
    cases = {"torn metrics": (lambda: metrics.write_bytes(metrics.read_bytes()[:-300]), "metrics.csv is corrupt"),
             "lost round": (lambda: ckpt.unlink(), "round_03.pt is corrupt: missing"),
             "lost round and record": (lambda: (ckpt.unlink(), (pd / "ckpt" / "round_03.pt.sha256").unlink()),
                                       "the checkpoint of round_03.pt is missing")}
    for name, (damage, says) in cases.items():
        keep = {p: p.read_bytes() for p in (metrics, ckpt, pd / "ckpt" / "round_03.pt.sha256")}
        damage()
        capsys.readouterr()
        assert study.main(base) == 2, name
        err = capsys.readouterr().err
        assert says in err and f"delete {pd}" in err and len(err.strip().splitlines()) == 1, (name, err)
        for p, b in keep.items():
            p.write_bytes(b)
    assert study.main(base) == 0  # (restored: the finished run again)
    # the finished run invoked again at another commit: nothing was resumed, so nothing is recorded
    # as a resume (config.json gained a resumed_with entry for it)
    monkeypatch.setattr(study, "git_commit", lambda: "another-commit")
    assert study.main(base) == 0
    assert "resumed_with" not in json.loads((run_dir(mnist_dir / "runs") / "config.json").read_text())


def test_folder_lock_without_locking_support_warns_and_runs(tmp_path, monkeypatch):
    """A filesystem that cannot lock (NFS without lockd: ENOLCK) is not "in use": a warning, no lock."""
    import errno
    import fcntl
    from sparsetrain.experiment.files import folder_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(UserWarning, match="no lock .*do not run this command twice at once"):
        with folder_lock(str(tmp_path / "run")):
            ran.append(1)
    assert ran == [1]


def test_a_lock_taken_on_a_full_disk_still_locks(tmp_path, monkeypatch):
    """folder_lock writes its pid into .lock (for Busy's message only); on a full disk that write was an
    OSError traceback naming no file (ENOSPC at its flush, else at close). Now the lock is held without the
    pid: the run goes on, and a file of the run that cannot be written is named by its WriteFailed."""
    import errno
    from sparsetrain.experiment.files import folder_busy, folder_lock
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / ".lock").write_text("")
    real_open, real_write = open, os.write

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        f.write = full  # (the buffered write: its data reaches no disk)
        return f

    def full_write(fd, data):
        return full() if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock") else real_write(fd, data)
    monkeypatch.setattr(files, "open", full_open, raising=False)
    monkeypatch.setattr(os, "write", full_write)
    ran = []
    with folder_lock(str(rd)):
        assert folder_busy(str(rd))  # (held: a second process is refused)
        ran.append(1)
    assert ran == [1] and not folder_busy(str(rd)) and (rd / ".lock").read_text() == ""


def test_an_empty_run_folder_is_removed_and_a_lock_on_a_removed_folder_taken_again(tmp_path, monkeypatch):
    """A run refused before it wrote anything left its folder behind, empty but for .lock; now
    remove_empty_folder removes it (only then), and a process whose lock was on the removed folder's
    file (it opened it before the removal) takes the lock of the folder made anew, not a dead one."""
    from sparsetrain.experiment.files import folder_lock, remove_empty_folder
    rd = tmp_path / "run"
    with folder_lock(str(rd)):
        remove_empty_folder(str(rd))
    assert not rd.exists()
    with folder_lock(str(rd)):
        (rd / "seed0").mkdir()
        remove_empty_folder(str(rd))
    assert sorted(os.listdir(rd)) == [".lock", "seed0"]  # (it holds something: kept)
    (rd / "seed0").rmdir()
    real, opened = files._try_flock, []

    def removed_while_waiting(f):  # the holder removes the folder, then releases its lock to this one
        opened.append(os.fstat(f.fileno()).st_ino)
        if len(opened) == 1:
            remove_empty_folder(str(rd))
        return real(f)
    monkeypatch.setattr(files, "_try_flock", removed_while_waiting)
    with folder_lock(str(rd)):
        assert len(opened) == 2 and os.stat(rd / ".lock").st_ino == opened[1]  # (the new folder's lock)
        assert (rd / ".lock").read_text() == str(os.getpid())


def test_checksums_detect_corruption_and_finish_interrupted_writes(tmp_path):
    p = str(tmp_path / "f.bin")
    files.atomic_write(p, b"first version", checksum=True)
    assert files.verify(p) is True
    (tmp_path / "other.bin").write_bytes(b"no record")
    assert files.verify(str(tmp_path / "other.bin")) is False  # a file from elsewhere: unverified, not refused
    with open(p, "r+b") as f:
        f.write(b"F")
    with pytest.raises(files.CorruptFile, match="f.bin is corrupt"):
        files.verify(p)
    # a kill between the record's rename and the file's: the new file waits as the temporary one
    files.atomic_write(p, b"first version", checksum=True)
    dead = _dead_pid()
    for tmp in (f"f.bin.{files.TMP_TAG}.{dead}", f"f.bin.tmp.{dead}"):  # (the name before 2026-12-03 too)
        version = f"version of {tmp}".encode()
        (tmp_path / tmp).write_bytes(version)
        record = {"size": len(version), "sha256": hashlib.sha256(version).hexdigest()}
        files.atomic_write(p + ".sha256", json.dumps(record))
        assert files.verify(p) is True and open(p, "rb").read() == version
        assert not (tmp_path / tmp).exists()


def test_verify_on_a_read_only_folder_is_a_write_failed_naming_the_file(tmp_path, monkeypatch):
    """verify finishing a write a kill cut short between its two renames (--report-only reading metrics.csv,
    a teacher loaded) on a folder made read-only since raised the rename's raw OSError (a traceback): it is
    WriteFailed now, one line naming the temporary file; writable again, the same read finishes it."""
    import errno
    p = str(tmp_path / "metrics.csv")
    files.atomic_write(p, b"round 0", checksum=True)
    tmp = f"{p}.{files.TMP_TAG}.{_dead_pid()}"
    with open(tmp, "wb") as f:
        f.write(b"round 1")
    files.atomic_write(p + ".sha256", json.dumps({"size": 7, "sha256": hashlib.sha256(b"round 1").hexdigest()}))
    real = os.replace

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), src)
    monkeypatch.setattr(files.os, "replace", read_only)
    with pytest.raises(files.WriteFailed) as e:
        files.verify(p)
    assert str(e.value).startswith(f"cannot write {tmp}: Read-only file system; ") and os.path.exists(tmp)
    monkeypatch.setattr(files.os, "replace", real)
    assert files.verify(p) is True and open(p, "rb").read() == b"round 1" and not os.path.exists(tmp)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _locking_writer(prefix: str, data: str):
    """A living writer: a child process holding `<prefix>.<its pid>` open with `data`, locked as
    atomic_write locks its temporary file (writer_lock: the sign that its writer lives)."""
    child = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                              "f = open(f'{sys.argv[1]}.{os.getpid()}', 'w'); f.write(sys.argv[2]); f.flush()\n"
                              "fcntl.flock(f, fcntl.LOCK_EX); print('ready', flush=True); time.sleep(60)",
                              prefix, data], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    return child


def test_verify_waits_for_a_living_writer_instead_of_taking_its_file(tmp_path):
    """A reader (verify: load_model, --teachers PATH, a --reuse link) between a living writer's two
    renames found the writer's temporary file matching the new record and moved it into place, and
    the writer's own rename then failed (FileNotFoundError: the run died). Now it waits for the
    writer's rename and reads the new file."""
    import threading
    p = str(tmp_path / "state.pt")
    files.atomic_write(p, b"old", checksum=True)
    writer = _locking_writer(f"{p}.{files.TMP_TAG}", "new")
    try:
        tmp = f"{p}.{files.TMP_TAG}.{writer.pid}"
        files.atomic_write(p + ".sha256", json.dumps({"size": 3, "sha256": hashlib.sha256(b"new").hexdigest()}))
        got = []
        reader = threading.Thread(target=lambda: got.append(files.verify(p)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and os.path.exists(tmp), "the reader must leave a living writer's file alone"
        os.replace(tmp, p)  # the writer's own rename
        reader.join(10)
        assert got == [True] and open(p, "rb").read() == b"new"
        # a file no writer locks under a living process's pid is a dead writer's (a reused pid): finished
        with open(tmp, "wb") as f:
            f.write(b"newer")
        files.atomic_write(p + ".sha256", json.dumps({"size": 5, "sha256": hashlib.sha256(b"newer").hexdigest()}))
        wait = files._landed
        files._landed = lambda *a: wait(*a, timeout=0.2)
        try:
            assert files.verify(p) is True and open(p, "rb").read() == b"newer" and not os.path.exists(tmp)
        finally:
            files._landed = wait
    finally:
        writer.kill()
        writer.wait()


def test_a_write_whose_file_vanished_beside_an_unreadable_record_is_write_failed(tmp_path, monkeypatch):
    """A checksummed write whose temporary file was gone at its rename (a reader on another host moving
    it in) compared the file with its record through _recorded, whose CorruptFile, where that record had
    become unreadable, escaped atomic_write: not the WriteFailed that rank 0's writes expect (dist.on_main:
    the other ranks died on their next collective with a traceback), and a message about a corrupt record
    for a write that failed. Now the write's own error: WriteFailed naming the file, one line."""
    p, real, tear = str(tmp_path / "state.pt"), os.replace, [True]

    def moved_in(src, dst):  # the data's rename finds its file moved in by the other host's verify
        if not src.startswith(f"{p}.{files.TMP_TAG}."):
            return real(src, dst)
        real(src, dst)
        if tear[0]:  # (and the record unreadable since)
            (tmp_path / "state.pt.sha256").write_text("{torn")
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), src)

    monkeypatch.setattr(files.os, "replace", moved_in)
    with pytest.raises(files.WriteFailed) as e:
        files.atomic_write(p, b"new", checksum=True)
    assert str(e.value) == f"cannot write {p}: {os.strerror(errno.ENOENT)}; {files.WriteFailed.advice}"
    tear[0] = False  # (its record intact: the moved-in file is the write's, done)
    files.atomic_write(p, b"newer", checksum=True)
    monkeypatch.setattr(files.os, "replace", real)
    assert files.verify(p) and open(p, "rb").read() == b"newer"


def test_atomic_write_fsyncs_the_data_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    """The data is fsynced before its rename and the folder after it (the new name survives a host
    crash, not just a killed process); a folder that cannot be fsynced (EINVAL) is no error, a
    disk error (EIO) is."""
    import stat
    p, seen, real = str(tmp_path / "state.pt"), [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        seen.append((kind, os.path.exists(p) and open(p, "rb").read(), st.st_ino))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    files.atomic_write(p, b"round 1")
    assert seen == [("file", False, seen[0][2]), ("dir", b"round 1", os.stat(tmp_path).st_ino)]

    def no_dir_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real(fd)

    monkeypatch.setattr(files.os, "fsync", no_dir_fsync)
    files.atomic_write(p, b"round 2", checksum=True)
    assert files.verify(p) is True and open(p, "rb").read() == b"round 2"

    def failing_dir_fsync(fd):  # a disk error is not swallowed: the write's durability failed
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(files.os, "fsync", failing_dir_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        files.atomic_write(p, b"round 3")


def test_ctrl_c_between_the_two_renames_finishes_the_write(tmp_path, monkeypatch):
    """An interrupt after the checksum record's rename and before the data's: the write is finished
    (the record names the new data), not undone into a file that no longer matches its record."""
    p = str(tmp_path / "state.pt")
    files.atomic_write(p, b"round 1", checksum=True)
    calls, real = {"n": 0}, os.replace

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the data's rename (the record's was the first)
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(p, b"round 2", checksum=True)
    monkeypatch.setattr(files.os, "replace", real)
    assert files.verify(p) is True and open(p, "rb").read() == b"round 2"


def test_ctrl_c_right_after_the_record_s_rename_finishes_the_write(tmp_path, monkeypatch):
    """The interrupt lands after the record's rename, before atomic_write knows it was made: the
    record names the new data, so the write is finished (state.pt was left matching no record)."""
    p = str(tmp_path / "state.pt")
    files.atomic_write(p, b"round 1", checksum=True)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if dst.endswith(".sha256"):
            raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(p, b"round 2", checksum=True)
    monkeypatch.setattr(files.os, "replace", real)
    assert files.verify(p) is True and open(p, "rb").read() == b"round 2"
    assert sorted(os.listdir(tmp_path)) == ["state.pt", "state.pt.sha256"]


def test_a_run_start_finishes_or_removes_what_a_kill_left(tmp_path):
    """finish_interrupted_writes: a dead process's temporary file that its record names becomes the
    file (the first state.pt of a phase, killed between the renames); the rest never finished and go;
    a living process's stay, and names atomic_write does not make; the older `.tmp.<pid>` form is
    finished where its record names it, never removed (a user's file may have such a name)."""
    dead = _dead_pid()
    sub = tmp_path / "seed0" / "teacher"
    sub.mkdir(parents=True)
    new = b"epoch 1"
    tag = files.TMP_TAG
    (sub / f"state.pt.{tag}.{dead}").write_bytes(new)  # recorded, not yet renamed
    (sub / "state.pt.sha256").write_text(json.dumps({"size": len(new), "sha256": hashlib.sha256(new).hexdigest()}))
    files.atomic_write(str(sub / "round_00.pt"), b"round 0", checksum=True)
    (sub / f"round_00.pt.{tag}.{dead}").write_bytes(b"round 0, half wri")  # killed mid-write
    (sub / f"round_00.pt.sha256.{tag}.{dead}").write_text("{")
    (tmp_path / f"summary.md.{tag}.{dead}").write_text("# half")
    living = _locking_writer(str(tmp_path / f"plot.png.{tag}"), "being written")  # (a --report-only beside it)
    files.atomic_write(str(tmp_path / "metrics.csv"), b"round 1", checksum=True)
    (tmp_path / f"metrics.csv.tmp.{dead}").write_bytes(b"round 2")  # the older name, recorded
    files.atomic_write(str(tmp_path / "metrics.csv.sha256"),
                       json.dumps({"size": 7, "sha256": hashlib.sha256(b"round 2").hexdigest()}))
    others = ["notes.tmp.20261203", "x.tmp.\u00b2", "y.tmp.0123", "z.tmp.99999999999999999999",  # not atomic_write's
              f"my_notes.txt.tmp.{dead}", f"metrics.csv.old.tmp.{dead}"]  # maybe a user's: kept
    for name in others:
        (tmp_path / name).write_text("a user's")
    try:
        files.finish_interrupted_writes(str(tmp_path))
    finally:
        living.kill()
        living.wait()
    assert sorted(os.listdir(sub)) == ["round_00.pt", "round_00.pt.sha256", "state.pt", "state.pt.sha256"]
    assert files.verify(str(sub / "state.pt")) and (sub / "state.pt").read_bytes() == new
    assert files.verify(str(sub / "round_00.pt")) and (sub / "round_00.pt").read_bytes() == b"round 0"
    assert (tmp_path / "metrics.csv").read_bytes() == b"round 2"
    assert sorted(os.listdir(tmp_path)) == sorted([f"plot.png.{tag}.{living.pid}", "seed0", "metrics.csv",
                                                   "metrics.csv.sha256", *others])


def test_a_killed_write_under_this_process_s_own_pid_is_cleaned_up(tmp_path):
    """A container gives each run the same pid (1, or the same small number): the temporary files of a write
    a kill cut short carried this process's pid, which finish_interrupted_writes took for a living writer's
    and left for good. The starting process (holding the run's lock) writes nothing there yet: they are a dead
    writer's, finished where the record names them and removed otherwise."""
    tag, me = files.TMP_TAG, os.getpid()
    files.atomic_write(str(tmp_path / "summary.md"), "# done")
    (tmp_path / f"summary.md.{tag}.{me}").write_text("# half")  # killed mid-write
    new = b"epoch 2"
    files.atomic_write(str(tmp_path / "state.pt"), b"epoch 1", checksum=True)
    (tmp_path / f"state.pt.{tag}.{me}").write_bytes(new)  # killed between the record's rename and the data's
    files.atomic_write(str(tmp_path / "state.pt.sha256"),
                       json.dumps({"size": len(new), "sha256": hashlib.sha256(new).hexdigest()}))
    files.finish_interrupted_writes(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["state.pt", "state.pt.sha256", "summary.md"]
    assert (tmp_path / "summary.md").read_text() == "# done"
    assert files.verify(str(tmp_path / "state.pt")) and (tmp_path / "state.pt").read_bytes() == new


def test_finishing_a_killed_write_fsyncs_its_folder_after_the_rename(tmp_path, monkeypatch):
    """finish_interrupted_writes' rename of a recorded temporary file into place was not fsynced into its
    folder (verify's and atomic_write's are): after a power loss the finished file could be the old one
    again. Now its folder is fsynced after the rename; a removed leftover needs none."""
    import stat
    dead, tag = _dead_pid(), files.TMP_TAG
    sub = tmp_path / "seed0"
    sub.mkdir()
    new = b"epoch 1"
    (sub / f"state.pt.{tag}.{dead}").write_bytes(new)  # recorded, not yet renamed
    (sub / "state.pt.sha256").write_text(json.dumps({"size": len(new), "sha256": hashlib.sha256(new).hexdigest()}))
    (tmp_path / f"summary.md.{tag}.{dead}").write_text("# half")  # never finished: removed
    seen, real = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            seen.append((st.st_ino, (sub / "state.pt").exists() and (sub / "state.pt").read_bytes()))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    files.finish_interrupted_writes(str(tmp_path))
    assert seen == [(os.stat(sub).st_ino, new)]  # (once, its folder, after the rename)
    assert sorted(os.listdir(tmp_path)) == ["seed0"] and files.verify(str(sub / "state.pt"))


def test_ctrl_c_ends_a_run_with_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    assert study.main(["mnist", "--profile", "quick", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted:") and "the same command resumes" in err[0]


def _resume_on_one_thread_more(cfg) -> int:
    """prepare_run_dir(cfg) (a resume) under one torch thread more than now; returns the thread count of now."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        study.prepare_run_dir(cfg)
    finally:
        torch.set_num_threads(threads)
    return threads


def test_a_resume_keeps_the_commit_the_run_started_at(tmp_path, monkeypatch):
    """config.json keeps the first git commit and versions; a resume at another commit is listed
    after them (resumed_with), once per change."""
    cfg, _ = config_from_args(["mnist", "--out", str(tmp_path), "--profile", "quick"])
    for commit in ("aaa", "bbb", "bbb", "ccc"):
        monkeypatch.setattr(study, "git_commit", lambda c=commit: c)
        rd = study.prepare_run_dir(cfg)
    with open(os.path.join(rd, "config.json")) as f:
        rec = json.load(f)
    assert rec["git_commit"] == "aaa" and [r["git_commit"] for r in rec["resumed_with"]] == ["bbb", "ccc"]
    # and a resume on another thread count (its sums round otherwise)
    threads = _resume_on_one_thread_more(cfg)
    with open(os.path.join(rd, "config.json")) as f:
        rec = json.load(f)
    assert rec["torch_threads"] == threads and rec["resumed_with"][-1]["torch_threads"] == threads + 1
    # and one under another number of torchrun processes (each rank's batch and BN statistics change)
    monkeypatch.setattr(study.dist, "world", lambda: 2)
    study.prepare_run_dir(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(study, "git_commit", lambda: "ccc")
    with open(os.path.join(rd, "config.json")) as f:
        rec = json.load(f)
    assert rec["world_size"] == 1 and rec["resumed_with"][-1]["world_size"] == 2
    assert rec["sparsetrain_version"] == sparsetrain.__version__
    del rec["sparsetrain_version"], rec["resumed_with"]  # a run started before the version was recorded:
    files.write_json(os.path.join(rd, "config.json"), rec)  # its resume adds no resumed_with entry over it
    monkeypatch.setattr(study, "git_commit", lambda: "aaa")
    study.prepare_run_dir(cfg)
    with open(os.path.join(rd, "config.json")) as f:
        rec = json.load(f)
    assert "resumed_with" not in rec and rec["sparsetrain_version"] == "unknown"  # (not today's: unrecorded)


def test_a_resume_on_another_thread_count_or_version_says_so(tmp_path, monkeypatch, capsys):
    """A resume whose thread count, versions or commit differ from the run's last record was listed in
    config.json's resumed_with alone: its curves went on differing from an uninterrupted run's without a word
    (the weight gradients' sums depend on the thread count). It is a note on stderr now, naming what changed;
    a resume like the last one says nothing."""
    cfg, _ = config_from_args(["mnist", "--out", str(tmp_path), "--profile", "quick"])
    threads = torch.get_num_threads()
    rd = study.prepare_run_dir(cfg)
    study.prepare_run_dir(cfg)
    assert capsys.readouterr().err == ""
    try:
        torch.set_num_threads(threads + 1)
        study.prepare_run_dir(cfg)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {rd} resumes with torch_threads {threads + 1} (was {threads}): the rounds trained from "
                   "here on may not be bitwise those of an uninterrupted run (config.json lists it under resumed_with)"]
    was = torch.__version__
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # (against the last record: threads + 1, then back)
    study.prepare_run_dir(cfg)
    err = capsys.readouterr().err
    assert f"resumes with torch 9.9.9 (was {was}); torch_threads {threads} (was {threads + 1}): " in err
    study.prepare_run_dir(cfg)  # (the same as the last resume)
    assert capsys.readouterr().err == ""



def test_a_resume_of_an_older_run_s_record_adds_nothing_until_something_changes(tmp_path, capsys):
    """A run recorded before sparsetrain_version, ran_on and versions' python: its resumes were compared twice,
    by a dict comparison (a nested `versions` lacking python differed) and by changed_since (no difference), so a
    resumed_with entry was added without a note; and the "unknown" its first resume writes for a lacking record
    made the second say "sparsetrain_version 0.1.0 (was unknown)" and add an entry. Neither now, until a record
    really changes (the thread count): then both."""
    cfg, _ = config_from_args(["mnist", "--out", str(tmp_path), "--profile", "quick"])
    rd = study.prepare_run_dir(cfg)
    path = os.path.join(rd, "config.json")
    with open(path) as f:
        rec = json.load(f)
    del rec["sparsetrain_version"], rec["ran_on"], rec["versions"]["python"]
    files.write_json(path, rec)
    for _ in range(3):
        study.prepare_run_dir(cfg)
        with open(path) as f:
            now = json.load(f)
        assert "resumed_with" not in now and now["sparsetrain_version"] == now["ran_on"] == "unknown"
    assert capsys.readouterr().err == ""
    threads = _resume_on_one_thread_more(cfg)
    with open(path) as f:
        assert [r["torch_threads"] for r in json.load(f)["resumed_with"]] == [threads + 1]
    assert f"resumes with torch_threads {threads + 1} (was {threads}): " in capsys.readouterr().err


def test_a_resume_back_on_the_starting_thread_count_is_recorded(tmp_path, capsys):
    """Started at N threads, resumed at N + 1, then at N again: the last resume was compared with the start
    record alone, so it added no resumed_with entry (config.json said the run went on at N + 1) and no note.
    It is compared with the last record now: listed and said."""
    cfg, _ = config_from_args(["mnist", "--out", str(tmp_path), "--profile", "quick"])
    threads = torch.get_num_threads()
    rd = study.prepare_run_dir(cfg)
    try:
        torch.set_num_threads(threads + 1)
        study.prepare_run_dir(cfg)
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    study.prepare_run_dir(cfg)
    assert f"resumes with torch_threads {threads} (was {threads + 1}): " in capsys.readouterr().err
    with open(os.path.join(rd, "config.json")) as f:
        rec = json.load(f)
    assert rec["torch_threads"] == threads and [r["torch_threads"] for r in rec["resumed_with"]] == [threads + 1, threads]
    study.prepare_run_dir(cfg)  # (as the last record: nothing added, nothing said)
    with open(os.path.join(rd, "config.json")) as f:
        assert len(json.load(f)["resumed_with"]) == 2
    assert capsys.readouterr().err == ""

def test_config_records_the_device_and_precision_a_run_ran_on(tmp_path, monkeypatch):
    """config.json (and summary.md) say what --device/--amp auto resolved to: this machine's device and
    autocast dtype (a CUDA run trains in bf16, a CPU run in fp32); a resume elsewhere is listed after it."""
    cfg, _ = config_from_args(["mnist", "--out", str(tmp_path), "--profile", "quick"])
    rd = study.prepare_run_dir(cfg)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    where = f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}" if dev.type == "cuda" else "cpu"
    expected = f"{where}, {'fp32' if amp is None else 'bf16 autocast'}"
    with open(os.path.join(rd, "config.json")) as f:
        assert json.load(f)["ran_on"] == expected
    assert f"| ran_on | {expected} |" in open(report.write_report(rd)).read()
    monkeypatch.setattr(study, "describe_device", lambda device, amp: "cuda:0 Some GPU, bf16 autocast")
    study.prepare_run_dir(cfg)
    with open(os.path.join(rd, "config.json")) as f:
        rec = json.load(f)
    assert rec["ran_on"] == expected and rec["resumed_with"][-1]["ran_on"] == "cuda:0 Some GPU, bf16 autocast"


def test_ran_on_is_the_device_the_process_computes_on(mnist_dir, study_args, monkeypatch):
    """Under torchrun each rank computes on its LOCAL_RANK's GPU whatever --device cuda:N says: the
    study hands prepare_run_dir the device it resolved, and that (not --device) is what ran_on names."""
    assert study.describe_device(torch.device("cpu"), "auto") == "cpu, fp32"
    seen, real = [], study.describe_device
    monkeypatch.setattr(study, "describe_device", lambda device, amp: seen.append(device) or real(device, amp))
    assert study.main(study_args(mnist_dir, "--device", "cpu", "--phases", "teacher")) == 0
    dev = torch.device("cpu")  # (what run_study resolved --device cpu to)
    assert seen == [dev]
    with open(os.path.join(run_dir(mnist_dir / "runs"), "config.json")) as f:
        assert json.load(f)["ran_on"] == real(dev, "auto")


def test_git_commit_is_sparsetrain_s_own(tmp_path):
    """The checkout's commit; for a copy of the package inside another git repository (an installed
    package in a project's virtualenv), "unknown", never that project's commit."""
    import importlib.util
    import shutil
    repo = os.path.dirname(os.path.dirname(__file__))
    dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], text=True, cwd=repo).strip()
    assert devices.git_commit() == subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                                         cwd=repo).strip() + ("-dirty" if dirty else "")
    proj = tmp_path / "a project"  # (a space in the path)
    site = proj / ".venv" / "site-packages" / "sparsetrain" / "experiment"
    site.mkdir(parents=True)
    shutil.copy(study.__file__.replace("study.py", "devices.py"), site / "devices.py")
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    subprocess.run(["git", "-C", str(proj), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q",
                    "--allow-empty", "-m", "project"], check=True)
    def git_commit_of(devices_py):
        spec = importlib.util.spec_from_file_location("copied_devices", devices_py)
        copied = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copied)
        return copied.git_commit()
    assert git_commit_of(site / "devices.py") == "unknown"
    own = proj / "sparsetrain" / "experiment"  # the package at the repository's top: a checkout of it
    own.mkdir(parents=True)
    shutil.copy(site / "devices.py", own / "devices.py")
    head = subprocess.check_output(["git", "-C", str(proj), "rev-parse", "HEAD"], text=True).strip()
    assert git_commit_of(own / "devices.py") == head  # (untracked files do not make it dirty)
    subprocess.run(["git", "-C", str(proj), "add", "sparsetrain"], check=True)
    subprocess.run(["git", "-C", str(proj), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "own"],
                   check=True)
    head = subprocess.check_output(["git", "-C", str(proj), "rev-parse", "HEAD"], text=True).strip()
    assert git_commit_of(own / "devices.py") == head
    with open(own / "devices.py", "a") as f:
        f.write("# an uncommitted edit\n")
    assert git_commit_of(own / "devices.py") == head + "-dirty"  # (the commit alone does not name the code that ran)


def test_a_hung_git_gives_unknown_not_a_hung_run(tmp_path, monkeypatch):
    """git_commit ran git without a timeout: a git blocked (a lock, a hung network filesystem) hung
    the run before it trained anything."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text("#!/bin/sh\nexec sleep 60\n")
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(devices, "GIT_TIMEOUT_S", 0.5)
    assert devices.git_commit() == "unknown"


def test_a_diverging_run_stops_with_a_clear_error(mnist_dir, study_args, capsys):
    """NaN weights prune nothing, so the rounds never reached the wall (an endless loop): a
    non-finite training loss ends the run (exit 2, one line)."""
    assert study.main(study_args(mnist_dir, "--teachers", "dense", "--lr", "1e6")) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "lower the learning rate" in err
    # (the teacher run diverged: its flag, where the message named --student-lr whichever role it was)
    assert "teacher round 0" in err and "(--teacher-lr, or --lr for both roles)" in err


def test_an_overflowed_weight_with_a_finite_loss_stops_the_run(mnist_dir, study_args, capsys, monkeypatch):
    """A weight or BatchNorm statistic that overflowed while the epoch's loss stayed finite (a tiny
    distilled VGG's running variances reached inf) made every later evaluation chance-level and the
    run exited 0: the model's state is checked after every epoch."""
    from sparsetrain.experiment import loop
    real = loop.train_epoch

    def overflowing(model, *a, **kw):
        out = real(model, *a, **kw)
        with torch.no_grad():
            model.fc1.weight[0, 0] = float("inf")
        return out
    monkeypatch.setattr(loop, "train_epoch", overflowing)
    assert study.main(study_args(mnist_dir, "--teachers", "dense", "--engine", "dense")) == 2
    err = capsys.readouterr().err
    assert "training diverged (fc1.weight not finite in epoch 1)" in err


def test_teacher_paths_are_checked_before_training(mnist_dir, study_args, capsys):
    """Two --teachers paths of one file name (they would share a phase), a teacher of another
    dataset's classes or channels, --rewind-iter past the dense run and an empty validation split:
    refused before training."""
    from sparsetrain.experiment.checkpoint import save_model
    from sparsetrain.experiment.models import build_model
    for d in ("a", "b"):
        (mnist_dir / d).mkdir()
        (mnist_dir / d / "t.pt").write_bytes(b"x")
    base = study_args(mnist_dir)
    assert study.main(base + ["--teachers", str(mnist_dir / "a" / "t.pt"), str(mnist_dir / "b" / "t.pt")]) == 2
    assert "two checkpoints of one file name would share the phase distill-path-t" in capsys.readouterr().err
    for arch, expect in ((dict(num_classes=100, in_channels=1), "gives 100 outputs per image, mnist has 10"),
                         (dict(num_classes=10, in_channels=3), "the model does not take mnist's images (1, 28, 28)")):
        arch = dict(name="lenet300", image_size=28, **arch) if arch["in_channels"] == 1 else \
            dict(name="vgg_d1g5", image_size=28, **arch)
        save_model(str(mnist_dir / "foreign.pt"), build_model(**arch), {}, arch)
        assert study.main(base + ["--teachers", str(mnist_dir / "foreign.pt")]) == 2
        assert expect in capsys.readouterr().err, expect
    assert not list((mnist_dir / "runs").rglob("metrics.csv"))  # nothing trained
    assert study.main(base + ["--perturb", "rewind", "--rewind-iter", "100000"]) == 2
    assert "--rewind-iter=100000 is past the" in capsys.readouterr().err
    assert study.main(base + ["--val-fraction", "0.01"]) == 2  # (0 of 80 images; 0 itself is refused up front)
    assert "--val-fraction 0.01: the validation split is empty" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CPU runs above cover the loop")
def test_study_on_cuda_matches_cpu_and_resumes_across_devices(mnist_dir, study_args):
    """The same study on the GPU (sparse layers on the Triton kernels) follows the CPU run; a run
    started on the GPU finishes on the CPU."""
    base = study_args(mnist_dir, "--teachers", "dense", "--engine", "sparse")
    assert study.main(base + ["--device", "cpu", "--out", str(mnist_dir / "cpu")]) == 0
    assert study.main(base + ["--device", "cuda", "--out", str(mnist_dir / "gpu")]) == 0
    ra = read_rows(run_dir(mnist_dir / "cpu") / "seed0" / "teacher" / "metrics.csv")
    rb = read_rows(run_dir(mnist_dir / "gpu") / "seed0" / "teacher" / "metrics.csv")
    assert len(ra) == len(rb) == 5
    for a, b in zip(ra, rb):
        assert float(a["sparsity"]) == float(b["sparsity"])
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=0.05)


def test_legacy_run_directory_is_reported_not_resumed(mnist_dir, study_args, capsys):
    """A run directory named the earlier way (no settings hash): --report-only reports it; a run
    says it starts elsewhere instead of silently ignoring it."""
    legacy = mnist_dir / "runs" / "mnist-eps0.2-quick"
    (legacy / "seed0" / "teacher").mkdir(parents=True)
    (legacy / "config.json").write_text(json.dumps({"dataset": "mnist", "eps": 0.2, "model": "lenet300"}))
    with open(legacy / "seed0" / "teacher" / "metrics.csv", "w") as f:
        f.write("seed,phase,round,sparsity,val_acc,test_acc,entropy_mean,cum_flops\n0,teacher,0,0.0,0.5,0.5,0.6,1e12\n")
    assert study.main(study_args(mnist_dir, "--report-only")) == 0
    assert (legacy / "summary.md").exists()
    assert study.main(study_args(mnist_dir, "--wall", "0.3", "--teachers", "dense")) == 0
    err = capsys.readouterr().err
    assert "is a run directory of an earlier sparsetrain" in err
    # (--wall 0.3 under --rate 0.5: no pruned round can train, and the run says so)
    assert "note: --wall 0.3 is at or below the first pruned round's sparsity (--rate 0.5): only the dense round 0 " \
           "trains" in err
    assert study.main(study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher")) == 0
    assert "note: --wall" not in capsys.readouterr().err  # (study_args' --wall 0.95 leaves rounds to train)


def test_cnn_study_on_fused_layers_resumes_exactly(cifar10_dir, kill_and_resume):
    """A VGG-like study on the sparse engine: its conv -> ReLU -> BN blocks run fused from the
    first pruning round on, and a run killed mid-round resumes to the uninterrupted curves."""
    base = ["cifar10", "--data-dir", str(cifar10_dir), "--profile", "quick", "--model", "vgg_d1g3",
            "--student", "vgg_d1g3", "--eps", "0.2", "--subset", "0", "--epochs", "2", "--milestones", "1",
            "--rate", "0.5", "--wall", "0.8", "--batch-size", "16", "--threads", "1", "--engine", "sparse",
            "--teachers", "dense"]
    rows = kill_and_resume(cifar10_dir, base, kill_at=4)
    assert [int(r["sparse_layers"]) for r in rows["teacher"]] == [0, 3, 3]  # two convs and the classifier
    ckpt = next((cifar10_dir / "a").glob("*/seed0/teacher/ckpt/round_02.pt"))
    model, _, _ = load_model(str(ckpt))  # a restored sparse model is fused again
    assert sum(type(m).__name__ == "SparseConvBNReLU" for m in model.modules()) == 2


@pytest.mark.parametrize("left", [("state.pt", "state.pt.sha256"), ("state.pt.sha256",)])
def test_a_finished_phase_drops_the_resume_state_a_kill_inside_finish_left(tmp_path, left):
    """finish writes best.json (the phase is done), then removes state.pt and its checksum: a kill in
    between left them for good (the next runs returned at best.json before any cleanup, verifying
    the stale file each time). The next run of the finished phase removes them first."""
    from sparsetrain.experiment import loop
    pdir = tmp_path / "teacher"
    (pdir / "ckpt").mkdir(parents=True)
    (pdir / "best.json").write_text(json.dumps({"round": 0}))
    (pdir / "metrics.csv").write_text("round,is_best\n0,1\n")  # (a finished phase has its rows: verify_phase)
    for name in left:
        (pdir / name).write_bytes(b"left by a kill")
    assert loop.run_phase(None, "teacher", None, 0, "teacher", "lenet300", str(pdir)) == str(pdir)
    assert sorted(os.listdir(pdir)) == ["best.json", "ckpt", "metrics.csv"]


def test_a_hand_edited_teacher_phase_is_one_clear_error(tmp_path):
    """The study writes the teacher's metrics.csv and best.json whole; edited by hand so that they do not
    name the chosen round, a distillation reading them stops with one line naming the folder (it
    was an IndexError or TypeError traceback)."""
    from sparsetrain.experiment.loop import PhaseError
    from sparsetrain.experiment.files import write_csv
    tdir = tmp_path / "teacher"
    tdir.mkdir()
    write_csv(str(tdir / "metrics.csv"), [{"round": 0, "cum_flops": 10, "paper_cum_flops": 20}])
    (tdir / "best.json").write_text(json.dumps({"round": 0}))
    with pytest.raises(PhaseError, match=r"round_00.pt, the teacher's best round, is missing; delete .* to train the "
                                         "teacher again"):  # (a FileNotFoundError traceback before)
        study.teacher_checkpoint("best", str(tdir))
    (tdir / "ckpt").mkdir()
    (tdir / "ckpt" / "round_00.pt").write_bytes(b"")
    assert study.teacher_checkpoint("best", str(tdir)) == (str(tdir / "ckpt" / "round_00.pt"), (10, 20))
    for best in ('{"round": 3}', '{"round": "x"}', "{}", "{not json"):
        (tdir / "best.json").write_text(best)
        with pytest.raises(PhaseError, match=rf"{tdir}: its best.json and metrics.csv do not name the teacher's best "
                                             rf"round \(\w+: .*\); delete {tdir} to train"):  # ("delete that folder")
            study.teacher_checkpoint("best", str(tdir))


def test_a_sparse_checkpoint_is_small_and_older_ones_still_load(tmp_path):
    """A 99%-sparse model's checkpoint holds its CSR patterns, not a full-size bool mask per layer
    (which made it ~22% of the dense file); a dense-masked layer keeps its mask; a checkpoint of the
    former layout (every layer's mask) still loads to the same model."""
    from sparsetrain.experiment.checkpoint import model_payload, save_model
    from sparsetrain.experiment.models import build_model
    from sparsetrain.prune import global_prune
    arch = dict(name="lenet300", num_classes=10, in_channels=1, image_size=28)
    torch.manual_seed(0)
    model = build_model(**arch)
    save_model(str(tmp_path / "dense.pt"), model, {}, arch)
    masks = global_prune(model, {}, 0.99, scope="layer")
    sparsetrain.sparsify_(model, {n: masks[n] for n in ("fc1", "fc2")})  # fc3 stays dense-masked
    save_model(str(tmp_path / "sparse.pt"), model, {"fc3": masks["fc3"]}, arch)
    size = os.path.getsize(tmp_path / "sparse.pt") / os.path.getsize(tmp_path / "dense.pt")
    assert size < 0.05, size  # (values 4 B + col index 4 B per nonzero: ~2% of the dense weights)
    old = {**model_payload(model, {"fc3": masks["fc3"]}, arch), "masks": masks_of(model, {"fc3": masks["fc3"]}),
           "format": "sparsetrain-ckpt-v1"}
    assert safe_load(str(tmp_path / "sparse.pt"))["format"] == "sparsetrain-ckpt-v2"  # (older code refuses it by name)
    files.atomic_write(str(tmp_path / "old.pt"), lambda f: torch.save(old, f), binary=True)
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    for name in ("sparse.pt", "old.pt"):
        got, dense_masks, _ = load_model(str(tmp_path / name))
        got.eval()
        assert [n for n, m in got.named_modules() if type(m).__name__ == "SparseLinear"] == ["fc1", "fc2"]
        assert list(dense_masks) == ["fc3"] and torch.equal(dense_masks["fc3"], masks["fc3"])
        assert all(torch.equal(a, masks[n]) for n, a in masks_of(got, dense_masks).items())
        torch.testing.assert_close(got(x), model(x), rtol=0, atol=0)
    with torch.inference_mode():  # (every sparse layer is resized by the load: it failed there for a day)
        got = load_model(str(tmp_path / "sparse.pt"))[0].eval()
        torch.testing.assert_close(got(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_checkpoint_restores_the_model_fused_as_it_was_saved(tmp_path, fuse):
    """save_model / load_model of a sparse VGG-like: the same module types and bit-equal outputs,
    fused or not (an unfused model came back fused, its outputs ~1e-7 off: another order of sums);
    a checkpoint from before the flag was recorded (the study's: always fused) loads fused."""
    from sparsetrain.experiment.checkpoint import restore_model, save_model
    from sparsetrain.experiment.models import build_model
    from sparsetrain.testing import model_masks
    arch = {"name": "vgg_d1g2", "num_classes": 10, "in_channels": 3, "image_size": 32}
    torch.manual_seed(0)
    model = build_model(**arch)
    sparsetrain.sparsify_(model, model_masks(model, 0.9, seed=1), fuse=fuse)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    save_model(str(tmp_path / "m.pt"), model, {}, arch)
    loaded, _, payload = load_model(str(tmp_path / "m.pt"))
    loaded.eval()
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert torch.equal(loaded(x), model(x))
    old, _ = restore_model({k: v for k, v in payload.items() if k != "fused"})
    assert any(type(m).__name__ == "SparseConvBNReLU" for m in old.modules())
    # a model of one's own with an arch load_model cannot rebuild: refused when saving (it saved, and
    # loading failed with build_model's missing-arguments TypeError); a foreign arch in a file, named
    own = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    for arch_ in ({}, {"name": "mine", "num_classes": 2}, "lenet300"):
        with pytest.raises(ValueError, match="arch must be build_model's arguments for a model of the study's"):
            save_model(str(tmp_path / "own.pt"), own, {}, arch_)
    assert not (tmp_path / "own.pt").exists()
    with pytest.raises(ValueError, match=r"checkpoint's arch \{'name': 'lenet300'\} builds no model"):
        restore_model({**payload, "arch": {"name": "lenet300"}})
    # masks of floats (a damaged file: check_masks' TypeError since 2026-12-06, which --teachers did not catch)
    dense = build_model(**arch)
    masks = model_masks(dense, 0.5, seed=2)
    save_model(str(tmp_path / "d.pt"), dense, masks, arch)
    _, kept, dense_payload = load_model(str(tmp_path / "d.pt"))
    assert {n: torch.equal(kept[n], mk) for n, mk in masks.items()} == {n: True for n in masks}
    for bad in ({n: mk.float() for n, mk in dense_payload["masks"].items()}, [1]):
        with pytest.raises(ValueError, match=r"^m\.pt: its masks are not bool tensors by layer name: the file is "
                                             r"damaged or not a sparsetrain checkpoint$"):
            restore_model({**dense_payload, "masks": bad}, "m.pt")


def test_resume_refuses_another_draw_of_the_split_and_noisy_labels(mnist_dir, study_args, capsys):
    """The data's fingerprint is taken before the split and the noise; the seeded draws of both (which
    a torch release or another sparsetrain version may redraw) are recorded per seed in noise.json, and
    a run, or a phase linked from another run, whose seed drew others is refused by name."""
    from sparsetrain.experiment import data as D
    args = study_args(mnist_dir, "--teachers", "dense", "--phases", "teacher")
    assert study.main(args) == 0
    rd = run_dir(mnist_dir / "runs")
    noise_path = rd / "seed0" / "noise.json"
    noise = json.loads(noise_path.read_text())
    splits = D.load_dataset("mnist", str(mnist_dir / "data"), eps=0.2, val_fraction=0.1, seed=0)
    assert noise["labels_fingerprint"] == splits.labels_fingerprint == D.fingerprint(
        splits.train.index, splits.train.y, splits.val.index, splits.val.y)
    assert study.main(args) == 0  # (the same draw: the finished run is found again)
    noise_path.write_text(json.dumps({**noise, "labels_fingerprint": "0123456789abcdef"}))
    capsys.readouterr()
    assert study.main(args) == 2
    err = capsys.readouterr().err
    assert "trained on another split or other noisy labels than this run draws (labels fingerprint 0123456789abcdef, " \
           f"now {noise['labels_fingerprint']})" in err
    assert json.loads(noise_path.read_text())["labels_fingerprint"] == "0123456789abcdef"  # (left as it was)
    del noise["labels_fingerprint"]  # (a run from before it was recorded: continued, and recorded now)
    noise_path.write_text(json.dumps(noise))
    assert study.main(args) == 0
    assert json.loads(noise_path.read_text())["labels_fingerprint"] == splits.labels_fingerprint
    # a phase linked from another run (--reuse) whose seed drew other labels
    other = mnist_dir / "other"
    shutil.copytree(rd, other / rd.name, symlinks=True)
    (other / rd.name / "seed0" / "noise.json").write_text(json.dumps({**noise, "labels_fingerprint": "fedcba9876543210"}))
    reuse = ["--reuse", str(other / rd.name), "--out", str(mnist_dir / "b")]
    assert study.main(study_args(mnist_dir, "--teachers", "dense", "--phases", "distill", *reuse)) == 2
    assert "whose seed 0 drew another split or other noisy labels (labels fingerprint fedcba9876543210" in \
        capsys.readouterr().err


def test_new_folders_are_fsynced_into_their_parents(tmp_path, monkeypatch):
    """A new folder's name lives in its parent's entries: make_folder, atomic_write (its folder), the run
    directory's lock and make_link fsync the parent of each folder or link they create, outermost first, and
    nothing more for a folder that exists (a file fsynced in a folder whose entry never was is lost with it)."""
    import stat
    seen, real = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            seen.append(st.st_ino)
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    rd = tmp_path / "run"
    with files.folder_lock(str(rd)):
        assert seen == [os.stat(tmp_path).st_ino]  # (the run directory, made by its lock)
        seen.clear()
        files.make_folder(str(rd / "seed0" / "vanilla" / "ckpt"))
        assert seen == [os.stat(p).st_ino for p in (rd, rd / "seed0", rd / "seed0" / "vanilla")]
        seen.clear()
        files.make_folder(str(rd / "seed0"))  # (there already: no fsync)
        assert seen == []
        files.atomic_write(str(rd / "seed1" / "noise.json"), "{}")  # (its new folder, then the rename's)
        assert seen == [os.stat(rd).st_ino, os.stat(rd / "seed1").st_ino]
        seen.clear()
        files.make_link("seed0", str(rd / "seed2"))
        assert seen == [os.stat(rd).st_ino] and os.path.islink(rd / "seed2")


def test_a_checksum_record_names_its_file(tmp_path):
    """A record holds its file's name: a checkpoint copied over another with its record (or both renamed)
    matched the digest and passed; now CorruptFile naming both. A record of before 2026-12-06 (no name) verifies."""
    a, b = str(tmp_path / "round_01.pt"), str(tmp_path / "round_02.pt")
    files.atomic_write(a, b"round 1", checksum=True)
    files.atomic_write(b, b"round 2", checksum=True)
    assert json.load(open(a + ".sha256"))["name"] == "round_01.pt" and files.verify(a) and files.verify(b)
    for ext in ("", ".sha256"):
        shutil.copyfile(a + ext, b + ext)
    with pytest.raises(files.CorruptFile, match=r"round_02\.pt\.sha256 is the record of 'round_01\.pt', not of "
                                                r"'round_02\.pt'"):
        files.verify(b)
    old = {k: v for k, v in json.load(open(b + ".sha256")).items() if k != "name"}
    (tmp_path / "round_02.pt.sha256").write_text(json.dumps(old))
    assert files.verify(b) is True and open(b, "rb").read() == b"round 1"
