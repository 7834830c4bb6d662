"""Sweeps: the plan (one teacher per setting, explicit dependencies), a tiny grid on a local Ray
(every run finishes, the teacher trains once for its students, a re-run changes nothing, a failed
run is reported and the others finish, a killed sweep resumes to the same result) and the
aggregation on hand-written run directories (mean ± std, missing seeds, runs in progress)."""
import csv
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sparsetrain.experiment.files import write_csv, write_json
from sparsetrain.sweep import cli
from sparsetrain.sweep.aggregate import load_groups, table1_csv
from sparsetrain.sweep.plan import make_plan
from sparsetrain.testing import write_mnist

import cli_forks
from conftest import read_rows, strip_timing


def _tiny(root, *extra):
    """Sweep flags of a 5-round LeNet study on 80 random MNIST images (seconds per run)."""
    return ["grid", "--dataset", "mnist", "--data-dir", str(root / "data"), "--profile", "quick", "--eps", "0.2",
            "--subset", "0", "--epochs", "2", "--milestones", "1", "--rate", "0.5", "--wall", "0.95",
            "--batch-size", "16", "--teachers", "dense", "--out", str(root / "sweeps"), *extra]


def _settings(root, **axes):
    base = {"dataset": ["mnist"], "profile": ["quick"], "data_dir": str(root / "data"), "eps": [0.2],
            "subset": [0], "epochs": [2], "milestones": (1,), "rate": [0.5], "wall": [0.95], "batch_size": [16],
            "teachers": ("dense",)}
    return {**base, **axes}


def _tree(folder):
    """{relative path: (size, mtime)} of every file under folder (symlinks as their target)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def _best_test(rows):
    best = max(rows, key=lambda r: float(r["val_acc"]))  # first of ties, as Algorithm 1
    return 100 * float(best["test_acc"])


# ---------------------------------------------------------------------------- the plan
def test_plan_trains_each_teacher_once(tmp_path):
    plan = make_plan(_settings(tmp_path, alpha=[0.5, 0.8], seeds=[0, 1]), str(tmp_path / "sw"), threads=1)
    teachers = [r for r in plan if r.kind == "teacher"]
    studies = [r for r in plan if r.kind == "study"]
    assert len(teachers) == 2 and len(studies) == 4
    for s in studies:
        (t,) = [t for t in teachers if t.seed == s.seed]
        assert s.deps == [t.name]
        assert s.argv[s.argv.index("--reuse") + 1] == t.run_dir
        assert s.argv[s.argv.index("--phases") + 1:s.argv.index("--phases") + 3] == ["vanilla", "distill"]
    assert len({s.run_dir for s in studies}) == 4
    assert plan.index(teachers[0]) < min(plan.index(s) for s in studies)  # dependencies first


def test_plan_shares_a_vanilla_student_between_distillation_settings(tmp_path):
    """Another student model: the vanilla student depends only on the student settings, so the
    second alpha's study links the first one's vanilla run instead of training it again."""
    plan = make_plan(_settings(tmp_path, student=["vgg_d1g1"], alpha=[0.5, 0.8], seeds=[0]),
                     str(tmp_path / "sw"), threads=1)
    teacher, first, second = plan
    assert first.deps == [teacher.name] and sorted(second.deps) == sorted([teacher.name, first.name])
    # (what it links from each: a dependency that failed after finishing those does not stop it)
    assert first.needs == {teacher.name: ["teacher"]}
    assert second.needs == {first.name: ["vanilla"], teacher.name: ["teacher"]}


def test_a_grid_value_added_before_a_finished_study_links_its_vanilla_student(tmp_path):
    """alpha 0.5 swept, then alpha 0.3 0.5: the new first study trained the vanilla student the finished
    one holds again (the first point owned every phase) before 2026-12-06; now it links that one's."""
    settings = lambda alphas: _settings(tmp_path, student=["vgg_d1g1"], alpha=alphas, seeds=[0])  # noqa: E731
    _, done = make_plan(settings([0.5]), str(tmp_path / "sw"), threads=1)
    for ph in ("vanilla", "distill-dense"):  # (what its finished run leaves: each phase's best.json)
        write_json(os.path.join(done.run_dir, "seed0", ph, "best.json"), {"round": 1})
    teacher, new, old = make_plan(settings([0.3, 0.5]), str(tmp_path / "sw"), threads=1)
    assert (old.name, old.deps, old.needs) == (done.name, [teacher.name], {teacher.name: ["teacher"]})
    assert new.deps == [old.name, teacher.name] and new.needs == {old.name: ["vanilla"], teacher.name: ["teacher"]}
    assert new.argv[new.argv.index("--reuse") + 1:][:2] == [old.run_dir, teacher.run_dir]
    # a study that has not finished every phase it trains owns those it finished (it owned none before
    # 2026-12-06: the new one trained the vanilla student again); an unfinished one it does not
    os.remove(os.path.join(done.run_dir, "seed0", "distill-dense", "best.json"))
    _, new, old = make_plan(settings([0.3, 0.5]), str(tmp_path / "sw"), threads=1)
    assert new.needs == {old.name: ["vanilla"], teacher.name: ["teacher"]} and old.needs == {teacher.name: ["teacher"]}
    # one it part-trained it owns too: it resumes it and the new one waits for it (the new one trained it again
    # and the old one's link then failed, PhaseMissing: its unfinished vanilla hid the new one's, before 2026-12-06)
    os.remove(os.path.join(done.run_dir, "seed0", "vanilla", "best.json"))
    _, new, old = make_plan(settings([0.3, 0.5]), str(tmp_path / "sw"), threads=1)
    assert new.needs == {old.name: ["vanilla"], teacher.name: ["teacher"]} and old.needs == {teacher.name: ["teacher"]}
    assert "--reuse" in old.argv and new.run_dir not in old.argv
    shutil.rmtree(os.path.join(done.run_dir, "seed0", "vanilla"))  # (never started: the first that needs it trains it)
    _, new, old = make_plan(settings([0.3, 0.5]), str(tmp_path / "sw"), threads=1)
    assert new.needs == {teacher.name: ["teacher"]} and old.needs == {new.name: ["vanilla"], teacher.name: ["teacher"]}


def test_a_teacher_run_whose_studies_all_finished_elsewhere_is_not_planned(tmp_path):
    """Studies the experiment's own command finished (their teacher phase trained in their directory, not
    linked): the sweep still trained their teacher run, which nobody links, before 2026-12-06; it is left out
    (their --reuse and dependencies without it), also where a study that needs it is unfinished or added (it
    links the finished study's teacher phase) until no study's directory holds it; a teacher-only point's run, a
    result of its own, is always planned."""
    settings = _settings(tmp_path, student=["vgg_d1g1"], alpha=[0.5, 0.8], seeds=[0])
    teacher, *studies = make_plan(settings, str(tmp_path / "sw"), threads=1)
    assert [r.kind for r in studies] == ["study", "study"]
    for s in studies:  # (what the plain command leaves: every phase its own, then its report)
        for ph in ("teacher", *(p for p in s.phases if p != "teacher")):
            write_json(os.path.join(s.run_dir, "seed0", ph, "best.json"), {"round": 1})
        open(os.path.join(s.run_dir, "summary.md"), "w").close()
    plan = make_plan(settings, str(tmp_path / "sw"), threads=1)
    assert [r.name for r in plan] == [s.name for s in studies] and all(r.done() for r in plan)
    assert all(r.deps == [] and r.needs == {} and "--reuse" not in r.argv for r in plan[:1])
    assert plan[1].deps == [studies[0].name] and plan[1].argv[plan[1].argv.index("--reuse") + 1:][:1] == [
        studies[0].run_dir] and teacher.run_dir not in plan[1].argv
    # one unfinished, or a grid value added (alpha 0.3, nothing trained): each links the teacher phase a finished
    # study holds (the teacher run was planned again as their dependency before 2026-12-06, and trained)
    os.remove(os.path.join(studies[1].run_dir, "summary.md"))
    plan = make_plan({**settings, "alpha": [0.3, 0.5, 0.8]}, str(tmp_path / "sw"), threads=1)
    assert teacher.name not in [r.name for r in plan] and [r.name for r in plan[1:]] == [s.name for s in studies]
    assert plan[0].needs == {studies[0].name: ["vanilla", "teacher"]} and teacher.run_dir not in plan[0].argv
    assert plan[0].argv[plan[0].argv.index("--reuse") + 1] == studies[0].run_dir
    assert plan[2].needs == {studies[0].name: ["vanilla", "teacher"]} and not plan[2].done()
    shutil.rmtree(os.path.join(studies[0].run_dir, "seed0", "teacher"))  # (none holds it: the teacher run trains it)
    shutil.rmtree(os.path.join(studies[1].run_dir, "seed0", "teacher"))
    plan = make_plan(settings, str(tmp_path / "sw"), threads=1)
    assert plan[0].name == teacher.name and teacher.name in plan[2].deps
    alone = make_plan(_settings(tmp_path, phases=("teacher",), seeds=[0]), str(tmp_path / "sw"), threads=1)
    assert [(r.kind, r.done()) for r in alone] == [("teacher", False)]


def test_a_study_resuming_a_phase_never_links_from_a_run_holding_it(tmp_path):
    """Two studies that each hold the same vanilla student (the earlier sweep trained it twice), one finished
    under the plain command, one part-trained: the second resumes its own, and links its teacher from the
    teacher run, not from the first (whose finished vanilla its unfinished one would hide: PhaseMissing). A study
    stopped in its teacher phase resumes it (the sweep's study run linked the teacher run's over it)."""
    settings = _settings(tmp_path, student=["vgg_d1g1"], alpha=[0.5, 0.8], seeds=[0])
    teacher, first, second = make_plan(settings, str(tmp_path / "sw"), threads=1)
    for ph in ("teacher", "vanilla", "distill-dense"):
        write_json(os.path.join(first.run_dir, "seed0", ph, "best.json"), {"round": 1})
    open(os.path.join(first.run_dir, "summary.md"), "w").close()
    os.makedirs(os.path.join(second.run_dir, "seed0", "vanilla", "ckpt"))  # (started, no best.json)
    plan = make_plan(settings, str(tmp_path / "sw"), threads=1)
    assert [r.name for r in plan] == [teacher.name, first.name, second.name]
    assert plan[2].needs == {teacher.name: ["teacher"]} and first.run_dir not in plan[2].argv
    assert plan[1].deps == [] and plan[1].done()
    # the plain command stopped in its teacher phase: the study resumes it (its --phases with teacher) and the
    # others link it from there, no teacher run (its studies' link to that one was refused, PhaseMissing)
    shutil.rmtree(first.run_dir)
    shutil.rmtree(second.run_dir)
    os.makedirs(os.path.join(first.run_dir, "seed0", "teacher", "ckpt"))
    plan = make_plan(settings, str(tmp_path / "sw"), threads=1)
    assert [r.name for r in plan] == [first.name, second.name] and plan[1].needs == {first.name: ["vanilla", "teacher"]}
    assert plan[0].needs == {} and plan[0].argv[plan[0].argv.index("--phases") + 1] == "teacher"


def test_a_study_resuming_a_phase_links_from_a_run_that_links_that_phase_from_it(tmp_path):
    """teachers dense stopped in its distillation, then (dense best) added before it, which is its teacher run
    (the same student) and links distill-dense from it. Its teacher finished there: the study links it (the link
    there it would hide is to its own phase). Unfinished: each would wait for the other, so the study trains its
    teacher itself (which the other then links). It was left without a teacher phase (PhaseMissing)."""
    _, study = make_plan(_settings(tmp_path, seeds=[0]), str(tmp_path / "sw"), threads=1)
    os.makedirs(os.path.join(study.run_dir, "seed0", "distill-dense", "ckpt"))  # (part-trained; no teacher link)
    grid = _settings(tmp_path, seeds=[0], variants=[{"teachers": ("dense", "best")}, {}])
    both, one = make_plan(grid, str(tmp_path / "sw"), threads=1)
    # (and it links the teacher phase from there: it trained it too before 2026-12-06, or linked it at run time)
    assert both.phases[0] == "teacher" and both.needs == {one.name: ["distill-dense", "teacher"]}
    assert one.name == study.name
    assert one.needs == {} and one.phases == ["teacher", "distill-dense"] and "--reuse" not in one.argv
    write_json(os.path.join(both.run_dir, "seed0", "teacher", "best.json"), {"round": 1})
    both, one = make_plan(grid, str(tmp_path / "sw"), threads=1)
    assert both.needs == {one.name: ["distill-dense"]} and one.needs == {both.name: ["teacher"]}
    assert one.argv[one.argv.index("--reuse") + 1] == both.run_dir


def test_a_study_knows_whether_its_teacher_run_is_its_vanilla_curve(tmp_path):
    """A kept teacher run (its study failed) is labelled the teacher's only where the study trains
    a vanilla student of its own (another model); else its curve is the setting's vanilla one."""
    other = make_plan(_settings(tmp_path, student=["vgg_d1g1"], seeds=[0]), str(tmp_path / "sw"), threads=1)
    same = make_plan(_settings(tmp_path, alpha=[0.5], seeds=[0]), str(tmp_path / "sw"), threads=1)
    assert [(r.kind, r.own_vanilla) for r in other] == [("teacher", False), ("study", True)]
    assert [(r.kind, r.own_vanilla) for r in same] == [("teacher", False), ("study", False)]


def test_plan_reports_an_invalid_point_and_keeps_the_others(tmp_path):
    plan = make_plan(_settings(tmp_path, alpha=[0.5, 1.5]), str(tmp_path / "sw"), threads=1)
    bad = [r for r in plan if r.error]
    assert len(bad) == 1 and "--alpha must be in [0, 1], got 1.5" in bad[0].error
    assert sum(r.kind == "study" and not r.error for r in plan) == 1
    # --device / --amp: whether they can run is the runs' machines' business, their spelling the plan's
    for axis, value, message in (("device", "tpu", "--device must be auto, cpu, cuda or cuda:N"),
                                 ("amp", "fp8", "argument --amp: invalid choice: 'fp8'")):
        plan = make_plan(_settings(tmp_path, **{axis: [value]}), str(tmp_path / "sw"), threads=1)
        assert [message in r.error for r in plan] == [True], (axis, [r.error for r in plan])
    assert not make_plan(_settings(tmp_path, device=["cuda:1"]), str(tmp_path / "sw"), threads=1)[0].error
    # ... but --device cpu with --amp bf16/fp16 runs nowhere (the experiment refuses it): each run failed at run time,
    # and at --gpus-per-run 0 the sweep advised giving the runs a GPU
    plan = make_plan(_settings(tmp_path, device=["cpu"], amp=["bf16", "off"]), str(tmp_path / "sw"), threads=1)
    assert [r.error for r in plan if r.error] == [
        "error: --amp bf16 needs a CUDA device (the CPU kernels compute in fp32); use --amp off or auto (see python -m "
        "sparsetrain.experiment --help)"]
    assert cli.main(_tiny(tmp_path, "--device", "cpu", "--amp", "fp16", "--dry-run")) == 1


