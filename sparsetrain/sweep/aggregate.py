"""Aggregation over run directories: the paper's multi-run tables from whatever runs exist.

Run directories with the same result settings except the seed form one *group* (a sweep runs
each seed in its own directory; a single study may hold several seeds): their curves are pooled
and every table reports mean ± sample std over the group's seeds. The settings that differ between
groups (eps, alpha, tau, student, ...) label the rows. A phase whose run has not finished (no
best.json yet) is counted with the rounds it has and marked "in progress".
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

from ..experiment.config import Config, config_from_json
from ..experiment.files import CorruptFile, ReadFailed
from ..experiment.metrics import NAN, best_index, fin, get, load_run
from ..experiment.report import verify_metrics
from ..experiment.report.labels import label_rounds
from ..experiment.report.tables import config_problem, md_cell, md_heading, ms, ordered_phases, stats, stop_cell, summary_table, table1_rows, vanilla_phase
from ..experiment.report.text import label_value, md_quoted, shown_literal
from ..experiment.reuse import needed_phases, phase_done
from ..experiment.seed_status import describe, read_status

__all__ = ["load_groups", "ended_by_their_status", "mark_stopped", "seed_counts", "varying", "table1_md", "table1_csv", "alpha_tau_md", "best_model_rows", "best_model_md",
           "group_label", "teacher_only"]

# Config settings that never separate groups (not result settings); config.json's other keys (commit,
# versions, torch_threads, fingerprints, resumes: what a run recorded of itself) never do either
_IGNORED = ("seeds", "out", "threads", "data_dir", "no_download", "device", "phases", "reuse")
# the order in which differing settings label a group
_ORDER = ("dataset", "eps", "model", "student", "perturb", "alpha", "tau", "structure", "profile")


_DEFAULTS = json.loads(json.dumps(dataclasses.asdict(Config())))
_SETTINGS = [k for k in _DEFAULTS if k not in _IGNORED]  # what separates groups
# the settings of the student runs and distillation (a lone teacher run holds placeholders for them)
_STUDENT = {k for k in _SETTINGS if k.startswith("student") or k in ("teachers", "alpha", "tau", "early_stop", "t_e",
                                                                       "t_a", "stop_falls")}


def load_groups(run_dirs, unreadable: list | None = None, planned: dict | None = None) -> list[dict]:
    """Group run directories by their result settings (seeds pooled). Each group: {"config": the
    settings (seeds = every seed its directories were started for), "curves": {phase: {seed: rows}}, "dirs": [...],
    "running": {phase: [seeds whose phase has not finished]}, "unfinished_in": {(phase, seed): its
    run directory}, "stopped": {phase: [those of them whose run ended without finishing]}, filled by
    mark_stopped, "ended" and "same_as": load_run's, per seed, "absent_in": {seed: a planned run without a
    directory yet}, "failed": [those of them whose run failed], "planned_only": no directory yet,
    "left_out": {phase: [(seed, directory, the directory whose curve of that seed is used)]}: a seed
    found in two directories (not links to one run) counts once, the first one's}.
    Directories without config.json are skipped unless `planned` ({run directory or run name: its
    resolved config}, a sweep's plan) knows them: their group is kept without curves (a grid point whose
    run failed before starting still gets its rows, marked "no result"); one of them holding results (its
    config.json lost: lost_config) is appended to `unreadable` too; one whose config.json does not
    parse is skipped and appended to `unreadable` (its settings are unknown: the defaults would mislabel
    its numbers), as is one with a setting of the wrong type (config_problem: "DIR (what is wrong)") or a
    metrics.csv that is not a study's or no longer matches its record (CorruptFile: "DIR (its message)")."""
    if isinstance(run_dirs, (str, bytes, os.PathLike)):  # (its characters were read as directories: an empty report)
        raise TypeError(f"run_dirs must be a list of run directories, got one path {run_dirs!r}: pass [{run_dirs!r}]")
    groups: dict[str, dict] = {}
    planned = dict(planned or {})
    for d in list(run_dirs) + [d for d in planned if d not in run_dirs]:
        if not os.path.isfile(os.path.join(d, "config.json")):
            if d in planned:
                _add_planned(groups, d, planned[d])
            if unreadable is not None and lost_config(d):  # (its curves were left out unnamed before 2026-12-06)
                unreadable.append(f"{d} (config.json missing beside its results: its settings unknown)")
            continue
        try:  # (a finished phase's metrics.csv torn or edited since its record: the experiment's report refuses it)
            verify_metrics(d)
            run = load_run(d)
        except (CorruptFile, ReadFailed) as e:  # (a foreign, corrupt or unreadable metrics.csv: left out and named)
            if unreadable is not None:
                unreadable.append(f"{d} ({e})")
            continue
        if not isinstance(run["config"], dict) or not run["config"] or config_problem(run["config"]):
            if unreadable is not None:  # (a setting of the wrong type: named, a TypeError traceback before)
                problem = config_problem(run["config"]) if isinstance(run["config"], dict) else None
                unreadable.append(f"{d} ({problem})" if problem else d)
            continue
        run["config"] = {**_DEFAULTS, **run["config"]}  # (settings added since the run was made: their defaults)
        key = _key(run["config"])
        g = groups.setdefault(key, _new_group(run["config"]))
        g["dirs"].append(d)
        g["trains"][d] = (_trains(run["config"]), list(run["config"].get("seeds") or []))
        g["planned_only"] = False
        g["config"]["seeds"] = sorted(set(g["config"]["seeds"]) | set(run["config"].get("seeds", [])))
        for phase, by_seed in run["curves"].items():
            for seed, rows in by_seed.items():
                first = g["from"].setdefault((phase, seed), d)
                if first != d:  # the same seed twice (a copy, or a run of more seeds): the first one wins,
                    if os.path.realpath(os.path.join(first, f"seed{seed}", phase)) != \
                            os.path.realpath(os.path.join(d, f"seed{seed}", phase)):  # said (a link is one run)
                        g["left_out"].setdefault(phase, []).append((seed, d, first))
                    continue
                g["curves"].setdefault(phase, {})[seed] = rows
                if seed in run["ended"].get(phase, {}):  # (why a finished phase ended: the report's `†`)
                    g["ended"].setdefault(phase, {})[seed] = run["ended"][phase][seed]
                if seed in run["same_as"].get(phase, {}):
                    g["same_as"].setdefault(phase, {})[seed] = run["same_as"][phase][seed]
                if not phase_done(os.path.join(d, f"seed{seed}", phase)):
                    g["running"].setdefault(phase, []).append(seed)
                    g["unfinished_in"][phase, seed] = d
    return list(groups.values())


