"""The sweep report's completeness: every planned grid point and every seed started is counted,
whatever became of its run (synthetic run directories; no training)."""
import csv
import dataclasses
import json
import os
import re

from sparsetrain.experiment.config import config_from_args
from sparsetrain.experiment.files import write_csv, write_json
from sparsetrain.sweep.plan import make_plan
from sparsetrain.sweep.report import write_sweep_report

_CURVE = [(0.0, 0.5, 0.5), (0.5, 0.7, 0.7)]


def _settings(root, **axes):
    base = {"dataset": ["mnist"], "profile": ["quick"], "data_dir": str(root / "data"), "eps": [0.2],
            "subset": [0], "epochs": [2], "milestones": (1,), "rate": [0.5], "wall": [0.95], "batch_size": [16],
            "teachers": ("dense",), "seeds": [0]}
    return {**base, **axes}


def _fill(run_dir, config, phases=("teacher", "distill-dense")):
    """What a finished run leaves: its config.json (its settings and what it records of itself) and one
    curve per phase of each seed."""
    write_json(f"{run_dir}/config.json", {**config, "git_commit": "x"})
    for seed in config["seeds"]:
        for ph in phases:
            d = f"{run_dir}/seed{seed}/{ph}"
            os.makedirs(d)
            write_csv(f"{d}/metrics.csv", [{"round": i, "sparsity": s, "val_acc": v, "test_acc": t,
                                            "entropy_mean": 0.5, "cum_flops": 1e12 * (i + 1),
                                            "paper_cum_flops": 2e12 * (i + 1)} for i, (s, v, t) in enumerate(_CURVE)])
            write_json(f"{d}/best.json", {"round": 1})


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_a_grid_point_whose_runs_failed_keeps_its_rows(tmp_path):
    """Subset 100's teacher failed, so its study never made a directory: every table and both CSVs
    still have its row (no result, n = 0, its seed failed); subset 2000's rows are as before."""
    plan = make_plan(_settings(tmp_path, subset=[100, 2000]), str(tmp_path / "sw"), threads=1)
    studies = {r.point["subset"]: r for r in plan if r.kind == "study"}
    for r in plan:  # (a planned config is what the run's config.json records: they are one setting)
        cfg, _ = config_from_args(r.argv)
        assert r.config == json.loads(json.dumps({**dataclasses.asdict(cfg), "student": cfg.resolved_student()}))
    _fill(studies[2000].run_dir, studies[2000].config)
    status = {r.name: {"state": "done" if r is studies[2000] or r.name in studies[2000].deps else "failed",
                       "kind": r.kind, "log": "x.log"} for r in plan}
    planned = {r.run_dir: r.config for r in plan if r.kind == "study"}
    md = open(write_sweep_report([studies[100].run_dir, studies[2000].run_dir], str(tmp_path / "rep"), status,
                                 axes=["subset"], planned=planned)).read()
    t1 = _rows(tmp_path / "rep" / "table1.csv")
    none = [r for r in t1 if r["subset"] == "100"]
    assert len(none) == 1 and none[0]["run"] == "(no result)" and none[0]["seeds"] == "0"
    assert (none[0]["seeds_started"], none[0]["failed"], none[0]["failed_seeds"], none[0]["test_n"]) == ("1", "1", "0", "0")
    assert none[0]["test_mean"] == "nan" and none[0]["stop_rule"] == ""
    assert len([r for r in t1 if r["subset"] == "2000"]) == 6  # vanilla (the teacher's curve), distill-dense x 3 rules
    best = _rows(tmp_path / "rep" / "best_model.csv")
    assert [(r["subset"], r["phase"], r["seeds"], r["seeds_started"], r["failed"]) for r in best] == [
        ("100", "(no result)", "0", "1", "1"), ("2000", "vanilla", "1", "1", "0"), ("2000", "distill-dense", "1", "1", "0")]
    assert "| subset=100 | (no result) | n/a | n/a |  | 0/1 (1 failed) |" in md
    assert "### mnist, ε = 0.2, lenet300 (subset=100)" in md
    assert "No result: seed(s) [0] failed before recording a round (see the Runs table)." in md
    assert "settings that differ: subset." in md  # (the absent point's other settings are the plan's)


def test_a_rejected_grid_point_gets_its_row_too(tmp_path):
    """A point the experiment rejected has no run directory, only its name: its row says no result."""
    plan = make_plan(_settings(tmp_path, batch_size=[16, -1]), str(tmp_path / "sw"), threads=1)
    bad = [r for r in plan if r.error]
    assert len(bad) == 1 and bad[0].config["teacher_batch_size"] == bad[0].config["student_batch_size"] == -1
    good = next(r for r in plan if r.kind == "study" and not r.error)
    _fill(good.run_dir, good.config)
    status = {r.name: {"state": "failed" if r.error else "done", "kind": r.kind, "log": "x.log"} for r in plan}
    write_sweep_report([good.run_dir], str(tmp_path / "rep"), status, axes=["batch_size"],
                       planned={r.run_dir or r.name: r.config for r in plan if r.kind == "study"})
    best = _rows(tmp_path / "rep" / "best_model.csv")
    assert [(r["teacher_batch_size"], r["phase"], r["seeds"], r["failed"]) for r in best] == [
        ("16", "vanilla", "1", "0"), ("16", "distill-dense", "1", "0"), ("-1", "(no result)", "0", "1")]