def test_dry_run_prints_the_plan_and_fails_on_an_invalid_point(tmp_path, capsys):
    """--dry-run lists every run (an invalid point marked INVALID with its reason) and exits as the
    sweep would end: 0 for a valid grid, 1 when a run is invalid; nothing is run."""
    assert cli.main(_tiny(tmp_path, "--alpha", "0.5", "--dry-run")) == 0
    out = capsys.readouterr()
    assert "teacher" in out.out and "study" in out.out and "INVALID" not in out.out and out.err == ""
    assert cli.main(_tiny(tmp_path, "--alpha", "0.5", "1.5", "--dry-run")) == 1
    out = capsys.readouterr()
    (line,) = [ln for ln in out.out.splitlines() if "INVALID" in ln]
    assert "--alpha must be in [0, 1], got 1.5" in line and "3 runs; plan:" in out.out
    assert out.err.strip() == "error: 1 of 3 runs are invalid (INVALID above)"
    assert not (tmp_path / "sweeps" / "runs").exists()
    # a dry run writes the plan of a sweep not yet run, and leaves a sweep's own record alone
    plan_file = out.out.rsplit("plan: ", 1)[1].strip()
    record = open(plan_file).read()
    assert "--dry-run" in record
    with open(plan_file, "w") as f:
        f.write(record.replace('"--dry-run"', '"--as-run"'))  # (as the real sweep would have written it)
    assert cli.main(_tiny(tmp_path, "--alpha", "0.5", "1.5", "--dry-run")) == 1
    assert capsys.readouterr().out.rsplit("plan: ", 1)[1].strip() == plan_file
    assert '"--as-run"' in open(plan_file).read()


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "runs_a_file").mkdir()
    (tmp_path / "runs_a_file" / "runs").write_text("")  # (OUT/runs, where every run goes)
    (tmp_path / "sub" / "a_run").mkdir(parents=True)  # (two levels down: `report tmp_path` finds no run)
    (tmp_path / "sub" / "a_run" / "config.json").write_text("{}")
    cases = ((["nope"], "recipe must be one of"), (["grid"], "grid needs --dataset"),
             ([], "the following arguments are required: RECIPE|grid|report (see"),  # (not RUN_DIR: report's only)
             (["report", str(tmp_path)], "no run directory"),
             (["paper-eps", "--cpus-per-run", "0"], "--cpus-per-run must be >= 0.0001 and finite"),
             (["paper-eps", "--cpus-per-run", "inf"], "--cpus-per-run must be >= 0.0001 and finite"),
             (["paper-eps", "--cpus-per-run", "0.50001"], "in steps of 0.0001 (Ray's precision)"),
             (["paper-eps", "--gpus-per-run", "1.5"], "a fraction of one GPU in steps of 0.0001 or a whole number"),
             (["paper-eps", "--retries", "10000000000000000000000"], "--retries must be in [0, 1000]"),
             (["paper-eps", "--out", __file__], "is a file, not a directory"),
             (["paper-regularizers", "--dropout", "0.3"], "--dropout: paper-regularizers changes it one variant"),
             (["paper-eps", "--out", os.path.join(__file__, "sub")], "--out: cannot create"),
             (["paper-eps", "--out", "", "--dry-run"], "--out must be a folder path, not empty"),
             (["paper-eps", "--out", str(tmp_path / "runs_a_file"), "--dry-run"], "runs is not a directory"),
             (["report", str(tmp_path / "sub"), "--out", str(tmp_path / "sub" / "a_run")], "a_run is a run directory"),
             (["report", str(tmp_path), "--out", " "], "--out must be a folder path, not empty"),
             (["grid", "--dataset", "mnist", "--seeds", "0", "0"], "--seeds lists a value twice (0 0)"),
             # an item twice in a one-value list flag: every point invalid, a whole sweep of failures (exit 1)
             (["grid", "--dataset", "mnist", "--teachers", "dense", "dense", "--dry-run"],
              "--teachers lists a value twice (dense dense): name each once"),
             (["paper-eps", "--phases", "teacher", "teacher", "--dry-run"], "--phases lists a value twice"),
             # two values that are one study: an alias, a setting the runs ignore (one trained, one linked)
             (["grid", "--dataset", "mnist", "--seeds", "0", "--model", "lenet300", "lenet-300-100"],
              "two points of the grid are the same study (--model 'lenet300' and 'lenet-300-100'): name each model once"),
             (["grid", "--dataset", "mnist", "--seeds", "0", "--block", "16", "64"],
              "two points of the grid are the same study (--block 16 and 64): vary only settings the runs use"),
             (["report", str(tmp_path), "--alpha", "0.5", "--dry-run"],
              "report takes run directories and --out only, got --dry-run, --alpha"),
             # runs that could never start: the runner hides every GPU at --gpus-per-run 0
             (["grid", "--dataset", "mnist", "--device", "cpu", "cuda", "--dry-run"],
              "--device cuda needs a GPU, and --gpus-per-run 0 (the default) gives the runs none"),
             (["grid", "--dataset", "mnist", "--amp", "fp16", "--dry-run"], "--amp fp16 needs a GPU"),
             # Ray shows a run only its own GPUs, from cuda:0: every run failed, "this machine has 1 CUDA device(s)"
             (["grid", "--dataset", "mnist", "--device", "cuda:1", "--gpus-per-run", "0.5", "--dry-run"],
              "--device cuda:1: each run sees only the 1 GPU(s) Ray gives it (--gpus-per-run 0.5)"),
             (["grid", "--dataset", "mnist", "--device", "cuda:1", "cuda:2", "--gpus-per-run", "2", "--dry-run"],
              "--device cuda:2: each run sees only the 2 GPU(s)"))
    # (each its own process, forked from one that imported torch and the sweep once: tests/cli_forks.py)
    outs = cli_forks.run("sparsetrain.sweep", [(tmp_path, argv) for argv, _ in cases], preload=["sparsetrain.sweep.cli"])
    for (argv, needle), out in zip(cases, outs):
        err = out.stderr
        assert out.returncode == 2 and needle in err and "Traceback" not in err and len(err.splitlines()) == 1, \
            (argv, err)
    # (the GPUs a run does see are fine: a plan, exit 0)
    assert cli.main(["grid", "--dataset", "mnist", "--device", "cuda:1", "--gpus-per-run", "2", "--dry-run",
                     "--out", str(tmp_path / "sw")]) == 0


def test_out_expands_a_leading_tilde(tmp_path, monkeypatch):
    """`--out=~/sweeps` (no shell expands a ~ after '=') wrote the sweep into a folder named `~` in the
    working directory; the ~ is the home folder now, as the experiment's --out."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["grid", "--dataset", "mnist", "--dry-run", "--out=~/sw"]) == 0
    plans = [os.path.join(d, "plan.json") for d in os.listdir(home / "sw") if d.startswith("grid-")]
    assert len(plans) == 1 and os.path.isfile(home / "sw" / plans[0])
    with open(home / "sw" / plans[0]) as f:
        assert all(r["run_dir"].startswith(str(home / "sw" / "runs") + os.sep) for r in json.load(f)["runs"])
    assert not (tmp_path / "~").exists()


def test_data_dir_and_label_file_expand_a_leading_tilde(tmp_path, monkeypatch):
    """The sweep made --data-dir=~/data (and --label-file=~/l.npy) absolute as they stood: the runs read
    ./~/data, a folder named ~ in the sweep's working directory; the ~ is the home folder now, as in the
    experiment."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["grid", "--dataset", "cifar100n", "--eps", "0", "--dry-run", "--out", str(tmp_path / "sw"),
                     "--data-dir=~/data", "--label-file=~/l.npy"]) == 0
    (plan,) = [d / "plan.json" for d in (tmp_path / "sw").iterdir() if d.name.startswith("grid-")]
    with open(plan) as f:
        runs = json.load(f)["runs"]
    assert len(runs) == 6  # (3 seeds: a teacher run and a study each)
    for argv in (r["argv"] for r in runs):
        assert argv[argv.index("--data-dir") + 1] == str(home / "data")
        assert argv[argv.index("--label-file") + 1] == str(home / "l.npy")


def test_an_address_without_a_cluster_is_refused_at_once():
    """--address HOST:PORT where nothing listens: refused in seconds (ray.init retried for ~14
    minutes); 'auto' and ray:// addresses are left to Ray."""
    import time
    from sparsetrain.sweep.runner import SweepError, _check_reachable
    t0 = time.perf_counter()
    with pytest.raises(SweepError, match=r"--address 127.0.0.1:1: no Ray cluster reachable there \(Connection refused\)"):
        _check_reachable("127.0.0.1:1")
    assert time.perf_counter() - t0 < 10
    for address in ("auto", "ray://127.0.0.1:1"):
        _check_reachable(address)


def test_a_request_the_machine_cannot_meet_is_refused(mnist_dir, capsys):
    """--cpus-per-run or --gpus-per-run beyond what the local Ray offers: one line, exit 2, instead
    of runs waiting forever; and a run without a GPU share gets no GPU (CUDA_VISIBLE_DEVICES="")."""
    from sparsetrain.sweep import runner
    for flag, value in (("--cpus-per-run", "512"), ("--gpus-per-run", "64")):
        assert cli.main(_tiny(mnist_dir, "--seeds", "0", flag, value)) == 2
        assert f"{flag} {value}: this machine's Ray offers" in capsys.readouterr().err
    log = mnist_dir / "env.log"
    script = mnist_dir / "env.py"
    script.write_text("import os; print('CUDA_VISIBLE_DEVICES=' + repr(os.environ.get('CUDA_VISIBLE_DEVICES')))")
    runner.run_experiment([], str(log), 1, str(mnist_dir), str(script))
    runner.run_experiment([], str(log), 1, str(mnist_dir), str(script), gpus=1)
    seen = [ln for ln in log.read_text().splitlines() if ln.startswith("CUDA_VISIBLE_DEVICES=")]
    assert seen == ["CUDA_VISIBLE_DEVICES=''", f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"]


def test_a_run_on_a_node_without_the_sweep_s_folder_starts_in_its_log_folder(tmp_path, monkeypatch):
    """A run starts in the folder the sweep was started from; on a cluster node without that folder, Popen
    raised a bare FileNotFoundError (every run there failed). Now it starts in its log's folder (on the shared
    --out), the log saying so, and imports the sparsetrain its Ray worker runs (not one found from there)."""
    import sparsetrain
    from sparsetrain.sweep import runner
    monkeypatch.delenv("PYTHONPATH", raising=False)  # (the worker's sparsetrain: only its own path finds it)
    script = tmp_path / "where.py"
    script.write_text("import os, sparsetrain\nprint('cwd=' + os.getcwd())\nprint('pkg=' + sparsetrain.__file__)")
    log, gone = tmp_path / "sw" / "logs" / "r.log", tmp_path / "gone"
    for cwd, want in ((tmp_path, tmp_path), (gone, log.parent)):  # (the reference: a folder this node has)
        start = log.stat().st_size if log.exists() else 0
        assert runner.run_experiment([], str(log), 1, str(cwd), str(script))[0] >= 0
        text = log.read_text()[start:]
        assert f"cwd={want}\n" in text and (f"{gone} (where the sweep started) does not exist on this node" in text) == (cwd == gone), text
    assert f"pkg={sparsetrain.__file__}\n" in text


def test_without_ray_the_sweep_says_how_to_install_it(tmp_path, monkeypatch):
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import SweepError, execute
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as where it is not installed
    with pytest.raises(SweepError, match=r"needs Ray .*pip install ray ") as e:
        execute([Run("r", "study", str(tmp_path / "r"), [], phases=["never"])], str(tmp_path / "sw"))
    # (the README's ways: sparsetrain comes from its checkout; 'sparsetrain[sweep]' asked an index for another package)
    assert "'.[sweep]'" in str(e.value) and "sparsetrain[sweep]" not in str(e.value)


def test_a_hand_edited_status_json_does_not_stop_the_sweep(tmp_path):
    """A finished run keeps the seconds the previous status.json says; an entry there that is no
    object (a hand edit) gave a TypeError traceback before anything ran. Now it is left aside."""
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import execute
    run = Run("r", "teacher", str(_finished_run(tmp_path / "r", _cfg())), [], seed=0, phases=["teacher"])
    for before, want in (({"r": {"state": "done", "seconds": 12}}, 12), ({"r": 5}, None), ({"r": "seconds"}, None)):
        write_json(tmp_path / "sw" / "status.json", before)
        status = execute([run], str(tmp_path / "sw"))
        assert status["r"]["state"] == "skipped" and status["r"].get("seconds") == want, (before, status)


def test_ctrl_c_while_the_report_is_written_is_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C once every run finished, while the sweep writes its report (figures: seconds): a
    KeyboardInterrupt traceback. Now one line saying to re-run for the report, exit 130."""
    from sparsetrain.sweep import runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "execute", lambda plan, *a, **k: {r.name: {"state": "done", "log": ""} for r in plan})
    monkeypatch.setattr(cli, "_report", interrupted)
    assert cli.main(_tiny(tmp_path, "--seeds", "0")) == 130
    err = capsys.readouterr().err
    assert err.startswith("stopped while writing the report; re-run the same command") and len(err.splitlines()) == 1


_CTRL_C_IN_RAY_SHUTDOWN = r"""
import atexit, os, runpy, signal, sys, time, types
up = [True]
def shutdown():  # (a Ctrl-C landing while Ray shuts down: Ray registers its shutdown with atexit)
    if up[0]:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        up[0] = False
sys.modules["ray"] = types.SimpleNamespace(is_initialized=lambda: up[0], shutdown=shutdown)
atexit.register(shutdown)
sys.argv = ["sparsetrain.sweep", *sys.argv[1:]]
runpy.run_module("sparsetrain.sweep", run_name="__main__", alter_sys=True)
"""


def test_a_ctrl_c_while_ray_shuts_down_at_the_end_is_ignored(tmp_path, monkeypatch):
    """The sweep's last second: Ray's shutdown. Left to Ray's atexit hook, a Ctrl-C there printed "Exception ignored
    in atexit callback" and a KeyboardInterrupt traceback (the sweep exited 0); the CLI shuts Ray down itself now,
    SIGINT ignored meanwhile, and its handler is back after: the command's output and exit status only."""
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_IN_RAY_SHUTDOWN, *_tiny(tmp_path, "--seeds", "0", "--dry-run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "" and "runs; plan: " in proc.stdout, (proc.stdout, proc.stderr)
    import types
    from sparsetrain.sweep.runner import shutdown_ray
    seen, handler = [], signal.getsignal(signal.SIGINT)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(
        is_initialized=lambda: True, shutdown=lambda: seen.append(signal.getsignal(signal.SIGINT))))
    shutdown_ray()
    assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is handler


def test_a_file_the_sweep_cannot_write_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC (or a read-only folder) writing plan.json, the sweep's report or `report`'s files was a
    WriteFailed traceback (the experiment prints it as one line): now `error: cannot write <file>: ...`,
    exit 2, the file named and the previous one left intact."""
    from sparsetrain.experiment import files
    assert cli.main(_tiny(tmp_path, "--dry-run")) == 0
    plan_file = capsys.readouterr().out.rsplit("plan: ", 1)[1].strip()
    os.remove(plan_file)
    real = files._atomic_write

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files, "_atomic_write", full)
    for flag in ("--dry-run", "--dry"):  # (argparse's abbreviation too: the advice read from the parsed command)
        assert cli.main(_tiny(tmp_path, flag)) == 2  # (no plan.json yet: the dry run writes one)
        err = capsys.readouterr().err
        assert err == f"error: cannot write {plan_file}: No space left on device; free space (or fix permissions) " \
                      "and run the same command again\n" and not os.path.exists(plan_file)  # (nothing to resume)
    monkeypatch.setattr(files, "_atomic_write", real)
    _write_run(tmp_path / "runs" / "a", 0.1, [0], {0: [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]})
    assert cli.main(["report", str(tmp_path / "runs")]) == 0
    summary = tmp_path / "runs" / "report" / "summary.md"
    before = summary.read_text()
    monkeypatch.setattr(files, "_atomic_write", full)
    assert cli.main(["report", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path / 'runs' / 'report'}") and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and summary.read_text() == before


def test_a_run_log_or_marker_that_cannot_be_written_names_the_file(tmp_path, monkeypatch):
    """A run's log or its .running marker that cannot be written (a read-only or full disk; here a folder
    in its place) was a bare OSError, and a marker's left the experiment process running unwatched: now
    WriteFailed naming the file, the process never started; the sweep's "not run" log of an invalid point
    is one line (SweepError) naming it, where it was a traceback."""
    from sparsetrain.experiment.files import WriteFailed
    from sparsetrain.sweep import runner
    started = []

    class Popen:  # (records a process started and whether it was waited for)
        def __init__(self, *a, **k):
            started.append(self)
            self.waited, self.pid = False, 0  # (no process: pid 0, never signalled)

        def wait(self, timeout=None):
            self.waited = True
            return 0
    monkeypatch.setattr(runner.subprocess, "Popen", Popen)
    log = tmp_path / "logs" / "r.log"
    for blocked in (log, tmp_path / "logs" / "r.log.running"):
        blocked.mkdir(parents=True)
        with pytest.raises(WriteFailed) as e:
            runner.run_experiment(["mnist"], str(log), 1, str(tmp_path))
        assert e.value.filename == str(blocked) and str(e.value).startswith(f"cannot write {blocked}: ")
        assert all(p.waited for p in started) and blocked.is_dir()
        blocked.rmdir()
    assert runner.run_experiment(["mnist"], str(log), 1, str(tmp_path))[0] >= 0  # (the reference: it runs)
    assert len(started) == 1 and started[0].waited and not os.path.exists(str(log) + ".running")
    (invalid,) = make_plan(_settings(tmp_path, alpha=[1.5], seeds=[0]), str(tmp_path / "sw"), threads=1)
    (tmp_path / "sw" / "s" / "logs" / f"{invalid.name}.log").mkdir(parents=True)
    with pytest.raises(runner.SweepError, match=f"cannot write {tmp_path / 'sw' / 's' / 'logs' / invalid.name}.log: "):
        runner.execute([invalid], str(tmp_path / "sw" / "s"))


def test_a_leftover_marker_that_cannot_be_removed_is_one_line(tmp_path, monkeypatch):
    """A killed worker's `.running` marker that the sweep's start cannot remove (a read-only logs/ folder) was a
    bare OSError traceback, then a one-line "cannot write" (it is a removal); now the sweep's one-line error
    (SweepError) says it cannot remove the marker, naming it and the OS reason; the marker is left as it was."""
    from sparsetrain.sweep import runner
    marker = tmp_path / "sw" / "logs" / "r.log.running"
    marker.parent.mkdir(parents=True)
    marker.touch()
    assert runner.execute([], str(tmp_path / "sw")) == {} and not marker.exists()  # (the reference: removed)
    marker.touch()
    real = os.remove

    def read_only(path, *a, **k):  # (a read-only logs/: the markers in it cannot be removed)
        if str(path).endswith(".running"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(runner.os, "remove", read_only)
    with pytest.raises(runner.SweepError) as e:
        runner.execute([], str(tmp_path / "sw"))
    assert str(e.value).startswith(f"cannot remove {marker}: Permission denied;") and marker.exists()


def _outcome_scripts(tmp_path):
    """Two experiment scripts: one that succeeds, one that exits 1."""
    ok, crash = tmp_path / "ok.py", tmp_path / "crash.py"
    ok.write_text("pass")
    crash.write_text("raise SystemExit(1)")
    return ok, crash


def _each_outcome_notes(runner, tmp_path, log, note, monkeypatch):
    """run_experiment's three outcomes with `note` (what its log or marker could not take): a finished run
    returns it, a failed one's RunFailed adds it to its error, and a cancel stays a cancel."""
    ok, crash = _outcome_scripts(tmp_path)
    seconds, why = runner.run_experiment([], str(log), 1, str(tmp_path), str(ok))
    assert seconds >= 0 and why == note
    with pytest.raises(runner.RunFailed) as e:
        runner.run_experiment([], str(log), 1, str(tmp_path), str(crash))
    assert str(e.value) == f"exit code 1 (see {log}; {note})"

    class Cancelled(subprocess.Popen):  # (the sweep's cancel lands while the run waits for its process)
        def wait(self, timeout=None):
            if timeout == 0.5:
                raise KeyboardInterrupt
            return super().wait(timeout)
    monkeypatch.setattr(runner.subprocess, "Popen", Cancelled)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment([], str(log), 1, str(tmp_path), str(ok))