def lost_config(d: str) -> bool:
    """Whether run directory `d` holds a phase's metrics.csv (seed*/PHASE/) but no config.json: results whose
    settings are lost (the study writes config.json before any phase)."""
    return not os.path.isfile(os.path.join(d, "config.json")) and \
        bool(glob.glob(os.path.join(d, "seed*", "*", "metrics.csv")))


def _key(config: dict) -> str:
    return json.dumps({k: config[k] for k in _SETTINGS}, sort_keys=True)


def _new_group(config: dict) -> dict:
    return {"config": {**config, "seeds": []}, "curves": {}, "dirs": [], "running": {}, "unfinished_in": {},
            "stopped": {}, "ended": {}, "same_as": {}, "absent_in": {}, "failed": [], "planned_only": True, "from": {},
            "left_out": {}, "trains": {}, "lost": {}}


def _trains(config: dict) -> list:
    """The phases a run directory's own process trains (its config.json's --phases), [] if unknown."""
    try:
        return needed_phases(config_from_json(config))[0]
    except (TypeError, ValueError):
        return []


def _add_planned(groups: dict, d: str, config: dict) -> None:
    """A planned run that left no config.json (failed before starting, or not started yet): its seeds
    join its setting's group, creating it if no other run has that setting."""
    config = {**_DEFAULTS, **json.loads(json.dumps(config))}
    g = groups.setdefault(_key(config), _new_group(config))
    seeds = list(config.get("seeds") or [])
    g["config"]["seeds"] = sorted(set(g["config"]["seeds"]) | set(seeds))
    for seed in seeds:
        g["absent_in"].setdefault(seed, d)