def test_a_missing_seed_counts_against_the_seeds_started_and_a_failed_one_is_not_in_progress(tmp_path):
    """Seeds 0 and 1 were started, seed 1 left no curve: Table 12 and both CSVs say 1 of 2 (Table 1's
    form), as Table 1 does. A failed run's partial curve is counted failed, not in progress."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0, 1], "rate": 0.5, "wall": 0.95}
    _fill(tmp_path / "two", {**cfg, "seeds": [0]}, phases=("teacher",))
    write_json(tmp_path / "two" / "config.json", {**cfg, "git_commit": "x"})  # (seed 1 started, no curve)
    _fill(tmp_path / "broke", {**cfg, "eps": 0.2, "seeds": [0]}, phases=("teacher",))
    os.remove(tmp_path / "broke" / "seed0" / "teacher" / "best.json")
    status = {"two": {"state": "done", "kind": "study"}, "broke": {"state": "failed", "kind": "study"}}
    md = open(write_sweep_report([str(tmp_path / "two"), str(tmp_path / "broke")], str(tmp_path / "rep"), status)).read()
    t1 = {r["eps"]: r for r in _rows(tmp_path / "rep" / "table1.csv") if r["stop_rule"] == "none"}
    assert (t1["0.1"]["seeds"], t1["0.1"]["seeds_started"], t1["0.1"]["failed"]) == ("1", "2", "0")
    assert (t1["0.2"]["seeds"], t1["0.2"]["in_progress"], t1["0.2"]["failed"], t1["0.2"]["failed_seeds"]) == (
        "1", "", "1", "0")
    best = {r["eps"]: r for r in _rows(tmp_path / "rep" / "best_model.csv")}
    assert (best["0.1"]["seeds"], best["0.1"]["seeds_started"], best["0.2"]["failed"]) == ("1", "2", "1")
    assert "| eps=0.1 | vanilla | 70.00 | 50.00 | light | 1/2 |" in md and "| 1/2 |" in md.split("## Tables 1")[1]
    assert "| eps=0.2 | vanilla | 70.00 | 50.00 | light | 1 (1 unfinished, 1 failed) |" in md


def test_a_rewritten_sweep_report_leaves_no_stale_outputs(tmp_path):
    """A report written again where a figure or a table has nothing left removes the earlier one: the
    overlay of curves that are gone, the CSVs of runs no longer readable."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    run, rep = tmp_path / "run", tmp_path / "rep"
    _fill(run, cfg, phases=("teacher",))
    write_sweep_report([str(run)], str(rep))
    assert all((rep / n).is_file() for n in ("accuracy_vs_sparsity.png", "table1.csv", "best_model.csv"))
    for f in ("metrics.csv", "best.json"):  # (no curve left: the rows say no result; a finished phase's
        os.remove(run / "seed0" / "teacher" / f)  # best.json without its metrics.csv is refused, named)
    write_sweep_report([str(run)], str(rep))
    assert not (rep / "accuracy_vs_sparsity.png").exists()
    assert [r["run"] for r in _rows(rep / "table1.csv")] == ["(no result)"]
    (run / "config.json").write_text("{not json")  # (no readable run: no rows at all)
    md = open(write_sweep_report([str(run)], str(rep))).read()
    assert "Left out, unreadable (config.json" in md and not (rep / "table1.csv").exists() and not (rep / "best_model.csv").exists()


def test_a_run_whose_config_json_was_lost_is_named_not_dropped_unseen(tmp_path, capsys):
    """A run directory holding results whose config.json was deleted was skipped by the sweep report (and by
    `report FOLDER`, which listed only directories with one) without a word: its curves silently missing.
    It is named now among the unreadable runs (its settings unknown), the other runs reported as before;
    a directory without results (a run failed before starting) is not."""
    from sparsetrain.sweep import cli
    runs = tmp_path / "runs"
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    _fill(runs / "kept", cfg, phases=("teacher",))
    _fill(runs / "lost", {**cfg, "eps": 0.2}, phases=("teacher",))
    os.remove(runs / "lost" / "config.json")
    (runs / "empty").mkdir()  # (no results: not a run that lost its settings)
    md = open(write_sweep_report([str(runs / d) for d in ("kept", "lost", "empty")], str(tmp_path / "rep"))).read()
    left = next(line for line in md.splitlines() if line.startswith("**Left out, unreadable"))
    assert f"'{runs / 'lost'}' (config.json missing beside its results: its settings unknown)" in left
    rows = _rows(tmp_path / "rep" / "table1.csv")  # (the kept run's rows alone: the lost one's settings unknown)
    assert "empty" not in left and rows and all(r["run"] != "(no result)" for r in rows)
    assert md.startswith("# DSD² sweep\n\n2 run directories, 1 setting(s)")
    # a sweep's own planned run too (its grid point's rows are kept, marked no result)
    planned = {str(runs / "lost"): {**cfg, "eps": 0.2}}
    md = open(write_sweep_report([str(runs / "kept"), str(runs / "lost")], str(tmp_path / "rep2"), planned=planned)).read()
    assert f"'{runs / 'lost'}' (config.json missing beside its results" in md
    assert "(no result)" in [r["run"] for r in _rows(tmp_path / "rep2" / "table1.csv")]
    # `report FOLDER` passes it on too; as the one run given, it is named alike (its folder needs --out)
    assert cli.main(["report", str(runs)]) == 0
    assert f"'{runs / 'lost'}' (config.json missing" in (runs / "report" / "summary.md").read_text()
    assert cli.main(["report", str(runs / "lost"), "--out", str(tmp_path / "one")]) == 0
    assert f"'{runs / 'lost'}' (config.json missing" in (tmp_path / "one" / "summary.md").read_text()
    capsys.readouterr()


def test_tau_reads_the_same_in_table5_and_table12_and_entropy_is_in_bits(tmp_path, monkeypatch):
    """tau 10.0 in config.json: Table 5's column and Table 12's setting both say 10 (Table 12 said
    tau=10.0); the figures' entropy axis says its unit (bits: log2)."""
    from matplotlib.axes import Axes
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": ["dense"],
           "seeds": [0], "rate": 0.5, "wall": 0.95, "alpha": 0.5}
    for tau in (10.0, 20.0):
        _fill(tmp_path / f"t{tau:g}", {**cfg, "tau": tau})
    labels = []
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, text, *a, **kw: labels.append(text))
    md = open(write_sweep_report([str(tmp_path / "t10"), str(tmp_path / "t20")], str(tmp_path / "rep"))).read()
    assert "| α \\ τ | 10 | 20 |" in md
    assert "| tau=10 | vanilla |" in md and "| tau=20 | distill-dense |" in md and "tau=10.0" not in md
    assert "ReLU-state entropy [bits] (thin)" in labels