def test_a_log_that_cannot_take_its_last_line_keeps_the_run_s_outcome(tmp_path, monkeypatch):
    """The line a run's log gets after its process (exit code, cancelled) on a full disk raised a bare OSError
    in place of the run's outcome: a finished run failed ("OSError: [Errno 28] ...", no file named), a failed one
    lost its error, a cancelled one was no longer cancelled. Now the outcome stands and names the log: a
    finished run is done, status.json and the progress line warning that its log could not be written."""
    from sparsetrain.sweep import runner
    from sparsetrain.sweep.plan import Run
    real = runner.open_log

    def full(log, header):  # (the header written, then the disk is full: /dev/full fails every write, ENOSPC)
        real(log, header).close()
        return open("/dev/full", "a")
    log, lost = tmp_path / "logs" / "r.log", f"cannot write {tmp_path / 'logs' / 'r.log'}: No space left on device"
    ok = _outcome_scripts(tmp_path)[0]
    assert runner.run_experiment([], str(log), 1, str(tmp_path), str(ok))[1] == ""  # (the reference: it is written)
    assert log.read_text().splitlines()[-1].startswith("=== exit code 0 after ")
    monkeypatch.setattr(runner, "open_log", full)
    _each_outcome_notes(runner, tmp_path, log, lost, monkeypatch)
    assert not os.path.exists(str(log) + ".running")
    _fake_ray(monkeypatch)
    sys.modules["ray"].get = lambda ref, timeout=None: (3, lost)  # (what the run's task returned)
    run = Run("r", "study", str(tmp_path / "r"), [], phases=["never"], program=str(ok))
    status = runner.execute([run], str(tmp_path / "sw"))
    assert status["r"]["state"] == "done" and status["r"]["seconds"] == 3 and status["r"]["warning"] == lost
    assert json.loads((tmp_path / "sw" / "status.json").read_text())["r"] == status["r"]


def test_a_marker_that_cannot_be_removed_keeps_the_run_s_outcome(tmp_path, monkeypatch):
    """A run's `.running` marker that cannot be removed after its process (a read-only logs/ folder) raised a bare
    OSError in place of the run's outcome: a finished run failed, a failed one lost its error, a cancelled one was
    no longer cancelled. Now the outcome stands and names the marker (a finished run's warning), in its log too."""
    from sparsetrain.sweep import runner
    log, marker = tmp_path / "logs" / "r.log", tmp_path / "logs" / "r.log.running"
    ok = _outcome_scripts(tmp_path)[0]
    assert runner.run_experiment([], str(log), 1, str(tmp_path), str(ok))[1] == ""  # (the reference: removed)
    assert not marker.exists()
    real, stale = os.remove, f"cannot remove {marker}: Permission denied"

    def read_only(path, *a, **k):
        if str(path).endswith(".running"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "remove", read_only)
    _each_outcome_notes(runner, tmp_path, log, stale, monkeypatch)
    assert marker.exists() and log.read_text().splitlines()[-1] == f"=== {stale}"
    assert log.read_text().splitlines().count(f"=== {stale}") == 3  # (done, failed, cancelled: each says so)


def test_a_sweep_folder_in_use_is_refused(tmp_path):
    """A second sweep on the folder a running one holds (its lock) stops at once with who holds it."""
    from sparsetrain.experiment.files import folder_lock
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import SweepError, execute
    sw = tmp_path / "sw"
    with subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom sparsetrain.experiment.files import "
                           "folder_lock\nwith folder_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
                           str(sw)], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(SweepError, match=rf"{sw} is in use by another process \(pid {holder.pid}\)"):
                execute([Run("r", "study", str(tmp_path / "r"), [], phases=["never"])], str(sw))
            assert not (sw / "status.json").exists()
        finally:
            holder.kill()
    with folder_lock(str(sw)):  # released when its holder died
        pass


# ---------------------------------------------------------------------------- --phases / --reuse
def test_experiment_phases_and_reuse(mnist_dir, study_args, capsys):
    """A distilled student alone needs a finished teacher: refused (exit 2) without one, linked from
    --reuse with one (same curve as the teacher trained in place), refused when that teacher was
    trained on other data, leaving nothing behind."""
    from sparsetrain.experiment import study
    base = study_args(mnist_dir, "--teachers", "dense")
    assert study.main(base + ["--out", str(mnist_dir / "x"), "--phases", "distill"]) == 2
    assert "needs a finished teacher phase" in capsys.readouterr().err
    # (refused before anything ran: no config.json is left for a report to list or --resume to take)
    assert not list((mnist_dir / "x").rglob("config.json"))
    assert study.main(base + ["--out", str(mnist_dir / "x"), "--phases", "distill", "--resume"]) == 2
    assert "--resume: no run to resume" in capsys.readouterr().err
    assert study.main(base + ["--out", str(mnist_dir / "t"), "--phases", "teacher"]) == 0
    (teacher,) = (mnist_dir / "t").iterdir()
    assert study.main(base + ["--out", str(mnist_dir / "s"), "--phases", "distill", "--reuse", str(teacher)]) == 0
    (student,) = (mnist_dir / "s").iterdir()
    assert os.path.islink(student / "seed0" / "teacher") and not (student / "seed0" / "vanilla").exists()
    assert study.main(base + ["--out", str(mnist_dir / "full")]) == 0  # everything trained in place
    (full,) = (mnist_dir / "full").iterdir()
    for phase in ("teacher", "distill-dense"):
        assert strip_timing(read_rows(student / "seed0" / phase / "metrics.csv")) == \
            strip_timing(read_rows(full / "seed0" / phase / "metrics.csv"))
    other = mnist_dir / "other"
    write_mnist(other / "mnist", gz=False, n_train=80, n_test=20, seed=1)
    argv = [a if a != str(mnist_dir / "data") else str(other) for a in base]
    assert study.main(argv + ["--out", str(mnist_dir / "o"), "--phases", "distill", "--reuse", str(teacher)]) == 2
    assert "trained on other data" in capsys.readouterr().err
    # (nothing left, its link included: the same command without --reuse refused that link, "trained on other
    # data", however often it ran, before 2026-12-07)
    assert not (mnist_dir / "o").exists()
    assert study.main(base + ["--out", str(mnist_dir / "y"), "--reuse", str(mnist_dir / "nope")]) == 2
    assert "--reuse" in capsys.readouterr().err


def _cfg(*extra):
    from sparsetrain.experiment.config import config_from_args
    return config_from_args(["mnist", "--profile", "quick", *extra])[0]


def _finished_run(folder, cfg, phase="teacher", teachers=None):
    """A run directory holding cfg's config.json and a finished `phase` of seed 0 (its best.json)."""
    import dataclasses
    write_json(folder / "config.json", {**dataclasses.asdict(cfg), "student": cfg.resolved_student(),
                                        **({"teacher_fingerprints": teachers} if teachers else {})})
    write_json(folder / "seed0" / phase / "best.json", {"round": 0})
    (folder / "summary.md").write_text("# a finished run's report\n")
    return folder


def test_a_run_stopped_while_writing_its_report_is_not_done(tmp_path):
    """A run whose phases finished but whose summary.md is missing, or older than this seed's phases
    (another seed of the same run directory wrote it), is run again, which writes the report: a sweep
    cancelled during a run's report skipped it from then on, its summary and figures never written."""
    from sparsetrain.sweep.plan import Run
    rd = _finished_run(tmp_path / "r", _cfg())
    run = Run("r", "teacher", str(rd), [], seed=0, phases=["teacher"])
    assert run.done()
    (rd / "summary.md").unlink()
    assert not run.done()
    (rd / "summary.md").write_text("seed 1's report")
    os.utime(rd / "summary.md", (1, 1))  # (written before seed 0's phase finished)
    assert not run.done()
    os.utime(rd / "summary.md")
    assert run.done() and not Run("r", "teacher", str(rd), [], seed=1, phases=["teacher"]).done()


def test_a_finished_run_whose_data_came_from_outside_this_data_dir_is_run_again(tmp_path):
    """A sweep re-run with another --data-dir skipped its finished runs unchecked (done() looked at best.json
    and summary.md alone), and its report mixed the two datasets' results: a run whose recorded data_source
    lies outside the planned --data-dir is not done, so the experiment checks that data's fingerprint (it
    refuses other data: `trained on other data`; the same data moved, it writes the report again)."""
    import dataclasses
    from sparsetrain.sweep.plan import Run
    rd = _finished_run(tmp_path / "r", _cfg())
    record = json.loads((rd / "config.json").read_text())
    write_json(rd / "config.json", {**record, "data_source": str(tmp_path / "dataA" / "mnist")})
    planned = lambda data_dir: Run("r", "teacher", str(rd), [], seed=0, phases=["teacher"],  # noqa: E731
                                   config={**dataclasses.asdict(_cfg()), "data_dir": str(data_dir)})
    assert planned(tmp_path / "dataA").done() and planned(tmp_path / "dataA" / ".." / "dataA").done()
    assert not planned(tmp_path / "dataB").done() and not planned(tmp_path / "dataA2").done()
    write_json(rd / "config.json", {**record, "data_source": "/usr/share/datasets/fashion-mnist"})  # (Debian's copy)
    assert not planned(tmp_path / "dataA").done()
    write_json(rd / "config.json", record)  # (no source recorded: nothing to compare)
    assert planned(tmp_path / "dataB").done()


def test_phase_key_ignores_what_a_run_ignores():
    """Settings a configuration does not read leave the key alone (a reuse is not lost over them);
    the settings it reads change it."""
    from sparsetrain.experiment.reuse import phase_key
    def same(a, b, phase="teacher"):
        return phase_key(_cfg(*a), phase, 0) == phase_key(_cfg(*b), phase, 0)
    assert same(["--rewind-iter", "5"], ["--rewind-iter", "9"])  # (--perturb none)
    assert not same(["--perturb", "rewind", "--rewind-iter", "5"], ["--perturb", "rewind", "--rewind-iter", "9"])
    for flag, a, b in (("--scope", "global", "layer"), ("--engine", "dense", "sparse"), ("--block", "16", "64")):
        assert same(["--structure", "filter", flag, a], ["--structure", "filter", flag, b]), flag
    assert same(["--structure", "block", "--engine", "dense"], ["--structure", "block", "--engine", "sparse"])
    assert not same(["--structure", "block", "--block", "16"], ["--structure", "block", "--block", "64"])
    assert not same(["--scope", "global"], ["--scope", "layer"]) and same(["--block", "16"], ["--block", "64"])
    assert not same(["--engine", "dense"], ["--engine", "sparse"])
    assert same(["--early-stop", "none", "--t-e", "0.5"], ["--early-stop", "none", "--t-e", "0.9"], "vanilla")
    assert not same(["--early-stop", "entropy", "--t-e", "0.5"], ["--early-stop", "entropy", "--t-e", "0.9"],
                    "vanilla")
    assert same(["--early-stop", "entropy", "--stop-falls", "1"], ["--early-stop", "entropy", "--stop-falls", "3"],
                "vanilla")
    assert not same(["--early-stop", "entropy-peak", "--stop-falls", "1"],
                    ["--early-stop", "entropy-peak", "--stop-falls", "3"], "vanilla")
    assert same(["--model", "vgg-d1g5"], ["--model", "VGG_like_d1g5"]) and same(["--model", "vgg"], ["--model", "vgg_d5g5"])
    assert not same(["--model", "vgg_d1g5"], ["--model", "vgg_d1g6"])


def test_a_teacher_file_is_matched_by_its_bytes(tmp_path, monkeypatch):
    """A distilled student's key holds its --teachers PATH's sha256, not the path: a file rewritten
    with another teacher is another key, a copy elsewhere the same; another run's key uses the
    fingerprints its config.json recorded (none recorded: no match); a run resumed with a changed
    teacher file is refused."""
    from sparsetrain.experiment.reuse import link_reused, phase_key, teacher_fingerprint
    from sparsetrain.experiment.study import UsageError, check_teacher_files
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "t.pt").write_bytes(b"teacher one")
    (tmp_path / "b" / "t.pt").write_bytes(b"teacher one")
    monkeypatch.chdir(tmp_path)
    cfg_a, cfg_b = _cfg("--teachers", "a/t.pt"), _cfg("--teachers", str(tmp_path / "b" / "t.pt"))
    key = phase_key(cfg_a, "distill-path-t", 0)
    assert key == phase_key(cfg_b, "distill-path-t", 0)
    fp = teacher_fingerprint("a/t.pt")
    assert phase_key(cfg_a, "distill-path-t", 0, {"a/t.pt": fp}) == key != phase_key(cfg_a, "distill-path-t", 0, {})
    other = _finished_run(tmp_path / "B", cfg_a, "distill-path-t", {"a/t.pt": fp})
    (tmp_path / "a" / "t.pt").write_bytes(b"teacher two, retrained")
    assert phase_key(cfg_a, "distill-path-t", 0) != key
    assert not link_reused(cfg_a, str(tmp_path / "A"), 0, "distill-path-t", [(str(other), cfg_a, {"a/t.pt": fp})])
    assert link_reused(cfg_b, str(tmp_path / "A"), 0, "distill-path-t", [(str(other), cfg_a, {"a/t.pt": fp})])
    with pytest.raises(UsageError, match="--teachers a/t.pt is not the file seed 0's distilled student started from"):
        check_teacher_files(cfg_a, str(other))  # (a resume: the run recorded the old bytes)
    (tmp_path / "a" / "t.pt").write_bytes(b"teacher one")
    check_teacher_files(cfg_a, str(other))
    rd = _finished_run(tmp_path / "C", cfg_a)
    check_teacher_files(cfg_a, str(rd))  # records it
    assert json.loads((rd / "config.json").read_text())["teacher_fingerprints"] == {"a/t.pt": fp}
    (tmp_path / "a" / "t.pt").write_bytes(b"teacher three")
    check_teacher_files(cfg_a, str(rd))  # (no student distilled from it yet: the new file is recorded)
    assert json.loads((rd / "config.json").read_text())["teacher_fingerprints"] != {"a/t.pt": fp}


