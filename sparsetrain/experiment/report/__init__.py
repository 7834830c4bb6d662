"""Reports of a DSD2 run directory: the Table-1-style summary, per-round tables with phase labels,
plots, and RUN/summary.md. Reads what the study writes (metrics.py); Algorithm 2 lives in
experiment/early_stop.py, the labels in labels.py, tables in tables.py, plots in plots.py.
"""
from __future__ import annotations

import glob
import json
import os

from ..files import CorruptFile, atomic_write, finish_interrupted_writes, verify
from ..integrity import check_best_place, check_metrics_present
from ..early_stop import algorithm2_stop
from .labels import LABEL_RULE, label_rounds
from ..metrics import load_run, read_metrics
from ..seed_status import describe, read_status
from .plots import plot_run
from .tables import config_problem, md_cell, md_heading, ordered_phases, summary_table
from .text import md_quoted, shown_literal

__all__ = ["read_metrics", "load_run", "algorithm2_stop", "label_rounds", "summary_table", "plot_run",
           "write_report", "verify_metrics", "LABEL_RULE"]

# the files write_report writes in the run directory (plot_run's figures, then summary.md)
REPORT_FILES = ("accuracy_vs_sparsity.png", "cum_pflops.png", "summary.md")


def verify_metrics(run_dir) -> None:
    """CorruptFile for a phase's metrics.csv that no longer matches its checksum record (torn or
    edited since: the run itself refuses it, and a report of it would show that curve as the run's), or that
    is gone from a finished phase (check_metrics_present)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(run_dir)), "seed*", "*", "metrics.csv"))):
        verify(path)
    for best in sorted(glob.glob(os.path.join(glob.escape(os.fspath(run_dir)), "seed*", "*", "best.json"))):
        check_metrics_present(os.path.dirname(best))


def seed_states(run, run_dir) -> dict:
    """{seed: its status in words} for each seed of the run (config's, and any with metrics): seed_status.py's
    done, running, stopped, failed with its error; "not started" without a seed folder. The Seeds table and
    the per-round tables (the seeds without their curve) read it as run["status"]."""
    seeds = {s for s in run["config"].get("seeds") or [] if type(s) is int} | {
        s for curves in run["curves"].values() for s in curves}
    folder = lambda s: os.path.join(run_dir, f"seed{s}")  # noqa: E731
    return {s: describe(read_status(folder(s))) if os.path.isdir(folder(s)) else "not started" for s in sorted(seeds)}


def seed_table(run) -> str:
    """Markdown: each seed of run["status"] (seed_states) with its status and the phases it has metrics of (each
    quoted: md_quoted)."""
    out = ["| Seed | Status | Phases with metrics |", "|--:|---|---|"]
    for s, state in run["status"].items():
        phases = [p for p in ordered_phases(run) if s in run["curves"][p]]
        out.append(f"| {s} | {md_cell(state)} | {', '.join(map(md_quoted, phases)) or 'none'} |")
    return "\n".join(out)


def write_report(run_dir) -> str:
    """Load the run, write its PNGs and RUN/summary.md (atomically); returns the summary's path.
    CorruptFile for a finished phase's metrics.csv that no longer matches its checksum (the run
    itself refuses it; a report of it would show a torn or edited curve as the run's), and for a
    config.json that does not parse (the report would show no settings and replay the stop rules at
    the default thresholds, not the run's), or whose settings have the wrong type or range (config_problem),
    and for a finished phase copied in from another run. A killed report's temporary files are removed
    first (a dead writer's only: --report-only runs beside the run, without its lock)."""
    finish_interrupted_writes(os.fspath(run_dir), REPORT_FILES)  # (else kept until the run's next start)
    for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(run_dir)), "seed*", "*", "best.json"))):
        check_best_place(os.path.dirname(path))  # (a phase copied from another run with its records: refused as the run does)
    verify_metrics(run_dir)  # (after: a whole phase copied is named as one, before its metrics.csv's record)
    run = load_run(run_dir)
    cfg, path = run["config"], os.path.join(run_dir, "config.json")
    if os.path.exists(path) and (not isinstance(cfg, dict) or not cfg):  # (load_run's {}: it did not parse)
        raise CorruptFile(f"{path} is corrupt (not a JSON object of settings): the report needs the run's "
                          "settings; restore it from a backup copy (the run's results need no deleting)")
    if isinstance(cfg, dict) and (problem := config_problem(cfg)):  # (edited by hand: a TypeError traceback)
        raise CorruptFile(f"{path} is corrupt: {problem}; the report computes with it: restore it from a backup "
                          "copy, or set it back to the run's value (--print-config with the run's flags shows it); "
                          "the run's results need no deleting")
    run["status"] = seed_states(run, run_dir)  # (the Seeds table's; the per-round tables name the missing)
    pngs = plot_run(run, run_dir)
    # every setting that changes results (the roles' schedules below), then what the run ran on
    keys = ["dataset", "eps", "noise", "clean_val", "val_fraction", "subset", "label_file", "model", "student",
            "teachers", "alpha", "tau", "rate", "wall", "scope", "structure", "block", "perturb", "engine", "amp",
            "momentum", "drop", "l1", "dropout", "augment", "early_stop", "t_e", "t_a", "stop_falls", "seeds",
            "profile", "git_commit", "ran_on"]
    lines = [f"# DSD² run: {md_heading(os.path.basename(os.path.abspath(run_dir)))}", "",
             "| Setting | Value |", "|---|---|"]
    # (a list's text as typed, `é`, not `\u00e9`: ensure_ascii=False; a byte that is not UTF-8 then md_cell's `\xNN`)
    lines += [f"| {k} | {md_cell(shown_literal(json.dumps(cfg[k], ensure_ascii=False)) if isinstance(cfg[k], (list, dict)) else cfg[k])} |"
              for k in keys if k in cfg and (k != "label_file" or cfg[k])]  # (label_file: cifar100n's)
    for role in ("teacher", "student"):  # each role's schedule (Table 4's row of its model, or the flags')
        sched = [(k, cfg[f"{role}_{k}"]) for k in ("epochs", "batch_size", "lr", "milestones", "weight_decay",
                                                   "rewind_iter") if f"{role}_{k}" in cfg]
        if sched:
            lines.append(f"| {role} schedule | " + ", ".join(f"{k} {json.dumps(v)}" for k, v in sched) + " |")
    done = ", ".join(f"{md_quoted(p)}: seeds {sorted(s)}" for p, s in ((p, run['curves'][p]) for p in ordered_phases(run)))
    lines += ["", f"Phases with metrics: {done or 'none yet'}.", "",
              "## Seeds", "", seed_table(run), "",
              "## Results (Table 1 style, mean ± std over seeds)", "", summary_table(run), "",
              "## Phase labels", "", "```", LABEL_RULE, "```", "", "## Plots", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] or ["(no metrics yet)"]
    path = os.path.join(run_dir, "summary.md")
    atomic_write(path, "\n".join(lines) + "\n")
    return path
