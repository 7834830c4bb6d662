"""Reports of a DSD² run directory: metrics loading, Algorithm 2 replayed on a curve, phase labels,
the Table-1-style summary, plots, and RUN/summary.md.

Reads what `sparsetrain.experiment` writes: RUN/config.json and RUN/seed{S}/{phase}/metrics.csv, phase
"teacher", "vanilla" (absent when the student is the teacher's model: the teacher run is then the vanilla
run) or "distill-<teacher>". Works on partial runs (any subset of seeds/phases/rounds) and on NaNs.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np

__all__ = ["read_metrics", "load_run", "algorithm2_stop", "label_rounds", "summary_table", "plot_run",
           "write_report", "LABEL_RULE"]

_INT_COLS = {"seed", "round", "epochs", "sparse_layers", "is_best"}
_STR_COLS = {"phase"}
NAN = float("nan")


def _fin(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _g(row: dict, key: str, default=NAN):
    v = row.get(key, default)
    return v if isinstance(v, (int, float)) else default


# ============================================================================ loading
def _conv(col: str, v):
    if col in _STR_COLS or v is None:
        return v
    if v == "":
        return NAN
    try:
        return int(float(v)) if col in _INT_COLS else float(v)
    except ValueError:
        return v


def read_metrics(path) -> list[dict]:
    """Rows of a metrics.csv, types converted (int columns int, others float, phase str), sorted by round;
    a round written twice keeps its last row; a row without a parsable round (torn write) is skipped."""
    by_round: dict[int, dict] = {}
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {k: _conv(k, v) for k, v in raw.items() if k is not None}
            if isinstance(row.get("round"), int):
                by_round[row["round"]] = row
    return [by_round[k] for k in sorted(by_round)]


def load_run(run_dir) -> dict:
    """{"config": config.json (or {}), "curves": {phase: {seed: rows}}}; empty curves are left out."""
    config: dict = {}
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        pass
    curves: dict = {}
    for d in sorted(os.listdir(run_dir)):
        m, sd = re.fullmatch(r"seed(\d+)", d), os.path.join(run_dir, d)
        if not m or not os.path.isdir(sd):
            continue
        for phase in sorted(os.listdir(sd)):
            p = os.path.join(sd, phase, "metrics.csv")
            rows = read_metrics(p) if os.path.isfile(p) else []
            if rows:
                curves.setdefault(phase, {})[int(m.group(1))] = rows
    return {"config": config, "curves": curves}


# ============================================================================ Algorithm 2
def algorithm2_stop(rows, t_e=0.8, t_a=0.8) -> int | None:
    """Algorithm 2 (paper App. H) replayed on a curve; returns the round it stops at, None if it never does.

    Round 0 is the dense model: eta0 = its entropy_mean, best_acc = its val_acc. Phase 1 (lines 7-12), while
    the entropy stays above eta0*T_E: every round updates best_acc = max(best_acc, val_acc); the round whose
    entropy falls to <= eta0*T_E ends phase 1 and its accuracy is checked at once against the phase-2 loop
    condition (line 13). Phase 2: stop at the first round with val_acc <= best_acc*T_A; best_acc is frozen
    (the algorithm does not update it there). Online (experiment.py, after each round on the rows so far)
    "stop now" is a return value equal to the last round. NaNs: a NaN entropy keeps phase 1 (no evidence of a
    drop), a NaN accuracy neither updates best_acc nor stops; a NaN dense entropy gives None.

    Deviation (the table's use): the paper's line 17 returns the last model, which by construction is the
    collapsed one (accuracy just fell below T_A*best); we report the best-validation model among the rounds
    <= the stop round instead; the FLOPs are those spent up to the stop round either way.
    """
    rows = sorted(rows, key=lambda r: r["round"])
    if not rows or not _fin(_g(rows[0], "entropy_mean")):
        return None
    eta0, best, phase1 = _g(rows[0], "entropy_mean"), -math.inf, True
    for r in rows:
        acc, ent = _g(r, "val_acc"), _g(r, "entropy_mean")
        if phase1:
            if _fin(acc):
                best = max(best, acc)
            if not _fin(ent) or ent > eta0 * t_e:
                continue
            phase1 = False  # line 13 is checked with this round's accuracy right away
        if _fin(acc) and acc <= best * t_a:
            return r["round"]
    return None


# ============================================================================ phase labels
LABEL_RULE = """\
Each round is labelled on its test-accuracy curve a_0, a_1, ... in round order (= growing sparsity; a_0 = the
dense model; tol = 1 accuracy point by default; the per-round tables label the mean curve over seeds).
1. The dip: p = the round of the largest recovery, maximising a_p - min{a_j : j < p, a_j < a_0 - tol} (the
   earliest on ties), and m = the (last) round of lowest accuracy before p. It counts as a sparse double
   descent when that recovery exceeds tol (the minimum is below a_0 - tol by construction).
2. With a dip:  light = rounds 0..d-1, where d-1 is the last round before m with a >= a_0 - tol;
   critical = d..m (down into the dip and its minimum); sweet = m+1..p (the recovery up to the post-dip
   maximum a_p) and the rounds after p while they stay within tol of it (a_k >= a_p - tol);
   collapsed = from the first round after p with a_k < a_p - tol on.
3. Without a dip (e.g. a monotone curve): light up to the last round with a >= a_0 - tol, collapsed after it.
Taking the largest recovery (not the first drop) keeps seed noise of about tol in the light phase from
being read as the dip. Rounds with a NaN accuracy take the previous finite round's label (the next one's
at the start)."""


def label_rounds(rows, tol=0.01) -> list[str]:
    acc = [_g(r, "test_acc") for r in rows]
    idx = [i for i, a in enumerate(acc) if _fin(a)]  # the rule runs on the finite points, in order
    a = [acc[i] for i in idx]
    n, lab = len(a), ["light"] * len(a)
    p, rise, lo = None, tol, math.inf
    for k in range(1, n):  # largest recovery from a minimum below the dense level - tol
        if a[k - 1] < a[0] - tol:
            lo = min(lo, a[k - 1])
        if a[k] - lo > rise:
            p, rise = k, a[k] - lo
    if p is None:  # no dip: light, then collapsed once below a_0 - tol for good
        last = max(k for k in range(n) if a[k] >= a[0] - tol) if n else 0
        lab[last + 1:] = ["collapsed"] * (n - last - 1)
    else:
        m = max(k for k in range(p) if a[k] == min(a[:p]))
        d = max(k for k in range(m) if a[k] >= a[0] - tol) + 1  # round 0 always qualifies
        lab[d:m + 1] = ["critical"] * (m + 1 - d)
        state = "sweet"
        for k in range(m + 1, n):
            if k > p and a[k] < a[p] - tol:
                state = "collapsed"
            lab[k] = state
    out: list = [None] * len(rows)
    for i, l in zip(idx, lab):
        out[i] = l
    nxt = lab[0] if lab else "light"
    for i in range(len(out)):  # NaN rounds: previous finite label (next one at the start)
        out[i] = nxt = out[i] or nxt
    return out


label_rounds.__doc__ = "Label each round light / critical / sweet / collapsed.\n\n" + LABEL_RULE


# ============================================================================ tables
def _ordered_phases(run) -> list[str]:
    cfg, phases = run["config"], list(run["curves"])
    tags = [f"distill-{t}" for t in cfg.get("teachers", [])]
    key = {"teacher": (0, 0), "vanilla": (1, 0)}
    return sorted(phases, key=lambda p: key.get(p, (2, tags.index(p) if p in tags else len(tags))) + (p,))


def _vanilla_phase(run) -> str | None:
    cfg, curves = run["config"], run["curves"]
    if "vanilla" in curves:
        return "vanilla"
    same = cfg.get("student") in (None, "", cfg.get("model"))
    return "teacher" if same and "teacher" in curves else None


def _stats(vals):
    v = np.array([x for x in vals if _fin(x)], float)
    if not len(v):
        return NAN, NAN, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _nd(vals) -> int:
    """Decimals for >= 3 significant digits of the largest value (quick runs cost ~1e-3 PFLOPs)."""
    big = max([abs(x) for x in vals if _fin(x) and x != 0] or [1.0])
    return int(min(8, max(2, 2 - math.floor(math.log10(big)))))


def _ms(vals, nd=2) -> str:
    """mean ± sample std (ddof=1) over the finite values; just the mean for one value; n/a for none."""
    nd = _nd(vals) if nd is None else nd
    m, s, n = _stats(vals)
    return "n/a" if n == 0 else f"{m:.{nd}f}" if n == 1 else f"{m:.{nd}f} ± {s:.{nd}f}"


def _outcome(rows, early: bool, t_e, t_a, wall) -> dict:
    """One seed's row of Table 1: FLOPs to the stop (or the end), best-val round among rounds <= it."""
    stop = algorithm2_stop(rows, t_e, t_a) if early else None
    end = stop if stop is not None else rows[-1]["round"]
    upto = [r for r in rows if r["round"] <= end]
    fin = [r for r in upto if _fin(_g(r, "val_acc"))]
    best = max(fin, key=lambda r: r["val_acc"]) if fin else upto[-1]  # max: the first of ties
    return {"pflops": _g(upto[-1], "cum_flops") / 1e15, "stop": stop, "end": end,
            "teacher": (_g(rows[0], "teacher_cost", 0.0) + sum(_g(r, "teacher_flops", 0.0) for r in upto)) / 1e15,
            "test": 100 * _g(best, "test_acc"), "sparsity": 100 * _g(best, "sparsity"),
            "short": wall is not None and not early and _g(rows[-1], "sparsity") < wall - 1e-9}


