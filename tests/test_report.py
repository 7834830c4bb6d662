"""sparsetrain.experiment.report on tiny metrics.csv files written here: Algorithm 2, phase labels, Table 1, summary.md."""
import csv
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

from sparsetrain.experiment import report as R
from sparsetrain.experiment.report.tables import vanilla_phase

NAN = float("nan")


def make_rows(val, test=None, ent=None, seed=0, phase="teacher", cum=None, teacher_flops=0.0, teacher_cost=0.0,
              rate=0.2):
    """Rows as the study's loop writes them; sparsity 1-(1-rate)^k, round_flops = 3 * fwd * 1000 * 2 epochs;
    the paper's convention charges 1 PFLOP per round (teacher: 0.1 per round, 10 to obtain it)."""
    n = len(val)
    test = test if test is not None else val
    ent = ent if ent is not None else [0.6] * n
    rows, total = [], 0.0
    for k in range(n):
        s = 1 - (1 - rate) ** k
        fwd = 1e6 * (1 - s)
        rf = 3 * fwd * 1000 * 2
        total = cum[k] if cum is not None else total + rf
        rows.append({"seed": seed, "phase": phase, "round": k, "sparsity": s, "epochs": 2, "train_loss": 0.5,
                     "train_acc": 0.9, "val_loss": 1.0, "val_acc": val[k], "test_loss": 1.0, "test_acc": test[k],
                     "entropy_mean": ent[k], "fwd_flops": fwd, "round_flops": rf, "cum_flops": total,
                     "paper_round_flops": 1e15, "paper_cum_flops": 1e15 * (k + 1),
                     "teacher_flops": teacher_flops, "teacher_cost": teacher_cost,
                     "teacher_paper_flops": 0.1e15 if teacher_cost else 0.0,
                     "teacher_paper_cost": 10e15 if teacher_cost else 0.0, "wall_s": 10.0 - k,
                     "sec_per_epoch": (10.0 - k) / 2, "sparse_layers": min(k, 3), "is_best": 0,
                     "entropy/fc1": ent[k], "entropy/fc2": ent[k]})
    return rows


def write_rows(run_dir, rows):
    """Write rows to RUN/seed{S}/{phase}/metrics.csv (floats as repr, like csv.DictWriter does)."""
    d = os.path.join(run_dir, f"seed{rows[0]['seed']}", rows[0]["phase"])
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_config(run_dir, **kw):
    cfg = {"dataset": "fashion-mnist", "eps": 0.2, "model": "lenet300", "student": "lenet300",
           "teachers": ["dense"], "t_e": 0.8, "t_a": 0.8, "early_stop": "none", "seeds": [0, 1], "wall": 0.999,
           "rate": 0.2, "profile": "quick", "git_commit": "abc", "versions": {}}
    cfg.update(kw)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return cfg


def read(path):
    with open(path) as f:
        return f.read()