def test_reuse_links_through_a_symlinked_out_and_replaces_dangling_links(tmp_path):
    """The relative link is taken from the link's real folder (an --out reached through a symlink
    at another depth still resolves); a dangling link is replaced; an unfinished phase here that
    hides a finished one in --reuse is refused with what to do."""
    from sparsetrain.experiment.reuse import PhaseMissing, link_reused
    cfg = _cfg()
    other = _finished_run(tmp_path / "runs" / "B", cfg)
    (tmp_path / "deep" / "er" / "real").mkdir(parents=True)
    os.symlink(tmp_path / "deep" / "er" / "real", tmp_path / "out")
    here = tmp_path / "out" / "A" / "seed0" / "teacher"
    assert link_reused(cfg, str(tmp_path / "out" / "A"), 0, "teacher", [(str(other), cfg, {})])
    assert os.path.islink(here) and (here / "best.json").is_file()
    os.unlink(here)
    os.symlink("../nowhere/teacher", here)  # dangling
    assert link_reused(cfg, str(tmp_path / "out" / "A"), 0, "teacher", [(str(other), cfg, {})])
    assert (here / "best.json").is_file()
    partial = tmp_path / "P" / "seed0" / "teacher"
    partial.mkdir(parents=True)
    (partial / "state.pt").write_bytes(b"")
    with pytest.raises(PhaseMissing, match="unfinished teacher phase that hides the finished one"):
        link_reused(cfg, str(tmp_path / "P"), 0, "teacher", [(str(other), cfg, {})])
    assert link_reused(cfg, str(tmp_path / "P"), 0, "teacher", [])  # (no --reuse: resumed here)


def test_reuse_link_on_a_full_disk_is_write_failed(tmp_path, monkeypatch):
    """--reuse's link a disk had no room for (ENOSPC) was a plain OSError traceback: WriteFailed
    naming the link (the CLI's one-line error), no link left."""
    import errno
    from sparsetrain.experiment.files import WriteFailed
    from sparsetrain.experiment.reuse import link_reused
    cfg = _cfg()
    other = _finished_run(tmp_path / "runs" / "B", cfg)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "symlink", full)
    here = tmp_path / "A" / "seed0" / "teacher"
    with pytest.raises(WriteFailed, match=f"cannot write {here}: No space left on device"):
        link_reused(cfg, str(tmp_path / "A"), 0, "teacher", [(str(other), cfg, {})])
    assert not os.path.lexists(here)


def test_best_teacher_at_round_0_is_the_dense_teacher(mnist_dir, study_args):
    """--teachers dense best where the best-validation teacher round is round 0: one teacher, so
    one distilled student; distill-best links distill-dense (with another best round, both train)."""
    from sparsetrain.experiment import study
    base = study_args(mnist_dir, "--teachers", "dense", "best")
    for best_round in (0, 2):
        out = mnist_dir / f"r{best_round}"
        assert study.main(base + ["--out", str(out), "--phases", "teacher"]) == 0
        (rd,) = out.iterdir()
        best = json.loads((rd / "seed0" / "teacher" / "best.json").read_text())
        rows = read_rows(rd / "seed0" / "teacher" / "metrics.csv")  # (best.json names the is_best row)
        write_csv(str(rd / "seed0" / "teacher" / "metrics.csv"),
                  [{**r, "is_best": int(int(r["round"]) == best_round)} for r in rows], checksum=True)
        write_json(rd / "seed0" / "teacher" / "best.json", {**best, "round": best_round},  # as if validated so
                   checksum=True)  # (a finished phase's results carry checksums)
        assert study.main(base + ["--out", str(out)]) == 0
        linked = os.path.islink(rd / "seed0" / "distill-best")
        assert linked == (best_round == 0)
        if linked:
            assert os.readlink(rd / "seed0" / "distill-best") == "distill-dense"
        else:
            losses = [[r["train_loss"] for r in read_rows(rd / "seed0" / p / "metrics.csv")]
                      for p in ("distill-best", "distill-dense")]
            assert losses[0] != losses[1]  # another teacher, another student
        summary = (rd / "summary.md").read_text()
        assert "distilled from the pruned (best-validation) teacher" in summary


def test_status_says_running_only_once_the_process_started(tmp_path):
    """status.json said "running" for every task submitted to Ray, also those Ray held for resources
    (the progress line counted them right): a submitted task is "submitted" until its experiment
    process has started (the log's .running marker, written by run_experiment)."""
    from types import SimpleNamespace

    from sparsetrain.sweep.runner import _mark_started
    runs = [SimpleNamespace(name=n) for n in ("a", "b")]
    status = {n: {"state": "submitted", "log": str(tmp_path / f"{n}.log")} for n in ("a", "b")}
    assert _mark_started(status, runs) == 0 and [s["state"] for s in status.values()] == ["submitted"] * 2
    (tmp_path / "b.log.running").touch()
    assert _mark_started(status, runs) == 1
    assert status["a"]["state"] == "submitted" and status["b"]["state"] == "running" and "started" in status["b"]
    first = status["b"]["started"]
    assert _mark_started(status, runs) == 1 and status["b"]["started"] == first  # (set once)


def test_a_sweep_start_removes_what_a_killed_sweep_left_half_written(tmp_path, monkeypatch):
    """A sweep killed while writing status.json or its report left their temporary files in its folder, and
    no later sweep removed them (only a run's start recovers its run directory): a sweep's start now finishes
    or removes them under the folder's lock, as a run's start does, and leaves the finished files alone."""
    import subprocess

    from sparsetrain.experiment.files import TMP_TAG
    from sparsetrain.sweep.runner import execute
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # (a pid no process has now: a dead writer's)
    plan = make_plan(_settings(tmp_path, phases=("teacher",), seeds=[0]), str(tmp_path / "sw"), threads=1)
    sweep = tmp_path / "sw" / "s"
    (sweep / "report").mkdir(parents=True)
    left = [sweep / f"status.json.{TMP_TAG}.{child.pid}", sweep / "report" / f"summary.md.{TMP_TAG}.{child.pid}"]
    for f in left:
        f.write_text("half")
    (sweep / "report" / "summary.md").write_text("# a finished report")
    order = _fake_ray(monkeypatch)
    status = execute(plan, str(sweep))
    assert order == [plan[0].name] and status[plan[0].name]["state"] == "done"
    assert not any(f.exists() for f in left) and (sweep / "report" / "summary.md").read_text() == "# a finished report"


def test_a_run_ray_still_held_at_ctrl_c_stays_queued(tmp_path, monkeypatch):
    """Ctrl-C marked every submitted task "interrupted", also one Ray still held for resources whose process
    never started: the report counted its point as failed. Only a run whose process started (its log's
    .running marker) is interrupted now; the held one is queued again, as one not yet submitted."""
    import types

    from sparsetrain.sweep.runner import execute
    plan = make_plan(_settings(tmp_path, phases=("teacher",), seeds=[0, 1]), str(tmp_path / "sw"), threads=1)
    logs = tmp_path / "sw" / "s" / "logs"
    first, held = plan
    calls = []

    class Task:  # (Ray: the first run's process starts, the second waits for a CPU)
        def options(self, **k):
            return self

        def remote(self, argv, log, *a):
            calls.append(log)
            if log == str(logs / f"{first.name}.log"):
                open(log + ".running", "w").close()
            return len(calls)

    def wait(refs, **k):
        if len(calls) == 2 and not hasattr(wait, "done"):
            wait.done = True
            raise KeyboardInterrupt  # (Ctrl-C while both are submitted)
        return refs, []

    def get(ref, timeout=None):
        raise TimeoutError
    ray = types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2},
                                remote=lambda fn: Task(), wait=wait, cancel=lambda ref: None, get=get)
    monkeypatch.setitem(sys.modules, "ray", ray)
    with pytest.raises(KeyboardInterrupt):
        execute(plan, str(tmp_path / "sw" / "s"))
    status = json.loads((tmp_path / "sw" / "s" / "status.json").read_text())
    assert len(calls) == 2 and [status[r.name]["state"] for r in plan] == ["interrupted", "queued"]


def test_a_status_json_that_cannot_be_written_cancels_the_running_runs(tmp_path, monkeypatch, capsys):
    """status.json that could not be written partway (a full disk) stopped the sweep with its one line, but
    the runs Ray was running went on unwatched until Ray shut down. They are cancelled now, as Ctrl-C's are
    (their processes stop, keeping their last completed epoch), so the next sweep resumes them."""
    import types

    from sparsetrain.experiment import files
    from sparsetrain.sweep.runner import SweepError, execute
    plan = make_plan(_settings(tmp_path, phases=("teacher",), seeds=[0, 1]), str(tmp_path / "sw"), threads=1)
    status_file = tmp_path / "sw" / "s" / "status.json"
    submitted, cancelled, real = [], [], files._atomic_write

    class Task:  # (Ray: both runs start and keep running)
        def options(self, **k):
            return self

        def remote(self, argv, log, *a):
            open(log + ".running", "w").close()  # (its process started)
            submitted.append(len(submitted) + 1)
            return submitted[-1]

    def full(path, *a, **k):  # (the disk fills once the runs are submitted)
        if submitted:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *a, **k)

    def get(ref, timeout=None):
        raise TimeoutError  # (cancelled: no result)
    ray = types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2},
                                remote=lambda fn: Task(), wait=lambda refs, **k: ([], refs),
                                cancel=lambda ref, force=False: None if force else cancelled.append(ref), get=get)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(files, "_atomic_write", full)
    with pytest.raises(SweepError, match=f"cannot write {status_file}: No space left on device"):
        execute(plan, str(tmp_path / "sw" / "s"))
    assert submitted == [1, 2] and sorted(cancelled) == submitted  # (each running run stopped)
    assert "stopping 2 running run(s)" in capsys.readouterr().err
    # (status.json: the last one written, intact; a run that was running is resumed by the next sweep)
    assert [s["state"] for s in json.loads(status_file.read_text()).values()] == ["queued", "queued"]


def test_a_second_ctrl_c_during_the_cancel_still_stops_the_run_s_process(tmp_path, monkeypatch):
    """A second Ctrl-C (or SIGTERM) while the sweep waited CANCEL_GRACE_S for its cancelled tasks skipped their
    forced cancel and the stop of their processes: only status.json was written, the experiments trained on. Now
    it cuts the wait short and the process the run's `.running` marker names is stopped at once; the run is
    interrupted."""
    import types

    from sparsetrain.sweep.runlog import name_process
    from sparsetrain.sweep.runner import execute
    plan = make_plan(_settings(tmp_path, phases=("teacher",), seeds=[0]), str(tmp_path / "sw"), threads=1)
    procs, forced, waits = [], [], []

    class Task:  # (Ray: the run's process starts and never heeds the cancel)
        def options(self, **k):
            return self

        def remote(self, argv, log, *a):
            procs.append(subprocess.Popen(["sleep", "60"]))
            name_process(log + ".running", procs[-1].pid)
            return 1

    def wait(refs, **k):
        waits.append(k.get("timeout"))
        if len(waits) == 1:
            raise KeyboardInterrupt  # (the first Ctrl-C, in the sweep's loop)
        if len(waits) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # (the second, while the sweep waits for the cancel)
        return [], refs

    def get(ref, timeout=None):
        raise TimeoutError
    ray = types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2},
                                remote=lambda fn: Task(), wait=wait, get=get,
                                cancel=lambda ref, force=False: forced.append(ref) if force else None)
    monkeypatch.setitem(sys.modules, "ray", ray)
    t0 = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(plan, str(tmp_path / "sw" / "s"))
        took = time.time() - t0
        assert procs[0].wait(timeout=1) == -signal.SIGTERM and forced == [1] and took < 8, (took, waits)
    finally:
        procs[0].kill()
    status = json.loads((tmp_path / "sw" / "s" / "status.json").read_text())
    assert status[plan[0].name]["state"] == "interrupted"
    assert open(status[plan[0].name]["log"]).read().splitlines()[-1].startswith("=== cancelled after")


_SPAWNS = """import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "60"])  # (as torchrun's workers, a DataLoader's)
open(sys.argv[1] + ".tmp", "w").write(str(child.pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def _child_of(pidfile) -> int:
    """The pid the _SPAWNS script wrote in `pidfile` once its child started (within 20 s)."""
    end = time.time() + 20
    while not pidfile.exists() and time.time() < end:
        time.sleep(0.02)
    return int(pidfile.read_text())


def test_a_stopped_run_s_children_are_stopped_with_it(tmp_path, monkeypatch):
    """A run's experiment was not in a process group of its own: its worker's cancel and the sweep's forced stop
    signalled its process alone, and its children (torchrun's workers, DataLoader workers) ran on. The run now
    starts in its own session and both stop its whole group (SIGTERM, then SIGKILL after a bound)."""
    from sparsetrain.experiment.seed_status import process_running
    from sparsetrain.sweep import runner
    from sparsetrain.sweep.runlog import name_process, stop_process
    script, pidfile, log = tmp_path / "spawns.py", tmp_path / "child", tmp_path / "logs" / "r.log"
    script.write_text(_SPAWNS)

    class Cancelled(subprocess.Popen):  # (the sweep's cancel lands once the run's child started)
        def wait(self, timeout=None):
            if timeout == 0.5:
                _child_of(pidfile)
                raise KeyboardInterrupt
            return super().wait(timeout)
    monkeypatch.setattr(runner.subprocess, "Popen", Cancelled)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment([str(pidfile)], str(log), 1, str(tmp_path), str(script))
    child = _child_of(pidfile)
    try:
        assert not process_running(child) and log.read_text().splitlines()[-1].startswith("=== cancelled after")
    finally:
        os.kill(child, signal.SIGKILL) if process_running(child) else None
    monkeypatch.undo()
    pidfile.unlink()  # the sweep's forced stop of a run whose task did not stop (the marker names its process)
    run = subprocess.Popen([sys.executable, str(script), str(pidfile)], start_new_session=True)
    child = _child_of(pidfile)
    name_process(str(log) + ".running", run.pid)
    try:
        stop_process(str(log))
        assert run.wait(timeout=1) == -signal.SIGTERM and not process_running(child)
    finally:
        run.kill()
        os.kill(child, signal.SIGKILL) if process_running(child) else None


def test_the_sweep_never_signals_a_process_that_reused_a_run_s_pid(tmp_path):
    """The sweep's forced stop trusted the `.running` marker's pid by its host alone: a pid the system had given
    to another process since was signalled. The marker now records the process's start (clock ticks since boot,
    /proc/<pid>/stat) and a live process of that pid that started at another time is left alone; one that
    matches (the reference) is stopped."""
    import socket

    from sparsetrain.experiment.seed_status import process_running, start_ticks
    from sparsetrain.sweep.runlog import name_process, stop_process
    log, marker = tmp_path / "r.log", tmp_path / "r.log.running"
    other = subprocess.Popen(["sleep", "60"])  # (an unrelated process, now holding the run's pid)
    try:
        marker.write_text(f"{other.pid} {socket.gethostname()} {start_ticks(other.pid) - 1}\n")
        stop_process(str(log))
        assert process_running(other.pid) and other.poll() is None and not marker.exists()
        name_process(str(marker), other.pid)  # (the run's own process: its start matches)
        assert marker.read_text().split()[2] == str(start_ticks(other.pid))
        stop_process(str(log))
        assert other.wait(timeout=1) == -signal.SIGTERM and not marker.exists()
    finally:
        other.kill()



def test_a_run_killed_with_its_worker_ends_its_log_cancelled(tmp_path):
    """Ray's forced cancel kills the experiment with its worker (SIGKILL), and the worker, still running, could end
    the log "=== exit code -9 after 11 s" and remove the marker, so the sweep's stop found no marker and the log of a
    run the sweep stopped said it was killed (seen under load in test_sigterm_stops_the_run_whose_cancel_is_lost).
    The stop now ends such a log "cancelled" after that line, and a worker whose run's log the stop has ended adds no
    exit line (each writes its line under the log's lock). A log ending another way is left as it is."""
    from sparsetrain.sweep import runner
    from sparsetrain.sweep.runlog import stop_process
    for last, cancelled in (("=== exit code -9 after 11 s", True), ("=== exit code 0 after 3 s", False),
                            ("=== exit code 1 after 3 s", False), ("=== cancelled after 4 s (the sweep...)", False)):
        log = tmp_path / "r.log"
        log.write_text(f"=== 2026-12-08 python -m sparsetrain.experiment\nround 0\n{last}\n")
        stop_process(str(log), grace=0.5)
        lines = log.read_text().splitlines()
        assert lines[-2:] == ([last, "=== cancelled after 11 s (the sweep was stopped; its re-run resumes)"]
                              if cancelled else ["round 0", last]), (last, lines)
    script = tmp_path / "swept.py"  # (its log ended "cancelled", as the sweep's stop does, then killed)
    script.write_text("import os, signal, sys\nfrom sparsetrain.sweep.runlog import cancelled_line\n"
                      "open(sys.argv[1], 'a').write(cancelled_line(1))\nos.kill(os.getpid(), signal.SIGKILL)\n")
    log = tmp_path / "w.log"
    with pytest.raises(runner.RunFailed, match="exit code -9"):
        runner.run_experiment([str(log)], str(log), 1, str(tmp_path), str(script))
    assert log.read_text().splitlines()[-1].startswith("=== cancelled after 1 s")
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")  # (killed, its marker there)
    with pytest.raises(runner.RunFailed, match="exit code -9"):
        runner.run_experiment([], str(log), 1, str(tmp_path), str(script))
    assert log.read_text().splitlines()[-1].startswith("=== exit code -9 after")


def _deaf(n: int) -> list:
    """`n` processes that ignore SIGTERM from their start (each in a session of its own, as a run's experiment): the
    ignore set before the exec, which keeps it (a shell's trap, set once it ran, raced a loaded machine's signal)."""
    deaf = lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)  # noqa: E731
    return [subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=deaf) for _ in range(n)]