def _rounds_cell(outs, early: bool) -> str:
    vals = [("–" if o["stop"] is None else str(o["stop"])) if early else str(o["end"]) + ("†" if o["short"] else "")
            for o in outs]
    return vals[0] if len(set(vals)) == 1 else ", ".join(vals)


def summary_table(run) -> str:
    """Markdown: Table 1 over seeds (mean ± sample std), then one per-round table per phase."""
    cfg, curves = run["config"], run["curves"]
    t_e, t_a, wall, nseeds = cfg.get("t_e", 0.8), cfg.get("t_a", 0.8), cfg.get("wall"), len(cfg.get("seeds", []))
    van = _vanilla_phase(run)
    specs = []  # (row name, phase, early stop?, distill?, teacher)
    if "teacher" in curves and van != "teacher":
        specs += [(f"teacher ({cfg.get('model', '?')}), no early stop", "teacher", False, False, "—")]
    if van:
        specs += [("vanilla, no early stop", van, False, False, "—"),
                  ("vanilla, early stop", van, True, False, "—")]
    for ph in [p for p in _ordered_phases(run) if p.startswith("distill-")]:
        t = ph[len("distill-"):]
        specs += [(f"distill from {t} + early stop", ph, True, True, t),
                  (f"distill from {t}, no early stop", ph, False, True, t)]
    out = ["| Run | Early stop | Distill | Teacher | Training [PFLOPs] | Test accuracy [%] | Sparsity [%] "
           "| Stop round | Seeds |", "|---|:-:|:-:|---|--:|--:|--:|--:|--:|"]
    for name, ph, early, distill, teacher in specs:
        outs = [_outcome(rows, early, t_e, t_a, wall) for _, rows in sorted(curves[ph].items())]
        tc = [o["teacher"] for o in outs]
        fl = _ms([o["pflops"] for o in outs], None) + (f" (+{_stats(tc)[0]:.{_nd(tc)}f})" if distill else "")
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
    for ph in _ordered_phases(run):
        out += [f"### Per round: {_phase_title(run, ph)}", "", _round_table(curves[ph], t_e, t_a), ""]
    return "\n".join(out)