def table_row(md, name):
    line = next(l for l in md.splitlines() if l.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


# ---------------------------------------------------------------- loading
def test_read_metrics_types_and_load_run(tmp_path):
    rows = make_rows([0.8, 0.85, 0.7])
    rows[1]["test_acc"] = NAN
    write_rows(tmp_path, rows)
    write_rows(tmp_path, make_rows([0.5], seed=3, phase="distill-best"))
    write_config(tmp_path, seeds=[0, 3])
    got = R.read_metrics(tmp_path / "seed0" / "teacher" / "metrics.csv")
    assert [r["round"] for r in got] == [0, 1, 2]
    assert isinstance(got[0]["round"], int) and isinstance(got[0]["sparse_layers"], int)
    assert isinstance(got[0]["seed"], int) and got[0]["phase"] == "teacher"
    assert got[2]["sparsity"] == rows[2]["sparsity"] and got[1]["val_acc"] == 0.85  # repr round-trips
    assert math.isnan(got[1]["test_acc"]) and got[0]["entropy/fc1"] == 0.6
    run = R.load_run(tmp_path)
    assert run["config"]["model"] == "lenet300"
    assert set(run["curves"]) == {"teacher", "distill-best"} and list(run["curves"]["distill-best"]) == [3]


def test_read_metrics_duplicate_and_torn_rows(tmp_path):
    rows = make_rows([0.8, 0.85])
    write_rows(tmp_path, rows + [dict(rows[1], val_acc=0.9)])
    p = tmp_path / "seed0" / "teacher" / "metrics.csv"
    with open(p, "a") as f:
        f.write("0,teacher,")  # a torn last line
    got = R.read_metrics(p)
    assert [r["round"] for r in got] == [0, 1] and got[1]["val_acc"] == 0.9


def test_an_int_column_s_infinite_cell_is_an_unparsed_cell_not_a_traceback(tmp_path):
    """A round (or another int column) of inf or 1e999 raised OverflowError from read_metrics, so the report
    died with a traceback; it is an unparsed cell: the row without a round skipped, as a torn row's."""
    rows = make_rows([0.8, 0.85, 0.7])
    write_rows(tmp_path, rows[:2] + [dict(rows[2], round="inf")] + [dict(rows[2], round=3, sparse_layers="1e999")])
    got = R.read_metrics(tmp_path / "seed0" / "teacher" / "metrics.csv")
    assert [r["round"] for r in got] == [0, 1, 3] and got[2]["sparse_layers"] == "1e999"
    assert [r["val_acc"] for r in got] == [0.8, 0.85, 0.7]


# ---------------------------------------------------------------- Algorithm 2
def test_alg2_stops_in_phase2_when_accuracy_drops():
    rows = make_rows(val=[0.8, 0.85, 0.9, 0.85, 0.8, 0.7, 0.6], ent=[1, 1, 0.95, 0.7, 0.6, 0.5, 0.5])
    # phase 2 from round 3 (0.7 <= 0.8); best 0.9 -> threshold 0.72; round 5 (0.70) stops
    assert R.algorithm2_stop(rows) == 5
    # online: on each prefix it says "stop now" exactly at the stop round
    assert [R.algorithm2_stop(rows[:k + 1]) for k in range(7)] == [None] * 5 + [5, 5]


def test_alg2_stops_immediately_at_phase1_exit():
    rows = make_rows(val=[0.8, 0.9, 0.6, 0.9], ent=[1, 1, 0.5, 0.5])
    assert R.algorithm2_stop(rows) == 2  # best updated with round 2 first (line 9), then 0.6 <= 0.72
    # boundary: entropy exactly eta0*T_E ends phase 1 (loop runs while >), accuracy exactly T_A*best stops
    rows = make_rows(val=[1.0, 0.5], ent=[1.0, 0.5])
    assert R.algorithm2_stop(rows, t_e=0.5, t_a=0.5) == 1


def test_alg2_none_when_entropy_never_drops():
    rows = make_rows(val=[0.8, 0.9, 0.5, 0.2, 0.1], ent=[1, 1.1, 0.9, 0.85, 0.81])
    assert R.algorithm2_stop(rows) is None
    assert R.algorithm2_stop([]) is None
    assert R.algorithm2_stop(make_rows(val=[0.8, 0.1], ent=[NAN, 0.1])) is None


def test_alg2_best_acc_not_updated_in_phase2():
    rows = make_rows(val=[0.5, 0.6, 0.9, 0.7], ent=[1, 0.5, 0.5, 0.5])
    # phase 2 from round 1 with best 0.6 (threshold 0.48); round 2's 0.9 must not raise it to 0.9 (-> 0.72)
    assert R.algorithm2_stop(rows) is None
    assert R.algorithm2_stop(rows + make_rows([0.4] * 5)[4:]) == 4


def test_alg2_nans():
    # NaN entropy keeps phase 1 (best updated by round 2), NaN accuracy neither updates nor stops
    rows = make_rows(val=[0.5, 0.6, 0.9, NAN, 0.7], ent=[1, NAN, 1, 0.5, 0.5])
    assert R.algorithm2_stop(rows) == 4


# ---------------------------------------------------------------- phase labels
def test_labels_double_descent():
    acc = [0.83, 0.83, 0.80, 0.75, 0.70, 0.74, 0.78, 0.785, 0.78, 0.70, 0.5]
    assert R.label_rounds([{"test_acc": a} for a in acc]) == (
        ["light"] * 2 + ["critical"] * 3 + ["sweet"] * 4 + ["collapsed"] * 2)
    # the largest recovery defines the dip (here the second, deeper one); once collapsed, stays collapsed
    acc = [0.83, 0.70, 0.80, 0.60, 0.75, 0.79]
    assert R.label_rounds([{"test_acc": a} for a in acc]) == ["light"] + ["critical"] * 3 + ["sweet"] * 2
    # after the peak, a fall within 5 points stays sweet; a real fall (> 5 points) collapses
    acc = [0.83, 0.70, 0.80, 0.75, 0.79, 0.6]
    assert R.label_rounds([{"test_acc": a} for a in acc]) == ["light", "critical", "sweet", "sweet",
                                                             "sweet", "collapsed"]
    # seed noise of ~tol in the light phase (0.815 then back) is not the dip
    acc = [0.83, 0.815, 0.83, 0.82, 0.75, 0.70, 0.78, 0.70]
    assert R.label_rounds([{"test_acc": a} for a in acc]) == (
        ["light"] * 4 + ["critical"] * 2 + ["sweet", "collapsed"])
    # a rise above the dense level before the dip is light, not a recovery
    acc = [0.80, 0.86, 0.86, 0.78, 0.83]
    assert R.label_rounds([{"test_acc": a} for a in acc]) == ["light"] * 3 + ["critical", "sweet"]


def test_labels_monotone_short_nan():
    lab = lambda acc: R.label_rounds([{"test_acc": a} for a in acc])  # noqa: E731
    assert lab([0.8, 0.8, 0.795, 0.78, 0.7, 0.5]) == ["light"] * 4 + ["collapsed"] * 2
    assert lab([0.8, 0.82, 0.85, 0.86]) == ["light"] * 4
    assert lab([]) == [] and lab([0.5]) == ["light"] and lab([NAN]) == ["n/a"]
    assert lab([0.8, 0.7]) == ["light", "collapsed"]
    assert lab([0.8, 0.8, NAN, 0.6, NAN, 0.7, NAN]) == (
        ["light", "light", "light", "critical", "critical", "sweet", "sweet"])
    assert R.LABEL_RULE in R.label_rounds.__doc__


# ---------------------------------------------------------------- Table 1
def _two_seed_run(tmp_path):
    write_config(tmp_path, teachers=["dense"], wall=0.6)  # round 5 (67%) reaches the wall
    ent = [1, 1, 0.9, 0.7, 0.6, 0.5]
    #                seed 0                                seed 1
    van = {0: [0.80, 0.82, 0.84, 0.83, 0.60, 0.50], 1: [0.80, 0.81, 0.86, 0.85, 0.80, 0.60]}
    tst = {0: [0.70, 0.71, 0.72, 0.73, 0.50, 0.40], 1: [0.70, 0.71, 0.76, 0.75, 0.70, 0.50]}
    dis = {0: [0.80, 0.82, 0.84, 0.83, 0.83, 0.60], 1: [0.80, 0.81, 0.82, 0.85, 0.80, 0.60]}
    for s in (0, 1):
        cum = [1e15 * (k + 1) * (1 + s) for k in range(6)]  # seed 0: 1..6 PFLOPs, seed 1: 2..12
        write_rows(tmp_path, make_rows(van[s], tst[s], ent, seed=s, cum=cum))
        write_rows(tmp_path, make_rows(dis[s], [v - 0.05 for v in dis[s]], ent, seed=s, phase="distill-dense",
                                       cum=cum, teacher_flops=0.5e15, teacher_cost=2e15 * (1 + s)))
    return R.load_run(tmp_path)


def test_summary_table_numbers(tmp_path):
    run = _two_seed_run(tmp_path)
    md = R.summary_table(run)
    sp = lambda k: 100 * (1 - 0.8 ** k)  # noqa: E731
    # columns: 1 early stop, 2 distill, 3 teacher, 4 PFLOPs exact, 5 PFLOPs paper, 6 test (best val <= stop),
    # 7 test at the stop, 8 sparsity (best val), 9 sparsity at the stop, 10 stop round, 11 stop phase,
    # 12 FLOPs saved exact, 13 FLOPs saved paper conv., 14 seeds
    # no early stop: last cum (6, 12 PFLOPs) -> 9 ± std([6, 12], ddof=1) = 4.24; best val: round 2 both seeds
    row = table_row(md, "vanilla, no early stop")
    assert row[1:4] == ["", "", "—"]
    assert row[4] == "9.00 ± 4.24" and row[5] == "6.00 ± 0.00" and row[6] == f"74.00 ± {math.sqrt(8):.2f}"
    assert row[7] == f"45.00 ± {math.sqrt(50):.2f}"  # the last round's model: 0.40, 0.50
    assert row[8] == f"{sp(2):.2f} ± 0.00" and row[10] == "5" and row[14] == "2"
    assert row[11] == "collapsed" and row[12] == ""  # 0.40 / 0.50: more than 5 points under the curve's level
    # early stop: phase 2 from round 3; seed 0 stops at 4 (0.60 <= 0.672), seed 1 at 5 (0.60 <= 0.688)
    row = table_row(md, "vanilla, early stop (Alg. 2)")
    assert row[1] == "✓" and row[10] == "4, 5"
    assert row[4] == f"{(5 + 12) / 2:.2f} ± {math.sqrt(((5 - 8.5) ** 2 + (12 - 8.5) ** 2)):.2f}"
    assert row[5] == f"5.50 ± {math.sqrt(0.5):.2f}"  # 5 and 6 paper rounds
    assert row[6] == f"74.00 ± {math.sqrt(8):.2f}" and row[7] == "50.00 ± 0.00"  # at the stop: 0.50, 0.50
    saved = [100 * (1 - 5 / 6), 0.0]
    assert row[12] == f"{sum(saved) / 2:.1f} ± {abs(saved[0] - saved[1]) / math.sqrt(2):.1f}"
    assert row[13] == row[12]  # (paper rounds 5 of 6 and 6 of 6: the same shares here)
    # the peak rule: the dense entropy is the peak here, so it stops where Algorithm 2 does
    assert table_row(md, "vanilla, early stop (peak rule)")[10] == "4, 5"
    # distill + early stop: best 0.84 / 0.85 in phase 1 -> thr 0.672 / 0.68: both stop at 5 (0.60)
    # best val among rounds <= 5: seed 0 round 2 (test 0.79), seed 1 round 3 (test 0.80)
    row = table_row(md, "distilled from the dense teacher, early stop (Alg. 2)")
    assert row[1:4] == ["✓", "✓", "dense"] and row[10] == "5"
    t0, t1 = 2 + 6 * 0.5, 4 + 6 * 0.5  # teacher cost + 6 rounds of KD inference
    assert row[4] == f"9.00 ± 4.24 (+{(t0 + t1) / 2:.2f})"
    assert row[5] == f"6.00 ± 0.00 (+{10 + 6 * 0.1:.2f})"  # the paper's convention for the teacher too
    assert row[6] == "79.50 ± 0.71"
    assert row[8] == f"{(sp(2) + sp(3)) / 2:.2f} ± {abs(sp(3) - sp(2)) / math.sqrt(2):.2f}"
    row = table_row(md, "distilled from the dense teacher, no early stop")
    assert row[1:4] == ["", "✓", "dense"] and row[4].endswith(f"(+{(t0 + t1) / 2:.2f})")
    # Table 1's order: vanilla (no / early stop), then each teacher (no / early stop)
    names = [l.split("|")[1].strip() for l in md.splitlines() if l.startswith("| vanilla") or l.startswith("| distilled")]
    assert names == ["vanilla, no early stop", "vanilla, early stop (Alg. 2)", "vanilla, early stop (peak rule)",
                     "distilled from the dense teacher, no early stop",
                     "distilled from the dense teacher, early stop (Alg. 2)",
                     "distilled from the dense teacher, early stop (peak rule)"]
    # per-round tables, one per phase, with labels
    assert "### Per round: teacher (lenet300) = vanilla student" in md
    assert "### Per round: student (lenet300) distilled from the dense teacher" in md


def test_summary_table_teacher_stop_earlier_than_end_and_separate_student(tmp_path):
    write_config(tmp_path, model="resnet18", student="vgg", seeds=[0, 1, 2], teachers=["best"])
    write_rows(tmp_path, make_rows([0.8, 0.9, 0.5], ent=[1, 0.5, 0.5]))
    write_rows(tmp_path, make_rows([0.7, 0.75], phase="vanilla"))
    md = R.summary_table(R.load_run(tmp_path))
    row = table_row(md, "teacher (resnet18)")
    assert row[10] == "2†" and row[14] == "1/3"  # not at the wall yet; 1 of 3 seeds
    row = table_row(md, "vanilla, early stop (Alg. 2)")
    # not fired on a curve that ends before the wall: undecided (–†), no saving measurable; a single
    # seed has no ±
    assert row[10] == "–†" and row[6] == "75.00" and row[12] == "n/a"


def test_summary_of_a_curve_stopped_online(tmp_path):
    """The peak rule stopped the run at round 4 (entropy 0.55 <= 0.8 x 0.75 at 3, then val 0.5 < 0.8 x 0.7):
    Alg. 2, not fired by then, is
    undecided (–†, not 'never stopped'); neither rule's saving is measurable against a cut curve."""
    write_config(tmp_path, seeds=[0], student="lenet300", early_stop="entropy-peak", rate=0.5)
    write_rows(tmp_path, make_rows([0.5, 0.6, 0.7, 0.65, 0.5], ent=[0.6, 0.7, 0.75, 0.55, 0.5], rate=0.5))
    md = R.summary_table(R.load_run(tmp_path))
    assert table_row(md, "vanilla, no early stop")[10] == "4†"
    row = table_row(md, "vanilla, early stop (Alg. 2)")
    assert row[10] == "–†" and row[12] == "n/a"
    row = table_row(md, "vanilla, early stop (peak rule)")
    assert row[10] == "4" and row[12] == "n/a"


def test_a_finished_curve_short_of_the_wall_is_decided(tmp_path):
    """A run that ended below the wall because nothing was left to prune (best.json written) is
    finished: a rule that never fired is `–` (not undecided) and its saving is 0; the same curve
    without best.json (still running) is undecided."""
    write_config(tmp_path, seeds=[0], rate=0.5, wall=0.95)
    write_rows(tmp_path, make_rows([0.5, 0.6, 0.7], ent=[0.6, 0.6, 0.6], rate=0.5))
    md = R.summary_table(R.load_run(tmp_path))
    assert table_row(md, "vanilla, early stop (Alg. 2)")[10] == "–†"
    with open(tmp_path / "seed0" / "teacher" / "best.json", "w") as f:
        f.write("{}")
    md = R.summary_table(R.load_run(tmp_path))
    assert table_row(md, "vanilla, no early stop")[10] == "2"
    row = table_row(md, "vanilla, early stop (Alg. 2)")
    assert row[10] == "–" and row[12] == "0.0"


def test_block_and_filter_curves_take_the_recorded_end_not_the_nominal_rate(tmp_path):
    """Block and filter rounds are not the nominal 1 - (1 - s)(1 - rate) (loop.should_stop takes the rule's
    trial round): the report's `†` took the nominal one, so an unfinished block run whose nominal next round is
    past the wall (its actual one may not be) was called complete, and a finished student run stopped online
    was called cut or complete by the nominal round, whatever ended it. Now the unfinished block or filter
    curve is cut, and a finished run's best.json "stop" (why it ended) decides; unstructured as before."""
    rows = make_rows([0.5, 0.6, 0.7, 0.65], rate=0.2)  # sparsity 48.8% at round 3: nominal next 59% >= 50%
    for structure, stop in (("unstructured", "3"), ("block", "3†"), ("filter", "3†")):
        write_config(tmp_path, seeds=[0], wall=0.5, structure=structure)
        write_rows(tmp_path, rows)
        assert table_row(R.summary_table(R.load_run(tmp_path)), "vanilla, no early stop")[10] == stop, structure
    # a student run the peak rule stopped online at round 4 (as test_summary_of_a_curve_stopped_online)
    run = tmp_path / "online"
    rows = make_rows([0.5, 0.6, 0.7, 0.65, 0.5], ent=[0.6, 0.7, 0.75, 0.55, 0.5], rate=0.5, phase="vanilla")
    write_rows(run, rows)  # sparsity 93.75%: nominal next 96.9%
    best = run / "seed0" / "vanilla" / "best.json"
    for wall, why, short in ((0.999, "wall", False), (0.95, "early stop", True), (0.999, None, True)):
        write_config(run, seeds=[0], model="resnet18", student="lenet300", teachers=[], early_stop="entropy-peak",
                     rate=0.5, wall=wall, structure="block")
        best.write_text(json.dumps({"round": 2, "stop": why}))
        assert R.load_run(run)["ended"] == {"vanilla": {0: why}}
        md = R.summary_table(R.load_run(run))
        assert table_row(md, "vanilla, no early stop")[10] == "4" + "†" * short, (wall, why)
        row = table_row(md, "vanilla, early stop (peak rule)")
        assert row[10] == "4" and row[12] == ("n/a" if short else "0.0"), (wall, why)


def test_vanilla_and_path_teachers_in_the_summary(tmp_path):
    """The teacher run is the vanilla run only on the same schedule; --teachers PATH phases keep the
    command's order."""
    write_config(tmp_path, seeds=[0], teachers=["/x/zz.pt", "/x/aa.pt", "dense"], teacher_lr=0.1, student_lr=0.05)
    write_rows(tmp_path, make_rows([0.8, 0.9]))
    for ph in ("distill-path-aa", "distill-path-zz", "distill-dense"):
        write_rows(tmp_path, make_rows([0.8, 0.9], phase=ph))
    run = R.load_run(tmp_path)
    md = R.summary_table(run)
    assert "| teacher (lenet300) |" in md and "| vanilla, no early stop |" not in md
    assert R.ordered_phases(run) == ["teacher", "distill-path-zz", "distill-path-aa", "distill-dense"]


# ---------------------------------------------------------------- summary.md and plots
def _check_pngs(paths):
    assert paths
    for p in paths:
        assert os.path.getsize(p) > 1000
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_report(tmp_path):
    _two_seed_run(tmp_path)
    write_config(tmp_path, teachers=["dense"], wall=0.6, teacher_lr=0.1, teacher_epochs=2, student_lr=0.1,
                 student_epochs=2)
    path = R.write_report(str(tmp_path))
    assert path == os.path.join(str(tmp_path), "summary.md")
    text = read(path)
    for s in ("# DSD² run", "| vanilla, early stop (Alg. 2) |", "## Phase labels", "light", "accuracy_vs_sparsity.png",
              "cum_pflops.png", "| dataset | fashion-mnist |", "| teacher schedule | epochs 2, lr 0.1 |",
              "| student schedule | epochs 2, lr 0.1 |"):
        assert s in text
    _check_pngs([tmp_path / "accuracy_vs_sparsity.png", tmp_path / "cum_pflops.png"])
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_write_report_partial_runs(tmp_path):
    # nothing at all, then a header-only metrics file: no crash, no plots
    (tmp_path / "seed0" / "teacher").mkdir(parents=True)
    text = read(R.write_report(str(tmp_path)))
    assert "none yet" in text and "no completed rounds" in text
    rows = make_rows([0.8])
    with open(tmp_path / "seed0" / "teacher" / "metrics.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n")
    R.write_report(str(tmp_path))
    # one seed, only the teacher's dense round, NaNs everywhere, no config.json
    rows = make_rows([NAN], [NAN], [NAN])
    rows[0]["cum_flops"] = NAN
    write_rows(tmp_path, rows)
    text = read(R.write_report(str(tmp_path)))
    assert "| vanilla, no early stop |" in text and "n/a" in text
    _check_pngs([tmp_path / "accuracy_vs_sparsity.png", tmp_path / "cum_pflops.png"])
    # teacher half done, one seed, with a distill phase of a single round
    write_config(tmp_path, seeds=[0, 1, 2])
    write_rows(tmp_path, make_rows([0.8, 0.82, 0.7]))
    write_rows(tmp_path, make_rows([0.8], phase="distill-dense", teacher_cost=1e15))
    text = read(R.write_report(str(tmp_path)))
    assert "| distilled from the dense teacher, early stop (Alg. 2) |" in text
    assert table_row(text, "vanilla, no early stop")[14] == "1/3"


def test_round_table_marks_rounds_past_a_seeds_last(tmp_path):
    # seed 1's curve ends at round 1 (stopped online): rounds 2-3 average seed 0 alone, and say so
    write_config(tmp_path, seeds=[0, 1])
    write_rows(tmp_path, make_rows([0.80, 0.82, 0.84, 0.83], seed=0))
    write_rows(tmp_path, make_rows([0.80, 0.86], seed=1))
    lines = [l for l in R.summary_table(R.load_run(tmp_path)).splitlines() if l.startswith("| ") and "|--" not in l]
    marks = {int(l.split("|")[1]): l.split("|")[11] for l in lines if l.split("|")[1].strip().isdigit()}
    assert marks and "seeds" not in marks[0] + marks[1]
    assert "1/2 seeds" in marks[2] and "1/2 seeds" in marks[3]


def test_the_teacher_run_is_the_vanilla_run_by_the_studys_own_rule(tmp_path):
    """Where the study trained no vanilla phase (Config.separate_vanilla: the student is the teacher's
    model under any alias, on the same schedule up to settings the run ignores), the summary's
    vanilla rows read the teacher run; before, an alias or a rewind_iter the run ignores (no
    --perturb rewind) dropped them."""
    cases = [(dict(student="lenet-300-100"), "teacher"),  # (an alias of lenet300)
             (dict(teacher_rewind_iter=5, student_rewind_iter=0), "teacher"),  # (ignored without rewind)
             (dict(teacher_rewind_iter=5, student_rewind_iter=0, perturb="rewind"), None),
             (dict(student="vgg_d1g2"), None), (dict(teacher_lr=0.1, student_lr=0.05), None)]
    for i, (settings, phase) in enumerate(cases):
        run_dir = tmp_path / str(i)
        write_config(run_dir, seeds=[0], teachers=["dense"], **settings)
        write_rows(run_dir, make_rows([0.8, 0.9]))
        write_rows(run_dir, make_rows([0.8, 0.9], phase="distill-dense"))
        run = R.load_run(run_dir)
        assert vanilla_phase(run) == phase, settings
        assert ("| vanilla, no early stop |" in R.summary_table(run)) == (phase is not None), settings


def test_no_validation_score_is_na_and_the_sweep_picks_the_same_best_round(tmp_path):
    """A NaN val_acc in round 0 never lost to a later round in the sweep's best-model table (a NaN
    compares as never better), which then reported round 0; with no validation score at all, Table 1
    showed the last round's accuracy as the best-validation model's. Both now take the best finite
    round (metrics.best_index), and n/a where there is none."""
    from sparsetrain.sweep.report import write_sweep_report
    for name, val in (("some", [NAN, 0.7, 0.9, 0.8, 0.75]), ("none", [NAN] * 5)):
        run = tmp_path / name
        write_config(run, seeds=[0], wall=0.6)
        write_rows(run, make_rows(val, [0.50, 0.60, 0.85, 0.70, 0.65]))
        (run / "seed0" / "teacher" / "best.json").write_text("{}")
        row = table_row(R.summary_table(R.load_run(run)), "vanilla, no early stop")
        assert row[6] == ("85.00" if name == "some" else "n/a") and row[8] == ("36.00" if name == "some" else "n/a")
        assert row[9] == "59.04"  # the model at the stop: the last round, 1 - 0.8^4
        write_sweep_report([str(run)], str(tmp_path / f"rep-{name}"))
        with open(tmp_path / f"rep-{name}" / "best_model.csv") as f:
            best = list(csv.DictReader(f))
        got = [(float(r["best_test_mean"]), float(r["sparsity_mean"]), r["seeds"]) for r in best]
        if name == "some":
            assert got == [(85.0, pytest.approx(36.0), "1")]
        else:
            assert len(got) == 1 and math.isnan(got[0][0]) and math.isnan(got[0][1]) and got[0][2] == "0"


def test_flops_saved_is_na_on_a_cut_curve_whichever_rule_cut_it(tmp_path):
    """Alg. 2 stopped the run online at round 5 (below the wall), the peak rule fires at 3: its saving
    against the cut curve (1 - 4/6) is not the saving against the whole curve, which was never trained:
    n/a, as Alg. 2's own. A mean over fewer seeds than the row's says so."""
    write_config(tmp_path, seeds=[0], early_stop="entropy", rate=0.5, student="vgg_d1g5")
    cum = [1e15 * (k + 1) for k in range(6)]
    write_rows(tmp_path, make_rows([0.5, 0.6, 0.7, 0.5, 0.6, 0.5], ent=[0.6, 0.7, 0.75, 0.55, 0.5, 0.4], rate=0.5,
                                   cum=cum, phase="vanilla"))
    (tmp_path / "seed0" / "vanilla" / "best.json").write_text("{}")
    md = R.summary_table(R.load_run(tmp_path))
    assert table_row(md, "vanilla, early stop (Alg. 2)")[10:13:2] == ["5", "n/a"]
    assert table_row(md, "vanilla, early stop (peak rule)")[10:13:2] == ["3", "n/a"]
    two = tmp_path / "two"
    write_config(two, seeds=[0, 1], early_stop="entropy", rate=0.5, wall=0.97, student="vgg_d1g5")
    write_rows(two, make_rows([0.8, 0.8, 0.8, 0.5], ent=[1, 1, 0.5, 0.5], rate=0.5, cum=cum[:4], phase="vanilla"))
    write_rows(two, make_rows([0.8, 0.8, 0.5, 0.8, 0.8, 0.8], ent=[1, 1, 0.5, 0.5, 0.5, 0.5], rate=0.5, cum=cum,
                              phase="vanilla", seed=1))
    for s in (0, 1):
        (two / f"seed{s}" / "vanilla" / "best.json").write_text("{}")
    row = table_row(R.summary_table(R.load_run(two)), "vanilla, early stop (Alg. 2)")
    assert row[12] == "50.0 (1 of 2 seeds)" and row[13] == "50.0 (1 of 2 seeds)" and row[14] == "2"


def test_a_sweep_figure_with_more_panels_than_it_draws_says_so(tmp_path, monkeypatch):
    """plot_overlay draws at most _MAX_PANELS panels; the figure says how many it left out (they were
    dropped without a word)."""
    from matplotlib.figure import Figure

    from sparsetrain.sweep import figures
    groups = []
    for alpha in (0.3, 0.5, 0.7):
        run = tmp_path / f"a{alpha}"
        write_config(run, seeds=[0], alpha=alpha)
        write_rows(run, make_rows([0.5, 0.6]))
        groups.append(R.load_run(run))
    titles = []
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: titles.append(t))
    monkeypatch.setattr(figures, "_MAX_PANELS", 2)
    assert figures.plot_overlay(groups, None, ["alpha"], str(tmp_path / "f.png"))
    assert titles == ["the first 2 of 3 panels: the others' numbers are in table1.csv"]
    # a setting with no curve to draw (a study's teacher alone, no student) gets no empty panel
    titles.clear()
    monkeypatch.setattr(figures, "_MAX_PANELS", 12)
    panels = []
    real = Figure.add_subplot

    def add_subplot(self, *a, **kw):
        if not kw:  # (twinx adds the entropy axes with sharex: not a panel)
            panels.append(a)
        return real(self, *a, **kw)
    monkeypatch.setattr(Figure, "add_subplot", add_subplot)
    bare = dict(groups[0], config={**groups[0]["config"], "alpha": 0.9, "student": "vgg_d1g1"},
                curves={"teacher": groups[0]["curves"][next(iter(groups[0]["curves"]))]})
    assert figures.plot_overlay(groups + [bare], None, ["alpha"], str(tmp_path / "g.png"))
    assert len(panels) == 3 and titles == []


