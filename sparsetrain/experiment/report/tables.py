"""The Table-1-style summary over seeds and the per-round tables of a run (Markdown)."""
from __future__ import annotations

import math

import numpy as np

from ..config import config_from_json
from ..early_stop import EARLY_STOPS, algorithm2_stop, reference_known
from .labels import label_rounds
from .text import label_value, md_cell, md_heading, shown_text  # (re-exported: the reports' escaping)
from ..metrics import NAN, best_index, fin, get, teacher_tag

__all__ = ["config_problem", "summary_table", "table1_rows", "outcome", "stop_cell", "ordered_phases", "vanilla_phase", "phase_title", "per_round",
           "stats", "mean", "ms", "md_cell", "md_heading", "shown_text", "started_seeds", "stops_unknown"]


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def started_seeds(seed_rows: dict, cfg: dict) -> set:
    """The seeds a phase's means are out of: those the run was started for (config's; a seed whose phase
    recorded no round, failed or not run yet, is missing from every mean) and those with a curve."""
    return set(seed_rows) | {s for s in cfg.get("seeds") or [] if _int(s)}


def stops_unknown(seed_rows: dict) -> int:
    """How many seeds' curves the stop rules cannot run on (round 0's entropy NaN: reference_known), whose
    stop is n/a, not "never"."""
    return sum(1 for rows in seed_rows.values() if rows and not reference_known(rows))


