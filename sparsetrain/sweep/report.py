"""The sweep's report directory: summary.md (Tables 1/6-11 per setting, Table 5, Table 12, the
figures, the runs' states), table1.csv, best_model.csv and the PNGs. Written from whatever run
directories exist; every file atomically."""
from __future__ import annotations

import os
import re

from ..experiment.files import atomic_write, finish_interrupted_writes, remove_file, write_csv
from ..experiment.report.tables import md_cell, md_heading, shown_text
from ..experiment.report.text import md_quoted, shown_literal
from .aggregate import (alpha_tau_md, best_model_md, best_model_rows, ended_by_their_status, load_groups, mark_stopped,
                        table1_csv, table1_md, varying)
from .figures import _natural, write_figures

__all__ = ["write_sweep_report"]


def _status_md(status: dict) -> str:
    out = ["| Run | Kind | State | Seconds | Log / error |", "|---|---|---|--:|---|"]
    for name, s in status.items():
        # (a finished run's warning, its log's last line lost: in status.json only before 2026-12-06)
        note = "; ".join(str(n) for n in (s.get("error"), s.get("warning") and f"warning: {s['warning']}") if n)
        cell = md_cell(f"{note + ' — ' if note else ''}{s.get('log', '')}")  # (a "|" split the row)
        # (a run's name is the user's: its `|` split the row, its `*`/`_` marks rendered)
        out.append(f"| {md_cell(name)} | {md_cell(s.get('kind', ''))} | {md_cell(s['state'])} | {s.get('seconds', '')} | {cell} |")
    return "\n".join(out)


def _unreadable_md(entry: str, dirs) -> str:
    """One of load_groups' unreadable runs ("DIR" or "DIR (why)") as Markdown: its folder quoted as Python writes a
    str (md_quoted: a folder's own `, ` read as the list's before 2026-12-07), the reason escaped (md_cell)."""
    d = max((d for d in dirs if entry == d or entry.startswith(f"{d} (")), key=len, default=None)
    return md_cell(entry) if d is None else md_quoted(d) + md_cell(entry[len(d):])


def _report_files(out_dir: str) -> tuple:
    """The names of the files a report writes in `out_dir` (its by_<setting>.png those found there)."""
    by = {re.sub(r"\.png\..*", ".png", f) for f in os.listdir(out_dir) if f.startswith("by_") and ".png." in f}
    return ("summary.md", "table1.csv", "best_model.csv", "accuracy_vs_sparsity.png", *sorted(by))


def write_sweep_report(run_dirs, out_dir, status: dict | None = None, title: str = "sweep",
                       sort: bool = False, axes=(), teacher_runs=(), planned: dict | None = None) -> str:
    """Aggregate `run_dirs` into `out_dir`; returns the path of summary.md. `sort`: the settings in
    order of the values that differ (directories come in their names' order, whose tail is a hash);
    else in the order of `run_dirs` (a sweep's: its grid's). `axes`: the grid's axes, which label the
    settings even where only one of their values has results (the others' runs failed). `teacher_runs`:
    the sweep's teacher runs of studies (of another student model): kept where their study failed,
    their curve is labelled the teacher's, never the grid's vanilla student. `planned`: {run directory
    (or name of a run the experiment rejected): its resolved config} of the plan's result runs: a point
    whose run left no directory still gets its rows (no result)."""
    os.makedirs(out_dir, exist_ok=True)
    # a killed report's temporary files of these (a dead writer's only; `report DIR` holds no lock: they were
    # never removed before 2026-12-06, a sweep's start cleaning its own folder only)
    finish_interrupted_writes(out_dir, _report_files(out_dir))
    unreadable: list[str] = []
    groups = load_groups(run_dirs, unreadable, planned)
    ended = ended_by_their_status(run_dirs)  # (a seed's status.json; and the sweep's, which names its runs)
    if status or ended:  # (a run's directory is named after it)
        mark_stopped(groups, ended + [d for d in [*run_dirs, *(planned or {})]
                                      if (status or {}).get(os.path.basename(os.path.normpath(d)), {}).get("state") in
                                      ("failed", "interrupted")])
    teachers = {os.path.realpath(d) for d in teacher_runs}
    for g in groups:
        g["teacher_run"] = bool(teachers) and all(os.path.realpath(d) in teachers for d in g["dirs"])
    keys = varying(groups, axes)
    if sort:
        groups.sort(key=lambda g: [_natural(g["config"].get(k)) for k in keys])
    pngs = write_figures(groups, keys, out_dir)
    best = best_model_rows(groups, keys)
    for name, rows in (("table1.csv", table1_csv(groups, keys)),
                       ("best_model.csv", [{k: v for k, v in r.items() if not k.startswith("_")} for r in best])):
        if rows:  # (a name from the filesystem, not UTF-8: its bytes as \xNN, else the write raised; a list's too)
            write_csv(os.path.join(out_dir, name), [{k: shown_text(v) if isinstance(v, str) else shown_literal(str(v))
                                                     if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows])
        else:  # (no rows now: an earlier report's numbers would stay)
            remove_file(os.path.join(out_dir, name))
    n_dirs = sum(len(g["dirs"]) for g in groups) + len(unreadable)  # (a run that never started has none)
    lines = [f"# DSD² {md_heading(title)}", "", f"{n_dirs} run directories, {len(groups)} setting(s) "
             f"(seeds pooled); settings that differ: {', '.join(keys) or 'none'}.", ""]
    if unreadable:  # (load_groups names each by the folder it was given: f"{d}")
        dirs = [str(d) for d in [*run_dirs, *(planned or {})]]
        lines += [f"**Left out, unreadable (config.json: its settings unknown; or a metrics.csv not a study's):** {', '.join(_unreadable_md(u, dirs) for u in unreadable)}", ""]
    if status:
        failed = [n for n, s in status.items() if s["state"] in ("failed", "interrupted")]
        lines += ["## Runs", "", _status_md(status), "",
                  f"**{len(failed)} run(s) failed or were interrupted:** {', '.join(map(md_quoted, failed))}" if failed else
                  "Every run finished.", ""]
    lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] + [""]
    if any(k in keys for k in ("alpha", "tau")):
        lines += ["## Table 5 style: α × τ (validation accuracy [%] of the best-validation round, mean ± std; "
                  "bold: the best; the test accuracies are in Table 12)", "",
                  alpha_tau_md(groups, keys), ""]
    lines += ["## Table 12 style: the best-validation model per setting", "", best_model_md(best), "",
              "## Tables 1 and 6-11 style, per setting", "", table1_md(groups, keys)]
    path = os.path.join(out_dir, "summary.md")
    atomic_write(path, "\n".join(lines) + "\n")
    return path