def test_a_sweep_figure_marks_rounds_only_some_seeds_reached(tmp_path, monkeypatch):
    """Where one seed's curve is longer, the mean curve's tail is that seed alone (a zero-width band):
    those rounds are drawn hollow and the legend says so."""
    from matplotlib.axes import Axes

    from sparsetrain.sweep import figures
    run = tmp_path / "r"
    write_config(run, seeds=[0, 1])
    write_rows(run, make_rows([0.5, 0.6, 0.7, 0.6], seed=0))
    write_rows(run, make_rows([0.5, 0.6], seed=1))
    calls, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw)) or real(self, *a, **kw))
    assert figures.plot_overlay([R.load_run(run)], None, [], str(tmp_path / "f.png"))
    hollow = [(a, kw) for a, kw in calls if kw.get("mfc") == "white"]
    assert len(hollow) == 1 and len(hollow[0][0][0]) == 2  # rounds 2 and 3: seed 0 alone
    assert any("(hollow: fewer seeds)" in kw.get("label", "") for _, kw in calls)


def test_flops_saved_in_both_conventions_and_partial_means_marked(tmp_path):
    """FLOPs saved is given exact and in the paper's convention (a dense round per round: the paper's
    Table 1 savings), which differ where the late sparse rounds cost little; every mean over fewer
    seeds than the row's says so (only the saving did; a NaN test accuracy shrank the mean silently)."""
    write_config(tmp_path, seeds=[0, 1], wall=0.999)
    # Alg. 2: phase 2 from round 2 (entropy 0.7 <= 0.8), best 0.86 there, stop at round 3 (0.60 <= 0.688)
    val, ent = [0.80, 0.84, 0.86, 0.60, 0.85], [1, 1, 0.7, 0.7, 0.7]
    cum = [1e15 * c for c in (8, 12, 14, 15, 15.5)]  # exact: late rounds cheap; paper: 1 PFLOP each
    for s in (0, 1):
        rows = make_rows(val, ent=ent, seed=s, cum=cum)
        if s == 1:
            rows[2]["test_acc"] = float("nan")  # (its best-validation round's test accuracy unknown)
        write_rows(tmp_path, rows)
        (tmp_path / f"seed{s}" / "teacher" / "best.json").write_text("{}")
    row = table_row(R.summary_table(R.load_run(tmp_path)), "vanilla, early stop (Alg. 2)")
    assert row[10] == "3"
    assert row[12] == f"{100 * (1 - 15 / 15.5):.1f} ± 0.0" and row[13] == "20.0 ± 0.0"  # exact 3.2%, paper 1 - 4/5
    assert row[6] == "86.00 (1 of 2 seeds)" and row[7] == "60.00 ± 0.00" and row[14] == "2"


def test_the_run_marks_the_best_round_as_the_report_does(tmp_path):
    """loop.finish (best.json, is_best, the `best` teacher) takes the report's best-validation round:
    a NaN validation accuracy in round 0 won there (NaN compares as never smaller)."""
    from sparsetrain.experiment.loop import finish
    rows = make_rows([float("nan"), 0.7, 0.8, 0.8], seed=0)
    finish(str(tmp_path), rows, "wall")
    assert [r["is_best"] for r in rows] == [0, 0, 1, 0]
    assert json.loads((tmp_path / "best.json").read_text())["round"] == 2
    assert json.loads((tmp_path / "best.json").read_text())["stop"] == "wall"  # (why it ended: the report's `†`)


def test_a_best_teacher_that_is_the_dense_one_is_named_so(tmp_path, monkeypatch):
    """When a seed's best-validation teacher is round 0, its distill-best directory links to distill-dense
    (one teacher checkpoint, one student run): Table 1, the per-round heading and the plots' legends say
    so instead of calling that student one distilled from a pruned teacher."""
    from matplotlib.axes import Axes
    write_config(tmp_path, seeds=[0, 1], teachers=["dense", "best"])
    for s in (0, 1):
        write_rows(tmp_path, make_rows([0.8, 0.7], seed=s))
        write_rows(tmp_path, make_rows([0.8, 0.75], seed=s, phase="distill-dense", teacher_cost=1e15))
    os.symlink("distill-dense", tmp_path / "seed0" / "distill-best", target_is_directory=True)
    write_rows(tmp_path, make_rows([0.8, 0.79], seed=1, phase="distill-best", teacher_cost=2e15))
    run = R.load_run(tmp_path)
    assert run["same_as"] == {"distill-best": {0: "distill-dense"}}
    md = R.summary_table(run)
    note = " (= distill-dense in seed 0: the same teacher checkpoint, the same student run)"
    assert table_row(md, f"distilled from the pruned (best-validation) teacher{note}, no early stop")
    assert f"### Per round: student (lenet300) distilled from the best teacher{note}" in md
    assert table_row(md, "distilled from the dense teacher, no early stop")  # (the real one: no note)
    os.remove(tmp_path / "seed1" / "distill-best" / "metrics.csv")
    os.rmdir(tmp_path / "seed1" / "distill-best")
    os.symlink("distill-dense", tmp_path / "seed1" / "distill-best", target_is_directory=True)
    run = R.load_run(tmp_path)
    assert "(= distill-dense in every seed:" in R.summary_table(run)
    labels, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: labels.append(kw.get("label")) or real(self, *a, **kw))
    R.plot_run(run, str(tmp_path))
    monkeypatch.undo()
    assert sum("(= distill-dense in every seed" in (l or "") for l in labels) == 2  # both figures
    from sparsetrain.sweep import figures  # (the sweep's overlay: a group carries its runs' same_as)
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: labels.append(kw.get("label")) or real(self, *a, **kw))
    labels.clear()
    assert figures.plot_overlay([run], None, [], str(tmp_path / "overlay.png"))
    monkeypatch.undo()
    assert [l for l in labels if l and "distill-best" in l] == [
        "fashion-mnist eps=0.2 distill-best (= distill-dense in every seed: the same teacher checkpoint, the same "
        "student run)"]
    # a phase linked from another run (--reuse) is no twin of this seed's phases
    other = tmp_path / "other"
    write_rows(other, make_rows([0.8, 0.7], seed=0, phase="vanilla"))
    os.symlink(other / "seed0" / "vanilla", tmp_path / "seed0" / "vanilla", target_is_directory=True)
    assert "vanilla" not in R.load_run(tmp_path)["same_as"]