def test_the_sweep_s_late_runs_are_stopped_together_within_one_bound(tmp_path):
    """The sweep's forced stop took its late runs one at a time (SIGTERM, SIGKILL `grace` s later, for each), so with
    N runs that ignore SIGTERM the sweep took N x 2 x `grace` s to exit after Ctrl-C (N x 10 s: past a scheduler's
    patience). All of them are signalled first now and waited for once: about one `grace` whatever N; each log
    still ends cancelled and its marker is removed."""
    import types

    from sparsetrain.experiment.seed_status import process_running
    from sparsetrain.sweep.cancel import cancel_runs
    from sparsetrain.sweep.runlog import name_process
    runs, logs = _deaf(4), {}
    try:
        for i, run in enumerate(runs):
            logs[i] = str(tmp_path / f"r{i}.log")
            name_process(logs[i] + ".running", run.pid)
        ray = types.SimpleNamespace(cancel=lambda ref, force=False: None, wait=lambda refs, **k: ([], refs))
        t0 = time.time()
        cancel_runs(ray, logs, 0, stop_grace=1.0)
        took = time.time() - t0  # (one at a time: 4 x 1 s and more)
        assert [run.wait(timeout=1) for run in runs] == [-signal.SIGKILL] * 4 and 1.0 <= took < 2.5, took
        assert not any(process_running(run.pid) for run in runs)
        for log in logs.values():
            assert open(log).read().splitlines()[-1].startswith("=== cancelled after")
            assert not os.path.exists(log + ".running")
    finally:
        for run in runs:
            run.kill()



_DEAF_SPAWNS = """import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a torchrun slow on SIGTERM; its child inherits the ignore)
child = subprocess.Popen(["sleep", "60"], start_new_session=True)  # (as torchrun's ranks)
open(sys.argv[1] + ".tmp", "w").write(str(child.pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def test_a_stopped_run_s_whole_process_tree_is_stopped(tmp_path):
    """torchrun starts its ranks in sessions of their own: the stop of a run's process group reached torchrun but not
    them, and where torchrun needed the SIGKILL (it ignored the SIGTERM) its ranks ran on, orphaned. The stop now
    collects the run's descendants (by parent pid) before each signal and signals and waits for them too: after the
    sweep's forced stop (stop_process) and a worker's cancel (stop_group), the run and its child are both gone."""
    from sparsetrain.experiment.seed_status import process_running
    from sparsetrain.sweep.runlog import name_process, stop_group, stop_process
    script, log = tmp_path / "deaf.py", tmp_path / "logs" / "r.log"
    script.write_text(_DEAF_SPAWNS)
    log.parent.mkdir()
    for i, stop in enumerate((lambda run: stop_process(str(log), grace=0.5), lambda run: stop_group(run.pid, 0.5))):
        pidfile = tmp_path / f"child{i}"
        run = subprocess.Popen([sys.executable, str(script), str(pidfile)], start_new_session=True)
        child = _child_of(pidfile)
        name_process(str(log) + ".running", run.pid)
        try:
            t0 = time.time()
            stop(run)
            assert run.wait(timeout=1) == -signal.SIGKILL and not process_running(child), time.time() - t0
            assert time.time() - t0 < 3  # (SIGKILL 0.5 s after the SIGTERM, then the wait for the tree: bounded)
        finally:
            run.kill()
            os.kill(child, signal.SIGKILL) if process_running(child) else None
    assert log.read_text().splitlines()[-1].startswith("=== cancelled after")


def _fake_ray(monkeypatch) -> list:
    """A stand-in for Ray in which every submitted run finishes at the next wait, and the runner's sleep (nothing
    running, nothing startable: the loop would wait forever) fails; returns the list of run names submitted."""
    import types

    from sparsetrain.sweep import runner
    order = []

    class Task:
        def options(self, **k):
            return self

        def remote(self, argv, log, *a):
            order.append(os.path.basename(log)[:-len(".log")])
            return len(order)

    def sleep(s):
        raise AssertionError(f"runs wait for each other; submitted: {order}")
    ray = types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2},
                                remote=lambda fn: Task(), wait=lambda refs, **k: (refs[:1], refs[1:]),
                                cancel=lambda ref: None, get=lambda ref, timeout=None: (1, ""))
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(runner.time, "sleep", sleep)
    return order


def test_studies_that_each_hold_a_finished_phase_the_other_links_do_not_wait_for_each_other(tmp_path, monkeypatch):
    """teachers (dense) partly run (its vanilla finished), then a variant (dense best) before it: each owns a
    phase the other links (the vanilla finished, distill-dense to train). A dependency whose linked phases
    are finished serves a run whatever its state, so they run one after the other instead of both waiting."""
    from sparsetrain.sweep import runner
    base = _settings(tmp_path, student=["vgg_d1g1"], seeds=[0])
    _, part = make_plan({**base, "teachers": ("dense",)}, str(tmp_path / "sw"), threads=1)
    write_json(os.path.join(part.run_dir, "seed0", "vanilla", "best.json"), {"round": 1})
    teacher, both, one = make_plan({**base, "variants": [{"teachers": ("dense", "best")}, {"teachers": ("dense",)}]},
                                   str(tmp_path / "sw"), threads=1)
    assert one.name == part.name and both.needs[one.name] == ["vanilla"] and one.needs[both.name] == ["distill-dense"]
    order = _fake_ray(monkeypatch)
    status = runner.execute([teacher, both, one], str(tmp_path / "sw" / "s"))
    assert order == [teacher.name, both.name, one.name] and {s["state"] for s in status.values()} == {"done"}


def test_studies_that_each_need_a_phase_the_other_started_do_not_wait_for_each_other(tmp_path, monkeypatch):
    """A study owns a phase it part-trained (it resumes it; others wait for it and link it). teachers (best
    dense) stopped in distill-best, then a point before it (dense best, no vanilla): the earlier waits for its
    distill-best, and it trains distill-dense itself (linking it would hide its own distill-best with the
    earlier's link). Three studies whose waits would close a circle (the first for the third's distill-best,
    the third for the second's vanilla, the second for the first's distill-dense): the last planned trains the
    phase itself, and the second (its first to need it, nothing of it held) links it from there, so the runs
    start one after the other instead of waiting forever, and the vanilla trains once."""
    from sparsetrain.sweep import runner
    base = _settings(tmp_path, student=["vgg_d1g1"], seeds=[0])
    no_vanilla = {"teachers": ("dense", "best"), "phases": ("teacher", "distill")}
    grid = {**base, "variants": [no_vanilla, {"teachers": ("best", "dense")}]}
    teacher, first, later = make_plan(grid, str(tmp_path / "sw"), threads=1)
    write_json(os.path.join(later.run_dir, "seed0", "vanilla", "best.json"), {"round": 1})
    os.makedirs(os.path.join(later.run_dir, "seed0", "distill-best", "ckpt"))  # (part-trained: no best.json)
    _, a, b = make_plan(grid, str(tmp_path / "sw"), threads=1)
    # (it trained both distillations and the later one's link was refused, PhaseMissing, before 2026-12-06)
    assert (a.name, b.name) == (first.name, later.name) and b.needs == {teacher.name: ["teacher"]}
    # (and the earlier links distill-dense from it: the earlier, which only needed it first, trained it too (where
    # it ran first; else linked it at run time) before 2026-12-06)
    assert a.needs == {b.name: ["distill-best", "distill-dense"], teacher.name: ["teacher"]}
    variants = [no_vanilla, {"teachers": ("dense",)}, {"teachers": ("best",)}]
    teacher, first, second, third = [make_plan({**base, **v}, str(tmp_path / "sw2"), threads=1)[i]
                                     for i, v in ((0, variants[0]), (1, variants[0]), (1, variants[1]), (1, variants[2]))]
    grid = {**base, "variants": variants}
    # the third's vanilla a link whose run was removed (nothing of its own), its distill-best part-trained
    os.makedirs(os.path.join(third.run_dir, "seed0", "distill-best", "ckpt"))
    os.symlink(str(tmp_path / "gone" / "seed0" / "vanilla"), os.path.join(third.run_dir, "seed0", "vanilla"))
    plan = make_plan(grid, str(tmp_path / "sw2"), threads=1)
    assert [r.name for r in plan] == [teacher.name, first.name, second.name, third.name]
    assert plan[1].needs == {third.name: ["distill-best"], teacher.name: ["teacher"]}
    # (the third trains the vanilla (from the second: a circle), which the second links from it: the second, its
    # first to need it, trained it again before 2026-12-06)
    assert plan[2].needs == {first.name: ["distill-dense"], teacher.name: ["teacher"], third.name: ["vanilla"]}
    assert plan[3].needs == {teacher.name: ["teacher"]}
    order = _fake_ray(monkeypatch)
    status = runner.execute(plan, str(tmp_path / "sw2" / "s"))
    assert order == [teacher.name, third.name, first.name, second.name]
    assert {s["state"] for s in status.values()} == {"done"}


def test_a_study_listed_before_the_teacher_run_it_is_part_of_links_its_distillation(tmp_path, monkeypatch):
    """Without a separate student model, --teachers (dense,) listed before (dense, best): the larger study is the
    teacher run, which the smaller waits for; the smaller owned distill-dense (the first to need it) and the larger,
    whose wait for it would close a circle, trained it too: the smaller, served once the teacher phase finished
    while the larger went on, ran beside it and both trained distill-dense. Now the smaller links it from the
    larger, as in the other order (the reference), and starts once that one has finished."""
    from sparsetrain.sweep import runner
    base = _settings(tmp_path, seeds=[0])
    ref = make_plan({**base, "teachers": [("dense", "best"), ("dense",)]}, str(tmp_path / "sw"), threads=1)
    plan = make_plan({**base, "teachers": [("dense",), ("dense", "best")]}, str(tmp_path / "sw"), threads=1)
    shown = lambda plan: {r.point["teachers"]: (r.phases, r.needs, r.argv) for r in plan}  # noqa: E731
    assert shown(plan) == shown(ref)
    one, both = sorted(plan, key=lambda r: len(r.phases))
    order, trains, ends = _fake_ray(monkeypatch), [], []
    ray, by_name = sys.modules["ray"], {r.name: r for r in plan}
    task, wait = ray.remote(None), ray.wait
    submit = task.remote
    done = lambda r, ph: os.path.join(r.run_dir, "seed0", ph, "best.json")  # noqa: E731

    def start(argv, log, *a):  # as the experiment: it links each phase finished in its --reuse runs, trains the rest
        ref = submit(argv, log, *a)
        run = by_name[order[-1]]
        ours = [ph for ph in run.phases if not any(ph in v and os.path.isfile(done(by_name[d], ph))
                                                    for d, v in run.needs.items())]
        trains.extend((run.name, ph) for ph in ours)
        if "teacher" in ours:  # (its first phase: finished while the run goes on)
            write_json(done(run, "teacher"), {"round": 1})
        return ref

    def end(refs, **k):  # (the run ends: every phase it trained finished)
        got = wait(refs, **k)
        ends.append(order[got[0][0] - 1])
        for name, ph in trains:
            if name == ends[-1]:
                write_json(done(by_name[name], ph), {"round": 1})
        return got
    task.remote, ray.remote, ray.wait = start, lambda fn: task, end
    status = runner.execute(plan, str(tmp_path / "sw" / "s"))
    assert {s["state"] for s in status.values()} == {"done"} and order == [both.name, one.name] == ends
    assert sorted(trains) == sorted((both.name, ph) for ph in both.phases)  # (every phase once)


# ---------------------------------------------------------------------------- on a local Ray
@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny grid (alpha 0.5 / 0.8 / 1.5 (invalid) x seeds 0 / 1) run once on a local Ray."""
    root = tmp_path_factory.mktemp("sweep")
    write_mnist(root / "data" / "mnist", gz=False, n_train=80, n_test=20)
    argv = _tiny(root, "--alpha", "0.5", "0.8", "1.5", "--seeds", "0", "1")
    rc = cli.main(argv)
    (sweep_dir,) = [root / "sweeps" / d for d in os.listdir(root / "sweeps") if d.startswith("grid-")]
    yield root, argv, rc, sweep_dir
    import ray
    ray.shutdown()


def test_sweep_runs_every_point_and_reports_the_failed_one(swept):
    root, _, rc, sweep_dir = swept
    status = json.loads((sweep_dir / "status.json").read_text())
    states = sorted(s["state"] for s in status.values())
    assert rc == 1 and states == ["done"] * 6 + ["failed"] * 2  # 2 teachers + 4 students; alpha 1.5 x 2 seeds
    for s in status.values():
        if s["state"] == "failed":
            assert "--alpha must be in [0, 1]" in s["error"] and "--alpha" in open(s["log"]).read()


def test_sweep_trains_the_teacher_once_for_its_students(swept):
    _, _, _, sweep_dir = swept
    status = json.loads((sweep_dir / "status.json").read_text())
    teachers = {n: s for n, s in status.items() if s["kind"] == "teacher"}
    for s in teachers.values():  # one attempt, one experiment process
        assert open(s["log"]).read().count("python -m sparsetrain.experiment") == 1
    students = [s for s in status.values() if s["kind"] == "study" and s["state"] == "done"]
    for s in students:
        for seed_dir in (d for d in os.listdir(s["run_dir"]) if d.startswith("seed")):
            link = os.path.join(s["run_dir"], seed_dir, "teacher")
            assert os.path.islink(link)
            assert os.path.dirname(os.path.dirname(os.path.realpath(link))) in [t["run_dir"] for t in teachers.values()]
    by_teacher = {}
    for s in students:
        by_teacher.setdefault(tuple(s["deps"]), []).append(s)
    assert sorted(len(v) for v in by_teacher.values()) == [2, 2]  # each teacher served both alphas


def test_sweep_report_has_one_row_per_point_with_mean_and_std(swept):
    _, _, _, sweep_dir = swept
    status = json.loads((sweep_dir / "status.json").read_text())
    with open(sweep_dir / "report" / "table1.csv") as f:
        table = [r for r in csv.DictReader(f) if r["phase"] == "distill-dense" and r["stop_rule"] == "none"]
    assert sorted(float(r["alpha"]) for r in table) == [0.5, 0.8]
    for row in table:
        accs = []
        for s in status.values():
            if s["kind"] == "study" and s["state"] == "done":
                cfg = json.load(open(os.path.join(s["run_dir"], "config.json")))
                if cfg["alpha"] == float(row["alpha"]):
                    (seed,) = cfg["seeds"]
                    accs.append(_best_test(read_rows(os.path.join(s["run_dir"], f"seed{seed}", "distill-dense",
                                                                  "metrics.csv"))))
        assert len(accs) == 2 and row["seeds"] == "2"
        assert float(row["test_mean"]) == pytest.approx(np.mean(accs))
        assert float(row["test_std"]) == pytest.approx(np.std(accs, ddof=1))
    md = (sweep_dir / "report" / "summary.md").read_text()
    assert "α × τ" in md and "alpha=0.5" in md and (sweep_dir / "report" / "accuracy_vs_sparsity.png").stat().st_size
    # `report` on the runs folder (the studies and their teacher runs): the teacher runs are not
    # settings of their own, so the same rows come out
    root = sweep_dir.parent
    assert cli.main(["report", str(root / "runs"), "--out", str(root / "runs-report")]) == 0
    with open(root / "runs-report" / "table1.csv") as f:
        again = [r for r in csv.DictReader(f) if r["phase"] == "distill-dense" and r["stop_rule"] == "none"]
    assert sorted(float(r["alpha"]) for r in again) == [0.5, 0.8] and len(again) == len(table)
    rows = [list(csv.DictReader(open(d / "table1.csv"))) for d in (sweep_dir / "report", root / "runs-report")]
    # (each teacher run was a group of its own, its vanilla curve twice); the sweep's own report also has
    # the rejected point alpha=1.5 (its plan knows it), one row of no result with both seeds failed
    assert len(rows[1]) == len(rows[0]) - 1
    assert [(r["alpha"], r["run"], r["seeds"], r["seeds_started"], r["failed_seeds"]) for r in rows[0][-1:]] == [
        ("1.5", "(no result)", "0", "2", "0 1")]