def _phase_title(run, ph) -> str:
    cfg = run["config"]
    if ph == "teacher":
        return f"teacher ({cfg.get('model', '?')})" + (" = vanilla student" if _vanilla_phase(run) == ph else "")
    if ph == "vanilla":
        return f"vanilla student ({cfg.get('student', '?')})"
    return f"student ({cfg.get('student', '?')}) distilled from the {ph[len('distill-'):]} teacher"


def _per_round(seed_rows: dict) -> tuple[list[int], dict]:
    """Rounds present in any seed, and {round: [that round's row of each seed having it]}."""
    by: dict[int, list] = {}
    for rows in seed_rows.values():
        for r in rows:
            by.setdefault(r["round"], []).append(r)
    return sorted(by), by


def _mean(rs, key) -> float:
    return _stats([_g(r, key) for r in rs])[0]


def _round_table(seed_rows: dict, t_e, t_a) -> str:
    rounds, by = _per_round(seed_rows)
    labels = label_rounds([{"test_acc": _mean(by[k], "test_acc")} for k in rounds])
    best, stops = {}, {}
    for rows in seed_rows.values():
        fin = [r for r in rows if _fin(_g(r, "val_acc"))]
        if fin:
            k = max(fin, key=lambda r: r["val_acc"])["round"]
            best[k] = best.get(k, 0) + 1
        s = algorithm2_stop(rows, t_e, t_a)
        if s is not None:
            stops[s] = stops.get(s, 0) + 1
    n, nd = len(seed_rows), _nd([_g(r, "cum_flops") / 1e15 for rows in seed_rows.values() for r in rows])
    out = ["| Round | Sparsity [%] | Val acc [%] | Test acc [%] | Entropy | Label | s/round | s/epoch "
           "| Sparse layers | Cum. PFLOPs | Best val / Alg. 2 stop |", "|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|---|"]
    for k, lab in zip(rounds, labels):
        rs = by[k]
        pct = lambda key: [100 * _g(r, key) for r in rs]  # noqa: E731
        marks = ([f"best {best[k]}/{n}"] if k in best else []) + ([f"stop {stops[k]}/{n}"] if k in stops else [])
        out.append(f"| {k} | {_mean(rs, 'sparsity') * 100:.2f} | {_ms(pct('val_acc'))} | {_ms(pct('test_acc'))} | "
                   f"{_ms([_g(r, 'entropy_mean') for r in rs], 3)} | {lab} | {_mean(rs, 'wall_s'):.1f} | "
                   f"{_mean(rs, 'sec_per_epoch'):.2f} | {_mean(rs, 'sparse_layers'):.0f} | "
                   f"{_mean(rs, 'cum_flops') / 1e15:.{nd}f} | {', '.join(marks)} |")
    return "\n".join(out)