def test_the_study_plot_stars_the_round_most_seeds_pick_and_hollows_fewer_seed_rounds(tmp_path, monkeypatch):
    """Seed 1's curve goes a round further and that round's one-seed validation score beats every
    two-seed mean: the star stays on the round most seeds pick as their best (the earliest on a tie),
    and both figures draw the one-seed round hollow (a mean of fewer seeds: the cumulative curve may
    fall there)."""
    from matplotlib.axes import Axes

    from sparsetrain.experiment.report.plots import best_round
    write_config(tmp_path, seeds=[0, 1])
    write_rows(tmp_path, make_rows([0.80, 0.84, 0.82], seed=0))
    write_rows(tmp_path, make_rows([0.80, 0.83, 0.84, 0.90], seed=1))
    run = R.load_run(tmp_path)
    assert best_round(run["curves"]["teacher"]) == 1  # seed 0: round 1, seed 1: round 3; a tie -> earliest
    write_rows(tmp_path, make_rows([0.80, 0.84, 0.82], seed=2))
    write_config(tmp_path, seeds=[0, 1, 2])
    run = R.load_run(tmp_path)
    assert best_round(run["curves"]["teacher"]) == 1 and best_round({0: make_rows([NAN])}) is None
    calls, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw)) or real(self, *a, **kw))
    R.plot_run(run, str(tmp_path))
    stars = [a for a, kw in calls if len(a) > 2 and a[2] == "*"]
    assert len(stars) == 1 and stars[0][1] == pytest.approx(100 * (0.84 + 0.83 + 0.84) / 3)
    hollow = [a for a, kw in calls if kw.get("mfc") == "white"]
    assert len(hollow) == 2 and all(len(a[0]) == 1 for a in hollow)  # round 3 in each figure
    assert sum("(hollow: fewer seeds)" in (kw.get("label") or "") for _, kw in calls) == 2


def test_the_accuracy_band_stays_within_0_and_100_percent(tmp_path, monkeypatch):
    """Two seeds at 99% and 80% (std 13.4 points) drew the ± std band up to 103%, taking the y axis above
    100%; the band is clipped to [0, 100] in the run's figure and the sweep's overlay, the mean unchanged."""
    from matplotlib.axes import Axes

    from sparsetrain.sweep import figures
    write_config(tmp_path, seeds=[0, 1])
    write_rows(tmp_path, make_rows([0.9, 0.8], test=[0.99, 0.05], seed=0))
    write_rows(tmp_path, make_rows([0.9, 0.8], test=[0.80, 0.30], seed=1))
    run = R.load_run(tmp_path)
    bands, real = [], Axes.fill_between
    monkeypatch.setattr(Axes, "fill_between", lambda self, x, lo, hi, **kw: bands.append((lo, hi)) or real(self, x, lo, hi, **kw))
    R.plot_run(run, str(tmp_path))
    assert figures.plot_overlay([run], None, [], str(tmp_path / "overlay.png"))
    ref = [(m - sd, m + sd) for m, sd in ((100 * np.mean(v), 100 * np.std(v, ddof=1)) for v in ([.99, .80], [.05, .30]))]
    assert ref[0][1] > 100 and ref[1][0] < 0  # (the case: a band crossing both bounds)
    assert len(bands) == 2
    for lo, hi in bands:
        np.testing.assert_allclose(lo, [ref[0][0], 0.0])
        np.testing.assert_allclose(hi, [100.0, ref[1][1]])


def test_a_rule_that_never_fired_has_no_stop_phase_and_seed_counts_are_not_rounded(tmp_path):
    write_config(tmp_path, seeds=[0, 1], wall=0.5)
    for s in (0, 1):
        rows = make_rows([0.80, 0.81, 0.82, 0.83], ent=[0.6, 0.6, 0.6, 0.6], seed=s)
        rows[3]["sparse_layers"] = 2 - s  # seed 0: 2 sparse layers at round 3, seed 1: 1
        write_rows(tmp_path, rows)
    md = R.summary_table(R.load_run(tmp_path))
    row = table_row(md, "vanilla, early stop (Alg. 2)")
    assert row[10] == "–" and row[11] == "–"  # (the entropy never falls: no stop, no stop phase)
    assert table_row(md, "vanilla, no early stop")[11] == "light"
    assert table_row(md, "3")[8] == "2, 1" and table_row(md, "2")[8] == "2"
    assert "Cum. PFLOPs exact" in md


def test_table1_csv_leaves_blank_what_the_markdown_leaves_blank(tmp_path):
    """No stop rule: no FLOPs saved; no teacher: no teacher cost (NaN with n = 0, not 0.0)."""
    from sparsetrain.sweep.aggregate import load_groups, table1_csv
    _two_seed_run(tmp_path)
    rows = {r["run"]: r for r in table1_csv(load_groups([str(tmp_path)]), [])}
    for name in ("vanilla, no early stop", "distilled from the dense teacher, no early stop"):
        assert math.isnan(rows[name]["saved_mean"]) and rows[name]["saved_n"] == 0
    for name in ("vanilla, no early stop", "vanilla, early stop (Alg. 2)"):
        assert math.isnan(rows[name]["teacher_mean"]) and rows[name]["teacher_paper_n"] == 0
    assert rows["vanilla, early stop (Alg. 2)"]["saved_n"] == 2
    assert rows["distilled from the dense teacher, no early stop"]["teacher_mean"] > 0


def test_a_report_of_a_run_without_metrics_removes_the_old_plots(tmp_path):
    """Re-written after its metrics are gone (the run started over), the report says no metrics and
    leaves no plot of the old curves beside it."""
    run = str(tmp_path / "run")
    write_config(run)
    write_rows(run, make_rows([0.5, 0.6, 0.55]))
    R.write_report(run)
    pngs = [os.path.join(run, n) for n in ("accuracy_vs_sparsity.png", "cum_pflops.png")]
    assert all(os.path.isfile(p) for p in pngs)
    os.remove(os.path.join(run, "seed0", "teacher", "metrics.csv"))
    md = read(R.write_report(run))
    assert "(no metrics yet)" in md and not any(os.path.exists(p) for p in pngs)


def test_the_twins_are_named_in_a_run_that_links_every_phase_with_reuse(tmp_path):
    """Under --reuse every phase of a seed is a link into the run that trained it: distill-best (a link
    to that run's distill-best, itself a link to its distill-dense) is still distill-dense's twin, and
    distill-dense, the phase owning the directory, none."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_config(str(a), seeds=[0], teachers=["dense", "best"])
    write_config(str(b), seeds=[0], teachers=["dense", "best"])
    write_rows(str(a), make_rows([0.8, 0.7]))
    write_rows(str(a), make_rows([0.8, 0.75], phase="distill-dense", teacher_cost=1e15))
    os.symlink("distill-dense", a / "seed0" / "distill-best", target_is_directory=True)
    os.makedirs(b / "seed0")
    for ph in ("teacher", "distill-dense", "distill-best"):
        os.symlink(a / "seed0" / ph, b / "seed0" / ph, target_is_directory=True)
    run = R.load_run(str(b))
    assert run["same_as"] == {"distill-best": {0: "distill-dense"}}
    note = " (= distill-dense in every seed: the same teacher checkpoint, the same student run)"
    md = R.summary_table(run)
    assert table_row(md, f"distilled from the pruned (best-validation) teacher{note}, no early stop")
    assert table_row(md, "distilled from the dense teacher, no early stop")


def test_the_twin_note_quotes_a_twin_phase_s_name_that_holds_a_comma(tmp_path, monkeypatch):
    """The twin note joined the twins' phase names bare by `, `: seed 0's distill-best linked to distill-dense and seed
    1's to the phase of a --teachers file `/x/a, b.pt` read `(= distill-dense, distill-path-a, b in every seed: ...)`,
    three twins. Such a name is quoted as Python writes a str now, in Table 1's rows and per-round headings (md_quoted's
    text there), the plots' legends, the sweep's Table 1, table1.csv and overlay legends; `distill-dense` as before."""
    from matplotlib.axes import Axes

    from sparsetrain.sweep.report import write_sweep_report
    twin = "distill-path-a, b"
    write_config(tmp_path, seeds=[0, 1], teachers=["dense", "/x/a, b.pt", "best"])
    for s in (0, 1):
        write_rows(tmp_path, make_rows([0.8, 0.7], seed=s))
        for ph in ("distill-dense", twin):
            write_rows(tmp_path, make_rows([0.8, 0.75], seed=s, phase=ph, teacher_cost=1e15))
    os.symlink("distill-dense", tmp_path / "seed0" / "distill-best", target_is_directory=True)
    os.symlink(twin, tmp_path / "seed1" / "distill-best", target_is_directory=True)
    note = " (= distill-dense, 'distill-path-a, b' in every seed: the same teacher checkpoint, the same student run)"
    labels, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: labels.append(kw.get("label")) or real(self, *a, **kw))
    md = read(R.write_report(str(tmp_path)))
    assert table_row(md, f"distilled from the pruned (best-validation) teacher{note}, no early stop")
    assert f"### Per round: student (lenet300) distilled from the best teacher{note}" in md
    assert table_row(md, "distilled from the path-a, b teacher, no early stop")  # (the twin itself: no note)
    assert sum(note in (l or "") for l in labels) == 2  # (both figures)
    labels.clear()
    sweep = read(write_sweep_report([str(tmp_path)], str(tmp_path / "rep")))
    assert table_row(sweep, f"distilled from the pruned (best-validation) teacher{note}, no early stop")
    with open(tmp_path / "rep" / "table1.csv", newline="") as f:
        assert f"distilled from the pruned (best-validation) teacher{note}, no early stop" in {r["run"] for r in csv.DictReader(f)}
    assert f"fashion-mnist eps=0.2 distill-best{note}" in labels, labels


def test_the_table1_footnote_states_the_paper_s_sparsity_convention_per_row(tmp_path):
    """The paper's Table 1 reports w_best's sparsity on its no-early-stop row (99.62% = 1 - 0.8^25) and
    the model at the stop's on its early-stop rows (36.00% = 1 - 0.8^2): the footnote says which is which."""
    run = str(tmp_path / "run")
    write_config(run)
    write_rows(run, make_rows([0.5, 0.6, 0.55]))
    md = R.summary_table(R.load_run(run))
    assert ("(the paper's Table 1 reports, on its row without early stop, the best-validation model's sparsity: "
            "99.62% = 1 − 0.8^25, round 25 of 0–29, the best val columns; on its early-stop rows the model at the "
            "stop's: 36.00% = 1 − 0.8^2, round 2, the at stop columns; Tables 6–8 alike)") in md
    assert "reports the latter's sparsity" not in md
    assert round(100 * (1 - 0.8 ** 25), 2) == 99.62 and round(100 * (1 - 0.8 ** 2), 2) == 36.0


def test_entropy_is_labelled_in_bits(tmp_path, monkeypatch):
    """The ReLU-state entropy is binary entropy in log2: the per-round table and the plot say bits."""
    from matplotlib.axes import Axes
    run = str(tmp_path / "run")
    write_config(run)
    write_rows(run, make_rows([0.5, 0.6, 0.55]))
    labels = []
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, text, *a, **kw: labels.append(text))
    md = read(R.write_report(run))
    assert "| Round | Sparsity [%] | Val acc [%] | Test acc [%] | Entropy [bits] | Label |" in md
    assert "mean ReLU-state entropy [bits] (dashed)" in labels


