"""The Table-1-style summary over seeds and the per-round tables of a run (Markdown)."""
from __future__ import annotations

import math

import numpy as np

from ..early_stop import algorithm2_stop
from .labels import label_rounds
from ..metrics import NAN, fin, get

__all__ = ["summary_table", "ordered_phases", "vanilla_phase", "phase_title", "per_round", "stats", "mean"]


def ordered_phases(run) -> list[str]:
    cfg, phases = run["config"], list(run["curves"])
    tags = [f"distill-{t}" for t in cfg.get("teachers", [])]
    key = {"teacher": (0, 0), "vanilla": (1, 0)}
    return sorted(phases, key=lambda p: key.get(p, (2, tags.index(p) if p in tags else len(tags))) + (p,))


def vanilla_phase(run) -> str | None:
    cfg, curves = run["config"], run["curves"]
    if "vanilla" in curves:
        return "vanilla"
    same = cfg.get("student") in (None, "", cfg.get("model"))
    return "teacher" if same and "teacher" in curves else None


def stats(vals):
    v = np.array([x for x in vals if fin(x)], float)
    if not len(v):
        return NAN, NAN, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _nd(vals) -> int:
    """Decimals for >= 3 significant digits of the largest value (quick runs cost ~1e-3 PFLOPs)."""
    big = max([abs(x) for x in vals if fin(x) and x != 0] or [1.0])
    return int(min(8, max(2, 2 - math.floor(math.log10(big)))))


def _ms(vals, nd=2) -> str:
    """mean ± sample std (ddof=1) over the finite values; just the mean for one value; n/a for none."""
    nd = _nd(vals) if nd is None else nd
    m, s, n = stats(vals)
    return "n/a" if n == 0 else f"{m:.{nd}f}" if n == 1 else f"{m:.{nd}f} ± {s:.{nd}f}"


def _outcome(rows, early: bool, t_e, t_a, wall) -> dict:
    """One seed's row of Table 1: FLOPs to the stop (or the end), best-val round among rounds <= it."""
    stop = algorithm2_stop(rows, t_e, t_a) if early else None
    end = stop if stop is not None else rows[-1]["round"]
    upto = [r for r in rows if r["round"] <= end]
    scored = [r for r in upto if fin(get(r, "val_acc"))]
    best = max(scored, key=lambda r: r["val_acc"]) if scored else upto[-1]  # max: the first of ties
    return {"pflops": get(upto[-1], "cum_flops") / 1e15, "stop": stop, "end": end,
            "teacher": (get(rows[0], "teacher_cost", 0.0) + sum(get(r, "teacher_flops", 0.0) for r in upto)) / 1e15,
            "test": 100 * get(best, "test_acc"), "sparsity": 100 * get(best, "sparsity"),
            "short": wall is not None and not early and get(rows[-1], "sparsity") < wall - 1e-9}


def _rounds_cell(outs, early: bool) -> str:
    vals = [("–" if o["stop"] is None else str(o["stop"])) if early else str(o["end"]) + ("†" if o["short"] else "")
            for o in outs]
    return vals[0] if len(set(vals)) == 1 else ", ".join(vals)