def teacher_only(config: dict) -> bool:
    """A sweep's teacher run (--phases teacher): its student settings are placeholders."""
    return list(config.get("phases") or []) == ["teacher"]


def _shown(g, k) -> bool:
    return not (teacher_only(g["config"]) and k in _STUDENT)


def varying(groups, axes=()) -> list[str]:
    """Settings that differ between groups (and the sweep's `axes`, which label a group even where the
    other values' runs failed), in label order; a lone teacher run's student settings never differ."""
    # (a planned point without a run directory labels by the axes only: its other settings are the plan's;
    # an axis of both roles, --batch-size, is the teacher's and the student's setting)
    axes = {*axes, *(f"{role}_{k}" for k in axes for role in ("teacher", "student"))}
    diff = [k for k in _SETTINGS if k in axes or len({json.dumps(g["config"].get(k)) for g in groups
                                                       if _shown(g, k) and not g.get("planned_only")}) > 1]
    return sorted(diff, key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))


def group_label(g, keys) -> str:
    """Group `g`'s settings `keys` as `k=v, k=v` (numbers and texts as _num writes them), else its dataset and eps."""
    c = g["config"]
    # (numbers as Table 5 prints them: tau=10, not the config's 10.0)
    return ", ".join(f"{k}={_num(c.get(k))}" for k in keys if _shown(g, k)) or f"{c.get('dataset')} eps={c.get('eps')}"


def _title(g, keys) -> str:
    c = g["config"]
    models = c.get("model", "?") + ("" if c.get("student") in ("", None, c.get("model")) else f" → {c.get('student')}")
    return md_heading(f"{c.get('dataset')}, ε = {c.get('eps')}, {models}" + (f" ({group_label(g, keys)})" if keys else ""))


def ended_by_their_status(run_dirs) -> list[str]:
    """The run directories a seed of which records, in its own status.json, that its process ended: failed,
    stopped, or running with its pid gone (a `report DIR` of runs stopped outside a sweep, which has no status
    of its own for them: they read "In progress" before 2026-12-07)."""
    def ended(sd: str) -> bool:
        record = read_status(sd)
        return record is not None and describe(record).startswith(("failed", "stopped"))
    return [d for d in run_dirs if any(map(ended, glob.glob(os.path.join(glob.escape(d), "seed*"))))]


def mark_stopped(groups, ended) -> None:
    """`ended`: run directories whose run failed or was interrupted: their unfinished curves are
    partial results, not runs in progress."""
    ended = {os.path.realpath(d) for d in ended}
    for g in groups:
        for (phase, seed), d in g["unfinished_in"].items():
            if os.path.realpath(d) in ended:
                g["stopped"].setdefault(phase, []).append(seed)
        g["failed"] = sorted(s for s, d in g.get("absent_in", {}).items() if os.path.realpath(d) in ended)
        # a phase the ended run was to train that recorded no round (its vanilla diverged in round 0): no
        # curve, so no row and no note before 2026-12-06 (its setting showed only the linked teacher's row)
        g["lost"] = {}
        for d, (phases, seeds) in g.get("trains", {}).items():
            if os.path.realpath(d) in ended:
                for ph in phases:
                    g["lost"].update({ph: g["lost"].get(ph, []) + [s for s in seeds if (ph, s) not in g["from"]]})
        g["lost"] = {ph: sorted(set(s)) for ph, s in g["lost"].items() if s}


def seed_counts(g, phase) -> dict:
    """A phase's seeds: started (every seed of the setting), in progress (unfinished, not ended) and
    failed (ended without finishing, or failed before recording a round)."""
    stopped = set(g.get("stopped", {}).get(phase, []))
    started = set(g["config"].get("seeds") or []) | {s for c in g["curves"].values() for s in c}
    return {"seeds_started": len(started),
            "in_progress": [s for s in g.get("running", {}).get(phase, []) if s not in stopped],
            "failed": sorted(stopped | set(g.get("failed", [])) | set(g.get("lost", {}).get(phase, [])))}