def test_the_flops_plot_ticks_whole_rounds_only(tmp_path, monkeypatch):
    """cum_pflops.png's x axis is the round: its ticks were matplotlib's 0, 0.5, 1, 1.5, ... on a short
    curve (no round 0.5); now only the whole rounds the curve spans."""
    from matplotlib.figure import Figure
    run = str(tmp_path / "run")
    write_config(run)
    write_rows(run, make_rows([0.5, 0.6, 0.55, 0.58]))  # rounds 0..3
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append(self) or real(self, *a, **kw))
    R.write_report(run)
    assert len(figures) == 2
    ax = figures[1].axes[0]
    assert ax.get_xlabel().startswith("round")
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks == [0, 1, 2, 3]


def test_the_summary_names_every_setting_that_changes_results(tmp_path):
    """summary.md's settings table left out alpha, tau, perturb, structure, scope, subset, noise, l1, ...:
    summaries of runs differing in them read the same; now every result setting is shown with its value."""
    import dataclasses

    from sparsetrain.experiment import study
    from sparsetrain.experiment.config import config_from_args
    cfg, _ = config_from_args(["fashion-mnist", "--profile", "quick", "--perturb", "rewind", "--alpha", "0.5",
                               "--tau", "4", "--structure", "block", "--block", "16", "--scope", "layer", "--l1",
                               "1e-5", "--subset", "300", "--noise", "uniform", "--clean-val", "--drop", "0.5"])
    run = str(tmp_path / "run")
    write_config(run, **json.loads(json.dumps({**dataclasses.asdict(cfg), "student": cfg.resolved_student()})))
    write_rows(run, make_rows([0.5, 0.6]))
    md = read(R.write_report(run))
    schedules = {r: table_row(md, f"{r} schedule")[1] for r in ("teacher", "student")}
    for k, v in study.result_settings(cfg).items():
        role, _, key = k.partition("_")
        if role in schedules and key:  # (a role's schedule key: on its schedule row)
            assert f"{key} {json.dumps(v)}" in schedules[role], k
        elif k != "label_file" or v:  # (cifar100n's label file: blank elsewhere)
            assert table_row(md, k)[1] == (json.dumps(v) if isinstance(v, (list, dict)) else str(v)), k


def test_a_setting_with_a_pipe_keeps_the_settings_table_whole(tmp_path):
    """A `|` in a setting (a --label-file or --teachers path) split its row of summary.md's settings table
    into more cells, the value cut off; it is now escaped (`\\|`), the value whole in its one cell."""
    label, teacher = "data/cifar|n/CIFAR-100_human.pt", "ckpt/a|b.pt"
    cfg = write_config(tmp_path, dataset="cifar100n", label_file=label, teachers=["dense", teacher])
    for phase in ("teacher", "vanilla", "distill-path-a|b"):  # (its results rows name the teacher path's stem)
        write_rows(str(tmp_path), make_rows([0.5, 0.6], phase=phase))
    md = read(R.write_report(str(tmp_path)))
    split = lambda line: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # noqa: E731 (GFM's)
    for key in ("label_file", "teachers", "dataset"):
        line = next(l for l in md.splitlines() if l.startswith(f"| {key} |"))
        want = json.dumps(cfg[key]) if isinstance(cfg[key], list) else cfg[key]
        assert split(line) == [key, want], line
    header = next(l for l in md.splitlines() if l.startswith("| Run |"))
    rows = [l for l in md.splitlines() if l.startswith("| distilled from the path-a")]
    assert len(rows) == 3 and all(len(split(l)) == len(split(header)) and split(l)[3] == "path-a|b" for l in rows)


def test_a_report_refuses_a_finished_metrics_file_that_fails_its_checksum(tmp_path):
    """--report-only read a finished phase's metrics.csv without checking it: a torn or hand-edited file
    (which the run itself refuses) was reported as the run's curve, exit 0; now CorruptFile names it."""
    from sparsetrain.experiment import files
    run = str(tmp_path / "run")
    write_config(run)
    rows = make_rows([0.5, 0.6, 0.55])
    write_rows(run, rows)  # (the rows' directory)
    path = os.path.join(run, "seed0", "teacher", "metrics.csv")
    files.write_csv(path, rows, checksum=True)  # as the study's finish() writes it
    good = read(R.write_report(run))
    assert table_row(good, "2")[3] == "55.00"  # (the reference: round 2's test accuracy, as written)
    with open(path, "r+") as f:  # an edit: round 2's test accuracy 0.55 -> 0.95
        text = f.read()
        f.seek(0)
        f.write(text.replace(",0.55,", ",0.95,"))
    with pytest.raises(files.CorruptFile, match="metrics.csv"):
        R.write_report(run)
    assert read(os.path.join(run, "summary.md")) == good  # (the old summary is left as it was)


def test_a_report_removes_a_killed_report_s_temporary_files(tmp_path):
    """A --report-only killed while writing its figures or summary.md left `<file>.sparsetrain-tmp.<pid>` in the
    run directory, which only the run's next training start removed (a finished run's stayed for good). The
    report now removes a dead writer's temporary files of its own files; a living writer's (locked: a report
    beside it) and those of the run's other files (the run's start recovers them, under its lock) stay."""
    import fcntl
    from sparsetrain.experiment import files
    run = tmp_path / "run"
    write_config(run)
    write_rows(run, make_rows([0.8, 0.85, 0.7]))
    dead = (1 << 22) - 1  # (no process has that pid here)
    leftovers = [run / f"{name}.{files.TMP_TAG}.{dead}" for name in ("summary.md", "cum_pflops.png",
                                                                        "accuracy_vs_sparsity.png")]
    kept = [run / f"config.json.{files.TMP_TAG}.{dead}", run / "seed0" / f"summary.md.{files.TMP_TAG}.{dead}",
            run / f"summary.md.tmp.{dead}"]  # (the old form, never locked: never removed)
    for p in leftovers + kept:
        p.write_text("half")
    living = run / f"summary.md.{files.TMP_TAG}.{os.getpid() + 1}"
    with open(living, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # (as atomic_write holds its temporary file)
        summary = read(R.write_report(str(run)))
        assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept) and living.exists()
    assert "## Results" in summary and sorted(p.name for p in run.iterdir() if files.TMP_TAG in p.name) == sorted(
        [kept[0].name, living.name])


def test_a_report_that_cannot_remove_an_earlier_report_s_figures_is_write_failed(tmp_path, monkeypatch):
    """A report of a run without metrics removes an earlier report's figures (they would show curves the summary
    no longer has); in a read-only run directory that removal was an OSError traceback from --report-only. It is
    WriteFailed naming the figure now (the CLI's one line, exit 2), as the report's writes are."""
    import errno
    from sparsetrain.experiment import files
    run = tmp_path / "run"
    write_config(run)
    (run / "accuracy_vs_sparsity.png").write_bytes(b"an earlier report's")
    real = os.remove

    def read_only(path, *a, **k):
        if str(path).endswith(".png"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, *a, **k)
    monkeypatch.setattr(os, "remove", read_only)
    with pytest.raises(files.WriteFailed) as e:
        R.write_report(str(run))
    assert str(e.value).startswith(f"cannot write {run / 'accuracy_vs_sparsity.png'}: {os.strerror(errno.EROFS)}; ")
    monkeypatch.setattr(os, "remove", real)
    assert "Phases with metrics: none yet." in read(R.write_report(str(run)))
    assert sorted(os.listdir(run)) == ["config.json", "summary.md"]


def test_a_report_refuses_a_config_json_that_does_not_parse(tmp_path):
    """A run's config.json that does not parse was read as {}: --report-only wrote a summary without
    settings whose early stops replayed T_E = T_A = 0.8 instead of the run's, with exit 0."""
    from sparsetrain.experiment import files
    run = str(tmp_path / "run")
    write_config(run, t_e=0.5)
    write_rows(run, make_rows([0.5, 0.6, 0.55]))
    good = read(R.write_report(run))
    assert "T_E = 0.5" in good and table_row(good, "t_e")[1] == "0.5"  # (the run's, as recorded)
    for broken in ("{broken", "[1, 2]"):
        with open(os.path.join(run, "config.json"), "w") as f:
            f.write(broken)
        with pytest.raises(files.CorruptFile, match="config.json is corrupt"):
            R.write_report(run)
        assert read(os.path.join(run, "summary.md")) == good


def test_a_foreign_metrics_csv_is_refused_by_name_not_reported_as_no_metrics(tmp_path, capsys):
    """A metrics.csv without a curve's columns (another tool's file, or the wrong file copied in) was
    read as no rows ("none yet") or as all-NaN rounds; the report refuses it by name, and the sweep's
    report (of many runs: the end of a sweep too) leaves that run out, named with the reason."""
    from sparsetrain.sweep import cli
    write_config(tmp_path / "run", seeds=[0])
    write_rows(tmp_path / "run", make_rows([0.8, 0.85]))
    (tmp_path / "run" / "seed0" / "vanilla").mkdir()
    path = tmp_path / "run" / "seed0" / "vanilla" / "metrics.csv"
    for text, missing in (("epoch,acc,loss\n0,0.8,1.0\n", "round, sparsity, val_acc"),
                          ("round,acc,loss\n0,0.8,1.0\n", "sparsity, val_acc, test_acc")):
        path.write_text(text)
        with pytest.raises(R.CorruptFile, match=f"{path} is not a metrics.csv of a sparsetrain run: no column"
                                                f"\\(s\\) {missing}"):
            R.write_report(str(tmp_path / "run"))
        assert cli.main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
        assert (f"or a metrics.csv not a study's):** '{tmp_path / 'run'}' ({path} is not a metrics.csv of a sparsetrain "
                f"run: no column(s) {missing}") in read(tmp_path / "rep" / "summary.md")
    path.write_text(",".join(make_rows([0.8])[0]) + "\n")  # (a study's header, no round yet: no curve)
    assert "Phases with metrics: 'teacher': seeds [0]." in read(R.write_report(str(tmp_path / "run")))


@pytest.mark.parametrize("setting, value, expected", [
    ("rate", "0.2", "rate must be a number in (0, 1), got '0.2'"),
    ("wall", 1.5, "wall must be a number in (0, 1), got 1.5"),
    ("t_e", 80, "t_e must be a fraction in (0, 1], got 80"),
    ("stop_falls", 0, "stop_falls must be an int >= 1, got 0"),
    ("early_stop", "alg2", "early_stop must be one of none, entropy, entropy-peak, got 'alg2'"),
    ("seeds", 3, "seeds must be a list of ints, got 3"),
    ("model", 5, "model must be a str, got 5"),
    ("block", "32", "block must be a whole number (int), got str '32'"),  # (as a resume loads it: config_from_json)
    ("clean_val", "yes", "clean_val must be True or False, got str 'yes'")])
def test_a_config_json_setting_of_the_wrong_type_is_refused_by_name(tmp_path, setting, value, expected):
    """A hand-edited config.json whose setting the report computes with has the wrong type or range:
    a TypeError traceback from the arithmetic (a str rate, a list of seeds given as 3) or Algorithm 2's
    check with no file named; now the report refuses it naming the file and the setting, and the
    sweep's report leaves the run out and names it (as a config.json that does not parse)."""
    from sparsetrain.sweep.report import write_sweep_report
    write_config(tmp_path / "run", **{setting: value})
    write_rows(tmp_path / "run", make_rows([0.8, 0.85, 0.7]))
    with pytest.raises(R.CorruptFile) as e:
        R.write_report(str(tmp_path / "run"))
    assert str(e.value) == f"{tmp_path / 'run' / 'config.json'} is corrupt: {expected}; the report computes with " \
                           "it: restore it from a backup copy, or set it back to the run's value (--print-config " \
                           "with the run's flags shows it); the run's results need no deleting"  # (not "remove the run")
    md = read(write_sweep_report([str(tmp_path / "run")], str(tmp_path / "rep")))
    assert (f"**Left out, unreadable (config.json: its settings unknown; or a metrics.csv not a study's):** "
            f"'{tmp_path / 'run'}' ({expected})") in md
    write_config(tmp_path / "run")  # (the run's own settings: reported)
    assert "## Results" in read(R.write_report(str(tmp_path / "run")))


def test_config_from_json_refuses_a_setting_of_the_wrong_type_naming_the_key():
    """config_from_json took "block": "32" (a hand-edited config.json) as it was: the run's resume, or a --reuse
    of it, then failed rounds later in make_rule with a TypeError naming no file nor key. Refused at load now."""
    from sparsetrain.experiment.config import config_from_json
    good = config_from_json({"structure": "block", "block": 16, "seeds": [0, 1], "git_commit": "abc"})
    assert (good.block, good.seeds) == (16, (0, 1))
    for key, value, what in (("block", "32", "a whole number (int), got str '32'"),
                             ("eps", "0.2", "a number, got str '0.2'"),
                             ("seeds", [0, "1"], "a tuple of whole numbers (ints), got (0, '1')")):
        with pytest.raises(TypeError, match=rf"^{key} must be {re.escape(what)}$"):
            config_from_json({"structure": "block", key: value})