def test_rerunning_a_finished_sweep_changes_nothing(swept):
    root, argv, _, sweep_dir = swept
    before = _tree(root / "sweeps" / "runs")
    assert cli.main(argv) == 1  # (the invalid point is still reported)
    status = json.loads((sweep_dir / "status.json").read_text())
    assert sorted(s["state"] for s in status.values()) == ["failed"] * 2 + ["skipped"] * 6
    assert _tree(root / "sweeps" / "runs") == before


def test_a_run_failing_at_run_time_is_reported_and_not_retried(swept):
    """A teacher checkpoint of another dataset's classes (readable: the plan takes it; the run's data
    refuses it): the experiment exits 2 (a usage error: no retry); the teacher run it shares with the
    first sweep is reused."""
    from sparsetrain.experiment.checkpoint import save_model
    from sparsetrain.experiment.models import build_model
    root, _, _, _ = swept
    arch = dict(name="lenet300", image_size=28, num_classes=100, in_channels=1)
    save_model(str(root / "foreign.pt"), build_model(**arch), {}, arch)
    rc = cli.main(_tiny(root, "--alpha", "0.5", "--seeds", "0", "--teachers", str(root / "foreign.pt"),
                        "--out", str(root / "sweeps")))
    (sweep_dir,) = [root / "sweeps" / d for d in os.listdir(root / "sweeps")
                    if d.startswith("grid-") and "foreign.pt" in (root / "sweeps" / d / "plan.json").read_text()]
    status = json.loads((sweep_dir / "status.json").read_text())
    (failed,) = [s for s in status.values() if s["state"] == "failed"]
    assert rc == 1 and "exit code 2: --teachers" in failed["error"]  # (the run's one line: it was in the log only)
    assert "gives 100 outputs per image, mnist has 10" in failed["error"]
    log = open(failed["log"]).read()
    assert log.count("python -m sparsetrain.experiment") == 1 and "gives 100 outputs per image, mnist has 10" in log
    assert [s["state"] for s in status.values() if s["kind"] == "teacher"] == ["skipped"]


def test_a_run_not_started_for_a_failed_dependency_points_to_that_log(swept, tmp_path):
    """It has no log of its own: its status (and the sweep's 'failed:' line) named one never written."""
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import execute
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('no data here')\nsys.exit(2)\n")
    first = Run("a", "teacher", str(tmp_path / "runs" / "a"), [], seed=0, phases=["teacher"], program=str(script))
    then = Run("b", "study", str(tmp_path / "runs" / "b"), [], deps=["a"], seed=0, phases=["vanilla"],
               program=str(script))
    status = execute([first, then], str(tmp_path / "sw"), retries=0)
    assert status["b"]["state"] == "failed" and status["b"]["error"] == "not run: a failed"
    assert status["b"]["log"] == status["a"]["log"] and "no data here" in open(status["b"]["log"]).read()


def test_a_failed_dependency_that_finished_what_a_run_links_does_not_stop_it(swept, tmp_path):
    """The alpha x tau grid: the first study trains the vanilla student the others link. Its
    distillation failing (diverged, exit 2) marked every other point "not run", though the vanilla
    phase they need had finished: they now run; one needing an unfinished phase of it is not run."""
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import execute
    first = tmp_path / "runs" / "first"
    fails = tmp_path / "fails.py"  # finishes its vanilla phase (best.json), then fails
    fails.write_text("import os, sys\nd = os.path.join(sys.argv[1], 'seed0', 'vanilla')\nos.makedirs(d, exist_ok=True)\n"
                     "open(os.path.join(d, 'best.json'), 'w').write('{}')\nsys.exit(2)\n")
    ok = tmp_path / "ok.py"
    ok.write_text("")
    a = Run("a", "study", str(first), [str(first)], seed=0, phases=["vanilla", "distill-dense"], program=str(fails))
    b = Run("b", "study", str(tmp_path / "runs" / "b"), [], deps=["a"], seed=0, phases=["never"], program=str(ok),
            needs={"a": ["vanilla"]})
    c = Run("c", "study", str(tmp_path / "runs" / "c"), [], deps=["a"], seed=0, phases=["never"], program=str(ok),
            needs={"a": ["vanilla", "distill-dense"]})
    status = execute([a, b, c], str(tmp_path / "sw"), retries=0)
    assert status["a"]["state"] == "failed" and "exit code 2" in status["a"]["error"], status
    assert status["b"]["state"] == "done", status
    assert status["c"]["state"] == "failed" and status["c"]["error"] == "not run: a failed", status


def test_a_missing_or_unreadable_teacher_path_is_an_invalid_point(tmp_path):
    """A --teachers PATH that does not exist or is no checkpoint failed only in its study run, after
    the sweep had trained the point's teacher run: the plan refuses the point (each file read once)."""
    (tmp_path / "junk.pt").write_bytes(b"x")
    plan = make_plan(_settings(tmp_path, teachers=[(str(tmp_path / "missing.pt"),), (str(tmp_path / "junk.pt"),),
                                                   ("dense",)], seeds=[0, 1]), str(tmp_path / "sw"), threads=1)
    bad = [r.error for r in plan if r.error]
    assert len(bad) == 4 and sum("missing.pt: no such file" in e for e in bad) == 2, bad
    assert sum("junk.pt" in e for e in bad) == 2
    assert sorted(r.kind for r in plan if not r.error) == ["study", "study", "teacher", "teacher"]


def test_a_failed_run_is_retried_and_reported(swept, tmp_path):
    """A run failing with exit 1 (a crash, not a usage error) is retried by Ray (--retries 1): a run
    that fails once then succeeds finishes; with --retries 0 it is reported failed with its log."""
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import execute
    script = tmp_path / "flaky.py"  # fails the first time (no marker yet), succeeds after
    script.write_text("import os, sys\nm = sys.argv[1]\nif not os.path.exists(m):\n"
                      "    open(m, 'w').close()\n    sys.exit(1)\n")
    for retries, want in ((1, "done"), (0, "failed")):
        run = Run(f"flaky{retries}", "study", str(tmp_path / f"r{retries}"), [str(tmp_path / f"m{retries}")],
                  phases=["never"], program=str(script))
        status = execute([run], str(tmp_path / f"sw{retries}"), retries=retries)[run.name]
        log = open(status["log"]).read()
        assert status["state"] == want and log.count("=== exit code 1") == 1, (status, log)
        assert log.count("flaky.py") == (2 if retries else 1)
        if want == "failed":
            assert "exit code 1" in status["error"] and status["log"] in status["error"]


def test_a_crashed_run_is_reported_with_its_exception(swept, tmp_path):
    """A run that crashes (a traceback, exit 1) or is killed (SIGKILL: the OOM killer) was reported
    "exit code 1 (see LOG)" alone before 2026-12-06; now with its exception line or its signal."""
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import execute
    crash = tmp_path / "crash.py"
    crash.write_text("print('[teacher seed 0] round 0 ...')\ntry:\n    {}['x']\nexcept KeyError:\n"
                     "    raise RuntimeError('CUDA out of memory.\\nTried to allocate 2 GiB')\n")
    killed = tmp_path / "killed.py"
    killed.write_text("import os, signal\nprint('Traceback (most recent call last): quoted', flush=True)\n"
                      "os.kill(os.getpid(), signal.SIGKILL)\n")
    runs = [Run(p.stem, "study", str(tmp_path / p.stem), [], phases=["never"], program=str(p)) for p in (crash, killed)]
    status = execute(runs, str(tmp_path / "sw"), retries=0)
    assert status["crash"]["state"] == "failed" and status["crash"]["error"] == (
        f"RunFailed: exit code 1: RuntimeError: CUDA out of memory. (see {status['crash']['log']})")
    assert status["killed"]["error"] == f"RunFailed: exit code -9 (SIGKILL) (see {status['killed']['log']})"


_HOLDER = ("import os, sys, time\nfrom sparsetrain.experiment.files import folder_lock\nwith folder_lock(sys.argv[1]):\n"
           " print('held', flush=True)\n time.sleep(3)\n os.makedirs(sys.argv[1] + '/seed0/teacher')\n"
           " open(sys.argv[1] + '/seed0/teacher/best.json', 'w').write('{}')\n"
           " open(sys.argv[1] + '/summary.md', 'w').write('done')")  # a run another process finishes


def test_a_run_another_sweep_is_running_is_waited_for(swept, tmp_path):
    """Two sweeps sharing --out: a run the other one is training (its lock held) waits, and is
    skipped once the other finished it (it used to fail 'in use', with every study needing it)."""
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import execute
    rd = tmp_path / "runs" / "t"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(rd)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    script = tmp_path / "never.py"
    script.write_text("import sys\nsys.exit(3)\n")  # (would fail if it ran)
    run = Run("t", "teacher", str(rd), [], seed=0, phases=["teacher"], program=str(script))
    status = execute([run], str(tmp_path / "sw"))["t"]
    holder.wait()
    assert status["state"] == "skipped", status


def test_a_run_taken_between_the_check_and_its_start_is_waited_for(swept, tmp_path):
    """The experiment finds its run directory locked (another sweep took it after this one checked:
    exit EXIT_BUSY): the run waits for that process and is skipped once it finished the run, instead
    of failing as a usage error; an exit EXIT_BUSY with no holder is a failure like any other."""
    from sparsetrain.experiment.files import EXIT_BUSY
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import execute
    rd = tmp_path / "runs" / "t"
    script = tmp_path / "taken.py"  # another process takes the run, then this one finds it busy
    script.write_text(f"""import subprocess, sys
holder = subprocess.Popen([sys.executable, "-c", {_HOLDER!r}, sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline().strip() == "held"
sys.exit({EXIT_BUSY})
""")
    run = Run("t", "teacher", str(rd), [str(rd)], seed=0, phases=["teacher"], program=str(script))
    status = execute([run], str(tmp_path / "sw"), retries=0)["t"]
    log = open(status["log"]).read()
    assert status["state"] == "skipped" and status.get("finished_elsewhere"), (status, log)
    assert log.count(f"=== exit code {EXIT_BUSY}") == 1, log
    lone = tmp_path / "lone.py"
    lone.write_text(f"import sys\nsys.exit({EXIT_BUSY})\n")
    run = Run("u", "teacher", str(tmp_path / "runs" / "u"), [], seed=0, phases=["teacher"], program=str(lone))
    status = execute([run], str(tmp_path / "sw2"), retries=0)["u"]
    assert status["state"] == "failed" and f"exit code {EXIT_BUSY}" in status["error"], status


_STOPPED_SWEEP = r"""
import sys
from sparsetrain.sweep.plan import Run
from sparsetrain.sweep.runner import execute
run = Run("tick", "study", sys.argv[1] + "/run", [sys.argv[1] + "/ticks"], phases=["never"], program=sys.argv[2])
execute([run], sys.argv[1] + "/sw")
"""


def _sigterm_ticking_sweep(tmp_path, script: str, timeout: float):
    """A sweep (`script`: _STOPPED_SWEEP or a variant) of one run ticking into tmp_path/ticks every 0.2 s for
    60 s, sent SIGTERM once 2 ticks are there: (seconds from SIGTERM to the sweep's exit, its output, the ticks
    seen at its exit, whether more came 0.6 s later (3 missed ticks), its status.json)."""
    ticker = tmp_path / "ticker.py"
    ticker.write_text("import sys, time\nfor i in range(300):\n"
                      "    open(sys.argv[1], 'a').write('.')\n    time.sleep(0.2)\n")
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(ticker)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ticks = tmp_path / "ticks"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (ticks.exists() and len(ticks.read_text()) >= 2):
            time.sleep(0.2)
        assert ticks.exists(), p.communicate(timeout=30)[0]
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=timeout)
        took = time.time() - t0
    finally:
        p.kill()
    seen = len(ticks.read_text())
    time.sleep(0.6)
    return took, out, seen, len(ticks.read_text()) != seen, json.loads((tmp_path / "sw" / "status.json").read_text())


def test_sigterm_stops_the_running_experiment_at_once(tmp_path):
    """SIGTERM to the sweep (a scheduler's preemption; Ctrl-C takes the same path): the running
    experiment process is stopped within a second or so (it used to train on for up to 90 s), the
    sweep exits, and status.json says the run was interrupted."""
    took, out, seen, ticking, status = _sigterm_ticking_sweep(tmp_path, _STOPPED_SWEEP, timeout=60)
    assert not ticking and seen < 100, (seen, out)  # the experiment is stopped (< 20 s of ticks)
    assert took < 30, (took, out)
    assert status["tick"]["state"] == "interrupted", (status, out)
    assert "=== cancelled after" in open(status["tick"]["log"]).read().splitlines()[-1]  # (why the log stops)


_LOST_CANCEL_SWEEP = _STOPPED_SWEEP.replace("execute([run]", """import ray
real = ray.cancel
ray.cancel = lambda ref, force=False: real(ref, force=True) if force else None  # (the first cancel is lost)
execute([run]""")


def test_sigterm_stops_the_run_whose_cancel_is_lost(tmp_path):
    """SIGTERM while Ray does not deliver the running task's cancel (seen once under heavy load: the sweep
    sat in ray.wait for 90 s, past the scheduler's patience): after CANCEL_GRACE_S the sweep forces the
    cancel and stops the experiment process itself, exits within seconds, and the run is interrupted
    with its log's last line saying so."""
    from sparsetrain.sweep.runner import CANCEL_GRACE_S
    took, out, seen, ticking, status = _sigterm_ticking_sweep(tmp_path, _LOST_CANCEL_SWEEP, CANCEL_GRACE_S + 30)
    assert not ticking, (seen, out)  # the experiment is stopped
    assert CANCEL_GRACE_S <= took < CANCEL_GRACE_S + 20, (took, out)
    assert status["tick"]["state"] == "interrupted", (status, out)
    assert "=== cancelled after" in open(status["tick"]["log"]).read().splitlines()[-1]
    assert not os.path.exists(status["tick"]["log"] + ".running")


def test_max_concurrent_caps_the_runs_at_once(swept, tmp_path):
    """Two 3-second runs: side by side on the 2 CPUs by default, one after the other with
    --max-concurrent 1 (intervals recorded by the runs themselves)."""
    from sparsetrain.sweep.plan import Run
    from sparsetrain.sweep.runner import execute
    script = tmp_path / "nap.py"
    script.write_text("import sys, time\nt0 = time.time()\ntime.sleep(3.0)\n"
                      "open(sys.argv[1], 'a').write(f'{t0} {time.time()}\\n')\n")
    for cap, overlap in ((0, True), (1, False)):
        spans = tmp_path / f"spans{cap}"
        runs = [Run(f"nap{cap}{i}", "study", str(tmp_path / f"n{cap}{i}"), [str(spans)], phases=["never"],
                    program=str(script)) for i in range(2)]
        status = execute(runs, str(tmp_path / f"cap{cap}"), max_concurrent=cap)
        assert all(s["state"] == "done" for s in status.values())
        (a0, a1), (b0, b1) = sorted(tuple(map(float, line.split())) for line in spans.read_text().splitlines())
        assert (b0 < a1) == overlap, (cap, a0, a1, b0, b1)


def test_a_killed_sweep_resumes_to_the_same_result(swept, tmp_path):
    """Ctrl-C (SIGINT to the sweep) while a student trains, then the same command again: the
    students' metrics equal those of the uninterrupted sweep (same settings, other --out)."""
    import ray
    root, _, _, first = swept
    # (on the module's local Ray, --address: a second local Ray took ~5 s to start and stop in the
    # sweep process; test_sigterm_stops_the_running_experiment_at_once interrupts a sweep on its own)
    argv = _tiny(root, "--alpha", "0.5", "0.8", "--seeds", "0", "--out", str(tmp_path / "sw"),
                 "--address", ray.get_runtime_context().gcs_address)[1:]
    cmd = [sys.executable, "-m", "sparsetrain.sweep", "grid", *argv]
    # (SIGINT handled whatever the suite inherited: a shell's background job, `make test &`, ignores it)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    def student_training():  # a student's log shows its first finished round, its process runs
        for path in (tmp_path / "sw").glob("grid-*/status.json"):
            try:
                status = json.loads(path.read_text())
            except ValueError:  # (being replaced)
                return False
            return any(s["kind"] == "study" and os.path.exists(s["log"] + ".running")
                       and "[distill-dense seed 0] round" in open(s["log"]).read() for s in status.values())
        return False

    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not student_training():
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 130, out
    stopped = json.loads(next((tmp_path / "sw").glob("grid-*/status.json")).read_text())
    assert "interrupted" in [s["state"] for s in stopped.values()], stopped
    # the interrupted sweep still writes its report: what finished, the interrupted runs named
    # (it wrote none before 2026-12-06: a report from an earlier invocation stayed, stale)
    report = next((tmp_path / "sw").glob("grid-*/report/summary.md")).read_text()
    cut = [n for n, s in stopped.items() if s["state"] == "interrupted"]
    assert f"run(s) failed or were interrupted:** {', '.join(map(repr, cut))}" in report, report
    assert "report: " in out and "summary.md" in out, out
    assert cli.main(["grid", *argv]) == 0  # the same command again (here from this process)
    done = json.loads(next((tmp_path / "sw").glob("grid-*/status.json")).read_text())
    assert all(s["state"] in ("done", "skipped") for s in done.values())
    for s in done.values():
        if s["kind"] == "study":
            name = os.path.basename(s["run_dir"])
            ref = root / "sweeps" / "runs" / name  # the same settings' run in the first sweep
            for rel in ("seed0/distill-dense/metrics.csv", "seed0/teacher/metrics.csv"):
                assert strip_timing(read_rows(os.path.join(s["run_dir"], rel))) == strip_timing(read_rows(ref / rel))
    # the aggregated table equals the one of the same runs in the uninterrupted sweep
    studies = [s["run_dir"] for s in done.values() if s["kind"] == "study"]
    refs = [str(root / "sweeps" / "runs" / os.path.basename(d)) for d in studies]
    resumed, ref = (table1_csv(load_groups(dirs), ["alpha"]) for dirs in (studies, refs))
    assert len(resumed) == 2 * 6 and resumed == ref  # 2 alphas x (vanilla, distilled) x 3 stop rules