def _running_note(g) -> str:
    # (each phase and run folder quoted, md_quoted: joined bare by `; `, a phase `distill-path-a; b` read as two)
    stopped = g.get("stopped", {})
    r = {p: [s for s in seeds if s not in stopped.get(p, [])] for p, seeds in g["running"].items()}
    notes = [("In progress (not finished)", {p: s for p, s in r.items() if s}),
             ("Did not finish (the run failed or was interrupted; the curve is partial)", stopped)]
    none = ""
    if g.get("failed"):
        none = f"No result: seed(s) {g['failed']} failed before recording a round (see the Runs table).\n\n"
    if g.get("lost"):
        none += "No result: " + "; ".join(f"{md_quoted(p)} seed(s) {s}" for p, s in g["lost"].items()) + \
            " (the run failed or was interrupted before the phase recorded a round; see the Runs table).\n\n"
    if g.get("left_out"):  # (two runs of one seed: one curve per seed in the means, the other named)
        none += "Left out, a seed's second curve (the first one's is shown): " + "; ".join(
            f"{md_quoted(p)} seed {s} of {md_quoted(d)} (shown: {md_quoted(first)})" for p, dup in sorted(g["left_out"].items()) for s, d, first in dup) + ".\n\n"
    return none + "".join(f"{what}: " + "; ".join(f"{md_quoted(p)} seed(s) {sorted(s)}" for p, s in sorted(ph.items())) + ".\n\n"
                   for what, ph in notes if ph)


def table1_md(groups, keys) -> str:
    """Table 1 / Tables 6-11 layout: one Table 1 per group (per dataset and eps, ...)."""
    out = []
    for g in groups:
        out += [f"### {_title(g, keys)}", "", _running_note(g) + summary_table(g, rounds=False), ""]
    return "\n".join(out)


def table1_csv(groups, keys) -> list[dict]:
    """Table 1's cells as numbers: one row per group x Table 1 row (mean, std, n over seeds)."""
    rows = []
    for g in groups:
        # (a setting without a curve, its runs failed or not started: one row of no result, n = 0)
        # (and a row per phase whose run ended before it recorded a round)
        none = lambda ph: {"name": "(no result)", "phase": ph, "rule": None, "distill": False, "outs": []}  # noqa: E731
        lost = [none(ph) for ph in g.get("lost", {}) if ph not in g["curves"]]  # (in training order)
        for spec in (table1_rows(g) or ([] if lost else [none("")])) + lost:
            row = {k: g["config"].get(k) for k in keys}
            c = seed_counts(g, spec["phase"])
            row.update(run=spec["name"], phase=spec["phase"], stop_rule=spec["rule"] or ("" if spec["name"] == "(no result)" else "none"),
                       seeds=len(spec["outs"]), seeds_started=c["seeds_started"],
                       in_progress=" ".join(map(str, c["in_progress"])), failed=len(c["failed"]),
                       failed_seeds=" ".join(map(str, c["failed"])),
                       stop=stop_cell(spec) if spec["outs"] else "")
            for cell in ("test", "test_at", "sparsity", "sparsity_at", "pflops", "paper", "teacher", "teacher_paper",
                         "saved", "saved_paper"):
                m, s, n = stats([o[cell] for o in spec["outs"]])  # (n: the seeds with a value; saved may have fewer)
                if cell.startswith("saved") and not spec["rule"] or cell.startswith("teacher") and not spec["distill"]:
                    m, s, n = NAN, NAN, 0  # (blank in the Markdown: no stop rule, no teacher)
                row[f"{cell}_mean"], row[f"{cell}_std"], row[f"{cell}_n"] = m, s if n > 1 else NAN, n
            rows.append(row)
    return rows


def _best_val(g, phase) -> list[float]:
    """Per seed: the validation accuracy [%] of the best-validation round (w_best, Algorithm 1: its
    highest validation score; NaN, left out of the mean, where no round has one)."""
    return [100 * get(rows[i], "val_acc") if (i := best_index(rows)) is not None else NAN
            for rows in g["curves"].get(phase, {}).values() if rows]