def test_a_round_table_column_the_run_did_not_write_reads_n_a_not_nan(tmp_path):
    """A run of an earlier sparsetrain (no wall_s, sec_per_epoch, sparse_layers columns) and a round
    without its sparsity or FLOPs: those per-round cells said "nan"; now n/a, as every other cell
    without a value, and the values present are the means over the seeds."""
    write_config(tmp_path, seeds=[0, 1])
    for s in (0, 1):
        rows = make_rows([0.8, 0.7], seed=s)
        for r in rows:
            for k in ("wall_s", "sec_per_epoch", "sparse_layers"):
                del r[k]
        rows[1]["sparsity"] = rows[1]["cum_flops"] = NAN
        write_rows(tmp_path, rows)
    md = R.summary_table(R.load_run(tmp_path))
    table = md.split("### Per round: teacher")[1]
    assert "nan" not in table.lower().replace("n/a", "")
    row0 = table_row(table, "0")  # (round 0's exact FLOPs: 3 x 1e6 forward x 1000 samples x 2 epochs)
    assert row0[1] == "0.00" and row0[6:9] == ["n/a", "n/a", "n/a"] and float(row0[9]) == pytest.approx(3 * 1e6 * 1000 * 2 / 1e15)
    assert table_row(table, "1")[1] == "n/a" and table_row(table, "1")[9] == "n/a"


def test_the_plots_legends_stay_inside_their_axes_beside_a_long_twin_note(tmp_path, monkeypatch):
    """The quick study's own case: the best-validation teacher is the dense one in every seed, so
    distill-best's legend entry carries the note "(= distill-dense in every seed: ...)". One line of it
    made the legend wider than the axes: it spread over the y axis' label (cum_pflops.png's hidden
    whole). Long entries are wrapped now: each legend lies within its axes, clear of the y label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    write_config(tmp_path, seeds=[0], teachers=["dense", "best"])
    write_rows(tmp_path, make_rows([0.8, 0.7, 0.75], seed=0))
    write_rows(tmp_path, make_rows([0.8, 0.79, 0.78], seed=0, phase="distill-dense", teacher_cost=1e15))
    os.symlink("distill-dense", tmp_path / "seed0" / "distill-best", target_is_directory=True)
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append(self) or real(self, *a, **kw))
    R.write_report(str(tmp_path))
    assert len(figures) == 2
    for fig in figures:
        ax = fig.axes[0]
        FigureCanvasAgg(fig).draw()
        renderer = fig.canvas.get_renderer()
        legend, box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert any("(= distill-dense in every seed" in t.get_text().replace("\n", " ")
                   for t in ax.get_legend().get_texts())
        assert box.x0 - 1 <= legend.x0 and legend.x1 <= box.x1 + 1, (legend, box)
        assert not legend.overlaps(ax.yaxis.label.get_window_extent(renderer))


def test_the_teacher_s_own_round_table_and_plot_mark_no_stop(tmp_path, monkeypatch):
    """The teacher run never stops (Table 1's teacher row has no early-stop rows), but its per-round table
    marked both rules' replayed stops and cum_pflops.png drew them on its curve; where the teacher run is
    the vanilla student's curve, the marks stay."""
    from matplotlib.figure import Figure
    curve = dict(val=[0.8, 0.9, 0.5, 0.5], ent=[1, 0.5, 0.5, 0.5])  # both rules stop at round 2
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append(self) or real(self, *a, **kw))
    for student, stops in (("vgg", 0), ("lenet300", 2)):  # a separate teacher; the teacher = the vanilla run
        run = str(tmp_path / student)
        write_config(run, student=student, seeds=[0])
        write_rows(run, make_rows(curve["val"], ent=curve["ent"]))
        if student == "vgg":
            write_rows(run, make_rows(curve["val"], ent=curve["ent"], phase="vanilla"))
        md = R.summary_table(R.load_run(run))
        teacher = md.split("### Per round: teacher")[1].split("###")[0]
        assert teacher.count("stop 1/1") == stops
        assert ("| 2 |" in teacher) and ("best 1/1" in teacher)  # (the best-validation mark stays)
        if student == "vgg":  # the vanilla curve, the same rows, keeps its marks
            assert md.split("### Per round: vanilla")[1].count("stop 1/1") == 2
        figures.clear()
        R.write_report(run)
        marks = [l for l in figures[1].axes[0].get_lines() if l.get_marker() in ("x", "+")]
        assert len(marks) == 2  # the vanilla curve's (its own, or the teacher run's where it is the vanilla)


def test_the_readme_quotes_the_teacher_s_per_round_headings_as_the_report_writes_them(tmp_path):
    """README's Outputs names the teacher run's per-round heading in both cases (a separate teacher; the
    teacher run as the vanilla curve): each quoted form, MODEL filled in, is a heading of such a summary."""
    readme = read(os.path.join(os.path.dirname(__file__), "..", "README.md"))
    quoted = re.findall(r"`(Per round: teacher \(MODEL\)[^`]*)`", readme)
    assert len(quoted) == 2
    for student, form in (("vgg", quoted[0]), ("lenet300", quoted[1])):
        run = str(tmp_path / student)
        write_config(run, student=student, seeds=[0])
        write_rows(run, make_rows([0.5, 0.6, 0.55]))
        if student == "vgg":
            write_rows(run, make_rows([0.5, 0.6, 0.55], phase="vanilla"))
        headings = [l[4:] for l in R.summary_table(R.load_run(run)).splitlines() if l.startswith("### Per round: ")]
        assert headings[0] == form.replace("MODEL", "lenet300")
        assert ("Per round: vanilla student (vgg)" in headings) == (student == "vgg")


def test_a_seed_folder_the_study_did_not_write_is_refused_by_name(tmp_path):
    """A seed folder copied by hand counted as one more seed in the means and the seed count (seed5: 3/2),
    or as the seed it was copied over (seed1 holding seed 0's rows), and seed01 was read as seed 1; each is
    refused by name, in the report and the sweep's (that run left out, named); an empty or curve-less stray
    seed folder is no seed."""
    import shutil
    from sparsetrain.sweep import aggregate as A
    write_config(tmp_path, seeds=[0, 1])
    for s in (0, 1):
        write_rows(tmp_path, make_rows([0.8, 0.82 + s / 100, 0.7], seed=s))
    (tmp_path / "seed7" / "teacher").mkdir(parents=True)  # (no metrics: no seed)
    (tmp_path / "seed8").mkdir()
    run = R.load_run(tmp_path)
    assert sorted(run["curves"]["teacher"]) == [0, 1]
    assert table_row(R.summary_table(run), "vanilla, no early stop")[-1] == "2"
    shutil.move(tmp_path / "seed1", tmp_path / "kept")
    for name, match in (("seed5", r"seed5/teacher holds a curve of seed 5, which the run was not started for \(its "
                                  r"seeds: \[0, 1\], config.json\)"),
                        ("seed1", "seed1/teacher/metrics.csv holds rows of seed 0, not of seed 1: a folder copied"),
                        ("seed01", "seed01/teacher holds a curve, but seed01 is not a seed folder the study writes")):
        shutil.copytree(tmp_path / "seed0", tmp_path / name)
        with pytest.raises(R.CorruptFile, match=match):
            R.write_report(str(tmp_path))
        bad = []
        assert A.load_groups([str(tmp_path)], bad) == [] and len(bad) == 1 and "holds" in bad[0] and name in bad[0]
        shutil.rmtree(tmp_path / name)
    shutil.move(tmp_path / "kept", tmp_path / "seed1")
    assert "Phases with metrics: 'teacher': seeds [0, 1]." in read(R.write_report(str(tmp_path)))


def test_a_teacher_cost_with_an_unknown_round_is_n_a_in_the_table_and_the_plot(tmp_path, monkeypatch):
    """Seed 0's round 1 lost its teacher_flops (a torn cell, NaN): its teacher cost is unknown (the paper's
    Table 1 reports the whole cost), so the table's (+x) is seed 1's with `1 of 2 seeds`, where it was seed 1's
    alone unsaid, and the plot's dotted curve takes the same mean (it summed seed 0's known rounds, nancumsum);
    no seed with one: n/a, where `+nan` stood."""
    from matplotlib.axes import Axes
    write_config(tmp_path, seeds=[0, 1])
    for s in (0, 1):
        write_rows(tmp_path, make_rows([0.8, 0.82, 0.7], seed=s))
        rows = make_rows([0.8, 0.82, 0.7], seed=s, phase="distill-dense", teacher_flops=0.5e15,
                         teacher_cost=(2 + s) * 1e15)
        rows[1]["teacher_flops"] = "" if s == 0 else rows[1]["teacher_flops"]
        write_rows(tmp_path, rows)
    run = R.load_run(tmp_path)
    ref = [3 + 0.5 * k for k in range(1, 4)]  # seed 1: obtained 3, 0.5 per round of KD inference up to round k
    row = table_row(R.summary_table(run), "distilled from the dense teacher, no early stop")
    assert row[4].endswith(f"(+{ref[-1]:.2f}, 1 of 2 seeds)") and row[5].endswith("(+10.30)")
    calls, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw)) or real(self, *a, **kw))
    R.plot_run(run, str(tmp_path))
    (x, y, _), = [a for a, kw in calls if "incl. teacher" in (kw.get("label") or "")]
    cum = [np.mean([r["cum_flops"] for r in rs]) / 1e15 for rs in zip(*run["curves"]["distill-dense"].values())]
    np.testing.assert_allclose(np.asarray(y) - cum, [(2.5 + 3.5) / 2] + ref[1:])
    for r in run["curves"]["distill-dense"][1]:
        r["teacher_flops"] = NAN
    row = table_row(R.summary_table(run), "distilled from the dense teacher, no early stop")
    assert row[4].endswith("(+n/a)") and row[5].endswith("(+10.30)")


def test_algorithm2_refuses_a_curve_without_the_dense_round(tmp_path):
    """Algorithm 2's reference entropy eta_0 and first best_acc are the dense model's (round 0, its lines
    3-4); a curve whose first row was a later round took that round's (here from round 1: the rule never
    fired, where the whole curve stops at round 3); refused, and the report refuses a metrics.csv without
    round 0 by name."""
    rows = make_rows(val=[0.8, 0.85, 0.9, 0.6, 0.5], ent=[1.0, 0.7, 0.7, 0.7, 0.7])
    assert R.algorithm2_stop(rows) == 3 and R.algorithm2_stop(rows[::-1]) == 3  # (any order)
    for part in (rows[1:], rows[2:], [dict(rows[0], round=-1)] + rows):
        for rule in ("entropy", "entropy-peak"):
            with pytest.raises(ValueError, match=f"rows must start at round 0, the dense model .*got round "
                                                 f"{part[0]['round']} first"):
                R.algorithm2_stop(part, rule=rule)
    write_config(tmp_path, seeds=[0])
    write_rows(tmp_path, rows[1:])
    path = tmp_path / "seed0" / "teacher" / "metrics.csv"
    with pytest.raises(R.CorruptFile, match=f"{path} has no row of round 0, the dense model \\(its first is round 1\\)"):
        R.write_report(str(tmp_path))