# ---------------------------------------------------------------------------- aggregation alone
def _write_run(folder, eps, seeds, curves, done=True):
    """A run directory by hand: config.json and seed{s}/vanilla... here the teacher run (the student
    is the teacher's model) with metrics.csv rows (round, sparsity, val_acc, test_acc)."""
    write_json(folder / "config.json", {"dataset": "mnist", "eps": eps, "model": "lenet300", "student": "lenet300",
                                        "teachers": [], "seeds": seeds, "rate": 0.5, "wall": 0.95, "alpha": 0.8,
                                        "tau": 10.0, "git_commit": str(folder)})
    for seed, rows in curves.items():
        d = folder / f"seed{seed}" / "teacher"
        d.mkdir(parents=True)
        write_csv(d / "metrics.csv", [{"round": i, "sparsity": s, "val_acc": v, "test_acc": t, "entropy_mean": 0.5,
                                       "cum_flops": 1e12 * (i + 1), "paper_cum_flops": 2e12 * (i + 1)}
                                      for i, (s, v, t) in enumerate(rows)])
        if done:
            write_json(d / "best.json", {"round": 0})


def test_report_keeps_teacher_only_runs_no_study_links_and_asks_where(tmp_path, capsys):
    """A teacher-only run is left out only when a listed study links it (its teacher phase); a
    paper-perturb teacher run is a result of its own. Several folders need --out."""
    curve = [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]
    _write_run(tmp_path / "runs" / "study", 0.1, [0], {0: curve})
    _write_run(tmp_path / "runs" / "linked", 0.1, [0], {0: curve})
    _write_run(tmp_path / "runs" / "perturb", 0.2, [0], {0: curve})
    for d in ("linked", "perturb"):
        cfg = json.loads((tmp_path / "runs" / d / "config.json").read_text())
        write_json(tmp_path / "runs" / d / "config.json", {**cfg, "phases": ["teacher"]})
    import shutil
    shutil.rmtree(tmp_path / "runs" / "study" / "seed0" / "teacher")
    os.symlink(os.path.join("..", "..", "linked", "seed0", "teacher"), tmp_path / "runs" / "study" / "seed0" / "teacher")
    assert cli.main(["report", str(tmp_path / "runs")]) == 0  # one folder: its report beside the runs
    rows = list(csv.DictReader(open(tmp_path / "runs" / "report" / "table1.csv")))
    assert sorted({r["eps"] for r in rows}) == ["0.1", "0.2"]  # the study and the unlinked teacher run
    assert {r["stop"] for r in rows if r["stop_rule"] == "none"} == {"1"}  # (finished: best.json)
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(tmp_path / "runs" / "study"), str(tmp_path / "runs" / "perturb")])
    assert e.value.code == 2 and "report: give --out DIR for the report of several folders" in capsys.readouterr().err


def test_report_expands_a_leading_tilde_in_its_run_dirs(tmp_path, monkeypatch, capsys):
    """`report '~/sweeps/runs'` (quoted, or after '=', no shell expands it) found no run directory: the
    ~ was a folder of that name here; it is the home folder, as in --out, --reuse and --teachers."""
    curve = [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]
    _write_run(tmp_path / "home" / "runs" / "a", 0.1, [0], {0: curve})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "~/runs"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "home" / "runs" / "report" / "summary.md")
    assert cli.main(["report", str(tmp_path / "home" / "runs"), "--out", str(tmp_path / "ref")]) == 0  # (as spelled out)
    rows, ref = (list(csv.DictReader(open(d / "table1.csv"))) for d in (tmp_path / "home" / "runs" / "report",
                                                                       tmp_path / "ref"))
    assert rows and rows == ref and not (tmp_path / "~").exists()