# ============================================================================ plots
_TICKS = [0, .5, .8, .9, .95, .98, .99, .995, .998, .999, .9995, .9998, .9999]
_SHADE = {"critical": ("tab:red", .08), "sweet": ("tab:green", .08), "collapsed": ("0.5", .12)}


def _x(s):
    """x = -log10(1 - sparsity): spreads 90 / 99 / 99.9 % evenly (one decade of remaining weights each)."""
    return -np.log10(np.clip(1 - np.asarray(s, float), 1e-6, None))


def _save(fig, path) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"  # same folder: os.replace is atomic
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_run(run, out_dir) -> list[str]:
    """(a) accuracy_vs_sparsity.png: test accuracy (mean ± std band over seeds) vs sparsity per phase,
    entropy on a second axis (dashed), the vanilla student's phase labels shaded; (b) cum_pflops.png:
    cumulative training PFLOPs vs round (dotted: distillation incl. the teacher's cost; x: Alg. 2 stops)."""
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend change (Agg canvas)
    curves, phases = run["curves"], _ordered_phases(run)
    if not phases:
        return []
    os.makedirs(out_dir, exist_ok=True)
    t_e, t_a = run["config"].get("t_e", 0.8), run["config"].get("t_a", 0.8)
    color = {p: f"C{i}" for i, p in enumerate(phases)}
    paths = []

    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    van = _vanilla_phase(run)
    for ph in phases:
        rounds, by = _per_round(curves[ph])
        sp = np.array([_mean(by[k], "sparsity") for k in rounds])
        acc = np.array([_stats([100 * _g(r, "test_acc") for r in by[k]])[:2] for k in rounds]).reshape(-1, 2)
        ent = np.array([_mean(by[k], "entropy_mean") for k in rounds])
        x = _x(sp)
        ax.plot(x, acc[:, 0], "-o", ms=3, color=color[ph], label=_phase_title(run, ph))
        ax.fill_between(x, acc[:, 0] - acc[:, 1], acc[:, 0] + acc[:, 1], color=color[ph], alpha=.2, lw=0)
        ax2.plot(x, ent, "--", color=color[ph], alpha=.7)
        val = np.array([_mean(by[k], "val_acc") for k in rounds])
        if np.isfinite(val).any():  # star: best mean validation accuracy
            i = int(np.nanargmax(val))
            ax.plot(x[i], acc[i, 0], "*", ms=13, color=color[ph], mec="k", mew=.6)
        if ph == van and len(x) > 1:
            labs = label_rounds([{"test_acc": a} for a in acc[:, 0] / 100])
            edges = np.concatenate([[x[0]], (x[1:] + x[:-1]) / 2, [x[-1]]])
            for i, lab in enumerate(labs):
                if lab in _SHADE:
                    ax.axvspan(edges[i], edges[i + 1], color=_SHADE[lab][0], alpha=_SHADE[lab][1], lw=0)
    lo, hi = ax.get_xlim()
    ticks = [s for s in _TICKS if lo - 1e-9 <= _x(s) <= hi + 1e-9]
    ax.set_xticks([float(_x(s)) for s in ticks], [f"{100 * s:g}" for s in ticks])
    ax.set_xlabel("sparsity [%] (log scale of remaining weights)")
    ax.set_ylabel("test accuracy [%] (mean ± std over seeds; ★ best validation)")
    ax2.set_ylabel("mean ReLU-state entropy (dashed)")
    ax.grid(alpha=.3)
    ax.legend(loc="lower left", fontsize=8,
              title=f"shaded ({_phase_title(run, van) if van else '—'}): red critical, green sweet, grey collapsed",
              title_fontsize=7)
    cfg = run["config"]
    ax.set_title(f"{cfg.get('dataset', '?')}  ε={cfg.get('eps', '?')}  model={cfg.get('model', '?')}  "
                 f"student={cfg.get('student', '?')}", fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy_vs_sparsity.png"))
    _save(fig, paths[-1])

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for ph in phases:
        rounds, by = _per_round(curves[ph])
        cum = np.array([_mean(by[k], "cum_flops") for k in rounds]) / 1e15
        ax.plot(rounds, cum, "-o", ms=3, color=color[ph], label=_phase_title(run, ph))
        if ph.startswith("distill-"):  # + teacher cost + cumulative KD inference, per seed then mean
            extra = {}
            for rows in curves[ph].values():
                c = _g(rows[0], "teacher_cost", 0.0) + np.nancumsum([_g(r, "teacher_flops", 0.0) for r in rows])
                for r, v in zip(rows, c):
                    extra.setdefault(r["round"], []).append(v)
            tot = cum + np.array([_stats(extra[k])[0] for k in rounds]) / 1e15
            ax.plot(rounds, tot, ":", color=color[ph], label=f"{ph} incl. teacher")
        for rows in curves[ph].values():
            s = algorithm2_stop(rows, t_e, t_a)
            if s is not None and s in rounds:
                ax.plot(s, cum[rounds.index(s)], "x", ms=9, mew=2, color=color[ph])
    ax.set_xlabel("round (× = Algorithm 2 stop of a seed)")
    ax.set_ylabel("cumulative training PFLOPs (mean over seeds)")
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "cum_pflops.png"))
    _save(fig, paths[-1])
    return paths