def test_a_mean_that_skipped_a_seed_s_nan_says_k_of_n_seeds(tmp_path, monkeypatch):
    """A per-round mean over the seeds whose value is finite (a torn cell is NaN) says `(k of n seeds)`, as
    Table 1's cells do (it read as the mean of every seed); so do Table 1's PFLOPs, and the accuracy plot
    draws such a round hollow."""
    from matplotlib.axes import Axes
    write_config(tmp_path, seeds=[0, 1, 2])
    vals = {0: [0.80, 0.84, 0.82], 1: [0.80, 0.83, 0.84], 2: [0.81, 0.86, 0.83]}
    for s in (0, 1, 2):
        rows = make_rows(vals[s], seed=s, ent=[0.6, 0.5 + 0.1 * s, 0.4])
        if s == 2:  # round 1's cells of seed 2 torn; its last cumulative count too
            for key in ("val_acc", "test_acc", "entropy_mean", "wall_s", "cum_flops"):
                rows[1][key] = NAN
            rows[2]["cum_flops"] = NAN
        write_rows(tmp_path, rows)
    run = R.load_run(tmp_path)
    md = R.summary_table(run)
    lines = {int(l.split("|")[1]): [c.strip() for c in l.strip("|").split("|")] for l in md.splitlines()
             if l.startswith("| ") and l.split("|")[1].strip().isdigit()}
    ref = [100 * vals[s][1] for s in (0, 1)]  # (round 1 of seeds 0 and 1: the finite ones)
    assert lines[1][2] == f"{np.mean(ref):.2f} ± {np.std(ref, ddof=1):.2f} (2 of 3 seeds)"
    assert lines[1][3].endswith("(2 of 3 seeds)") and lines[1][4] == "0.550 ± 0.071 (2 of 3 seeds)"
    assert lines[1][6] == "9.0 (2 of 3 seeds)" and lines[1][9].endswith("(2 of 3 seeds)")
    assert "seeds" not in "".join(lines[0]) and lines[2][9].endswith("(2 of 3 seeds)")
    assert "seeds" not in "".join(lines[2][:9])
    cum = [r["cum_flops"] for r in make_rows(vals[0])]
    row = table_row(md, "vanilla, no early stop")  # (the teacher run is the vanilla student's here)
    assert row[4].startswith(f"{cum[-1] / 1e15:.7f}") and row[4].endswith("(2 of 3 seeds)")
    calls, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw)) or real(self, *a, **kw))
    R.plot_run(run, str(tmp_path))
    hollow = [a for a, kw in calls if kw.get("mfc") == "white"]
    assert len(hollow) == 1 and len(hollow[0][0]) == 1  # round 1 of the accuracy plot (the FLOPs plot: no row missing)


def test_a_nan_dense_entropy_makes_the_stop_unknown_not_never(tmp_path):
    """Both rules compare the entropy with round 0's (the dense model's eta_0): where it is NaN the rule
    cannot run, so that seed's stop is n/a (it read `–`, "never stopped", with the whole curve counted as
    the stop's FLOPs, a 0% saving in the mean); the seed is left out of the row's means, which say so."""
    from sparsetrain.experiment.early_stop import reference_known
    write_config(tmp_path, seeds=[0, 1, 2], wall=0.999)
    val, cum = [0.80, 0.84, 0.86, 0.60, 0.85], [1e15 * c for c in (8, 12, 14, 15, 15.5)]
    for s in (0, 1, 2):  # Alg. 2 on seeds 1 and 2: phase 2 from round 2, stop at round 3 (0.60 <= 0.8 * 0.86)
        rows = make_rows(val, ent=[NAN if s == 0 else 1, 1, 0.7, 0.7, 0.7], seed=s, cum=cum)
        write_rows(tmp_path, rows)
        (tmp_path / f"seed{s}" / "teacher" / "best.json").write_text("{}")
    run = R.load_run(tmp_path)
    rows0 = run["curves"]["teacher"][0]
    assert R.algorithm2_stop(rows0) is None and not reference_known(rows0)
    assert reference_known(run["curves"]["teacher"][1]) and not reference_known([])
    md = R.summary_table(run)
    for name in ("vanilla, early stop (Alg. 2)", "vanilla, early stop (peak rule)"):
        row = table_row(md, name)
        assert row[10] == "n/a, 3, 3" and row[11] == "n/a, critical, critical"
        assert row[4] == f"{15:.2f} ± 0.00 (2 of 3 seeds)" and row[7] == "60.00 ± 0.00 (2 of 3 seeds)"
        assert row[12] == f"{100 * (1 - 15 / 15.5):.1f} ± 0.0 (2 of 3 seeds)" and row[13] == "20.0 ± 0.0 (2 of 3 seeds)"
    row = table_row(md, "vanilla, no early stop")  # (no rule: nothing unknown)
    assert row[10] == "4" and "seeds" not in row[4] + row[6]
    assert "`n/a`: the rule cannot run" in md


def test_a_nan_dense_accuracy_leaves_the_curve_unlabelled(tmp_path):
    """Every label is relative to a_0, the dense model's accuracy: where round 0's is NaN the first finite
    round stood in for it (a curve falling from a pruned round's level read light, then critical); the
    rounds are n/a now, in the seed's Table 1 stop phase and Table 12's best model's phase too."""
    from sparsetrain.sweep.aggregate import best_model_rows
    lab = lambda acc: R.label_rounds([{"test_acc": a} for a in acc])  # noqa: E731
    acc = [0.70, 0.60, 0.65, 0.72, 0.60]
    assert lab(acc) == ["light", "critical", "sweet", "sweet", "collapsed"]  # (its own labels with a_0 = 0.70)
    assert lab([NAN] + acc[1:]) == ["n/a"] * 5  # (was all light: a_0 = 0.60, the dip hidden)
    write_config(tmp_path, seeds=[0], early_stop="none")
    write_rows(tmp_path, make_rows([0.70, 0.60, 0.65, 0.72, 0.60], test=[NAN] + acc[1:], seed=0))
    run = R.load_run(tmp_path)
    assert table_row(R.summary_table(run), "vanilla, no early stop")[11] == "n/a"
    assert best_model_rows([run], [])[0]["best_phase"] == "n/a"


def test_a_per_round_mean_without_a_seed_that_recorded_no_round_says_so(tmp_path, monkeypatch):
    """A seed of the run whose phase recorded no round (its run failed in round 0, or has not got there)
    is missing from every round's mean: each round says `2/3 seeds` (it said nothing: the table read as the
    mean of every seed), the best-round count is out of the run's seeds, and the plots draw every round
    hollow."""
    from matplotlib.axes import Axes
    write_config(tmp_path, seeds=[0, 1, 2])
    write_rows(tmp_path, make_rows([0.80, 0.84, 0.82], seed=0))
    write_rows(tmp_path, make_rows([0.80, 0.86], seed=1))
    (tmp_path / "seed2" / "teacher").mkdir(parents=True)  # (seed 2: no metrics.csv yet)
    run = R.load_run(tmp_path)
    assert sorted(run["curves"]["teacher"]) == [0, 1]
    lines = [l.split("|") for l in R.summary_table(run).splitlines() if l.startswith("| ") and l.split("|")[1].strip().isdigit()]
    marks = {int(c[1]): c[11].strip() for c in lines}
    assert marks == {0: "2/3 seeds", 1: "2/3 seeds, best 2/3", 2: "1/3 seeds"}
    assert lines[1][3].strip() == f"{np.mean([84, 86]):.2f} ± {np.std([84, 86], ddof=1):.2f}"
    calls, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw)) or real(self, *a, **kw))
    R.plot_run(run, str(tmp_path))
    hollow = [a for a, kw in calls if kw.get("mfc") == "white"]
    assert len(hollow) == 2 and all(len(a[0]) == 3 for a in hollow)  # rounds 0-2 in each figure


def test_the_dagger_footnote_names_a_failed_run_s_partial_curve_too(tmp_path):
    """An unfinished phase (no best.json) is marked `†` whether its run is still going or failed: the
    footnote said "run in progress" alone, so a crashed seed's partial curve read as one still training."""
    write_config(tmp_path, seeds=[0, 1], wall=0.999)
    write_rows(tmp_path, make_rows([0.80, 0.84, 0.82, 0.83], seed=0))
    (tmp_path / "seed0" / "teacher" / "best.json").write_text("{}")
    write_rows(tmp_path, make_rows([0.80, 0.86], seed=1))  # (its run died after round 1: no best.json)
    md = R.summary_table(R.load_run(tmp_path))
    assert table_row(md, "vanilla, no early stop")[10] == "3, 1†"
    assert "the run in progress, or one that failed or was interrupted" in md


def test_a_sweep_figure_marks_means_over_fewer_seeds_than_started_or_past_a_nan(tmp_path, monkeypatch):
    """The sweep's overlay draws hollow a round whose mean left out a seed's NaN accuracy (a torn cell), and
    every round of a setting where a seed it started recorded none (both were drawn filled: a full mean)."""
    from matplotlib.axes import Axes

    from sparsetrain.sweep import figures
    calls, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw)) or real(self, *a, **kw))
    run = tmp_path / "r"
    write_config(run, seeds=[0, 1])
    write_rows(run, make_rows([0.5, 0.6, 0.7], seed=0))
    write_rows(run, make_rows([0.5, 0.6, 0.7], test=[0.5, NAN, 0.7], seed=1))
    assert figures.plot_overlay([R.load_run(run)], None, [], str(tmp_path / "f.png"))
    hollow = [a for a, kw in calls if kw.get("mfc") == "white"]
    assert len(hollow) == 1 and list(hollow[0][1]) == [60.0]  # round 1: seed 0's 60% alone
    calls.clear()
    write_config(run, seeds=[0, 1, 2])  # (seed 2 started, no round recorded)
    assert figures.plot_overlay([R.load_run(run)], None, [], str(tmp_path / "f.png"))
    hollow = [a for a, kw in calls if kw.get("mfc") == "white"]
    assert len(hollow) == 1 and len(hollow[0][0]) == 3


def test_a_seed_whose_stop_rules_cannot_run_is_said_in_the_per_round_table_and_flops_plot(tmp_path, monkeypatch):
    """A seed whose round 0 entropy is NaN has no stop (the rules cannot run): Table 1 says `n/a`, but the
    per-round table's "Best val / stops" column and the FLOPs plot showed nothing for it, as if it never
    stopped; the first round's row says `stops n/a 1/3` with the reason, and the plot's legend entry too."""
    from matplotlib.axes import Axes
    write_config(tmp_path, seeds=[0, 1, 2], wall=0.999)
    val, cum = [0.80, 0.84, 0.86, 0.60, 0.85], [1e15 * c for c in (8, 12, 14, 15, 15.5)]
    for s in (0, 1, 2):
        write_rows(tmp_path, make_rows(val, ent=[NAN if s == 0 else 1, 1, 0.7, 0.7, 0.7], seed=s, cum=cum))
    run = R.load_run(tmp_path)
    md = R.summary_table(run)
    assert table_row(md, "vanilla, early stop (Alg. 2)")[10].startswith("n/a")  # (Table 1's)
    marks = {int(c[1]): c[11].strip() for c in (l.split("|") for l in md.splitlines())
             if len(c) > 11 and c[1].strip().isdigit()}
    assert marks[0] == "stops n/a 1/3 (round 0's entropy NaN: the rules cannot run)"
    assert marks[3] == "Alg. 2 stop 2/3, peak rule stop 2/3" and not any("n/a" in marks[k] for k in (1, 2, 3, 4))
    labels, real = [], Axes.legend
    monkeypatch.setattr(Axes, "legend", lambda self, h, l, **kw: labels.append(l) or real(self, h, l, **kw))
    R.plot_run(run, str(tmp_path))
    flops = " ".join(labels[-1]).replace("\n", " ")
    assert "stops n/a in 1/3 seeds: round 0's entropy NaN" in flops and "n/a" not in " ".join(labels[0])
    for s in (0, 1, 2):  # every seed's reference known: no mark anywhere
        write_rows(tmp_path, make_rows(val, ent=[1, 1, 0.7, 0.7, 0.7], seed=s, cum=cum))
    assert "stops n/a" not in R.summary_table(R.load_run(tmp_path))


def test_a_finished_metrics_csv_copied_with_its_record_from_another_run_is_refused(tmp_path):
    """A .sha256 record named its file by base name alone: a finished phase's metrics.csv copied with its record
    from the same phase of another run (or another seed) verified, and the report showed the other run's curve
    as this one's. loop.finish records the phase's place (run directory/seed/phase, as best.json's "where"):
    the copy is refused by name; an older record without it still verifies, as does a --reuse link's."""
    import shutil

    from sparsetrain.experiment import files, loop
    runs = tmp_path / "runs"
    pdirs = {name: runs / name / "seed0" / "teacher" for name in ("runA", "runB")}
    for name, pdir in pdirs.items():
        pdir.mkdir(parents=True)
        loop.finish(str(pdir), make_rows([0.80, 0.84] if name == "runA" else [0.70, 0.90]))
    here = pdirs["runA"] / "metrics.csv"
    assert R.verify_metrics(runs / "runA") is None and files.verify(str(here))
    assert json.loads(read(f"{here}.sha256"))["where"] == "runA/seed0/teacher"
    link = runs / "runC" / "seed0" / "teacher"  # (--reuse: runA's phase linked, read through the link)
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(pdirs["runA"], link.parent), target_is_directory=True)
    assert files.verify(str(link / "metrics.csv"))
    for f in ("metrics.csv", "metrics.csv.sha256"):
        shutil.copy(pdirs["runB"] / f, pdirs["runA"] / f)
    with pytest.raises(files.CorruptFile) as e:
        R.verify_metrics(runs / "runA")
    assert str(e.value) == (f"{here}.sha256 is the record of runB/seed0/teacher/metrics.csv, not of {here}: it and "
                            "its file were copied from another run, seed or phase")
    from sparsetrain.experiment.integrity import verify_phase
    with pytest.raises(files.CorruptFile, match=re.escape(f"{str(e.value)}; a finished phase's results cannot be rebuilt: "
                                                          f"delete {pdirs['runA']} to retrain this phase")):
        verify_phase(str(pdirs["runA"]))  # (the run's own check, before it resumes or distills from the phase)
    seed1 = runs / "runB" / "seed1" / "teacher"  # (another seed's of the same run)
    shutil.copytree(pdirs["runB"], seed1)
    with pytest.raises(files.CorruptFile, match="is the record of runB/seed0/teacher/metrics.csv, not of"):
        files.verify(str(seed1 / "metrics.csv"))
    old = pdirs["runA"] / "metrics.csv"  # (a record written before 2026-12-06: no place, verified as before)
    files.write_csv(str(old), make_rows([0.80, 0.84]), checksum=True)
    assert "where" not in json.loads(read(f"{old}.sha256")) and files.verify(str(old))