def summary_table(run) -> str:
    """Markdown: Table 1 over seeds (mean ± sample std), then one per-round table per phase."""
    cfg, curves = run["config"], run["curves"]
    t_e, t_a, wall, nseeds = cfg.get("t_e", 0.8), cfg.get("t_a", 0.8), cfg.get("wall"), len(cfg.get("seeds", []))
    van = vanilla_phase(run)
    specs = []  # (row name, phase, early stop?, distill?, teacher)
    if "teacher" in curves and van != "teacher":
        specs += [(f"teacher ({cfg.get('model', '?')}), no early stop", "teacher", False, False, "—")]
    if van:
        specs += [("vanilla, no early stop", van, False, False, "—"),
                  ("vanilla, early stop", van, True, False, "—")]
    for ph in [p for p in ordered_phases(run) if p.startswith("distill-")]:
        t = ph[len("distill-"):]
        specs += [(f"distill from {t} + early stop", ph, True, True, t),
                  (f"distill from {t}, no early stop", ph, False, True, t)]
    out = ["| Run | Early stop | Distill | Teacher | Training [PFLOPs] | Test accuracy [%] | Sparsity [%] "
           "| Stop round | Seeds |", "|---|:-:|:-:|---|--:|--:|--:|--:|--:|"]
    for name, ph, early, distill, teacher in specs:
        outs = [_outcome(rows, early, t_e, t_a, wall) for _, rows in sorted(curves[ph].items())]
        tc = [o["teacher"] for o in outs]
        fl = _ms([o["pflops"] for o in outs], None) + (f" (+{stats(tc)[0]:.{_nd(tc)}f})" if distill else "")
        ns = f"{len(outs)}" + ("" if len(outs) == nseeds or not nseeds else f"/{nseeds}")
        out.append(f"| {name} | {'✓' if early else ''} | {'✓' if distill else ''} | {teacher} | {fl} | "
                   f"{_ms([o['test'] for o in outs])} | {_ms([o['sparsity'] for o in outs])} | "
                   f"{_rounds_cell(outs, early)} | {ns} |")
    if not specs:
        out.append("| (no completed rounds yet) | | | | | | | | |")
    out += ["", f"Early stop = Algorithm 2 replayed on each seed's curve (T_E = {t_e}, T_A = {t_a}); the reported "
            "model is the best-validation round among the rounds up to the stop (the paper returns the last, "
            "collapsed one); FLOPs are those spent up to the stop. Training FLOPs = 3 × forward FLOPs at each "
            "round's sparsity × training samples × epochs, summed over rounds; (+x) = the teacher's cost: the "
            "FLOPs spent obtaining it plus its KD inference FLOPs up to the stop (mean over seeds). Stop round "
            "`–`: Algorithm 2 never stopped (whole curve counted); `†`: the curve has not reached the wall "
            "(run in progress or stopped online). ± = sample std over seeds.", ""]
    for ph in ordered_phases(run):
        out += [f"### Per round: {phase_title(run, ph)}", "", _round_table(curves[ph], t_e, t_a), ""]
    return "\n".join(out)


def phase_title(run, ph) -> str:
    cfg = run["config"]
    if ph == "teacher":
        return f"teacher ({cfg.get('model', '?')})" + (" = vanilla student" if vanilla_phase(run) == ph else "")
    if ph == "vanilla":
        return f"vanilla student ({cfg.get('student', '?')})"
    return f"student ({cfg.get('student', '?')}) distilled from the {ph[len('distill-'):]} teacher"


def per_round(seed_rows: dict) -> tuple[list[int], dict]:
    """Rounds present in any seed, and {round: [that round's row of each seed having it]}."""
    by: dict[int, list] = {}
    for rows in seed_rows.values():
        for r in rows:
            by.setdefault(r["round"], []).append(r)
    return sorted(by), by


def mean(rs, key) -> float:
    return stats([get(r, key) for r in rs])[0]


def _round_table(seed_rows: dict, t_e, t_a) -> str:
    rounds, by = per_round(seed_rows)
    labels = label_rounds([{"test_acc": mean(by[k], "test_acc")} for k in rounds])
    best, stops = {}, {}
    for rows in seed_rows.values():
        scored = [r for r in rows if fin(get(r, "val_acc"))]
        if scored:
            k = max(scored, key=lambda r: r["val_acc"])["round"]
            best[k] = best.get(k, 0) + 1
        s = algorithm2_stop(rows, t_e, t_a)
        if s is not None:
            stops[s] = stops.get(s, 0) + 1
    n, nd = len(seed_rows), _nd([get(r, "cum_flops") / 1e15 for rows in seed_rows.values() for r in rows])
    out = ["| Round | Sparsity [%] | Val acc [%] | Test acc [%] | Entropy | Label | s/round | s/epoch "
           "| Sparse layers | Cum. PFLOPs | Best val / Alg. 2 stop |", "|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|---|"]
    for k, lab in zip(rounds, labels):
        rs = by[k]
        pct = lambda key: [100 * get(r, key) for r in rs]  # noqa: E731
        marks = ([f"best {best[k]}/{n}"] if k in best else []) + ([f"stop {stops[k]}/{n}"] if k in stops else [])
        out.append(f"| {k} | {mean(rs, 'sparsity') * 100:.2f} | {_ms(pct('val_acc'))} | {_ms(pct('test_acc'))} | "
                   f"{_ms([get(r, 'entropy_mean') for r in rs], 3)} | {lab} | {mean(rs, 'wall_s'):.1f} | "
                   f"{mean(rs, 'sec_per_epoch'):.2f} | {mean(rs, 'sparse_layers'):.0f} | "
                   f"{mean(rs, 'cum_flops') / 1e15:.{nd}f} | {', '.join(marks)} |")
    return "\n".join(out)