def _num(v) -> str:
    """A setting as written on the command line: 10, not the config's float 10.0; 0.8 stays 0.8; a list's (repr's) byte
    that is not UTF-8 as a name's, `\\xNN` (shown_literal); a text quoted where `, `/`=` would misread (label_value)."""
    return f"{v:g}" if isinstance(v, float) else label_value(v) if isinstance(v, str) else shown_literal(str(v))


def _alpha_tau_block(title, alphas, taus, cell) -> list[str]:
    """One α × τ table; cell(a, t) -> (mean or NaN, text); the best mean in bold (the paper's pick)."""
    cells = {(a, t): cell(a, t) for a in alphas for t in taus}
    best = max((m for m, _ in cells.values() if fin(m)), default=None)
    # (every cell of the best mean: means equal but for float rounding, (15 + 18.33) / 2 and (20 + 13.33) / 2,
    # were one bold and one not before 2026-12-06)
    top = lambda m: best is not None and fin(m) and math.isclose(m, best, rel_tol=1e-9, abs_tol=1e-9)  # noqa: E731
    out = [f"### {md_heading(title)}", "", "| α \\ τ | " + " | ".join(map(_num, taus)) + " |", "|--:|" + "--:|" * len(taus)]
    for a in alphas:
        out.append(f"| {_num(a)} | " + " | ".join(f"**{x}**" if top(m) else x for m, x in (cells[a, t] for t in taus)) + " |")
    return out + [""]


def alpha_tau_md(groups, keys) -> str:
    """Table 5: validation accuracy of the distilled students (best-validation round, mean ± std over
    seeds) for every alpha x tau, one block per other setting (eps, ...), and where eps varies the
    average over the eps values that the paper picks alpha and tau by (its Appendix C)."""
    if "alpha" not in keys and "tau" not in keys:
        return ""
    rest = [k for k in keys if k not in ("alpha", "tau")]
    groups = [g for g in groups if not teacher_only(g["config"])]  # (a teacher run's alpha/tau: placeholders)
    alphas = sorted({g["config"].get("alpha") for g in groups})
    taus = sorted({g["config"].get("tau") for g in groups})
    phases = sorted({p for g in groups for p in g["curves"] if p.startswith("distill-")})
    blocks: dict[str, list] = {}
    for g in groups:
        blocks.setdefault(group_label(g, rest), []).append(g)

    def cell(gs, a, t, ph):  # (mean or NaN, mean ± std, its seed mark) of the group of gs at alpha a, tau t; — for none
        g = next((g for g in gs if g["config"].get("alpha") == a and g["config"].get("tau") == t), None)
        if g is None:
            return NAN, "—", ""
        vals = _best_val(g, ph)
        m, _, n = stats(vals)  # (a cell of fewer seeds than its setting started says so, as Table 12's)
        started = seed_counts(g, ph)["seeds_started"]
        mark = f"{n} of {started}" if 0 < n < started else ""  # (the mark alone too: the mean over eps names it)
        return m, ms(vals) + (f" ({mark} seeds)" if mark else ""), mark

    out = []
    for ph in phases:
        for label, gs in blocks.items():
            out += _alpha_tau_block(f"{label}: {ph}", alphas, taus, lambda a, t: cell(gs, a, t, ph)[:2])
        if "eps" in rest:  # (the mean over eps of each setting's mean; n/a unless every eps has one)
            others = [k for k in rest if k != "eps"]
            avg: dict[str, list] = {}
            for g in groups:
                avg.setdefault(group_label(g, others) if others else "", []).append(g)
            for label, gs in avg.items():
                epss = sorted({g["config"].get("eps") for g in gs})
                if len(epss) < 2:  # (this setting ran at one eps: its block above is the whole story)
                    continue

                def mean_over_eps(a, t, gs=gs, epss=epss):
                    cs = [cell([h for h in gs if h["config"].get("eps") == e], a, t, ph) for e in epss]
                    m = float(sum(c[0] for c in cs) / len(cs)) if all(fin(c[0]) for c in cs) else NAN
                    # (an eps cell of fewer seeds than started keeps its mark: the mean was shown unmarked before 2026-12-06)
                    marks = ", ".join(f"ε {e}: {c[2]}" for e, c in zip(epss, cs) if c[2])
                    return m, f"{m:.2f}" + (f" ({marks} seeds)" if marks else "") if fin(m) else "n/a"
                title = f"average over ε = {', '.join(map(str, epss))}" + (f", {label}" if label else "")
                out += _alpha_tau_block(f"{title}: {ph}", alphas, taus, mean_over_eps)
    return "\n".join(out)