def test_a_seed_run_twice_counts_once_and_the_other_curve_is_named(tmp_path):
    """Seed 0 alone, then a study of seeds 0 and 1 (another directory: the seeds are in its name): the
    group pools seed 0 once (the first directory's) and seed 1; the second seed-0 curve was left out
    silently, it is now named. A link to the same run (a sweep's --reuse) is one run, not named."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "rate": 0.5, "wall": 0.95}
    _fill(tmp_path / "one", {**cfg, "seeds": [0]}, phases=("teacher",))
    _fill(tmp_path / "two", {**cfg, "seeds": [0, 1]}, phases=("teacher",))
    write_csv(f"{tmp_path}/two/seed1/teacher/metrics.csv",  # (seed 1's curve: test 0.6 at its best round)
              [{"round": i, "sparsity": s, "val_acc": v, "test_acc": t - 0.1, "entropy_mean": 0.5,
                "cum_flops": 1e12 * (i + 1), "paper_cum_flops": 2e12 * (i + 1)} for i, (s, v, t) in enumerate(_CURVE)])
    (tmp_path / "link" / "seed0").mkdir(parents=True)
    write_json(tmp_path / "link" / "config.json", {**cfg, "seeds": [0], "git_commit": "x"})
    os.symlink(tmp_path / "one" / "seed0" / "teacher", tmp_path / "link" / "seed0" / "teacher")
    dirs = [str(tmp_path / d) for d in ("one", "link", "two")]
    md = open(write_sweep_report(dirs, str(tmp_path / "rep"))).read()
    (row,) = [r for r in _rows(tmp_path / "rep" / "table1.csv") if r["stop_rule"] == "none"]
    assert (row["seeds"], row["test_n"], float(row["test_mean"])) == ("2", "2", (70 + 60) / 2)
    assert (f"Left out, a seed's second curve (the first one's is shown): 'teacher' seed 0 of '{tmp_path / 'two'}' "
            f"(shown: '{tmp_path / 'one'}').") in md
    assert str(tmp_path / "link") not in md.split("## Tables 1")[1]


def test_one_path_for_run_dirs_is_refused_not_read_as_its_characters(tmp_path):
    """write_sweep_report(run_dirs="runs/x"): each character was a directory without config.json, an
    empty report ("0 run directories") with no error; now a TypeError saying to pass a list."""
    import pytest
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    _fill(tmp_path / "run", cfg, phases=("teacher",))
    for one in (str(tmp_path / "run"), tmp_path / "run"):
        with pytest.raises(TypeError, match="run_dirs must be a list of run directories, got one path"):
            write_sweep_report(one, str(tmp_path / "rep"))
    md = open(write_sweep_report([str(tmp_path / "run")], str(tmp_path / "rep"))).read()
    assert "1 run directories, 1 setting(s)" in md


def test_the_figure_legend_prints_the_setting_as_the_tables_do(tmp_path, monkeypatch):
    """tau 10.0 and 20.0 in config.json: the tables say tau=10 and tau=20, and so does the overlay
    figure's legend (it said tau=10.0 and tau=20.0, the config's floats)."""
    from matplotlib.axes import Axes
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": ["dense"],
           "seeds": [0], "rate": 0.5, "wall": 0.95, "alpha": 0.5}
    for tau in (10.0, 20.0):
        _fill(tmp_path / f"t{tau:g}", {**cfg, "tau": tau})
    labels, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: labels.append(kw.get("label")) or plot(self, *a, **kw))
    write_sweep_report([str(tmp_path / "t10"), str(tmp_path / "t20")], str(tmp_path / "rep"))
    legend = [lab for lab in labels if lab]
    assert legend == ["tau=10 vanilla", "tau=10 distill-dense", "tau=20 vanilla", "tau=20 distill-dense"]


def test_a_phase_whose_run_failed_before_its_first_round_is_counted(tmp_path):
    """A study of its own student schedule (--student-lr 1e12: its vanilla diverged in round 0) failed
    after linking its teacher: its setting showed the teacher's row alone, failed 0, before 2026-12-06;
    now its vanilla and distilled students have rows of no result, their seeds failed, and a note."""
    plan = make_plan(_settings(tmp_path, student_lr=[0.1, 1e12], seeds=[0, 1]), str(tmp_path / "sw"), threads=1)
    studies = {(r.point["student_lr"], r.seed): r for r in plan if r.kind == "study"}
    assert {r.phases[0] for r in studies.values()} == {"teacher", "vanilla"}  # (1e12: a vanilla run of its own)
    for (lr, seed), r in studies.items():
        if lr == 0.1:
            _fill(r.run_dir, r.config)
        else:  # the teacher linked (here its curve), then the run ended: no vanilla or distill-dense round
            _fill(r.run_dir, {**r.config, "seeds": [seed]}, phases=("teacher",))
    status = {r.name: {"state": "failed" if r.kind == "study" and r.point["student_lr"] == 1e12 else "done",
                       "kind": r.kind, "log": "x.log"} for r in plan}
    planned = {r.run_dir: r.config for r in plan if r.kind == "study"}
    md = open(write_sweep_report([r.run_dir for r in studies.values()], str(tmp_path / "rep"), status,
                                 axes=["student_lr"], planned=planned)).read()
    t1 = [r for r in _rows(tmp_path / "rep" / "table1.csv") if r["student_lr"] == "1000000000000.0"]
    assert [(r["run"], r["phase"], r["seeds"], r["seeds_started"], r["failed"], r["failed_seeds"]) for r in t1] == [
        ("teacher (lenet300)", "teacher", "2", "2", "0", ""),
        ("(no result)", "vanilla", "0", "2", "2", "0 1"), ("(no result)", "distill-dense", "0", "2", "2", "0 1")]
    assert float(t1[0]["test_mean"]) == 100 * max(_CURVE, key=lambda c: c[1])[2]  # (the teacher's own curve, kept)
    best = [r for r in _rows(tmp_path / "rep" / "best_model.csv") if r["student_lr"] == "1000000000000.0"]
    assert [(r["phase"], r["seeds"], r["failed"]) for r in best] == [("teacher", "2", "0"), ("vanilla", "0", "2"),
                                                                     ("distill-dense", "0", "2")]
    assert "No result: 'vanilla' seed(s) [0, 1]; 'distill-dense' seed(s) [0, 1] (the run failed" in md
    ok = [r for r in _rows(tmp_path / "rep" / "table1.csv") if r["student_lr"] == "0.1"]
    assert len(ok) == 6 and all(r["failed"] == "0" and r["seeds"] == "2" for r in ok)  # (unchanged)


def test_a_killed_report_s_temporary_files_are_removed_by_the_next(tmp_path, capsys):
    """`sweep report DIR` killed while writing left its temporary files in DIR/report, and nothing removed
    them (a sweep's start cleans its own folder only): the next report removes a dead writer's of its own
    files (summary.md, the CSVs, the figures), and leaves a file of another name alone."""
    import subprocess
    import sys

    from sparsetrain.experiment.files import TMP_TAG
    from sparsetrain.sweep import cli
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    runs = tmp_path / "runs"
    _fill(runs / "a", cfg, phases=("teacher",))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # (a pid no process has now: a dead writer's)
    rep = runs / "report"
    rep.mkdir()
    left = [rep / f"{n}.{TMP_TAG}.{child.pid}" for n in ("summary.md", "table1.csv", "best_model.csv",
                                                          "accuracy_vs_sparsity.png", "by_tau.png")]
    other = rep / f"notes.txt.{TMP_TAG}.{child.pid}"  # (not the report's)
    for f in left + [other]:
        f.write_text("half")
    assert cli.main(["report", str(runs)]) == 0
    assert capsys.readouterr().out.strip() == str(rep / "summary.md")
    assert not any(f.exists() for f in left) and other.read_text() == "half"
    assert (rep / "summary.md").read_text().startswith("# DSD² report") and (rep / "table1.csv").is_file()


def test_a_stale_output_that_cannot_be_removed_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A report with nothing left for table1.csv / best_model.csv / a figure removes the earlier one; in a
    read-only folder that os.remove was an OSError traceback: now WriteFailed naming the file (`report`:
    one line, exit 2), as a write's, and the files stay."""
    import errno

    import pytest

    from sparsetrain.experiment.files import WriteFailed
    from sparsetrain.sweep import cli
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    runs = tmp_path / "runs"
    _fill(runs / "a", cfg, phases=("teacher",))
    rep = runs / "report"
    assert cli.main(["report", str(runs)]) == 0
    assert all((rep / n).is_file() for n in ("accuracy_vs_sparsity.png", "table1.csv", "best_model.csv"))
    capsys.readouterr()
    remove = os.remove

    def read_only(path, *a, **k):  # (the report folder made read-only: root ignores chmod)
        if os.path.dirname(os.fspath(path)) == str(rep):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return remove(path, *a, **k)
    monkeypatch.setattr(os, "remove", read_only)
    os.remove(runs / "a" / "seed0" / "teacher" / "metrics.csv")  # (no curve: the figure goes)
    with pytest.raises(WriteFailed) as e:
        write_sweep_report([str(runs / "a")], str(rep))
    assert e.value.filename == str(rep / "accuracy_vs_sparsity.png")
    monkeypatch.setattr("sparsetrain.sweep.report.write_figures", lambda *a: [])  # (past the figures: the CSVs)
    (runs / "a" / "config.json").write_text("{not json")  # (no readable run: no rows, the CSVs go)
    with pytest.raises(WriteFailed) as e:
        write_sweep_report([str(runs / "a")], str(rep))
    assert e.value.filename == str(rep / "table1.csv")
    assert cli.main(["report", str(runs / "a"), "--out", str(rep)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write {rep / 'table1.csv'}: Permission denied; free space (or fix permissions) " \
                  "and run the same command again\n"  # (a report has nothing to resume: it said "to resume")
    assert all((rep / n).is_file() for n in ("accuracy_vs_sparsity.png", "table1.csv", "best_model.csv"))


def test_the_runs_table_shows_a_run_s_warning(tmp_path):
    """A finished run whose log could not take its last line has a `warning` in status.json (and on stderr);
    the report's table of runs showed errors only, so it was missing there: now it is shown beside the log."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    _fill(tmp_path / "a", cfg, phases=("teacher",))
    warning = f"cannot write {tmp_path / 'a.log'}: No space left on device"
    status = {"a": {"state": "done", "kind": "teacher", "seconds": 3, "log": str(tmp_path / "a.log"), "warning": warning},
              "b": {"state": "failed", "kind": "study", "log": str(tmp_path / "b.log"), "error": "RunFailed: exit code 1"}}
    md = open(write_sweep_report([str(tmp_path / "a")], str(tmp_path / "rep"), status)).read()
    assert f"| a | teacher | done | 3 | warning: {warning} — {tmp_path / 'a.log'} |" in md.splitlines()
    assert f"| b | study | failed |  | RunFailed: exit code 1 — {tmp_path / 'b.log'} |" in md.splitlines()  # (as before)


def test_overlay_colours_follow_the_values_numerically_and_stay_distinct(tmp_path, monkeypatch):
    """The overlay coloured the values in their text's order ("10" before "2": tau 2 got the second colour,
    not the first) and from ten colours, so an 11th value took the 1st's: now numbers are ordered by value
    (C0, C1, ... for 1 < 2 < 10, whatever the groups' order) and every value has its own colour."""
    from matplotlib.axes import Axes
    from matplotlib.colors import to_rgba

    from sparsetrain.sweep.figures import _colours, plot_overlay
    from sparsetrain.sweep.aggregate import load_groups
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95, "alpha": 0.5}
    taus = [1.0 * t for t in range(1, 13)]  # (12 values: 10, 11 and 12 sort before 2 as text)
    for tau in taus:
        _fill(tmp_path / f"t{tau:g}", {**cfg, "tau": tau}, phases=("teacher",))
    drawn, plot = [], Axes.plot

    def record(self, *a, **kw):
        line = plot(self, *a, **kw)
        if kw.get("label"):
            drawn.append((kw["label"], to_rgba(line[0].get_color())))
        return line
    monkeypatch.setattr(Axes, "plot", record)
    groups = load_groups([str(tmp_path / f"t{t:g}") for t in reversed(taus)], [])  # (drawn in the groups' order)
    assert plot_overlay(groups, "tau", ["tau"], str(tmp_path / "o.png"))
    colour = {label.split()[0]: c for label, c in drawn}
    assert len(colour) == 12 and len(set(colour.values())) == 12  # (each value its own colour)
    assert colour["tau=2"] == to_rgba("C1") and colour["tau=10"] == to_rgba("C9")  # (C0, C1, ... by value)
    few = load_groups([str(tmp_path / f"t{t:g}") for t in (10.0, 2.0, 1.0)], [])
    drawn.clear()
    plot_overlay(few, "tau", ["tau"], str(tmp_path / "f.png"))
    assert dict((lab.split()[0], c) for lab, c in drawn) == {"tau=1": to_rgba("C0"), "tau=2": to_rgba("C1"),
                                                            "tau=10": to_rgba("C2")}
    assert len({to_rgba(c) for c in _colours(30)}) == 30  # (past 20 values too)


def _failed_run_row(tmp_path, error: str, log: str) -> str:
    """The sweep report's row of runs for study run `a` (one finished teacher phase) that failed with `error`,
    its log TMP/`log`."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    _fill(tmp_path / "a", cfg, phases=("teacher",))
    status = {"a": {"state": "failed", "kind": "study", "log": str(tmp_path / log), "error": error}}
    md = open(write_sweep_report([str(tmp_path / "a")], str(tmp_path / "rep"), status)).read()
    (row,) = [line for line in md.splitlines() if line.startswith("| a |")]
    return row


def test_a_pipe_in_a_run_s_error_keeps_the_runs_table_s_columns(tmp_path):
    """A run's error (a crash's exception line) or log path holding "|" split its row of the Markdown table of
    runs into extra columns (the error cut off under no heading): it is escaped now, the row keeps 5 cells."""
    error = "RunFailed: exit code 1: TypeError: unsupported operand type(s) for |: 'int' and 'str'"
    row = _failed_run_row(tmp_path, error, "a|b.log")
    cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert cells == ["a", "study", "failed", "", f"{error} — {tmp_path / 'a|b.log'}"]


def test_a_pipe_in_a_setting_or_phase_keeps_the_sweep_tables_columns(tmp_path):
    """A `|` in a setting's value (a --teachers path) or a phase name (distill-path-a|b, the path's stem) split
    its row of Table 12 (setting and phase cells) into extra columns; they are escaped now: every row of every
    table in summary.md has its header's cells, and the cells read back whole."""
    base = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "seeds": [0],
            "rate": 0.5, "wall": 0.95, "alpha": 0.5}
    runs = {"a": ("ckpt/a|b.pt", 2.0), "b": ("ckpt/a|b.pt", 4.0), "c": ("dense", 2.0)}
    for name, (teacher, tau) in runs.items():
        phase = "distill-path-a|b" if teacher != "dense" else "distill-dense"
        _fill(tmp_path / name, {**base, "teachers": [teacher], "tau": tau}, phases=("teacher", phase))
    md = open(write_sweep_report([str(tmp_path / n) for n in runs], str(tmp_path / "rep"))).read()
    split = lambda line: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # noqa: E731 (GFM's)
    tables, header = 0, None
    for line in md.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header, tables = split(line), tables + 1
        else:
            assert len(split(line)) == len(header), (header, line)
    assert tables >= 4  # (Table 5's, Table 12 and a Table 1 per setting were all checked)
    t12 = [split(l) for l in md.splitlines() if l.startswith("| tau=")]
    assert {(r[0], r[1]) for r in t12} >= {("tau=2, teachers=['ckpt/a|b.pt']", "distill-path-a|b"),
                                          ("tau=4, teachers=['ckpt/a|b.pt']", "distill-path-a|b")}, t12