def test_a_finished_phase_without_its_metrics_csv_is_refused_by_its_reports(tmp_path):
    """A finished phase (best.json) whose metrics.csv is gone: the run refuses it by name; --report-only and
    `sweep report` dropped its rows without a word before 2026-12-07 (verify_metrics read the files there were):
    the reports refuse it (CorruptFile) with the run's own message, and `sweep report` leaves the run out naming
    it. A linked phase (--reuse) is checked through its link."""
    from sparsetrain.experiment import files, loop
    from sparsetrain.experiment.integrity import verify_phase
    from sparsetrain.sweep.aggregate import load_groups
    pdir = tmp_path / "runA" / "seed0" / "teacher"
    pdir.mkdir(parents=True)
    loop.finish(str(pdir), make_rows([0.80, 0.84]))
    assert R.verify_metrics(tmp_path / "runA") is None
    for f in ("metrics.csv", "metrics.csv.sha256"):
        (pdir / f).unlink()
    with pytest.raises(files.CorruptFile) as run_said:
        verify_phase(str(pdir))
    with pytest.raises(files.CorruptFile) as e:
        R.verify_metrics(tmp_path / "runA")
    assert str(e.value) == str(run_said.value) and str(e.value).startswith(
        f"{pdir / 'metrics.csv'}: metrics.csv missing (the phase is finished: best.json); delete the phase folder "
        f"{pdir}")
    link = tmp_path / "runC" / "seed0" / "teacher"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(pdir, link.parent), target_is_directory=True)
    with pytest.raises(files.CorruptFile, match=re.escape(f"{link / 'metrics.csv'}: metrics.csv missing")):
        R.verify_metrics(tmp_path / "runC")
    from sparsetrain.experiment.config import config_from_args
    cfg = config_from_args(["mnist", "--profile", "quick"])[0]
    files.write_json(str(tmp_path / "runA" / "config.json"),
                     {**dataclasses.asdict(cfg), "student": cfg.resolved_student()})
    unreadable = []
    assert load_groups([str(tmp_path / "runA")], unreadable) == [] and len(unreadable) == 1
    assert unreadable[0].startswith(f"{tmp_path / 'runA'} ({pdir / 'metrics.csv'}: metrics.csv missing"), unreadable


def test_summary_md_shows_a_run_folder_s_and_phase_s_names_as_written(tmp_path):
    """summary.md's heading wrote the run folder's name as it is (its `*x*` rendered as emphasis, `_x_` its marks
    lost), and so did the line of phases with metrics, the Seeds table's phases and the per-round headings (a
    --teachers path's phase `distill-path-*a*`). Each goes through md_cell now, as the Settings cells do."""
    run_dir = tmp_path / "r*1*_"
    _two_seed_run(run_dir)
    text = open(R.write_report(str(run_dir)), encoding="utf-8").read()
    assert text.startswith("# DSD² run: r\\*1\\*\\_\n"), text[:80]
    assert "Phases with metrics: 'teacher': seeds [0, 1], 'distill-dense': seeds [0, 1]." in text


def test_summary_md_shows_a_run_folder_s_name_as_written_even_one_not_utf8(tmp_path):
    """summary.md's heading wrote the run folder's name as it is: its `*x*` rendered as emphasis, and a name that is
    not UTF-8 (a surrogate per such byte in os.fsdecode's str) raised UnicodeEncodeError, no summary. The name goes
    through md_cell now, each such byte written `\\xNN`."""
    run_dir = tmp_path / os.fsdecode(b"r*1*_\xff")
    _two_seed_run(run_dir)
    text = open(R.write_report(str(run_dir)), encoding="utf-8").read()
    assert text.startswith("# DSD² run: r\\*1\\*\\_\\xff\n"), text[:80]
    assert "Phases with metrics: 'teacher': seeds [0, 1], 'distill-dense': seeds [0, 1]." in text


def test_summary_md_s_settings_spell_a_byte_that_is_not_utf8_as_the_run_folder_s_name_does(tmp_path):
    """The Settings table wrote a list setting (a --teachers path that is not UTF-8) by json.dumps: such a byte read
    `\\udcff` there, `\\xff` in the heading's run folder name (shown_text). It reads `\\xff` in both now."""
    run_dir = tmp_path / os.fsdecode(b"r\xfe")
    write_config(run_dir, seeds=[0], teachers=[os.fsdecode(b"/t/t\xff.pt"), "dense"])
    write_rows(run_dir, make_rows([0.8, 0.7, 0.75], seed=0))
    text = open(R.write_report(str(run_dir)), encoding="utf-8").read()
    assert text.startswith("# DSD² run: r\\xfe\n") and '| teachers | ["/t/t\\xff.pt", "dense"] |' in text, text[:400]
    assert "udc" not in text


def test_summary_md_s_settings_write_a_list_s_text_that_is_not_ascii_as_typed(tmp_path):
    """The Settings table wrote a list setting by json.dumps, which spells text that is not ASCII as escapes: a
    --teachers path `/t/é.pt` read `/t/\\u00e9.pt`, while the run folder's name, the phases and the sweep's setting
    labels and CSVs print it as typed. It is written as typed now (a byte that is not UTF-8 still `\\xNN`)."""
    from sparsetrain.sweep.report import write_sweep_report
    teachers = ["/t/é.pt", "/t/日本.pt", os.fsdecode(b"/t/t\xff.pt"), "a|*b*"]
    run_dir = tmp_path / "é"
    write_config(run_dir, seeds=[0], teachers=teachers)
    write_rows(run_dir, make_rows([0.8, 0.7, 0.75], seed=0))
    text = open(R.write_report(str(run_dir)), encoding="utf-8").read()
    assert text.startswith("# DSD² run: é\n") and \
        '| teachers | ["/t/é.pt", "/t/日本.pt", "/t/t\\xff.pt", "a\\|\\*b\\*"] |' in text, text[:600]
    assert "\\u" not in text and "udc" not in text
    # (the sweep's setting label and CSV of it: as typed already, repr's)
    write_config(tmp_path / "other", seeds=[0])
    write_rows(tmp_path / "other", make_rows([0.8, 0.7, 0.75], seed=0))
    md = open(write_sweep_report([str(run_dir), str(tmp_path / "other")], str(tmp_path / "rep")),
              encoding="utf-8").read()
    assert "(teachers=['/t/é.pt', '/t/日本.pt', '/t/t\\xff.pt', 'a\\|\\*b\\*'])" in md, md
    with open(tmp_path / "rep" / "table1.csv", encoding="utf-8") as f:
        assert "['/t/é.pt', '/t/日本.pt', '/t/t\\xff.pt', 'a|*b*']" in f.read()


def test_summary_md_s_phases_with_metrics_name_each_phase_unambiguously(tmp_path):
    """The line of phases with metrics and the Seeds table's column joined the phase names with `, `: a phase named
    after a --teachers file `a, b.pt` (`distill-path-a, b`) read as two phases. Each name is quoted as Python writes a
    str now (md_quoted: `'distill-path-a, b'`, as the setting labels' `teachers=['a, b.pt']`)."""
    from sparsetrain.experiment.report.text import md_quoted
    assert md_quoted("a, b") == "'a, b'" and md_quoted("it's *x*") == "\"it's \\*x\\*\""
    assert md_quoted("a|b\nc") == "'a\\|b\\nc'" and md_quoted(os.fsdecode(b"t\xff")) == "'t\\xff'"
    write_config(tmp_path, seeds=[0], teachers=["/t/a, b.pt"])
    write_rows(tmp_path, make_rows([0.8, 0.7, 0.75], seed=0))
    write_rows(tmp_path, make_rows([0.8, 0.79, 0.78], seed=0, phase="distill-zz", teacher_cost=1e15))
    os.rename(tmp_path / "seed0" / "distill-zz", tmp_path / "seed0" / "distill-path-a, b")
    text = read(R.write_report(str(tmp_path)))
    assert "Phases with metrics: 'teacher': seeds [0], 'distill-path-a, b': seeds [0]." in text, text
    assert "| 0 | no status record | 'teacher', 'distill-path-a, b' |" in text, text


def _figures_of(tmp_path, monkeypatch, tag):
    """A one-seed run distilled from the `--teachers` file /t/<tag>.pt (phase distill-path-<tag>); its report's
    figures and the sweep's overlay of it, each drawn and written (the Figures, the overlay's path)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sparsetrain.sweep import figures as F
    write_config(tmp_path, seeds=[0], teachers=[f"/t/{tag}.pt"])
    write_rows(tmp_path, make_rows([0.8, 0.7, 0.75], seed=0))
    write_rows(tmp_path, make_rows([0.8, 0.79, 0.78], seed=0, phase="distill-zz", teacher_cost=1e15))
    os.rename(tmp_path / "seed0" / "distill-zz", tmp_path / "seed0" / f"distill-path-{tag}")
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append(self) or real(self, *a, **kw))
    R.write_report(str(tmp_path))
    overlay = F.plot_overlay([R.load_run(tmp_path)], None, [], str(tmp_path / "overlay.png"))
    _check_pngs([tmp_path / "accuracy_vs_sparsity.png", tmp_path / "cum_pflops.png", overlay])
    assert len(figures) == 3
    for fig in figures:
        FigureCanvasAgg(fig).draw()
    return figures


def test_a_dollar_in_a_phase_name_shows_as_typed_in_the_figures(tmp_path, monkeypatch):
    """A `$` in user text (a --teachers file's name, so a phase's) was read as mathtext: `$x^$` raised ValueError
    at draw time (no figure, the report lost), `$x$` rendered as math. Legends and titles show it as typed now."""
    figures = _figures_of(tmp_path, monkeypatch, "$x^$ a$b$")
    texts = [t.get_text() for fig in figures for t in fig.axes[0].get_legend().get_texts()]
    assert "student (lenet300) distilled from the path-$x^$ a$b$ teacher" in texts
    assert "fashion-mnist eps=0.2 distill-path-$x^$ a$b$" in texts  # (the sweep's overlay)
    assert all(not t.get_parse_math() for fig in figures for t in fig.axes[0].get_legend().get_texts())
    assert all(not fig.axes[0].title.get_parse_math() for fig in figures if fig.axes[0].get_title())


def test_a_phase_name_that_is_not_utf8_is_drawn_with_its_bytes_as_escapes(tmp_path, monkeypatch):
    """A --teachers file whose name is not UTF-8 (a surrogate escape from the filesystem, so its phase's too) in a
    legend raised TypeError from the font code: no figure, the report lost. It is drawn as shown_text writes it."""
    figures = _figures_of(tmp_path, monkeypatch, "t\udcff")
    texts = [t.get_text() for fig in figures for t in fig.axes[0].get_legend().get_texts()]
    assert "student (lenet300) distilled from the path-t\\xff teacher" in texts
    assert "fashion-mnist eps=0.2 distill-path-t\\xff" in texts


def test_summary_md_keeps_a_run_folder_s_trailing_hash(tmp_path):
    """A run folder named `q #` headed summary.md as `# DSD² run: q #`: Markdown reads a trailing ` #` as the
    heading's closing sequence, dropped (`DSD² run: q`). md_heading escapes it `\\#`; a `#` inside stays."""
    run_dir = tmp_path / "q # ##"
    _two_seed_run(run_dir)
    text = open(R.write_report(str(run_dir)), encoding="utf-8").read()
    assert text.startswith("# DSD² run: q # #\\#\n"), text[:80]
    assert R.tables.md_heading("a # b") == "a # b" and R.tables.md_heading("*a* # ") == "\\*a\\* \\# "