def test_report_of_a_sweep_root_names_its_runs_folder(tmp_path, capsys):
    """`report sweeps` (the sweep's --out, not its runs folder) said only 'no run directory': it now
    names SWEEPS/runs, where the runs are; a folder without runs below it gets no such hint."""
    _write_run(tmp_path / "sweeps" / "runs" / "a", 0.1, [0], {0: [(0.0, 0.5, 0.5)]})
    for folder, hint in ((tmp_path / "sweeps", True), (tmp_path / "empty", False)):
        folder.mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as e:
            cli.main(["report", str(folder)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"no run directory (with a config.json) in {folder}" in err
        assert (f"give {tmp_path / 'sweeps' / 'runs'}" in err) == hint and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # (no folder at all: it said "no run directory ... in (none given)")
        cli.main(["report"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1] == ("error: report needs RUN_DIR: one or more run directories, or "
                                                          "folders holding them (e.g. sweeps/runs) (see python -m "
                                                          "sparsetrain.sweep --help)"), err


def test_a_study_that_never_started_keeps_its_teacher_run_and_the_grid_labels(tmp_path):
    """A sweep over engine whose auto study failed before creating its run directory: the auto teacher
    run (done) is that setting's only result and stays in the report, labelled engine=auto by the grid's
    axes (it was dropped as some study's teacher and the engine axis vanished), with no student
    placeholder setting (teachers=[dense, best]) in its label."""
    from sparsetrain.sweep.report import write_sweep_report
    curve = [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]
    runs = tmp_path / "runs"
    for name, engine, teachers, phases in (("t-auto", "auto", ["dense", "best"], ["teacher"]),
                                           ("t-dense", "dense", ["dense", "best"], ["teacher"]),
                                           ("s-dense", "dense", ["dense"], ["teacher", "distill-dense"])):
        _write_run(runs / name, 0.1, [0], {0: curve})
        cfg = json.loads((runs / name / "config.json").read_text())
        write_json(runs / name / "config.json", {**cfg, "engine": engine, "teachers": teachers, "phases": phases})
    import shutil
    shutil.rmtree(runs / "s-dense" / "seed0" / "teacher")
    os.symlink(os.path.join("..", "..", "t-dense", "seed0", "teacher"), runs / "s-dense" / "seed0" / "teacher")
    leaves = cli._leaves([str(runs / d) for d in ("t-auto", "t-dense", "s-dense", "s-auto-never-started")])
    assert [os.path.basename(d) for d in leaves] == ["t-auto", "s-dense", "s-auto-never-started"]
    md = open(write_sweep_report(leaves, str(tmp_path / "report"), axes=["engine"])).read()
    assert "2 run directories, 2 setting(s) (seeds pooled); settings that differ: engine." in md  # (existing ones)
    assert "| engine=auto | vanilla |" in md and "| engine=dense | vanilla |" in md and "teachers=" not in md
    # the sweep knows t-auto as the teacher run of a study (of another student model): its curve is the
    # teacher's, not the grid's vanilla student (Table 12, Table 1, the figure's legend)
    md = open(write_sweep_report(leaves, str(tmp_path / "report2"), axes=["engine"],
                                 teacher_runs=[str(runs / "t-auto"), str(runs / "t-dense")])).read()
    assert "| engine=auto | teacher |" in md and "| engine=dense | vanilla |" in md
    assert "| engine=auto | vanilla |" not in md and "teacher (" in md
    assert (tmp_path / "report2" / "accuracy_vs_sparsity.png").exists()
    # another sweep under the same --out trained its students in t-dense (its study resolved to that
    # directory) and rewrote its config.json: this sweep's plan still knows it as its teacher run
    cfg = json.loads((runs / "t-dense" / "config.json").read_text())
    write_json(runs / "t-dense" / "config.json", {**cfg, "phases": ["teacher", "vanilla", "distill"]})
    dirs = [str(runs / d) for d in ("t-auto", "t-dense", "s-dense")]
    assert "t-dense" in [os.path.basename(d) for d in cli._leaves(dirs)]  # (config.json alone: a setting of its own)
    assert [os.path.basename(d) for d in cli._leaves(dirs, [dirs[0], dirs[1]])] == ["t-auto", "s-dense"]


def test_a_run_with_an_unreadable_config_is_left_out_and_named(tmp_path):
    """A config.json that does not parse: the run was reported under the default settings (cifar10,
    resnet18, paper) with its real numbers; now it is left out and named."""
    from sparsetrain.sweep.report import write_sweep_report
    curve = [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]
    _write_run(tmp_path / "good", 0.1, [0], {0: curve})
    _write_run(tmp_path / "bad", 0.2, [0], {0: curve})
    (tmp_path / "bad" / "config.json").write_text('{"dataset": "fash')
    md = open(write_sweep_report([str(tmp_path / "good"), str(tmp_path / "bad")], str(tmp_path / "report"))).read()
    assert (f"**Left out, unreadable (config.json: its settings unknown; or a metrics.csv not a study's):** "
            f"'{tmp_path / 'bad'}'") in md
    assert "cifar10" not in md and "1 setting(s)" in md


def test_a_finished_phase_whose_metrics_no_longer_match_their_record_is_left_out(tmp_path):
    """A finished phase's metrics.csv carries its size and sha256 (.sha256); one torn (a copy cut short: its
    last row gone) or edited since was aggregated as if whole, a best round and accuracy the run never had
    (the experiment's own report refuses it). Now the run is left out and named, the others reported."""
    from sparsetrain.experiment.files import verify
    from sparsetrain.sweep.report import write_sweep_report
    curve = [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]
    for name, eps in (("good", 0.1), ("torn", 0.2)):
        _write_run(tmp_path / name, eps, [0], {0: curve})
        metrics = tmp_path / name / "seed0" / "teacher" / "metrics.csv"
        write_csv(metrics, read_rows(metrics), checksum=True)  # (as loop.finish writes it)
        assert verify(str(metrics))
    text = metrics.read_text()
    metrics.write_text(text[:text.rindex("\n", 0, len(text) - 1) + 1] + "1,0.5,0.7")  # (the last row torn)
    dirs = [str(tmp_path / "good"), str(tmp_path / "torn")]
    unreadable = []
    assert [g["dirs"] for g in load_groups(dirs, unreadable)] == [[dirs[0]]]
    assert len(unreadable) == 1 and unreadable[0].startswith(f"{dirs[1]} ({metrics} is corrupt: ")
    md = open(write_sweep_report(dirs, str(tmp_path / "report"))).read()
    (left,) = [ln for ln in md.splitlines() if ln.startswith("**Left out, unreadable")]
    assert f"{metrics} is corrupt" in left and dirs[0] not in left
    assert ", 1 setting(s) (seeds pooled)" in md  # (the torn run's eps 0.2: no setting of its own)


def test_table12_shows_the_teacher_s_own_best_model_beside_the_students():
    """The paper's Table 12 is the vanilla ResNet-18's w_best per eps: a study of another student model
    (VGG-like) dropped its teacher's row, so a sweep's Table 12 had no ResNet-18 at all; the distilled
    students follow in the --teachers order (distill-best came first, alphabetically)."""
    from sparsetrain.sweep.aggregate import best_model_rows
    curve = {0: [{"round": 0, "val_acc": 0.5, "test_acc": 0.5, "sparsity": 0.0},
                 {"round": 1, "val_acc": 0.7, "test_acc": 0.6, "sparsity": 0.5}]}
    g = {"config": {"dataset": "cifar10", "eps": 0.1, "model": "resnet18", "student": "vgg_d5g5",
                    "teachers": ["dense", "best"]},
         "curves": {p: curve for p in ("teacher", "distill-best", "vanilla", "distill-dense")}}
    assert [r["phase"] for r in best_model_rows([g], ["eps"])] == ["vanilla", "teacher", "distill-dense", "distill-best"]


def test_best_model_std_counts_each_columns_own_seeds():
    """best_model.csv: each std needs two finite values of its own column (a seed's best round may
    lack one value: a NaN sparsity or test accuracy)."""
    from sparsetrain.sweep.aggregate import best_model_rows
    nan, r = float("nan"), (lambda v, t, s: {"val_acc": v, "test_acc": t, "sparsity": s})  # noqa: E731

    def row(seeds):
        return best_model_rows([{"config": {"dataset": "mnist", "eps": 0.1},
                                 "curves": {"vanilla": dict(enumerate(seeds))}}], [])[0]
    a = row([[r(0.9, 0.90, 0.0), r(0.95, 0.91, nan)], [r(0.9, 0.92, 0.0), r(0.95, 0.93, 0.5)]])
    assert a["best_test_std"] == pytest.approx(np.std([91, 93], ddof=1)) and math.isnan(a["sparsity_std"])
    # the seeds with a w_best, and each column's own count beside a mean over fewer (it said 2 silently)
    assert (a["seeds"], a["best_test_n"], a["sparsity_n"]) == (2, 2, 1)
    from sparsetrain.sweep.aggregate import best_model_md
    assert best_model_md([dict(a, setting="s")]).splitlines()[-1] == "| s | vanilla | 92.00 ± 1.41 | 50.00 (1 of 2 seeds) | light | 2 |"
    b = row([[r(0.9, 0.90, 0.0), r(0.95, nan, 0.4)], [r(0.9, 0.92, 0.0), r(0.95, 0.93, 0.5)]])
    assert math.isnan(b["best_test_std"]) and b["sparsity_std"] == pytest.approx(np.std([40, 50], ddof=1))


def test_grid_takes_the_profile_seeds(tmp_path):
    """Without --seeds a grid point runs the seeds its profile gives (paper: 0 1 2), as the
    experiment's own command would."""
    plan = make_plan({"dataset": ["cifar10"], "profile": ["paper"], "teachers": ("dense",)}, str(tmp_path), threads=1)
    assert sorted({r.seed for r in plan if r.kind == "teacher"}) == [0, 1, 2]


def test_aggregation_pools_seeds_and_marks_missing_and_running(tmp_path):
    curve = lambda t0, t1: [(0.0, 0.5, t0), (0.5, 0.7, t1), (0.75, 0.6, 0.1)]  # noqa: E731 best val: round 1
    a = [tmp_path / f"a{s}" for s in range(3)]
    for s, d in enumerate(a):  # eps 0.1: three single-seed directories (a sweep's layout)
        _write_run(d, 0.1, [s], {s: curve(0.5, 0.80 + 0.02 * s)})
    _write_run(tmp_path / "b", 0.2, [0, 1, 2], {0: curve(0.5, 0.60), 1: curve(0.5, 0.70)})  # seed 2 missing
    _write_run(tmp_path / "c", 0.2, [1], {}, done=False)  # (nothing yet: adds no curve)
    _write_run(tmp_path / "d", 0.3, [0], {0: curve(0.5, 0.9)})  # one seed: no sample std in either table
    (tmp_path / "b" / "seed1" / "teacher" / "best.json").unlink()  # seed 1 still running
    for d, threads in zip(a, (1, 2, 2)):  # (what a run records of itself never separates seeds)
        cfg = json.loads((d / "config.json").read_text())
        write_json(d / "config.json", {**cfg, "torch_threads": threads, "sparsetrain_version": f"0.{threads}"})
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    rows = {(r["eps"], r["stop_rule"]): r for r in csv.DictReader(open(tmp_path / "rep" / "table1.csv"))}
    a_row, b_row = rows[("0.1", "none")], rows[("0.2", "none")]
    assert float(a_row["test_mean"]) == pytest.approx(82.0) and float(a_row["test_std"]) == pytest.approx(2.0)
    assert a_row["seeds"] == "3" and a_row["in_progress"] == ""
    assert float(b_row["test_mean"]) == pytest.approx(65.0)
    assert float(b_row["test_std"]) == pytest.approx(np.std([60, 70], ddof=1))
    assert b_row["seeds"] == "2" and b_row["in_progress"] == "1"
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "In progress (not finished): 'teacher' seed(s) [1]" in md and "| 2/3 |" in md
    best = list(csv.DictReader(open(tmp_path / "rep" / "best_model.csv")))
    assert {(r["eps"], r["sparsity_mean"]) for r in best} == {("0.1", "50.0"), ("0.2", "50.0"), ("0.3", "50.0")}
    one = [r for r in best if r["eps"] == "0.3"]
    assert len(one) == 1 and one[0]["seeds"] == "1" and one[0]["best_test_std"] == one[0]["sparsity_std"] == "nan"
    assert float(one[0]["best_test_mean"]) == pytest.approx(90.0)
    assert rows[("0.3", "none")]["test_std"] == "nan" and float(best[0]["best_test_std"]) == pytest.approx(2.0)
    groups = load_groups([str(d) for d in a])
    assert len(groups) == 1 and groups[0]["config"]["seeds"] == [0, 1, 2]


# ---- which runs a grid needs, and the report's order ---------------------------------------------

def test_a_vanilla_student_of_another_model_needs_no_teacher_run(tmp_path):
    # (it neither trains nor reads the teacher phase: a teacher run there was a wasted full pruning run,
    # reported as an extra "vanilla" setting)
    plan = make_plan(_settings(tmp_path, seeds=[0], phases=("vanilla",), student=["vgg_d1g2"]),
                     str(tmp_path / "sw"), threads=1)
    assert [r.kind for r in plan] == ["study"] and plan[0].phases == ["vanilla"]


@pytest.mark.parametrize("axes", [
    {"phases": ("teacher",), "alpha": [0.5, 0.8]},  # teacher runs ignore alpha (was: one run, the axis dropped)
    {"phases": ("teacher",), "student": ["vgg_d1g2", "vgg_d2g2"]},
    {"phases": ("vanilla",), "alpha": [0.5, 0.8]},  # two studies linking one teacher (was: two equal rows)
])
def test_points_that_report_the_same_curves_are_refused(tmp_path, axes):
    with pytest.raises(ValueError, match="two points of the grid are the same study"):
        make_plan(_settings(tmp_path, seeds=[0], **axes), str(tmp_path / "sw"), threads=1)


@pytest.mark.parametrize("student", [{}, {"student": ["vgg_d1g1"]}])
def test_a_study_whose_curves_are_part_of_another_s_links_them_in_either_order(tmp_path, student):
    """--teachers (dense,) beside (dense, best): the smaller study's curves are part of the larger's. Listed
    second, it was refused as "the same study" (it links every phase, but is no twin: listed first it was
    planned, the larger one linking its phases); now it links them from the larger, whichever comes first."""
    plans = [make_plan(_settings(tmp_path, teachers=grid, seeds=[0], **student), str(tmp_path / "sw"), threads=1)
             for grid in ([("dense",), ("dense", "best")], [("dense", "best"), ("dense",)])]
    shown = [{r.point["teachers"]: sorted(r.phases) for r in plan if r.kind == "study"} for plan in plans]
    assert shown[0] == shown[1] and set(shown[0][("dense",)]) < set(shown[0][("dense", "best")])  # (the reference)
    one, both = sorted((r for r in plans[1] if r.kind == "study"), key=lambda r: len(r.phases))
    assert both.name in one.deps and sorted(sum(one.needs.values(), [])) == sorted(one.phases)  # (it trains none)


def test_an_alpha_tau_grid_shares_one_teacher(tmp_path):
    plan = make_plan(_settings(tmp_path, seeds=[0], alpha=[0.5, 0.8], tau=[10.0, 20.0]), str(tmp_path / "sw"), threads=1)
    assert [r.kind for r in plan].count("teacher") == 1 and [r.kind for r in plan].count("study") == 4


def test_report_orders_settings_by_value(tmp_path):
    # run directories are read in their names' order, whose tail is a hash: not the settings' order
    curve = [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]
    for name, eps in (("mnist-eps-0a", 0.5), ("mnist-eps-1b", 0.1), ("mnist-eps-2c", 0.2)):
        _write_run(tmp_path / "runs" / name, eps, [0], {0: curve})
    assert cli.main(["report", str(tmp_path / "runs")]) == 0
    for f in ("table1.csv", "best_model.csv"):
        with open(tmp_path / "runs" / "report" / f) as fh:
            eps = list(dict.fromkeys(r["eps"] for r in csv.DictReader(fh)))
        assert eps == ["0.1", "0.2", "0.5"], (f, eps)


def test_table5_reports_validation_accuracy_and_its_average_over_eps():
    # the paper's Table 5: the validation accuracy, and its mean over the noise rates that picks alpha, tau
    from sparsetrain.sweep.aggregate import alpha_tau_md

    def group(eps, alpha, vals):  # vals: per seed, (val, test) of the two rounds
        curves = {s: [{"round": i, "sparsity": 0.5 * i, "val_acc": v, "test_acc": t} for i, (v, t) in enumerate(r)]
                  for s, r in enumerate(vals)}
        return {"config": {"eps": eps, "alpha": alpha, "tau": 10.0}, "curves": {"distill-dense": curves}}

    groups = [group(0.1, 0.5, [[(0.60, 0.10), (0.70, 0.20)], [(0.80, 0.30), (0.50, 0.40)]]),  # best val: 70, 80
              group(0.1, 0.8, [[(0.90, 0.10), (0.20, 0.20)], [(0.40, 0.30), (0.90, 0.40)]]),  # 90, 90
              group(0.2, 0.5, [[(0.50, 0.10), (0.60, 0.20)], [(0.60, 0.30), (0.60, 0.40)]]),  # 60, 60 (first of ties)
              group(0.2, 0.8, [[(0.30, 0.10), (0.40, 0.20)], [(0.20, 0.30), (0.40, 0.40)]])]  # 40, 40
    md = alpha_tau_md(groups, ["eps", "alpha"])
    blocks = {b.split("\n")[0]: b for b in md.split("### ")[1:]}
    assert set(blocks) == {"eps=0.1: distill-dense", "eps=0.2: distill-dense",
                           "average over ε = 0.1, 0.2: distill-dense"}
    assert "| 0.5 | 75.00 ± 7.07 |" in blocks["eps=0.1: distill-dense"]  # validation, not test (10-40)
    assert "| 0.8 | **90.00 ± 0.00** |" in blocks["eps=0.1: distill-dense"]
    assert "| 0.5 | **60.00 ± 0.00** |" in blocks["eps=0.2: distill-dense"]
    avg = blocks["average over ε = 0.1, 0.2: distill-dense"]
    assert "| 0.5 | **67.50** |" in avg and "| 0.8 | 65.00 |" in avg  # (75 + 60) / 2 beats (90 + 40) / 2
    assert "| α \\ τ | 10 |" in avg  # τ as given on the command line (the config's float printed 10.0)
    # a kept teacher run (its study failed) holds placeholder alpha/tau: no row or column of its own
    teacher = {"config": {"eps": 0.1, "alpha": 0.7, "tau": 20.0, "phases": ["teacher"]},
               "curves": {"teacher": group(0.1, 0.7, [[(0.5, 0.5)]])["curves"]["distill-dense"]}}
    md = alpha_tau_md(groups + [teacher], ["eps", "alpha", "tau"])
    assert "0.7" not in md and "20" not in md and "| 0.8 | 65.00 |" in md
    # a setting that ran at one eps only (here seed count 3, at eps 0.1) gets no "average over" block of its
    # own (it printed one "average over ε = 0.1", a copy of its eps block, before 2026-12-06)
    lone = {**group(0.1, 0.5, [[(0.5, 0.5)]]), "config": {"eps": 0.1, "alpha": 0.5, "tau": 10.0, "seeds": (0, 1, 2)}}
    md = alpha_tau_md(groups + [lone], ["eps", "alpha", "seeds"])
    heads = [b.split("\n")[0] for b in md.split("### ")[1:]]
    assert [h for h in heads if h.startswith("average over")] == ["average over ε = 0.1, 0.2, seeds=None: distill-dense"], heads
    # a cell whose setting started more seeds than have a best-validation round says how many it holds
    # (it showed one seed's accuracy as the setting's, unmarked, before 2026-12-06)
    short = group(0.1, 0.5, [[(0.60, 0.10), (0.70, 0.20)], []])  # seed 1: started, no round yet
    md = alpha_tau_md([short, groups[1]], ["alpha"])
    assert "| 0.5 | 70.00 (1 of 2 seeds) |" in md and "| 0.8 | **90.00 ± 0.00** |" in md, md
    # the average over eps of such a cell keeps its mark, naming the eps (it showed (70 + 60) / 2 unmarked,
    # as if every seed had a result, before 2026-12-06); the other cells' averages stay unmarked
    md = alpha_tau_md([short] + groups[1:], ["eps", "alpha"])
    avg = {b.split("\n")[0]: b for b in md.split("### ")[1:]}["average over ε = 0.1, 0.2: distill-dense"]
    assert f"| 0.5 | **{(70 + 60) / 2:.2f} (ε 0.1: 1 of 2 seeds)** |" in avg, avg  # (tied with (90 + 40) / 2: both bold)
    assert f"| 0.8 | **{(90 + 40) / 2:.2f}** |" in avg, avg


def test_table5_bolds_every_cell_of_the_best_mean():
    """Means equal but for float rounding ((15 + 18.33) / 2 and (20 + 13.33) / 2, a real sweep's 60-image
    validation set) are one best: only the one rounding made larger was bold before 2026-12-06."""
    from sparsetrain.sweep.aggregate import alpha_tau_md

    def group(alpha, tau, vals):  # vals: per seed, its one round's validation accuracy
        curves = {s: [{"round": 0, "sparsity": 0.0, "val_acc": v, "test_acc": 0.5}] for s, v in enumerate(vals)}
        return {"config": {"alpha": alpha, "tau": tau}, "curves": {"distill-dense": curves}}

    a, b, c, d = 9 / 60, 11 / 60, 12 / 60, 8 / 60  # (a + b) / 2 == (c + d) / 2 in exact arithmetic
    groups = [group(0.5, 2.0, [a, b]), group(0.5, 10.0, [c, d]), group(0.8, 2.0, [d, d]), group(0.8, 10.0, [a, d])]
    assert np.mean([100 * a, 100 * b]) != np.mean([100 * c, 100 * d])  # (the floats differ)
    cells = {}
    for line in alpha_tau_md(groups, ["alpha", "tau"]).splitlines():
        if line.startswith("| 0."):
            alpha, *row = [x.strip() for x in line.strip("|").split("|")]
            cells.update({(alpha, tau): x for tau, x in zip(("2", "10"), row)})
    ref = {k: np.mean([100 * rows[0]["val_acc"] for rows in g["curves"]["distill-dense"].values()])
           for k, g in zip([("0.5", "2"), ("0.5", "10"), ("0.8", "2"), ("0.8", "10")], groups)}
    best = max(ref.values())
    assert {k for k, x in cells.items() if x.startswith("**")} == {k for k, m in ref.items() if m > best - 1e-9}
    assert {k for k, x in cells.items() if x.startswith("**")} == {("0.5", "2"), ("0.5", "10")}, cells


def test_every_recipe_plans_without_an_invalid_point(tmp_path):
    """Each recipe's paper and quick grids resolve (presets, validation) into runs; Table 12's is the
    paper's App. F noise levels, vanilla runs only, sharing paper-eps's teacher runs under one --out."""
    from sparsetrain.sweep.recipes import RECIPES, recipe
    plans = {}
    for name in RECIPES:
        for profile in ("paper", "quick"):
            plans[name, profile] = make_plan(recipe(name, profile), str(tmp_path / "sw"), threads=1)
            assert plans[name, profile] and not [r.error for r in plans[name, profile] if r.error], (name, profile)
    t12 = plans["paper-table12", "paper"]
    assert {r.kind for r in t12} == {"teacher"} and len(t12) == 6 * 3
    assert sorted({r.point["eps"] for r in t12}) == [0.1, 0.125, 0.15, 0.175, 0.2, 0.5]
    shared = {r.name for r in t12} & {r.name for r in plans["paper-eps", "paper"]}
    assert len(shared) == 3 * 3  # eps 10/20/50% x 3 seeds on CIFAR-10
    reg = plans["paper-regularizers", "quick"]  # (Fig. 6: a baseline and one change at a time)
    assert len(reg) == 6 and len({r.run_dir for r in reg}) == 6 and {r.kind for r in reg} == {"teacher"}
    assert [{k: v for k, v in r.point.items() if k in ("l1", "dropout", "augment", "teacher_weight_decay")}
            for r in reg] == [{}, {"l1": 1e-5}, {"l1": 1e-4}, {"teacher_weight_decay": 1e-3}, {"dropout": 0.5},
                              {"augment": "autoaugment"}]


def test_both_roles_flags_replace_a_recipe_s_per_role_value(tmp_path, capsys):
    """--epochs / --milestones (both roles) given to a recipe that sets --teacher-epochs or
    --student-epochs (the quick paper-regularizers and paper-depth-width): the recipe's per-role value
    won in every run (the experiment lets --<role>-<key> win), the flag ignored silently. Now the
    flag replaces it; a --<role>-<key> given too still wins for its role."""
    from sparsetrain.experiment.config import config_from_args

    def runs(*argv):
        assert cli.main([*argv, "--profile", "quick", "--out", str(tmp_path / "sw"), "--dry-run"]) == 0
        plan = json.load(open(capsys.readouterr().out.rsplit("plan: ", 1)[1].strip()))
        return [config_from_args(r["argv"])[0] for r in plan["runs"]]
    reg = runs("paper-regularizers", "--epochs", "4", "--milestones", "2")
    assert len(reg) == 6 and {(c.teacher_epochs, c.teacher_milestones) for c in reg} == {(4, (2,))}
    dw = runs("paper-depth-width", "--epochs", "4", "--milestones", "2", "--teacher-epochs", "6")
    studies = [c for c in dw if c.phases != ("teacher",)]
    assert len(studies) == 3 and {(c.student_epochs, c.student_milestones) for c in studies} == {(4, (2,))}
    assert {(c.teacher_epochs, c.teacher_milestones) for c in dw} == {(6, (2,))}


def test_readme_states_each_quick_profile_s_noise_and_teacher():
    """README's recipe table: each `--profile quick` cell names its noise rates, and the teacher it
    distils from where that is not the paper profile's (a quick grid must not pass for the figure's)."""
    from sparsetrain.sweep.recipes import RECIPES
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for name, r in RECIPES.items():
        (row,) = [ln for ln in readme.splitlines() if ln.startswith(f"| `{name}` |")]
        quick = row.rstrip(" |").rsplit(" | ", 1)[1]
        eps = "ε " + "/".join(f"{100 * e:g}" for e in r["quick"]["eps"]) + "%"
        assert eps in quick, (name, eps, quick)
        if r["quick"].get("teachers") != r["paper"].get("teachers"):
            assert all(f"the {t} teacher" in quick for t in r["quick"]["teachers"]), (name, quick)


def test_variants_lay_one_change_at_a_time_over_the_grid():
    from sparsetrain.sweep.plan import expand
    pts = expand({"dataset": ["mnist"], "eps": [0.1, 0.2], "variants": [{}, {"l1": 1e-5}, {"eps": [0.5]}]})
    assert pts == [{"dataset": "mnist", "eps": 0.1}, {"dataset": "mnist", "eps": 0.2},
                   {"dataset": "mnist", "eps": 0.1, "l1": 1e-5}, {"dataset": "mnist", "eps": 0.2, "l1": 1e-5},
                   {"dataset": "mnist", "eps": 0.5}]
    assert expand({"dataset": ["mnist"]}) == [{"dataset": "mnist"}]


def test_a_failed_run_s_partial_curve_is_not_in_progress(tmp_path):
    """A run the sweep reports failed left a curve without best.json: the same report called it "In
    progress" and Table 12 averaged its partial best unmarked. Now it did not finish, and Table 12
    counts the unfinished seeds."""
    from sparsetrain.sweep.report import write_sweep_report
    curve = [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]
    _write_run(tmp_path / "broke", 0.1, [0], {0: curve}, done=False)
    _write_run(tmp_path / "going", 0.2, [0], {0: curve}, done=False)
    status = {"broke": {"state": "failed", "kind": "study", "error": "RunFailed: exit code 1", "log": "b.log"},
              "going": {"state": "running", "kind": "study"}}
    md = open(write_sweep_report([str(tmp_path / "broke"), str(tmp_path / "going")], str(tmp_path / "rep"),
                                 status)).read()
    assert "Did not finish (the run failed or was interrupted; the curve is partial): 'teacher' seed(s) [0]." in md
    assert md.count("In progress (not finished): 'teacher' seed(s) [0].") == 1  # (the other run's)
    assert md.count("| 1 (1 unfinished, 1 failed) |") == 1 and md.count("| 1 (1 unfinished) |") == 1  # broke, going