def test_a_run_whose_metrics_record_cannot_be_read_is_named_with_the_reason(tmp_path, monkeypatch):
    """A metrics.csv record that cannot be read (EACCES, EIO) was called "unreadable" as if damaged (files.verify's
    CorruptFile); it is files.ReadFailed now, naming the file and the errno text, and the sweep report still leaves
    that run out by name and reports the others."""
    import errno

    from sparsetrain.experiment import files
    runs = tmp_path / "runs"
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    _fill(runs / "kept", cfg, phases=("teacher",))
    _fill(runs / "denied", {**cfg, "eps": 0.2}, phases=("teacher",))
    metrics = runs / "denied" / "seed0" / "teacher" / "metrics.csv"
    write_csv(str(metrics), _rows(metrics), checksum=True)
    record, real = str(metrics) + ".sha256", open

    def denied(path, *a, **k):
        if str(path) == record:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path, *a, **k)
    monkeypatch.setattr(files, "open", denied, raising=False)
    md = open(write_sweep_report([str(runs / d) for d in ("kept", "denied")], str(tmp_path / "rep"))).read()
    left = next(line for line in md.splitlines() if line.startswith("**Left out, unreadable"))
    assert f"'{runs / 'denied'}' (cannot read {record}: Permission denied; fix its permissions" in left, left
    assert md.startswith("# DSD² sweep\n\n2 run directories, 1 setting(s)")  # (the kept run's alone: eps 0.1)