# ============================================================================ summary.md
def _atomic_text(path, text) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(run_dir) -> str:
    """Load the run, write its PNGs and RUN/summary.md (atomically); returns the summary's path."""
    run = load_run(run_dir)
    cfg = run["config"]
    pngs = plot_run(run, run_dir)
    keys = ["dataset", "eps", "model", "student", "teachers", "rate", "wall", "early_stop", "t_e", "t_a", "seeds",
            "profile", "git_commit"]
    lines = [f"# DSD² run: {os.path.basename(os.path.abspath(run_dir))}", "",
             "| Setting | Value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(cfg[k]) if isinstance(cfg[k], (list, dict)) else cfg[k]} |"
              for k in keys if k in cfg]
    done = ", ".join(f"{p}: seeds {sorted(s)}" for p, s in ((p, run['curves'][p]) for p in _ordered_phases(run)))
    lines += ["", f"Phases with metrics: {done or 'none yet'}.", "",
              "## Results (Table 1 style, mean ± std over seeds)", "", summary_table(run), "",
              "## Phase labels", "", "```", LABEL_RULE, "```", "", "## Plots", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] or ["(no metrics yet)"]
    path = os.path.join(run_dir, "summary.md")
    _atomic_text(path, "\n".join(lines) + "\n")
    return path