def best_model_rows(groups, keys) -> list[dict]:
    """Table 12: per group and phase (the vanilla first, then the teacher's where it is another curve,
    then the distilled students), the best-validation model w_best: its test accuracy, sparsity and
    double-descent phase (labels of each seed's curve), mean and std over seeds."""
    out = []
    for g in groups:
        van = vanilla_phase(g)  # (the teacher's own row too: the paper's Table 12 is the vanilla ResNet-18's)
        # (a setting without a curve: one row of no result, seeds 0 of those started)
        lost = [p for p in g.get("lost", {}) if p not in g["curves"]]
        for ph in (sorted(ordered_phases(g), key=lambda p: p != van) or ([] if lost else [None])) + lost:
            accs, sps, labs = [], [], []
            for rows in g["curves"].get(ph, {}).values():
                i = best_index(rows)
                if i is None:  # (no round with a validation score: no w_best; was round 0)
                    continue
                accs.append(100 * get(rows[i], "test_acc"))
                sps.append(100 * get(rows[i], "sparsity"))
                labs.append(label_rounds(rows)[i])
            (am, asd, n), (sm, ssd, ns) = stats(accs), stats(sps)
            c = seed_counts(g, ph)
            out.append({**{k: g["config"].get(k) for k in keys}, "setting": group_label(g, keys),
                        "phase": "(no result)" if ph is None else "vanilla" if ph == van else ph, "best_test_mean": am,
                        "best_test_std": asd if n > 1 else NAN,  # (as table1.csv: no sample std of one seed)
                        "sparsity_mean": sm, "sparsity_std": ssd if ns > 1 else NAN, "best_phase": ", ".join(sorted(set(labs))),
                        "seeds": len(accs), "seeds_started": c["seeds_started"], "best_test_n": n, "sparsity_n": ns,
                        "unfinished": len(g.get("running", {}).get(ph, [])), "failed": len(c["failed"]),
                        "_accs": accs, "_sps": sps})
    return out


def _seeds_cell(r) -> str:
    """Table 1's form: k/n where k of the n seeds started have a best model; then how many of them are
    unfinished (in progress or failed) and how many failed."""
    n = r.get("seeds_started") or r["seeds"]
    notes = [f"{u} unfinished" for u in [r.get("unfinished")] if u] + [f"{f} failed" for f in [r.get("failed")] if f]
    return f"{r['seeds']}" + ("" if n == r["seeds"] else f"/{n}") + (f" ({', '.join(notes)})" if notes else "")


def best_model_md(rows) -> str:
    out = ["| Setting | Phase | Best test acc. [%] | Sparsity [%] | Best model's phase | Seeds |",
           "|---|---|--:|--:|---|--:|"]
    part = lambda r, n: f" ({r[n]} of {r['seeds']} seeds)" if 0 < r[n] < r["seeds"] else ""  # noqa: E731
    # (a `|` in a setting, a --teachers path's, or in a phase, distill-path-a|b, split the row: escaped)
    out += [f"| {md_cell(r['setting'])} | {md_cell(r['phase'])} | {ms(r['_accs'])}{part(r, 'best_test_n')} | {ms(r['_sps'])}"
            f"{part(r, 'sparsity_n')} | {r['best_phase']} | {_seeds_cell(r)} |" for r in rows]
    return "\n".join(out)