def _gfm_cells(row: str) -> list:
    """A GFM table row's cells as rendered text (cmark-gfm's and markdown-it's rules): split at each `|` not
    preceded by a backslash, each `\\|` then read as `|`, then CommonMark's backslash escapes (`\\` before ASCII
    punctuation: that character), a `<br>` (a line break), a `<wbr>` (nothing) and the entities `&lt;`, `&amp;` in
    one pass."""
    assert "\n" not in row and "\r" not in row, row  # (a line break ends the row)
    cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    inline = lambda c: re.sub(r"\\([!-/:-@\[-`{-~])|<w?br>|&lt;|&amp;",  # noqa: E731 (<wbr>: an empty element)
                              lambda m: m.group(1) or {"<br>": "\n", "<wbr>": "", "&lt;": "<", "&amp;": "&"}[m[0]], c)
    return [inline(c) for c in cells]


def test_md_cell_renders_any_text_as_one_cell_with_that_text(tmp_path):
    """md_cell escaped `|` only: a text's own `\\|` became `\\\\|`, which GFM renders as `|` (its backslash lost), and
    a line break (a multi-line error) ended the table row. Now every text renders as one cell reading as itself,
    line breaks as `<br>`; a text without `|`, line breaks or backslash escapes is written as it is."""
    from sparsetrain.experiment.report.tables import md_cell
    texts = ["a|b", "a\\|b", "a\\\\|b", "end\\", "a\nb", "one\r\ntwo\rthree", "back\\\nslash", "a\\*b", "C:\\data\\run",
             "x | y\\| z\\\\|"]
    for text in texts:
        assert _gfm_cells(f"| k | {md_cell(text)} |") == ["k", text.replace("\r\n", "\n").replace("\r", "\n")], text
    for plain in ("C:\\data\\run", "tau=10, teachers=['ckpt/a.pt']", "end\\"):
        assert md_cell(plain) == plain
    # the sweep report's table of runs: a failed run's multi-line error with a `\|` keeps its row and its text
    error = "RunFailed: exit code 1: ValueError: bad value a\\|b\nsecond line"
    assert _gfm_cells(_failed_run_row(tmp_path, error, "a.log")) == ["a", "study", "failed", "", f"{error} — {tmp_path / 'a.log'}"]


def _inert(cell: str) -> bool:
    """Whether a cell's Markdown holds no markup: each `*`, `` ` ``, `~`, `$`, `<`, a `_` not inside a word, a `]`
    before `(`/`[` and an entity's `&` comes escaped (a `\\` before it), or as `&lt;`/`&amp;`; `<br>` (a line
    break) aside, nor GitHub's emoji or autolinks (`<wbr>` cuts them)."""
    # (escaped characters, line breaks, entities; a `<wbr>` as NUL: a text node's end, where a mention may start)
    plain = re.sub(r"\\[!-/:-@\[-`{-~]|<w?br>|&lt;|&amp;", lambda m: "\0" if m[0] == "<wbr>" else " ", cell)
    # (and what GitHub links or replaces in text: an emoji's `:name:`, a bare URL, a `www.` domain, an email address)
    github = r":[\w+-]*[A-Za-z+-][\w+-]*:|(?i:https?|ftp)://|(?i:www)\.\w|[\w.+-]@[\w-]+\.[\w-]"
    # (an @mention, GitHub's: not one before `.x`, an address's domain; an issue reference)
    github += r"|(?<![A-Za-z0-9_])@(?>[A-Za-z0-9][A-Za-z0-9-]*)(?=\.+[ \t\W]|\.+$|[^0-9a-zA-Z_.]|$)|#\d|(?i:(?<![^\W_])gh)-\d"
    return not re.search(r"[*`~$<]|(?<![^\W_])_|_(?![^\W_])|\](?=[(\[])|&(?=#?\w+;)|" + github, plain)


def test_md_cell_shows_markdown_in_a_text_as_written(tmp_path):
    """md_cell escaped `|` and line breaks only: a text's `*x*` or `_x_` rendered as emphasis (its marks lost), a
    backtick as code, `~~x~~` struck through, `[a](b)` a link, a literal `<br>` a line break and other HTML
    rendered or dropped. Now each is escaped (CommonMark backslash escapes; `<` as `&lt;`, an entity's `&` as
    `&amp;`): the cell reads as the text; a `_` inside a word (snake_case: no emphasis there) and brackets that
    form no link stay as written."""
    from sparsetrain.experiment.report.tables import md_cell
    assert md_cell("*x* _y_ `z` <br> a<b>") == r"\*x\* \_y\_ \`z\` &lt;br> a&lt;b>"
    assert md_cell("~~s~~ $x$ [a](b) &lt; &#124; a & b") == r"\~\~s\~\~ \$x\$ [a\](b) &amp;lt; &amp;#<wbr>124; a & b"  # (`#124`: an issue reference)
    texts = ["*x*", "_y_", "__init__", "`code`", "``a`b``", "~~s~~", "$x$", "[a](b)", "![i](p.png)", "[a][b]", "<br>",
             "<b>bold</b>", "<https://x.org>", "&lt;", "&#124;", "&amp;", "a\\*b*", "a\\_b_", "x_\n_y", "é_ü_",
             "ValueError: bad *weight* in `conv_1` | see <log>\nline 2"]
    for text in texts:
        cell = md_cell(text)
        assert _gfm_cells(f"| k | {cell} |") == ["k", text], text
        assert _inert(cell), (text, cell)
    for plain in ("seed_0/distill_a.pt", "teachers=['ckpt/a.pt'], [1, 2]", "a & b", "x > y"):
        assert md_cell(plain) == plain
    # the sweep report's table of runs: an error with Markdown in it reads as written
    error = "RunFailed: exit code 1: KeyError: '*x*' in <module> `f`"
    assert _gfm_cells(_failed_run_row(tmp_path, error, "a_.log")) == ["a", "study", "failed", "",
                                                                     f"{error} — {tmp_path / 'a_.log'}"]