# config.json's settings the report computes with (a hand-edited file: a str rate was a TypeError from
# the arithmetic, t_e 80 a traceback from Algorithm 2's check), and what each must be
_SETTING_CHECKS = [
    *((k, lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)") for k in ("rate", "wall")),
    *((k, lambda v: _real(v) and 0 < v <= 1, "a fraction in (0, 1]") for k in ("t_e", "t_a")),
    ("stop_falls", lambda v: _int(v) and v >= 1, "an int >= 1"),
    ("early_stop", lambda v: v in EARLY_STOPS, f"one of {', '.join(EARLY_STOPS)}"),
    ("seeds", lambda v: isinstance(v, list) and all(map(_int, v)), "a list of ints"),
    ("teachers", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of str"),
    *((k, lambda v: isinstance(v, str), "a str") for k in ("dataset", "model", "student"))]


def config_problem(cfg: dict) -> str | None:
    """What is wrong with a run's config.json settings that the report reads (missing ones are at
    their defaults); None when nothing is."""
    for key, ok, what in _SETTING_CHECKS:
        if key in cfg and not ok(cfg[key]):
            return f"{key} must be {what}, got {cfg[key]!r}"
    try:  # (every setting's type, as a resume loads them: config_from_json)
        config_from_json(cfg)
    except TypeError as e:
        return str(e)
    return None


def ordered_phases(run) -> list[str]:
    cfg, phases = run["config"], list(run["curves"])
    tags = [f"distill-{teacher_tag(t)}" for t in cfg.get("teachers", [])]  # (the command's order)
    key = {"teacher": (0, 0), "vanilla": (1, 0)}
    return sorted(phases, key=lambda p: key.get(p, (2, tags.index(p) if p in tags else len(tags))) + (p,))


def vanilla_phase(run) -> str | None:
    """The phase whose curve is the vanilla student's: its own, or the teacher run's where the study
    trained none (Config.separate_vanilla, the study's own rule: the same model under any alias, the
    same schedule up to settings the run ignores); None for a sweep's teacher run kept in its report
    ("teacher_run": its placeholders name its own model as the student, the grid's is another)."""
    curves = run["curves"]
    if run.get("teacher_run"):
        return None
    if "vanilla" in curves:
        return "vanilla"
    return "teacher" if "teacher" in curves and not config_from_json(run["config"]).separate_vanilla() else None


def stats(vals):
    v = np.array([x for x in vals if fin(x)], float)
    if not len(v):
        return NAN, NAN, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _nd(vals) -> int:
    """Decimals for >= 3 significant digits of the largest value (quick runs cost ~1e-3 PFLOPs)."""
    big = max([abs(x) for x in vals if fin(x) and x != 0] or [1.0])
    return int(min(8, max(2, 2 - math.floor(math.log10(big)))))


def ms(vals, nd=2) -> str:
    """mean ± sample std (ddof=1) over the finite values; just the mean for one value; n/a for none."""
    nd = _nd(vals) if nd is None else nd
    m, s, n = stats(vals)
    return "n/a" if n == 0 else f"{m:.{nd}f}" if n == 1 else f"{m:.{nd}f} ± {s:.{nd}f}"


_RULE_NAME = {None: "", "entropy": "Alg. 2", "entropy-peak": "peak rule"}


def outcome(rows, rule, cfg: dict, phase: str = "", finished: bool = False, ended: str | None = None) -> dict:
    """One seed's cells of Table 1 for a stop rule (None: the whole curve): FLOPs to the stop in both
    conventions, the best-validation model among the rounds <= the stop and the model at the stop
    (the paper's line 17), the stop's phase label, the FLOPs saved against the whole curve. `ended`: why
    a finished run ended (best.json's "stop"; None: not recorded)."""
    stop = algorithm2_stop(rows, cfg.get("t_e", 0.8), cfg.get("t_a", 0.8), rule, cfg.get("stop_falls", 1)) \
        if rule else None
    end = stop if stop is not None else rows[-1]["round"]
    upto = [r for r in rows if r["round"] <= end]
    # (the teacher's cost: a round's NaN, a torn cell, makes the sum unknown, n/a, not a cost short of that round)
    b = best_index(upto)
    best = upto[b] if b is not None else {}  # (no round with a validation score: n/a, not the last round's)
    at = upto[-1]
    labels = label_rounds(rows)
    total, total_paper = get(rows[-1], "cum_flops"), get(rows[-1], "paper_cum_flops")
    rate, wall = cfg.get("rate"), cfg.get("wall")
    nxt = 1.0 - (1.0 - get(rows[-1], "sparsity")) * (1.0 - rate) if rate is not None else math.inf
    # the curve ends before the wall and not because nothing was left to prune: the run is still going
    # (finished unknown counts so), or a stop rule ended this student run online
    early = cfg.get("early_stop", "none")
    online = (phase != "teacher" and early not in (None, "none") and algorithm2_stop(
        rows, cfg.get("t_e", 0.8), cfg.get("t_a", 0.8), early, cfg.get("stop_falls", 1)) == rows[-1]["round"])
    # (block and filter rounds are not the nominal rate (their rule's next_sparsity measures a trial round,
    # which needs the model): their unfinished curve counts as cut, and a finished one takes what it recorded)
    nominal = cfg.get("structure", "unstructured") not in ("block", "filter")
    cut = ended == "early stop" if finished and ended else \
        wall is not None and (nxt < wall - 1e-9 or not nominal) and (not finished or online)
    out = {"pflops": get(at, "cum_flops") / 1e15, "paper": get(at, "paper_cum_flops") / 1e15,
            "stop": stop, "end": end,
            "teacher": (get(rows[0], "teacher_cost", 0.0) + sum(get(r, "teacher_flops", 0.0) for r in upto)) / 1e15,
            "teacher_paper": (get(rows[0], "teacher_paper_cost", 0.0)
                              + sum(get(r, "teacher_paper_flops", 0.0) for r in upto)) / 1e15,
            "test": 100 * get(best, "test_acc"), "test_at": 100 * get(at, "test_acc"),
            "sparsity": 100 * get(best, "sparsity"), "sparsity_at": 100 * get(at, "sparsity"),
            "label": "–" if rule and stop is None else labels[rows.index(at)],  # (a rule that never fired)
            # a curve cut before the wall (stopped online, in progress): a rule that has not fired is
            # undecided, and no saving can be measured against the whole curve
            "saved": 100 * (1 - get(at, "cum_flops") / total) if total and not cut else NAN,
            "saved_paper": 100 * (1 - get(at, "paper_cum_flops") / total_paper) if fin(total_paper) and total_paper
            and not cut else NAN, "short": cut, "unknown": False}
    if rule and not reference_known(rows):  # (round 0's entropy NaN: the rule cannot run, its stop is unknown,
        # not "never": every cell that depends on the stop is n/a for this seed, left out of the row's means)
        out.update({k: NAN for k in out if k not in ("stop", "end", "short", "unknown")}, label="n/a", unknown=True)
    return out


def stop_cell(spec) -> str:
    """A Table 1 row's stop cell over its seeds: the stop round (a rule's; the curve's last round without
    one), `–` the rule never stopped, `n/a` it cannot run (round 0's entropy NaN), `†` the curve ends
    before the wall (`–†`: undecided)."""
    ends = [("n/a" if o.get("unknown") else "–" if o["stop"] is None else str(o["stop"])) if spec["rule"]
            else str(o["end"]) for o in spec["outs"]]
    return _cell([e + ("†" if o["short"] and not o.get("unknown") and (not spec["rule"] or o["stop"] is None) else "")
                  for e, o in zip(ends, spec["outs"])])


def _cell(vals) -> str:
    return vals[0] if len(set(vals)) == 1 else ", ".join(vals)


def _part(cell: str, outs, key: str) -> str:
    """`cell` (a mean over the seeds with a value) with how many of the row's seeds that is, when not all."""
    return cell + _of([o[key] for o in outs])


def _of(vals) -> str:
    """' (k of n seeds)' where only k of the n values are finite (the mean beside it is theirs), else ''."""
    k = sum(fin(v) for v in vals)
    return f" ({k} of {len(vals)} seeds)" if 0 < k < len(vals) else ""


def _flops_cell(vals, extra, distill: bool) -> str:
    """mean ± std of `vals` (`(k of n seeds)` where not all have one), then (a distillation) the teacher's cost
    `extra` as (+mean over the seeds that have it, `k of n seeds` where not all do; +n/a where none does: "+nan",
    or a silent mean of the others, before)."""
    m, _, n = stats(extra)
    more = "n/a" if not n else f"{m:.{_nd(extra)}f}" + (f", {n} of {len(extra)} seeds" if n < len(extra) else "")
    return ms(vals, None) + _of(vals) + (f" (+{more})" if distill else "")


def same_note(run, ph) -> str:
    """' (= distill-dense in seeds 0, 2: ...)' where those seeds' `ph` is a link to another phase of the
    seed (one teacher checkpoint served both: the best-validation teacher was round 0, the dense one). Plain text
    (Markdown callers md_cell it; legends, table1.csv): a twin's name quoted where its `, ` would read as two (label_value)."""
    same = run.get("same_as", {}).get(ph, {})
    if not same:
        return ""
    seeds, twins = sorted(same), sorted(set(same.values()))
    who = "every seed" if seeds == sorted(run["curves"].get(ph, {})) else \
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    return f" (= {', '.join(map(label_value, twins))} in {who}: the same teacher checkpoint, the same student run)"


def table1_rows(run) -> list[dict]:
    """Table 1's rows of a run, in the paper's order: {name, phase, rule (None: no early stop),
    distill, teacher, outs: one outcome dict per seed (seed order)}."""
    cfg, curves = run["config"], run["curves"]
    van = vanilla_phase(run)
    specs = []  # (row name, phase, stop rule, distill?, teacher)
    if "teacher" in curves and van != "teacher":
        specs += [(f"teacher ({cfg.get('model', '?')})", "teacher", None, False, "—")]
    groups = ([("vanilla", van, False, "—")] if van else []) + [
        (f"distilled from the {'pruned (best-validation)' if p == 'distill-best' else p[len('distill-'):]} teacher"
         + same_note(run, p), p, True, p[len("distill-"):]) for p in ordered_phases(run) if p.startswith("distill-")]
    for name, ph, distill, teacher in groups:
        specs += [(f"{name}, {'early stop (' + _RULE_NAME[r] + ')' if r else 'no early stop'}", ph, r, distill, teacher)
                  for r in (None, "entropy", "entropy-peak")]
    return [{"name": name, "phase": ph, "rule": rule, "distill": distill, "teacher": teacher,
             "outs": [outcome(rows, rule, cfg, ph, finished="running" in run and seed not in run["running"].get(ph, []),
                              ended=run.get("ended", {}).get(ph, {}).get(seed)) for seed, rows in sorted(curves[ph].items())]}
            for name, ph, rule, distill, teacher in specs]


def summary_table(run, rounds: bool = True) -> str:
    """Markdown: Table 1 over seeds (mean ± sample std; the paper's rows, each early stop row once per
    rule), then (`rounds`) one per-round table per phase."""
    cfg = run["config"]
    nseeds = len(cfg.get("seeds", []))
    specs = table1_rows(run)
    out = ["| Run | Early stop | Distill | Teacher | Training [PFLOPs] exact | Training [PFLOPs] paper conv. | "
           "Test acc. [%] best val ≤ stop | Test acc. [%] at stop | Sparsity [%] best val | Sparsity [%] at stop | "
           "Stop round | Stop phase | FLOPs saved [%] exact | FLOPs saved [%] paper conv. | Seeds |",
           "|---|:-:|:-:|---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|"]
    for spec in specs:
        name, rule, distill, teacher, outs = (spec[k] for k in ("name", "rule", "distill", "teacher", "outs"))
        name, teacher = md_cell(name), md_cell(teacher)  # (a teacher path's `|` split the row)
        ns = f"{len(outs)}" + ("" if len(outs) == nseeds or not nseeds else f"/{nseeds}")
        cell = lambda key, nd=2: _part(ms([o[key] for o in outs], nd), outs, key)  # noqa: E731
        out.append(f"| {name} | {'✓' if rule else ''} | {'✓' if distill else ''} | {teacher} | "
                   f"{_flops_cell([o['pflops'] for o in outs], [o['teacher'] for o in outs], distill)} | "
                   f"{_flops_cell([o['paper'] for o in outs], [o['teacher_paper'] for o in outs], distill)} | "
                   f"{cell('test')} | {cell('test_at')} | {cell('sparsity')} | {cell('sparsity_at')} | {stop_cell(spec)} | "
                   f"{_cell([o['label'] for o in outs])} | {cell('saved', 1) if rule else ''} | "
                   f"{cell('saved_paper', 1) if rule else ''} | {ns} |")
    if not specs:
        out.append("| (no completed rounds yet) | | | | | | | | | | | | | | |")
    out += ["", f"Early stop = a stop rule replayed on each seed's curve (T_E = {cfg.get('t_e', 0.8)}, T_A = "
            f"{cfg.get('t_a', 0.8)}): Alg. 2 = the paper's Algorithm 2 as written (entropy ≤ T_E × the dense "
            f"model's), peak rule = entropy ≤ T_E × its running peak after {cfg.get('stop_falls', 1)} consecutive "
            "fall(s) (experiment/early_stop.py). Two models per stop: the best-validation round among the rounds "
            "up to the stop, and the model at the stop (the paper's line 17); FLOPs are those spent up to the "
            "stop, saved = against the whole curve, in each convention (the paper's Table 1 savings are in its "
            "own: a late sparse round costs little exact FLOPs but a whole dense round there). Training FLOPs "
            "exact = 3 × forward FLOPs (2 per multiply-add, plus BatchNorm, activations and pooling) at each round's "
            "sparsity × training samples × epochs, summed over rounds; paper conv. = the paper's Tables 1 and "
            "6-11: a dense round (3 × the dense forward's multiply-adds, one FLOP each, × all training images, "
            "validation included, × epochs) per round (so at sparsity 0, with 10% held out, exact ≈ 1.8 × paper conv.), "
            "whatever the sparsity. (+x) = the teacher's cost in the same convention: the FLOPs spent obtaining "
            "it plus its KD inference up to the stop (mean over seeds). Stop round `–`: the rule never stopped "
            "(whole curve counted); `†`: the curve ends before the wall unfinished (no best.json: the run in "
            "progress, or one that failed or was interrupted: its curve partial) or stopped "
            "online (a curve that ran out of weights to prune is finished): `–†` = the rule had not fired by "
            "then (undecided), and FLOPs saved is n/a on such a curve, whatever stopped it (the whole curve it "
            "would be measured against was never trained); `n/a`: the rule cannot run on that seed's curve (the "
            "dense model's entropy, round 0's, the reference of both rules, is NaN): its stop is unknown, and the "
            "seed is left out of the row's means. `(k of n seeds)`: a mean over the k seeds with a value. "
            "Test acc. and sparsity: of the best-validation model up to the stop and of the model at the stop "
            "(the paper's Table 1 reports, on its row without early stop, the best-validation model's sparsity: "
            "99.62% = 1 − 0.8^25, round 25 of 0–29, the best val columns; on its early-stop rows the model at the "
            "stop's: 36.00% = 1 − 0.8^2, round 2, the at stop columns; Tables 6–8 alike); n/a where no round has "
            "a validation score. "
            "± = sample std over seeds.", ""]
    for ph in ordered_phases(run) if rounds else []:
        # (the teacher run never stops: its table marks no replayed stop unless it is the vanilla student's curve)
        stops = ph != "teacher" or vanilla_phase(run) == ph
        out += [f"### Per round: {md_cell(phase_title(run, ph))}", "", _round_table(run["curves"][ph], cfg, stops), ""]
        # (seed_status.py's words for the seeds whose curve here is missing or unfinished; a seed done without
        # it ran --phases without this phase)
        lacking = [f"seed {s}: {w}" for s, w in sorted(run.get("status", {}).items()) if w != "done" and (
            s not in run["curves"][ph] or s in run.get("running", {}).get(ph, []))]
        out += [f"Seeds whose curve is missing or unfinished: {'; '.join(map(md_cell, lacking))}.", ""] if lacking else []
    return "\n".join(out)


def phase_title(run, ph) -> str:
    cfg = run["config"]
    if ph == "teacher":
        return f"teacher ({cfg.get('model', '?')})" + (" = vanilla student" if vanilla_phase(run) == ph else "")
    if ph == "vanilla":
        return f"vanilla student ({cfg.get('student', '?')})"
    return f"student ({cfg.get('student', '?')}) distilled from the {ph[len('distill-'):]} teacher" + same_note(run, ph)


def per_round(seed_rows: dict) -> tuple[list[int], dict]:
    """Rounds present in any seed, and {round: [that round's row of each seed having it]}."""
    by: dict[int, list] = {}
    for rows in seed_rows.values():
        for r in rows:
            by.setdefault(r["round"], []).append(r)
    return sorted(by), by


def mean(rs, key) -> float:
    return stats([get(r, key) for r in rs])[0]


def _num_cell(v: float, nd: int) -> str:
    """A per-round mean to `nd` decimals; n/a where no seed has the value (a column an older run did not
    write: "nan" stood there, where every other cell of the report says n/a)."""
    return f"{v:.{nd}f}" if fin(v) else "n/a"


def _round_table(seed_rows: dict, cfg: dict, stops_too: bool = True) -> str:
    rounds, by = per_round(seed_rows)
    labels = label_rounds([{"test_acc": mean(by[k], "test_acc")} for k in rounds])
    best, stops = {}, {}
    for rows in seed_rows.values():
        if (i := best_index(rows)) is not None:
            best[rows[i]["round"]] = best.get(rows[i]["round"], 0) + 1
        for rule in ("entropy", "entropy-peak") if stops_too else ():
            s = algorithm2_stop(rows, cfg.get("t_e", 0.8), cfg.get("t_a", 0.8), rule, cfg.get("stop_falls", 1))
            if s is not None:
                stops[(s, rule)] = stops.get((s, rule), 0) + 1
    n = len(started_seeds(seed_rows, cfg))
    unknown = stops_unknown(seed_rows) if stops_too else 0  # (said on the first round's row, as Table 1's n/a)
    nd = _nd([get(r, "cum_flops") / 1e15 for rows in seed_rows.values() for r in rows])
    out = ["| Round | Sparsity [%] | Val acc [%] | Test acc [%] | Entropy [bits] | Label | s/round | s/epoch "
           "| Sparse layers | Cum. PFLOPs exact | Best val / stops |", "|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|---|"]
    for k, lab in zip(rounds, labels):
        rs = by[k]
        pct = lambda key: [100 * get(r, key) for r in rs]  # noqa: E731
        layers = _cell([_num_cell(get(r, "sparse_layers"), 0) for r in rs])  # (each seed's, where they differ)
        marks = ([f"{len(rs)}/{n} seeds"] if len(rs) < n else []) + (  # rounds past a seed's last
            [f"best {best[k]}/{n}"] if k in best else []) + [
            f"{_RULE_NAME[r]} stop {stops[(k, r)]}/{n}" for r in ("entropy", "entropy-peak") if (k, r) in stops] + (
            [f"stops n/a {unknown}/{n} (round 0's entropy NaN: the rules cannot run)"] if unknown and k == rounds[0] else [])
        # (a mean over the seeds whose value is finite: `(k of n seeds)` where a seed's is NaN, a torn cell)
        num = lambda key, nd, v: _num_cell(v, nd) + _of([get(r, key) for r in rs])  # noqa: E731
        ent = [get(r, "entropy_mean") for r in rs]
        out.append(f"| {k} | {num('sparsity', 2, mean(rs, 'sparsity') * 100)} | {ms(pct('val_acc'))}"
                   f"{_of(pct('val_acc'))} | {ms(pct('test_acc'))}{_of(pct('test_acc'))} | {ms(ent, 3)}{_of(ent)} | "
                   f"{lab} | {num('wall_s', 1, mean(rs, 'wall_s'))} | {num('sec_per_epoch', 2, mean(rs, 'sec_per_epoch'))} | "
                   f"{layers} | {num('cum_flops', nd, mean(rs, 'cum_flops') / 1e15)} | {', '.join(marks)} |")
    return "\n".join(out)