def test_a_run_s_name_reads_as_written_in_the_runs_table_and_the_failed_runs_sentence(tmp_path):
    """The table of runs wrote a run's name (and kind, state) as it is, and so did the bold sentence naming the failed
    runs and the one naming the unreadable run directories: a name's `|` split the row, its `*x*`, `_x_` or
    backticks rendered as emphasis or code (the marks lost). They are escaped as the other cells are (md_cell)."""
    name = "r*1*_a_|`b`"
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": [],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    _fill(tmp_path / name, cfg, phases=("teacher",))
    (tmp_path / "bad_*x*").mkdir()
    (tmp_path / "bad_*x*" / "config.json").write_text("{")
    status = {name: {"state": "failed", "kind": "study", "log": "", "error": ""}}
    md = open(write_sweep_report([str(tmp_path / name), str(tmp_path / "bad_*x*")], str(tmp_path / "rep"),
                                 status)).read()
    (row,) = [line for line in md.splitlines() if line.startswith("| r")]
    assert _gfm_cells(row) == [name, "study", "failed", "", ""], row
    failed = next(line for line in md.splitlines() if line.startswith("**1 run(s) failed"))
    assert failed == r"**1 run(s) failed or were interrupted:** 'r\*1\*\_a\_\|\`b\`'"
    assert _gfm_cells(f"| {failed.split(':** ')[1]} |") == [repr(name)]
    left = next(line for line in md.splitlines() if line.startswith("**Left out, unreadable"))
    assert _gfm_cells(f"| {left.split(':** ')[1]} |")[0].startswith(repr(str(tmp_path / "bad_*x*"))), left


def test_md_cell_keeps_github_from_linking_or_replacing_a_text_s_urls_addresses_and_emoji_shortcodes(tmp_path):
    """GitHub renders a cell's `:smile:` as an emoji and links a bare `https://...`, `www.x.org` or `a@b.org` (GFM's
    extended autolinks); a backslash escape does not stop the emoji (GitHub replaces it in the rendered text), so an
    error's `:name:` or URL lost its text. md_cell cuts each with an empty `<wbr>`: the cell reads as the text, and
    numbers (a time's `12:30:45`) and names keep as they are."""
    from sparsetrain.experiment.report.tables import md_cell
    assert md_cell(":smile: a:+1: :100: :a:b:") == ":<wbr>smile: a:<wbr>+1: :<wbr>100: :<wbr>a:<wbr>b:"
    assert md_cell("https://x.org HTTP://Y.ORG ftp://z (www.x.org) _www.y.org") == \
        r"https<wbr>://x.org HTTP<wbr>://Y.ORG ftp<wbr>://z (www<wbr>.x.org) \_www<wbr>.y.org"
    assert md_cell("git@github.com:a/b.git mailto:a@b.org") == "git<wbr>@github.com:a/b.git mailto:a<wbr>@b.org"
    texts = [":smile:", ":white_check_mark: done", "see https://x.org/a_b?c=1", "<https://x.org>", "www.x.org/a",
             "mail a.b+c@d-e.org", "OSError: [Errno 2] :x: at http://h:80/p (git@host.org)"]
    _assert_cells_read_as_typed(texts, ("12:30:45", "tau=10, eps=0.1", "C:\\data\\run", "awww.x", "s3://bucket/run",
                                        "a@b", "ratio 1:2:3"))
    # the sweep report's table of runs: an error naming a URL and an emoji shortcode reads as written
    error = "RunFailed: exit code 1: HTTPError: https://x.org/mnist.gz :x:"
    assert _gfm_cells(_failed_run_row(tmp_path, error, "a.log")) == ["a", "study", "failed", "", f"{error} — {tmp_path / 'a.log'}"]


def _assert_cells_read_as_typed(texts, plain):
    """Each of `texts` as md_cell writes it is one GFM cell reading as the text, with nothing GitHub would link or
    render (_inert); each of `plain` is written unchanged."""
    from sparsetrain.experiment.report.tables import md_cell
    for text in texts:
        cell = md_cell(text)
        assert _gfm_cells(f"| k | {cell} |") == ["k", text], text
        assert _inert(cell), (text, cell)
    for p in plain:
        assert md_cell(p) == p


def test_md_cell_and_md_heading_keep_github_from_linking_mentions_and_issue_references(tmp_path):
    """A cell's or heading's `@alice` (a run or teacher file named after someone, an error quoting one), `#123`,
    `owner/repo#123` or `GH-123` were written as they were: GitHub turned them into a link (and a notification, an
    issue's back-reference). Each is cut by an empty `<wbr>` now, as the URLs and emoji shortcodes are: after the
    `@`, after a `#` before a digit, before `GH`'s `-`; a text with none of them is written as before."""
    from sparsetrain.experiment.report.tables import md_cell, md_heading
    assert md_cell("@alice (@org/team) #123 owner/repo#45 gh-6") == \
        "@<wbr>alice (@<wbr>org/team) #<wbr>123 owner/repo#<wbr>45 gh<wbr>-6"
    assert md_heading("run @bob #7") == "run @<wbr>bob #<wbr>7" and md_heading("a #1 #") == "a #<wbr>1 \\#"
    assert md_cell("&#124; a.b@c.org") == "&amp;#<wbr>124; a.b<wbr>@c.org"  # (the address's cut as before)
    texts = ["@alice", "cc @a-b, @c.", "(@org/team)", "#1", "fixes #12, a/b#3 and GH-4", "`@z` #0x1"]
    _assert_cells_read_as_typed(texts, ("a@b", "x @ y", "C# #x #", "a/b#c", "GH-x", "agh-1", "tau=10, eps=0.1"))
    # in the reports: the table of runs' error cell and the sweep's title
    error = "RunFailed: exit code 1: see #12 (@alice)"
    row = _failed_run_row(tmp_path, error, "a.log")
    assert _gfm_cells(row) == ["a", "study", "failed", "", f"{error} — {tmp_path / 'a.log'}"]
    assert "see #<wbr>12 (@<wbr>alice)" in row
    md = open(write_sweep_report([], str(tmp_path / "rep"), title="sweep @carol #9")).read()
    assert md.startswith("# DSD² sweep @<wbr>carol #<wbr>9\n"), md[:60]


def test_the_notes_and_headings_around_table1_show_a_phase_s_and_setting_s_text_as_written(tmp_path):
    """Each Table 1's heading (the setting's label) and its notes (a phase with no result, in progress, did not
    finish; a second curve's run folders) wrote a phase name or setting as it is: a --teachers path's `*x*` became
    emphasis, its `|` or `_x_` marks lost. They go through md_cell now, as the table's cells do."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "seeds": [0], "rate": 0.5,
           "wall": 0.95}
    for run, teacher in (("a", "ckpt/*x*_y_.pt"), ("b", "dense")):
        _fill(tmp_path / run, {**cfg, "teachers": [teacher]}, phases=("teacher",))
    status = {"a": {"state": "failed", "kind": "study", "log": "", "error": ""}, "b": {"state": "done", "kind": "study"}}
    md = open(write_sweep_report([str(tmp_path / n) for n in status], str(tmp_path / "rep"), status)).read()
    assert r"No result: 'distill-path-\*x\*\_y\_' seed(s) [0]" in md, md
    assert r"### mnist, ε = 0.1, lenet300 (teachers=['ckpt/\*x\*\_y\_.pt'])" in md, md


def test_report_of_runs_stopped_outside_a_sweep_reads_their_seed_status(tmp_path):
    """`sweep report DIR` of runs stopped (SIGTERM), failed or killed outside a sweep (no sweep status to say so)
    called their partial curves "In progress" before 2026-12-07; each seed's status.json says the process ended:
    "Did not finish". A seed still running (its pid alive: this process) is in progress."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "seeds": [0], "rate": 0.5,
           "wall": 0.95, "teachers": []}
    import socket
    from sparsetrain.experiment.seed_status import _boot_id, start_ticks
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": "x", "boot_id": _boot_id(),
          "start_ticks": start_ticks(os.getpid())}  # (this process, told from a reused pid by its start time)
    records = {"stopped": {**me, "state": "stopped", "error": "KeyboardInterrupt: SIGTERM"},
               "failed": {**me, "state": "failed", "error": "RuntimeError: x"},
               "killed": {**me, "state": "running", "start_ticks": me["start_ticks"] - 1},  # (another process)
               "running": {**me, "state": "running"}}
    for i, (name, record) in enumerate(records.items()):
        _fill(tmp_path / name, {**cfg, "eps": 0.1 * (i + 1)}, phases=("teacher",))
        os.remove(tmp_path / name / "seed0" / "teacher" / "best.json")  # (unfinished)
        write_json(str(tmp_path / name / "seed0" / "status.json"), record)
    md = open(write_sweep_report([str(tmp_path / n) for n in records], str(tmp_path / "rep"))).read()
    sections = md.split("### ")[1:]
    for name, section in zip(records, sections):
        ended = name != "running"
        assert ("Did not finish (the run failed or was interrupted" in section) == ended, (name, section)
        assert ("In progress (not finished): 'teacher' seed(s) [0]." in section) != ended, (name, section)


def test_the_notes_and_sentences_naming_phases_runs_and_folders_name_each_unambiguously(tmp_path):
    """The notes under Table 1 (no result, in progress, a second curve's run folders) joined the phase names and
    folders bare with `; `, the failed runs' and unreadable runs' sentences with `, `: a phase named after a
    --teachers file `a; b.pt` (`distill-path-a; b`), or a folder `u, v`, read as two. Each is quoted as Python
    writes a str now (md_quoted, as the run report's phases with metrics), the reason after an unreadable one bare."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "seeds": [0], "rate": 0.5,
           "wall": 0.95}
    _fill(tmp_path / "r, s", {**cfg, "teachers": ["ckpt/a; b.pt"]}, phases=("teacher",))  # (failed: no distill)
    _fill(tmp_path / "p", {**cfg, "eps": 0.2, "teachers": ["ckpt/c; d.pt"]}, phases=("teacher", "distill-path-c; d"))
    os.remove(tmp_path / "p" / "seed0" / "distill-path-c; d" / "best.json")  # (in progress)
    for run in ("one; 1", "two; 2"):  # (seed 0 twice)
        _fill(tmp_path / run, {**cfg, "eps": 0.3, "teachers": []}, phases=("teacher",))
    (tmp_path / "u, v").mkdir()
    (tmp_path / "u, v" / "config.json").write_text("{")
    status = {"r, s": {"state": "failed", "kind": "study", "log": "", "error": ""},
              "p": {"state": "running", "kind": "study"}}
    dirs = [str(tmp_path / n) for n in ("r, s", "p", "one; 1", "two; 2", "u, v")]
    md = open(write_sweep_report(dirs, str(tmp_path / "rep"), status)).read()
    assert "No result: 'distill-path-a; b' seed(s) [0] (the run failed" in md, md
    assert "In progress (not finished): 'distill-path-c; d' seed(s) [0]." in md, md
    assert (f"Left out, a seed's second curve (the first one's is shown): 'teacher' seed 0 of '{tmp_path / 'two; 2'}' "
            f"(shown: '{tmp_path / 'one; 1'}').") in md, md
    assert "**1 run(s) failed or were interrupted:** 'r, s'\n" in md
    assert f"not a study's):** '{tmp_path / 'u, v'}'\n" in md


def test_a_name_that_is_not_utf8_is_written_with_its_bytes_shown(tmp_path):
    """A run folder whose name is not UTF-8 (os.listdir's str holds a surrogate for each such byte), or a setting
    holding one (a --teachers path's: config.json keeps it as `\\udcff`), made writing summary.md or table1.csv raise
    UnicodeEncodeError: no report. Each such byte is written `\\xNN` now (shown_text), in the Markdown and the CSVs."""
    from sparsetrain.experiment.report.tables import md_cell, shown_text
    assert shown_text(os.fsdecode(b"run\xff\xfe.d")) == "run\\xff\\xfe.d" and shown_text("a\ud800b") == "a\\ud800b"
    assert md_cell(os.fsdecode(b"ab\xff*")) == "ab\\xff\\*"
    name = os.fsdecode(b"run\xff")
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "seeds": [0], "rate": 0.5,
           "wall": 0.95}
    for run, teacher in ((name, os.fsdecode(b"t\xff.pt")), ("b", "dense")):
        _fill(os.path.join(tmp_path, run), {**cfg, "teachers": [teacher]}, phases=("teacher",))
    status = {name: {"state": "failed", "kind": "study", "log": "", "error": ""}, "b": {"state": "done", "kind": "study"}}
    md = open(write_sweep_report([os.path.join(tmp_path, n) for n in status], str(tmp_path / "rep"), status),
              encoding="utf-8").read()
    assert "| run\\xff | study | failed |" in md and "**1 run(s) failed or were interrupted:** 'run\\xff'\n" in md
    assert "No result: 'distill-path-t\\xff' seed(s) [0]" in md  # (the phase named after the teacher's file)
    assert {r["phase"] for r in _rows(tmp_path / "rep" / "table1.csv")} == {"teacher", "distill-path-t\\xff"}



def test_a_setting_label_spells_a_byte_that_is_not_utf8_as_a_name_does(tmp_path, monkeypatch):
    """A setting label of a list (a --teachers path that is not UTF-8: `teachers=[...]`, built by repr) wrote such a
    byte `\\udcff`, while a name (the phase, the run folder: shown_text) wrote it `\\xff`: in Table 1's heading, Table
    12's setting, best_model.csv's setting and the CSVs' teachers columns and the figures' legends. Each writes `\\xff` now."""
    from matplotlib.figure import Figure

    from sparsetrain.experiment.report.text import shown_literal
    assert shown_literal(repr(["t\udcff", "a\\udcff", "\udc80\ud800"])) == "['t\\xff', 'a\\\\udcff', '\\x80\\ud800']"
    assert shown_literal('["t\\udcff.pt", "c\\u00e9"]') == '["t\\xff.pt", "c\\u00e9"]'  # (json.dumps's)
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "seeds": [0], "rate": 0.5,
           "wall": 0.95}
    for run, teacher in (("a", os.fsdecode(b"t\xff.pt")), ("b", "dense")):
        _fill(tmp_path / run, {**cfg, "teachers": [teacher]}, phases=("teacher", "distill-dense"))
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append(self) or real(self, *a, **kw))
    md = open(write_sweep_report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "rep")),
              encoding="utf-8").read()
    label = "teachers=['t\\xff.pt']"
    assert f"### mnist, ε = 0.1, lenet300 ({label})" in md and f"| {label} |" in md, md
    assert "udc" not in md
    best = _rows(tmp_path / "rep" / "best_model.csv")
    assert {r["setting"] for r in best} == {label, "teachers=['dense']"}
    for rows in (best, _rows(tmp_path / "rep" / "table1.csv")):
        assert {r["teachers"] for r in rows} == {"['t\\xff.pt']", "['dense']"}
    texts = [t.get_text() for fig in figures for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert f"{label} vanilla" in texts and not any("udc" in t for t in texts), texts


def test_a_legend_entry_of_a_name_starting_with_an_underscore_is_shown(tmp_path, monkeypatch):
    """matplotlib leaves a line whose label starts with `_` out of the legend (its "no legend" mark): a setting of
    dataset `_tmp` (its label `_tmp eps=0.1 ...`) drew its curves with no legend entry. The entries are there now,
    reading as typed (the line's label carries a zero-width prefix, which as_typed takes off the entry)."""
    from matplotlib.figure import Figure
    cfg = {"dataset": "_tmp", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": ["dense"],
           "seeds": [0], "rate": 0.5, "wall": 0.95}
    _fill(tmp_path / "a", cfg)
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append(self) or real(self, *a, **kw))
    write_sweep_report([str(tmp_path / "a")], str(tmp_path / "rep"))
    (ax,) = [ax for fig in figures for ax in fig.axes if ax.get_legend()]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["_tmp eps=0.1 vanilla", "_tmp eps=0.1 distill-dense"], texts
    assert len(ax.get_legend().legend_handles) == 2


def test_headings_keep_a_trailing_hash_of_a_phase_or_the_title(tmp_path):
    """A heading ending in user text that ends in ` #` (the sweep's title, Table 5's block of a phase named after
    a --teachers file `q #.pt`) lost it: CommonMark's closing sequence. The `#` is escaped `\\#` now, and Table
    5's block heading goes through md_cell as the others do (its `*x*` rendered as emphasis)."""
    cfg = {"dataset": "mnist", "eps": 0.1, "model": "lenet300", "student": "lenet300", "teachers": ["/t/*q* #.pt"],
           "seeds": [0], "rate": 0.5, "wall": 0.95, "alpha": 0.5}
    for tau in (10.0, 20.0):
        _fill(tmp_path / f"t{tau:g}", {**cfg, "tau": tau}, phases=("teacher", "distill-path-*q* #"))
    md = open(write_sweep_report([str(tmp_path / "t10"), str(tmp_path / "t20")], str(tmp_path / "rep"),
                                 title="sweep q #")).read()
    heads = [line for line in md.splitlines() if line.startswith("#")]
    assert heads[0] == "# DSD² sweep q \\#"
    assert "### mnist eps=0.1: distill-path-\\*q\\* \\#" in heads, heads


def test_a_setting_label_quotes_a_text_value_that_would_read_as_more_settings(tmp_path, monkeypatch):
    """A setting label joins `k=v` by `, `: a text value holding `, ` or `=` (a --label-file path `/x/a, b.pt`,
    `/x/k=v.pt`), a quote or space at either end read as more settings or another value, in Table 1's headings,
    Table 12's setting, best_model.csv's and the figures' panel titles and legends. Such a value is quoted as Python
    writes a str now (`label_file='/x/a, b.pt'`, md_quoted's text in the Markdown), an ordinary one as before."""
    from matplotlib.figure import Figure
    cfg = {"dataset": "mnist", "model": "lenet300", "student": "lenet300", "teachers": ["dense"], "seeds": [0],
           "rate": 0.5, "wall": 0.95}
    runs = {"a": (0.1, "/x/a, b.pt"), "b": (0.1, "/x/k=v.pt"), "c": (0.1, " /x/s.pt"), "d": (0.2, "/x/it's.pt"),
            "e": (0.2, "/x/c.pt")}
    for run, (eps, path) in runs.items():
        _fill(tmp_path / run, {**cfg, "eps": eps, "label_file": path})
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append(self) or real(self, *a, **kw))
    md = open(write_sweep_report([str(tmp_path / r) for r in runs], str(tmp_path / "rep"))).read()
    shown = ["label_file='/x/a, b.pt'", "label_file='/x/k=v.pt'", "label_file=' /x/s.pt'", "label_file=\"/x/it's.pt\"",
             "label_file=/x/c.pt"]  # (the last as before)
    settings = [f"eps={eps}, {s}" for (eps, _), s in zip(runs.values(), shown)]
    assert re.findall(r"^### mnist, ε = 0\.\d, lenet300 \((.*)\)$", md, re.M) == settings, md
    assert [r["setting"] for r in _rows(tmp_path / "rep" / "best_model.csv") if r["phase"] == "vanilla"] == settings
    assert [line.split(" | ")[0][2:] for line in md.splitlines() if "| vanilla |" in line] == settings
    titles = {ax.get_title() for fig in figures for ax in fig.axes if ax.get_title()}
    texts = {t.get_text() for fig in figures for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert titles == {*shown, "eps=0.1", "eps=0.2"}, titles  # (accuracy_vs_sparsity.png's panels, by_label_file.png's)
    assert {f"{s} vanilla" for s in shown} <= texts and "eps=0.1 vanilla" in texts, texts
